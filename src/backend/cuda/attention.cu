// Sink attention kernels (see attention.h for the row sets, the work split and the numerics).
#include "backend/cuda/attention.h"

#include <algorithm>
#include <cmath>

#include "backend/cuda/common.cuh"
#include "backend/cuda/cuda_util.h"
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

__device__ __forceinline__ float dot4(float4 a, float4 b) { return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w; }
__device__ __forceinline__ void fma4(float4& acc, float w, float4 v) {
  acc.x += w * v.x, acc.y += w * v.y, acc.z += w * v.z, acc.w += w * v.w;
}

// grid (T, ceil(H/8), n_split). Shared: q [8][dh] | tile [32][dh] | scores/probabilities [8][32].
__global__ void __launch_bounds__(kThreads) sink_attn_kernel(SinkAttnLaunch p, int rows_per_split, float* part) {
  extern __shared__ float4 smem4[];
  const int dh4 = p.dh / 4;
  float4* qs = smem4;
  float4* tile = qs + kHeadsPerCta * dh4;
  float* sc = reinterpret_cast<float*>(tile + kTile * dh4);
  const int t = blockIdx.x, h0 = blockIdx.y * kHeadsPerCta, split = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int nh = min(kHeadsPerCta, p.H - h0);

  const float4* q4 = reinterpret_cast<const float4*>(p.q) + (int64_t(t) * p.H + h0) * dh4;
  for (int i = threadIdx.x; i < kHeadsPerCta * dh4; i += kThreads)
    qs[i] = i / dh4 < nh ? q4[i] : make_float4(0.f, 0.f, 0.f, 0.f);

  const TokenRows tr = token_rows(p, t);
  const int n_rows = tr.n_win + tr.n_comp;
  const int r_begin = split * rows_per_split;
  const int r_end = min(n_rows, r_begin + rows_per_split);

  float4 acc[kMaxF4];
#pragma unroll
  for (int k = 0; k < kMaxF4; ++k) acc[k] = make_float4(0.f, 0.f, 0.f, 0.f);
  float m = -INFINITY, s = 0.0f;  // running max and sum of head h0 + warp (every lane holds them)

  for (int base = r_begin; base < r_end; base += kTile) {
    __syncthreads();  // q loaded / previous tile consumed
    // Scores: each row is read from global memory once and dotted with all 8 heads' queries.
    for (int rr = warp; rr < kTile; rr += kHeadsPerCta) {
      const int i = base + rr;
      if (i < r_end) {
        const float4* row = row_ptr(p, t, tr, i);
        float4 v[kMaxF4];
#pragma unroll
        for (int k = 0; k < kMaxF4; ++k) {
          const int j = lane + 32 * k;
          if (j < dh4) {
            v[k] = __ldg(row + j);
            tile[rr * dh4 + j] = v[k];
          }
        }
        for (int h = 0; h < kHeadsPerCta; ++h) {
          float d = 0.0f;
#pragma unroll
          for (int k = 0; k < kMaxF4; ++k) {
            const int j = lane + 32 * k;
            if (j < dh4) d += dot4(v[k], qs[h * dh4 + j]);
          }
          d = warp_sum(d);
          if (lane == 0) sc[h * kTile + rr] = p.scale * d;
        }
      } else if (lane == 0) {
        for (int h = 0; h < kHeadsPerCta; ++h) sc[h * kTile + rr] = -INFINITY;
      }
    }
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
      if (j < dh4) o[j] = make_float4(acc[k].x * f, acc[k].y * f, acc[k].z * f, acc[k].w * f);
    }
    return;
  }
  // Partial: unnormalized accumulator + (max, sum) of this split.
  const int64_t slot = (int64_t(split) * p.T + t) * p.H + h;
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

// grid T*H, block dh/4 threads: out = sum_c e^(m_c - M) acc_c / (e^(sink - M) + sum_c e^(m_c - M) s_c).
__global__ void sink_attn_combine_kernel(SinkAttnLaunch p, int n_split, const float* part) {
  const int64_t th = blockIdx.x;  // t * H + h
  const int h = int(th % p.H);
  const int dh4 = p.dh / 4, j = threadIdx.x;
  const float* ms = part + int64_t(n_split) * p.T * p.H * p.dh;
  const int64_t stride = int64_t(p.T) * p.H;
  const float sink = p.sinks[h];
  float M = sink;
  for (int c = 0; c < n_split; ++c) M = fmaxf(M, ms[2 * (c * stride + th)]);
  float den = expf(sink - M);
  float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int c = 0; c < n_split; ++c) {
    const float mc = ms[2 * (c * stride + th)];
    if (mc == -INFINITY) continue;  // split without rows
    const float w = expf(mc - M);
    den += w * ms[2 * (c * stride + th) + 1];
    fma4(o, w, reinterpret_cast<const float4*>(part)[(c * stride + th) * dh4 + j]);
  }
  const float f = 1.0f / den;
  reinterpret_cast<float4*>(p.out)[th * dh4 + j] = make_float4(o.x * f, o.y * f, o.z * f, o.w * f);
}

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
  const int64_t ctas = int64_t(p.T) * ((p.H + kHeadsPerCta - 1) / kHeadsPerCta);
  if (ctas >= kTargetCtas) return int((n + kTile - 1) / kTile * kTile);
  const int64_t want = std::min<int64_t>((kTargetCtas + ctas - 1) / ctas, (n + kTile - 1) / kTile);
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
}

int n_splits(const SinkAttnLaunch& p) {
  const int64_t rps = rows_per_split(p);
  return int(std::max<int64_t>(1, (max_rows(p) + rps - 1) / rps));
}

}  // namespace

int64_t sink_attention_scratch_floats(const SinkAttnLaunch& p) {
  validate(p);
  const int ns = n_splits(p);
  if (ns <= 1) return 0;
  return int64_t(ns) * p.T * p.H * (p.dh + 2);
}

void sink_attention_cuda(const SinkAttnLaunch& p_in, float* scratch, cudaStream_t stream) {
  SinkAttnLaunch p = p_in;
  validate(p);
  if (p.T == 0) return;
  if (p.scale == 0.0f) p.scale = float(1.0 / std::sqrt(double(p.dh)));
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
  sink_attn_kernel<<<grid, kThreads, smem, stream>>>(p, rps, scratch);
  check_launch("sink_attn_kernel");
  if (ns > 1) {
    sink_attn_combine_kernel<<<unsigned(int64_t(p.T) * p.H), unsigned(p.dh / 4), 0, stream>>>(p, ns, scratch);
    check_launch("sink_attn_combine_kernel");
  }
}

}  // namespace dsv4::cuda
