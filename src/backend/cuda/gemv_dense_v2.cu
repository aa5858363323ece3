// Dense single-token GEMV, variant 2 (contract in gemv_dense_v2.h): the backend's default one-token dense GEMV
// (parity tests pass on the H200; timings in docs/cuda.md and dev/cuda/results/h200_s10_*).
//
// Why the default kernel stops at ~62% of the read bandwidth on the 35.6 MB attention matrices: on the H200
// workbench (docs/cuda.md, 99dd030) q_b / o_b take 13.1 us and the 563 MB output head 137 us with the same kernel.
// Fitting t = t0 + bytes / B through both gives B = 4.26 TB/s (96% of the 4.41 TB/s streaming read) and a fixed
// t0 = 4.8 us per launch; the 4.5 MB q_a (5.3 us) and the 4-9 MB matrices (~5-6 us) sit on the same line. So the
// steady state already streams at the card's rate and the loss is the fixed part. ptxas (sm_90a) for the default
// split-layout instances: q_b / o_b (2 rows per warp, 2 loads in flight per row and lane) 60 registers -> 8 CTAs of
// 4 warps per SM, 2 KiB per warp = 64 KiB per SM in flight (Little's law asks ~25 KiB: enough once running), but
// q_b is 4096 CTAs = 3.9 waves and o_b 2048 = 1.9 waves of CTAs that each do one or two dependent load->reduce
// steps; q_a (1 row per warp) 44 registers -> 5 CTAs of 8 warps per SM, and each warp takes one 16-byte chunk per
// lane (its row split 8 ways): 40 x 512 B = 20 KiB per SM in flight, below what Little's law asks, over 1.55 waves.
// Add the gap between the producer kernel's end and the first weight bytes (launch, CTA rasterization, one DRAM
// round trip of ~0.7 us before any warp has data): a kernel alone (rms_norm register kernel) costs ~2 us in a
// graph, so ~2.5-3 us of t0 is the GEMV's own ramp and tail.
//
// What this kernel does about it:
//   1. One wave: grid = the CTAs that are resident at once (occupancy API x SMs), each looping over tiles of rows,
//      so there is no second wave and no rasterization of new CTAs mid-stream; tiles are interleaved over CTAs so
//      every CTA's share differs by at most one tile.
//   2. Every load up front: a warp's item (R rows x one of P parts of a row, at most 8 units of 16 bytes per lane:
//      4 KiB per warp) is requested with all its loads before any arithmetic. At 24 resident warps per SM that is
//      96 KiB per SM in flight from the first instruction, i.e. the whole 4.5 MB q_a (34 KB per SM) and a third of
//      a 35 MB matrix are requested in the first round trip. P (parts per row, reduced in shared memory in a fixed
//      order) and R (rows per warp sharing one activation load) are picked on the host: the biggest items (fewest
//      parts, most rows) that still give every SM at least one CTA's worth (8 warps) of items, so the first round
//      holds min(matrix / SMs, 8 x 4 KiB) per SM (q_a: 2 parts, 2048 items of 2.2 KiB, the whole 34 KB per SM in
//      one round; kv 4096->512: 4 parts; q_b 1024-wide rows: 4 rows per warp; o_b: 2 parts).
//   3. (kernel 4) Programmatic dependent launch: the weights do not depend on the previous kernel, so the kernel
//      is launched with programmatic stream serialization, issues its first item's weight loads, and only then
//      executes griddepcontrol.wait (which returns once the producer grid has completed and its writes are
//      visible) before touching activations or y. Launch latency and the first DRAM round trip overlap the
//      producer's tail instead of following it. Each CTA also executes griddepcontrol.launch_dependents at its
//      start, so a following PDL kernel (the next variant-2 GEMV) may start as soon as all of this grid is resident.
// ptxas (sm_90a): 8 units per lane of the split layout = 32 registers of int4 quants + 8 of scales; see kCtasPerSm.
//
// Products are the streaming kernel's (per unit: the exact dp4a integer dot, times the f16 weight scale and the
// activation scale in the same order; F16: the same 8-term fp32 expression), so results differ from gemv_cuda's
// other kernels only by the fp32 order in which the units of a row are added.
#include "backend/cuda/gemv_dense_v2.h"

#include <cuda_fp16.h>
#include <cuda_pipeline_primitives.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <numeric>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "backend/cuda/common.cuh"
#include "backend/cuda/cuda_util.h"
#include "backend/cuda/pdl.cuh"
#include "common/error.h"
#include "quant/blocks.h"

namespace dsv4::cuda {
namespace {

constexpr int kWarps = 8;      // warps per CTA
constexpr int kLaneUnits = 8;  // weight units a lane holds per item (all rows of the item together)
constexpr int kMaxParts = 8;   // parts a row is split into (<= kWarps: the parts of a row meet in one CTA)
// CTAs per SM the registers are budgeted for (__launch_bounds__): 3 x 8 warps at <= 85 registers. At 4 CTAs (64
// registers) ptxas spilled 36-48 bytes in the split-layout instances (40 registers of loaded weights per lane plus
// the activation operands); 24 warps x 4 KiB = 96 KiB per SM in flight is still ~4x what Little's law asks.
constexpr int kCtasPerSm = 3;

// ---- units: what one lane loads per step -----------------------------------------------------------------------
// Weight loads use ld.global.cs (streaming: each weight byte is read once per token), activations plain loads
// (every warp of the grid reads the same row: L1/L2 hits).

// A lane's units are u0 + 32k (k < K); load / dot take (u0, k) so that, with u0 fixed per lane, every address is a
// per-lane base plus a compile-time offset (the first version indexed by a 64-bit unit number and spilled: ptxas
// held a 64-bit address per load).

// Q8Split row: [cols int8][cols/32 f16 scales]; unit u = quants 16u..16u+15 (one 16-byte load) + scale u/2
// ((u0 + 32k) / 2 = u0 / 2 + 16k).
struct UnitSplit {
  static constexpr int kElems = 16;
  struct W {
    int4 q;
    unsigned short d;
  };
  __device__ static W load(const uint8_t* wrow, int64_t cols, int u0, int k) {
    return {__ldcs(reinterpret_cast<const int4*>(wrow) + u0 + 32 * k),
            __ldcs(reinterpret_cast<const unsigned short*>(wrow + cols) + (u0 >> 1) + 16 * k)};
  }
  // = TraitsQ8Split::dot_split (gemv.cu): same operands, same order.
  __device__ static float dot(const W& w, const uint8_t* act, int64_t cols, int u0, int k) {
    const int4 a = reinterpret_cast<const int4*>(act)[u0 + 32 * k];
    const float da = reinterpret_cast<const float*>(act + cols)[(u0 >> 1) + 16 * k];
    int s = __dp4a(w.q.x, a.x, 0);
    s = __dp4a(w.q.y, a.y, s);
    s = __dp4a(w.q.z, a.z, s);
    s = __dp4a(w.q.w, a.w, s);
    return __half2float(__ushort_as_half(w.d)) * da * float(s);
  }
};

// Q8_0 blocks (34 bytes, payload 2-byte aligned): unit u = values 8(u%4).. of block u/4, assembled from u16 loads
// (unit u0 + 32k: block u0/4 + 8k, same quarter u0 % 4).
__device__ __forceinline__ int ldcs_i32_a2(const uint8_t* p) {
  const unsigned short* h = reinterpret_cast<const unsigned short*>(p);
  return int(uint32_t(__ldcs(h)) | (uint32_t(__ldcs(h + 1)) << 16));
}
struct UnitQ8_0 {
  static constexpr int kElems = 8;
  static constexpr int kB = int(sizeof(block_q8_0));
  struct W {
    int q0, q1;
    unsigned short d;
  };
  __device__ static W load(const uint8_t* wrow, int64_t, int u0, int k) {
    const uint8_t* blk = wrow + kB * ((u0 >> 2) + 8 * k);
    const uint8_t* qs = blk + 2 + 8 * (u0 & 3);
    return {ldcs_i32_a2(qs), ldcs_i32_a2(qs + 4), __ldcs(reinterpret_cast<const unsigned short*>(blk))};
  }
  // = TraitsQ8_0::dot (gemv.cu).
  __device__ static float dot(const W& w, const uint8_t* act, int64_t, int u0, int k) {
    const uint8_t* blk = act + kB * ((u0 >> 2) + 8 * k);
    const uint8_t* qs = blk + 2 + 8 * (u0 & 3);
    const int s = __dp4a(w.q0, load_i32_a2(qs), __dp4a(w.q1, load_i32_a2(qs + 4), 0));
    const float da = __half2float(__ushort_as_half(*reinterpret_cast<const uint16_t*>(blk)));
    return __half2float(__ushort_as_half(w.d)) * da * float(s);
  }
};

// F16 row: unit u = halves 8u..8u+7 (one 16-byte load); activations are 8 floats (two 16-byte loads).
struct UnitF16 {
  static constexpr int kElems = 8;
  struct W {
    uint4 raw;
  };
  __device__ static W load(const uint8_t* wrow, int64_t, int u0, int k) {
    return {__ldcs(reinterpret_cast<const uint4*>(wrow) + u0 + 32 * k)};
  }
  // = TraitsF16::dot (gemv.cu): the same left-to-right expression.
  __device__ static float dot(const W& w, const uint8_t* act, int64_t, int u0, int k) {
    const __half2* h = reinterpret_cast<const __half2*>(&w.raw);
    float v[8];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(h[i]);
      v[2 * i] = f.x, v[2 * i + 1] = f.y;
    }
    const float4* ap = reinterpret_cast<const float4*>(act) + 2 * (u0 + 32 * k);
    const float4 a = ap[0], b = ap[1];
    return v[0] * a.x + v[1] * a.y + v[2] * a.z + v[3] * a.w + v[4] * b.x + v[5] * b.y + v[6] * b.z + v[7] * b.w;
  }
};

struct V2Args {
  const uint8_t* w = nullptr;
  const uint8_t* xq = nullptr;
  const float* xf = nullptr;  // float mode (XF instances): the one f32 activation row, quantized per CTA
  float* y = nullptr;
  int64_t expert_stride = 0, rows = 0, cols = 0, row_bytes = 0, act_row_bytes = 0;
  int n_slots = 1, act_slot_div = 1;
  int64_t units = 0;     // units per row
  int parts = 1;         // P: warps per row (a power of two <= kMaxParts)
  int64_t per_part = 0;  // units per part (the last part may be shorter)
  int64_t n_tiles = 0;   // tiles of kWarps / P row groups of R rows
  // > 0 (gemv_v2_multi_cuda): slot s reads the matrix at multi_w[s] and writes multi_y[s] (rows each), instead of
  // w + s * expert_stride and y + s * rows.
  int n_multi = 0;
  const uint8_t* multi_w[kGemvV2MaxSlots] = {};
  float* multi_y[kGemvV2MaxSlots] = {};
};


// Float mode (GemvParams::xf; Q8Split weights, one activation row shared by every slot): the row quantized into
// this CTA's shared memory as [cols int8][cols/32 f32 scales], the bytes quantize_q8_0_split_kernel (gemv.cu)
// writes, so the dots below read exactly what they would read from xq. Why it pays: the separate quantize launch
// is one more dependent kernel boundary (launch + a full round trip) on the decode critical path; here each CTA
// reads the row from L2 (just written by the producer) right after its wait, while its first tile's weights are
// already in flight.
//
// The rule of quantize_q8_0_split_kernel, with a block's 32 values held by 8 consecutive lanes (4 each, one float4)
// instead of 32: amax over the same 32 values (fmaxf is exact and order-free), d = amax / 127, id = d ? 1/d : 0,
// q = int8(roundf(v * id)), scale = the f32 value of d's f16 rounding. Lane i & 7 == 0 writes the scale.
// Task i = float4 i of the row (block i / 8); called by whole warps (the 8 lanes of a block are in one warp).
__device__ __forceinline__ void q8_split_quad(float4 v, uint8_t* arow, int64_t cols, int i) {
  float m = fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)));
  m = fmaxf(m, __shfl_xor_sync(kFullMask, m, 1));
  m = fmaxf(m, __shfl_xor_sync(kFullMask, m, 2));
  m = fmaxf(m, __shfl_xor_sync(kFullMask, m, 4));
  const float d = m / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  const uint32_t q = uint32_t(uint8_t(int8_t(roundf(v.x * id)))) | uint32_t(uint8_t(int8_t(roundf(v.y * id)))) << 8 |
                     uint32_t(uint8_t(int8_t(roundf(v.z * id)))) << 16 |
                     uint32_t(uint8_t(int8_t(roundf(v.w * id)))) << 24;
  reinterpret_cast<uint32_t*>(arow)[i] = q;
  if ((i & 7) == 0) reinterpret_cast<float*>(arow + cols)[i >> 3] = f16_to_f32(f32_to_f16(d));
}

// The whole row x (cols % 256 == 0) quantized into s ([cols int8][cols/32 f32]) by all kThreads threads of the
// CTA, through a staging copy of the floats at s + xf_stage_offset(cols): every 16-byte piece of the row is
// requested with cp.async at once (one L2 round trip; no registers held, so the first tile's 40 registers of
// weights stay put: holding even 4 float4 loads per thread in registers spilled 16-76 bytes in every instance),
// then each thread quantizes float4s read back from shared memory (consecutive lanes, consecutive 16 bytes).
__host__ __device__ constexpr int64_t xf_stage_offset(int64_t cols) { return cols + cols / 8; }
template <int kThreads>
__device__ __forceinline__ void quantize_row_to_shared(const float* x, int64_t cols, uint8_t* s) {
  const int t = int(threadIdx.x), n4 = int(cols / 4);
  float4* stage = reinterpret_cast<float4*>(s + xf_stage_offset(cols));
  for (int i = t; i < n4; i += kThreads) __pipeline_memcpy_async(stage + i, reinterpret_cast<const float4*>(x) + i, 16);
  __pipeline_commit();
  __pipeline_wait_prior(0);
  __syncthreads();
  // i < n4 is warp-uniform (n4 % 64 == 0, kThreads % 32 == 0), as q8_split_quad's shuffles need.
#pragma unroll 4
  for (int i = t; i < n4; i += kThreads) q8_split_quad(stage[i], s, cols, i);
}

// Warps per CTA and CTAs per SM of an instance: 3 CTAs of kWarps warps (xq mode, and float mode with
// DSV4_CUDA_GEMV_XF=3), or (float mode's default) one CTA of 3 * kWarps warps per SM, so each SM reads and
// quantizes the 32 KB row once instead of three times (three CTAs would pull 3 x 132 x 32 KB = 12.7 MB from L2
// at the start, ~1.7 us at ~7.5 TB/s; one: 4.2 MB, about what the xq mode's CTAs read of the 9 KB Q8 row). Same
// register budget (<= 80 per thread) and resident warps either way.
constexpr int kWarpsXf = kWarps * kCtasPerSm;
constexpr int ctas_per_sm(int warps) { return warps == kWarps ? kCtasPerSm : 1; }

// Warp w of a tile owns row group w / P (R consecutive rows of one slot: R divides rows) and part w % P of those
// rows' units; lane l takes units part_begin + l + 32k. Both griddepcontrol instructions are no-ops when the
// kernel was launched without programmatic serialization (kernel 3). W: warps per CTA; XF: float mode (above),
// the activation row then lives in dynamic shared memory (act_row_bytes). A row's value depends on P and R (the
// plan) only, not on W or on which CTA computes it: float mode gives the xq mode's bits.
extern __shared__ __align__(16) uint8_t v2_shared_act[];
template <class U, int R, int W, bool XF>
__global__ void __launch_bounds__(32 * W, ctas_per_sm(W)) gemv_v2_kernel(V2Args a) {
  constexpr int K = kLaneUnits / R;  // units per lane per row
  __shared__ float partial[2][W][R];
  pdl_trigger();
  const int warp = int(threadIdx.x >> 5), lane = int(threadIdx.x & 31);
  const int P = a.parts;
  const int rows_per_tile = W / P * R;
  const int part = warp % P;
  const int64_t total_rows = int64_t(a.n_slots) * a.rows;
  // This lane's units: u0 + 32k for k < nk (a part holds <= 32 * K units: plan_for).
  const int u0 = int(int64_t(part) * a.per_part) + lane;
  const int u_end = int(std::min<int64_t>(a.units, int64_t(part + 1) * a.per_part));
  const int nk = u_end > u0 ? (u_end - u0 + 31) / 32 : 0;
  bool waited = false;
  int buf = 0;
  // Every CTA has a first tile (grid <= n_tiles), so all of its threads take the !waited branch together.
  for (int64_t tile = blockIdx.x; tile < a.n_tiles; tile += gridDim.x, buf ^= 1) {
    const int64_t gr0 = tile * rows_per_tile + int64_t(warp / P) * R;  // first row (over all slots) of the group
    const bool valid = gr0 < total_rows;
    const int64_t slot = valid ? gr0 / a.rows : 0, r0 = valid ? gr0 % a.rows : 0;
    const uint8_t* wrow = (a.n_multi ? a.multi_w[slot] : a.w + slot * a.expert_stride) + r0 * a.row_bytes;
    float* yrow = a.n_multi ? a.multi_y[slot] + r0 : a.y + gr0;
    const int n = valid ? nk : 0;
    // All of the item's weight loads before any use (the first tile's before the dependency wait).
    typename U::W w[R][K];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int k = 0; k < K; ++k)
        if (k < n) w[r][k] = U::load(wrow + r * a.row_bytes, a.cols, u0, k);
    if (!waited) {
      pdl_wait(), waited = true;
      if constexpr (XF) {
        quantize_row_to_shared<32 * W>(a.xf, a.cols, v2_shared_act);
        __syncthreads();
      }
    }
    const uint8_t* act;
    if constexpr (XF) act = v2_shared_act;
    else act = a.xq + (slot / a.act_slot_div) * a.act_row_bytes;
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = 0.0f;
#pragma unroll
    for (int k = 0; k < K; ++k)
      if (k < n)
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r] += U::dot(w[r][k], act, a.cols, u0, k);
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = warp_sum(acc[r]);
    if (P == 1) {
      if (lane == 0 && valid)
#pragma unroll
        for (int r = 0; r < R; ++r) yrow[r] = acc[r];
      continue;
    }
    // Parts meet in shared memory, added in part order (deterministic). Two buffers alternate by tile, so one
    // barrier per tile suffices: buffer b is rewritten two tiles later, after every warp passed the next barrier.
    if (lane == 0)
#pragma unroll
      for (int r = 0; r < R; ++r) partial[buf][warp][r] = acc[r];
    __syncthreads();
    if (part == 0 && lane == 0 && valid)
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float s = partial[buf][warp][r];
        for (int j = 1; j < P; ++j) s += partial[buf][warp + j][r];
        yrow[r] = s;
      }
  }
}

// Float mode: the widest row. Its shared memory, the quantized row (cols * 9 / 8 bytes) plus the f32 staging copy
// (4 * cols), is 41.5 KB at 8192 (Flash's widest input, o_b): under the 48 KB a launch gets without opting in,
// and 3 x 41.5 KB per SM in the three-CTA shape.
constexpr int64_t kXfMaxCols = 8192;
int64_t xf_smem_bytes(int64_t cols) { return xf_stage_offset(cols) + 4 * cols; }

// Resident CTAs per SM of one kernel instance, times the SM count (asked once per instance and device; float
// mode with the widest row's shared memory).
template <class U, int R, int W, bool XF>
int resident_ctas() {
  static int cached[16] = {};
  int dev = 0;
  check(cudaGetDevice(&dev), "gemv_v2: cudaGetDevice");
  int& c = cached[dev & 15];
  if (c == 0) {
    int sms = 0, per_sm = 0;
    check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "gemv_v2: SM count");
    check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, gemv_v2_kernel<U, R, W, XF>, 32 * W,
                                                        XF ? size_t(xf_smem_bytes(kXfMaxCols)) : 0),
          "gemv_v2: occupancy");
    c = std::max(1, sms * std::max(1, per_sm));
  }
  return c;
}

int64_t units_per_row(const GemvParams& p) {
  if (p.layout == GemvLayout::Q8Split) return p.cols / UnitSplit::kElems;
  return p.wtype == QType::F16 ? p.cols / UnitF16::kElems : p.cols / UnitQ8_0::kElems;
}

int64_t act_row_bytes_v2(const GemvParams& p) {
  if (p.layout == GemvLayout::Q8Split) return p.cols + p.cols / 8;
  if (p.wtype == QType::F16) return p.cols * 4;
  return p.cols / kQK8_0 * int64_t(sizeof(block_q8_0));
}

int64_t weight_row_bytes_v2(const GemvParams& p) {
  if (p.layout == GemvLayout::Q8Split) return q8_split_row_bytes(p.cols);
  return p.wtype == QType::F16 ? p.cols * 2 : p.cols / kQK8_0 * int64_t(sizeof(block_q8_0));
}

// Why p cannot run, or nullptr.
const char* unsupported_reason(const GemvParams& p) {
  if (p.wtype != QType::Q8_0 && p.wtype != QType::F16) return "weight type (Q8_0 or F16 only)";
  if (p.layout == GemvLayout::Q8Split && (p.wtype != QType::Q8_0 || !q8_split_supported(p.cols)))
    return "split layout (Q8_0 and cols % 256 == 0)";
  if (p.rows <= 0 || p.cols <= 0) return "shape";
  if (p.wtype == QType::Q8_0 && p.cols % kQK8_0 != 0) return "shape (Q8_0: cols % 32 == 0)";
  if (p.wtype == QType::F16 && p.cols % 8 != 0) return "shape (F16: cols % 8 == 0)";
  if (units_per_row(p) > int64_t(kMaxParts) * 32 * kLaneUnits) return "row length (at most 2048 units of a lane)";
  if (p.n_tokens != 1) return "n_tokens (one token)";
  if (p.expert_ids) return "device expert ids (grouped launches use expert_stride)";
  if (p.w2 || p.y2) return "paired launch";
  if (p.n_slots < 1 || p.n_slots > 65535 || p.act_slot_div < 1) return "slots";
  if (p.xf) {  // float mode: one f32 row for every slot, quantized in the launch (split layout only)
    if (p.layout != GemvLayout::Q8Split) return "float activations (split layout only)";
    if (p.xq) return "both xq and xf";
    if (p.act_slot_div != p.n_slots) return "float activations (one row shared by all slots only)";
    if (p.cols > kXfMaxCols) return "float activations (cols <= 8192)";
    if (reinterpret_cast<uintptr_t>(p.xf) % 16) return "float activation alignment";
  }
  if (!p.w || (!p.xq && !p.xf) || !p.y) return "null pointer";
  // 16-byte loads (split quants and F16 rows; split and f32 activations) need 16-byte aligned rows; block Q8_0
  // needs 2-byte alignment (u16 loads).
  const uintptr_t wa = p.wtype == QType::Q8_0 && p.layout == GemvLayout::Ggml ? 2 : 16;
  const uintptr_t xa = p.wtype == QType::Q8_0 && p.layout == GemvLayout::Ggml ? 2 : 16;
  if ((reinterpret_cast<uintptr_t>(p.w) | uintptr_t(p.expert_stride) | uintptr_t(weight_row_bytes_v2(p))) % wa)
    return "weight alignment";
  if (!p.xf && (reinterpret_cast<uintptr_t>(p.xq) | uintptr_t(act_row_bytes_v2(p))) % xa)
    return "activation alignment";
  return nullptr;
}

// Rows per warp (R) and parts per row (P): the fewest parts that keep a lane at <= kLaneUnits units, R rows of short
// rows sharing one activation load, then more parallelism (smaller R, then more parts, while a lane keeps >= 2
// units per part) until there are min_items items (one CTA's worth of warps per SM: more, smaller items would only
// shrink the bytes each warp keeps in flight).
struct Plan {
  int r = 1, parts = 1;
};
Plan plan_for(const GemvParams& p, int64_t min_items) {
  const int64_t units = units_per_row(p), total_rows = int64_t(p.n_slots) * p.rows;
  Plan pl;
  if (units < 32 * kLaneUnits)
    while (pl.r < 4 && units * pl.r * 2 <= 32 * kLaneUnits && p.rows % (pl.r * 2) == 0) pl.r *= 2;
  while ((units + pl.parts - 1) / pl.parts > 32 * (kLaneUnits / pl.r)) pl.parts *= 2;
  while (total_rows / pl.r * pl.parts < min_items) {
    if (pl.r > 1) pl.r /= 2;
    else if (pl.parts < kMaxParts && units / (pl.parts * 2) >= 64) pl.parts *= 2;
    else break;
  }
  // Grouped launches (attn_output_a: n_slots > 1 contiguous groups, each its own activation row): 4 rows per warp
  // sharing each activation load, the row split into parts of <= 64 units (kLaneUnits / 4 per lane). Measured on
  // the H200 (session 10, wb_gemv_v2, Flash o_a 8 x 1024 x 4096, graph): 10.53 us vs 12.82 with one row per warp
  // and one part (R,P = 2,2: 11.07; 1,2: 14.97); decode at 2k 140.30 vs 138.8 t/s.
  const bool grouped = p.n_slots > 1 && p.expert_stride != 0;
  if (grouped && p.rows % 4 == 0 && units % 64 == 0 && units / 64 <= kMaxParts && units / 64 >= 1 &&
      ((units / 64) & (units / 64 - 1)) == 0 &&
      total_rows / 4 * (units / 64) >= min_items)
    pl.r = 4, pl.parts = int(units / 64);
  // DSV4_CUDA_GEMV_PLAN_GROUPED="R,P" (A/B of the grouped launch): rows per warp and parts per row instead of the
  // above, if they keep a lane at <= kLaneUnits units per part and R divides the rows; else it fails. Outputs
  // differ only in the fp32 order of a row's parts. Read per call.
  if (const char* e = std::getenv("DSV4_CUDA_GEMV_PLAN_GROUPED"); e && *e && grouped) {
    int r = 0, parts = 0;
    if (std::sscanf(e, "%d,%d", &r, &parts) != 2 || (r != 1 && r != 2 && r != 4) ||
        (parts != 1 && parts != 2 && parts != 4 && parts != 8) || p.rows % r != 0 ||
        (units + parts - 1) / parts > 32 * (kLaneUnits / r))
      fail("DSV4_CUDA_GEMV_PLAN_GROUPED=%s: not a plan for %lld-unit rows (R in 1,2,4; P in 1,2,4,8; R | rows; "
           "units / P <= %d / R)", e, (long long)units, 32 * kLaneUnits);
    pl.r = r, pl.parts = parts;
  }
  return pl;
}

// One launch's slot table (gemv_v2_multi_cuda), or none.
struct MultiTable {
  int n = 0;
  const uint8_t* w[kGemvV2MaxSlots] = {};
  float* y[kGemvV2MaxSlots] = {};
};

template <class U, int R, int W, bool XF>
void launch_v2(const GemvParams& p, int parts, cudaStream_t stream, const MultiTable* m) {
  V2Args a;
  if (m) {
    a.n_multi = m->n;
    for (int i = 0; i < m->n; ++i) a.multi_w[i] = m->w[i], a.multi_y[i] = m->y[i];
  }
  a.w = static_cast<const uint8_t*>(p.w), a.xq = static_cast<const uint8_t*>(p.xq), a.xf = p.xf, a.y = p.y;
  a.expert_stride = p.expert_stride, a.rows = p.rows, a.cols = p.cols;
  a.row_bytes = weight_row_bytes_v2(p), a.act_row_bytes = act_row_bytes_v2(p);
  a.n_slots = p.n_slots, a.act_slot_div = p.act_slot_div;
  a.units = units_per_row(p), a.parts = parts, a.per_part = (a.units + parts - 1) / parts;
  const int64_t rows_per_tile = W / parts * R;
  a.n_tiles = (int64_t(p.n_slots) * p.rows + rows_per_tile - 1) / rows_per_tile;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(unsigned(std::min<int64_t>(a.n_tiles, resident_ctas<U, R, W, XF>())));
  cfg.blockDim = dim3(32 * W);
  cfg.dynamicSmemBytes = XF ? size_t(xf_smem_bytes(p.cols)) : 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = p.kernel == kGemvKernelV2Pdl && pdl_enabled() ? 1 : 0;
  check(cudaLaunchKernelEx(&cfg, gemv_v2_kernel<U, R, W, XF>, a), "gemv_v2_kernel launch");
}

template <class U, int W = kWarps, bool XF = false>
void dispatch_r(const GemvParams& p, const Plan& pl, cudaStream_t stream, const MultiTable* m = nullptr) {
  switch (pl.r) {
    case 1: return launch_v2<U, 1, W, XF>(p, pl.parts, stream, m);
    case 2: return launch_v2<U, 2, W, XF>(p, pl.parts, stream, m);
    case 4: return launch_v2<U, 4, W, XF>(p, pl.parts, stream, m);
    default: fail("gemv_v2: rows per warp %d", pl.r);
  }
}

// Any launch of p (checked) with its plan: float mode (split weights only) in the CTA shape DSV4_CUDA_GEMV_XF asks
// for, else the xq instances. The plan (P, R) is the same for both modes, so they give the same bits.
void dispatch(const GemvParams& p, const Plan& pl, cudaStream_t stream, const MultiTable* m = nullptr) {
  if (p.xf) {
    if (gemv_xf_env() == kGemvXfThreeCtas) dispatch_r<UnitSplit, kWarps, true>(p, pl, stream, m);
    else dispatch_r<UnitSplit, kWarpsXf, true>(p, pl, stream, m);
  } else if (p.layout == GemvLayout::Q8Split) {
    dispatch_r<UnitSplit>(p, pl, stream, m);
  } else if (p.wtype == QType::F16) {
    dispatch_r<UnitF16>(p, pl, stream, m);
  } else {
    dispatch_r<UnitQ8_0>(p, pl, stream, m);
  }
}

}  // namespace

bool gemv_v2_supported(const GemvParams& p) { return unsupported_reason(p) == nullptr; }

void gemv_v2_cuda(const GemvParams& p, cudaStream_t stream) {
  if (const char* why = unsupported_reason(p))
    fail("gemv_v2_cuda: unsupported launch: %s (%s, layout %d, %lld x %lld, T=%d, slots=%d)", why,
         qtype_name(p.wtype).c_str(), int(p.layout), (long long)p.rows, (long long)p.cols, p.n_tokens, p.n_slots);
  dispatch(p, plan_for(p, int64_t(sm_count()) * kWarps), stream);
}

bool gemv_v2_multi_cuda(const GemvParams& p, std::span<const GemvV2Part> parts, cudaStream_t stream) {
  if (parts.empty()) return false;
  // Slots of the largest row count that divides every matrix's rows.
  int64_t slot_rows = 0;
  for (const GemvV2Part& q : parts) {
    if (!q.w || !q.y || q.rows <= 0) return false;
    slot_rows = std::gcd(slot_rows, q.rows);
  }
  MultiTable m;
  GemvParams g = p;
  g.rows = slot_rows, g.expert_stride = 0, g.n_slots = 0;
  const int64_t row_bytes = weight_row_bytes_v2(g);
  for (const GemvV2Part& q : parts)
    for (int64_t r0 = 0; r0 < q.rows; r0 += slot_rows) {
      if (m.n == kGemvV2MaxSlots) return false;
      m.w[m.n] = static_cast<const uint8_t*>(q.w) + r0 * row_bytes;
      m.y[m.n] = q.y + r0;
      ++m.n;
    }
  g.n_slots = m.n, g.act_slot_div = m.n;  // every slot reads activation row 0
  g.w = m.w[0], g.y = m.y[0];
  if (unsupported_reason(g)) return false;
  const uintptr_t wa = p.wtype == QType::Q8_0 && p.layout == GemvLayout::Ggml ? 2 : 16;
  for (int i = 0; i < m.n; ++i)
    if (reinterpret_cast<uintptr_t>(m.w[i]) % wa) return false;
  const Plan pl = plan_for(g, int64_t(sm_count()) * kWarps);
  if (slot_rows % pl.r) return false;  // plan_for keeps R | rows; checked, not assumed
  dispatch(g, pl, stream, &m);
  return true;
}

int gemv_dense_kernel_env() {
  // Read at every call (one getenv per dense launch recorded; graph replays do not call it), so a test can switch it.
  // Default: variant 2 with PDL (measured H200 session 9, Flash q2 decode at 2k: 93.8 t/s with the streaming
  // kernels, 97.4 with variant 2, 100.6 with variant 2 + PDL).
  const char* e = std::getenv("DSV4_CUDA_GEMV_KERNEL");
  if (!e || !*e || std::strcmp(e, "4") == 0) return kGemvKernelV2Pdl;
  if (std::strcmp(e, "0") == 0) return 0;
  if (std::strcmp(e, "3") == 0) return kGemvKernelV2;
  fail("DSV4_CUDA_GEMV_KERNEL=%s: expected 4 (default: variant 2 with PDL), 3 (variant 2) or 0 (the streaming kernels)",
       e);
}

int gemv_xf_env() {
  // Read at every call, as gemv_dense_kernel_env (a test switches it; graph replays do not call it).
  // Default off: measured slower end to end on the H200 (session 10, Flash q2 decode at 2k, two calls: 138.50 vs
  // 136.99 t/s with it on, 140.13 vs 139.37; dev/cuda/results/h200_s10_README.txt).
  const char* e = std::getenv("DSV4_CUDA_GEMV_XF");
  if (!e || !*e || std::strcmp(e, "0") == 0) return kGemvXfOff;
  if (std::strcmp(e, "1") == 0) return kGemvXfOneCta;
  if (std::strcmp(e, "3") == 0) return kGemvXfThreeCtas;
  fail("DSV4_CUDA_GEMV_XF=%s: expected 1 (default: quantize inside the GEMV, one CTA per SM), 3 (inside, three "
       "CTAs per SM) or 0 (a separate quantize launch)",
       e);
}

}  // namespace dsv4::cuda
