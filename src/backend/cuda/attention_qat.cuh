// Device twins of the QAT round trips of src/model/attention_qat.cpp (model-spec §3.4). Each function performs
// the same IEEE operations in the same order as its CPU twin (frexp/ldexp exponent arithmetic, rint ties to
// even, correctly rounded division), so results are bitwise equal on equal inputs. Included only by .cu files.
#pragma once

#include <cuda_runtime.h>

namespace dsv4::cuda {

// 2^ceil(log2(r)) for r > 0 from the exponent (see pow2_ceil in attention_qat.cpp).
__device__ __forceinline__ float qat_pow2_ceil(float r) {
  int e = 0;
  const float f = frexpf(r, &e);
  return ldexpf(1.0f, f == 0.5f ? e - 1 : e);
}

__device__ __forceinline__ float qat_round_to_step(float v, float step) { return rintf(__fdiv_rn(v, step)) * step; }

__device__ __forceinline__ float qat_e4m3_round(float v) {
  const float a = fabsf(v);
  if (a < 0x1p-6f) return qat_round_to_step(v, 0x1p-9f);
  int e = 0;
  frexpf(a, &e);
  return qat_round_to_step(v, ldexpf(1.0f, e - 4));
}

__device__ __forceinline__ float qat_e2m1_round(float v) {
  const float a = fabsf(v);
  const float step = a < 2.0f ? 0.5f : (a < 4.0f ? 1.0f : 2.0f);
  return qat_round_to_step(v, step);
}

// One element of a block with scale s = qat_pow2_ceil(amax / 448): e4m3(clamp(x/s)) * s.
__device__ __forceinline__ float qat_fp8_elem(float x, float s) {
  return qat_e4m3_round(fminf(fmaxf(__fdiv_rn(x, s), -448.0f), 448.0f)) * s;
}
__device__ __forceinline__ float qat_fp4_elem(float x, float s) {
  return qat_e2m1_round(fminf(fmaxf(__fdiv_rn(x, s), -6.0f), 6.0f)) * s;
}

}  // namespace dsv4::cuda
