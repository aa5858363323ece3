// Routed-expert decode launches, variant 2 (contract: gemv_moe_v2.h). Compiled, not yet run on a GPU.
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
// Decode: IQ2_XXS signs by (g ^ m) + m1 (m1 = 0x01 per negative byte from one multiply, m = m1 * 255) instead of
// __vsub4; the IQ2_XXS gate+up loop body is 250 PTX instructions per lane per (block, gate+up) step vs 324 in the
// streaming kernel (PTX of this tree). ptxas (sm_90a): gate+up 54-59 registers (4 CTAs of 8 warps fit), down+sum
// 80-91 registers (3 fit; 2 are used), no spills. Expected (not measured): gate+up ~12-14 us vs 25-27.5, down+sum
// ~5-7 us vs 15.2, both then bounded by decode issue and L1/shared-memory wavefronts (weights, grid lookups and
// activations all pass through the 128 B/clk per SM path) rather than DRAM. wb_gemv rows "v2" time it.
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
constexpr int kIq2TableBytes = 2048;  // 256 x uint2 grid

__device__ __forceinline__ float h2f(uint32_t bits) { return __half2float(__ushort_as_half(uint16_t(bits))); }

// ---- decoders (blocks in shared memory; products and fp32 expressions = the gemv.cu traits') -----------------
// IQ2_XXS, lane g of 8 per block: group g (32 values). Same ints as TraitsIQ2_XXS::load; dot = TraitsIQ2_XXS::dot.
struct DecIQ2 : DotIQ2_XXS {
  static constexpr int kTpb = 8;
  static constexpr int kBlockBytes = sizeof(block_iq2_xxs);
  static constexpr bool kTable = true;
  // 4 sign bits -> 0x01 in each byte whose bit is set (shifted copies 7 bits apart never overlap for b < 16).
  __device__ static uint32_t ones(uint32_t b) { return (b * 0x00204081u) & 0x01010101u; }
  // Grid bytes are 8, 25 or 43: ~g + 1 = -g never carries out of its byte, so one 32-bit add negates 4 bytes.
  __device__ static int apply(uint32_t g, uint32_t m1) { return int((g ^ (m1 * 0xFFu)) + m1); }
  __device__ static W load(const uint8_t* blk, int g, const uint2* grid) {
    const uint8_t* q = blk + 2 + 8 * g;
    const uint32_t a0 = uint32_t(load_i32_a2(q)), a1 = uint32_t(load_i32_a2(q + 4));
    W w;
    w.d = h2f(*reinterpret_cast<const uint16_t*>(blk));
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint2 gv = grid[(a0 >> (8 * k)) & 255u];
      const uint32_t code = (a1 >> (7 * k)) & 127u;
      const uint32_t sg = code | ((__popc(code) & 1u) << 7);  // ksigns_iq2xs: even-parity eighth bit
      w.v[2 * k] = apply(gv.x, ones(sg & 15u));
      w.v[2 * k + 1] = apply(gv.y, ones(sg >> 4));
    }
    w.ls = int(2 * (a1 >> 28) + 1);
    return w;
  }
};

// Q2_K, lane t of 16: qs bytes 4t..4t+3. Rows are 16-byte aligned and blocks 84 B, so every block is 4-byte aligned:
// scales 8h..8h+7 as two words, d and dmin as one. Same values as TraitsQ2_K::load; dot = TraitsQ2_K::dot.
struct DecQ2K : DotQ2_K {
  static constexpr int kTpb = 16;
  static constexpr int kBlockBytes = sizeof(block_q2_K);
  static constexpr bool kTable = false;
  __device__ static W load(const uint8_t* blk, int sub, const uint2*) {
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
struct DecQ4K : DotQ4_K {
  static constexpr int kTpb = 16;
  static constexpr int kBlockBytes = sizeof(block_q4_K);
  static constexpr bool kTable = false;
  __device__ static W load(const uint8_t* blk, int sub, const uint2*) {
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
// down+sum unit u = (token u / rows, row u % rows) with segments slots t*k .. t*k + k-1).
template <bool kSum>
__device__ __forceinline__ int seg_slot(const V2Args& a, int u, int s) {
  return kSum ? u / int(a.p.rows) * a.segs + s : u / int(a.p.rows);
}
template <bool kSum>
__device__ __forceinline__ const uint8_t* seg_row(const V2Args& a, int u, int s) {
  const GemvParams& p = a.p;
  const int slot = seg_slot<kSum>(a, u, s);
  const void* mat = kSum || s == 0 ? p.w : p.w2;
  const int64_t expert = p.expert_ids ? p.expert_ids[slot] : 0;
  return static_cast<const uint8_t*>(mat) + expert * p.expert_stride + int64_t(u % int(p.rows)) * a.row_bytes;
}

// Copies unit u (all its segments) into buf with 16-byte cp.async pieces, lane-strided; commits one group even when
// u is past the end, so group counting stays uniform.
template <bool kSum>
__device__ __forceinline__ void issue_unit(const V2Args& a, int u, uint8_t* buf, int lane) {
  if (u < a.n_units) {
    const int n16 = int(a.row_bytes / 16);
    for (int s = 0; s < a.segs; ++s) {
      const uint8_t* src = seg_row<kSum>(a, u, s);
      uint8_t* dst = buf + int64_t(s) * a.row_bytes;
      for (int i = lane; i < n16; i += 32) __pipeline_memcpy_async(dst + 16 * i, src + 16 * i, 16);
    }
  }
  __pipeline_commit();
}

// Gate+up unit: lane mapping and per-lane order of the streaming kernel (gemv_kernel, SW mode, U = 1, one warp per
// row: lane l takes blocks l / Tpb, + 32 / Tpb, ...; gate then up per block), then warp_sum and the same SwiGLU.
template <class D>
__device__ __forceinline__ void unit_swiglu(const V2Args& a, int u, const uint8_t* buf, const uint2* grid, int lane) {
  const GemvParams& p = a.p;
  const int slot = seg_slot<false>(a, u, 0), row = u % int(p.rows);
  const uint8_t* act = static_cast<const uint8_t*>(p.xq) + int64_t(slot / p.act_slot_div) * a.act_row_bytes;
  const int nb = int(p.cols / kQK_K), sub = lane % D::kTpb;
  float acc0 = 0.0f, acc1 = 0.0f;
  for (int b = lane / D::kTpb; b < nb; b += 32 / D::kTpb) {
    const typename D::W w0 = D::load(buf + b * D::kBlockBytes, sub, grid);
    const typename D::W w1 = D::load(buf + a.row_bytes + b * D::kBlockBytes, sub, grid);
    acc0 += D::dot(w0, act + int64_t(b) * int64_t(sizeof(ActQ8K)), sub);
    acc1 += D::dot(w1, act + int64_t(b) * int64_t(sizeof(ActQ8K)), sub);
  }
  acc0 = warp_sum(acc0);
  acc1 = warp_sum(acc1);
  if (lane == 0) {
    // Same operations and roundings as swiglu_kernel (moe.cu), the streaming kernel and the CPU backend.
    const float gc = fminf(acc0, a.clamp);
    const float uc = fmaxf(fminf(acc1, a.clamp), -a.clamp);
    const float h = __fmul_rn(gc / (1.0f + expf(-gc)), uc);
    p.y[int64_t(slot) * p.rows + row] = a.route_w ? __fmul_rn(h, a.route_w[slot]) : h;
  }
}

// Down+sum unit: per segment the staged kernel's order (staged_dots: lane l takes blocks begin + l / Tpb, + 32 / Tpb
// within each of `parts` ranges; warp_sum per range; ranges added in order), then segments summed in slot order from
// 0 and added to y, as gemv_staged_kernel's Sum epilogue. The segments' accumulators are independent, so the loop
// over segments inside the block loop only adds load-level parallelism.
template <class D>
__device__ __forceinline__ void unit_sum(const V2Args& a, int u, const uint8_t* buf, const uint2* grid, int lane) {
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
__global__ void __launch_bounds__(32 * kDefaultWarps, kSum ? kMinCtasSum : kMinCtasSwiglu) moe_v2_kernel(V2Args a) {
  extern __shared__ __align__(16) uint8_t smem[];
  const int warp = int(threadIdx.x >> 5), lane = int(threadIdx.x & 31), n_warps = int(blockDim.x >> 5);
  const int table_bytes = D::kTable ? kIq2TableBytes : 0;
  uint2* grid = reinterpret_cast<uint2*>(smem);
  uint8_t* ring = smem + table_bytes + int64_t(warp) * kStages * a.unit_bytes;
  const int gw = int(blockIdx.x) * n_warps + warp, nw = int(gridDim.x) * n_warps;
  // The first units' copies go out before anything else, so DRAM is busy from the first cycles.
#pragma unroll
  for (int st = 0; st < kStages; ++st) issue_unit<kSum>(a, gw + st * nw, ring + st * a.unit_bytes, lane);
  if constexpr (D::kTable) {
    for (int i = int(threadIdx.x); i < 256; i += int(blockDim.x)) {
      const uint64_t g = iq2xxs_grid[i];
      grid[i] = make_uint2(uint32_t(g), uint32_t(g >> 32));
    }
    __syncthreads();
  }
  int st = 0;
  for (int u = gw; u < a.n_units; u += nw) {
    uint8_t* buf = ring + st * a.unit_bytes;
    __pipeline_wait_prior(kStages - 1);  // this lane's copies of unit u have landed
    __syncwarp();                        // ... and every lane's (with memory ordering among the warp)
    if constexpr (kSum) unit_sum<D>(a, u, buf, grid, lane);
    else unit_swiglu<D>(a, u, buf, grid, lane);
    __syncwarp();  // all lanes are done reading buf before it is refilled
    issue_unit<kSum>(a, u + kStages * nw, buf, lane);
    st = (st + 1) % kStages;
  }
}

int64_t dev_row_bytes(const GemvParams& p) { return row_bytes(p.wtype, p.cols); }

size_t smem_bytes(const GemvParams& p, int segs, int warps) {
  const size_t table = p.wtype == QType::IQ2_XXS ? kIq2TableBytes : 0;
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
  if (p.n_slots < 1 || p.act_slot_div < 1 || segs < 1 || p.n_slots % (segs == 2 && p.w2 ? 1 : segs) != 0)
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
  moe_v2_kernel<D, kSum><<<grid, 32 * warps, smem, stream>>>(a);
  check_launch("moe_v2_kernel");
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
  dispatch_v2<true>(a, stream);
}

int moe_kernel_env() {
  const char* e = std::getenv("DSV4_CUDA_MOE_KERNEL");
  if (!e || !*e || std::strcmp(e, "0") == 0) return 0;
  if (std::strcmp(e, "5") == 0) return kMoeKernelV2;
  fail("DSV4_CUDA_MOE_KERNEL=%s: expected 0 (default kernels) or 5 (variant 2, gemv_moe_v2.h)", e);
}

}  // namespace dsv4::cuda
