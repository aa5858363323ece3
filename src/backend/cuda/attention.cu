// Sink attention kernels (see attention.h for the row sets, the work split and the numerics).
#include "backend/cuda/attention.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "backend/cuda/attention_mma.cuh"
#include "backend/cuda/common.cuh"
#include "backend/cuda/cuda_util.h"
#include "backend/cuda/gemv.h"
#include "backend/cuda/pdl.cuh"
#include "common/error.h"

namespace dsv4::cuda {
namespace {

constexpr int kHeadsPerCta = 8;                 // one warp per head in the softmax / PV phase
constexpr int kThreads = kHeadsPerCta * 32;
constexpr int kTile = kAttnTileRows;            // rows per shared-memory tile = lanes of a warp
constexpr int kMaxF4 = kAttnMaxHeadDim / 128;   // float4 accumulators per lane
constexpr int kTargetCtas = 264;                // ~2 waves of 132 SMs: enough to spread a decode token's rows

struct TokenRows {
  int64_t lo;   // first window position
  int n_win;
  int n_comp;
};

__device__ __forceinline__ TokenRows token_rows(const SinkAttnLaunch& p, int t) {
  const int64_t pos = p.pos0 + t;
  TokenRows r;
  r.lo = pos - p.window + 1 > 0 ? pos - p.window + 1 : 0;
  r.n_win = int(pos - r.lo + 1);
  if (p.ratio > 0 && p.comp) {
    const int64_t n = (pos + 1) / p.ratio;
    r.n_comp = int(p.comp_idx && n > p.top_k ? p.top_k : n);
  } else {
    r.n_comp = 0;
  }
  return r;
}

__device__ __forceinline__ const float4* row_ptr(const SinkAttnLaunch& p, int t, const TokenRows& r, int i) {
  if (i < r.n_win) {
    const int64_t q = r.lo + i;
    const float* row = q >= p.pos0 ? p.kv_new + (q - p.pos0) * p.dh : p.ring + (q % p.window) * p.dh;
    return reinterpret_cast<const float4*>(row);
  }
  const int j = i - r.n_win;
  const int64_t k = p.comp_idx ? int64_t(p.comp_idx[int64_t(t) * p.top_k + j]) : int64_t(j);
  return reinterpret_cast<const float4*>(p.comp + k * p.dh);
}

// Output de-rotation of the dim pair (d, d + 1), d even (SinkAttnLaunch::n_rot): row_finish_kernel's inverse
// RoPE expression, so the fused epilogue writes the bits the separate head_prep launch used to.
__device__ __forceinline__ float2 derotate2(const SinkAttnLaunch& p, int64_t pos, int d, float a, float b) {
  const int k = d - (p.dh - p.n_rot);
  if (p.n_rot == 0 || k < 0) return make_float2(a, b);
  double sd, cd;
  sincos(double(pos) * p.omega[k >> 1], &sd, &cd);
  const float c = float(cd), s = -float(sd);
  return make_float2(__fadd_rn(__fmul_rn(a, c), -__fmul_rn(b, s)), __fadd_rn(__fmul_rn(a, s), __fmul_rn(b, c)));
}

// The float4 of dims d .. d + 3 (d % 4 == 0): two pairs.
__device__ __forceinline__ float4 derotate4(const SinkAttnLaunch& p, int64_t pos, int d, float4 v) {
  if (p.n_rot == 0) return v;
  const float2 lo = derotate2(p, pos, d, v.x, v.y), hi = derotate2(p, pos, d + 2, v.z, v.w);
  return make_float4(lo.x, lo.y, hi.x, hi.y);
}

// Q8 output (SinkAttnLaunch::q8) of the float4 v of out at flat element e (e % 4 == 0). The 8 lanes 8i..8i+7
// of a warp hold the 32 consecutive values of one Q8 block (dh % 32 == 0: blocks start at lane 8i and never
// straddle heads). Its amax comes from a 3-step butterfly over those lanes: fmaxf is exact and commutative, so it
// equals q8_split_store_warp's warp_max over the same 32 values; the rest is that helper's rule (d = amax / 127,
// q = roundf(v * (1 / d)), the scale as the f32 of its f16 rounding), hence the bytes of
// quantize_activations_cuda on out. All 32 lanes must call it (shuffles); valid is uniform over each 8-lane group.
__device__ __forceinline__ void q8_store4(const SinkAttnLaunch& p, float4 v, bool valid, int64_t e) {
  float amax = valid ? fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w))) : 0.0f;
  amax = fmaxf(amax, __shfl_xor_sync(kFullMask, amax, 1));
  amax = fmaxf(amax, __shfl_xor_sync(kFullMask, amax, 2));
  amax = fmaxf(amax, __shfl_xor_sync(kFullMask, amax, 4));
  if (!valid) return;
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  const int64_t cols = p.q8_cols, row = e / cols, c = e - row * cols;
  uint8_t* arow = static_cast<uint8_t*>(p.q8) + row * (cols + cols / 8);
  *reinterpret_cast<char4*>(arow + c) = make_char4(int8_t(roundf(v.x * id)), int8_t(roundf(v.y * id)),
                                                   int8_t(roundf(v.z * id)), int8_t(roundf(v.w * id)));
  if ((c & 31) == 0) reinterpret_cast<float*>(arow + cols)[c >> 5] = f16_to_f32(f32_to_f16(d));
}

// Fused window_store of a one-token call (SinkAttnLaunch::ring_out): one CTA copies kv_new[0] into slot
// pos0 mod window. No CTA of the call reads that slot (it holds position pos0 - window, outside the window).
__device__ __forceinline__ void store_ring_row(const SinkAttnLaunch& p) {
  if (!p.ring_out || blockIdx.x != 0 || blockIdx.y != 0 || blockIdx.z != 0) return;
  const float4* src = reinterpret_cast<const float4*>(p.kv_new);
  float4* dst = reinterpret_cast<float4*>(p.ring_out + (p.pos0 % p.window) * p.dh);
  for (int i = threadIdx.x; i < p.dh / 4; i += blockDim.x) dst[i] = src[i];
}

__device__ __forceinline__ float dot4(float4 a, float4 b) { return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w; }
__device__ __forceinline__ void fma4(float4& acc, float w, float4 v) {
  acc.x += w * v.x, acc.y += w * v.y, acc.z += w * v.z, acc.w += w * v.w;
}

// The 4 rows (warp + 8j, j < 4) of a tile that warp `warp` loads: all index and row loads issued at once.
__device__ __forceinline__ void load_tile_rows(const SinkAttnLaunch& p, int t, const TokenRows& tr, int base,
                                               int r_end, int warp, int lane, float4 (&v)[4][kMaxF4]) {
  const float4* rp[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int i = base + warp + 8 * j;
    rp[j] = i < r_end ? row_ptr(p, t, tr, i) : nullptr;
  }
  const int dh4 = p.dh / 4;
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int k = 0; k < kMaxF4; ++k) {
      const int c = lane + 32 * k;
      v[j][k] = rp[j] && c < dh4 ? __ldg(rp[j] + c) : make_float4(0.f, 0.f, 0.f, 0.f);
    }
}

// One step of the transposing butterfly: the lane keeps the half of d[0 .. 2*kHalf) selected by bit kHalf of
// its id and adds the partner lane's copy of that half (a template so every index is a constant: registers).
template <int kHalf>
__device__ __forceinline__ void butterfly_step(float (&d)[kHeadsPerCta * 4], int lane) {
  const bool upper = (lane & kHalf) != 0;
#pragma unroll
  for (int i = 0; i < kHalf; ++i) {
    const float send = upper ? d[i] : d[i + kHalf];
    const float keep = upper ? d[i + kHalf] : d[i];
    d[i] = keep + __shfl_xor_sync(kFullMask, send, kHalf);
  }
}

// grid (T, ceil(H/8), n_split). Shared: q [8][dh] | tile [32][dh] | scores/probabilities [8][32].
// Warp w loads tile rows w, w+8, w+16, w+24 (the next tile's while the current one is consumed) and dots them
// with the 8 heads' queries; the 32 (head, row) partial sums of a lane are reduced across the warp by a
// transposing butterfly (31 shuffles, lane l ends with pair l) instead of 32 separate warp sums.
// Split arrival counters of the last-CTA combine (SinkAttnLaunch::split_ticket): one per (token, head group),
// zero between launches (the last CTA of a slot resets its counter). Process-wide: two split launches running
// concurrently on different streams must not both use them (the backend runs attention on its one stream).
constexpr int kTicketSlots = 512;
// One CTA per head group combines: it reads 8 heads x splits x dh floats alone (a 20-split CSA decode at 2k:
// 320 KiB through one SM's L2 port, ~3 us), while the combine kernel spreads them over T x H CTAs. Up to 8 splits
// (HCA and sliding decode at 2k: 5 and 2 splits, <= 128 KiB) the saved launch should outweigh that.
constexpr int kTicketMaxSplits = 8;
__device__ unsigned g_split_tickets[kTicketSlots];

// The combine of sink_attn_combine_kernel for head h by one warp, the same float operations in the same order
// (so the same bits): w holds 2 * n_split floats of this warp's shared memory. Partials are read with
// ld.global.cg: other SMs wrote them during this kernel and this SM's L1 may hold older lines of the scratch.
__device__ __forceinline__ void combine_head_warp(const SinkAttnLaunch& p, int n_split, const float* part, int t,
                                                  int h, int lane, float* w) {
  const int dh4 = p.dh / 4;
  const int64_t th = int64_t(t) * p.H + h, stride = int64_t(p.T) * p.H;
  const float* ms = part + int64_t(n_split) * p.T * p.H * p.dh;
  const float sink = p.sinks[h];
  for (int c = lane; c < n_split; c += 32) {
    w[c] = __ldcg(ms + 2 * (c * stride + th));
    w[n_split + c] = __ldcg(ms + 2 * (c * stride + th) + 1);
  }
  __syncwarp();
  float M = sink;
  for (int c = 0; c < n_split; ++c) M = fmaxf(M, w[c]);
  __syncwarp();  // every lane has read the maxima before they are replaced by weights
  for (int c = lane; c < n_split; c += 32) {
    const float mc = w[c];
    w[c] = mc == -INFINITY ? 0.0f : expf(mc - M);  // a split without rows weighs nothing
  }
  __syncwarp();
  float den = expf(sink - M);
  for (int c = 0; c < n_split; ++c) den += w[c] * w[n_split + c];
  const float f = 1.0f / den;
  // Splits outer, the lane's dh/128 float4 inner: kMaxF4 independent loads per split in flight (each output
  // element still sums the splits in ascending order, as the combine kernel).
  float4 o[kMaxF4];
#pragma unroll
  for (int k = 0; k < kMaxF4; ++k) o[k] = make_float4(0.f, 0.f, 0.f, 0.f);
  const float4* src = reinterpret_cast<const float4*>(part) + th * dh4 + lane;
#pragma unroll 2
  for (int c = 0; c < n_split; ++c) {
    const float wc = w[c];  // the same in every lane: a uniform branch
    if (wc == 0.0f) continue;
#pragma unroll
    for (int k = 0; k < kMaxF4; ++k)
      if (lane + 32 * k < dh4) fma4(o[k], wc, __ldcg(src + c * stride * dh4 + 32 * k));
  }
#pragma unroll
  for (int k = 0; k < kMaxF4; ++k) {
    const int j = lane + 32 * k;
    if (j < dh4)
      reinterpret_cast<float4*>(p.out)[th * dh4 + j] =
          derotate4(p, p.pos0 + t, 4 * j, make_float4(o[k].x * f, o[k].y * f, o[k].z * f, o[k].w * f));
  }
}

// One warp's split partial of head slot `slot` = (split * T + t) * H + h: the unnormalized accumulator, and from
// lane 0 the split's (max, sum) after all gridDim.z splits' accumulators (the layout combine_head_warp and
// sink_attn_combine_kernel read). Shared by the ticket and the combine-kernel paths of sink_attn_kernel.
__device__ __forceinline__ void store_split_partial(const SinkAttnLaunch& p, float* part, int64_t slot, int dh4,
                                                    int lane, const float4 (&acc)[kMaxF4], float m, float s) {
  float4* o = reinterpret_cast<float4*>(part) + slot * dh4;
#pragma unroll
  for (int k = 0; k < kMaxF4; ++k) {
    const int j = lane + 32 * k;
    if (j < dh4) o[j] = acc[k];
  }
  if (lane == 0) {
    float* ms = part + int64_t(gridDim.z) * p.T * p.H * p.dh;
    ms[2 * slot] = m;
    ms[2 * slot + 1] = s;
  }
}

__global__ void __launch_bounds__(kThreads, 2) sink_attn_kernel(SinkAttnLaunch p, int rows_per_split, float* part,
                                                                 int ticket) {
  pdl_trigger();
  pdl_wait();  // PDL (pdl.cuh): every input may come from the previous kernel
  extern __shared__ float4 smem4[];
  const int dh4 = p.dh / 4;
  float4* qs = smem4;
  float4* tile = qs + kHeadsPerCta * dh4;
  float* sc = reinterpret_cast<float*>(tile + kTile * dh4);
  const int t = blockIdx.x, h0 = blockIdx.y * kHeadsPerCta, split = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int nh = min(kHeadsPerCta, p.H - h0);

  const TokenRows tr = token_rows(p, t);
  const int n_rows = tr.n_win + tr.n_comp;
  const int r_begin = split * rows_per_split;
  const int r_end = min(n_rows, r_begin + rows_per_split);
  float4 v[4][kMaxF4];
  load_tile_rows(p, t, tr, r_begin, r_end, warp, lane, v);  // in flight while q is staged

  const float4* q4 = reinterpret_cast<const float4*>(p.q) + (int64_t(t) * p.H + h0) * dh4;
  for (int i = threadIdx.x; i < kHeadsPerCta * dh4; i += kThreads)
    qs[i] = i / dh4 < nh ? q4[i] : make_float4(0.f, 0.f, 0.f, 0.f);

  float4 acc[kMaxF4];
#pragma unroll
  for (int k = 0; k < kMaxF4; ++k) acc[k] = make_float4(0.f, 0.f, 0.f, 0.f);
  float m = -INFINITY, s = 0.0f;  // running max and sum of head h0 + warp (every lane holds them)

  for (int base = r_begin; base < r_end; base += kTile) {
    __syncthreads();  // q staged / previous tile consumed
    float d[kHeadsPerCta * 4];  // d[h * 4 + j]: this lane's part of head h . row warp + 8j
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int k = 0; k < kMaxF4; ++k) {
        const int c = lane + 32 * k;
        if (c < dh4) tile[(warp + 8 * j) * dh4 + c] = v[j][k];
      }
#pragma unroll
    for (int i = 0; i < kHeadsPerCta * 4; ++i) d[i] = 0.0f;
#pragma unroll
    for (int h = 0; h < kHeadsPerCta; ++h)
#pragma unroll
      for (int k = 0; k < kMaxF4; ++k) {
        const int c = lane + 32 * k;
        if (c < dh4) {
          const float4 qv = qs[h * dh4 + c];
#pragma unroll
          for (int j = 0; j < 4; ++j) d[h * 4 + j] += dot4(v[j][k], qv);
        }
      }
    // Transposing butterfly: after the step of offset o, a lane keeps the half of its values selected by bit o
    // of its lane id and adds the partner's copy of that half; at the end lane l holds the full sum of pair l.
    butterfly_step<16>(d, lane);
    butterfly_step<8>(d, lane);
    butterfly_step<4>(d, lane);
    butterfly_step<2>(d, lane);
    butterfly_step<1>(d, lane);
    {
      const int h = lane >> 2, rr = warp + 8 * (lane & 3);
      sc[h * kTile + rr] = base + rr < r_end ? p.scale * d[0] : -INFINITY;
    }
    if (base + kTile < r_end) load_tile_rows(p, t, tr, base + kTile, r_end, warp, lane, v);  // next tile
    __syncthreads();
    // Online softmax of this tile for head h0 + warp: lane = tile row.
    const float l = sc[warp * kTile + lane];
    const float m_new = fmaxf(m, warp_max(l));
    const float alpha = m == -INFINITY ? 0.0f : expf(m - m_new);
    const float pr = l == -INFINITY ? 0.0f : expf(l - m_new);
    s = s * alpha + warp_sum(pr);
    m = m_new;
    sc[warp * kTile + lane] = pr;
    __syncwarp();
#pragma unroll
    for (int k = 0; k < kMaxF4; ++k) acc[k].x *= alpha, acc[k].y *= alpha, acc[k].z *= alpha, acc[k].w *= alpha;
    const int n_tile = min(kTile, r_end - base);
    for (int r = 0; r < n_tile; ++r) {
      const float w = sc[warp * kTile + r];
#pragma unroll
      for (int k = 0; k < kMaxF4; ++k) {
        const int j = lane + 32 * k;
        if (j < dh4) fma4(acc[k], w, tile[r * dh4 + j]);
      }
    }
  }

  store_ring_row(p);  // here, not at the start: there the tile loads' 64 registers are live (ptxas spilled)
  if (ticket) {  // last-CTA combine: no warp may return before the CTA's arrival is counted
    if (warp < nh) {
      store_split_partial(p, part, (int64_t(split) * p.T + t) * p.H + h0 + warp, dh4, lane, acc, m, s);
    }
    __threadfence();  // this thread's partial is visible device-wide before the arrival below
    __syncthreads();
    __shared__ int s_last;
    if (threadIdx.x == 0) {
      unsigned* cnt = g_split_tickets + int64_t(t) * gridDim.y + blockIdx.y;
      const bool last = atomicAdd(cnt, 1u) == gridDim.z - 1;
      if (last) *cnt = 0u;  // every split has arrived: ready for the next launch
      s_last = last;
    }
    __syncthreads();
    if (!s_last) return;
    __threadfence();  // acquire side: the other splits' partials, counted above, are read after this
    if (warp < nh) {
      float* w = reinterpret_cast<float*>(tile) + warp * 2 * int(gridDim.z);  // the tile is no longer read
      combine_head_warp(p, int(gridDim.z), part, t, h0 + warp, lane, w);
    }
    return;
  }
  if (warp >= nh) return;
  const int h = h0 + warp;
  if (gridDim.z == 1) {  // the only split: add the sink and normalize here
    const float sink = p.sinks[h];
    const float M = fmaxf(m, sink);
    const float a = m == -INFINITY ? 0.0f : expf(m - M);
    const float f = a / (s * a + expf(sink - M));
    float4* o = reinterpret_cast<float4*>(p.out) + (int64_t(t) * p.H + h) * dh4;
#pragma unroll
    for (int k = 0; k < kMaxF4; ++k) {
      const int j = lane + 32 * k;
      if (j < dh4)
        o[j] = derotate4(p, p.pos0 + t, 4 * j,
                         make_float4(acc[k].x * f, acc[k].y * f, acc[k].z * f, acc[k].w * f));
    }
    return;
  }
  // Partial: unnormalized accumulator + (max, sum) of this split.
  store_split_partial(p, part, (int64_t(split) * p.T + t) * p.H + h, dh4, lane, acc, m, s);
}

// grid T*H, block dh/4 threads, dynamic shared memory 2 * n_split floats:
// out = sum_c e^(m_c - M) acc_c / (e^(sink - M) + sum_c e^(m_c - M) s_c). The splits' (max, sum) are staged in
// shared memory first (one parallel load), so the partial loads that follow are independent of each other.
__global__ void sink_attn_combine_kernel(SinkAttnLaunch p, int n_split, const float* part) {
  pdl_trigger();
  pdl_wait();  // PDL (pdl.cuh): every input may come from the previous kernel
  extern __shared__ float wsum[];  // [n_split] weights e^(m_c - M), then [n_split] sums s_c
  __shared__ float s_den;
  const int64_t th = blockIdx.x;  // t * H + h
  const int h = int(th % p.H);
  const int dh4 = p.dh / 4, j = threadIdx.x;
  const float* ms = part + int64_t(n_split) * p.T * p.H * p.dh;
  const int64_t stride = int64_t(p.T) * p.H;
  const float sink = p.sinks[h];
  for (int c = j; c < n_split; c += blockDim.x) {
    wsum[c] = ms[2 * (c * stride + th)];
    wsum[n_split + c] = ms[2 * (c * stride + th) + 1];
  }
  __syncthreads();
  float M = sink;
  for (int c = 0; c < n_split; ++c) M = fmaxf(M, wsum[c]);
  __syncthreads();  // every thread has read the maxima before they are replaced by weights
  for (int c = j; c < n_split; c += blockDim.x) {
    const float mc = wsum[c];
    wsum[c] = mc == -INFINITY ? 0.0f : expf(mc - M);  // a split without rows weighs nothing
  }
  __syncthreads();
  if (j == 0) {
    float den = expf(sink - M);
    for (int c = 0; c < n_split; ++c) den += wsum[c] * wsum[n_split + c];
    s_den = den;
  }
  float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
  if (j < dh4) {
#pragma unroll 4
    for (int c = 0; c < n_split; ++c) {
      const float w = wsum[c];
      if (w != 0.0f) fma4(o, w, reinterpret_cast<const float4*>(part)[(c * stride + th) * dh4 + j]);
    }
  }
  __syncthreads();
  const float f = 1.0f / s_den;
  const float4 r = j < dh4 ? derotate4(p, p.pos0 + th / p.H, 4 * j, make_float4(o.x * f, o.y * f, o.z * f, o.w * f))
                           : make_float4(0.f, 0.f, 0.f, 0.f);
  if (j < dh4) reinterpret_cast<float4*>(p.out)[th * dh4 + j] = r;
  if (p.q8) q8_store4(p, r, j < dh4, th * p.dh + 4 * j);  // every thread of the block gets here (no return above)
}

// ---- tensor-core path (SinkAttnImpl::TensorCore; numerics in attention.h) ---------------------------------
namespace tc {
using namespace tcore;

constexpr int kDh = 512;
constexpr int kHeads = 64;                // query rows of a CTA: the heads of one token (zero-padded)
constexpr int kRows = 32;                 // K = V rows per tile
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
// Shared rows are padded by 8 halves (16 bytes): consecutive rows start 4 banks apart, so the 8 row addresses of
// an ldmatrix phase cover all 32 banks once (unpadded 1 KiB rows would all hit the same bank: 8-way conflicts).
constexpr int kQStride = kDh + 8;         // halves
constexpr int kPStride = kRows + 8;       // halves
constexpr int kSStride = kRows + 1;       // floats
constexpr size_t kSmemBytes = sizeof(__half) * (2 * kHeads * kQStride + 2 * kRows * kQStride +
                                                2 * kHeads * kPStride) +
                              sizeof(float) * (kHeads * kSStride + 3 * kHeads);

// grid (T, ceil(H / 64)), kThreads threads, kSmemBytes of shared memory. Per 32-row tile:
//   load    rows (window / compressed, gathered) -> fp16 hi/lo in shared memory
//   scores  warp w: heads 16(w%4).., rows 16(w/4)..: S = scale * Q K^T, masked past the token's rows
//   softmax warp w: heads 8w..8w+7, lane = row: online max / sum per head, P = exp(S - m) as hi/lo
//   values  warp w: heads 16(w%4).., dims 256(w/4)..: O = alpha O + P V (V = the same tile: K = V)
// and the sink joins at the end as in the CUDA-core kernel.
__global__ void __launch_bounds__(kThreads, 1) sink_attn_tc_kernel(SinkAttnLaunch p) {
  pdl_trigger();
  pdl_wait();  // PDL (pdl.cuh): every input may come from the previous kernel
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __half* qh = reinterpret_cast<__half*>(smem_raw);
  __half* ql = qh + kHeads * kQStride;
  __half* kh = ql + kHeads * kQStride;
  __half* kl = kh + kRows * kQStride;
  __half* ph = kl + kRows * kQStride;
  __half* pl = ph + kHeads * kPStride;
  float* s_sc = reinterpret_cast<float*>(pl + kHeads * kPStride);
  float* s_m = s_sc + kHeads * kSStride;
  float* s_l = s_m + kHeads;
  float* s_alpha = s_l + kHeads;

  const int t = blockIdx.x, h0 = blockIdx.y * kHeads;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, c4 = lane & 3;  // mma fragment coordinates: row group, column pair
  const int nh = min(kHeads, p.H - h0);
  constexpr int kDh4 = kDh / 4;

  const float4* q4 = reinterpret_cast<const float4*>(p.q) + (int64_t(t) * p.H + h0) * kDh4;
  for (int i = tid; i < kHeads * kDh4; i += kThreads) {
    const int r = i / kDh4, c = i % kDh4;
    const float4 v = r < nh ? q4[i] : make_float4(0.f, 0.f, 0.f, 0.f);
    store_split4(v, qh + r * kQStride + 4 * c, ql + r * kQStride + 4 * c);
  }
  if (tid < kHeads) s_m[tid] = -INFINITY, s_l[tid] = 0.0f;

  const TokenRows tr = token_rows(p, t);
  const int n_rows = tr.n_win + tr.n_comp;
  const int mt = warp & 3, wq = warp >> 2;  // m tile (16 heads); half of the tile's rows / of the dims

  // Per-lane ldmatrix row addresses (x4: lanes 8j..8j+7 address the rows of 8x8 matrix j).
  const int a_row = 16 * mt + (lane & 7) + 8 * ((lane >> 3) & 1), a_col = 8 * (lane >> 4);
  const uint32_t qh_a = smem_u32(qh + a_row * kQStride + a_col), ql_a = smem_u32(ql + a_row * kQStride + a_col);
  const uint32_t ph_a = smem_u32(ph + a_row * kPStride + a_col), pl_a = smem_u32(pl + a_row * kPStride + a_col);
  const int b_row = 16 * wq + (lane & 7) + 8 * (lane >> 4), b_col = 8 * ((lane >> 3) & 1);
  const uint32_t kh_b = smem_u32(kh + b_row * kQStride + b_col), kl_b = smem_u32(kl + b_row * kQStride + b_col);
  const int v_row = (lane & 7) + 8 * ((lane >> 3) & 1), v_col = 256 * wq + 8 * (lane >> 4);
  const uint32_t kh_v = smem_u32(kh + v_row * kQStride + v_col), kl_v = smem_u32(kl + v_row * kQStride + v_col);

  float acc[32][4];
#pragma unroll
  for (int n = 0; n < 32; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;

  for (int base = 0; base < n_rows; base += kRows) {
    __syncthreads();  // Q staged / previous tile's values and probabilities consumed
    {
      const int col = tid % kDh4, r0 = tid / kDh4;  // 2 rows per pass of 256 threads
      float4 v[kRows / 2];
#pragma unroll
      for (int j = 0; j < kRows / 2; ++j) {  // all loads issued before any conversion: one latency per tile
        const int rr = r0 + 2 * j, i = base + rr;
        v[j] = i < n_rows ? __ldg(row_ptr(p, t, tr, i) + col) : make_float4(0.f, 0.f, 0.f, 0.f);
      }
#pragma unroll
      for (int j = 0; j < kRows / 2; ++j) {
        const int rr = r0 + 2 * j;
        store_split4(v[j], kh + rr * kQStride + 4 * col, kl + rr * kQStride + 4 * col);
      }
    }
    __syncthreads();
    {  // scores: 16 heads x 16 rows per warp, k = 512
      // Four accumulator sets (hi*hi / the two lo terms, even / odd k steps) keep the dependent mma chains a
      // quarter as long: the phase is latency-bound with only 8 warps per SM.
      float sh[2][2][4] = {}, sx[2][2][4] = {};
#pragma unroll 4
      for (int k0 = 0; k0 < kDh; k0 += 16) {
        const int par = (k0 >> 4) & 1;
        uint32_t ah[4], al[4], bh[4], bl[4];
        ldsm_x4(ah, qh_a + 2 * k0);
        ldsm_x4(al, ql_a + 2 * k0);
        ldsm_x4(bh, kh_b + 2 * k0);
        ldsm_x4(bl, kl_b + 2 * k0);
#pragma unroll
        for (int n = 0; n < 2; ++n) {
          mma(sh[par][n], ah, bh[2 * n], bh[2 * n + 1]);
          mma(sx[par][n], al, bh[2 * n], bh[2 * n + 1]);
          mma(sx[par][n], ah, bl[2 * n], bl[2 * n + 1]);
        }
      }
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = 16 * mt + g + 8 * (e >> 1), c = 16 * wq + 8 * n + 2 * c4 + (e & 1);
          const float dot = (sh[0][n][e] + sh[1][n][e]) + (sx[0][n][e] + sx[1][n][e]);
          s_sc[r * kSStride + c] = base + c < n_rows ? p.scale * dot : -INFINITY;
        }
    }
    __syncthreads();
    // Online softmax, head r = 8 * warp + i, lane = row of the tile (the tile has >= 1 valid row).
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int r = 8 * warp + i;
      const float s = s_sc[r * kSStride + lane];
      const float m_old = s_m[r];
      const float m_new = fmaxf(m_old, warp_max(s));
      const float alpha = m_old == -INFINITY ? 0.0f : expf(m_old - m_new);
      const float pr = s == -INFINITY ? 0.0f : expf(s - m_new);
      const float sum = warp_sum(pr);  // every lane has read s_m[r] before lane 0 rewrites it below
      const __half h = __float2half_rn(pr);
      ph[r * kPStride + lane] = h;
      pl[r * kPStride + lane] = __float2half_rn(pr - __half2float(h));
      if (lane == 0) s_m[r] = m_new, s_l[r] = s_l[r] * alpha + sum, s_alpha[r] = alpha;
    }
    __syncthreads();
    {  // values: 16 heads x 256 dims per warp, k = 32 rows
      const float a0 = s_alpha[16 * mt + g], a1 = s_alpha[16 * mt + g + 8];
#pragma unroll
      for (int n = 0; n < 32; ++n) acc[n][0] *= a0, acc[n][1] *= a0, acc[n][2] *= a1, acc[n][3] *= a1;
#pragma unroll
      for (int k0 = 0; k0 < kRows; k0 += 16) {
        uint32_t ah[4], al[4];
        ldsm_x4(ah, ph_a + 2 * k0);
        ldsm_x4(al, pl_a + 2 * k0);
#pragma unroll
        for (int n = 0; n < 16; ++n) {
          uint32_t vh[4], vl[4];
          ldsm_x4_trans(vh, kh_v + 2 * (k0 * kQStride + 16 * n));
          ldsm_x4_trans(vl, kl_v + 2 * (k0 * kQStride + 16 * n));
          mma3(acc[2 * n], ah, al, vh[0], vh[1], vl[0], vl[1]);
          mma3(acc[2 * n + 1], ah, al, vh[2], vh[3], vl[2], vl[3]);
        }
      }
    }
  }

  // out = acc * e^(m - M) / (l e^(m - M) + e^(sink - M)), M = max(m, sink). s_m / s_l were last written before
  // the final __syncthreads of the loop.
#pragma unroll
  for (int e2 = 0; e2 < 2; ++e2) {
    const int r = 16 * mt + g + 8 * e2;
    if (r >= nh) continue;
    const int h = h0 + r;
    const float m = s_m[r], l = s_l[r], sink = p.sinks[h];
    const float M = fmaxf(m, sink);
    const float a = m == -INFINITY ? 0.0f : expf(m - M);
    const float f = a / (l * a + expf(sink - M));
    float* o = p.out + (int64_t(t) * p.H + h) * kDh;
    const int d0 = 256 * wq + 2 * c4;
#pragma unroll
    for (int n = 0; n < 32; ++n)
      *reinterpret_cast<float2*>(o + d0 + 8 * n) =
          derotate2(p, p.pos0 + t, d0 + 8 * n, acc[n][2 * e2] * f, acc[n][2 * e2 + 1] * f);
  }
}

}  // namespace tc

int64_t max_rows(const SinkAttnLaunch& p) {
  int64_t n = std::min<int64_t>(p.window, p.pos0 + p.T);
  if (p.ratio > 0 && p.comp) {
    const int64_t c = (p.pos0 + p.T) / p.ratio;
    n += p.comp_idx ? std::min<int64_t>(c, p.top_k) : c;
  }
  return n;
}

// Rows per split: one split when tokens x head groups already fill the GPU, else enough splits of >= 32 rows
// to reach ~kTargetCtas CTAs.
int rows_per_split(const SinkAttnLaunch& p) {
  const int64_t n = std::max<int64_t>(max_rows(p), 1);
  if (p.rows_per_split > 0) return p.rows_per_split;
  // DSV4_CUDA_ATTN_CTAS (A/B): the CTA count to split toward instead of kTargetCtas. Read once.
  static const int64_t target = [] {
    const char* e = std::getenv("DSV4_CUDA_ATTN_CTAS");
    const long v = e && *e ? std::strtol(e, nullptr, 10) : 0;
    return v > 0 ? int64_t(v) : int64_t(kTargetCtas);
  }();
  const int64_t ctas = int64_t(p.T) * ((p.H + kHeadsPerCta - 1) / kHeadsPerCta);
  if (ctas >= target) return int((n + kTile - 1) / kTile * kTile);
  const int64_t want = std::min<int64_t>((target + ctas - 1) / ctas, (n + kTile - 1) / kTile);
  const int64_t per = (n + want - 1) / want;
  return int((per + kTile - 1) / kTile * kTile);
}

void validate(const SinkAttnLaunch& p) {
  if (p.T < 0 || p.H <= 0 || p.dh <= 0 || p.dh % 4 != 0 || p.dh > kAttnMaxHeadDim)
    fail("sink_attention_cuda: bad shape T=%d H=%d dh=%d (dh must be a multiple of 4, <= %d)", p.T, p.H, p.dh,
         kAttnMaxHeadDim);
  if (p.window <= 0 || !p.kv_new || (p.pos0 > 0 && !p.ring))
    fail("sink_attention_cuda: window %d needs kv_new rows (and the ring once pos0 > 0)", p.window);
  if (p.comp_idx && (!p.comp || p.top_k <= 0 || p.ratio <= 0))
    fail("sink_attention_cuda: selected compressed rows need comp, top_k > 0 and ratio > 0");
  if (p.rows_per_split < 0 || p.rows_per_split % kTile != 0)
    fail("sink_attention_cuda: rows_per_split %d must be a multiple of %d", p.rows_per_split, kTile);
  if (p.impl != SinkAttnImpl::Auto && p.impl != SinkAttnImpl::CudaCore && p.impl != SinkAttnImpl::TensorCore)
    fail("sink_attention_cuda: unknown impl %d", int(p.impl));
  if (p.n_rot < 0 || p.n_rot % 2 != 0 || p.n_rot / 2 > kAttnMaxRotPairs || p.n_rot > p.dh)
    fail("sink_attention_cuda: de-rotation of %d dims (even, <= %d and <= dh %d)", p.n_rot, 2 * kAttnMaxRotPairs,
         p.dh);
  if (p.impl == SinkAttnImpl::TensorCore && p.dh != tc::kDh)
    fail("sink_attention_cuda: the tensor-core kernel needs dh == %d (got %d)", tc::kDh, p.dh);
  if (p.q8 && (p.dh % 32 != 0 || !q8_split_supported(p.q8_cols) || (int64_t(p.T) * p.H * p.dh) % p.q8_cols != 0))
    fail("sink_attention_cuda: Q8 output rows of %lld columns need dh %% 32 == 0 (dh %d), columns %% 256 == 0 and "
         "dividing T*H*dh", (long long)p.q8_cols, p.dh);
}

bool use_tensor_cores(const SinkAttnLaunch& p) {
  if (p.impl == SinkAttnImpl::TensorCore) return true;
  return p.impl == SinkAttnImpl::Auto && p.dh == tc::kDh && p.T >= kAttnTcMinTokens;
}

void launch_kernels(const SinkAttnLaunch& p, float* scratch, cudaStream_t stream);

// The last-CTA combine instead of sink_attn_combine_kernel (SinkAttnLaunch::split_ticket): several splits, the
// slots and per-warp weights fit, and DSV4_CUDA_ATTN_TICKET=1 turns it on (read per call: tests switch it; graph
// replays do not call it). Opt-in: the separate combine kernel measured faster end to end (H200, 3977003, Flash q2
// decode at 2k: 119.5 t/s without the ticket vs 116.3 with it, same call).
bool use_split_ticket(const SinkAttnLaunch& p, int ns) {
  const char* e = std::getenv("DSV4_CUDA_ATTN_TICKET");
  const bool env_on = e && e[0] == '1' && e[1] == 0;
  const int64_t slots = int64_t(p.T) * ((p.H + kHeadsPerCta - 1) / kHeadsPerCta);
  return env_on && p.split_ticket && ns > 1 && ns <= kTicketMaxSplits && slots <= kTicketSlots &&
         2 * kHeadsPerCta * ns <= kTile * p.dh;  // per-warp weights in the freed tile
}

int n_splits(const SinkAttnLaunch& p) {
  const int64_t rps = rows_per_split(p);
  return int(std::max<int64_t>(1, (max_rows(p) + rps - 1) / rps));
}

}  // namespace

bool sink_attention_uses_split_ticket(const SinkAttnLaunch& p) {
  validate(p);
  return p.T > 0 && !use_tensor_cores(p) && use_split_ticket(p, n_splits(p));
}

int64_t sink_attention_scratch_floats(const SinkAttnLaunch& p) {
  validate(p);
  if (use_tensor_cores(p)) return 0;
  const int ns = n_splits(p);
  if (ns <= 1) return 0;
  return int64_t(ns) * p.T * p.H * (p.dh + 2);
}

void window_store_cuda(float* ring, int W, int dim, const float* kv, int T, int64_t p0, cudaStream_t stream) {
  if (T <= 0 || W <= 0) return;
  const int n = std::min(T, W);
  const int t0 = T - n;
  const int slot0 = int((p0 + t0) % W);
  const int first = std::min(n, W - slot0);  // the last n tokens' slots are consecutive modulo W
  const size_t row = size_t(dim) * sizeof(float);
  check(cudaMemcpyAsync(ring + int64_t(slot0) * dim, kv + int64_t(t0) * dim, size_t(first) * row,
                        cudaMemcpyDeviceToDevice, stream), "window_store");
  if (first < n)
    check(cudaMemcpyAsync(ring, kv + int64_t(t0 + first) * dim, size_t(n - first) * row, cudaMemcpyDeviceToDevice,
                          stream), "window_store (wrap)");
}

void sink_attention_cuda(const SinkAttnLaunch& p_in, float* scratch, cudaStream_t stream) {
  SinkAttnLaunch p = p_in;
  validate(p);
  if (p.T == 0) return;
  if (p.scale == 0.0f) p.scale = float(1.0 / std::sqrt(double(p.dh)));
  // The ring store rides in the attention kernel only for one token on the CUDA-core path (see attention.h).
  float* const ring_after = p.ring_out && (p.T != 1 || use_tensor_cores(p)) ? p.ring_out : nullptr;
  if (ring_after) p.ring_out = nullptr;
  launch_kernels(p, scratch, stream);
  if (ring_after) window_store_cuda(ring_after, p.window, p.dh, p.kv_new, p.T, p.pos0, stream);
}

namespace {

// SinkAttnLaunch::q8 where the combine kernel does not write out: the rows by a quantize launch after the kernel.
// Only the combine kernel quantizes in its epilogue (decode: every Flash layer at 2k has 4..20 splits). In
// sink_attn_kernel's own epilogues (one split; the opt-in last-CTA combine) the quantize code made ptxas spill more
// in the kernel that does the attention work (128 registers at 2 CTAs/SM: 32/56 -> 52/112 spill bytes), and the
// tensor-core kernel's outputs are spread over mma fragments (prefill sizes).
void quantize_after(const SinkAttnLaunch& p, cudaStream_t stream) {
  if (p.q8)
    quantize_activations_cuda(QType::Q8_0, p.out, int64_t(p.T) * p.H * p.dh / p.q8_cols, p.q8_cols, p.q8, stream,
                              GemvLayout::Q8Split);
}

void launch_kernels(const SinkAttnLaunch& p, float* scratch, cudaStream_t stream) {
  if (use_tensor_cores(p)) {
    static const bool tc_attr_set = [] {
      check(cudaFuncSetAttribute(tc::sink_attn_tc_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 int(tc::kSmemBytes)),
            "cudaFuncSetAttribute(sink_attn_tc_kernel)");
      return true;
    }();
    (void)tc_attr_set;
    const dim3 grid(unsigned(p.T), unsigned((p.H + tc::kHeads - 1) / tc::kHeads));
    launch_pdl("sink_attn_tc_kernel", tc::sink_attn_tc_kernel, grid, dim3(tc::kThreads), tc::kSmemBytes, stream, p);
    return quantize_after(p, stream);
  }
  const int rps = rows_per_split(p), ns = n_splits(p);
  if (ns > 1 && !scratch) fail("sink_attention_cuda: %d splits need scratch (sink_attention_scratch_floats)", ns);
  const size_t smem = sizeof(float) * (size_t(kHeadsPerCta + kTile) * p.dh + kHeadsPerCta * kTile);
  // The opt-in above 48 KiB is a per-function attribute: set once per process (a thread-safe static; one device
  // assumed, as everywhere in the backend).
  static const bool attr_set = [] {
    check(cudaFuncSetAttribute(sink_attn_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               int(sizeof(float) * ((kHeadsPerCta + kTile) * kAttnMaxHeadDim +
                                                    kHeadsPerCta * kTile))),
          "cudaFuncSetAttribute(sink_attn_kernel)");
    return true;
  }();
  (void)attr_set;
  dim3 grid(unsigned(p.T), unsigned((p.H + kHeadsPerCta - 1) / kHeadsPerCta), unsigned(ns));
  const int ticket = use_split_ticket(p, ns) ? 1 : 0;
  launch_pdl("sink_attn_kernel", sink_attn_kernel, grid, dim3(kThreads), smem, stream, p, rps, scratch, ticket);
  if (ns > 1 && !ticket) {
    // One block per (token, head): dh/4 threads (at least a warp), the splits' weights in shared memory.
    const unsigned threads = unsigned(std::max(32, (p.dh / 4 + 31) / 32 * 32));
    launch_pdl("sink_attn_combine_kernel", sink_attn_combine_kernel, dim3(unsigned(int64_t(p.T) * p.H)), dim3(threads),
               sizeof(float) * 2 * size_t(ns), stream, p, ns, static_cast<const float*>(scratch));
    return;  // the combine kernel wrote the Q8 rows
  }
  quantize_after(p, stream);
}

}  // namespace

}  // namespace dsv4::cuda
