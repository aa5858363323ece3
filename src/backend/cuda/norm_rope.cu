// RMSNorm and partial interleaved RoPE kernels (see norm_rope.h for layouts and numerics).
#include "backend/cuda/norm_rope.h"

#include <algorithm>

#include "backend/cuda/common.cuh"
#include "backend/cuda/cuda_util.h"
#include "backend/cuda/pdl.cuh"
#include "backend/cuda/q8_split_act.cuh"
#include "common/error.h"

namespace dsv4::cuda {
namespace {

constexpr int kNormThreads = 256;   // rms_scale_kernel
constexpr int kNormMaxPer = 16;     // values per thread of the register kernel

// One block per row, strided loop (the earlier default; rows longer than 16 values per thread).
// Launched with up to 1024 threads per row: the bound keeps the register count launchable (<= 64).
__global__ void __launch_bounds__(1024) rms_norm_kernel(RmsNormParams p) {
  pdl_trigger();
  pdl_wait();  // PDL (pdl.cuh): every input may come from the previous kernel
  __shared__ float scratch[32];
  const int64_t r = blockIdx.x;
  const float* x = p.x + r * p.x_stride;
  float* y = p.y + r * p.y_stride;
  uint8_t* q8 = p.q8 ? static_cast<uint8_t*>(p.q8) + r * (int64_t(p.n) + p.n / 8) : nullptr;
  float ss = 0.0f;
  // Unrolled so a thread's loads are issued together: the plain loop waits one memory round trip per element
  // (16-64 per thread at Flash widths). A thread still adds its elements in the same order: results unchanged.
#pragma unroll 8
  for (int i = threadIdx.x; i < p.n; i += blockDim.x) ss += x[i] * x[i];
  ss = block_sum(ss, scratch);
  const float scale = rsqrtf(ss / float(p.n) + p.eps);
#pragma unroll 8
  for (int i = threadIdx.x; i < p.n; i += blockDim.x) {
    float v = x[i] * scale;
    v = p.w ? v * p.w[i] : v;
    y[i] = v;
    if (q8) q8_split_store_warp(v, q8, p.n, i);  // n % 32 == 0: whole warps take this branch together
  }
}

// One block per row, PER values per thread kept in registers: x and w are loaded once, before the reduction.
// Thread i sums its values i, i + T, ... in that order, then the block tree (as rms_norm_kernel).
template <int PER>
__global__ void __launch_bounds__(1024) rms_norm_reg_kernel(RmsNormParams p) {
  pdl_trigger();
  pdl_wait();  // PDL (pdl.cuh): every input may come from the previous kernel
  __shared__ float scratch[32];
  const int64_t r = blockIdx.x;
  const float* x = p.x + r * p.x_stride;
  float* y = p.y + r * p.y_stride;
  uint8_t* q8 = p.q8 ? static_cast<uint8_t*>(p.q8) + r * (int64_t(p.n) + p.n / 8) : nullptr;
  const int nt = blockDim.x;
  float xv[PER], wv[PER];
#pragma unroll
  for (int k = 0; k < PER; ++k) {
    const int i = threadIdx.x + k * nt;
    xv[k] = i < p.n ? x[i] : 0.0f;
    wv[k] = p.w && i < p.n ? p.w[i] : 1.0f;
  }
  float ss = 0.0f;
#pragma unroll
  for (int k = 0; k < PER; ++k)
    if (threadIdx.x + k * nt < p.n) ss += xv[k] * xv[k];
  ss = block_sum(ss, scratch);  // synchronizes: every read of x is done before y (which may alias x) is written
  const float scale = rsqrtf(ss / float(p.n) + p.eps);
#pragma unroll
  for (int k = 0; k < PER; ++k) {
    const int i = threadIdx.x + k * nt;
    if (i < p.n) {
      float v = xv[k] * scale;
      v = p.w ? v * wv[k] : v;
      y[i] = v;
      if (q8) q8_split_store_warp(v, q8, p.n, i);
    }
  }
}

__global__ void rms_scale_kernel(const float* x, int64_t n, float eps, float* scale) {
  pdl_trigger();
  pdl_wait();  // PDL (pdl.cuh): every input may come from the previous kernel
  __shared__ float scratch[32];
  const float* xr = x + int64_t(blockIdx.x) * n;
  float ss = 0.0f;
  // Unrolled (see rms_norm_kernel). H200 workbench (commit f736620): the F16 GEMV + this + HC head weights took
  // 15.8 us for one token, the GEMV alone 4.1 us, so ~10 us were here: 64 round trips per thread for n = 16384.
#pragma unroll 8
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) ss += xr[i] * xr[i];
  ss = block_sum(ss, scratch);
  if (threadIdx.x == 0) scale[blockIdx.x] = rsqrtf(ss / float(n) + eps);
}

// One thread per (token, head, pair): cheap enough (the rotated part is 64 of 512 dims).
__global__ void rope_kernel(RopeParams p) {
  pdl_trigger();
  pdl_wait();  // PDL (pdl.cuh): every input may come from the previous kernel
  const int n_pairs = p.n_rot / 2;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t total = p.n_tokens * p.n_heads * n_pairs;
  if (idx >= total) return;
  const int j = int(idx % n_pairs);
  const int64_t th = idx / n_pairs;
  const int h = int(th % p.n_heads);
  const int64_t t = th / p.n_heads;
  double s, c;
  sincos(double(p.positions[t]) * p.omega[j], &s, &c);
  const float cf = float(c), sf = p.inverse ? -float(s) : float(s);
  float* v = p.x + t * p.token_stride + int64_t(h) * p.head_dim + (p.head_dim - p.n_rot) + 2 * j;
  const float a = v[0], b = v[1];
  // __fmul_rn/__fadd_rn keep the products separately rounded (no FMA), matching the CPU expression.
  v[0] = __fadd_rn(__fmul_rn(a, cf), -__fmul_rn(b, sf));
  v[1] = __fadd_rn(__fmul_rn(a, sf), __fmul_rn(b, cf));
}

}  // namespace

void rms_norm_cuda(const RmsNormParams& p_in, cudaStream_t stream) {
  RmsNormParams p = p_in;
  if (p.n <= 0 || p.rows < 0) fail("rms_norm_cuda: bad shape rows=%lld n=%d", (long long)p.rows, p.n);
  if (p.q8 && p.n % 32 != 0) fail("rms_norm_cuda: Q8 output needs n %% 32 == 0, got n=%d", p.n);
  if (p.threads != 0 && (p.threads % 32 != 0 || p.threads > 1024))
    fail("rms_norm_cuda: threads=%d must be a multiple of 32, at most 1024", p.threads);
  if (p.x_stride == 0) p.x_stride = p.n;
  if (p.y_stride == 0) p.y_stride = p.n;
  if (p.rows == 0) return;
  const int threads = p.threads ? p.threads : int(std::min<int64_t>(1024, (int64_t(p.n) + 127) / 128 * 32));
  const int64_t per = (int64_t(p.n) + threads - 1) / threads;
  const unsigned grid = unsigned(p.rows);
  void (*kernel)(RmsNormParams) = p.strided || per > kNormMaxPer ? rms_norm_kernel
                                  : per <= 4                     ? rms_norm_reg_kernel<4>
                                  : per <= 8                     ? rms_norm_reg_kernel<8>
                                                                 : rms_norm_reg_kernel<16>;
  launch_pdl("rms_norm_kernel", kernel, dim3(grid), dim3(unsigned(threads)), 0, stream, p);
}

void rms_scale_cuda(const float* x, int64_t rows, int64_t n, float eps, float* scale, cudaStream_t stream) {
  if (rows <= 0) return;
  launch_pdl("rms_scale_kernel", rms_scale_kernel, dim3(unsigned(rows)), dim3(kNormThreads), 0, stream, x, n, eps,
             scale);
}

void rope_cuda(const RopeParams& p_in, cudaStream_t stream) {
  RopeParams p = p_in;
  if (p.n_rot <= 0 || p.n_rot % 2 || p.n_rot / 2 > kRopeMaxPairs || p.n_rot > p.head_dim)
    fail("rope_cuda: n_rot=%d must be even, <= %d and <= head_dim=%d", p.n_rot, 2 * kRopeMaxPairs, p.head_dim);
  if (p.token_stride == 0) p.token_stride = int64_t(p.n_heads) * p.head_dim;
  const int64_t total = p.n_tokens * p.n_heads * (p.n_rot / 2);
  if (total == 0) return;
  constexpr int kThreads = 256;
  launch_pdl("rope_kernel", rope_kernel, dim3(unsigned((total + kThreads - 1) / kThreads)), dim3(kThreads), 0, stream,
             p);
}

}  // namespace dsv4::cuda
