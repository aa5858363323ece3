// QAT round trips (model-spec §3.4); see attention_qat.h.
#include "model/attention_qat.h"

#include <algorithm>
#include <cmath>

#include "common/error.h"

namespace dsv4 {
namespace {

// 2^ceil(log2(r)) for r > 0, computed exactly from the float's exponent and mantissa (a log2 in floating point
// could land a hair above an exact power of two and double the scale).
float pow2_ceil(float r) {
  int e = 0;
  float f = std::frexp(r, &e);  // r = f * 2^e, f in [0.5, 1)
  return std::ldexp(1.0f, f == 0.5f ? e - 1 : e);
}

// Round v to a multiple of `step` (a power of two, so v / step is exact), ties to even (the default FP mode).
float round_to_step(float v, float step) { return std::rint(v / step) * step; }

}  // namespace

float e4m3_round(float v) {
  float a = std::fabs(v);
  if (a < 0x1p-6f) return round_to_step(v, 0x1p-9f);  // subnormal range: fixed step 2^-9
  int e = 0;
  std::frexp(a, &e);  // a in [2^(e-1), 2^e): 3 mantissa bits -> step 2^(e-1-3)
  return round_to_step(v, std::ldexp(1.0f, e - 4));
}

float e2m1_round(float v) {
  // Grid spacing of e2m1: 0.5 below 2, 1 in [2, 4), 2 in [4, 6]; the parity of v/step matches the parity of the
  // code, so the default ties-to-even rounding is "ties to the even code".
  float a = std::fabs(v);
  float step = a < 2.0f ? 0.5f : (a < 4.0f ? 1.0f : 2.0f);
  return round_to_step(v, step);
}

void qat_fp8_blocks(float* x, int n, int block) {
  for (int b0 = 0; b0 < n; b0 += block) {
    int b1 = std::min(n, b0 + block);
    float amax = 1e-4f;
    for (int i = b0; i < b1; ++i) amax = std::max(amax, std::fabs(x[i]));
    float s = pow2_ceil(amax / 448.0f);
    for (int i = b0; i < b1; ++i) x[i] = e4m3_round(std::clamp(x[i] / s, -448.0f, 448.0f)) * s;
  }
}

void hadamard_orthonormal(float* x, int n) {
  if (n <= 0 || (n & (n - 1)) != 0) fail("hadamard: length %d is not a power of two", n);
  for (int h = 1; h < n; h *= 2) {
    for (int i = 0; i < n; i += 2 * h) {
      for (int j = i; j < i + h; ++j) {
        float a = x[j], b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
    }
  }
  float s = 1.0f / std::sqrt(float(n));
  for (int i = 0; i < n; ++i) x[i] *= s;
}

void qat_fp4_indexer_row(float* x, int n) {
  hadamard_orthonormal(x, n);
  for (int b0 = 0; b0 < n; b0 += 32) {
    int b1 = std::min(n, b0 + 32);
    float amax = 6.0f * 0x1p-126f;
    for (int i = b0; i < b1; ++i) amax = std::max(amax, std::fabs(x[i]));
    float s = pow2_ceil(amax / 6.0f);
    for (int i = b0; i < b1; ++i) x[i] = e2m1_round(std::clamp(x[i] / s, -6.0f, 6.0f)) * s;
  }
}

}  // namespace dsv4
