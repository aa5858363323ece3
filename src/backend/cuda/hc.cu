// Hyper-connection kernels (see hc.h). The 4x4 Sinkhorn runs on one warp per token (sinkhorn_token_warp), with
// the summation order of the CPU loop (sum over o in order, then over i in order).
#include "backend/cuda/hc.h"

#include <cooperative_groups.h>
#include <cuda_fp16.h>

#include <atomic>

#include "backend/cuda/common.cuh"
#include "backend/cuda/cuda_util.h"
#include "backend/cuda/norm_rope.h"
#include "backend/cuda/pdl.cuh"
#include "backend/cuda/q8_split_act.cuh"
#include "common/error.h"

namespace dsv4::cuda {
namespace {

constexpr int N = kHcStreams;

__device__ __forceinline__ float sigmoidf_(float z) { return 1.0f / (1.0f + expf(-z)); }

// pre[i] of model-spec §4 from the RMS-scaled mix value: the one expression of sinkhorn_token_warp and of the wide
// kernel's collapse weights, so both give the same bits.
__device__ __forceinline__ float pre_value(float mix_pp, const float* scale, const float* base, int i, float eps) {
  return sigmoidf_(mix_pp * scale[0] + base[i]) + eps;
}

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
  if (lane < N) pre[lane] = pre_value(mix_pp, scale, base, lane, eps);
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
  pdl_trigger();
  pdl_wait();
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

// The new stream o of hc_post from the 4 old stream values of one dim: the one expression of hc_post_kernel and
// of the cluster kernel's fused hc_post, so the two agree bit for bit.
__device__ __forceinline__ float post_value(const float (&in)[N], float yv, const float* post, const float* comb,
                                            int o) {
  float acc = post[o] * yv;
#pragma unroll
  for (int i = 0; i < N; ++i) acc += comb[i * N + o] * in[i];
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
  pdl_trigger();
  // PDL: the weight loads (fn: no kernel writes it) go out before the wait, X and the workspace after it.
  __half2 h[M];
  if (c < p.K) {
    const __half2* fn = static_cast<const __half2*>(p.fn);
#pragma unroll
    for (int j = 0; j < M; ++j) h[j] = fn[(j * p.K + c) / 2];  // all M loads issued before any use
  }
  pdl_wait();
  if (c < p.K) {  // K is even, so both columns exist
    const float2 x = *reinterpret_cast<const float2*>(p.X + t * p.K + c);
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

// ---- cluster variant (kHcMixCluster, see hc.h) -------------------------------------------------------------------
// Why it is faster at Flash width (one token, K = 16384; H200 wb_small, h200_s10_wb_small_77b4a6e.log, graph:
// hc_post + hc_pre as 3 launches 9.12 us, this kernel 7.58; the split kernels below beat it with the norm): the
// ticket kernel's critical path after the loads is warp sums -> partials to global -> __threadfence -> atomic ticket
// (an L2 round trip) -> the last CTA's __threadfence + loads of 64 partials (another L2 round trip) -> Sinkhorn ->
// kernel end -> the collapse launch (a graph node gap plus an L2 round trip for X). Here: warp sums -> one cluster
// barrier -> 64 DSMEM loads (SM-to-SM, a fraction of an L2 round trip) -> Sinkhorn -> the collapse from registers
// loaded at kernel start. The cost: the same 786 KB (every load issued before the first use) come through 16 SMs
// instead of 64, 48 KiB of fn + 4 KiB of X per SM instead of 12 KiB; at roughly 64 B/clk (~120 GB/s) per SM from L2
// that is ~0.4 us of transfer behind the ~0.8 us DRAM latency instead of ~0.1 us: an estimated ~0.3 us more, against
// ~1 us of fence / atomic / partial round trips and the ~2 us collapse launch removed (wb_small decides).
constexpr int kClusterMax = 16;     // non-portable cluster size (sm_90 allows 16 with the opt-in attribute)
constexpr int kClusterChunks = 4;   // chunks per CTA at most: 4 x 128 threads
constexpr int kClusterThreads = kClusterChunks * kMixThreads;
constexpr int kNormMaxDpc = 256;  // fused norm: dims per CTA at most (d <= 4096 over 16 CTAs)
constexpr int kNormMaxWpc = 2;    // fused norm: rms_norm warps per CTA at most (kNormMaxDpc / 4 / 32)

struct ClusterShape {
  int cs = 0, cpc = 0;  // CTAs per cluster (one cluster per token), chunks per CTA
};
ClusterShape cluster_shape(int64_t K, bool fuse_post) {
  const int64_t chunks = mix_chunks(K);
  ClusterShape s;
  if (fuse_post) {  // each CTA: 256 dims of all 4 streams (the caller checked d % 256 == 0, d <= 4096)
    s.cs = int(K / N / kMixChunk), s.cpc = N;
    return s;
  }
  s.cs = int(chunks < kClusterMax ? chunks : kClusterMax);
  s.cpc = int((chunks + s.cs - 1) / s.cs);
  return s;
}

// Sums each of the NV values v[] (NV a power of two, <= 32) over the warp on the tree of warp_sum (first lane l with
// l ^ 16, then l ^ 8, ...; float addition is commutative, so each partial sum is the same whichever lane forms it),
// but with 31 shuffles for NV = 32 instead of 5 x NV: at each level a lane keeps half of its values and receives
// its partner's partials of them. Afterwards v[0] of lane l holds the full sum of value l >> log2(32 / NV).
template <int NV, int n, int o>
__device__ __forceinline__ void transposed_warp_sum(float (&v)[NV], int lane) {
  if constexpr (o > 0) {
    if constexpr (n > 1) {
      constexpr int h = n / 2;
      const bool upper = (lane & o) != 0;
#pragma unroll
      for (int i = 0; i < h; ++i) {
        const float send = upper ? v[i] : v[i + h];
        const float keep = upper ? v[i + h] : v[i];
        v[i] = keep + __shfl_xor_sync(kFullMask, send, o);
      }
      transposed_warp_sum<NV, h, o / 2>(v, lane);
    } else {
      v[0] += __shfl_xor_sync(kFullMask, v[0], o);
      transposed_warp_sum<NV, 1, o / 2>(v, lane);
    }
  }
}

// Grid (cs, T), cluster (cs, 1, 1), cpc x 128 threads. Warp w of CTA `rank` does what warp w % 4 of the ticket
// kernel's CTA for chunk rank * cpc + w / 4 does, on the same columns.
template <int M>
__global__ void __launch_bounds__(kClusterThreads, 2) hc_mix_cluster_kernel(HcMixParams p, int chunks, int cpc) {
  namespace cg = cooperative_groups;
  constexpr int kV = M + 1 <= 8 ? 8 : 32;  // values per warp sum, padded to a power of two
  constexpr int kPerValue = 32 / kV;       // lanes holding each finished value
  static_assert(M + 1 <= kV, "hc_mix_cluster_kernel: too many values");
  __shared__ float red[kClusterThreads / 32][M + 1];
  __shared__ float part[kClusterChunks][M + 1];
  __shared__ float gathered[kClusterMax * kClusterChunks][M + 1];
  __shared__ float total[M + 1];
  __shared__ float ctl[2 * N + N * N];  // pre (or w), post, comb of this token
  __shared__ float xn[kClusterChunks][kMixChunk];  // fused hc_post: the new X of this CTA's dims, stream-major
  __shared__ float an[kNormMaxDpc];                // fused norm: this CTA's collapsed values, thread order
  __shared__ float wsum[kNormMaxWpc];              // fused norm: the warp sums of squares of this CTA's rms warps
  cg::cluster_group cluster = cg::this_cluster();
  const int64_t t = blockIdx.y;
  const int rank = int(cluster.block_rank()), cs = int(cluster.num_blocks());
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const float* Xt = p.X + t * p.K;
  // With the fused hc_post (cs = d / 256, cpc = 4) warp group q takes chunk q * cs + rank: stream q, dims
  // rank * 256 + [0, 256), so the CTA holds all 4 streams of its dims; otherwise chunk rank * cpc + q.
  const bool fuse_post = p.post_y != nullptr;
  const int q = warp / 4, tq = threadIdx.x % kMixThreads;
  const int64_t chunk = fuse_post ? int64_t(q) * cs + rank : int64_t(rank) * cpc + q;
  const int64_t c = chunk * kMixChunk + 2 * tq;
  // The collapse slice of this CTA: one dim per thread (dims per CTA = ceil(K / 4 / cs) <= 64 cpc < blockDim.x),
  // its 4 stream values loaded now, beside the weights, so they are in registers when the weights are known
  // (with the fused hc_post they are the new values, kept in xn).
  const int64_t d = p.K / N, dpc = (d + cs - 1) / cs;
  int64_t k = int64_t(rank) * dpc + threadIdx.x;
  // Fused norm (hc_mix_cluster_norm_fits: d % 128 == 0, d <= 4096, rms_norm's d / 128 warps split evenly over
  // the cs CTAs): rms_norm_reg_kernel<4> runs d / 4 threads, thread j holding dims j + (d / 4) m, m < 4. This CTA
  // takes its threads j = rank * rt + l, l < rt (rt = dpc / 4, whole warps), so thread m * rt + l collapses dim
  // rank * rt + l + (d / 4) m.
  const int rt = int(dpc / 4);
  // (With the fused hc_post the CTA's dims stay rank * dpc + [0, dpc): its rms threads' values come over DSMEM.)
  if (p.a_norm && !fuse_post) k = int64_t(rank) * rt + threadIdx.x % rt + (d / 4) * (threadIdx.x / rt);
  const bool collapse = p.a && threadIdx.x < dpc && k < d;
  pdl_trigger();
  // The ticket kernel's per-thread products on the same columns (all weight loads issued first; under PDL they
  // overlap the previous kernel's tail, X is read only after the wait).
  const bool active = c < p.K;
  const __half2* fn = static_cast<const __half2*>(p.fn);
  __half2 h[M];
#pragma unroll
  for (int j = 0; j < M; ++j) h[j] = active ? fn[(j * p.K + c) / 2] : __half2{};
  pdl_wait();
  float cv[N];
#pragma unroll
  for (int i = 0; i < N; ++i) cv[i] = collapse && !fuse_post ? Xt[int64_t(i) * d + k] : 0.0f;
  float2 x = active && !fuse_post ? *reinterpret_cast<const float2*>(Xt + c) : make_float2(0.0f, 0.0f);
  if (fuse_post) {  // hc_post_kernel's values for (stream q, dims c - q d, +1), written back to X in place
    __shared__ float2 xo[kClusterChunks][kMixThreads];
    xo[q][tq] = *reinterpret_cast<const float2*>(Xt + c);
    const float2 yv = *reinterpret_cast<const float2*>(p.post_y + t * d + (c - int64_t(q) * d));
    __syncthreads();
    float in0[N], in1[N];
#pragma unroll
    for (int i = 0; i < N; ++i) in0[i] = xo[i][tq].x, in1[i] = xo[i][tq].y;
    x.x = post_value(in0, yv.x, p.post_w + t * N, p.post_comb + t * N * N, q);
    x.y = post_value(in1, yv.y, p.post_w + t * N, p.post_comb + t * N * N, q);
    *reinterpret_cast<float2*>(const_cast<float*>(Xt) + c) = x;
    xn[q][2 * tq] = x.x, xn[q][2 * tq + 1] = x.y;  // read by the collapse after the barriers below
  }
  float acc[kV];
#pragma unroll
  for (int j = 0; j < kV; ++j) acc[j] = 0.0f;
  if (active) {
#pragma unroll
    for (int j = 0; j < M; ++j) {
      const float2 f = __half22float2(h[j]);
      acc[j] = f.x * x.x + f.y * x.y;
    }
    acc[M] = x.x * x.x + x.y * x.y;
  }
  transposed_warp_sum<kV, kV, 16>(acc, lane);
  if (lane % kPerValue == 0 && lane / kPerValue <= M) red[warp][lane / kPerValue] = acc[0];
  __syncthreads();
  if (threadIdx.x < cpc * (M + 1)) {  // chunk partials: the 4 warp sums in warp order, as the ticket kernel
    const int q = threadIdx.x / (M + 1), j = threadIdx.x % (M + 1);
    float v = 0.0f;
    for (int w = 0; w < kMixThreads / 32; ++w) v += red[q * (kMixThreads / 32) + w][j];
    part[q][j] = v;
  }
  cluster.sync();  // every CTA's partials written (release / acquire at cluster scope)
  // Every CTA gathers all chunk partials of the token into its own shared memory: chunks x (M + 1) <= 16 x cpc x
  // 25 values, at most 4 per thread (blockDim = 128 cpc), all loads issued before the stores (one DSMEM round trip).
  constexpr int kGather = (kClusterMax * (M + 1) + kMixThreads - 1) / kMixThreads;
  {
    const int n = chunks * (M + 1);
    float g[kGather];
#pragma unroll
    for (int u = 0; u < kGather; ++u) {
      const int idx = threadIdx.x + u * blockDim.x, ch = idx / (M + 1), j = idx % (M + 1);
      const int r = fuse_post ? ch % cs : ch / cpc, lq = fuse_post ? ch / cs : ch % cpc;
      g[u] = idx < n ? cluster.map_shared_rank(&part[0][0], r)[lq * (M + 1) + j] : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < kGather; ++u) {
      const int idx = threadIdx.x + u * blockDim.x;
      if (idx < n) (&gathered[0][0])[idx] = g[u];
    }
  }
  // No CTA may exit while another still reads its `part`: arrive once the reads are done, wait before leaving.
  // (With the fused norm the arrive comes later, when it also publishes wsum.)
  if (!p.a_norm) cluster.barrier_arrive();
  __syncthreads();
  if (threadIdx.x <= M) {  // the chunk-ordered sum of the ticket kernel
    // Shared-memory loads in batches ahead of the adds: the 64-long FADD chain (~256 cycles) is the floor; one
    // load-use round trip (~30 cycles) per chunk would add ~2000 cycles.
    constexpr int kBatch = 32;
    float v = 0.0f;
    for (int k0 = 0; k0 < chunks; k0 += kBatch) {
      float buf[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) buf[u] = k0 + u < chunks ? gathered[k0 + u][threadIdx.x] : 0.0f;
#pragma unroll
      for (int u = 0; u < kBatch; ++u)
        if (k0 + u < chunks) v += buf[u];
    }
    total[threadIdx.x] = v;
  }
  __syncthreads();
  const bool out = rank == 0;  // the CTA writing the control outputs
  if (warp == 0 && (out || p.a)) {  // the ticket kernel's finish, into shared memory
    const float rs = rsqrtf(total[M] / float(p.K) + p.norm_eps);
    if (out && lane == 0 && p.rs_out) p.rs_out[t] = rs;
    if (out && p.mix_out && lane < M) p.mix_out[t * M + lane] = total[lane];
    if constexpr (M == kHcMix) {
      const float mix_pp = lane < 2 * N ? total[lane] * rs : 0.0f;
      sinkhorn_token_warp(mix_pp, total[2 * N + (lane & 15)] * rs, p.base, p.scale, p.iters, p.eps, ctl, ctl + N,
                          ctl + 2 * N);
    } else {
      if (lane < N) ctl[lane] = sigmoidf_(total[lane] * rs * p.scale[0] + p.base[lane]) + p.eps;
    }
  }
  __syncthreads();
  if (out) {
    if constexpr (M == kHcMix) {
      if (threadIdx.x < N) p.pre[t * N + threadIdx.x] = ctl[threadIdx.x];
      else if (threadIdx.x < 2 * N) p.post[t * N + threadIdx.x - N] = ctl[threadIdx.x];
      else if (threadIdx.x < 2 * N + N * N) p.comb[t * N * N + threadIdx.x - 2 * N] = ctl[threadIdx.x];
    } else {
      if (threadIdx.x < N) p.w[t * N + threadIdx.x] = ctl[threadIdx.x];
    }
  }
  float av = 0.0f;
  if (collapse) {
    if (fuse_post) {
#pragma unroll
      for (int i = 0; i < N; ++i) cv[i] = xn[i][threadIdx.x];  // dpc = 256: this CTA's dims
    }
    av = collapse_value(cv, ctl);  // ctl[0..3]: pre (hc_pre) or w (hc_head)
    if (!p.a_norm) p.a[t * d + k] = av;
  }
  if (p.a_norm) {
    // rms_norm_reg_kernel<4> on the row av, operation for operation: each of its threads' sum of squares in m
    // order, the warp sums, then (block_sum's second stage) the warp sum of the d / 128 warp sums in warp order,
    // zero-padded to 32 lanes; every CTA forms that last sum itself from the others' wsum (DSMEM).
    if (collapse) an[threadIdx.x] = av;
    if (fuse_post) {  // an holds dims rank * dpc + i; rms thread rank * rt + l needs dims rank * rt + l + (d / 4) m
      cluster.barrier_arrive();  // release: an written (and this CTA's reads of the others' `part` done)
      cluster.barrier_wait();
    } else {
      __syncthreads();
    }
    if (threadIdx.x < rt) {
      float xv[4];
#pragma unroll
      for (int m = 0; m < 4; ++m) {
        if (fuse_post) {
          const int64_t dim = int64_t(rank) * rt + threadIdx.x + (d / 4) * m;
          xv[m] = cluster.map_shared_rank(an, int(dim / dpc))[dim % dpc];
        } else {
          xv[m] = an[threadIdx.x + m * rt];
        }
      }
      float ss = 0.0f;
#pragma unroll
      for (int m = 0; m < 4; ++m) ss += xv[m] * xv[m];
      ss = warp_sum(ss);
      if (lane == 0) wsum[warp] = ss;
    }
    // The norm weight is loaded here, not at kernel start (a register live through the whole kernel spilled);
    // its latency hides behind the cluster barrier.
    const float wn = collapse && p.a_norm_w ? p.a_norm_w[k] : 1.0f;
    cluster.barrier_arrive();  // release: wsum written (and this CTA's reads of the others' `part` / `an` done)
    cluster.barrier_wait();
    const int wpc = rt / 32, n_warps = int(d / 128);
    float v = lane < n_warps ? cluster.map_shared_rank(wsum, lane / wpc)[lane % wpc] : 0.0f;
    v = warp_sum(v);
    cluster.barrier_arrive();  // the reads of the others' wsum are done (waited for before leaving)
    const float scale = rsqrtf(v / float(d) + p.a_norm_eps);
    if (collapse) {
      float y = av * scale;
      y = p.a_norm_w ? y * wn : y;
      p.a[t * d + k] = y;
    }
  }
  cluster.barrier_wait();
}

// ---- wide variant (kHcMixWide, see hc.h) --------------------------------------------------------------------------
// Why: the cluster kernel streams the 0.8 MB of fn (plus 256 KiB of X read and, with the fused hc_post, written)
// through 16 SMs: ~64 KiB per SM, several DRAM round trips at one CTA's bytes in flight (measured 16.4 us per
// hc_post_pre_norm, H200, bc36a53). Here d / 32 CTAs (128 for Flash) each own 32 dims of all 4 streams, i.e. 128
// columns of fn: 6 KiB of weights + 2 KiB of X per SM, all issued before the first use (one round trip). The
// hc_post is column-separable (a dim's new stream values need only that dim's old ones), so is the mix product and
// the sum of squares; the per-CTA partials meet in global memory behind a grid barrier, after which EVERY CTA sums
// them in the same fixed order (same bits everywhere), forms the collapse weights pre itself (no second round trip
// for a broadcast) and collapses its 32 dims from shared memory; the 4x4 Sinkhorn (post / comb only) runs on one
// warp of CTA 0 beside that. The norm's sum of squares of `a` takes one more barrier (warps 0 only). Latency
// chain: load round trip, ~1 us barrier, one L2 read of the partials, 4 sigmoids, collapse, ~1 us barrier, one L2
// read, store; the Sinkhorn (~1.5 us) overlaps the second barrier.
// The grid barrier spins, so every CTA must be resident at once: hc_mix_wide_fits checks that the grid fits the
// device at the kernel's occupancy. Under PDL this cannot deadlock: every CTA triggers as its first statement and
// the dependent grid is launched only after all CTAs triggered, i.e. are resident; the predecessor's CTAs finish
// without waiting on us.
constexpr int kWideDims = 32;                 // dims per CTA: one per lane
constexpr int kWideThreads = N * kWideDims;   // warp i computes stream i
constexpr int kWideMaxCtas = 1024;
constexpr size_t kWideSyncBytes = 128;        // the barrier's arrival count, padded to a cache line

__device__ __forceinline__ unsigned long long ld_acquire_gpu(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

// Grid barrier on a monotonic 64-bit arrival count (never wraps), run by ONE thread per CTA: a CTA's arrival number
// `old` says which barrier it is in, and it waits until the count reaches the end of that barrier's block of G.
// Why not a sense-reversing barrier: its last arriver's reset + fence + generation bump are three dependent L2
// operations on the critical path; here the last arrival itself releases everyone (one atomic per CTA). It needs
// the count to be a multiple of G between launches: every launch adds exactly G or 2 G, so one workspace must
// serve one K (the backend's serves one model width). The fences make every write the CTA ordered before the call
// (its own, or its block's behind a __syncthreads) visible to every CTA after it, as cooperative_groups' grid sync
// does; readers then load with ld.cg (L2), never a stale L1 line.
__device__ __forceinline__ void grid_barrier_one_thread(unsigned long long* count, unsigned n_ctas) {
  __threadfence();
  const unsigned long long old = atomicAdd(count, 1ull);
  const unsigned long long target = (old / n_ctas + 1) * n_ctas;
  if (old + 1 != target) {
    // A barrier that never completes (a CTA that could not become resident: hc_mix_wide_fits should rule that out)
    // traps after ~10 s (2^34 SM cycles) so the launch fails with an error instead of hanging the device.
    const long long t0 = clock64();
    while (ld_acquire_gpu(count) < target) {
      if (clock64() - t0 > (1ll << 34)) __trap();
    }
  }
  __threadfence();
}

__device__ __forceinline__ void wide_grid_barrier(unsigned long long* count, unsigned n_ctas) {
  __syncthreads();
  if (threadIdx.x == 0) grid_barrier_one_thread(count, n_ctas);
  __syncthreads();
}

// Phase 1 of the wide and split kernels for CTA r (of d / 32; 128 threads): the fused hc_post of its 32 dims of all 4
// streams (written back to X in place), their products with the 128 columns of fn and their sum of squares, summed
// over the CTA into the M + 1 partials part_row[0..M] (global memory). Thread (warp i, lane l) owns column i d + k,
// k = 32 r + l. The fn loads go out before the PDL wait, all in flight together; xs keeps the CTA's (new) stream
// values for the caller's collapse. The one code path of both kernels, so their partials are the same bits.
template <int M>
__device__ __forceinline__ void wide_column_partials(const HcMixParams& p, int r, float (&xs)[N][kWideDims],
                                                     float (&red)[N][32], float* part_row) {
  constexpr int kV = 32;  // values per warp sum (M + 1 padded)
  static_assert(M + 1 <= kV, "wide_column_partials: too many values");
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t d = p.K / N, k = int64_t(r) * kWideDims + lane, c = int64_t(warp) * d + k;
  const __half* fn = static_cast<const __half*>(p.fn);
  __half h[M];
#pragma unroll
  for (int j = 0; j < M; ++j) h[j] = fn[j * p.K + c];  // weights: before the wait, all in flight together
  pdl_wait();
  float x;
  if (p.post_y) {  // hc_post_kernel's value for (stream warp, dim k), written back to X in place
    xs[warp][lane] = p.X[c];
    const float yv = p.post_y[k];
    __syncthreads();
    float in[N];
#pragma unroll
    for (int i = 0; i < N; ++i) in[i] = xs[i][lane];
    x = post_value(in, yv, p.post_w, p.post_comb, warp);
    __syncthreads();  // every warp has read the old values before they are replaced
    const_cast<float*>(p.X)[c] = x;
  } else {
    x = p.X[c];
  }
  xs[warp][lane] = x;
  float acc[kV];
#pragma unroll
  for (int j = 0; j < kV; ++j) acc[j] = 0.0f;
#pragma unroll
  for (int j = 0; j < M; ++j) acc[j] = __half2float(h[j]) * x;
  acc[M] = x * x;
  transposed_warp_sum<kV, kV, 16>(acc, lane);  // lane j: the warp's sum of value j
  red[warp][lane] = acc[0];
  __syncthreads();
  if (threadIdx.x <= M) {
    float v = 0.0f;
#pragma unroll
    for (int w = 0; w < N; ++w) v += red[w][threadIdx.x];  // warp order
    part_row[threadIdx.x] = v;
  }
}

// The totals of the G partial rows (M + 1 values each) on threads 0..127 (4 warps), in the one fixed order of the wide
// and split kernels: thread l sums rows l, l + 128, ... in order, then the warp tree, then the 4 warps in order;
// total[0..M] gets them. Every CTA that runs it holds the same bits. Callers __syncthreads() before reading total.
template <int M>
__device__ __forceinline__ void wide_totals(const float* part, unsigned G, float (&red)[N][32], float* total) {
  constexpr int kV = 32;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (warp < N) {
    float acc[kV];
#pragma unroll
    for (int j = 0; j < kV; ++j) acc[j] = 0.0f;
    for (unsigned row = threadIdx.x; row < G; row += kWideThreads) {
      float v[M + 1];
#pragma unroll
      for (int j = 0; j <= M; ++j) v[j] = __ldcg(part + size_t(row) * (M + 1) + j);
#pragma unroll
      for (int j = 0; j <= M; ++j) acc[j] += v[j];
    }
    transposed_warp_sum<kV, kV, 16>(acc, lane);
    red[warp][lane] = acc[0];
  }
  __syncthreads();
  if (threadIdx.x <= M) total[threadIdx.x] = ((red[0][threadIdx.x] + red[1][threadIdx.x]) + red[2][threadIdx.x]) +
                                             red[3][threadIdx.x];
}

// The norm's sum over the G per-32-dim sums of squares npart(row) in the one fixed order of the wide and split
// kernels (lane l: rows l, l + 32, ... in batches of 8 loads, then the warp tree). Called by a whole warp.
template <class Load>
__device__ __forceinline__ float wide_norm_sum(unsigned G, Load npart) {
  const int lane = threadIdx.x & 31;
  constexpr int kRows = 8;  // partial loads in flight per lane before the adds
  float sum = 0.0f;
  for (unsigned row0 = 0; row0 < G; row0 += 32 * kRows) {
    float buf[kRows];
#pragma unroll
    for (int u = 0; u < kRows; ++u) {
      const unsigned row = row0 + u * 32 + lane;
      buf[u] = row < G ? npart(row) : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < kRows; ++u) sum += buf[u];
  }
  return warp_sum(sum);
}

// One token (T == 1). Grid d / 32, 128 threads: thread (warp i, lane l) owns column i d + k, k = 32 blockIdx.x + l.
template <int M>
__global__ void __launch_bounds__(kWideThreads) hc_mix_wide_kernel(HcMixParams p, int64_t ws_offset) {
  constexpr int kV = 32;  // values per warp sum (M + 1 padded)
  static_assert(M + 1 <= kV, "hc_mix_wide_kernel: too many values");
  __shared__ float red[N][kV];
  __shared__ float xs[N][kWideDims];  // this CTA's (new) stream values
  __shared__ float total[kV];
  __shared__ float ctl[N];  // the Sinkhorn's pre output (unused: pre_value gives the same bits on warp 0)
  __shared__ float cbase[kHcMix], cscale[3];  // loaded before the wait: off the post-barrier critical path
  const unsigned G = gridDim.x;
  const int r = int(blockIdx.x), warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t d = p.K / N, k = int64_t(r) * kWideDims + lane;
  auto* sync = reinterpret_cast<unsigned long long*>(static_cast<uint8_t*>(p.workspace) + ws_offset);
  float* part = reinterpret_cast<float*>(reinterpret_cast<uint8_t*>(sync) + kWideSyncBytes);  // [G][M + 1]
  float* npart = part + size_t(G) * (M + 1);                                                   // [G]
  pdl_trigger();
  const float wn = p.a_norm && p.a_norm_w && warp == 0 ? p.a_norm_w[k] : 1.0f;
  if (threadIdx.x < kHcMix) cbase[threadIdx.x] = p.base[threadIdx.x];
  else if (threadIdx.x < kHcMix + 3) cscale[threadIdx.x - kHcMix] = p.scale[threadIdx.x - kHcMix];
  wide_column_partials<M>(p, r, xs, red, part + size_t(r) * (M + 1));
  wide_grid_barrier(sync, G);
  // Every CTA: the totals in one fixed order (wide_totals), so every CTA holds the same bits.
  wide_totals<M>(part, G, red, total);
  __syncthreads();
  // Only the collapse weights pre (4 sigmoids) are on the critical path; the 20-round Sinkhorn (~1.5 us of
  // dependent shuffles and reciprocals) only makes post / comb, so CTA 0's warp 1 runs it beside warp 0's collapse
  // and norm barrier, and the other CTAs skip it. The remaining warps are done.
  if (warp == 1 && r == 0) {
    const float rs = rsqrtf(total[M] / float(p.K) + p.norm_eps);
    const float mix_pp = lane < 2 * N ? total[lane] * rs : 0.0f;
    sinkhorn_token_warp(mix_pp, total[2 * N + (lane & 15)] * rs, cbase, cscale, p.iters, p.eps, ctl, p.post, p.comb);
  }
  if (warp != 0) return;
  const float rs = rsqrtf(total[M] / float(p.K) + p.norm_eps);
  const float pv = lane < N ? pre_value(total[lane] * rs, cscale, cbase, lane, p.eps) : 0.0f;
  if (r == 0) {  // post_w / post_comb may alias post / comb: every CTA read them before the barrier above
    if (lane < N) p.pre[lane] = pv;
    if (lane == 0 && p.rs_out) p.rs_out[0] = rs;
    if (p.mix_out && lane < M) p.mix_out[lane] = total[lane];
  }
  float wts[N], v[N];
#pragma unroll
  for (int i = 0; i < N; ++i) wts[i] = __shfl_sync(kFullMask, pv, i), v[i] = xs[i][lane];
  const float av = collapse_value(v, wts);
  if (!p.a_norm) {  // uniform over the grid
    p.a[k] = av;
    return;
  }
  // The norm's sum of squares of a: one warp sum per CTA, a grid barrier among warps 0 (lane 0 wrote npart[r]
  // itself, so its fences order it), then every CTA's warp 0 sums the G partials in one fixed order.
  const float ss = warp_sum(av * av);
  if (lane == 0) {
    npart[r] = ss;
    grid_barrier_one_thread(sync, G);
  }
  __syncwarp();
  const float sum = wide_norm_sum(G, [&](unsigned row) { return __ldcg(npart + row); });
  const float scale = rsqrtf(sum / float(d) + p.a_norm_eps);
  float y = av * scale;
  if (p.a_norm_w) y *= wn;
  p.a[k] = y;
}

// ---- split variant (kHcMixSplit, see hc.h) ------------------------------------------------------------------------
// The wide kernel's two halves as two launches: the kernel boundary (with PDL: the tail's CTAs are resident and
// waiting on griddepcontrol.wait) replaces the spinning grid barrier, and the tail is one small cluster whose norm
// meets in distributed shared memory instead of a second grid barrier. Part kernel: wide_column_partials on d / 32
// CTAs (the 0.8 MB of fn through 128 SMs). Tail kernel: one cluster of d / 256 CTAs, 256 collapse threads (one dim
// each) + one warp for the Sinkhorn (post / comb; rank 0 only): every CTA sums the partials (wide_totals), forms
// pre, collapses its 256 dims, and the norm's 32-dim sums of squares meet over DSMEM in wide_norm_sum's order. So
// every output equals the wide kernel's bit for bit (same partials, same orders). Optionally it writes `a` in the
// split Q8_0 activation layout too (a_q8), so the projection reading `a` needs no quantize launch.
constexpr int kTailDims = 256;                       // dims per tail CTA: one per collapse thread
constexpr int kTailThreads = kTailDims + 32;         // + the Sinkhorn warp
constexpr int kTailWarps = kTailDims / 32;           // collapse warps per CTA
constexpr int kTailMaxCtas = 16;                     // non-portable cluster size (sm_90 opt-in)

template <int M>
__global__ void __launch_bounds__(kWideThreads) hc_mix_split_part_kernel(HcMixParams p, int64_t ws_offset) {
  __shared__ float red[N][32];
  __shared__ float xs[N][kWideDims];
  pdl_trigger();
  float* part = reinterpret_cast<float*>(static_cast<uint8_t*>(p.workspace) + ws_offset + kWideSyncBytes);
  wide_column_partials<M>(p, int(blockIdx.x), xs, red, part + size_t(blockIdx.x) * (M + 1));
}

// Grid cs = d / 256 (one cluster), kTailThreads threads. Collapse thread t of rank r owns dim k = 256 r + t, i.e. lane
// t % 32 of the wide kernel's CTA 8 r + t / 32; that CTA's norm partial is the warp sum of warp t / 32 here.
template <int M>
__global__ void __launch_bounds__(kTailThreads) hc_mix_split_tail_kernel(HcMixParams p, int64_t ws_offset) {
  namespace cg = cooperative_groups;
  __shared__ float red[N][32];
  __shared__ float total[32];
  __shared__ float ctl[N];  // the Sinkhorn's pre output (unused: pre_value gives the same bits)
  __shared__ float cbase[kHcMix], cscale[3];
  __shared__ float wss[kTailWarps];  // this CTA's per-warp sums of squares of a
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = int(cluster.block_rank()), warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const bool sink_warp = warp == kTailWarps;
  const int64_t d = p.K / N, k = int64_t(rank) * kTailDims + (sink_warp ? 0 : threadIdx.x);
  const unsigned G = unsigned(d / kWideDims);
  const float* part = reinterpret_cast<const float*>(static_cast<uint8_t*>(p.workspace) + ws_offset + kWideSyncBytes);
  pdl_trigger();
  const float wn = p.a_norm && p.a_norm_w ? p.a_norm_w[k] : 1.0f;
  if (threadIdx.x < kHcMix) cbase[threadIdx.x] = p.base[threadIdx.x];
  else if (threadIdx.x < kHcMix + 3) cscale[threadIdx.x - kHcMix] = p.scale[threadIdx.x - kHcMix];
  pdl_wait();
  float v[N];
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = __ldcg(p.X + int64_t(i) * d + k);  // the part kernel's new X: in flight now
  wide_totals<M>(part, G, red, total);
  __syncthreads();
  const float rs = rsqrtf(total[M] / float(p.K) + p.norm_eps);
  float av = 0.0f;
  if (sink_warp) {
    if (rank == 0 && !p.skip_sinkhorn) {
      const float mix_pp = lane < 2 * N ? total[lane] * rs : 0.0f;
      sinkhorn_token_warp(mix_pp, total[2 * N + (lane & 15)] * rs, cbase, cscale, p.iters, p.eps, ctl, p.post,
                          p.comb);
    }
  } else {
    const float pv = lane < N ? pre_value(total[lane] * rs, cscale, cbase, lane, p.eps) : 0.0f;
    if (rank == 0 && warp == 0) {  // post_w / post_comb may alias post / comb: the part kernel read them
      if (lane < N) p.pre[lane] = pv;
      if (lane == 0 && p.rs_out) p.rs_out[0] = rs;
      if (p.mix_out && lane < M) p.mix_out[lane] = total[lane];
    }
    float wts[N];
#pragma unroll
    for (int i = 0; i < N; ++i) wts[i] = __shfl_sync(kFullMask, pv, i);
    av = collapse_value(v, wts);
  }
  if (!p.a_norm) {  // uniform over the grid: no cluster barrier
    if (!sink_warp) {
      p.a[k] = av;
      if (p.a_q8) q8_split_store_warp(av, static_cast<uint8_t*>(p.a_q8), d, k);
    }
    return;
  }
  if (!sink_warp) {
    const float ss = warp_sum(av * av);
    if (lane == 0) wss[warp] = ss;
  }
  cluster.sync();  // every CTA's wss written (every thread, the Sinkhorn warp too, takes part in the barriers)
  float sum = 0.0f;
  if (!sink_warp)
    sum = wide_norm_sum(G, [&](unsigned row) {
      return cluster.map_shared_rank(wss, int(row / kTailWarps))[row % kTailWarps];
    });
  cluster.barrier_arrive();  // this CTA's reads of the others' wss are done
  if (!sink_warp) {
    const float scale = rsqrtf(sum / float(d) + p.a_norm_eps);
    float y = av * scale;
    if (p.a_norm_w) y *= wn;
    p.a[k] = y;
    if (p.a_q8) q8_split_store_warp(y, static_cast<uint8_t*>(p.a_q8), d, k);
  }
  cluster.barrier_wait();  // no CTA leaves while another may still read its wss
}

// One thread per (token, dim): reads the 4 stream values of that dim.
__global__ void hc_collapse_kernel(const float* X, const float* pre, int64_t n_tokens, int64_t d, float* a) {
  pdl_trigger();
  pdl_wait();
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
  pdl_trigger();
  pdl_wait();
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n_tokens * d) return;
  const int64_t t = idx / d, k = idx % d;
  float* x = X + t * N * d + k;
  float in[N];
#pragma unroll
  for (int i = 0; i < N; ++i) in[i] = x[int64_t(i) * d];
  const float yv = y[idx];
#pragma unroll
  for (int o = 0; o < N; ++o) x[int64_t(o) * d] = post_value(in, yv, post + t * N, comb + t * N * N, o);
}

// w[t][i] = sigmoid(mix[t][i] * mix_scale[t] * scale[0] + base[i]) + eps, one thread per (token, stream).
__global__ void hc_head_weights_kernel(const float* mix, const float* mix_scale, const float* base,
                                       const float* scale, int64_t n_tokens, float eps, float* w) {
  pdl_trigger();
  pdl_wait();
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
  launch_pdl("hc_split_sinkhorn_kernel", hc_split_sinkhorn_kernel, blocks_for(p.n_tokens * 32), kThreads, 0, stream,
             p);
}

namespace {

cudaLaunchConfig_t cluster_config(const ClusterShape& s, int64_t n_tokens, cudaStream_t stream,
                                  cudaLaunchAttribute* attr) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(unsigned(s.cs), unsigned(n_tokens));
  cfg.blockDim = dim3(unsigned(s.cpc * kMixThreads));
  cfg.stream = stream;
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = unsigned(s.cs), attr->val.clusterDim.y = 1, attr->val.clusterDim.z = 1;
  cfg.attrs = attr, cfg.numAttrs = 1;
  return cfg;
}

// Clusters above 8 CTAs need the opt-in attribute (set once per kernel; not a stream operation, so it is also
// safe while a graph is being captured).
template <int M>
void allow_large_clusters() {
  static const bool done = [] {
    check(cudaFuncSetAttribute(hc_mix_cluster_kernel<M>, cudaFuncAttributeNonPortableClusterSizeAllowed, 1),
          "hc_mix_cluster_kernel: cluster size attribute");
    return true;
  }();
  (void)done;
}

// Whether one cluster of this shape can be resident on the device (a GPC must hold cs CTAs of cpc x 128 threads).
// Cached per (n_mix, shape): the query is a driver call, and hc_pre runs 86 times per decoded token.
// Whether `cfg` (one cluster's launch configuration) of `kernel` can be resident: the occupancy query, answering
// 1 or -1 and leaving no sticky error for an unplaceable shape. The callers cache the answer per shape.
template <class Kernel>
int8_t cluster_resident(Kernel kernel, const cudaLaunchConfig_t& cfg) {
  int n = 0;
  const cudaError_t err = cudaOccupancyMaxActiveClusters(&n, kernel, &cfg);
  if (err != cudaSuccess) (void)cudaGetLastError();
  return err == cudaSuccess && n > 0 ? 1 : -1;
}

template <int M>
bool cluster_placeable(const ClusterShape& s) {
  static std::atomic<int8_t> known[kClusterMax + 1][kClusterChunks + 1] = {};  // 0 unknown, 1 yes, -1 no
  std::atomic<int8_t>& k = known[s.cs][s.cpc];
  int8_t v = k.load(std::memory_order_relaxed);
  if (v == 0) {
    allow_large_clusters<M>();
    cudaLaunchAttribute attr;
    v = cluster_resident(hc_mix_cluster_kernel<M>, cluster_config(s, 1, nullptr, &attr));
    k.store(v, std::memory_order_relaxed);
  }
  return v > 0;
}

template <int M>
void launch_mix_cluster(const HcMixParams& p, cudaStream_t stream) {
  const ClusterShape s = cluster_shape(p.K, p.post_y != nullptr);
  allow_large_clusters<M>();
  cudaLaunchAttribute attr[2];
  cudaLaunchConfig_t cfg = cluster_config(s, p.n_tokens, stream, &attr[0]);
  // Programmatic stream serialization beside the cluster shape (pdl.cuh): the kernel keeps the PDL contract.
  attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[1].val.programmaticStreamSerializationAllowed = 1;
  cfg.numAttrs = pdl_enabled() ? 2 : 1;
  check(cudaLaunchKernelEx(&cfg, hc_mix_cluster_kernel<M>, p, int(mix_chunks(p.K)), s.cpc),
        "hc_mix_cluster_kernel launch");
}

}  // namespace

bool hc_mix_cluster_fits(int n_mix, int64_t K) {
  if ((n_mix != kHcMix && n_mix != N) || K <= 0 || K % 2 != 0) return false;
  if (mix_chunks(K) > int64_t(kClusterMax) * kClusterChunks) return false;
  const ClusterShape s = cluster_shape(K, false);
  return n_mix == kHcMix ? cluster_placeable<kHcMix>(s) : cluster_placeable<N>(s);
}

bool hc_mix_cluster_post_fits(int n_mix, int64_t K) {
  if ((n_mix != kHcMix && n_mix != N) || K <= 0 || K % (N * kMixChunk) != 0) return false;
  if (K / N > int64_t(kClusterMax) * kMixChunk) return false;
  const ClusterShape s = cluster_shape(K, true);
  return n_mix == kHcMix ? cluster_placeable<kHcMix>(s) : cluster_placeable<N>(s);
}

bool hc_mix_cluster_norm_fits(int n_mix, int64_t K) {
  if (K <= 0 || K % N != 0) return false;
  const int64_t d = K / N;
  // rms_norm_cuda's thread count for this row must be d / 4 with 4 values each (d % 128 == 0, d <= 4096), and its
  // d / 128 warps must split evenly over the cluster's CTAs.
  if (d % 128 != 0 || d > 4096) return false;
  const ClusterShape s = cluster_shape(K, false);
  if ((d / 128) % s.cs != 0 || d / s.cs > kNormMaxDpc) return false;
  return hc_mix_cluster_fits(n_mix, K);
}

namespace {

size_t ticket_bytes(int64_t n_tokens, int64_t K) {
  return size_t((n_tokens * 4 + 15) / 16 * 16) + size_t(n_tokens * mix_chunks(K) * (kHcMix + 1)) * sizeof(float);
}
int64_t wide_ctas(int64_t K) { return K / (N * kWideDims); }
// The wide kernel's region sits after the 1-token ticket layout (the wide kernel is one-token only), so a buffer
// sized for T == 1 serves both kernels; its barrier count is a multiple of the grid size between launches.
size_t wide_offset(int64_t K) { return (ticket_bytes(1, K) + 127) / 128 * 128; }
size_t wide_bytes(int64_t K) { return kWideSyncBytes + size_t(wide_ctas(K)) * (kHcMix + 2) * sizeof(float); }

// Whether `ctas` CTAs of the wide kernel can all be resident at once (its grid barrier spins). Cached: a driver
// query, and hc_pre runs 86 times per decoded token.
int64_t wide_resident_ctas() {
  static const int64_t n = [] {
    int dev = 0, sms = 0, per_sm = 0;
    check(cudaGetDevice(&dev), "hc_mix_wide: device");
    check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "hc_mix_wide: SM count");
    check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, hc_mix_wide_kernel<kHcMix>, kWideThreads, 0),
          "hc_mix_wide: occupancy");
    return int64_t(sms) * per_sm;
  }();
  return n;
}

}  // namespace

bool hc_mix_wide_fits(int n_mix, int64_t K) {
  if (n_mix != kHcMix || K <= 0 || K % (N * kWideDims) != 0) return false;
  const int64_t G = wide_ctas(K);
  return G <= kWideMaxCtas && G <= wide_resident_ctas();
}

namespace {

// Whether the split kernels' tail cluster (d / 256 CTAs of kTailThreads) can be placed on this device. Cached: a
// driver query, and hc_pre runs 86 times per decoded token.
bool split_tail_placeable(int cs) {
  static std::atomic<int8_t> known[kTailMaxCtas + 1] = {};  // 0 unknown, 1 yes, -1 no
  std::atomic<int8_t>& kn = known[cs];
  int8_t v = kn.load(std::memory_order_relaxed);
  if (v == 0) {
    check(cudaFuncSetAttribute(hc_mix_split_tail_kernel<kHcMix>, cudaFuncAttributeNonPortableClusterSizeAllowed, 1),
          "hc_mix_split_tail_kernel: cluster size attribute");
    cudaLaunchConfig_t cfg{};
    cudaLaunchAttribute attr;
    cfg.gridDim = dim3(unsigned(cs)), cfg.blockDim = dim3(kTailThreads);
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = unsigned(cs), attr.val.clusterDim.y = 1, attr.val.clusterDim.z = 1;
    cfg.attrs = &attr, cfg.numAttrs = 1;
    v = cluster_resident(hc_mix_split_tail_kernel<kHcMix>, cfg);
    kn.store(v, std::memory_order_relaxed);
  }
  return v > 0;
}

void launch_mix_split(const HcMixParams& p, cudaStream_t stream) {
  const int64_t ws = int64_t(wide_offset(p.K));
  launch_pdl("hc_mix_split_part_kernel", hc_mix_split_part_kernel<kHcMix>, dim3(unsigned(wide_ctas(p.K))),
             kWideThreads, 0, stream, p, ws);
  const int cs = int(p.K / N / kTailDims);
  cudaLaunchConfig_t cfg{};
  cudaLaunchAttribute attr[2];
  cfg.gridDim = dim3(unsigned(cs)), cfg.blockDim = dim3(kTailThreads), cfg.stream = stream;
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = unsigned(cs), attr[0].val.clusterDim.y = 1, attr[0].val.clusterDim.z = 1;
  attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;  // the tail keeps the PDL contract (pdl.cuh)
  attr[1].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr, cfg.numAttrs = pdl_enabled() ? 2 : 1;
  check(cudaLaunchKernelEx(&cfg, hc_mix_split_tail_kernel<kHcMix>, p, ws), "hc_mix_split_tail_kernel launch");
}

}  // namespace

bool hc_mix_split_fits(int n_mix, int64_t K) {
  if (n_mix != kHcMix || K <= 0 || K % (N * kTailDims) != 0) return false;
  const int64_t cs = K / N / kTailDims;
  if (cs > kTailMaxCtas || wide_ctas(K) > kWideMaxCtas) return false;
  return split_tail_placeable(int(cs));
}

size_t hc_mix_workspace_bytes(int64_t n_tokens, int64_t K) {
  const size_t ticket = ticket_bytes(n_tokens, K), wide = wide_offset(K) + wide_bytes(K);
  return ticket > wide ? ticket : wide;
}

namespace {

// a = rms_norm(a) as the backend's rms_norm launches it (the fallback of HcMixParams::a_norm).
void norm_rows(const HcMixParams& p, cudaStream_t stream) {
  RmsNormParams r;
  r.x = p.a, r.y = p.a, r.w = p.a_norm_w, r.rows = p.n_tokens, r.n = int(p.K / N), r.eps = p.a_norm_eps;
  rms_norm_cuda(r, stream);
}

}  // namespace

void hc_mix_cuda(const HcMixParams& p, cudaStream_t stream) {
  if (p.n_mix != kHcMix && p.n_mix != N) fail("hc_mix_cuda: n_mix=%d (24 for hc_pre, 4 for hc_head)", p.n_mix);
  if (p.K <= 0 || p.K % 2 != 0) fail("hc_mix_cuda: K=%lld must be positive and even", (long long)p.K);
  if (p.kernel != kHcMixTicket && p.kernel != kHcMixCluster && p.kernel != kHcMixWide && p.kernel != kHcMixSplit)
    fail("hc_mix_cuda: unknown kernel %d", p.kernel);
  const bool fuse_post = p.post_y || p.post_w || p.post_comb;
  if (fuse_post && (!p.post_y || !p.post_w || !p.post_comb || p.kernel == kHcMixTicket || p.K % N != 0))
    fail("hc_mix_cuda: a fused hc_post needs post_y, post_w, post_comb, the cluster, wide or split kernel and K = "
         "%d x d", N);
  if (p.skip_sinkhorn && !(p.kernel == kHcMixSplit && p.n_tokens == 1 && p.a && hc_mix_split_fits(p.n_mix, p.K) &&
                           p.mix_out && p.rs_out && p.n_mix == kHcMix))
    fail("hc_mix_cuda: skip_sinkhorn needs the split kernel (one token, the fused collapse, hc_mix_split_fits, 24 "
         "mix values) and mix_out / rs_out for the separate Sinkhorn launch");
  if (p.a_q8 && !(p.kernel == kHcMixSplit && p.n_tokens == 1 && p.a && hc_mix_split_fits(p.n_mix, p.K)))
    fail("hc_mix_cuda: a_q8 is written by the split kernel only (one token, the fused collapse, hc_mix_split_fits)");
  if (p.kernel == kHcMixSplit && p.n_tokens == 1 && p.a && hc_mix_split_fits(p.n_mix, p.K)) {
    if (!p.fn || !p.X || !p.base || !p.scale || !p.workspace || !p.pre || !p.post || !p.comb || p.iters < 1)
      fail("hc_mix_cuda: the split kernel needs fn, X, base, scale, workspace, pre, post, comb and iters >= 1");
    launch_mix_split(p, stream);
    return;
  }
  if (p.kernel == kHcMixWide && p.n_tokens == 1 && p.a && hc_mix_wide_fits(p.n_mix, p.K)) {
    if (!p.fn || !p.X || !p.base || !p.scale || !p.workspace || !p.pre || !p.post || !p.comb || p.iters < 1)
      fail("hc_mix_cuda: the wide kernel needs fn, X, base, scale, workspace, pre, post, comb and iters >= 1");
    launch_pdl("hc_mix_wide_kernel", hc_mix_wide_kernel<kHcMix>, dim3(unsigned(wide_ctas(p.K))), kWideThreads, 0,
               stream, p, int64_t(wide_offset(p.K)));
    return;
  }
  // The wide / split kernels' shape does not apply (several tokens, no fused collapse, hc_head, other widths): the
  // cluster kernel (or its ticket fallback) instead.
  const bool cluster = p.kernel != kHcMixTicket &&
                       (fuse_post ? hc_mix_cluster_post_fits(p.n_mix, p.K) : hc_mix_cluster_fits(p.n_mix, p.K));
  if (!p.fn || !p.X || !p.base || !p.scale || (!cluster && !p.workspace))
    fail("hc_mix_cuda: fn, X, base, scale and (ticket kernel) workspace needed");
  if (p.n_mix == kHcMix && (!p.pre || !p.post || !p.comb || p.iters < 1))
    fail("hc_mix_cuda: hc_pre needs pre, post, comb and iters >= 1 (got %d)", p.iters);
  if (p.n_mix == N && !p.w) fail("hc_mix_cuda: hc_head needs w");
  if (p.a && p.K % N != 0) fail("hc_mix_cuda: the fused collapse needs K = %d x d, got K=%lld", N, (long long)p.K);
  if (p.a_norm && !p.a) fail("hc_mix_cuda: a_norm needs the fused collapse (a)");
  if (p.n_tokens <= 0) return;
  if (p.n_tokens > 65535) fail("hc_mix_cuda: %lld tokens in one launch (max 65535)", (long long)p.n_tokens);
  const int64_t chunks = mix_chunks(p.K);
  if (cluster) {
    // The norm in the kernel where its shape allows, else rms_norm_cuda after it (the same bits either way).
    // (Every shape hc_mix_cluster_post_fits accepts has rms_norm's layout: d % 256 == 0, d <= 4096, cs = d / 256.)
    const bool norm_in = p.a_norm && (fuse_post || hc_mix_cluster_norm_fits(p.n_mix, p.K));
    HcMixParams q = p;
    q.a_norm = norm_in;
    if (p.n_mix == kHcMix) launch_mix_cluster<kHcMix>(q, stream);
    else launch_mix_cluster<N>(q, stream);
    if (p.a_norm && !norm_in) norm_rows(p, stream);
    return;
  }
  // The ticket kernel (default, or the cluster kernel's fallback: the same results), after the separate hc_post.
  if (fuse_post) hc_post_cuda(const_cast<float*>(p.X), p.post_y, p.post_w, p.post_comb, p.n_tokens, p.K / N, stream);
  const dim3 grid(unsigned(chunks), unsigned(p.n_tokens));
  launch_pdl("hc_mix_kernel", p.n_mix == kHcMix ? hc_mix_kernel<kHcMix> : hc_mix_kernel<N>, grid, kMixThreads, 0,
             stream, p, chunks);
  if (p.a_norm) norm_rows(p, stream);
}

void hc_head_weights_cuda(const float* mix, const float* mix_scale, const float* base, const float* scale,
                          int64_t n_tokens, float eps, float* w, cudaStream_t stream) {
  if (n_tokens <= 0) return;
  launch_pdl("hc_head_weights_kernel", hc_head_weights_kernel, blocks_for(n_tokens * N), kThreads, 0, stream, mix,
             mix_scale, base, scale, n_tokens, eps, w);
}

void hc_collapse_cuda(const float* X, const float* pre, int64_t n_tokens, int64_t d, float* a,
                      cudaStream_t stream) {
  if (n_tokens * d <= 0) return;
  launch_pdl("hc_collapse_kernel", hc_collapse_kernel, blocks_for(n_tokens * d), kThreads, 0, stream, X, pre,
             n_tokens, d, a);
}

void hc_post_cuda(float* X, const float* y, const float* post, const float* comb, int64_t n_tokens, int64_t d,
                  cudaStream_t stream) {
  if (n_tokens * d <= 0) return;
  launch_pdl("hc_post_kernel", hc_post_kernel, blocks_for(n_tokens * d), kThreads, 0, stream, X, y, post, comb,
             n_tokens, d);
}

}  // namespace dsv4::cuda
