// Hyper-connection kernels (see hc.h). The 4x4 Sinkhorn runs on one warp per token (sinkhorn_token_warp), with
// the summation order of the CPU loop (sum over o in order, then over i in order).
#include "backend/cuda/hc.h"

#include <cuda_fp16.h>

#include "backend/cuda/common.cuh"
#include "backend/cuda/cuda_util.h"
#include "common/error.h"

namespace dsv4::cuda {
namespace {

constexpr int N = kHcStreams;

__device__ __forceinline__ float sigmoidf_(float z) { return 1.0f / (1.0f + expf(-z)); }

// Steps 3-7 of model-spec §4 for one token on one warp. A single thread took ~9 us per token on the H200 (the
// 4x4 Sinkhorn is 20 rounds of dependent sums and IEEE divisions: latency, not work), and hc_pre runs 86 times
// per decoded token. Lane l < 16 holds c[i][o], i = l / 4, o = l % 4 (lanes 16-31 mirror them and write nothing);
// row and column sums gather the 4 values by shuffles and add them in the CPU's order (o, resp. i, ascending,
// from 0), and every lane computes the same 1 / (sum + eps), so results equal the CPU loop operation for
// operation (__frcp_rn is the correctly rounded reciprocal, i.e. exactly 1.0f / x, without the division
// routine's latency). mix_pp: lanes 0-7 hold mix[lane] (pre, post); mix_c: mix[8 + l % 16]; both RMS-scaled.
__device__ void sinkhorn_token_warp(float mix_pp, float mix_c, const float* base, const float* scale, int iters,
                                    float eps, float* pre, float* post, float* comb) {
  const int lane = threadIdx.x & 31, e = lane & 15, o = e & 3;
  const int row0 = lane & ~3, col0 = (lane & 16) | o;
  if (lane < N) pre[lane] = sigmoidf_(mix_pp * scale[0] + base[lane]) + eps;
  else if (lane < 2 * N) post[lane - N] = 2.0f * sigmoidf_(mix_pp * scale[1] + base[lane]);
  float c = mix_c * scale[2] + base[2 * N + e];
  float m = -INFINITY;
#pragma unroll
  for (int q = 0; q < N; ++q) m = fmaxf(m, __shfl_sync(kFullMask, c, row0 + q));
  c = expf(c - m);
  float sum = 0.0f;
#pragma unroll
  for (int q = 0; q < N; ++q) sum += __shfl_sync(kFullMask, c, row0 + q);
  c = c / sum + eps;
  for (int it = 0; it < iters; ++it) {
    if (it > 0) {
      sum = 0.0f;
#pragma unroll
      for (int q = 0; q < N; ++q) sum += __shfl_sync(kFullMask, c, row0 + q);
      c *= __frcp_rn(sum + eps);
    }
    sum = 0.0f;
#pragma unroll
    for (int q = 0; q < N; ++q) sum += __shfl_sync(kFullMask, c, col0 + N * q);
    c *= __frcp_rn(sum + eps);
  }
  if (lane < N * N) comb[e] = c;
}

// One warp per token.
__global__ void hc_split_sinkhorn_kernel(HcSinkhornParams p) {
  const int64_t t = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (t >= p.n_tokens) return;  // whole warps leave together
  const int lane = threadIdx.x & 31;
  const float ms = p.mix_scale ? p.mix_scale[t] : 1.0f;
  const float* mix = p.mix + t * kHcMix;
  const float mix_pp = lane < 2 * N ? mix[lane] * ms : 0.0f;
  const float mix_c = mix[2 * N + (lane & 15)] * ms;
  sinkhorn_token_warp(mix_pp, mix_c, p.base, p.scale, p.iters, p.eps, p.pre + t * N, p.post + t * N,
                      p.comb + t * N * N);
}

// sum_i w[i] * v[i] in stream order: the one expression of the collapse (hc_collapse_kernel and the fused tail of
// hc_mix_kernel both use it, so their results agree bit for bit).
__device__ __forceinline__ float collapse_value(const float (&v)[N], const float* w) {
  float acc = 0.0f;
#pragma unroll
  for (int i = 0; i < N; ++i) acc += w[i] * v[i];
  return acc;
}

// a[k] = collapse of X[i][k] (one token: X [4, d]) by the whole block; kU dims per thread have their loads in
// flight together (a single CTA walks 64 KiB of X, so round trips, not bandwidth, bound it).
__device__ __forceinline__ void collapse_token(const float* X, const float* w, int64_t d, float* a) {
  constexpr int kU = 8;
  float wl[N];
#pragma unroll
  for (int i = 0; i < N; ++i) wl[i] = w[i];
  for (int64_t k0 = threadIdx.x; k0 < d; k0 += int64_t(kU) * blockDim.x) {
    float v[kU][N];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t k = k0 + int64_t(u) * blockDim.x;
#pragma unroll
      for (int i = 0; i < N; ++i) v[u][i] = k < d ? X[int64_t(i) * d + k] : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t k = k0 + int64_t(u) * blockDim.x;
      if (k < d) a[k] = collapse_value(v[u], wl);
    }
  }
}

// ---- fused HC control (hc_mix_cuda) -------------------------------------------------------------------------------
constexpr int kMixChunk = 256;   // columns per CTA: 64 CTAs per token for K = 16384
constexpr int kMixThreads = 128; // 2 columns per thread (one half2 per fn row)

int64_t mix_chunks(int64_t K) { return (K + kMixChunk - 1) / kMixChunk; }

// Workspace: [T] uint32 tickets (padded to 16 bytes), then [T][chunks][n_mix + 1] partial sums (+1: sum of squares).
template <int M>
__global__ void __launch_bounds__(kMixThreads) hc_mix_kernel(HcMixParams p, int64_t chunks) {
  __shared__ float red[kMixThreads / 32][M + 1];
  __shared__ bool last;
  const int64_t t = blockIdx.y, chunk = blockIdx.x;
  uint32_t* tickets = static_cast<uint32_t*>(p.workspace);
  float* partial = reinterpret_cast<float*>(static_cast<uint8_t*>(p.workspace) + ((p.n_tokens * 4 + 15) / 16) * 16);
  float* mine = partial + (t * chunks + chunk) * (M + 1);
  const int64_t c = chunk * kMixChunk + 2 * threadIdx.x;
  float acc[M + 1];
#pragma unroll
  for (int j = 0; j <= M; ++j) acc[j] = 0.0f;
  if (c < p.K) {  // K is even, so both columns exist
    const float2 x = *reinterpret_cast<const float2*>(p.X + t * p.K + c);
    const __half2* fn = static_cast<const __half2*>(p.fn);
    __half2 h[M];
#pragma unroll
    for (int j = 0; j < M; ++j) h[j] = fn[(j * p.K + c) / 2];  // all M loads issued before any use
#pragma unroll
    for (int j = 0; j < M; ++j) {
      const float2 f = __half22float2(h[j]);
      acc[j] = f.x * x.x + f.y * x.y;
    }
    acc[M] = x.x * x.x + x.y * x.y;
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int j = 0; j <= M; ++j) {
    const float v = warp_sum(acc[j]);
    if (lane == 0) red[warp][j] = v;
  }
  __syncthreads();
  if (threadIdx.x <= M) {
    float v = 0.0f;
    for (int w = 0; w < kMixThreads / 32; ++w) v += red[w][threadIdx.x];  // fixed order
    mine[threadIdx.x] = v;
  }
  // Last-CTA-finishes: publish the partials, take a ticket; the CTA drawing chunks - 1 sees every partial.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(&tickets[t], 1u) == uint32_t(chunks - 1);
  __syncthreads();
  if (!last) return;
  __threadfence();
  __shared__ float total[M + 1];
  if (threadIdx.x <= M) {
    // Chunk order (deterministic); loads batched 64 at a time (K = 16384 is 64 chunks: one L2 round trip instead
    // of one per chunk, which cost ~5 us in the first version).
    constexpr int kBatch = 64;
    float v = 0.0f;
    const float* col = partial + t * chunks * (M + 1) + threadIdx.x;
    for (int64_t k0 = 0; k0 < chunks; k0 += kBatch) {
      float buf[kBatch];
#pragma unroll
      for (int q = 0; q < kBatch; ++q) buf[q] = k0 + q < chunks ? __ldcg(col + (k0 + q) * (M + 1)) : 0.0f;
#pragma unroll
      for (int q = 0; q < kBatch; ++q)
        if (k0 + q < chunks) v += buf[q];
    }
    total[threadIdx.x] = v;
  }
  __syncthreads();
  float* wts = M == kHcMix ? p.pre + t * N : p.w + t * N;  // the collapse weights of this token
  if (threadIdx.x < 32) {  // warp 0 finishes (lane == threadIdx.x)
    const float rs = rsqrtf(total[M] / float(p.K) + p.norm_eps);
    if (lane == 0) {
      tickets[t] = 0;  // ready for the next launch
      if (p.rs_out) p.rs_out[t] = rs;
    }
    if (p.mix_out && lane < M) p.mix_out[t * M + lane] = total[lane];
    if constexpr (M == kHcMix) {
      const float mix_pp = lane < 2 * N ? total[lane] * rs : 0.0f;
      sinkhorn_token_warp(mix_pp, total[2 * N + (lane & 15)] * rs, p.base, p.scale, p.iters, p.eps, wts,
                          p.post + t * N, p.comb + t * N * N);
    } else {
      if (lane < N) wts[lane] = sigmoidf_(total[lane] * rs * p.scale[0] + p.base[lane]) + p.eps;
    }
  }
  if (!p.a) return;
  // The collapse of this token by the whole CTA (X is L2-resident: every chunk CTA just read it). After the
  // barrier the weights warp 0 wrote to global memory are visible to the block; they are read back from there,
  // as hc_collapse_kernel reads them, and combined by the same function, so `a` equals its output bit for bit.
  __syncthreads();
  collapse_token(p.X + t * p.K, wts, p.K / N, p.a + t * (p.K / N));
}

// One thread per (token, dim): reads the 4 stream values of that dim.
__global__ void hc_collapse_kernel(const float* X, const float* pre, int64_t n_tokens, int64_t d, float* a) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n_tokens * d) return;
  const int64_t t = idx / d, k = idx % d;
  const float* x = X + t * N * d + k;
  float v[N];
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = x[int64_t(i) * d];
  a[idx] = collapse_value(v, pre + t * N);
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
  hc_split_sinkhorn_kernel<<<blocks_for(p.n_tokens * 32), kThreads, 0, stream>>>(p);
  check_launch("hc_split_sinkhorn_kernel");
}

size_t hc_mix_workspace_bytes(int64_t n_tokens, int64_t K) {
  return size_t((n_tokens * 4 + 15) / 16 * 16) + size_t(n_tokens * mix_chunks(K) * (kHcMix + 1)) * sizeof(float);
}

void hc_mix_cuda(const HcMixParams& p, cudaStream_t stream) {
  if (p.n_mix != kHcMix && p.n_mix != N) fail("hc_mix_cuda: n_mix=%d (24 for hc_pre, 4 for hc_head)", p.n_mix);
  if (p.K <= 0 || p.K % 2 != 0) fail("hc_mix_cuda: K=%lld must be positive and even", (long long)p.K);
  if (!p.fn || !p.X || !p.base || !p.scale || !p.workspace) fail("hc_mix_cuda: fn, X, base, scale, workspace needed");
  if (p.n_mix == kHcMix && (!p.pre || !p.post || !p.comb || p.iters < 1))
    fail("hc_mix_cuda: hc_pre needs pre, post, comb and iters >= 1 (got %d)", p.iters);
  if (p.n_mix == N && !p.w) fail("hc_mix_cuda: hc_head needs w");
  if (p.a && p.K % N != 0) fail("hc_mix_cuda: the fused collapse needs K = %d x d, got K=%lld", N, (long long)p.K);
  if (p.n_tokens <= 0) return;
  if (p.n_tokens > 65535) fail("hc_mix_cuda: %lld tokens in one launch (max 65535)", (long long)p.n_tokens);
  const int64_t chunks = mix_chunks(p.K);
  const dim3 grid(unsigned(chunks), unsigned(p.n_tokens));
  if (p.n_mix == kHcMix) hc_mix_kernel<kHcMix><<<grid, kMixThreads, 0, stream>>>(p, chunks);
  else hc_mix_kernel<N><<<grid, kMixThreads, 0, stream>>>(p, chunks);
  check_launch("hc_mix_kernel");
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
