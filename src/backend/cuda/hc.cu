// Hyper-connection kernels (see hc.h). The 4x4 Sinkhorn runs in one thread per token, entirely in registers:
// it is 20 iterations of 16 divisions, far below launch cost, and a single thread keeps the summation order
// identical to the CPU loop (sum over o in order, then over i in order).
#include "backend/cuda/hc.h"

#include "backend/cuda/common.cuh"
#include "backend/cuda/cuda_util.h"
#include "common/error.h"

namespace dsv4::cuda {
namespace {

constexpr int N = kHcStreams;

__device__ __forceinline__ float sigmoidf_(float z) { return 1.0f / (1.0f + expf(-z)); }

__global__ void hc_split_sinkhorn_kernel(HcSinkhornParams p) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= p.n_tokens) return;
  float mix[kHcMix];
  const float ms = p.mix_scale ? p.mix_scale[t] : 1.0f;
#pragma unroll
  for (int j = 0; j < kHcMix; ++j) mix[j] = p.mix[t * kHcMix + j] * ms;
  const float s_pre = p.scale[0], s_post = p.scale[1], s_comb = p.scale[2];
#pragma unroll
  for (int i = 0; i < N; ++i) {
    p.pre[t * N + i] = sigmoidf_(mix[i] * s_pre + p.base[i]) + p.eps;
    p.post[t * N + i] = 2.0f * sigmoidf_(mix[N + i] * s_post + p.base[N + i]);
  }
  float c[N][N];
#pragma unroll
  for (int i = 0; i < N; ++i) {
    float m = -INFINITY;
#pragma unroll
    for (int o = 0; o < N; ++o) {
      c[i][o] = mix[2 * N + N * i + o] * s_comb + p.base[2 * N + N * i + o];
      m = fmaxf(m, c[i][o]);
    }
    float sum = 0.0f;
#pragma unroll
    for (int o = 0; o < N; ++o) {
      c[i][o] = expf(c[i][o] - m);
      sum += c[i][o];
    }
#pragma unroll
    for (int o = 0; o < N; ++o) c[i][o] = c[i][o] / sum + p.eps;
  }
  for (int it = 0; it < p.iters; ++it) {
    if (it > 0) {
#pragma unroll
      for (int i = 0; i < N; ++i) {
        float sum = 0.0f;
#pragma unroll
        for (int o = 0; o < N; ++o) sum += c[i][o];
        const float inv = 1.0f / (sum + p.eps);
#pragma unroll
        for (int o = 0; o < N; ++o) c[i][o] *= inv;
      }
    }
#pragma unroll
    for (int o = 0; o < N; ++o) {
      float sum = 0.0f;
#pragma unroll
      for (int i = 0; i < N; ++i) sum += c[i][o];
      const float inv = 1.0f / (sum + p.eps);
#pragma unroll
      for (int i = 0; i < N; ++i) c[i][o] *= inv;
    }
  }
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int o = 0; o < N; ++o) p.comb[t * N * N + i * N + o] = c[i][o];
}

// One thread per (token, dim): reads the 4 stream values of that dim.
__global__ void hc_collapse_kernel(const float* X, const float* pre, int64_t n_tokens, int64_t d, float* a) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n_tokens * d) return;
  const int64_t t = idx / d, k = idx % d;
  const float* x = X + t * N * d + k;
  float acc = 0.0f;
#pragma unroll
  for (int i = 0; i < N; ++i) acc += pre[t * N + i] * x[int64_t(i) * d];
  a[idx] = acc;
}

__global__ void hc_post_kernel(float* X, const float* y, const float* post, const float* comb, int64_t n_tokens,
                               int64_t d) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n_tokens * d) return;
  const int64_t t = idx / d, k = idx % d;
  float* x = X + t * N * d + k;
  float in[N];
#pragma unroll
  for (int i = 0; i < N; ++i) in[i] = x[int64_t(i) * d];
  const float yv = y[idx];
  const float* c = comb + t * N * N;
#pragma unroll
  for (int o = 0; o < N; ++o) {
    float acc = post[t * N + o] * yv;
#pragma unroll
    for (int i = 0; i < N; ++i) acc += c[i * N + o] * in[i];
    x[int64_t(o) * d] = acc;
  }
}

// w[t][i] = sigmoid(mix[t][i] * mix_scale[t] * scale[0] + base[i]) + eps, one thread per (token, stream).
__global__ void hc_head_weights_kernel(const float* mix, const float* mix_scale, const float* base,
                                       const float* scale, int64_t n_tokens, float eps, float* w) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n_tokens * N) return;
  const int64_t t = idx / N;
  const int i = int(idx % N);
  w[idx] = sigmoidf_(mix[idx] * mix_scale[t] * scale[0] + base[i]) + eps;
}

constexpr int kThreads = 256;
unsigned blocks_for(int64_t n) { return unsigned((n + kThreads - 1) / kThreads); }

}  // namespace

void hc_split_sinkhorn_cuda(const HcSinkhornParams& p, cudaStream_t stream) {
  if (p.iters < 1) fail("hc_split_sinkhorn_cuda: iters must be >= 1, got %d", p.iters);
  if (p.n_tokens <= 0) return;
  hc_split_sinkhorn_kernel<<<blocks_for(p.n_tokens), kThreads, 0, stream>>>(p);
  check_launch("hc_split_sinkhorn_kernel");
}

void hc_head_weights_cuda(const float* mix, const float* mix_scale, const float* base, const float* scale,
                          int64_t n_tokens, float eps, float* w, cudaStream_t stream) {
  if (n_tokens <= 0) return;
  hc_head_weights_kernel<<<blocks_for(n_tokens * N), kThreads, 0, stream>>>(mix, mix_scale, base, scale, n_tokens,
                                                                             eps, w);
  check_launch("hc_head_weights_kernel");
}

void hc_collapse_cuda(const float* X, const float* pre, int64_t n_tokens, int64_t d, float* a,
                      cudaStream_t stream) {
  if (n_tokens * d <= 0) return;
  hc_collapse_kernel<<<blocks_for(n_tokens * d), kThreads, 0, stream>>>(X, pre, n_tokens, d, a);
  check_launch("hc_collapse_kernel");
}

void hc_post_cuda(float* X, const float* y, const float* post, const float* comb, int64_t n_tokens, int64_t d,
                  cudaStream_t stream) {
  if (n_tokens * d <= 0) return;
  hc_post_kernel<<<blocks_for(n_tokens * d), kThreads, 0, stream>>>(X, y, post, comb, n_tokens, d);
  check_launch("hc_post_kernel");
}

}  // namespace dsv4::cuda
