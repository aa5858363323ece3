// Lightning-indexer kernels (see indexer.h).
#include "backend/cuda/indexer.h"

#include <cooperative_groups.h>

#include <algorithm>
#include <cstdlib>

#include "backend/cuda/attention_mma.cuh"
#include "backend/cuda/common.cuh"
#include "backend/cuda/cuda_util.h"
#include "backend/cuda/pdl.cuh"
#include "backend/cuda/select.h"
#include "common/error.h"

namespace dsv4::cuda {
namespace {

constexpr int kKeys = 32;          // keys per tile = lanes
constexpr int kGroups = 8;         // warps; warp g handles heads g, g+8, ...
constexpr int kThreads = kGroups * 32;
constexpr int kMaxIdxDim = 128;
constexpr int kMaxQFloats = 64 * 128;  // HI * dI held in shared memory

// grid (tile CTAs, T); each CTA loops over key tiles with stride gridDim.x.
__global__ void __launch_bounds__(kThreads) indexer_score_kernel(IndexerLaunch p, float* scores, int64_t n_cols) {
  pdl_trigger();
  pdl_wait();  // PDL (pdl.cuh): every input may come from the previous kernel
  extern __shared__ float smem[];  // q [HI*dI] | keys transposed [dI][33] | part [8][32] | w [HI]
  float* qs = smem;
  float* kT = qs + p.HI * p.dI;
  float(*part)[kKeys] = reinterpret_cast<float(*)[kKeys]>(kT + p.dI * (kKeys + 1));
  float* ws = kT + p.dI * (kKeys + 1) + kGroups * kKeys;
  const int t = blockIdx.y, lane = threadIdx.x & 31, g = threadIdx.x >> 5;
  const int HI = p.HI, dI = p.dI;
  const int64_t n_vis = (p.pos0 + t + 1) / p.ratio;
  for (int i = threadIdx.x; i < HI * dI; i += kThreads) qs[i] = p.q[int64_t(t) * HI * dI + i];
  for (int i = threadIdx.x; i < HI; i += kThreads) ws[i] = p.w[int64_t(t) * HI + i] * p.weight_scale;
  const int64_t n_tiles = (n_cols + kKeys - 1) / kKeys;
  for (int64_t tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
    const int64_t k0 = tile * kKeys;
    __syncthreads();  // q staged / previous tile consumed
    for (int i = threadIdx.x; i < kKeys * dI; i += kThreads) {
      const int kk = i / dI, d = i % dI;
      kT[d * (kKeys + 1) + kk] = k0 + kk < n_vis ? p.keys[(k0 + kk) * dI + d] : 0.0f;
    }
    __syncthreads();
    float acc = 0.0f;
    for (int h = g; h < HI; h += kGroups) {
      const float* qh = qs + h * dI;
      float dot = 0.0f;
      for (int d = 0; d < dI; ++d) dot += qh[d] * kT[d * (kKeys + 1) + lane];
      acc += ws[h] * fmaxf(dot, 0.0f);
    }
    part[g][lane] = acc;
    __syncthreads();
    if (g == 0 && k0 + lane < n_cols) {
      float s = 0.0f;
      for (int j = 0; j < kGroups; ++j) s += part[j][lane];
      scores[int64_t(t) * n_cols + k0 + lane] = k0 + lane < n_vis ? s : -INFINITY;
    }
  }
}

// ---- tensor-core scores (IndexerImpl::TensorCore; see indexer.h) ---------------------------------------------
namespace itc {
using namespace tcore;

constexpr int kD = 128, kHeads = 64, kKeys = 64, kThreads = 256;
constexpr int kStride = kD + 8;  // halves: 272-byte rows start 16 bytes apart mod 128, so ldmatrix is conflict-free
constexpr size_t kSmemBytes = sizeof(__half) * 4 * kHeads * kStride + sizeof(float) * (4 * kKeys + kHeads);

// Shared memory of one CTA: q hi/lo [64 heads][kStride] | key tile hi/lo [64 keys][kStride] | part [4][64] | w [64].
struct Smem {
  __half *qh, *ql, *kh, *kl;
  float *part, *ws;
};
__device__ __forceinline__ Smem carve(unsigned char* raw) {
  Smem s;
  s.qh = reinterpret_cast<__half*>(raw);
  s.ql = s.qh + kHeads * kStride;
  s.kh = s.ql + kHeads * kStride;
  s.kl = s.kh + kKeys * kStride;
  s.part = reinterpret_cast<float*>(s.kl + kKeys * kStride);  // [4 head tiles][64 keys]
  s.ws = s.part + 4 * kKeys;
  return s;
}

// Token t's queries (hi/lo split) and scaled head weights into shared memory; padded heads get q = 0, weight 0.
// No barrier at the end: score_tile starts with one.
__device__ __forceinline__ void stage_queries(const IndexerLaunch& p, int t, const Smem& s) {
  constexpr int kD4 = kD / 4;
  const int tid = threadIdx.x;
  const float4* q4 = reinterpret_cast<const float4*>(p.q) + int64_t(t) * p.HI * kD4;
  // All of a thread's loads first, then the stores: interleaved, the compiler keeps each global load behind the
  // previous shared store (generic pointers may alias), 8 dependent round trips instead of one.
  constexpr int kPer = kHeads * kD4 / kThreads;
  static_assert(kPer * kThreads == kHeads * kD4);
  float4 v[kPer];
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int i = tid + j * kThreads;
    v[j] = i / kD4 < p.HI ? q4[i] : make_float4(0.f, 0.f, 0.f, 0.f);
  }
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int i = tid + j * kThreads, r = i / kD4, c = i % kD4;
    store_split4(v[j], s.qh + r * kStride + 4 * c, s.ql + r * kStride + 4 * c);
  }
  if (tid < kHeads) s.ws[tid] = tid < p.HI ? p.w[int64_t(t) * p.HI + tid] * p.weight_scale : 0.0f;
}

// The tile of keys k0 .. k0+63 (rows >= n_vis read as zero keys). Called by the whole CTA; starts with a barrier
// (queries staged / the previous tile's keys and partial sums consumed) and ends with one, after which
// tile_score(s, j) is key k0 + j's score for j < 64.
__device__ __forceinline__ void score_tile(const IndexerLaunch& p, int64_t k0, int64_t n_vis, const Smem& s) {
  constexpr int kD4 = kD / 4;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, c4 = lane & 3, mt = warp & 3, nq = warp >> 2;
  const int a_row = 16 * mt + (lane & 7) + 8 * ((lane >> 3) & 1), a_col = 8 * (lane >> 4);
  const uint32_t qh_a = smem_u32(s.qh + a_row * kStride + a_col), ql_a = smem_u32(s.ql + a_row * kStride + a_col);
  const int b_row = 32 * nq + (lane & 7) + 8 * (lane >> 4), b_col = 8 * ((lane >> 3) & 1);
  const uint32_t kh_b = smem_u32(s.kh + b_row * kStride + b_col), kl_b = smem_u32(s.kl + b_row * kStride + b_col);
  __syncthreads();
  {
    float4 v[kKeys * kD4 / kThreads];
#pragma unroll
    for (int j = 0; j < kKeys * kD4 / kThreads; ++j) {
      const int i = tid + j * kThreads, r = i / kD4, c = i % kD4;
      v[j] = k0 + r < n_vis ? __ldg(reinterpret_cast<const float4*>(p.keys + (k0 + r) * kD) + c)
                            : make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int j = 0; j < kKeys * kD4 / kThreads; ++j) {
      const int i = tid + j * kThreads, r = i / kD4, c = i % kD4;
      store_split4(v[j], s.kh + r * kStride + 4 * c, s.kl + r * kStride + 4 * c);
    }
  }
  __syncthreads();
  float acc[4][4] = {};
#pragma unroll
  for (int d0 = 0; d0 < kD; d0 += 16) {
    uint32_t ah[4], al[4], bh0[4], bl0[4], bh1[4], bl1[4];
    ldsm_x4(ah, qh_a + 2 * d0);
    ldsm_x4(al, ql_a + 2 * d0);
    ldsm_x4(bh0, kh_b + 2 * d0);
    ldsm_x4(bl0, kl_b + 2 * d0);
    ldsm_x4(bh1, kh_b + 2 * (16 * kStride + d0));
    ldsm_x4(bl1, kl_b + 2 * (16 * kStride + d0));
    mma3(acc[0], ah, al, bh0[0], bh0[1], bl0[0], bl0[1]);
    mma3(acc[1], ah, al, bh0[2], bh0[3], bl0[2], bl0[3]);
    mma3(acc[2], ah, al, bh1[0], bh1[1], bl1[0], bl1[1]);
    mma3(acc[3], ah, al, bh1[2], bh1[3], bl1[2], bl1[3]);
  }
  // w_h * ReLU(dot), summed over this warp's 16 heads: rows g and g + 8 in the lane, then over g by shuffles.
  const float w0 = s.ws[16 * mt + g], w1 = s.ws[16 * mt + g + 8];
#pragma unroll
  for (int n = 0; n < 4; ++n) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float v = w0 * fmaxf(acc[n][e], 0.0f) + w1 * fmaxf(acc[n][e + 2], 0.0f);
      v += __shfl_xor_sync(kFullMask, v, 4);
      v += __shfl_xor_sync(kFullMask, v, 8);
      v += __shfl_xor_sync(kFullMask, v, 16);
      if (g == 0) s.part[mt * kKeys + 32 * nq + 8 * n + 2 * c4 + e] = v;
    }
  }
  __syncthreads();
}

// Key j's score of the last score_tile: a fixed-order sum over the 4 head tiles.
__device__ __forceinline__ float tile_score(const Smem& s, int j) {
  return (s.part[j] + s.part[kKeys + j]) + (s.part[2 * kKeys + j] + s.part[3 * kKeys + j]);
}

// grid (CTAs per token, T). Warp w: heads 16(w%4)..+15 x keys 32(w/4)..+31 of each 64-key tile.
__global__ void __launch_bounds__(kThreads) indexer_score_tc_kernel(IndexerLaunch p, float* scores, int64_t n_cols) {
  pdl_trigger();
  pdl_wait();  // PDL (pdl.cuh): every input may come from the previous kernel
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Smem s = carve(smem_raw);
  const int t = blockIdx.y, tid = threadIdx.x;
  const int64_t n_vis = (p.pos0 + t + 1) / p.ratio;
  stage_queries(p, t, s);
  const int64_t n_tiles = (n_cols + kKeys - 1) / kKeys;
  for (int64_t tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
    const int64_t k0 = tile * kKeys;
    if (k0 >= n_vis) {  // nothing visible in this tile (uniform over the CTA): only the -inf padding
      for (int i = tid; i < kKeys; i += kThreads)
        if (k0 + i < n_cols) scores[int64_t(t) * n_cols + k0 + i] = -INFINITY;
      continue;
    }
    score_tile(p, k0, n_vis, s);
    if (tid < kKeys && k0 + tid < n_cols) {
      const float sc = tile_score(s, tid);
      scores[int64_t(t) * n_cols + k0 + tid] = k0 + tid < n_vis ? sc : -INFINITY;
    }
  }
}

}  // namespace itc

// ---- selection: radix select of the k-th score + one ordered pass (ascending rows, ties to the lower row) ----
constexpr int kSelThreads = 1024;
constexpr int kSelCacheKeys = 32768;

__device__ __forceinline__ uint32_t order_key(float f) {  // order-preserving: larger float -> larger key
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// One block per token. scores: [T, n_cols] with the token's visible rows first. With cache_keys >= the token's
// visible rows, the first pass keeps the order keys in dynamic shared memory and the later passes read them there.
__global__ void __launch_bounds__(kSelThreads) indexer_topk_kernel(IndexerLaunch p, const float* scores,
                                                                    int64_t n_cols, int cache_keys) {
  pdl_trigger();
  pdl_wait();  // PDL (pdl.cuh): every input may come from the previous kernel
  extern __shared__ uint32_t key_cache[];
  __shared__ unsigned hist[256];
  __shared__ int warp_gt[32], warp_eq[32];
  __shared__ uint32_t s_prefix;
  __shared__ int s_remaining;
  const int t = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t n_vis = (p.pos0 + t + 1) / p.ratio;
  int32_t* sel = p.sel + int64_t(t) * p.k;
  if (tid == 0 && p.count) p.count[t] = int32_t(n_vis < p.k ? n_vis : p.k);
  if (n_vis <= p.k) {  // every visible row (no scores were computed for such a call)
    for (int i = tid; i < n_vis; i += kSelThreads) sel[i] = i;
    return;
  }
  const float* s = scores + int64_t(t) * n_cols;
  const int n = int(n_vis);
  const bool cached = n <= cache_keys;
  auto key_at = [&](int i) { return cached ? key_cache[i] : order_key(s[i]); };  // passes after the first

  // Radix select, 8 bits per pass from the top: s_prefix ends as the k-th largest key, s_remaining as the
  // number of rows equal to it that belong to the top k.
  if (tid == 0) s_prefix = 0, s_remaining = p.k;
  uint32_t mask = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = tid; b < 256; b += kSelThreads) hist[b] = 0;
    __syncthreads();
    const uint32_t prefix = s_prefix;
    constexpr int kU = 4;  // first pass: kU independent global loads in flight per thread
    for (int base = 0; base < n; base += kU * kSelThreads) {  // uniform trip count: warp collectives below
      uint32_t key[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int i = base + u * kSelThreads + tid;
        if (shift == 24) {
          key[u] = i < n ? order_key(s[i]) : 0u;
          if (cached && i < n) key_cache[i] = key[u];
        } else {
          key[u] = i < n ? key_at(i) : 0u;
        }
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int i = base + u * kSelThreads + tid;
        const bool active = i < n && (key[u] & mask) == prefix;
        const unsigned bin = (key[u] >> shift) & 255u;
        const unsigned act = __ballot_sync(kFullMask, active);
        if (active) {  // scores cluster in a few bins: one atomic per distinct bin of the warp
          const unsigned peers = __match_any_sync(act, bin);
          if (lane == __ffs(peers) - 1) atomicAdd(&hist[bin], unsigned(__popc(peers)));
        }
      }
    }
    __syncthreads();
    if (warp == 0) {  // find the bin holding the k-th largest: lane l owns bins 8l..8l+7
      const int remaining = s_remaining;
      int own = 0;
#pragma unroll
      for (int b = 0; b < 8; ++b) own += int(hist[8 * lane + b]);
      int incl = own;  // rows in bins of lanes >= lane
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int x = __shfl_down_sync(kFullMask, incl, o);
        if (lane + o < 32) incl += x;
      }
      const int above = incl - own;
      if (above < remaining && remaining <= incl) {
        int cum = above;
        for (int b = 8 * lane + 7; b >= 8 * lane; --b) {
          if (cum + int(hist[b]) >= remaining) {
            s_prefix = prefix | (uint32_t(b) << shift);
            s_remaining = remaining - cum;
            break;
          }
          cum += int(hist[b]);
        }
      }
    }
    mask |= 255u << shift;
    __syncthreads();
  }
  const uint32_t thr = s_prefix;
  const int need_eq = s_remaining;

  // Ordered pass: keep key > thr, and key == thr while fewer than need_eq equal rows came before.
  const unsigned lt = (1u << lane) - 1u;
  int take_base = 0, eq_base = 0;  // identical in every thread
  for (int base = 0; base < n && take_base < p.k; base += kSelThreads) {
    const int i = base + tid;
    const uint32_t key = i < n ? key_at(i) : 0u;
    const bool gt = i < n && key > thr, eq = i < n && key == thr;
    const unsigned bg = __ballot_sync(kFullMask, gt), be = __ballot_sync(kFullMask, eq);
    if (lane == 0) warp_gt[warp] = __popc(bg), warp_eq[warp] = __popc(be);
    __syncthreads();
    int my_take = 0, my_eq = 0;
    int e_run = eq_base, t_run = take_base;
    for (int w = 0; w < kSelThreads / 32; ++w) {
      if (w == warp) my_take = t_run, my_eq = e_run;
      const int ew = warp_eq[w];
      t_run += warp_gt[w] + max(0, min(ew, need_eq - e_run));
      e_run += ew;
    }
    take_base = t_run, eq_base = e_run;
    const bool take = gt || (eq && my_eq + __popc(be & lt) < need_eq);
    const unsigned bt = __ballot_sync(kFullMask, take);
    if (take) sel[my_take + __popc(bt & lt)] = i;
    __syncthreads();  // warp_gt / warp_eq are rewritten by the next pass
  }
}

// ---- fused decode path: scores and selection in one cluster launch (see indexer.h) --------------------------
namespace fused {

constexpr int kCluster = 8;                                    // CTAs per token (portable cluster size)
constexpr int kTilesPerCta = kIndexerFusedMaxRows / (kCluster * itc::kKeys);  // 64-key tiles per CTA: tile rank + 8j
constexpr int kPer = kIndexerFusedMaxRows / itc::kThreads;     // keys per thread in the selection
static_assert(kTilesPerCta * kCluster * itc::kKeys == kIndexerFusedMaxRows && kPer * itc::kThreads ==
                                                                                   kIndexerFusedMaxRows);
constexpr int kWarps = itc::kThreads / 32;
static_assert(itc::kThreads == 256, "the selection zeroes its 256 histogram bins one per thread");

// grid (kCluster, T), cluster (kCluster, 1, 1): one cluster per token. Every CTA scores its tiles into its own
// shared memory (the tensor-core kernel's tile code: the same score bits); CTA 0 gathers all scores over DSMEM
// and selects exactly as indexer_topk_kernel (radix select of the k-th order key, ordered pass with ties to the
// lower row) with its 256 threads holding the <= 1024 keys in registers. No score matrix in global memory and
// one launch instead of two.
__global__ void __cluster_dims__(kCluster, 1, 1) __launch_bounds__(itc::kThreads)
    indexer_fused_kernel(IndexerLaunch p) {
  pdl_trigger();
  pdl_wait();  // PDL (pdl.cuh): every input may come from the previous kernel
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ float own[kTilesPerCta * itc::kKeys];  // this CTA's tiles' scores
  __shared__ uint32_t keys[kIndexerFusedMaxRows];  // CTA 0: every visible row's order key
  __shared__ unsigned hist[256];
  __shared__ int warp_gt[kWarps], warp_eq[kWarps];
  __shared__ uint32_t s_prefix;
  __shared__ int s_remaining;
  const int t = blockIdx.y, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int rank = int(cluster.block_rank());
  const int64_t n_vis = (p.pos0 + t + 1) / p.ratio;
  int32_t* sel = p.sel + int64_t(t) * p.k;
  if (n_vis <= p.k) {  // every visible row; uniform over the cluster, so no CTA waits at a cluster barrier
    if (rank == 0) {
      if (tid == 0 && p.count) p.count[t] = int32_t(n_vis);
      for (int i = tid; i < n_vis; i += itc::kThreads) sel[i] = i;
    }
    return;
  }
  const itc::Smem sm = itc::carve(smem_raw);
  itc::stage_queries(p, t, sm);
  const int64_t n_tiles = (n_vis + itc::kKeys - 1) / itc::kKeys;
  for (int j = 0; j < kTilesPerCta; ++j) {
    const int64_t tile = rank + int64_t(kCluster) * j;
    if (tile >= n_tiles) break;  // uniform over the CTA
    itc::score_tile(p, tile * itc::kKeys, n_vis, sm);
    if (tid < itc::kKeys) own[j * itc::kKeys + tid] = itc::tile_score(sm, tid);
  }
  cluster.sync();  // every CTA's scores written and visible to the cluster
  const int n = int(n_vis);
  if (rank == 0) {
    for (int i = tid; i < n; i += itc::kThreads) {
      const int tile = i / itc::kKeys;
      keys[i] = order_key(cluster.map_shared_rank(own, tile % kCluster)[(tile / kCluster) * itc::kKeys +
                                                                        i % itc::kKeys]);
    }
  }
  cluster.sync();  // CTA 0 is done reading the others' shared memory: they may exit
  if (rank != 0) return;

  uint32_t key[kPer];
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    const int i = u * itc::kThreads + tid;
    key[u] = i < n ? keys[i] : 0u;
  }
  if (tid == 0) {
    s_prefix = 0, s_remaining = p.k;
    if (p.count) p.count[t] = p.k;
  }
  uint32_t mask = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {  // as indexer_topk_kernel: 8 bits per pass from the top
    hist[tid] = 0;  // 256 threads, 256 bins
    __syncthreads();
    const uint32_t prefix = s_prefix;
#pragma unroll
    for (int u = 0; u < kPer; ++u) {
      const int i = u * itc::kThreads + tid;
      const bool active = i < n && (key[u] & mask) == prefix;
      const unsigned bin = (key[u] >> shift) & 255u;
      const unsigned act = __ballot_sync(kFullMask, active);
      if (active) {
        const unsigned peers = __match_any_sync(act, bin);
        if (lane == __ffs(peers) - 1) atomicAdd(&hist[bin], unsigned(__popc(peers)));
      }
    }
    __syncthreads();
    if (warp == 0) {  // the bin holding the k-th largest: lane l owns bins 8l..8l+7
      const int remaining = s_remaining;
      int own_rows = 0;
#pragma unroll
      for (int b = 0; b < 8; ++b) own_rows += int(hist[8 * lane + b]);
      int incl = own_rows;  // rows in bins of lanes >= lane
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int x = __shfl_down_sync(kFullMask, incl, o);
        if (lane + o < 32) incl += x;
      }
      const int above = incl - own_rows;
      if (above < remaining && remaining <= incl) {
        int cum = above;
        for (int b = 8 * lane + 7; b >= 8 * lane; --b) {
          if (cum + int(hist[b]) >= remaining) {
            s_prefix = prefix | (uint32_t(b) << shift);
            s_remaining = remaining - cum;
            break;
          }
          cum += int(hist[b]);
        }
      }
    }
    mask |= 255u << shift;
    __syncthreads();
  }
  const uint32_t thr = s_prefix;
  const int need_eq = s_remaining;

  // Ordered pass: keep key > thr, and key == thr while fewer than need_eq equal rows came before.
  const unsigned lt = (1u << lane) - 1u;
  int take_base = 0, eq_base = 0;  // identical in every thread
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    const int i = u * itc::kThreads + tid;
    const bool gt = i < n && key[u] > thr, eq = i < n && key[u] == thr;
    const unsigned bg = __ballot_sync(kFullMask, gt), be = __ballot_sync(kFullMask, eq);
    if (lane == 0) warp_gt[warp] = __popc(bg), warp_eq[warp] = __popc(be);
    __syncthreads();
    int my_take = 0, my_eq = 0;
    int e_run = eq_base, t_run = take_base;
    for (int w = 0; w < kWarps; ++w) {
      if (w == warp) my_take = t_run, my_eq = e_run;
      const int ew = warp_eq[w];
      t_run += warp_gt[w] + max(0, min(ew, need_eq - e_run));
      e_run += ew;
    }
    take_base = t_run, eq_base = e_run;
    const bool take = gt || (eq && my_eq + __popc(be & lt) < need_eq);
    const unsigned bt = __ballot_sync(kFullMask, take);
    if (take) sel[my_take + __popc(bt & lt)] = i;
    __syncthreads();  // warp_gt / warp_eq are rewritten by the next round
  }
}

}  // namespace fused

size_t smem_bytes(int HI, int dI) {
  return sizeof(float) * (size_t(HI) * dI + size_t(dI) * (kKeys + 1) + kGroups * kKeys + HI);
}

void validate(const IndexerLaunch& p) {
  if (p.T < 0 || p.HI <= 0 || p.dI <= 0 || p.dI > kMaxIdxDim || p.HI > 64 || p.HI * p.dI > kMaxQFloats)
    fail("indexer_cuda: bad shape T=%d HI=%d dI=%d (HI <= 64, dI <= %d, HI*dI <= %d)", p.T, p.HI, p.dI,
         kMaxIdxDim, kMaxQFloats);
  if (p.ratio <= 0 || p.k <= 0 || p.k > kTopkMax)
    fail("indexer_cuda: ratio %d / k %d out of range (k <= %d)", p.ratio, p.k, kTopkMax);
  if (p.impl != IndexerImpl::Auto && p.impl != IndexerImpl::CudaCore && p.impl != IndexerImpl::TensorCore)
    fail("indexer_cuda: unknown impl %d", int(p.impl));
  if (p.max_score_floats < 0) fail("indexer_cuda: max_score_floats %lld < 0", (long long)p.max_score_floats);
}

// Tokens per launch of indexer_select_cuda: as many as keep [tokens, n] scores under the bound (n: the last
// token's visible rows, the widest row of any chunk), at least one. A token's scores and selection depend only on
// its own query, weights and position (every key tile is computed whole by one CTA; the selection is one block per
// token), so chunked launches give the same values as one launch.
int chunk_tokens(const IndexerLaunch& p) {
  const int64_t bound = p.max_score_floats > 0 ? p.max_score_floats : kIndexerMaxScoreFloats;
  const int64_t n = std::max<int64_t>(indexer_max_visible(p), 1);
  return int(std::clamp<int64_t>(bound / n, 1, std::max(p.T, 1)));
}

// One launch pair (scores, then selection) for all of p's tokens.
void select_launch(const IndexerLaunch& p, float* scratch, cudaStream_t stream);

bool use_tensor_cores(const IndexerLaunch& p) {
  const bool fits = p.dI == itc::kD && p.HI <= itc::kHeads;
  if (p.impl == IndexerImpl::TensorCore) {
    if (!fits) fail("indexer_cuda: the tensor-core kernel needs dI == %d and HI <= %d", itc::kD, itc::kHeads);
    return true;
  }
  return p.impl == IndexerImpl::Auto && fits && p.T >= kIndexerTcMinTokens;
}

}  // namespace

void indexer_scores_cuda(const IndexerLaunch& p, float* scores, int64_t n_cols, cudaStream_t stream) {
  validate(p);
  if (p.T == 0 || n_cols <= 0) return;
  if (use_tensor_cores(p)) {
    static const bool attr_set = [] {  // opt-in above 48 KiB of dynamic shared memory, once per process
      check(cudaFuncSetAttribute(itc::indexer_score_tc_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 int(itc::kSmemBytes)),
            "cudaFuncSetAttribute(indexer_score_tc_kernel)");
      return true;
    }();
    (void)attr_set;
    // ~8 CTAs per SM in all (3 fit at once); each stages its token's queries once and loops over key tiles.
    const int64_t n_tiles = (n_cols + itc::kKeys - 1) / itc::kKeys;
    const int64_t per_token = std::max<int64_t>(1, std::min<int64_t>(n_tiles, 1056 / std::max(1, p.T)));
    const dim3 grid(unsigned(per_token), unsigned(p.T));
    launch_pdl("indexer_score_tc_kernel", itc::indexer_score_tc_kernel, grid, dim3(itc::kThreads), itc::kSmemBytes,
               stream, p, scores, n_cols);
    return;
  }
  const int64_t n_tiles = (n_cols + kKeys - 1) / kKeys;
  // ~4 waves of CTAs in total; each CTA stages the token's queries once and loops over its tiles.
  const int64_t per_token = std::max<int64_t>(1, std::min<int64_t>(n_tiles, 528 / std::max(1, p.T)));
  dim3 grid(unsigned(per_token), unsigned(p.T));
  static const bool attr_set = [] {  // opt-in above 48 KiB of dynamic shared memory, once per process
    check(cudaFuncSetAttribute(indexer_score_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               int(smem_bytes(64, kMaxIdxDim))),
          "cudaFuncSetAttribute(indexer_score_kernel)");
    return true;
  }();
  (void)attr_set;
  launch_pdl("indexer_score_kernel", indexer_score_kernel, grid, dim3(kThreads), smem_bytes(p.HI, p.dI), stream, p,
             scores, n_cols);
}

int64_t indexer_scratch_floats(const IndexerLaunch& p) {
  validate(p);
  const int64_t n = indexer_max_visible(p);
  if (n <= p.k) return 0;
  return int64_t(std::min(p.T, chunk_tokens(p))) * n;  // every chunk's [tokens, visible rows] fits
}

bool indexer_fused_applies(const IndexerLaunch& p) {
  static const bool env_on = [] {
    const char* e = std::getenv("DSV4_CUDA_INDEXER_FUSED");
    return !(e && e[0] == '0' && e[1] == 0);
  }();
  const int64_t n = indexer_max_visible(p);
  return env_on && p.fused && p.T > 0 && p.T <= 65535 && p.impl != IndexerImpl::CudaCore && p.dI == itc::kD &&
         p.HI <= itc::kHeads && n > p.k && n <= kIndexerFusedMaxRows;
}

void indexer_select_cuda(const IndexerLaunch& p, float* scratch, cudaStream_t stream) {
  validate(p);
  if (p.T == 0) return;
  if (indexer_fused_applies(p)) {
    static const bool attr_set = [] {  // opt-in above 48 KiB of dynamic shared memory, once per process
      check(cudaFuncSetAttribute(fused::indexer_fused_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 int(itc::kSmemBytes)),
            "cudaFuncSetAttribute(indexer_fused_kernel)");
      return true;
    }();
    (void)attr_set;
    launch_pdl("indexer_fused_kernel", fused::indexer_fused_kernel, dim3(unsigned(fused::kCluster), unsigned(p.T)),
               dim3(itc::kThreads), itc::kSmemBytes, stream, p);
    return;
  }
  const int tc = chunk_tokens(p);
  for (int t0 = 0; t0 < p.T; t0 += tc) {
    IndexerLaunch c = p;
    c.T = std::min(tc, p.T - t0);
    c.pos0 = p.pos0 + t0;
    c.q = p.q + int64_t(t0) * p.HI * p.dI;
    c.w = p.w + int64_t(t0) * p.HI;
    c.sel = p.sel + int64_t(t0) * p.k;
    if (p.count) c.count = p.count + t0;
    select_launch(c, scratch, stream);
  }
}

namespace {

void select_launch(const IndexerLaunch& p, float* scratch, cudaStream_t stream) {
  const int64_t n = indexer_max_visible(p);
  if (n > p.k) {
    if (!scratch) fail("indexer_select_cuda: %lld visible rows > k=%d need scratch", (long long)n, p.k);
    indexer_scores_cuda(p, scratch, n, stream);
  }
  // Keys cached in shared memory up to 32768 rows (128 KiB: contexts up to 128k); longer rows re-read L2.
  static const bool attr_set = [] {
    check(cudaFuncSetAttribute(indexer_topk_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               int(sizeof(uint32_t) * kSelCacheKeys)),
          "cudaFuncSetAttribute(indexer_topk_kernel)");
    return true;
  }();
  (void)attr_set;
  const int cache = n > p.k && n <= kSelCacheKeys ? int(n) : 0;
  launch_pdl("indexer_topk_kernel", indexer_topk_kernel, dim3(unsigned(p.T)), dim3(kSelThreads),
             sizeof(uint32_t) * size_t(cache), stream, p, static_cast<const float*>(scratch), n, cache);
}

}  // namespace

}  // namespace dsv4::cuda
