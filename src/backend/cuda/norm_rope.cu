// RMSNorm and partial interleaved RoPE kernels (see norm_rope.h for layouts and numerics).
#include "backend/cuda/norm_rope.h"

#include "backend/cuda/common.cuh"
#include "backend/cuda/cuda_util.h"
#include "common/error.h"

namespace dsv4::cuda {
namespace {

constexpr int kNormThreads = 256;

// One block per row; float4 loads when the row is 16-byte aligned and n % 4 == 0.
__global__ void rms_norm_kernel(RmsNormParams p) {
  __shared__ float scratch[32];
  const int64_t r = blockIdx.x;
  const float* x = p.x + r * p.x_stride;
  float* y = p.y + r * p.y_stride;
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
    y[i] = p.w ? v * p.w[i] : v;
  }
}

__global__ void rms_scale_kernel(const float* x, int64_t n, float eps, float* scale) {
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
  if (p.x_stride == 0) p.x_stride = p.n;
  if (p.y_stride == 0) p.y_stride = p.n;
  if (p.rows == 0) return;
  rms_norm_kernel<<<unsigned(p.rows), kNormThreads, 0, stream>>>(p);
  check_launch("rms_norm_kernel");
}

void rms_scale_cuda(const float* x, int64_t rows, int64_t n, float eps, float* scale, cudaStream_t stream) {
  if (rows <= 0) return;
  rms_scale_kernel<<<unsigned(rows), kNormThreads, 0, stream>>>(x, n, eps, scale);
  check_launch("rms_scale_kernel");
}

void rope_cuda(const RopeParams& p_in, cudaStream_t stream) {
  RopeParams p = p_in;
  if (p.n_rot <= 0 || p.n_rot % 2 || p.n_rot / 2 > kRopeMaxPairs || p.n_rot > p.head_dim)
    fail("rope_cuda: n_rot=%d must be even, <= %d and <= head_dim=%d", p.n_rot, 2 * kRopeMaxPairs, p.head_dim);
  if (p.token_stride == 0) p.token_stride = int64_t(p.n_heads) * p.head_dim;
  const int64_t total = p.n_tokens * p.n_heads * (p.n_rot / 2);
  if (total == 0) return;
  constexpr int kThreads = 256;
  rope_kernel<<<unsigned((total + kThreads - 1) / kThreads), kThreads, 0, stream>>>(p);
  check_launch("rope_kernel");
}

}  // namespace dsv4::cuda
