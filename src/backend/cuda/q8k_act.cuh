// The GPU's Q8_K activation block and its one quantizer, shared by the GEMV kernels (gemv.cu: the activation rows
// Q2_K / Q4_K / IQ2_XXS weights are dotted with) and the launches that write such rows next to their own work
// (the fused decode router, moe.cu), so every producer writes the same bytes. Device code only.
#pragma once

#include <cstddef>
#include <cstdint>

#include "backend/cuda/common.cuh"
#include "quant/blocks.h"

namespace dsv4::cuda {

// The GPU's Q8_K activation block: the same d, qs and bsums values as block_q8_K (quant/blocks.h), padded to
// 304 bytes so qs starts 16-byte aligned and a lane reads its 32 activations with two 16-byte loads (the 292-byte
// CPU block only allows 4-byte loads, 8 per 32 values).
struct ActQ8K {
  float d;
  float pad[3];
  int8_t qs[kQK_K];
  int16_t bsums[kQK_K / 16];
};
static_assert(sizeof(ActQ8K) == 304 && offsetof(ActQ8K, qs) == 16, "ActQ8K layout");

// One Q8_K block (256 values at x, 16-byte aligned) quantized by a whole warp, 8 consecutive values per lane. Same
// rule as quant_q8_K: symmetric [-127, 127], q = rint(x * 127/amax), d = amax/127, bsums over 16-value groups.
// The one implementation for quantize_q8_K_kernel and the launches that quantize their input in shared memory
// (GemvParams::xf), so both give the same bytes.
__device__ __forceinline__ void quantize_q8_K_block_warp(const float* x, ActQ8K* y) {
  const int lane = threadIdx.x & 31;
  const float4* src = reinterpret_cast<const float4*>(x + 8 * lane);
  const float4 u = src[0], w = src[1];
  const float v[8] = {u.x, u.y, u.z, u.w, w.x, w.y, w.z, w.w};
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(v[i]));
  amax = warp_max(amax);
  const float iscale = amax != 0.0f ? 127.0f / amax : 0.0f;
  int q[8], sum = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    q[i] = min(max(__float2int_rn(iscale * v[i]), -127), 127);
    sum += q[i];
  }
  uint32_t lo = 0, hi = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    lo |= uint32_t(q[i] & 0xFF) << (8 * i);
    hi |= uint32_t(q[i + 4] & 0xFF) << (8 * i);
  }
  *reinterpret_cast<uint2*>(y->qs + 8 * lane) = make_uint2(lo, hi);
  sum += __shfl_xor_sync(kFullMask, sum, 1);
  if ((lane & 1) == 0) y->bsums[lane >> 1] = int16_t(sum);
  if (lane == 0) {
    y->d = amax != 0.0f ? amax / 127.0f : 0.0f;
    y->pad[0] = y->pad[1] = y->pad[2] = 0.0f;
  }
}

}  // namespace dsv4::cuda
