// Shared helpers for the CUDA op-parity tests: device gating, random data, and the comparison vocabulary
// (relative L2 error, max abs error with a floor, argmax, finiteness). Per-op tolerances live beside each test.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <cstdint>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/cuda/cuda_util.h"
#include "common/error.h"
#include "quant/quant.h"

// Every GPU test starts with this: CI has nvcc but no GPU, so a missing device is a skip, not a failure.
#define DSV4_REQUIRE_CUDA()                                                              \
  do {                                                                                   \
    if (!::dsv4::cuda::device_available()) GTEST_SKIP() << "no CUDA device present";     \
  } while (0)

namespace dsv4::test {

inline std::vector<float> random_normal(size_t n, uint64_t seed, float sigma = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.0f, sigma);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

// ||a - ref|| / ||ref|| in double. Any non-finite value in `a` gives +inf (NaN never passes).
inline double rel_l2(std::span<const float> a, std::span<const double> ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    const double d = double(a[i]) - ref[i];
    num += d * d;
    den += ref[i] * ref[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}
inline double rel_l2(std::span<const float> a, std::span<const float> ref) {
  std::vector<double> r(ref.begin(), ref.end());
  return rel_l2(a, std::span<const double>(r));
}

// max_i |a_i - ref_i| / max(|ref_i|, floor): relative error where values are large, absolute near zero.
inline double max_rel_err(std::span<const float> a, std::span<const double> ref, double floor) {
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    worst = std::max(worst, std::fabs(double(a[i]) - ref[i]) / std::max(std::fabs(ref[i]), floor));
  }
  return worst;
}

inline double max_abs_err(std::span<const float> a, std::span<const float> ref) {
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    worst = std::max(worst, std::fabs(double(a[i]) - double(ref[i])));
  }
  return worst;
}

template <typename T>
size_t argmax(std::span<const T> v) {
  size_t best = 0;
  for (size_t i = 1; i < v.size(); ++i)
    if (v[i] > v[best]) best = i;
  return best;
}

// Host vector <-> device memory, through a Backend (DeviceBuffer) or directly (cuda::DeviceArray): the one copy of
// what used to be repeated in every test file.
template <typename T>
DeviceBuffer put(Backend& be, const std::vector<T>& v) {
  DeviceBuffer b = be.alloc(v.size() * sizeof(T));
  be.upload(b.data(), v.data(), v.size() * sizeof(T));
  return b;
}
template <typename T>
std::vector<T> get(Backend& be, const DeviceBuffer& b, size_t n) {
  std::vector<T> v(n);
  be.download(v.data(), b.data(), n * sizeof(T));
  return v;
}
template <typename T>
cuda::DeviceArray<T> upload(const std::vector<T>& v) {
  return cuda::DeviceArray<T>(std::span<const T>(v));
}

// Random valid quantized weights: random bytes with sane f16 scale fields (every grid index, sign code and scale
// nibble occurs), or Gaussian F16 values. Much faster than quantizing (IQ2_XXS quantizes at ~1 M values/s).
inline void put_f16(uint8_t* p, float v) {
  const uint16_t h = f32_to_f16(v);
  std::memcpy(p, &h, 2);
}

// rows x cols (x n_experts) of random valid blocks of type t.
inline std::vector<uint8_t> random_weights(QType t, int64_t rows, int64_t cols, uint64_t seed, int64_t n_experts = 1) {
  const int64_t n_rows = rows * n_experts;
  const int64_t rb = row_bytes(t, cols);
  std::vector<uint8_t> w(size_t(n_rows * rb));
  std::mt19937_64 rng(seed);
  if (t == QType::F16) {
    std::normal_distribution<float> dist(0.0f, 0.05f);
    for (size_t i = 0; i < w.size(); i += 2) put_f16(&w[i], dist(rng));
    return w;
  }
  for (size_t i = 0; i + 8 <= w.size(); i += 8) {
    const uint64_t r = rng();
    std::memcpy(&w[i], &r, 8);
  }
  std::uniform_real_distribution<float> scale(0.5e-3f, 4e-3f);
  const int64_t bb = block_bytes(t);
  for (int64_t off = 0; off < int64_t(w.size()); off += bb) {
    uint8_t* b = &w[size_t(off)];
    switch (t) {
      case QType::Q8_0: put_f16(b, scale(rng)); break;
      case QType::Q2_K: put_f16(b + 80, scale(rng)), put_f16(b + 82, scale(rng)); break;
      case QType::Q4_K: put_f16(b, scale(rng)), put_f16(b + 2, scale(rng)); break;
      case QType::IQ2_XXS: put_f16(b, scale(rng)); break;
      default: ADD_FAILURE() << "no random blocks for " << qtype_name(t);
    }
  }
  return w;
}

}  // namespace dsv4::test
