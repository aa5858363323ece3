// Row post-processing kernel: norm, RoPE, QAT (see attention_rows.h).
#include "backend/cuda/attention_rows.h"

#include "backend/cuda/attention_qat.cuh"
#include "backend/cuda/common.cuh"
#include "backend/cuda/cuda_util.h"
#include "backend/cuda/q8_split_act.cuh"
#include "common/error.h"

namespace dsv4::cuda {
namespace {

// Per-block absolute maxima as int bits: non-negative floats order like their bit patterns, so a shared int
// atomicMax is an exact float max.
__device__ __forceinline__ float block_amax(float v, int i, int n, int block, float floor_v, int* amax_bits) {
  const int n_blocks = (n + block - 1) / block;
  if (threadIdx.x < n_blocks) amax_bits[threadIdx.x] = __float_as_int(floor_v);
  __syncthreads();
  if (i < n) atomicMax(&amax_bits[i / block], __float_as_int(fabsf(v)));
  __syncthreads();
  return i < n ? __int_as_float(amax_bits[i / block]) : 0.0f;
}

// One block per row, thread i owns element i.
__global__ void row_finish_kernel(RowFinishParams p) {
  __shared__ float buf[kRowMaxDim];
  __shared__ float red[32];
  __shared__ int amax_bits[kRowMaxDim / 32];
  const int64_t r = blockIdx.x;
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
    const float amax = block_amax(v, i, n, 64, 1e-4f, amax_bits);
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
    const float amax = block_amax(v, i, d, 32, 6.0f * 0x1p-126f, amax_bits);
    if (i < d) v = qat_fp4_elem(v, qat_pow2_ceil(__fdiv_rn(amax, 6.0f)));
  }
  if (i < d) x[i] = v;
  if (p.q8)  // d % 32 == 0 (checked): every warp is whole and inside the row
    q8_split_store_warp(v, static_cast<uint8_t*>(p.q8) + r * (int64_t(d) + d / 8), d, i);
}

}  // namespace

void row_finish_cuda(const RowFinishParams& p_in, cudaStream_t stream) {
  RowFinishParams p = p_in;
  if (p.d <= 0 || p.d > kRowMaxDim) fail("row_finish_cuda: row width %d outside 1..%d", p.d, kRowMaxDim);
  if (p.n_rot < 0 || p.n_rot % 2 || p.n_rot / 2 > kRowMaxPairs || p.n_rot > p.d)
    fail("row_finish_cuda: n_rot %d must be even, <= %d and <= d %d", p.n_rot, 2 * kRowMaxPairs, p.d);
  if (p.qat == RowQat::Fp4Hadamard && (p.d & (p.d - 1)) != 0)
    fail("row_finish_cuda: Hadamard needs a power-of-two width, got %d", p.d);
  if (p.norm == RowNorm::Weighted && !p.norm_w) fail("row_finish_cuda: weighted norm without weights");
  if (p.rows_per_pos <= 0) fail("row_finish_cuda: rows_per_pos %d must be positive", p.rows_per_pos);
  if (p.q8 && p.d % 32 != 0) fail("row_finish_cuda: Q8 output needs a width multiple of 32, got %d", p.d);
  if (p.stride == 0) p.stride = p.d;
  if (p.n_rows <= 0) return;
  const int threads = (p.d + 31) / 32 * 32;
  row_finish_kernel<<<unsigned(p.n_rows), unsigned(threads), 0, stream>>>(p);
  check_launch("row_finish_kernel");
}

}  // namespace dsv4::cuda
