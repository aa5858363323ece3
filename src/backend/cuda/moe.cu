// MoE routing, SwiGLU and expert-sum kernels (see moe.h).
#include "backend/cuda/moe.h"

#include <cuda_fp16.h>

#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "backend/cuda/common.cuh"
#include "backend/cuda/cuda_util.h"
#include "backend/cuda/pdl.cuh"
#include "backend/cuda/q8k_act.cuh"
#include "common/error.h"

namespace dsv4::cuda {
namespace {

constexpr int kMaxExperts = 1024;
constexpr int kMaxUsed = 32;

// sqrt(softplus(z)) with the CPU's branches (z > 20: z; z < -20: e^z; else log1pf(e^z)).
__device__ __forceinline__ float sqrt_softplus(float z) {
  const float sp = z > 20.0f ? z : (z < -20.0f ? expf(z) : log1pf(expf(z)));
  return sqrtf(sp);
}

// ---- selection (shared by moe_route_kernel and the fused decode router, so both give the same bits) ------------
// A biased score v = s[e] + bias[e] as an unsigned key whose order is the float order: flip every bit of a
// negative, set the sign bit of a non-negative. -0 is keyed as +0 (the floats compare equal, so the lower id must
// win the tie, as in the CPU's strict '>' scan), and NaN as 1, below every number: the CPU never prefers a NaN
// over a number it has seen (v > NaN and NaN > v are both false), so NaN logits only make the two differ in where
// a NaN lands, never in which numbers are picked. 0 is reserved for "taken".
constexpr uint32_t kTaken = 0;

__device__ __forceinline__ uint32_t route_key(float v) {
  if (v != v) return 1u;
  const uint32_t u = v == 0.0f ? 0u : __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// This lane's best untaken expert among e = lane + 32 i: the largest key, the lowest id among equal keys (ascending
// scan, strict '>'). A lane with nothing left reports (kTaken, INT_MAX).
__device__ __forceinline__ void lane_best(const uint32_t* key, int n_experts, int lane, uint32_t& best_key,
                                          int& best_id) {
  best_key = kTaken, best_id = INT_MAX;
#pragma unroll 8
  for (int e = lane; e < n_experts; e += 32) {
    const uint32_t v = key[e];
    if (v > best_key) best_key = v, best_id = e;
  }
}

// Selection and weights of one token, run by one whole warp. s: [E] scores, key: [E] route_key(s + bias) (shared
// memory, consumed: picked entries become kTaken). Unless hash, the k picks in order (key desc, id asc) — the
// same order as the CPU's repeated strict-'>' argmax — with ids written; with hash, lane j < k brings ids[j] in
// hash_id. weights[j] = s[id_j] / (s[id_0] + ... + s[id_{k-1}], added in that order) * scale.
// Each pick is two warp reductions (the largest key, then the lowest id holding it) plus a rescan of the winning
// lane's E/32 entries: no global memory inside the loop (the old single-warp scan re-read bias[e] from global
// memory k * E/32 times, 48 dependent loads for Flash: ~17 of the 25 us the fused router took, ncu).
__device__ void route_select_warp(const float* s, uint32_t* key, int n_experts, int k, float scale, bool hash,
                                  int hash_id, int32_t* ids, float* weights) {
  const int lane = threadIdx.x & 31;
  int my_id = hash_id;
  float my_s = 0.0f, sum = 0.0f;
  if (hash) {
    if (lane < k) my_s = s[my_id];
    for (int j = 0; j < k; ++j) sum += __shfl_sync(kFullMask, my_s, j);
  } else {
    uint32_t best_key;
    int best_id;
    lane_best(key, n_experts, lane, best_key, best_id);
    for (int j = 0; j < k; ++j) {
      // k <= E, so some entry is untaken and its key (>= 1) beats every exhausted lane's kTaken.
      const uint32_t top = __reduce_max_sync(kFullMask, best_key);
      const int win = int(__reduce_min_sync(kFullMask, best_key == top ? unsigned(best_id) : 0xFFFFFFFFu));
      const float sv = s[win];
      sum += sv;
      if (lane == j) my_id = win, my_s = sv;
      if (lane == (win & 31)) {  // the winner's owner: e = lane + 32 i
        key[win] = kTaken;
        lane_best(key, n_experts, lane, best_key, best_id);
      }
    }
  }
  if (lane < k) {
    if (!hash) ids[lane] = my_id;
    weights[lane] = my_s / sum * scale;
  }
}

// One warp per token (prefill, and decode where the fused router does not apply).
__global__ void __launch_bounds__(32) moe_route_kernel(const float* z, const float* bias, int n_experts, int k,
                                                       float scale, bool hash, int32_t* ids, float* weights) {
  __shared__ float s[kMaxExperts];
  __shared__ uint32_t key[kMaxExperts];
  pdl_trigger();
  pdl_wait();  // PDL (pdl.cuh): z and the hash ids come from earlier kernels
  const int64_t t = blockIdx.x;
  const int lane = threadIdx.x;
  for (int e = lane; e < n_experts; e += 32) {
    const float sv = sqrt_softplus(z[t * n_experts + e]);
    s[e] = sv;
    if (!hash) key[e] = route_key(sv + (bias ? bias[e] : 0.0f));
  }
  const int hash_id = hash && lane < k ? ids[t * k + lane] : 0;
  __syncwarp();
  route_select_warp(s, key, n_experts, k, scale, hash, hash_id, ids + t * k, weights + t * k);
}

// ---- fused decode router (moe_route_fused_cuda) ------------------------------------------------------------------
constexpr int kRouteThreads = 256;
constexpr int kRouteWarps = kRouteThreads / 32;
// Router rows per CTA. Every CTA reads all of x (16 KB at D = 4096) next to its rows (8 KB each for F16): with one
// row per CTA (256 CTAs, two on most SMs) an SM pulled 48 KB from L2 for 16 KB of weights; with two rows per CTA
// (128 CTAs for Flash's 256 experts, one per SM) it pulls 32 KB, and half as many CTAs take a ticket.
constexpr int kRouteRows = 2;
static_assert(kMaxExperts % kRouteThreads == 0, "the tail gives every thread kMaxExperts / kRouteThreads experts");

// The x values that multiply one 16-byte weight chunk c: 8 (F16, in a and b) or 4 (F32, in a).
template <bool F16>
__device__ __forceinline__ void load_x_chunk(const float* x, int64_t c, float4& a, float4& b) {
  const float4* q = reinterpret_cast<const float4*>(x + c * (F16 ? 8 : 4));
  a = q[0];
  if constexpr (F16) b = q[1];
}

template <bool F16>
__device__ __forceinline__ float chunk_dot(const uint4 w, const float4 a, const float4 b) {
  if constexpr (F16) {
    const __half2* h = reinterpret_cast<const __half2*>(&w);
    const float2 w0 = __half22float2(h[0]), w1 = __half22float2(h[1]), w2 = __half22float2(h[2]),
                 w3 = __half22float2(h[3]);
    return w0.x * a.x + w0.y * a.y + w1.x * a.z + w1.y * a.w + w2.x * b.x + w2.y * b.y + w3.x * b.z + w3.y * b.w;
  } else {
    return __uint_as_float(w.x) * a.x + __uint_as_float(w.y) * a.y + __uint_as_float(w.z) * a.z +
           __uint_as_float(w.w) * a.w;
  }
}

// Workspace: z [E] floats, then the ticket (at a 16-byte boundary).
__host__ __device__ constexpr size_t route_ticket_offset(int n_experts) { return (size_t(n_experts) * 4 + 15) / 16 * 16; }

// CTA b dots router rows 2b and 2b+1 with x (thread t takes chunks t, t + 256, ...; partial sums added in warp
// order), publishes them to z and takes a ticket; the CTA that takes the last ticket routes the token. PDL: the
// row chunks of D <= 4096 are loaded before the dependency wait (weights), so their DRAM latency overlaps the
// previous kernel's tail; x, the hash ids and the workspace are touched only after it.
template <bool F16>
__global__ void __launch_bounds__(kRouteThreads) moe_route_fused_kernel(MoeRouteFusedParams p) {
  constexpr int kPer = F16 ? 8 : 4;  // values per 16-byte chunk
  constexpr int kPre = F16 ? 2 : 4;  // chunks per thread and row held in registers: all of a 4096-wide row
  __shared__ float part[kRouteRows][kRouteWarps];
  __shared__ float s[kMaxExperts];
  __shared__ uint32_t key[kMaxExperts];
  __shared__ bool last;
  pdl_trigger();
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int e0 = blockIdx.x * kRouteRows;
  const int rows = min(kRouteRows, p.n_experts - e0);
  const int64_t n_chunks = p.d / kPer;
  const uint4* w = reinterpret_cast<const uint4*>(p.w) + int64_t(e0) * n_chunks;  // row r: w + r * n_chunks
  uint4 wv[kRouteRows][kPre];
#pragma unroll
  for (int i = 0; i < kPre; ++i)
#pragma unroll
    for (int r = 0; r < kRouteRows; ++r) {
      const int64_t c = tid + int64_t(i) * kRouteThreads;
      wv[r][i] = r < rows && c < n_chunks ? __ldg(w + r * n_chunks + c) : make_uint4(0u, 0u, 0u, 0u);
    }
  // The bias (a weight) for the tail, in every CTA since any may be the last: off the tail's critical path, where
  // it would be one more DRAM round trip (the token streams far more than L2 holds, so it is not cached).
  constexpr int kTail = kMaxExperts / kRouteThreads;  // experts per thread in the tail
  float bias_v[kTail];
#pragma unroll
  for (int j = 0; j < kTail; ++j) {
    const int i = tid + j * kRouteThreads;
    bias_v[j] = p.bias && !p.hash && i < p.n_experts ? __ldg(p.bias + i) : 0.0f;
  }
  pdl_wait();  // PDL (pdl.cuh): x, the hash ids and the workspace come from / go to other kernels
  float acc[kRouteRows];
#pragma unroll
  for (int r = 0; r < kRouteRows; ++r) acc[r] = 0.0f;
  // Every x load of the held chunks before any use: one L2 round trip, not one per chunk (a chunk past the row
  // reads chunk 0 and is not added).
  float4 xa[kPre], xb[kPre];
#pragma unroll
  for (int i = 0; i < kPre; ++i) {
    const int64_t c = tid + int64_t(i) * kRouteThreads;
    load_x_chunk<F16>(p.x, c < n_chunks ? c : 0, xa[i], xb[i]);
  }
#pragma unroll
  for (int i = 0; i < kPre; ++i)
    if (tid + int64_t(i) * kRouteThreads < n_chunks)
#pragma unroll
      for (int r = 0; r < kRouteRows; ++r) acc[r] += chunk_dot<F16>(wv[r][i], xa[i], xb[i]);
  for (int64_t c = tid + int64_t(kPre) * kRouteThreads; c < n_chunks; c += kRouteThreads) {  // rows over 4096
    float4 a, b;
    load_x_chunk<F16>(p.x, c, a, b);
#pragma unroll
    for (int r = 0; r < kRouteRows; ++r)
      if (r < rows) acc[r] += chunk_dot<F16>(__ldg(w + r * n_chunks + c), a, b);
  }
#pragma unroll
  for (int r = 0; r < kRouteRows; ++r) {
    const float v = warp_sum(acc[r]);
    if (lane == 0) part[r][warp] = v;
  }
  __syncthreads();
  float* z = static_cast<float*>(p.workspace);
  unsigned* ticket = reinterpret_cast<unsigned*>(static_cast<uint8_t*>(p.workspace) + route_ticket_offset(p.n_experts));
  if (tid == 0) {
    for (int r = 0; r < rows; ++r) {
      float v = part[r][0];
      for (int q = 1; q < kRouteWarps; ++q) v += part[r][q];  // fixed order: deterministic
      z[e0 + r] = v;
    }
    __threadfence();  // this CTA's z is visible to every CTA before its ticket is
    last = atomicAdd(ticket, 1u) == gridDim.x - 1;
  }
  // The routed experts' Q8_K input, one 256-value block per CTA and round, by the last warp while warp 0 takes the
  // ticket (x is in this SM's L1: the CTA has just read all of it).
  if (p.xq8k && warp == kRouteWarps - 1)
    for (int64_t b = blockIdx.x; b < p.d / kQK_K; b += gridDim.x)
      quantize_q8_K_block_warp(p.x + b * kQK_K, static_cast<ActQ8K*>(p.xq8k) + b);
  __syncthreads();
  if (!last) return;
  // The last CTA routes the token: every CTA fenced its z before its ticket. Scores and biased keys by the whole
  // CTA (z and the hash ids loaded at once), the picks by warp 0 on shared memory.
  __threadfence();
  const int hash_id = p.hash && tid < p.k ? p.ids[tid] : 0;
  float zv[kTail];
#pragma unroll
  for (int j = 0; j < kTail; ++j) {
    const int i = tid + j * kRouteThreads;
    zv[j] = i < p.n_experts ? __ldcg(z + i) : 0.0f;
  }
#pragma unroll
  for (int j = 0; j < kTail; ++j) {
    const int i = tid + j * kRouteThreads;
    if (i < p.n_experts) {
      const float sv = sqrt_softplus(zv[j]);
      s[i] = sv;
      key[i] = route_key(sv + bias_v[j]);  // bias_v is 0 without a bias: as moe_route_kernel's sv + 0.0f
    }
  }
  __syncthreads();
  if (warp == 0) route_select_warp(s, key, p.n_experts, p.k, p.scale, p.hash, hash_id, p.ids, p.weights);
  if (tid == 0) *ticket = 0u;  // every CTA has taken its ticket: ready for the next launch
}

// ---- the fused router before session 9 (DSV4_CUDA_ROUTE_KERNEL=0), kept only for the GPU A/B of the kernel above --
// One router row per CTA, the Q8_K blocks quantized first, the scores' selection by one warp reading bias[e] from
// global memory inside its k x E/32 loop; plain launch. Same ids and weights bit for bit (CudaMoeRoute.
// LegacyFusedKernelAgrees). Delete once the A/B has been run.
namespace legacy {

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

template <bool F16>
__global__ void __launch_bounds__(kRouteThreads) moe_route_fused_kernel(MoeRouteFusedParams p) {
  __shared__ float part[kRouteWarps];
  __shared__ float s[kMaxExperts];
  __shared__ int chosen[kMaxUsed];
  __shared__ bool last;
  const int e = blockIdx.x, tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  float* z = static_cast<float*>(p.workspace);
  unsigned* ticket = reinterpret_cast<unsigned*>(static_cast<uint8_t*>(p.workspace) + route_ticket_offset(p.n_experts));
  constexpr int kPer = F16 ? 8 : 4;
  const int64_t n_chunks = p.d / kPer;
  const uint4* row = reinterpret_cast<const uint4*>(p.w) + int64_t(e) * n_chunks;
  if (p.xq8k && warp == 0)
    for (int64_t b = e; b < p.d / kQK_K; b += gridDim.x)
      quantize_q8_K_block_warp(p.x + b * kQK_K, static_cast<ActQ8K*>(p.xq8k) + b);
  float acc = 0.0f;
#pragma unroll 4
  for (int64_t c = tid; c < n_chunks; c += kRouteThreads) {
    float4 a, b;
    load_x_chunk<F16>(p.x, c, a, b);
    acc += chunk_dot<F16>(row[c], a, b);
  }
  acc = warp_sum(acc);
  if (lane == 0) part[warp] = acc;
  __syncthreads();
  if (tid == 0) {
    float v = part[0];
    for (int q = 1; q < kRouteWarps; ++q) v += part[q];
    z[e] = v;
    __threadfence();
    last = atomicAdd(ticket, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int i = tid; i < p.n_experts; i += kRouteThreads) s[i] = sqrt_softplus(__ldcg(z + i));
  __syncthreads();
  if (warp == 0) route_from_scores(s, p.bias, p.n_experts, p.k, p.scale, p.hash, p.ids, p.weights, chosen);
  if (tid == 0) *ticket = 0u;
}

}  // namespace legacy

__global__ void swiglu_kernel(const float* g, const float* u, const float* row_weight, int64_t rows, int64_t f,
                              float clamp, float* out) {
  pdl_trigger();
  pdl_wait();  // PDL (pdl.cuh): g, u and the weights come from earlier kernels
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * f) return;
  const float gc = fminf(g[idx], clamp);
  const float uc = fmaxf(fminf(u[idx], clamp), -clamp);
  const float h = __fmul_rn(gc / (1.0f + expf(-gc)), uc);  // silu(g) * u, rounded as the CPU
  out[idx] = row_weight ? __fmul_rn(h, row_weight[idx / f]) : h;
}

__global__ void moe_sum_kernel(const float* ye, int64_t n_tokens, int k, int64_t d, float* y) {
  pdl_trigger();
  pdl_wait();  // PDL (pdl.cuh): ye and y come from earlier kernels
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
  launch_pdl("moe_route_kernel", moe_route_kernel, dim3(unsigned(n_tokens)), dim3(32), 0, stream, z, bias, n_experts, k,
             scale, hash, ids, weights);
}

int route_kernel_env() {
  const char* e = std::getenv("DSV4_CUDA_ROUTE_KERNEL");
  return e && std::strcmp(e, "0") == 0 ? 0 : 1;
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
  if (route_kernel_env() == 0) {  // the pre-session-9 kernel, for A/B
    if (p.wtype == QType::F16) legacy::moe_route_fused_kernel<true><<<unsigned(p.n_experts), kRouteThreads, 0, stream>>>(p);
    else legacy::moe_route_fused_kernel<false><<<unsigned(p.n_experts), kRouteThreads, 0, stream>>>(p);
    check_launch("legacy::moe_route_fused_kernel");
    return;
  }
  const dim3 grid(unsigned((p.n_experts + kRouteRows - 1) / kRouteRows));
  launch_pdl("moe_route_fused_kernel", p.wtype == QType::F16 ? moe_route_fused_kernel<true> : moe_route_fused_kernel<false>,
             grid, dim3(kRouteThreads), 0, stream, p);
}

SideStream::~SideStream() {
  if (fork_) cudaEventDestroy(fork_);
  if (join_) cudaEventDestroy(join_);
  if (side_) cudaStreamDestroy(side_);  // pending work still completes
}

cudaStream_t SideStream::side() {
  if (!side_) {
    check(cudaStreamCreateWithPriority(&side_, cudaStreamNonBlocking, priority_), "SideStream: cudaStreamCreate");
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
  launch_pdl("swiglu_kernel", swiglu_kernel, dim3(unsigned((rows * f + kThreads - 1) / kThreads)), dim3(kThreads), 0,
             stream, g, u, row_weight, rows, f, clamp, out);
}

void moe_sum_cuda(const float* ye, int64_t n_tokens, int k, int64_t d, float* y, cudaStream_t stream) {
  if (n_tokens * d <= 0) return;
  launch_pdl("moe_sum_kernel", moe_sum_kernel, dim3(unsigned((n_tokens * d + kThreads - 1) / kThreads)), dim3(kThreads),
             0, stream, ye, n_tokens, k, d, y);
}

}  // namespace dsv4::cuda
