// MoE routing, SwiGLU and expert-sum kernels (see moe.h).
#include "backend/cuda/moe.h"

#include <cuda_fp16.h>

#include <climits>
#include <cstdint>

#include "backend/cuda/common.cuh"
#include "backend/cuda/cuda_util.h"
#include "backend/cuda/q8k_act.cuh"
#include "common/error.h"

namespace dsv4::cuda {
namespace {

constexpr int kMaxExperts = 1024;
constexpr int kMaxUsed = 32;

// sqrt(softplus(z)) with the CPU's branches (z > 20: z; z < -20: e^z; else log1p(e^z)).
__device__ __forceinline__ float sqrt_softplus(float z) {
  const float sp = z > 20.0f ? z : (z < -20.0f ? expf(z) : log1pf(expf(z)));
  return sqrtf(sp);
}

// Selection and weights of one token from its scores s[0..E) (shared memory), run by one whole warp: the k
// experts of largest s[e] + bias[e] (ties to the lower id), or the given ids (hash); weights normalized in
// selection order. Shared by moe_route_kernel and the fused decode router, so both give the same bits.
__device__ void route_from_scores(const float* s, const float* bias, int n_experts, int k, float scale, bool hash,
                                  int32_t* ids, float* weights, int* chosen) {
  const int lane = threadIdx.x & 31;
  if (hash) {
    for (int j = lane; j < k; j += 32) chosen[j] = ids[j];
  } else {
    for (int j = 0; j < k; ++j) {
      float best_v = -INFINITY;
      int best = INT_MAX;
      for (int e = lane; e < n_experts; e += 32) {
        bool taken = false;
        for (int q = 0; q < j; ++q) taken |= chosen[q] == e;
        const float v = s[e] + (bias ? bias[e] : 0.0f);
        if (!taken && (best == INT_MAX || v > best_v || (v == best_v && e < best))) best_v = v, best = e;
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(kFullMask, best_v, o);
        const int oe = __shfl_xor_sync(kFullMask, best, o);
        if (oe != INT_MAX && (best == INT_MAX || ov > best_v || (ov == best_v && oe < best))) best_v = ov, best = oe;
      }
      if (lane == 0) chosen[j] = best;
      __syncwarp();
    }
  }
  __syncwarp();
  if (lane == 0) {
    float sum = 0.0f;
    for (int j = 0; j < k; ++j) sum += s[chosen[j]];
    for (int j = 0; j < k; ++j) {
      if (!hash) ids[j] = chosen[j];
      weights[j] = s[chosen[j]] / sum * scale;
    }
  }
}

// One warp per token; scores live in shared memory.
__global__ void moe_route_kernel(const float* z, const float* bias, int n_experts, int k, float scale, bool hash,
                                 int32_t* ids, float* weights) {
  __shared__ float s[kMaxExperts];
  __shared__ int chosen[kMaxUsed];
  const int64_t t = blockIdx.x;
  const int lane = threadIdx.x;
  for (int e = lane; e < n_experts; e += 32) s[e] = sqrt_softplus(z[t * n_experts + e]);
  __syncwarp();
  route_from_scores(s, bias, n_experts, k, scale, hash, ids + t * k, weights + t * k, chosen);
}

// ---- fused decode router (moe_route_fused_cuda) ------------------------------------------------------------------
constexpr int kRouteThreads = 256;

// 16 bytes of router row (8 halves or 4 floats) dotted with the matching x values.
template <bool F16>
__device__ __forceinline__ float chunk_dot(const uint4 w, const float* x) {
  if constexpr (F16) {
    const float4 a = *reinterpret_cast<const float4*>(x), b = *reinterpret_cast<const float4*>(x + 4);
    const __half2* h = reinterpret_cast<const __half2*>(&w);
    const float2 w0 = __half22float2(h[0]), w1 = __half22float2(h[1]), w2 = __half22float2(h[2]),
                 w3 = __half22float2(h[3]);
    return w0.x * a.x + w0.y * a.y + w1.x * a.z + w1.y * a.w + w2.x * b.x + w2.y * b.y + w3.x * b.z + w3.y * b.w;
  } else {
    const float4 a = *reinterpret_cast<const float4*>(x);
    return __uint_as_float(w.x) * a.x + __uint_as_float(w.y) * a.y + __uint_as_float(w.z) * a.z +
           __uint_as_float(w.w) * a.w;
  }
}

// Workspace: z [E] floats, then the ticket (at a 16-byte boundary).
__host__ __device__ constexpr size_t route_ticket_offset(int n_experts) { return (size_t(n_experts) * 4 + 15) / 16 * 16; }

template <bool F16>
__global__ void __launch_bounds__(kRouteThreads) moe_route_fused_kernel(MoeRouteFusedParams p) {
  __shared__ float part[kRouteThreads / 32];
  __shared__ float s[kMaxExperts];
  __shared__ int chosen[kMaxUsed];
  __shared__ bool last;
  const int e = blockIdx.x, tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  float* z = static_cast<float*>(p.workspace);
  unsigned* ticket = reinterpret_cast<unsigned*>(static_cast<uint8_t*>(p.workspace) + route_ticket_offset(p.n_experts));
  constexpr int kPer = F16 ? 8 : 4;  // values per 16-byte chunk
  const int64_t n_chunks = p.d / kPer;
  const uint4* row = reinterpret_cast<const uint4*>(static_cast<const uint8_t*>(p.w) + int64_t(e) * p.d * (F16 ? 2 : 4));
  if (p.xq8k && warp == 0)  // the routed experts' Q8_K input, one block per CTA (warp 0) while the rows load
    for (int64_t b = e; b < p.d / kQK_K; b += gridDim.x)
      quantize_q8_K_block_warp(p.x + b * kQK_K, static_cast<ActQ8K*>(p.xq8k) + b);
  float acc = 0.0f;
#pragma unroll 4
  for (int64_t c = tid; c < n_chunks; c += kRouteThreads) acc += chunk_dot<F16>(row[c], p.x + c * kPer);
  acc = warp_sum(acc);
  if (lane == 0) part[warp] = acc;
  __syncthreads();
  if (tid == 0) {
    float v = part[0];
    for (int w = 1; w < kRouteThreads / 32; ++w) v += part[w];  // fixed order: deterministic
    z[e] = v;
    __threadfence();  // z[e] is visible to every CTA before the ticket says so
    last = atomicAdd(ticket, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int i = tid; i < p.n_experts; i += kRouteThreads) s[i] = sqrt_softplus(__ldcg(z + i));
  __syncthreads();
  if (warp == 0) route_from_scores(s, p.bias, p.n_experts, p.k, p.scale, p.hash, p.ids, p.weights, chosen);
  if (tid == 0) *ticket = 0u;  // every CTA has taken its ticket: ready for the next launch
}

__global__ void swiglu_kernel(const float* g, const float* u, const float* row_weight, int64_t rows, int64_t f,
                              float clamp, float* out) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * f) return;
  const float gc = fminf(g[idx], clamp);
  const float uc = fmaxf(fminf(u[idx], clamp), -clamp);
  const float h = __fmul_rn(gc / (1.0f + expf(-gc)), uc);  // silu(g) * u, rounded as the CPU
  out[idx] = row_weight ? __fmul_rn(h, row_weight[idx / f]) : h;
}

__global__ void moe_sum_kernel(const float* ye, int64_t n_tokens, int k, int64_t d, float* y) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n_tokens * d) return;
  const int64_t t = idx / d, c = idx % d;
  float s = 0.0f;
  for (int j = 0; j < k; ++j) s += ye[(t * k + j) * d + c];
  y[idx] += s;
}

constexpr int kThreads = 256;

}  // namespace

void moe_route_cuda(const float* z, const float* bias, int64_t n_tokens, int n_experts, int k, float scale,
                    bool hash, int32_t* ids, float* weights, cudaStream_t stream) {
  if (n_experts < 1 || n_experts > kMaxExperts || k < 1 || k > kMaxUsed || k > n_experts)
    fail("moe_route_cuda: need 1 <= k <= min(E, %d) and E <= %d, got E=%d k=%d", kMaxUsed, kMaxExperts, n_experts, k);
  if (n_tokens <= 0) return;
  moe_route_kernel<<<unsigned(n_tokens), 32, 0, stream>>>(z, bias, n_experts, k, scale, hash, ids, weights);
  check_launch("moe_route_kernel");
}

size_t moe_route_fused_workspace_bytes(int n_experts) { return route_ticket_offset(n_experts) + 16; }

bool moe_route_fused_supported(QType wtype, int64_t d, int n_experts, int k) {
  const bool type_ok = (wtype == QType::F16 && d % 8 == 0) || (wtype == QType::F32 && d % 4 == 0);
  return type_ok && d > 0 && n_experts >= 1 && n_experts <= kMaxExperts && k >= 1 && k <= kMaxUsed && k <= n_experts;
}

void moe_route_fused_cuda(const MoeRouteFusedParams& p, cudaStream_t stream) {
  if (!moe_route_fused_supported(p.wtype, p.d, p.n_experts, p.k))
    fail("moe_route_fused_cuda: unsupported router %s [%d x %lld] with k=%d (F16/F32, E <= %d, k <= %d, D %% 8 == 0)",
         qtype_name(p.wtype).c_str(), p.n_experts, (long long)p.d, p.k, kMaxExperts, kMaxUsed);
  const auto misaligned = [](const void* q) { return (reinterpret_cast<uintptr_t>(q) & 15u) != 0; };
  if (!p.w || !p.x || !p.ids || !p.weights || !p.workspace || misaligned(p.w) || misaligned(p.x) ||
      misaligned(p.xq8k))
    fail("moe_route_fused_cuda: null or misaligned pointer (router, x and xq8k must be 16-byte aligned)");
  if (p.xq8k && p.d % kQK_K != 0) fail("moe_route_fused_cuda: xq8k needs D %% 256 == 0, D = %lld", (long long)p.d);
  if (p.wtype == QType::F16) moe_route_fused_kernel<true><<<unsigned(p.n_experts), kRouteThreads, 0, stream>>>(p);
  else moe_route_fused_kernel<false><<<unsigned(p.n_experts), kRouteThreads, 0, stream>>>(p);
  check_launch("moe_route_fused_kernel");
}

SideStream::~SideStream() {
  if (fork_) cudaEventDestroy(fork_);
  if (join_) cudaEventDestroy(join_);
  if (side_) cudaStreamDestroy(side_);  // pending work still completes
}

cudaStream_t SideStream::side() {
  if (!side_) {
    check(cudaStreamCreateWithFlags(&side_, cudaStreamNonBlocking), "SideStream: cudaStreamCreate");
    check(cudaEventCreateWithFlags(&fork_, cudaEventDisableTiming), "SideStream: cudaEventCreate");
    check(cudaEventCreateWithFlags(&join_, cudaEventDisableTiming), "SideStream: cudaEventCreate");
  }
  return side_;
}

void SideStream::fork(cudaStream_t main) {
  cudaStream_t s = side();
  check(cudaEventRecord(fork_, main), "SideStream::fork: record");
  check(cudaStreamWaitEvent(s, fork_, 0), "SideStream::fork: wait");
}

void SideStream::join(cudaStream_t main) {
  check(cudaEventRecord(join_, side()), "SideStream::join: record");
  check(cudaStreamWaitEvent(main, join_, 0), "SideStream::join: wait");
}

void swiglu_cuda(const float* g, const float* u, const float* row_weight, int64_t rows, int64_t f, float clamp,
                 float* out, cudaStream_t stream) {
  if (rows * f <= 0) return;
  swiglu_kernel<<<unsigned((rows * f + kThreads - 1) / kThreads), kThreads, 0, stream>>>(g, u, row_weight, rows, f,
                                                                                          clamp, out);
  check_launch("swiglu_kernel");
}

void moe_sum_cuda(const float* ye, int64_t n_tokens, int k, int64_t d, float* y, cudaStream_t stream) {
  if (n_tokens * d <= 0) return;
  moe_sum_kernel<<<unsigned((n_tokens * d + kThreads - 1) / kThreads), kThreads, 0, stream>>>(ye, n_tokens, k, d, y);
  check_launch("moe_sum_kernel");
}

}  // namespace dsv4::cuda
