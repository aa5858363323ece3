// Shared helpers for the CUDA op-parity tests: device gating, random data, and the comparison vocabulary
// (relative L2 error, max abs error with a floor, argmax, finiteness). Per-op tolerances live beside each test.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "backend/cuda/cuda_util.h"
#include "common/error.h"

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

}  // namespace dsv4::test
