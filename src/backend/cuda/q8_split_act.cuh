// Device helper shared by kernels that emit Q8_0 activations in the split layout of the dense GEMVs (gemv.h,
// GemvLayout::Q8Split: a row of `cols` values is [cols int8 quants][cols/32 f32 scales]) next to their float
// output, so the matmul reading that output needs no quantize launch (rms_norm_cuda, row_finish_cuda).
//
// The rule is quantize_q8_0_split_kernel's (gemv.cu), operation for operation: d = amax / 127 in f32,
// q = roundf(v * (1/d)), the scale stored as the f32 value of its f16 rounding; so the bytes are identical to
// quantize_activations_cuda(Q8_0, ..., Q8Split) on the same floats (tests/ops check this bit for bit).
#pragma once

#include <cstdint>

#include "backend/cuda/common.cuh"
#include "quant/blocks.h"

namespace dsv4::cuda {

// Called by all 32 lanes of a warp together, lane l holding value v of column c = 32 * j + l of one activation
// row (arow: that row's first byte, cols + cols / 8 bytes).
__device__ __forceinline__ void q8_split_store_warp(float v, uint8_t* arow, int64_t cols, int64_t c) {
  const float amax = warp_max(fabsf(v));
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  reinterpret_cast<int8_t*>(arow)[c] = int8_t(roundf(v * id));
  if ((c & 31) == 0) reinterpret_cast<float*>(arow + cols)[c >> 5] = f16_to_f32(f32_to_f16(d));
}

}  // namespace dsv4::cuda
