// Routed-expert decode launches, variant 2 (contract: gemv_moe_v2.h).
//
// Why the default kernels stall (Flash decode, H200 wb_gemv at fad8a06; ptxas -v and PTX of this tree, sm_90a):
//   gate+up+SwiGLU (IQ2_XXS, 6 x 2 x 2048 rows of 1056 B = 26 MB, 25-27.5 us = 21% of read bandwidth), streaming
//   kernel: one warp per (gate row, up row), 16-warp CTAs, 50 registers -> 2 CTAs = 32 warps per SM, 12288 warps =
//   2.9 waves. A row is 16 blocks, walked in 4 dependent steps of 528 B per warp (17 KB in flight per SM at best,
//   below the ~25 KB Little's law asks for), after a grid-table fill + __syncthreads that comes before any weight
//   load. Worse, the decode is issue-bound: the loop body is ~320 PTX instructions per lane per step (64 weights:
//   80 and, 48 xor, 34 mul, 16 sub, ...: __vsub4 is emulated on sm_90, the sign masks cost 2 multiplies per 4 values,
//   every 32-bit weight word is two 16-bit loads), i.e. ~1280 instructions per row pair; 93 row pairs per SM x 1280 /
//   4 schedulers ~ 30k issue cycles ~ 15 us. The staged kernel (all copies up front) decodes the same way after the
//   data has arrived and was slower still (31 us).
//   down+sum (Q2_K, 6 x 4096 rows of 672 B = 16.5 MB, 15.2 us = 25%), staged kernel: 32-row tiles of 6 x 672 B =
//   129 KB per CTA -> 128 CTAs of 8 warps for 132 SMs: one CTA per SM, 2 warps per scheduler decoding 192 row dots
//   whose activation loads are dependent L1/L2 round trips, after the whole first half-tile has arrived.
//
// Variant 2, both launches: one warp per unit (output row), whole units copied with cp.async into the warp's ring
// of kStages = 2 unit buffers, the first two issued before anything else (table fill, barrier), then per unit: wait,
// decode from shared memory, issue the unit after next into the freed buffer. Per SM (Flash): gate+up 4 CTAs x 8
// warps x 2 x 2112 B = 135 KB requested at the start (5x what Little's law asks), ~93 units per SM streamed through
// 32 warps that never wait on DRAM inside a row; down 2 CTAs x 8 warps x 2 x 4032 B = 129 KB, i.e. the whole launch
// requested in the first microsecond, decoded by 16 warps per SM (2x the staged kernel's) with the 6 segments'
// independent dots interleaved in one loop. The grid is a multiple of the SM count (no partial second wave).
// Session 9 (ncu of one decode token, H200: gate+up 32.4 us = 0.80 TB/s, down+sum 28.1 us = 0.59 TB/s):
//   * the expert ids were read from global memory inside issue_unit, one dependent round trip per segment before
//     that segment's copies could go out (down+sum: 12 in a row per warp before its 2 units were requested); now
//     each CTA reads the slots' expert offsets once into shared memory;
//   * IQ2_XXS decode: the 2 KiB uint2 grid's random 8-byte lookups took ~6-8 bank-conflicted wavefronts each; now a
//     32-copy selector table and a 32-copy sign table (48 KiB, conflict-free) and one byte permute per 4 signed
//     weights (DecIQ2). Loop body 159 PTX instructions per lane per (block, gate+up) step, was 250; gate and up
//     share one activation load (the dots' loads were issued twice);
//   * PDL (pdl.cuh): tables are built before griddepcontrol.wait, i.e. under the previous kernel's tail.
//   * IQ2_XXS gate+up (cols <= 4096): each warp walks a contiguous range of units (one slot's rows but at the range
//     ends) and keeps the slot's activations in registers (32 bytes per lane per block step, loaded once per slot,
//     not once per unit).
// Measured (H200 wb_gemv, dev/cuda/results/h200_s9_routed_wb_gemv_413c375.log, before the register/contiguous
// change): Flash IQ2_XXS gate+up+SwiGLU 19.58 us (streaming default 26.85), Q2_K down+sum 22.96 us (staged default
// 14.50: the staged kernel stays the backend's down+sum default), Q4_K gate+up 38.2 vs 39.3 us.
// ptxas (sm_90a): IQ2_XXS gate+up 96 registers (2 CTAs of 8 warps per SM: 82 KiB of shared memory each), Q2_K / Q4_K
// gate+up 53-56, down+sum 78-91; no spills. wb_gemv rows "v2" time it.
#include "backend/cuda/gemv_moe_v2.h"

#include <cuda_fp16.h>
#include <cuda_pipeline_primitives.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "backend/cuda/common.cuh"
#include "backend/cuda/cuda_util.h"
#include "backend/cuda/gemv_dots.cuh"
#include "backend/cuda/pdl.cuh"
#include "backend/cuda/q8k_act.cuh"
#include "common/error.h"
#include "quant/blocks.h"
#include "quant/iq2xxs_tables.h"

namespace dsv4::cuda {
namespace {

constexpr int kStages = 2;            // unit buffers per warp
constexpr int kDefaultWarps = 8;      // warps per CTA
// Launch bounds, CTAs of 8 warps per SM: gate+up 4 (<= 64 registers; 93 units per SM want many warps), down+sum 2
// (its 8 segment accumulators spilled at 64 registers; Flash down+sum runs 2 CTAs per SM anyway: 4096 units).
constexpr int kMinCtasSwiglu = 4, kMinCtasSum = 2;
constexpr int kMoeV2MaxSlots = 64;  // slots per launch (their expert offsets live in shared memory)

__device__ __forceinline__ float h2f(uint32_t bits) { return __half2float(__ushort_as_half(uint16_t(bits))); }

// ---- decoders (blocks in shared memory; products and fp32 expressions = the gemv.cu traits') -----------------
// IQ2_XXS, lane g of 8 per block: group g (32 values). Same ints as TraitsIQ2_XXS::load; dot = TraitsIQ2_XXS::dot.
//
// Why not the streaming kernel's uint2 grid (2 KiB, 8-byte entries): a warp's 32 random 8-byte lookups into 16 bank
// pairs take ~6-8 shared-memory wavefronts per instruction, 4 instructions per 32 weights, ~10 us of the launch's
// 26 MB on the H200 from bank conflicts alone (plus 5 integer ops per 4 weights for the signs). Here:
//   * grid entry -> 32-bit byte-permute selector (nibble k = 0, 1, 2 for grid byte k = 8, 25, 43), 32 interleaved
//     copies (entry i of copy c at word 32 i + c, lane l reads copy l): every lane owns its bank, one wavefront;
//   * 7-bit sign code -> the 8 sign bits (even-parity eighth, ksigns_iq2xs) spread to bit 2 of each nibble, also 32
//     copies; OR-ed into the selector, it makes __byte_perm pick from the negated magnitudes:
//     __byte_perm(0x002B1908, 0x00D5E7F8, sel | sgn) = 4 signed weights in one instruction (vs xor/add/mul masks).
// Per 8 weights: 2 conflict-free 4-byte lookups, 1 or, 2 permutes (+ index extraction). Tables: 32 + 16 KiB.
struct DecIQ2 : DotIQ2_XXS {
  static constexpr int kTpb = 8;
  static constexpr int kBlockBytes = sizeof(block_iq2_xxs);
  static constexpr int kSelWords = 256 * 32, kSgnWords = 128 * 32;
  static constexpr int kTableBytes = (kSelWords + kSgnWords) * 4;
  static constexpr int kMinCtasSwiglu = 2;  // 48 KiB of tables + 8 warps' rings: 2 CTAs (16 warps) per SM
  // Builds both tables (all threads of the CTA; reads only the constant grid). Ends with a barrier.
  __device__ static void fill_table(uint8_t* smem) {
    uint32_t* sel = reinterpret_cast<uint32_t*>(smem);
    uint32_t* sgn = sel + kSelWords;
    // 256 selectors derived once into scratch (the sign table's first 256 words), then replicated 32 times:
    // consecutive threads write consecutive words (no bank conflicts).
    for (int i = int(threadIdx.x); i < 256; i += int(blockDim.x)) {
      const uint64_t g = iq2xxs_grid[i];
      uint32_t v = 0;
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const uint32_t b = uint32_t(g >> (8 * k)) & 0xFFu;
        v |= (b == 0x08u ? 0u : (b == 0x19u ? 1u : 2u)) << (4 * k);
      }
      sgn[i] = v;
    }
    __syncthreads();
    for (int i = int(threadIdx.x); i < kSelWords; i += int(blockDim.x)) sel[i] = sgn[i >> 5];
    __syncthreads();
    for (int i = int(threadIdx.x); i < kSgnWords; i += int(blockDim.x)) {
      const uint32_t sg = ksigns_iq2xs(uint32_t(i >> 5));
      uint32_t v = 0;
#pragma unroll
      for (int k = 0; k < 8; ++k) v |= ((sg >> k) & 1u) << (4 * k + 2);
      sgn[i] = v;
    }
    __syncthreads();
  }
  // This lane's copy of the tables (word offset lane).
  __device__ static const uint32_t* lane_table(const uint8_t* smem, int lane) {
    return reinterpret_cast<const uint32_t*>(smem) + lane;
  }
  // Word at byte offset off of the lane's table (off = entry * 128: one entry of 32 copies is 128 bytes), so the
  // address is one add of a masked shift of the packed index (not index * 32 + lane, then * 4).
  __device__ static uint32_t at(const uint32_t* tab, uint32_t off) {
    return *reinterpret_cast<const uint32_t*>(reinterpret_cast<const uint8_t*>(tab) + off);
  }
  // prmt without the 0x7777 mask __byte_perm adds: selector nibbles never have bit 3 set, and prmt reads only the
  // low 4 nibbles.
  __device__ static int perm(uint32_t sel) {
    uint32_t r;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(0x002B1908u), "r"(0x00D5E7F8u), "r"(sel));
    return int(r);
  }
  __device__ static W load(const uint8_t* blk, int g, const uint32_t* tab) {
    // The group's 8 bytes are only 2-byte aligned (66-byte blocks): 16-bit loads. (Three aligned words + funnel
    // shifts read up to 4 bytes past the group, i.e. past the end of the ring for the last block: illegal address
    // on the H200, s9 run 2.)
    const uint8_t* q = blk + 2 + 8 * g;
    const uint32_t a0 = uint32_t(load_i32_a2(q)), a1 = uint32_t(load_i32_a2(q + 4));
    constexpr uint32_t kSgn = uint32_t(kSelWords) * 4;  // byte offset of the sign table
    W w;
    w.d = h2f(*reinterpret_cast<const uint16_t*>(blk));
    // Grid index k = byte k of a0, sign code k = bits 7k..7k+6 of a1; table byte offsets = value * 128.
    const uint32_t s0 = at(tab, (a0 << 7) & 0x7F80u) | at(tab, kSgn + ((a1 << 7) & 0x3F80u));
    const uint32_t s1 = at(tab, (a0 >> 1) & 0x7F80u) | at(tab, kSgn + (a1 & 0x3F80u));
    const uint32_t s2 = at(tab, (a0 >> 9) & 0x7F80u) | at(tab, kSgn + ((a1 >> 7) & 0x3F80u));
    const uint32_t s3 = at(tab, (a0 >> 17) & 0x7F80u) | at(tab, kSgn + ((a1 >> 14) & 0x3F80u));
    w.v[0] = perm(s0), w.v[1] = perm(s0 >> 16);
    w.v[2] = perm(s1), w.v[3] = perm(s1 >> 16);
    w.v[4] = perm(s2), w.v[5] = perm(s2 >> 16);
    w.v[6] = perm(s3), w.v[7] = perm(s3 >> 16);
    w.ls = int(2 * (a1 >> 28) + 1);
    return w;
  }
  // Gate and up dots of one block with one activation load (DotIQ2_XXS::dot's expression for each; the compiler did
  // not merge the two dots' identical loads across the dp4a asm).
  static constexpr bool kDot2 = true;
  __device__ static void dot2(const W& w0, const W& w1, const uint8_t* act, int g, float& acc0, float& acc1) {
    const ActQ8K* a = reinterpret_cast<const ActQ8K*>(act);
    dot2x(w0, w1, *reinterpret_cast<const int4*>(a->qs + 32 * g), *reinterpret_cast<const int4*>(a->qs + 32 * g + 16),
          a->d, acc0, acc1);
  }
  // The same with the group's 32 activations (x0, x1) and the block scale (ad) already in registers.
  __device__ static void dot2x(const W& w0, const W& w1, const int4& x0, const int4& x1, float ad, float& acc0,
                               float& acc1) {
    const int x[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
    int s0 = 0, s1 = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) s0 = __dp4a(w0.v[i], x[i], s0), s1 = __dp4a(w1.v[i], x[i], s1);
    acc0 += 0.125f * w0.d * ad * float(s0 * w0.ls);
    acc1 += 0.125f * w1.d * ad * float(s1 * w1.ls);
  }
};

// The table-free decoders' common part (DecQ2K, DecQ4K): 16 lanes per block, no shared-memory table, one dot per
// block and row (no gate+up pair dot), the default gate+up occupancy.
template <class Dot, class Block>
struct DecNoTable : Dot {
  static constexpr int kTpb = 16;
  static constexpr int kBlockBytes = sizeof(Block);
  static constexpr int kTableBytes = 0;
  static constexpr int kMinCtasSwiglu = dsv4::cuda::kMinCtasSwiglu;
  static constexpr bool kDot2 = false;
  __device__ static void fill_table(uint8_t*) {}
  __device__ static const uint32_t* lane_table(const uint8_t*, int) { return nullptr; }
};

// Q2_K, lane t of 16: qs bytes 4t..4t+3. Rows are 16-byte aligned and blocks 84 B, so every block is 4-byte aligned:
// scales 8h..8h+7 as two words, d and dmin as one. Same values as TraitsQ2_K::load; dot = TraitsQ2_K::dot.
struct DecQ2K : DecNoTable<DotQ2_K, block_q2_K> {
  __device__ static W load(const uint8_t* blk, int sub, const uint32_t*) {
    const block_q2_K* b = reinterpret_cast<const block_q2_K*>(blk);
    const int h = sub >> 3, sh = (sub & 7) >= 4 ? 8 : 0;  // byte 2s + hi of the 8 scales of half h
    const uint32_t s0 = *reinterpret_cast<const uint32_t*>(b->scales + 8 * h);
    const uint32_t s1 = *reinterpret_cast<const uint32_t*>(b->scales + 8 * h + 4);
    const uint32_t dd = *reinterpret_cast<const uint32_t*>(&b->d);
    W w;
    w.d = h2f(dd & 0xFFFFu);
    w.dmin = h2f(dd >> 16);
    w.q = load_i32_a4(b->qs + 4 * sub);
    w.sc[0] = int((s0 >> sh) & 15u);
    w.sc[1] = int((s0 >> (16 + sh)) & 15u);
    w.sc[2] = int((s1 >> sh) & 15u);
    w.sc[3] = int((s1 >> (16 + sh)) & 15u);
    w.m = b->scales[sub] >> 4;
    return w;
  }
};

// Q4_K, lane of 16: 8 low-nibble values of sub-block 2c and 8 high of 2c+1 (as TraitsQ4_K, same expressions).
struct DecQ4K : DecNoTable<DotQ4_K, block_q4_K> {
  __device__ static W load(const uint8_t* blk, int sub, const uint32_t*) {
    const block_q4_K* b = reinterpret_cast<const block_q4_K*>(blk);
    const int c = sub >> 2, part = sub & 3;
    const uint2 q = *reinterpret_cast<const uint2*>(b->qs + 32 * c + 8 * part);
    const uint32_t dd = *reinterpret_cast<const uint32_t*>(&b->d);
    W w;
    w.d = h2f(dd & 0xFFFFu);
    w.dmin = h2f(dd >> 16);
    w.lo0 = int(q.x & 0x0F0F0F0Fu);
    w.lo1 = int(q.y & 0x0F0F0F0Fu);
    w.hi0 = int((q.x >> 4) & 0x0F0F0F0Fu);
    w.hi1 = int((q.y >> 4) & 0x0F0F0F0Fu);
    uint8_t sc, mn;
    q4k_scale_min(2 * c, b->scales, &sc, &mn);
    w.sc0 = sc, w.m0 = mn;
    q4k_scale_min(2 * c + 1, b->scales, &sc, &mn);
    w.sc1 = sc, w.m1 = mn;
    return w;
  }
};

// ---- the kernel ------------------------------------------------------------------------------------------------
struct V2Args {
  GemvParams p;
  int64_t row_bytes = 0, act_row_bytes = 0;
  int segs = 2;        // rows per unit: 2 (gate, up) or k (down rows of one token's slots)
  int n_units = 0;     // gate+up: n_slots * rows; down+sum: n_slots / k * rows
  int unit_bytes = 0;  // segs * row_bytes
  int parts = 1;       // down+sum: the staged kernel's split of a row into block ranges (summed in part order)
  const float* route_w = nullptr;
  float clamp = 0.0f;
};

// Source row of segment s of unit u (slots: gate+up unit u = (slot u / rows, row u % rows) with segments gate, up;
// down+sum unit u = (token u / rows, row u % rows) with segments slots t*k .. t*k + k-1). off[slot] = the slot's
// expert byte offset, read once per CTA into shared memory: reading expert_ids here cost one dependent global round
// trip per segment before the segment's copies could be issued (12 in a row per warp for down+sum's first 2 units).
template <bool kSum>
__device__ __forceinline__ int seg_slot(const V2Args& a, int u, int s) {
  return kSum ? u / int(a.p.rows) * a.segs + s : u / int(a.p.rows);
}
template <bool kSum>
__device__ __forceinline__ const uint8_t* seg_row(const V2Args& a, const int64_t* off, int u, int s) {
  const GemvParams& p = a.p;
  const void* mat = kSum || s == 0 ? p.w : p.w2;
  return static_cast<const uint8_t*>(mat) + off[seg_slot<kSum>(a, u, s)] + int64_t(u % int(p.rows)) * a.row_bytes;
}

// Copies unit u (all its segments) into buf with 16-byte cp.async pieces, lane-strided; commits one group even when
// u is past the end, so group counting stays uniform.
template <bool kSum>
__device__ __forceinline__ void issue_unit(const V2Args& a, const int64_t* off, int u, uint8_t* buf, int lane) {
  if (u < a.n_units) {
    const int n16 = int(a.row_bytes / 16);
    for (int s = 0; s < a.segs; ++s) {
      const uint8_t* src = seg_row<kSum>(a, off, u, s);
      uint8_t* dst = buf + int64_t(s) * a.row_bytes;
      for (int i = lane; i < n16; i += 32) __pipeline_memcpy_async(dst + 16 * i, src + 16 * i, 16);
    }
  }
  __pipeline_commit();
}

// The gate+up units' epilogue (unit_swiglu, unit_swiglu_regs): warp_sum of the lane's gate and up partials, then
// lane 0 writes the (routed) SwiGLU of the row. Same operations and roundings as swiglu_kernel (moe.cu), the
// streaming kernel and the CPU backend.
__device__ __forceinline__ void swiglu_epilogue(const V2Args& a, int slot, int row, float acc0, float acc1, int lane) {
  const GemvParams& p = a.p;
  acc0 = warp_sum(acc0);
  acc1 = warp_sum(acc1);
  if (lane == 0) {
    const float gc = fminf(acc0, a.clamp);
    const float uc = fmaxf(fminf(acc1, a.clamp), -a.clamp);
    const float h = __fmul_rn(gc / (1.0f + expf(-gc)), uc);
    p.y[int64_t(slot) * p.rows + row] = a.route_w ? __fmul_rn(h, a.route_w[slot]) : h;
  }
}

// Gate+up unit: lane mapping and per-lane order of the streaming kernel (gemv_kernel, SW mode, U = 1, one warp per
// row: lane l takes blocks l / Tpb, + 32 / Tpb, ...; gate then up per block), then warp_sum and the same SwiGLU.
template <class D>
__device__ __forceinline__ void unit_swiglu(const V2Args& a, int u, const uint8_t* buf, const uint32_t* grid, int lane) {
  const GemvParams& p = a.p;
  const int slot = seg_slot<false>(a, u, 0), row = u % int(p.rows);
  const uint8_t* act = static_cast<const uint8_t*>(p.xq) + int64_t(slot / p.act_slot_div) * a.act_row_bytes;
  const int nb = int(p.cols / kQK_K), sub = lane % D::kTpb;
  float acc0 = 0.0f, acc1 = 0.0f;
  for (int b = lane / D::kTpb; b < nb; b += 32 / D::kTpb) {
    const typename D::W w0 = D::load(buf + b * D::kBlockBytes, sub, grid);
    const typename D::W w1 = D::load(buf + a.row_bytes + b * D::kBlockBytes, sub, grid);
    if constexpr (D::kDot2) {
      D::dot2(w0, w1, act + int64_t(b) * int64_t(sizeof(ActQ8K)), sub, acc0, acc1);
    } else {
      acc0 += D::dot(w0, act + int64_t(b) * int64_t(sizeof(ActQ8K)), sub);
      acc1 += D::dot(w1, act + int64_t(b) * int64_t(sizeof(ActQ8K)), sub);
    }
  }
  swiglu_epilogue(a, slot, row, acc0, acc1, lane);
}

// IQ2_XXS gate+up with the slot's activations in registers (kActSteps block steps of 4 blocks: rows of up to
// 4 * kActSteps blocks, i.e. cols <= 4096 for 4): a warp walks a contiguous range of units, which share a slot
// (2048 rows of one expert) except at range ends, so the 32 activation bytes per lane per step are loaded once
// per slot instead of once per unit (8 of the ~46 shared/L1 wavefronts of a block step). Same lane -> block map,
// summation order and epilogue as unit_swiglu.
constexpr int kActSteps = 4;
struct ActRegs {
  int4 x[kActSteps][2];
  float d[kActSteps];
  int slot = -1;
};
__device__ __forceinline__ void load_act_regs(const V2Args& a, int slot, ActRegs& r, int lane) {
  const GemvParams& p = a.p;
  const uint8_t* act = static_cast<const uint8_t*>(p.xq) + int64_t(slot / p.act_slot_div) * a.act_row_bytes;
  const int nb = int(p.cols / kQK_K), g = lane % DecIQ2::kTpb;
#pragma unroll
  for (int i = 0; i < kActSteps; ++i) {
    const int b = lane / DecIQ2::kTpb + i * (32 / DecIQ2::kTpb);
    if (b < nb) {
      const ActQ8K* ab = reinterpret_cast<const ActQ8K*>(act + int64_t(b) * int64_t(sizeof(ActQ8K)));
      r.x[i][0] = *reinterpret_cast<const int4*>(ab->qs + 32 * g);
      r.x[i][1] = *reinterpret_cast<const int4*>(ab->qs + 32 * g + 16);
      r.d[i] = ab->d;
    }
  }
  r.slot = slot;
}
__device__ __forceinline__ void unit_swiglu_regs(const V2Args& a, int u, const uint8_t* buf, const uint32_t* tab,
                                                 ActRegs& r, int lane) {
  const GemvParams& p = a.p;
  const int slot = seg_slot<false>(a, u, 0), row = u % int(p.rows);
  if (slot != r.slot) load_act_regs(a, slot, r, lane);  // warp-uniform
  const int nb = int(p.cols / kQK_K), g = lane % DecIQ2::kTpb;
  float acc0 = 0.0f, acc1 = 0.0f;
#pragma unroll
  for (int i = 0; i < kActSteps; ++i) {
    const int b = lane / DecIQ2::kTpb + i * (32 / DecIQ2::kTpb);
    if (b < nb) {
      const DecIQ2::W w0 = DecIQ2::load(buf + b * DecIQ2::kBlockBytes, g, tab);
      const DecIQ2::W w1 = DecIQ2::load(buf + a.row_bytes + b * DecIQ2::kBlockBytes, g, tab);
      DecIQ2::dot2x(w0, w1, r.x[i][0], r.x[i][1], r.d[i], acc0, acc1);
    }
  }
  swiglu_epilogue(a, slot, row, acc0, acc1, lane);
}

// Down+sum unit: per segment the staged kernel's order (staged_dots: lane l takes blocks begin + l / Tpb, + 32 / Tpb
// within each of `parts` ranges; warp_sum per range; ranges added in order), then segments summed in slot order from
// 0 and added to y, as gemv_staged_kernel's Sum epilogue. The segments' accumulators are independent, so the loop
// over segments inside the block loop only adds load-level parallelism.
template <class D>
__device__ __forceinline__ void unit_sum(const V2Args& a, int u, const uint8_t* buf, const uint32_t* grid, int lane) {
  const GemvParams& p = a.p;
  // Activation rows as 32-bit offsets (8 pointers would cost 16 registers and spill).
  const uint8_t* xq = static_cast<const uint8_t*>(p.xq);
  int act[kMoeV2MaxSegs];
#pragma unroll
  for (int s = 0; s < kMoeV2MaxSegs; ++s) act[s] = int(seg_slot<true>(a, u, s) / p.act_slot_div * a.act_row_bytes);
  const int nb = int(p.cols / kQK_K), sub = lane % D::kTpb;
  const int per_part = (nb + a.parts - 1) / a.parts;
  float val[kMoeV2MaxSegs];
  for (int q = 0; q < a.parts; ++q) {
    const int b_end = std::min(nb, (q + 1) * per_part);
    float acc[kMoeV2MaxSegs];
#pragma unroll
    for (int s = 0; s < kMoeV2MaxSegs; ++s) acc[s] = 0.0f;
    for (int b = q * per_part + lane / D::kTpb; b < b_end; b += 32 / D::kTpb) {
#pragma unroll
      for (int s = 0; s < kMoeV2MaxSegs; ++s)
        if (s < a.segs)
          acc[s] += D::dot(D::load(buf + s * a.row_bytes + b * D::kBlockBytes, sub, grid),
                           xq + act[s] + b * int(sizeof(ActQ8K)), sub);
    }
#pragma unroll
    for (int s = 0; s < kMoeV2MaxSegs; ++s)
      if (s < a.segs) {
        const float v = warp_sum(acc[s]);
        val[s] = q == 0 ? v : val[s] + v;
      }
  }
  if (lane == 0) {
    float sum = 0.0f;
#pragma unroll
    for (int s = 0; s < kMoeV2MaxSegs; ++s)
      if (s < a.segs) sum += val[s];
    p.y[int64_t(u / int(p.rows)) * p.rows + u % int(p.rows)] += sum;
  }
}

template <class D, bool kSum>
__global__ void __launch_bounds__(32 * kDefaultWarps, kSum ? kMinCtasSum : D::kMinCtasSwiglu) moe_v2_kernel(V2Args a) {
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ int64_t off[kMoeV2MaxSlots];  // expert byte offset per slot
  pdl_trigger();  // PDL (pdl.cuh): the next kernel may become resident; it waits for this one itself
  const int warp = int(threadIdx.x >> 5), lane = int(threadIdx.x & 31), n_warps = int(blockDim.x >> 5);
  // Lookup tables first: constant data only, so this overlaps the previous kernel's tail under PDL.
  D::fill_table(smem);
  pdl_wait();  // expert ids, activations and y (down+sum accumulates) come from earlier kernels
  for (int i = int(threadIdx.x); i < a.p.n_slots; i += int(blockDim.x))
    off[i] = a.p.expert_ids ? int64_t(a.p.expert_ids[i]) * a.p.expert_stride : 0;
  __syncthreads();
  const uint32_t* tab = D::lane_table(smem, lane);
  uint8_t* ring = smem + D::kTableBytes + int64_t(warp) * kStages * a.unit_bytes;
  const int gw = int(blockIdx.x) * n_warps + warp, nw = int(gridDim.x) * n_warps;
  // Units of this warp: u0, u0 + du, ... below u_end. Register-cached IQ2_XXS gate+up walks a contiguous range
  // (units of one slot in a row); the others interleave warps (u0 = gw, du = nw).
  constexpr bool kRegs = !kSum && D::kDot2;
  const bool regs = kRegs && a.p.cols <= int64_t(kActSteps) * 4 * kQK_K;
  const int per = (a.n_units + nw - 1) / nw;
  const int u0 = regs ? gw * per : gw, du = regs ? 1 : nw, u_end = regs ? min(a.n_units, u0 + per) : a.n_units;
  ActRegs act_regs;
#pragma unroll
  for (int st = 0; st < kStages; ++st) {
    const int u = u0 + st * du;
    issue_unit<kSum>(a, off, u < u_end ? u : a.n_units, ring + st * a.unit_bytes, lane);
  }
  int st = 0;
  for (int u = u0; u < u_end; u += du) {
    uint8_t* buf = ring + st * a.unit_bytes;
    __pipeline_wait_prior(kStages - 1);  // this lane's copies of unit u have landed
    __syncwarp();                        // ... and every lane's (with memory ordering among the warp)
    if constexpr (kSum) unit_sum<D>(a, u, buf, tab, lane);
    else if constexpr (kRegs) {
      if (regs) unit_swiglu_regs(a, u, buf, tab, act_regs, lane);
      else unit_swiglu<D>(a, u, buf, tab, lane);
    } else unit_swiglu<D>(a, u, buf, tab, lane);
    __syncwarp();  // all lanes are done reading buf before it is refilled
    const int next = u + kStages * du;
    issue_unit<kSum>(a, off, next < u_end ? next : a.n_units, buf, lane);
    st = (st + 1) % kStages;
  }
}

// ---- Q2_K down+sum with register activations (variant 2's down+sum for Q2_K rows of <= 2048 columns) ----------
// Why (H200 wb_gemv at 413c375: the kernel above 22.96 us, the staged default 14.50 us for Flash's 6 x 4096 x 2048):
// both decode 16 values per lane per block with 5 shared-memory loads for the weights and 6 L1 loads for the
// activation (4 x 4 bytes, a bsum, the scale): ~11 memory instructions per 16 weights, so the shared/L1 pipe, not
// DRAM, bounds them. Here a CTA owns kQ2Tile rows of one token, its warps walk contiguous ranges of (segment, row)
// items, so a warp keeps one slot's activations in registers (loaded once per segment, 20 registers) and a lane
// decodes 32 values per block (sub-blocks 2g and 2g+1 share their 4 scale bytes): per 32 weights 5 shared-memory
// loads and no activation load. Rows arrive through the warp's kQ2Stages-deep cp.async ring; the per-row dots meet
// in shared memory and the epilogue adds them in slot order, as the staged kernel's Sum epilogue. Not bit-identical
// to the staged kernel (a lane's two sub-blocks form one fp32 expression): within 1e-6 of |ref| + rms (tests).
constexpr int kQ2Tile = 8;         // rows per CTA: 512 CTAs for Flash (~4 per SM)
constexpr int kQ2Stages = 4;       // row buffers per warp (4 x 672 B)
constexpr int kQ2MaxBlocks = 8;    // blocks per row (cols <= 2048): 2 per lane
constexpr int kQ2Warps = 8;

struct Q2Act {  // one lane's activations of a slot: blocks lane / 8 + 4 i, sub-blocks 2g and 2g + 1 (g = lane % 8)
  int2 x[2][4];  // [i][s]: the 8 bytes at qs + 128 h + 32 s + 8 (g % 4), h = g / 4
  int bs[2];     // bsums[2g] (low half), bsums[2g + 1] (high half)
  float d[2];
};

__device__ __forceinline__ void q2_load_act(const uint8_t* act_row, int nb, int lane, Q2Act& r) {
  const int g = lane & 7, h = g >> 2, l0 = 8 * (g & 3);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int b = (lane >> 3) + 4 * i;
    if (b < nb) {
      const ActQ8K* a = reinterpret_cast<const ActQ8K*>(act_row + int64_t(b) * int64_t(sizeof(ActQ8K)));
#pragma unroll
      for (int s = 0; s < 4; ++s) r.x[i][s] = *reinterpret_cast<const int2*>(a->qs + 128 * h + 32 * s + l0);
      r.bs[i] = *reinterpret_cast<const int*>(a->bsums + 2 * g);
      r.d[i] = a->d;
    }
  }
}

// Row (nb Q2_K blocks in shared memory, 16-byte aligned) . activations, summed over the warp (every lane gets it).
// Integer products as DotQ2_K's for sub-blocks 2g and 2g + 1 (same scale and min nibbles, same dp4a operands).
__device__ __forceinline__ float q2_row_dot(const uint8_t* row, int nb, const Q2Act& r, int lane) {
  const int g = lane & 7, h = g >> 2, sh = (g & 3) >= 2 ? 8 : 0;  // scale byte 8h + 2s + (sh / 8)
  float acc = 0.0f;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int b = (lane >> 3) + 4 * i;
    if (b < nb) {
      const uint8_t* blk = row + b * int(sizeof(block_q2_K));  // 4-byte aligned (84-byte blocks)
      const uint32_t s0 = *reinterpret_cast<const uint32_t*>(blk + 8 * h);
      const uint32_t s1 = *reinterpret_cast<const uint32_t*>(blk + 8 * h + 4);
      const uint32_t q0 = *reinterpret_cast<const uint32_t*>(blk + 16 + 8 * g);
      const uint32_t q1 = *reinterpret_cast<const uint32_t*>(blk + 20 + 8 * g);
      const uint32_t dd = *reinterpret_cast<const uint32_t*>(blk + 80);
      const uint32_t mm = *reinterpret_cast<const uint16_t*>(blk + 2 * g);  // scales[2g], scales[2g + 1]
      const int sc[4] = {int((s0 >> sh) & 15u), int((s0 >> (16 + sh)) & 15u), int((s1 >> sh) & 15u),
                         int((s1 >> (16 + sh)) & 15u)};
      int isum = 0;
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const int v0 = int((q0 >> (2 * s)) & 0x03030303u), v1 = int((q1 >> (2 * s)) & 0x03030303u);
        isum += sc[s] * __dp4a(v1, r.x[i][s].y, __dp4a(v0, r.x[i][s].x, 0));
      }
      const int imin = int((mm >> 4) & 15u) * int(int16_t(r.bs[i] & 0xFFFF)) + int(mm >> 12) * (r.bs[i] >> 16);
      acc += r.d[i] * (h2f(dd & 0xFFFFu) * float(isum) - h2f(dd >> 16) * float(imin));
    }
  }
  return warp_sum(acc);
}

// grid (row tiles, tokens), kQ2Warps warps; V2Args as for the down+sum launch (segs = k).
__global__ void __launch_bounds__(32 * kQ2Warps) moe_v2_down_q2k_kernel(V2Args a) {
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ int64_t off[kMoeV2MaxSegs];
  __shared__ float res[kMoeV2MaxSegs][kQ2Tile];
  pdl_trigger();  // PDL (pdl.cuh)
  const GemvParams& p = a.p;
  const int warp = int(threadIdx.x >> 5), lane = int(threadIdx.x & 31), n_warps = int(blockDim.x >> 5);
  const int t = int(blockIdx.y);
  const int64_t r0 = int64_t(blockIdx.x) * kQ2Tile;
  const int n_rows = int(std::min<int64_t>(kQ2Tile, p.rows - r0));
  const int nb = int(p.cols / kQK_K);
  pdl_wait();  // expert ids, activations and y come from earlier kernels
  if (int(threadIdx.x) < a.segs)
    off[threadIdx.x] = p.expert_ids ? int64_t(p.expert_ids[t * a.segs + int(threadIdx.x)]) * p.expert_stride : 0;
  __syncthreads();
  // Items (segment s, tile row i) = (item / n_rows, item % n_rows): contiguous per warp, so a warp meets few slots.
  const int n_items = a.segs * n_rows, per = (n_items + n_warps - 1) / n_warps;
  const int i0 = warp * per, i_end = std::min(n_items, i0 + per);
  uint8_t* ring = smem + int64_t(warp) * kQ2Stages * a.row_bytes;
  const int n16 = int(a.row_bytes / 16);
  const auto issue = [&](int item, uint8_t* buf) {
    if (item < i_end) {
      const uint8_t* src = static_cast<const uint8_t*>(p.w) + off[item / n_rows] +
                           (r0 + item % n_rows) * a.row_bytes;
      for (int c = lane; c < n16; c += 32) __pipeline_memcpy_async(buf + 16 * c, src + 16 * c, 16);
    }
    __pipeline_commit();  // one group per call, so the wait counts stay uniform
  };
#pragma unroll
  for (int st = 0; st < kQ2Stages; ++st) issue(i0 + st, ring + st * a.row_bytes);
  Q2Act act;
  int cur = -1, st = 0;
  for (int item = i0; item < i_end; ++item) {
    uint8_t* buf = ring + st * a.row_bytes;
    __pipeline_wait_prior(kQ2Stages - 1);
    __syncwarp();
    const int s = item / n_rows, i = item % n_rows;
    if (s != cur) {  // warp-uniform
      const int slot = t * a.segs + s;
      q2_load_act(static_cast<const uint8_t*>(p.xq) + int64_t(slot / p.act_slot_div) * a.act_row_bytes, nb, lane, act);
      cur = s;
    }
    const float v = q2_row_dot(buf, nb, act, lane);
    if (lane == 0) res[s][i] = v;
    __syncwarp();  // every lane is done with buf before it is refilled
    issue(item + kQ2Stages, buf);
    st = (st + 1) % kQ2Stages;
  }
  __syncthreads();
  for (int i = int(threadIdx.x); i < n_rows; i += int(blockDim.x)) {
    float sum = 0.0f;  // slot order from 0, as gemv_staged_kernel's Sum epilogue
    for (int j = 0; j < a.segs; ++j) sum += res[j][i];
    p.y[int64_t(t) * p.rows + r0 + i] += sum;
  }
}

bool q2k_down_applies(const GemvParams& p) { return p.wtype == QType::Q2_K && p.cols <= int64_t(kQ2MaxBlocks) * kQK_K; }

void launch_q2k_down(const V2Args& a, cudaStream_t stream) {
  const size_t smem = size_t(kQ2Warps) * kQ2Stages * size_t(a.row_bytes);  // <= 8 x 4 x 672 B: no opt-in needed
  const dim3 grid(unsigned((a.p.rows + kQ2Tile - 1) / kQ2Tile), unsigned(a.p.n_slots / a.segs));
  launch_pdl("moe_v2_down_q2k_kernel", moe_v2_down_q2k_kernel, grid, dim3(32 * kQ2Warps), smem, stream, a);
}

int64_t dev_row_bytes(const GemvParams& p) { return row_bytes(p.wtype, p.cols); }

size_t smem_bytes(const GemvParams& p, int segs, int warps) {
  const size_t table = p.wtype == QType::IQ2_XXS ? DecIQ2::kTableBytes : 0;
  return table + size_t(warps) * kStages * size_t(segs) * size_t(dev_row_bytes(p));
}

// Reason p cannot run on variant 2, or nullptr.
const char* unsupported_reason(const GemvParams& p, int segs) {
  if (p.wtype != QType::Q2_K && p.wtype != QType::Q4_K && p.wtype != QType::IQ2_XXS)
    return "weight type (Q2_K, Q4_K, IQ2_XXS only)";
  if (p.layout != GemvLayout::Ggml) return "layout (Ggml only)";
  if (p.rows <= 0 || p.cols <= 0 || p.cols % kQK_K != 0) return "shape";
  if (dev_row_bytes(p) % 16 != 0) return "row length (a multiple of 16 bytes needed)";
  if (p.n_tokens != 1) return "n_tokens (one token per slot)";
  if (p.xf || !p.xq || !p.y) return "activations (quantized xq needed, xf not taken) or y";
  if (p.n_slots < 1 || p.n_slots > kMoeV2MaxSlots || p.act_slot_div < 1 || segs < 1 || p.n_slots % (segs == 2 && p.w2 ? 1 : segs) != 0)
    return "slots";
  if (p.cta_warps != 0 && p.cta_warps != 4 && p.cta_warps != kDefaultWarps) return "cta_warps (0, 4 or 8)";
  const auto misaligned = [](const void* q) { return (reinterpret_cast<uintptr_t>(q) & 15u) != 0; };
  if (!p.w || misaligned(p.w) || (p.w2 && misaligned(p.w2)) || p.expert_stride % 16 != 0 || misaligned(p.xq))
    return "alignment (16 bytes: weights, expert_stride, xq)";
  const int warps = p.cta_warps ? p.cta_warps : kDefaultWarps;
  if (smem_bytes(p, segs, warps) > (200u << 10)) return "shared memory (units too long)";
  const int64_t units = (p.w2 ? p.n_slots : p.n_slots / segs) * p.rows;
  if (units > (1ll << 30) || int64_t(p.n_slots) * gpu_activation_bytes(p.wtype, p.cols) >= (1ll << 31))
    return "too many rows or activation bytes (32-bit unit and activation offsets)";
  return nullptr;
}

template <class D, bool kSum>
void launch_v2(const V2Args& a, cudaStream_t stream) {
  const int warps = a.p.cta_warps ? a.p.cta_warps : kDefaultWarps;
  const size_t smem = smem_bytes(a.p, a.segs, warps);
  static size_t smem_set = 48 << 10;  // the default limit; larger rings opt in once per instantiation
  if (smem > smem_set) {
    check(cudaFuncSetAttribute(moe_v2_kernel<D, kSum>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
          "moe_v2_kernel smem");
    smem_set = smem;
  }
  int per_sm = 0;
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, moe_v2_kernel<D, kSum>, 32 * warps, smem),
        "moe_v2_kernel occupancy");
  if (per_sm < 1) fail("moe_v2: a CTA of %d warps with %zu bytes of shared memory does not fit an SM", warps, smem);
  // One wave, the same number of CTAs on every SM: as many per SM as fit, but no more than give each warp
  // kStages units (fewer CTAs then hold the whole launch in their rings).
  const int sms = sm_count();
  const int64_t want = (a.n_units + int64_t(warps) * kStages * sms - 1) / (int64_t(warps) * kStages * sms);
  const int grid = sms * int(std::clamp<int64_t>(want, 1, per_sm));
  launch_pdl("moe_v2_kernel", moe_v2_kernel<D, kSum>, dim3(unsigned(grid)), dim3(unsigned(32 * warps)), smem, stream, a);
}

template <bool kSum>
void dispatch_v2(const V2Args& a, cudaStream_t stream) {
  switch (a.p.wtype) {
    case QType::IQ2_XXS: return launch_v2<DecIQ2, kSum>(a, stream);
    case QType::Q2_K: return launch_v2<DecQ2K, kSum>(a, stream);
    case QType::Q4_K: return launch_v2<DecQ4K, kSum>(a, stream);
    default: fail("moe_v2: no decoder for %s", qtype_name(a.p.wtype).c_str());
  }
}

V2Args make_args(const GemvParams& p, int segs) {
  V2Args a;
  a.p = p, a.segs = segs;
  a.row_bytes = dev_row_bytes(p);
  a.act_row_bytes = gpu_activation_bytes(p.wtype, p.cols);
  a.unit_bytes = int(segs * a.row_bytes);
  return a;
}

}  // namespace

bool moe_v2_supported(const GemvParams& p, int segs) {
  if (p.w2 ? segs != 2 : (segs < 1 || segs > kMoeV2MaxSegs)) return false;
  return unsupported_reason(p, segs) == nullptr;
}

void moe_v2_gate_up_swiglu_cuda(const GemvParams& p, const float* route_w, float clamp, cudaStream_t stream) {
  if (!p.w2) fail("moe_v2_gate_up_swiglu_cuda: needs the up stack in w2");
  if (const char* why = unsupported_reason(p, 2)) fail("moe_v2_gate_up_swiglu_cuda: unsupported %s", why);
  V2Args a = make_args(p, 2);
  a.n_units = int(p.n_slots * p.rows);
  a.route_w = route_w, a.clamp = clamp;
  dispatch_v2<false>(a, stream);
}

void moe_v2_down_sum_cuda(const GemvParams& p, int k, cudaStream_t stream) {
  if (p.w2) fail("moe_v2_down_sum_cuda: no paired launch");
  if (k < 1 || k > kMoeV2MaxSegs || p.n_slots % k != 0)
    fail("moe_v2_down_sum_cuda: k=%d must be in [1, %d] and divide n_slots=%d", k, kMoeV2MaxSegs, p.n_slots);
  if (const char* why = unsupported_reason(p, k)) fail("moe_v2_down_sum_cuda: unsupported %s", why);
  V2Args a = make_args(p, k);
  a.n_units = int(p.n_slots / k * p.rows);
  // The staged kernel's row split (staged_parts in gemv.cu): ranges of blocks with >= 4 steps of 32 / Tpb blocks.
  const int64_t nb = p.cols / kQK_K, step = 32 / (p.wtype == QType::IQ2_XXS ? DecIQ2::kTpb : DecQ2K::kTpb);
  a.parts = int(std::clamp<int64_t>(nb / (4 * step), 1, 8));
  if (q2k_down_applies(p)) return launch_q2k_down(a, stream);  // Flash's Q2_K down projection
  dispatch_v2<true>(a, stream);
}

int moe_kernel_env() {
  const char* e = std::getenv("DSV4_CUDA_MOE_KERNEL");
  if (!e || !*e || std::strcmp(e, "5") == 0) return kMoeKernelV2;
  if (std::strcmp(e, "0") == 0) return 0;
  if (std::strcmp(e, "auto") == 0) return kMoeKernelAuto;
  fail("DSV4_CUDA_MOE_KERNEL=%s: expected unset or 5 (variant 2, the default), auto (variant 2 gate+up, staged "
       "down+sum) or 0 (session-8 kernels)", e);
}

}  // namespace dsv4::cuda
