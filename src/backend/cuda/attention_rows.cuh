// The row body of row_finish_kernel (attention_rows.h) as a device function, so kernels that produce a row can
// finish it in the same launch with the same bits (compressor.cu: pool + finish + state update in one decode
// launch). Included only by .cu files.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/attention_qat.cuh"
#include "backend/cuda/attention_rows.h"
#include "backend/cuda/common.cuh"
#include "backend/cuda/q8_split_act.cuh"

namespace dsv4::cuda {

// Per-block absolute maxima as int bits: non-negative floats order like their bit patterns, so a shared int
// atomicMax is an exact float max.
__device__ __forceinline__ float row_block_amax(float v, int i, int n, int block, float floor_v, int* amax_bits) {
  const int n_blocks = (n + block - 1) / block;
  if (threadIdx.x < n_blocks) amax_bits[threadIdx.x] = __float_as_int(floor_v);
  __syncthreads();
  if (i < n) atomicMax(&amax_bits[i / block], __float_as_int(fabsf(v)));
  __syncthreads();
  return i < n ? __int_as_float(amax_bits[i / block]) : 0.0f;
}

struct RowShared {
  float buf[kRowMaxDim];
  float red[32];
  int amax_bits[kRowMaxDim / 32];
};

// Row r of p by the whole block, thread i owns element i (threads past d take part in the block reductions with
// zeros, which leaves every sum's bits unchanged, so the block size of a batch does not change results).
__device__ __forceinline__ void row_finish_row(const RowFinishParams& p, int64_t r, RowShared& sh) {
  float* buf = sh.buf;
  float* red = sh.red;
  int* amax_bits = sh.amax_bits;
  const int i = threadIdx.x, d = p.d;
  float* x = p.x + r * p.stride;
  float v = i < d ? x[i] : 0.0f;

  if (p.norm != RowNorm::None) {
    const float ss = block_sum(v * v, red);
    const float inv = 1.0f / sqrtf(ss / float(d) + p.eps);  // the CPU's expression (no rsqrtf)
    v = v * inv;
    if (p.norm == RowNorm::Weighted && i < d) v = v * p.norm_w[i];
  }

  if (p.n_rot > 0) {
    buf[i] = v;
    __syncthreads();
    const int k = i - (d - p.n_rot);
    if (k >= 0 && i < d) {
      const int j = k / 2;
      const int64_t pos = p.pos0 + (r / p.rows_per_pos) * p.pos_step;
      double sd, cd;
      sincos(double(pos) * p.omega[j], &sd, &cd);
      const float c = float(cd), s = p.inverse ? -float(sd) : float(sd);
      const float a = buf[i - (k & 1)], b = buf[i - (k & 1) + 1];
      v = (k & 1) == 0 ? __fadd_rn(__fmul_rn(a, c), -__fmul_rn(b, s)) : __fadd_rn(__fmul_rn(a, s), __fmul_rn(b, c));
    }
    __syncthreads();
  }

  if (p.qat == RowQat::Fp8) {
    const int n = d - p.n_rot;
    const float amax = row_block_amax(v, i, n, 64, 1e-4f, amax_bits);
    if (i < n) v = qat_fp8_elem(v, qat_pow2_ceil(__fdiv_rn(amax, 448.0f)));
  } else if (p.qat == RowQat::Fp4Hadamard) {
    buf[i] = v;
    __syncthreads();
    for (int h = 1; h < d; h *= 2) {  // Sylvester butterflies, stage by stage as on the CPU
      if (i < d && (i & h) == 0) {
        const float a = buf[i], b = buf[i + h];
        buf[i] = a + b;
        buf[i + h] = a - b;
      }
      __syncthreads();
    }
    v = i < d ? buf[i] * (1.0f / sqrtf(float(d))) : 0.0f;
    const float amax = row_block_amax(v, i, d, 32, 6.0f * 0x1p-126f, amax_bits);
    if (i < d) v = qat_fp4_elem(v, qat_pow2_ceil(__fdiv_rn(amax, 6.0f)));
  }
  if (i < d) x[i] = v;
  if (p.q8)  // d % 32 == 0 and the block is d threads (checked): every warp is whole and inside the row
    q8_split_store_warp(v, static_cast<uint8_t*>(p.q8) + r * (int64_t(d) + d / 8), d, i);
}

}  // namespace dsv4::cuda
