// Quantized GEMV kernels (see gemv.h for the contract).
//
// Mapping: one warp per output row, 4 warps (4 rows) per CTA, grid.y = MoE slot (few rows: a row is split
// across up to 16 warps of one CTA, see gemv_kernel). Inside a row, TPB lanes
// cooperate on one quant block (TPB = 4 for Q8_0, 16 for Q2_K/Q4_K, 8 for IQ2_XXS, 1 "block" of 8 halves per
// lane for F16), so a warp walks 32/TPB consecutive blocks per step and its loads cover a contiguous span of
// the row. Each lane decodes its slice of the weight block once (Traits::load) and dots it with every token's
// activations (Traits::dot) before moving on: the batched variant reads weights once for all tokens.
//
// Alignment facts the loads rely on (device allocations are 256-byte aligned, rows are whole blocks):
//   Q8_0 34 B and IQ2_XXS 66 B blocks: payload only 2-byte aligned -> 32-bit values assembled from u16 loads.
//   Q2_K 84 B, Q4_K 144 B, Q8_K 292 B blocks: 4-byte aligned -> plain 32-bit loads.
//   F16 rows: cols % 8 == 0 keeps every 8-half chunk 16-byte aligned (checked by the launcher).
#include "backend/cuda/gemv.h"

#include <cuda_fp16.h>
#include <cuda_pipeline_primitives.h>

#include <algorithm>
#include <cstddef>

#include "backend/cuda/common.cuh"
#include "backend/cuda/cuda_util.h"
#include "backend/cuda/gemv_dense_v2.h"
#include "backend/cuda/gemv_dots.cuh"
#include "backend/cuda/gemv_moe_v2.h"
#include "backend/cuda/pdl.cuh"
#include "backend/cuda/q8k_act.cuh"
#include "common/error.h"
#include "quant/blocks.h"
#include "quant/iq2xxs_tables.h"

namespace dsv4::cuda {
namespace {

constexpr int kWarpsPerCta = 4;      // CTA size when every warp owns a whole row
constexpr int kMaxWarpsPerCta = 16;  // and the most warps one row is split across

// Shared-memory table for IQ2_XXS: the 256-entry magnitude grid (divergent indices, so not __constant__). Signs
// are expanded in registers (sign_bytes): a sign flip is (g ^ m) - m per byte with m = 0xFF where negative.
struct Iq2Smem {
  uint2 grid[256];
};

// 4 sign bits -> 4 byte masks (0xFF where the bit is set): the shifted copies of b never overlap, so the
// multiply spreads bit i to bit 8i without carries.
__device__ __forceinline__ uint32_t sign_bytes(uint32_t b) { return ((b * 0x00204081u) & 0x01010101u) * 0xFFu; }

// ---- per-type traits -------------------------------------------------------------------------------------------
struct TraitsQ8_0 {
  static constexpr int kTpb = 4;  // lanes per block: 8 values each
  static constexpr int kUnroll = 1;
  static constexpr int kBlockElems = kQK8_0;
  static constexpr int kBlockBytes = sizeof(block_q8_0);
  static constexpr int kActBlockBytes = sizeof(block_q8_0);
  struct W {
    float d;
    int q0, q1;
  };
  __device__ static W load(const uint8_t* blk, int sub, const Iq2Smem*) {
    const uint8_t* qs = blk + 2 + 8 * sub;
    return {__half2float(__ushort_as_half(*reinterpret_cast<const uint16_t*>(blk))), load_i32_a2(qs),
            load_i32_a2(qs + 4)};
  }
  __device__ static float dot(const W& w, const uint8_t* act, int sub) {
    const uint8_t* qs = act + 2 + 8 * sub;
    const int s = __dp4a(w.q0, load_i32_a2(qs), __dp4a(w.q1, load_i32_a2(qs + 4), 0));
    const float da = __half2float(__ushort_as_half(*reinterpret_cast<const uint16_t*>(act)));
    return w.d * da * float(s);
  }
};

struct TraitsQ4_K : DotQ4_K {
  static constexpr int kTpb = 16;  // lane: 8 low-nibble values of sub-block 2c and 8 high of 2c+1
  static constexpr int kUnroll = 1;
  static constexpr int kBlockElems = kQK_K;
  static constexpr int kBlockBytes = sizeof(block_q4_K);
  static constexpr int kActBlockBytes = sizeof(ActQ8K);
  __device__ static W load(const uint8_t* blk, int sub, const Iq2Smem*) {
    const block_q4_K* b = reinterpret_cast<const block_q4_K*>(blk);
    const int c = sub >> 2, part = sub & 3;
    const uint2 q = *reinterpret_cast<const uint2*>(b->qs + 32 * c + 8 * part);
    W w;
    w.d = __half2float(__ushort_as_half(b->d));
    w.dmin = __half2float(__ushort_as_half(b->dmin));
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

struct TraitsQ2_K : DotQ2_K {
  static constexpr int kTpb = 16;  // lane t: qs bytes 4t..4t+3 (16 values: 4 per 2-bit plane)
  static constexpr int kUnroll = 1;
  static constexpr int kBlockElems = kQK_K;
  static constexpr int kBlockBytes = sizeof(block_q2_K);
  static constexpr int kActBlockBytes = sizeof(ActQ8K);
  __device__ static W load(const uint8_t* blk, int sub, const Iq2Smem*) {
    const block_q2_K* b = reinterpret_cast<const block_q2_K*>(blk);
    const int h = sub >> 3, hi = (sub & 7) >= 4;  // l0 = 4 * (sub & 7) >= 16
    W w;
    w.d = __half2float(__ushort_as_half(b->d));
    w.dmin = __half2float(__ushort_as_half(b->dmin));
    w.q = load_i32_a4(b->qs + 4 * sub);
#pragma unroll
    for (int s = 0; s < 4; ++s) w.sc[s] = b->scales[8 * h + 2 * s + hi] & 15;
    w.m = b->scales[sub] >> 4;
    return w;
  }
};

struct TraitsIQ2_XXS : DotIQ2_XXS {
  static constexpr int kTpb = 8;  // lane g: the 32-value group g
  static constexpr int kUnroll = 1;
  static constexpr int kBlockElems = kQK_K;
  static constexpr int kBlockBytes = sizeof(block_iq2_xxs);
  static constexpr int kActBlockBytes = sizeof(ActQ8K);
  __device__ static W load(const uint8_t* blk, int g, const Iq2Smem* t) {
    const uint8_t* q = blk + 2 + 8 * g;
    const uint32_t a0 = uint32_t(load_i32_a2(q)), a1 = uint32_t(load_i32_a2(q + 4));
    W w;
    w.d = __half2float(__ushort_as_half(*reinterpret_cast<const uint16_t*>(blk)));
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint2 gv = t->grid[(a0 >> (8 * k)) & 255u];
      const uint32_t code = (a1 >> (7 * k)) & 127u;
      const uint32_t sg = code | ((__popc(code) & 1u) << 7);  // ksigns_iq2xs: even-parity eighth bit
      const uint32_t mlo = sign_bytes(sg & 15u), mhi = sign_bytes(sg >> 4);
      w.v[2 * k] = int(__vsub4(gv.x ^ mlo, mlo));
      w.v[2 * k + 1] = int(__vsub4(gv.y ^ mhi, mhi));
    }
    w.ls = int(2 * (a1 >> 28) + 1);
    return w;
  }
};

// IQ2_XXS grid as byte-permute selectors: entry i holds, in nibble k, the code (0, 1, 2) of grid byte k (each grid
// byte is one of 8, 25, 43), and __byte_perm(0x002B1908, 0, sel) expands 4 nibbles back to 4 magnitude bytes. A
// 4-byte entry (vs 8) halves the shared-memory words touched; `rep` interleaved copies (entry i of copy c at word
// i * rep + c, lane l reading copy l % rep) spread a warp's 32 random lookups over the banks: with rep = 32 every
// lane owns a bank and a lookup instruction is one conflict-free wavefront.
// Threads < 256 derive one selector each (scratch: 256 words), then all threads replicate them; consecutive
// threads write consecutive words, so the replication is free of bank conflicts. The first measurement derived
// every copy separately (8192 derivations per CTA at rep = 32) and that alone made the kernel 2.5x slower.
__device__ __forceinline__ void fill_iq2_selectors(uint32_t* tab, uint32_t* scratch, int rep_shift) {
  for (int i = threadIdx.x; i < 256; i += blockDim.x) {
    const uint64_t g = iq2xxs_grid[i];
    uint32_t sel = 0;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const uint32_t b = uint32_t(g >> (8 * k)) & 0xFFu;
      sel |= (b == 0x08u ? 0u : (b == 0x19u ? 1u : 2u)) << (4 * k);
    }
    scratch[i] = sel;
  }
  __syncthreads();
  const int n = 256 << rep_shift;
  for (int i = threadIdx.x; i < n; i += blockDim.x) tab[i] = scratch[i >> rep_shift];
}

struct TraitsIQ2Sel : TraitsIQ2_XXS {
  __device__ static W load_sel(const uint8_t* blk, int g, const uint32_t* tab, int rep_shift, int copy) {
    const uint8_t* q = blk + 2 + 8 * g;
    const uint32_t a0 = uint32_t(load_i32_a2(q)), a1 = uint32_t(load_i32_a2(q + 4));
    W w;
    w.d = __half2float(__ushort_as_half(*reinterpret_cast<const uint16_t*>(blk)));
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint32_t sel = tab[(((a0 >> (8 * k)) & 255u) << rep_shift) + copy];
      const uint32_t code = (a1 >> (7 * k)) & 127u;
      const uint32_t sg = code | ((__popc(code) & 1u) << 7);
      const uint32_t mlo = sign_bytes(sg & 15u), mhi = sign_bytes(sg >> 4);
      w.v[2 * k] = int(__vsub4(__byte_perm(0x002B1908u, 0u, sel) ^ mlo, mlo));
      w.v[2 * k + 1] = int(__vsub4(__byte_perm(0x002B1908u, 0u, sel >> 16) ^ mhi, mhi));
    }
    w.ls = int(2 * (a1 >> 28) + 1);
    return w;
  }
  // Streaming kernel (opt-in, iq2_rep >= 2): 8 copies (rep_shift 3; 8 KiB), the staged kernel's best setting.
  static constexpr int kRepShift = 3;
  __device__ static W load(const uint8_t* blk, int g, const Iq2Smem* t) {
    return load_sel(blk, g, reinterpret_cast<const uint32_t*>(t), kRepShift, int(threadIdx.x) & ((1 << kRepShift) - 1));
  }
};
// The staged kernel passes its own table copy count (GemvParams::iq2_rep).
struct TraitsIQ2Staged : TraitsIQ2Sel {};

struct TraitsF16 {
  static constexpr int kTpb = 1;  // a "block" is 8 halves (16 bytes) per lane
  static constexpr int kUnroll = 1;
  static constexpr int kBlockElems = 8;
  static constexpr int kBlockBytes = 16;
  static constexpr int kActBlockBytes = 32;  // 8 floats
  struct W {
    float v[8];
  };
  __device__ static W load(const uint8_t* blk, int, const Iq2Smem*) {
    const uint4 raw = *reinterpret_cast<const uint4*>(blk);
    const __half2* h = reinterpret_cast<const __half2*>(&raw);
    W w;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(h[i]);
      w.v[2 * i] = f.x, w.v[2 * i + 1] = f.y;
    }
    return w;
  }
  __device__ static float dot(const W& w, const uint8_t* act, int) {
    const float4 a = *reinterpret_cast<const float4*>(act);
    const float4 b = *reinterpret_cast<const float4*>(act + 16);
    return w.v[0] * a.x + w.v[1] * a.y + w.v[2] * a.z + w.v[3] * a.w + w.v[4] * b.x + w.v[5] * b.y +
           w.v[6] * b.z + w.v[7] * b.w;
  }
};

struct TraitsF32 {
  static constexpr int kTpb = 1;  // a "block" is 4 floats (16 bytes) per lane
  static constexpr int kUnroll = 1;
  static constexpr int kBlockElems = 4;
  static constexpr int kBlockBytes = 16;
  static constexpr int kActBlockBytes = 16;
  struct W {
    float4 v;
  };
  __device__ static W load(const uint8_t* blk, int, const Iq2Smem*) { return {*reinterpret_cast<const float4*>(blk)}; }
  __device__ static float dot(const W& w, const uint8_t* act, int) {
    const float4 a = *reinterpret_cast<const float4*>(act);
    return w.v.x * a.x + w.v.y * a.y + w.v.z * a.z + w.v.w * a.w;
  }
};

// Q8_0 repacked at upload (q8_0_split_cuda): row r = [cols int8 quants][cols/32 f16 scales], rows of
// cols * 17/16 bytes (cols % 256 == 0 keeps every row 16-byte aligned). A lane takes 16 quants per step with one
// 16-byte load instead of eight 16-bit loads from 34-byte blocks; activations use the matching split layout
// ([cols int8][cols/32 f32 scales], the f32 being the CPU's f16 scale widened, so products are identical).
struct TraitsQ8Split {
  static constexpr int kTpb = 1;
  static constexpr int kUnroll = 2;  // H200 sweep: 2 beat 1 at every split shape
  static constexpr int kBlockElems = 16;
  struct W {
    int4 q;
    float d;
  };
  __device__ static W load_split(const uint8_t* wrow, int64_t b, int64_t cols) {
    const __half d = reinterpret_cast<const __half*>(wrow + cols)[b >> 1];
    return {*reinterpret_cast<const int4*>(wrow + 16 * b), __half2float(d)};
  }
  __device__ static float dot_split(const W& w, const uint8_t* act, int64_t b, int64_t cols) {
    const int4 a = *reinterpret_cast<const int4*>(act + 16 * b);
    const float da = reinterpret_cast<const float*>(act + cols)[b >> 1];
    int s = __dp4a(w.q.x, a.x, 0);
    s = __dp4a(w.q.y, a.y, s);
    s = __dp4a(w.q.z, a.z, s);
    s = __dp4a(w.q.w, a.w, s);
    return w.d * da * float(s);
  }
};

template <class T>
constexpr bool kIsSplit = std::is_same_v<T, TraitsQ8Split>;

// Whether T's activations are Q8_K blocks (ActQ8K): Q2_K, Q4_K, IQ2_XXS.
template <class T>
constexpr bool act_is_q8k() {
  if constexpr (kIsSplit<T>) return false;
  else return T::kActBlockBytes == int(sizeof(ActQ8K));
}

template <class T>
int64_t weight_row_bytes(int64_t cols) {
  if constexpr (kIsSplit<T>) return cols + cols / 16;
  else return cols / T::kBlockElems * T::kBlockBytes;
}
template <class T>
int64_t act_row_bytes_of(int64_t cols) {
  if constexpr (kIsSplit<T>) return cols + cols / 8;
  else return cols / T::kBlockElems * T::kActBlockBytes;
}

// ---- the kernel --------------------------------------------------------------------------------------------------
template <class T>
constexpr bool kIsIq2 = std::is_same_v<T, TraitsIQ2_XXS> || std::is_same_v<T, TraitsIQ2Sel>;

// Shared-memory bytes of the streaming kernel's IQ2_XXS table: the 2 KiB uint2 grid, or 8 selector copies (8 KiB)
// plus the 1 KiB scratch they are built in.
template <class T>
constexpr size_t iq2_table_bytes() {
  if constexpr (std::is_same_v<T, TraitsIQ2_XXS>) return sizeof(Iq2Smem);
  else if constexpr (std::is_same_v<T, TraitsIQ2Sel>) return (256u << TraitsIQ2Sel::kRepShift) * 4 + 256 * 4;
  else return 0;
}

template <class T>
__device__ void load_iq2_tables(Iq2Smem* t) {
  if constexpr (std::is_same_v<T, TraitsIQ2_XXS>) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) {
      const uint64_t g = iq2xxs_grid[i];
      t->grid[i] = make_uint2(uint32_t(g), uint32_t(g >> 32));
    }
    __syncthreads();
  } else if constexpr (std::is_same_v<T, TraitsIQ2Sel>) {
    uint32_t* tab = reinterpret_cast<uint32_t*>(t);
    fill_iq2_selectors(tab, tab + (256 << TraitsIQ2Sel::kRepShift), TraitsIQ2Sel::kRepShift);
    __syncthreads();
  }
}

// A warp owns R consecutive rows (the activations it loads serve all R) and the CTA's warps are grouped wpr per
// row group (wpr > 1 splits few-and-long rows, e.g. HC control's 24 rows, across warps; partials meet in shared
// memory in a fixed order). Each step issues U blocks' loads per row before any arithmetic, so a warp keeps
// several KiB in flight. U and R are template knobs swept by dev/cuda/gemv.cu (GemvParams::unroll/row_group).
// SW (fused MoE gate + up + SwiGLU, R = 2): a warp's two rows are row r of w (gate) and row r of w2 (up) of one
// slot, sharing the activation loads, and lane 0 writes swiglu(g, u) * route_w[slot] to y[slot][r].
struct SwigluArgs {
  const float* route_w = nullptr;
  float clamp = 0.0f;
};

template <class T, int NT, int U, int R, bool SW = false>
__global__ void __launch_bounds__(32 * kMaxWarpsPerCta) gemv_kernel(GemvParams p, int64_t row_bytes,
                                                                    int64_t act_row_bytes, int wpr, SwigluArgs sw) {
  static_assert(!SW || (R == 2 && NT == 1), "SwiGLU mode: one token, gate and up rows");
  extern __shared__ uint2 dyn_smem[];  // sizeof(Iq2Smem) for IQ2_XXS, empty otherwise
  Iq2Smem* tables = reinterpret_cast<Iq2Smem*>(dyn_smem);
  __shared__ float partial[kMaxWarpsPerCta][R * NT];
  pdl_trigger();  // PDL (pdl.cuh): the next kernel may become resident; it waits for this one itself
  load_iq2_tables<T>(tables);  // constant data: before the wait, overlapping the previous kernel's tail
  pdl_wait();  // activations, expert ids (and y) come from earlier kernels

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int groups_per_cta = int(blockDim.x >> 5) / wpr;
  const int64_t row0 = (int64_t(blockIdx.x) * groups_per_cta + warp / wpr) * (SW ? 1 : R);
  const int part = warp % wpr;
  // grid.y covers the slots of w, then (paired launch) the same slots of w2; SwiGLU mode: the slots once.
  const bool second = !SW && int(blockIdx.y) >= p.n_slots;
  const int slot = second ? int(blockIdx.y) - p.n_slots : int(blockIdx.y);
  const int64_t expert = p.expert_ids ? p.expert_ids[slot] : 0;
  const uint8_t* wbase = static_cast<const uint8_t*>(second ? p.w2 : p.w) + expert * p.expert_stride;
  float* y = second ? p.y2 : p.y;
  const uint8_t* wrow[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if constexpr (SW)
      wrow[r] = (r == 0 ? wbase : static_cast<const uint8_t*>(p.w2) + expert * p.expert_stride) +
                std::min<int64_t>(row0, p.rows - 1) * row_bytes;
    else
      wrow[r] = wbase + std::min<int64_t>(row0 + r, p.rows - 1) * row_bytes;
  }
  const int64_t act_row0 = int64_t(slot / p.act_slot_div) * p.n_tokens;
  const uint8_t* act = static_cast<const uint8_t*>(p.xq) + act_row0 * act_row_bytes;

  constexpr int kBlocksPerStep = 32 / T::kTpb;
  const int sub = lane % T::kTpb;
  const int64_t n_blocks = row0 < p.rows ? p.cols / T::kBlockElems : 0;
  const int64_t stride = int64_t(kBlocksPerStep) * wpr;
  float acc[R][NT];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int t = 0; t < NT; ++t) acc[r][t] = 0.0f;
  for (int64_t b0 = int64_t(part) * kBlocksPerStep + lane / T::kTpb; b0 < n_blocks; b0 += stride * U) {
    typename T::W w[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t b = b0 + u * stride;
      if (b < n_blocks)
#pragma unroll
        for (int r = 0; r < R; ++r) {
          if constexpr (kIsSplit<T>) w[u][r] = T::load_split(wrow[r], b, p.cols);
          else w[u][r] = T::load(wrow[r] + b * T::kBlockBytes, sub, tables);
        }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t b = b0 + u * stride;
      if (b < n_blocks) {
#pragma unroll
        for (int t = 0; t < NT; ++t)
#pragma unroll
          for (int r = 0; r < R; ++r)
          {
            if constexpr (kIsSplit<T>) acc[r][t] += T::dot_split(w[u][r], act + t * act_row_bytes, b, p.cols);
            else acc[r][t] += T::dot(w[u][r], act + t * act_row_bytes + b * T::kActBlockBytes, sub);
          }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int t = 0; t < NT; ++t) acc[r][t] = warp_sum(acc[r][t]);
  if (wpr > 1) {
    if (lane == 0)
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int t = 0; t < NT; ++t) partial[warp][r * NT + t] = acc[r][t];
    __syncthreads();
    if (part != 0) return;
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int t = 0; t < NT; ++t)
        for (int j = 1; j < wpr; ++j) acc[r][t] += partial[warp + j][r * NT + t];  // fixed order: deterministic
  }
  if constexpr (SW) {
    if (lane == 0 && row0 < p.rows) {
      // Same operations and roundings as swiglu_kernel (moe.cu) and the CPU backend.
      const float gc = fminf(acc[0][0], sw.clamp);
      const float uc = fmaxf(fminf(acc[1][0], sw.clamp), -sw.clamp);
      const float h = __fmul_rn(gc / (1.0f + expf(-gc)), uc);
      p.y[int64_t(slot) * p.rows + row0] = sw.route_w ? __fmul_rn(h, sw.route_w[slot]) : h;
    }
  } else if (lane == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r)
      if (row0 + r < p.rows)
#pragma unroll
        for (int t = 0; t < NT; ++t) y[(int64_t(slot) * p.n_tokens + t) * p.rows + row0 + r] = acc[r][t];
  }
}

template <class T, int NT, int U, int R, bool SW = false>
void launch(const GemvParams& p, cudaStream_t stream, SwigluArgs sw = {}) {
  const int64_t row_bytes = weight_row_bytes<T>(p.cols);
  const int64_t act_row_bytes = act_row_bytes_of<T>(p.cols);
  // Enough warps to fill the card (132 SMs x 64 resident warps ~ 8k): row groups are split across warps until
  // there are 8k warps, or 16 per group. Measured on H200 (wb_gemv): 4096 rows of 8192 Q8_0 columns ran at 35% of
  // the read bandwidth with one warp per row, because each warp walks its long row one dependent step at a time.
  const int64_t total_groups = SW ? p.rows * p.n_slots : (p.rows + R - 1) / R * p.n_slots * (p.w2 ? 2 : 1);
  int wpr = 1;
  while (wpr < kMaxWarpsPerCta && total_groups * wpr < 8192) wpr *= 2;
  // IQ2_XXS CTAs first copy the 2 KiB grid to shared memory: bigger CTAs amortize that copy over more rows.
  const int base_warps = p.cta_warps ? p.cta_warps : (kIsIq2<T> ? 16 : kWarpsPerCta);
  const int warps = std::max(base_warps, wpr);
  const int rows_per_cta = warps / wpr * (SW ? 1 : R);
  const dim3 grid(unsigned((p.rows + rows_per_cta - 1) / rows_per_cta),
                  unsigned(p.n_slots * (p.w2 && !SW ? 2 : 1)));
  const size_t smem = iq2_table_bytes<T>();
  launch_pdl("gemv_kernel", gemv_kernel<T, NT, U, R, SW>, grid, dim3(unsigned(32 * warps)), smem, stream, p, row_bytes,
             act_row_bytes, wpr, sw);
}

// Single-token launches take the (unroll, row_group) knobs; batched ones use the type's defaults.
template <class T>
void launch_tuned(const GemvParams& p, cudaStream_t stream) {
  // Default rows per warp from the H200 sweeps (wb_gemv): 2 for matrices of >= 16 MiB (one activation load feeds
  // both rows), 4 for Q2_K expert down projections, 1 for smaller matrices (Q8_0 4096->1024: 4.7 us vs 5.6 us
  // with 2). Four rows per warp looked best for big block-layout Q8_0 in one run and 30-40% slower in a later
  // one on another machine (more registers, fewer resident warps), so 2 is the safe choice.
  const int64_t bytes = p.rows * weight_row_bytes<T>(p.cols) * p.n_slots * (p.w2 ? 2 : 1);
  const int auto_r = std::is_same_v<T, TraitsQ2_K> ? 4 : (bytes >= (16ll << 20) ? 2 : 1);
  const int u = p.unroll ? p.unroll : T::kUnroll, r = p.row_group ? p.row_group : auto_r;
#define DSV4_GEMV_CASE(U_, R_) \
  if (u == U_ && r == R_) return launch<T, 1, U_, R_>(p, stream);
  DSV4_GEMV_CASE(1, 1) DSV4_GEMV_CASE(2, 1) DSV4_GEMV_CASE(4, 1)
  DSV4_GEMV_CASE(1, 2) DSV4_GEMV_CASE(2, 2) DSV4_GEMV_CASE(4, 2)
  DSV4_GEMV_CASE(1, 4) DSV4_GEMV_CASE(2, 4)
#undef DSV4_GEMV_CASE
  fail("gemv_cuda: no kernel for unroll=%d row_group=%d (unroll 1/2/4 with row_group 1/2, 1/2 with 4)", u, r);
}

template <class T>
void launch_tokens(const GemvParams& p, cudaStream_t stream) {
  constexpr int U = T::kUnroll, R = 1;
  switch (p.n_tokens) {
    case 1: return launch_tuned<T>(p, stream);
    case 2: return launch<T, 2, U, R>(p, stream);
    case 3: return launch<T, 3, U, R>(p, stream);
    case 4: return launch<T, 4, U, R>(p, stream);
    case 5: return launch<T, 5, U, R>(p, stream);
    case 6: return launch<T, 6, U, R>(p, stream);
    case 7: return launch<T, 7, U, R>(p, stream);
    case 8: return launch<T, 8, U, R>(p, stream);
    default: fail("gemv_cuda: %d tokens per launch (max %d)", p.n_tokens, kGemvMaxTokens);
  }
}

// ---- the staged kernel (single token per slot) -------------------------------------------------------------------
// Why: a decode GEMV reads 5-30 MB, which takes only 1-7 us at full bandwidth, so the DRAM pipe must be full from
// the first microsecond. The register-streaming kernel above keeps a few KiB per warp in flight and walks each row
// in dependent steps; here each CTA issues cp.async copies of its whole tile of rows (tens of KiB) at once, so one
// wave of CTAs has most of the matrix requested before any arithmetic, then decodes from shared memory. The tile is
// split into kStages commit groups so the first half is decoded while the second is still arriving.
//
// A CTA covers rows [r0, r0 + tile_rows) of `segs` row spans ("segments") that its epilogue combines:
//   Store:  1 segment  (slot or, for a paired launch, slot of w2), y[slot][r] = dot
//   Swiglu: 2 segments (gate and up of one slot), y[slot][r] = swiglu(g, u) * route_w[slot]
//   Sum:    k segments (the k slots of token t), y[t][r] += sum_j dot_j (j in order)
// Work unit = one (segment, row) dot; a warp takes R units that share an activation row (R consecutive rows of
// one segment, or gate+up of the same rows), so one activation load feeds R rows.
constexpr int kStages = 2;
constexpr int kStagedMaxSegs = 16;
enum class Epi : int { Store, Swiglu, Sum };

struct StagedArgs {
  GemvParams p;
  int64_t row_bytes = 0, act_row_bytes = 0;
  int tile_rows = 0, segs = 1, iq2_rep = 1, parts = 1;
  int table_bytes = 0;  // shared-memory bytes of the IQ2_XXS table (0 for other types)
  int64_t act_offset = 0;  // p.xf: byte offset of the segments' quantized activation rows in shared memory
  const float* route_w = nullptr;
  float clamp = 0.0f;
};

// R dots of rows (shared memory) with one activation row (global, L1-resident): acc[r] += row_r . act over part
// `part` of `parts` equal ranges of the row's blocks (the last range may be shorter).
template <class T, int R>
__device__ __forceinline__ void staged_dots(const uint8_t* (&rows)[R], const uint8_t* act, int64_t cols, int part,
                                            int parts, const uint32_t* tab, int rep_shift, float (&acc)[R]) {
  const int lane = threadIdx.x & 31;
  const int64_t nb = cols / T::kBlockElems;
  const int64_t per_part = (nb + parts - 1) / parts;
  const int64_t b_begin = part * per_part, b_end = std::min<int64_t>(nb, b_begin + per_part);
  if constexpr (kIsSplit<T>) {
    for (int64_t b = b_begin + lane; b < b_end; b += 32) {
      typename T::W w[R];
#pragma unroll
      for (int r = 0; r < R; ++r) w[r] = T::load_split(rows[r], b, cols);
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r] += T::dot_split(w[r], act, b, cols);
    }
  } else {
    constexpr int kStep = 32 / T::kTpb;
    const int sub = lane % T::kTpb;
    const int copy = lane & ((1 << rep_shift) - 1);
    for (int64_t b = b_begin + lane / T::kTpb; b < b_end; b += kStep) {
      typename T::W w[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if constexpr (std::is_same_v<T, TraitsIQ2Staged>)
          w[r] = T::load_sel(rows[r] + b * T::kBlockBytes, sub, tab, rep_shift, copy);
        else
          w[r] = T::load(rows[r] + b * T::kBlockBytes, sub, nullptr);
      }
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r] += T::dot(w[r], act + b * T::kActBlockBytes, sub);
    }
  }
}

// Warps per row for the staged kernel: enough that each warp still walks >= 4 steps of its range; a function of
// the row length only (see the kernel).
template <class T>
int staged_parts(int64_t cols) {
  const int64_t nb = cols / T::kBlockElems;
  const int64_t step = kIsSplit<T> ? 32 : 32 / T::kTpb;
  return int(std::clamp<int64_t>(nb / (4 * step), 1, 8));
}

template <class T, Epi E, int R>
__global__ void __launch_bounds__(32 * kMaxWarpsPerCta) gemv_staged_kernel(StagedArgs a) {
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ const uint8_t* seg_w[kStagedMaxSegs];
  __shared__ const uint8_t* seg_act[kStagedMaxSegs];
  __shared__ const float* seg_xf[kStagedMaxSegs];
  const GemvParams& p = a.p;
  pdl_trigger();  // PDL (pdl.cuh)
  pdl_wait();     // expert ids, activations and y (Sum accumulates) come from earlier kernels
  uint32_t* tab = reinterpret_cast<uint32_t*>(smem);
  uint8_t* tile = smem + a.table_bytes;
  float* res = reinterpret_cast<float*>(tile + int64_t(a.segs) * a.tile_rows * a.row_bytes);
  const int64_t r0 = int64_t(blockIdx.x) * a.tile_rows;
  const int n_valid = int(std::min<int64_t>(a.tile_rows, p.rows - r0));

  // Segment -> weight rows and activation row.
  const int yb = int(blockIdx.y);
  int out_slot = yb;  // Store/Swiglu: the slot written; Sum: the token
  if (threadIdx.x < a.segs) {
    const int s = int(threadIdx.x);
    int slot = yb;
    const void* mat = p.w;
    if constexpr (E == Epi::Store) {
      if (yb >= p.n_slots) slot = yb - p.n_slots, mat = p.w2;
    } else if constexpr (E == Epi::Swiglu) {
      if (s == 1) mat = p.w2;
    } else {
      slot = yb * a.segs + s;
    }
    const int64_t expert = p.expert_ids ? p.expert_ids[slot] : 0;
    seg_w[s] = static_cast<const uint8_t*>(mat) + expert * p.expert_stride + r0 * a.row_bytes;
    if (p.xf) {  // quantized below into this CTA's shared memory
      seg_act[s] = smem + a.act_offset + int64_t(s) * a.act_row_bytes;
      seg_xf[s] = p.xf + int64_t(slot / p.act_slot_div) * p.cols;
    } else {
      seg_act[s] = static_cast<const uint8_t*>(p.xq) + int64_t(slot / p.act_slot_div) * a.act_row_bytes;
    }
  }
  __syncthreads();

  // Issue every copy of the tile (kStages commit groups), then build the lookup table while they fly.
  const int rows_per_stage = a.tile_rows / kStages;
  const int64_t chunks_per_row = a.row_bytes / 16;
#pragma unroll
  for (int st = 0; st < kStages; ++st) {
    const int first = st * rows_per_stage;
    const int n_rows = std::max(0, std::min(rows_per_stage, n_valid - first));
    const int n16 = int(n_rows * chunks_per_row);  // 32-bit: a tile is < 200 KiB
    for (int s = 0; s < a.segs; ++s) {
      const uint8_t* src = seg_w[s] + int64_t(first) * a.row_bytes;
      uint8_t* dst = tile + (int64_t(s) * a.tile_rows + first) * a.row_bytes;
      for (int i = threadIdx.x; i < n16; i += blockDim.x) __pipeline_memcpy_async(dst + 16 * i, src + 16 * i, 16);
    }
    __pipeline_commit();
  }
  int rep_shift = 0;
  if constexpr (std::is_same_v<T, TraitsIQ2Staged>) {
    rep_shift = __ffs(a.iq2_rep) - 1;
    fill_iq2_selectors(tab, reinterpret_cast<uint32_t*>(res), rep_shift);  // res is free until the first dot
  }
  // Float activations (p.xf, Q8_K partner types): each CTA quantizes its segments' rows while the copies fly;
  // the first stage's barrier below publishes them.
  if constexpr (act_is_q8k<T>()) {
    if (p.xf) {
      const int nb = int(p.cols / kQK_K), n_warps_q = int(blockDim.x >> 5);
      for (int i = int(threadIdx.x >> 5); i < a.segs * nb; i += n_warps_q) {
        const int s = i / nb, j = i % nb;
        quantize_q8_K_block_warp(seg_xf[s] + int64_t(j) * kQK_K,
                                 reinterpret_cast<ActQ8K*>(const_cast<uint8_t*>(seg_act[s])) + j);
      }
    }
  }

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, n_warps = blockDim.x >> 5;
  const int units = rows_per_stage * a.segs;  // per stage; a multiple of R (launcher)
  // A long row is split into a.parts contiguous ranges of blocks, each dotted by its own warp (a tile of a few
  // long rows would otherwise keep only one or two warps busy); the parts' sums are added in part order in the
  // epilogue. a.parts depends on the row length only, so every epilogue and tiling sums a row identically.
  const int P = a.parts, work = units / R * P;
#pragma unroll
  for (int st = 0; st < kStages; ++st) {
    if (st == 0) __pipeline_wait_prior(kStages - 1);
    else __pipeline_wait_prior(0);
    __syncthreads();
    for (int wi = warp; wi < work; wi += n_warps) {
      const int item = wi / P, part = wi % P;
      const uint8_t* rows[R];
      int seg[R], row[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int u = item * R + r;
        if constexpr (E == Epi::Sum) seg[r] = u / rows_per_stage, row[r] = st * rows_per_stage + u % rows_per_stage;
        else seg[r] = u % a.segs, row[r] = st * rows_per_stage + u / a.segs;
        rows[r] = tile + (int64_t(seg[r]) * a.tile_rows + row[r]) * a.row_bytes;
      }
      float acc[R];
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r] = 0.0f;
      staged_dots<T, R>(rows, seg_act[seg[0]], p.cols, part, P, tab, rep_shift, acc);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        acc[r] = warp_sum(acc[r]);
        if (lane == 0) res[(seg[r] * a.tile_rows + row[r]) * P + part] = acc[r];
      }
    }
  }
  __syncthreads();
  // Row value of (segment s, tile row i): its parts in order.
  const auto value = [&](int s, int i) {
    float v = res[(s * a.tile_rows + i) * P];
    for (int q = 1; q < P; ++q) v += res[(s * a.tile_rows + i) * P + q];
    return v;
  };
  for (int i = threadIdx.x; i < n_valid; i += blockDim.x) {
    const int64_t r = r0 + i;
    if constexpr (E == Epi::Store) {
      float* y = yb >= p.n_slots ? p.y2 : p.y;
      y[int64_t(yb % p.n_slots) * p.rows + r] = value(0, i);
    } else if constexpr (E == Epi::Swiglu) {
      // Same operations and roundings as swiglu_kernel (moe.cu) and the CPU backend.
      const float gc = fminf(value(0, i), a.clamp);
      const float uc = fmaxf(fminf(value(1, i), a.clamp), -a.clamp);
      const float h = __fmul_rn(gc / (1.0f + expf(-gc)), uc);
      p.y[int64_t(out_slot) * p.rows + r] = a.route_w ? __fmul_rn(h, a.route_w[out_slot]) : h;
    } else {
      float s = 0.0f;
      for (int j = 0; j < a.segs; ++j) s += value(j, i);
      p.y[int64_t(out_slot) * p.rows + r] += s;
    }
  }
}

template <class T, Epi E, int R>
void launch_staged_r(StagedArgs a, dim3 grid, int threads, size_t smem, cudaStream_t stream) {
  static size_t smem_set = 48 << 10;  // the default limit; larger tiles opt in once per instantiation
  if (smem > smem_set) {
    check(cudaFuncSetAttribute(gemv_staged_kernel<T, E, R>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
          "gemv_staged_kernel smem");
    smem_set = smem;
  }
  launch_pdl("gemv_staged_kernel", gemv_staged_kernel<T, E, R>, grid, dim3(unsigned(threads)), smem, stream, a);
}

template <class T, Epi E>
void launch_staged(const GemvParams& p, int segs, const float* route_w, float clamp, cudaStream_t stream) {
  StagedArgs a;
  a.p = p, a.segs = segs, a.route_w = route_w, a.clamp = clamp;
  a.row_bytes = weight_row_bytes<T>(p.cols);
  a.act_row_bytes = act_row_bytes_of<T>(p.cols);
  a.parts = staged_parts<T>(p.cols);
  // Rows per warp: 4 for Q2_K (H200 sweep: 13.2 us vs 17.2 us for the 6-expert down projection), else 2.
  const int R = p.row_group == 4 || (p.row_group == 0 && std::is_same_v<T, TraitsQ2_K>) ? 4 : 2;
  const int quantum = kStages * R;  // tile rows: whole R-groups in every stage
  const int ys = E == Epi::Store ? p.n_slots * (p.w2 ? 2 : 1) : (E == Epi::Swiglu ? p.n_slots : p.n_slots / segs);
  if (p.tile_rows > 0) {
    a.tile_rows = (p.tile_rows + quantum - 1) / quantum * quantum;
  } else if (int64_t(segs) * 32 * a.row_bytes <= (64 << 10)) {
    a.tile_rows = 32;  // H200 sweeps: 32-row tiles were the best or within noise of it for every MoE case
  } else {
    // Aim for ~4 CTAs per SM over the whole launch (one wave, everything requested up front), with tiles of
    // 8-40 KiB: smaller tiles waste the per-CTA setup, larger ones leave SMs idle at the tail.
    // H200 sweep (first run): 32-row tiles beat 8 and 16 for every MoE case (per-CTA setup is not free).
    const int64_t total = a.row_bytes * p.rows * segs * ys;
    const int64_t target = std::clamp<int64_t>(total / (int64_t(sm_count()) * 2), 16 << 10, 64 << 10);
    const int64_t tr = target / (a.row_bytes * segs) / quantum * quantum;
    a.tile_rows = int(std::max<int64_t>(quantum, tr));
  }
  a.tile_rows = int(std::min<int64_t>(a.tile_rows, (p.rows + quantum - 1) / quantum * quantum));
  if constexpr (std::is_same_v<T, TraitsIQ2Staged>) {
    a.iq2_rep = p.iq2_rep ? p.iq2_rep : 8;  // 8 won every H200 sweep (32 copies cost more shared memory)
    a.table_bytes = 256 * 4 * a.iq2_rep;
  }
  // res: segs x tile_rows results; IQ2_XXS also borrows it as the 256-word selector scratch before the dots.
  const size_t res_floats = std::max<size_t>(size_t(segs) * a.tile_rows * a.parts, a.table_bytes ? 256 : 0);
  size_t smem = size_t(a.table_bytes) + size_t(segs) * a.tile_rows * a.row_bytes + res_floats * sizeof(float);
  if (p.xf) {  // the segments' quantized activation rows (16-byte aligned: ActQ8K loads)
    a.act_offset = int64_t((smem + 15) / 16 * 16);
    smem = size_t(a.act_offset) + size_t(segs) * size_t(a.act_row_bytes);
  }
  if (smem > (200u << 10))
    fail("gemv_cuda: staged tile of %d rows x %d segments needs %zu bytes of shared memory", a.tile_rows, segs, smem);
  const int threads = 32 * (p.cta_warps ? p.cta_warps : 8);
  const dim3 grid(unsigned((p.rows + a.tile_rows - 1) / a.tile_rows), unsigned(ys));
  if (R == 4) launch_staged_r<T, E, 4>(a, grid, threads, smem, stream);
  else launch_staged_r<T, E, 2>(a, grid, threads, smem, stream);
}

template <Epi E>
void dispatch_staged(const GemvParams& p, int segs, const float* route_w, float clamp, cudaStream_t stream) {
  switch (p.wtype) {
    case QType::Q8_0:
      if (p.layout == GemvLayout::Q8Split) return launch_staged<TraitsQ8Split, E>(p, segs, route_w, clamp, stream);
      return launch_staged<TraitsQ8_0, E>(p, segs, route_w, clamp, stream);
    case QType::Q2_K: return launch_staged<TraitsQ2_K, E>(p, segs, route_w, clamp, stream);
    case QType::Q4_K: return launch_staged<TraitsQ4_K, E>(p, segs, route_w, clamp, stream);
    case QType::IQ2_XXS: return launch_staged<TraitsIQ2Staged, E>(p, segs, route_w, clamp, stream);
    case QType::F16: return launch_staged<TraitsF16, E>(p, segs, route_w, clamp, stream);
    case QType::F32: return launch_staged<TraitsF32, E>(p, segs, route_w, clamp, stream);
    default: fail("gemv_cuda: no staged kernel for %s", qtype_name(p.wtype).c_str());
  }
}

// ---- activation quantization -------------------------------------------------------------------------------------
// Q8_0: one warp per 32-value block (one value per lane). Same rule as quant_q8_0 on the CPU: d = amax/127 in
// f32, q = roundf(x / d) computed as x * (1/d), d stored as f16.
__global__ void quantize_q8_0_kernel(const float* x, int64_t n_blocks, block_q8_0* y) {
  pdl_trigger();  // PDL (pdl.cuh): x comes from the previous kernel
  pdl_wait();
  const int64_t b = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (b >= n_blocks) return;  // whole warps exit together (n_blocks is per warp)
  const float v = x[b * kQK8_0 + lane];
  const float amax = warp_max(fabsf(v));
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  y[b].qs[lane] = int8_t(roundf(v * id));
  if (lane == 0) y[b].d = f32_to_f16(d);
}

// Q8_0 activations in the split layout of TraitsQ8Split: same rule as quantize_q8_0_kernel; the scale is stored
// as the f32 value of its f16 rounding (what the CPU dot kernel multiplies by).
__global__ void quantize_q8_0_split_kernel(const float* x, int64_t n_blocks, int64_t cols, uint8_t* y) {
  pdl_trigger();  // PDL (pdl.cuh): x comes from the previous kernel
  pdl_wait();
  const int64_t b = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (b >= n_blocks) return;
  const int64_t nb = cols / kQK8_0, row = b / nb, j = b % nb;
  const float v = x[b * kQK8_0 + lane];
  const float amax = warp_max(fabsf(v));
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  uint8_t* yr = y + row * (cols + cols / 8);
  reinterpret_cast<int8_t*>(yr)[kQK8_0 * j + lane] = int8_t(roundf(v * id));
  if (lane == 0) reinterpret_cast<float*>(yr + cols)[j] = f16_to_f32(f32_to_f16(d));
}

// 34-byte Q8_0 blocks -> split rows, one thread per block.
__global__ void q8_0_split_kernel(const block_q8_0* src, int64_t n_blocks, int64_t cols, uint8_t* dst) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= n_blocks) return;
  const int64_t nb = cols / kQK8_0, row = b / nb, j = b % nb;
  uint8_t* dr = dst + row * (cols + cols / 16);
  const uint16_t* q = reinterpret_cast<const uint16_t*>(src[b].qs);
  uint32_t w[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) w[i] = uint32_t(q[2 * i]) | (uint32_t(q[2 * i + 1]) << 16);
  reinterpret_cast<uint4*>(dr + kQK8_0 * j)[0] = make_uint4(w[0], w[1], w[2], w[3]);
  reinterpret_cast<uint4*>(dr + kQK8_0 * j)[1] = make_uint4(w[4], w[5], w[6], w[7]);
  reinterpret_cast<uint16_t*>(dr + cols)[j] = src[b].d;
}

// Q8_K: one warp per 256-value block (quantize_q8_K_block_warp).
__global__ void quantize_q8_K_kernel(const float* x, int64_t n_blocks, ActQ8K* y) {
  pdl_trigger();  // PDL (pdl.cuh): x comes from the previous kernel
  pdl_wait();
  const int64_t b = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (b >= n_blocks) return;  // whole warps exit together
  quantize_q8_K_block_warp(x + b * kQK_K, y + b);
}

}  // namespace

int64_t gpu_activation_bytes(QType wtype, int64_t cols, GemvLayout layout) {
  if (layout == GemvLayout::Q8Split) return cols + cols / 8;
  if (activation_type(wtype) == QType::Q8_K) return cols / kQK_K * int64_t(sizeof(ActQ8K));
  return activation_bytes(wtype, cols);
}

bool gemv_supports(QType wtype) {
  return wtype == QType::Q8_0 || wtype == QType::Q2_K || wtype == QType::Q4_K || wtype == QType::IQ2_XXS ||
         wtype == QType::F16 || wtype == QType::F32;
}

namespace {

// Row bytes of p's device layout (the staged kernel copies whole rows in 16-byte pieces).
int64_t device_row_bytes_of(const GemvParams& p) {
  return p.layout == GemvLayout::Q8Split ? q8_split_row_bytes(p.cols) : row_bytes(p.wtype, p.cols);
}

void check_common(const GemvParams& p, const char* who, bool xf_ok = false) {
  if (!gemv_supports(p.wtype)) fail("%s: weight type %s not supported", who, qtype_name(p.wtype).c_str());
  if (p.xf && !xf_ok) fail("%s: float activations (xf) are taken by moe_down_sum_cuda only", who);
  if (p.xf && activation_type(p.wtype) != QType::Q8_K)
    fail("%s: float activations (xf) need a Q8_K-activation type (Q2_K, Q4_K, IQ2_XXS), got %s", who,
         qtype_name(p.wtype).c_str());
  if (p.xf && (reinterpret_cast<uintptr_t>(p.xf) & 15u) != 0)
    fail("%s: float activations (xf) must be 16-byte aligned", who);
  if (p.rows <= 0 || p.cols <= 0 || p.cols % block_elems(p.wtype) != 0 ||
      (p.wtype == QType::F16 && p.cols % 8 != 0) || (p.wtype == QType::F32 && p.cols % 4 != 0))
    fail("%s: bad shape %lld x %lld for %s", who, (long long)p.rows, (long long)p.cols, qtype_name(p.wtype).c_str());
  if (p.w2 && !p.y2) fail("%s: a paired launch (w2) needs y2", who);
  if (p.n_slots < 1 || p.n_slots * (p.w2 ? 2 : 1) > 65535 || p.act_slot_div < 1 || p.n_tokens < 1)
    fail("%s: bad slots=%d act_slot_div=%d n_tokens=%d", who, p.n_slots, p.act_slot_div, p.n_tokens);
  if (p.layout == GemvLayout::Q8Split && (p.wtype != QType::Q8_0 || !q8_split_supported(p.cols)))
    fail("%s: the split layout needs Q8_0 weights and cols %% 256 == 0 (got %s, %lld)", who,
         qtype_name(p.wtype).c_str(), (long long)p.cols);
  if (p.cta_warps != 0 && (p.cta_warps > kMaxWarpsPerCta || (p.cta_warps & (p.cta_warps - 1)) != 0))
    fail("%s: cta_warps=%d must be a power of two <= %d", who, p.cta_warps, kMaxWarpsPerCta);
  if (p.expert_ids && p.n_tokens != 1) fail("%s: the MoE variant takes one token per slot", who);
  if (p.kernel < 0 || p.kernel > 2) fail("%s: kernel=%d (0 auto, 1 streaming, 2 staged)", who, p.kernel);
  if (p.iq2_rep != 0 && (p.iq2_rep > 32 || (p.iq2_rep & (p.iq2_rep - 1)) != 0))
    fail("%s: iq2_rep=%d must be a power of two <= 32", who, p.iq2_rep);
  if (p.tile_rows < 0 || p.tile_rows > 4096) fail("%s: tile_rows=%d outside [0, 4096]", who, p.tile_rows);
}

}  // namespace

bool gemv_staged_supported(const GemvParams& p) {
  if (!gemv_supports(p.wtype) || p.n_tokens != 1 || p.cols <= 0) return false;
  if (p.layout == GemvLayout::Q8Split && (p.wtype != QType::Q8_0 || !q8_split_supported(p.cols))) return false;
  const int64_t rb = device_row_bytes_of(p);
  // The smallest tile (kStages x 4 rows, for 4 rows per warp) must fit in shared memory with room to spare:
  // very long rows (HC's 16384-wide F16) are left to the streaming kernel, which splits a row across warps.
  if (int64_t(kStages) * 4 * rb > (128 << 10)) return false;
  const auto misaligned = [](const void* q) { return (reinterpret_cast<uintptr_t>(q) & 15u) != 0; };
  return rb % 16 == 0 && p.expert_stride % 16 == 0 && !misaligned(p.w) && !(p.w2 && misaligned(p.w2));
}

void moe_gate_up_swiglu_cuda(const GemvParams& p, const float* route_w, float clamp, cudaStream_t stream) {
  // Opt-in variant 2 (gemv_moe_v2.h): its own checks.
  if (p.kernel == kMoeKernelV2) return moe_v2_gate_up_swiglu_cuda(p, route_w, clamp, stream);
  GemvParams checked = p;
  checked.y2 = p.y;  // y2 is unused here; the common check wants one for a paired launch
  check_common(checked, "moe_gate_up_swiglu_cuda");
  if (!p.w2) fail("moe_gate_up_swiglu_cuda: needs the up stack in w2");
  if (p.n_tokens != 1) fail("moe_gate_up_swiglu_cuda: one token per slot");
  if (p.kernel == 2) {
    if (!gemv_staged_supported(p))
      fail("moe_gate_up_swiglu_cuda: layout not supported by the staged kernel (%s, %lld cols, 16-byte rows needed)",
           qtype_name(p.wtype).c_str(), (long long)p.cols);
    dispatch_staged<Epi::Swiglu>(p, 2, route_w, clamp, stream);
    return;
  }
  // Default: the streaming kernel (faster than the staged one for IQ2_XXS and Q4_K gate/up on the H200).
  const SwigluArgs sw{route_w, clamp};
  const int u = p.unroll ? p.unroll : 1;
  switch (p.wtype) {
    case QType::Q2_K: return u == 2 ? launch<TraitsQ2_K, 1, 2, 2, true>(p, stream, sw)
                                    : launch<TraitsQ2_K, 1, 1, 2, true>(p, stream, sw);
    case QType::Q4_K: return u == 2 ? launch<TraitsQ4_K, 1, 2, 2, true>(p, stream, sw)
                                    : launch<TraitsQ4_K, 1, 1, 2, true>(p, stream, sw);
    case QType::IQ2_XXS:
      if (p.iq2_rep >= 2) return launch<TraitsIQ2Sel, 1, 1, 2, true>(p, stream, sw);
      return u == 2 ? launch<TraitsIQ2_XXS, 1, 2, 2, true>(p, stream, sw) : launch<TraitsIQ2_XXS, 1, 1, 2, true>(p, stream, sw);
    // The shared expert (Q8_0, a single "slot" without ids): same rows-of-gate-and-up pairing. The split layout
    // keeps its streaming default of 2 blocks in flight per lane (TraitsQ8Split::kUnroll).
    case QType::Q8_0:
      if (p.layout == GemvLayout::Q8Split)
        return p.unroll == 1 ? launch<TraitsQ8Split, 1, 1, 2, true>(p, stream, sw)
                             : launch<TraitsQ8Split, 1, 2, 2, true>(p, stream, sw);
      return u == 2 ? launch<TraitsQ8_0, 1, 2, 2, true>(p, stream, sw) : launch<TraitsQ8_0, 1, 1, 2, true>(p, stream, sw);
    default:
      fail("moe_gate_up_swiglu_cuda: %s experts are not supported (Q2_K, Q4_K, IQ2_XXS, Q8_0)",
           qtype_name(p.wtype).c_str());
  }
}

void moe_down_sum_cuda(const GemvParams& p, int k, cudaStream_t stream) {
  if (p.kernel == kMoeKernelV2) return moe_v2_down_sum_cuda(p, k, stream);  // opt-in variant 2 (gemv_moe_v2.h)
  check_common(p, "moe_down_sum_cuda", /*xf_ok=*/true);
  if (p.w2) fail("moe_down_sum_cuda: no paired launch");
  if (k < 1 || k > kStagedMaxSegs || p.n_slots % k != 0)
    fail("moe_down_sum_cuda: k=%d must be in [1, %d] and divide n_slots=%d", k, kStagedMaxSegs, p.n_slots);
  if (!gemv_staged_supported(p))
    fail("moe_down_sum_cuda: layout not supported by the staged kernel (%s, %lld cols, 16-byte rows needed)",
         qtype_name(p.wtype).c_str(), (long long)p.cols);
  dispatch_staged<Epi::Sum>(p, k, nullptr, 0.0f, stream);
}

void gemv_cuda(const GemvParams& p_in, cudaStream_t stream) {
  // Opt-in dense variant 2 (gemv_dense_v2.h: one wave, loads up front, optional PDL): its own checks.
  if (p_in.kernel == kGemvKernelV2 || p_in.kernel == kGemvKernelV2Pdl) return gemv_v2_cuda(p_in, stream);
  check_common(p_in, "gemv_cuda");
  // Single-token launches: the staged kernel where the policy (or the caller) picks it. Policy from the H200
  // workbench runs (docs/cuda.md, dev/cuda/results/h200_wb_gemv_*): only the Q2_K routed-expert stacks (down
  // projection, 14 us vs 17 us); the streaming kernel stays ahead for IQ2_XXS, Q4_K and the dense matrices.
  const bool staged_policy = p_in.expert_ids != nullptr && p_in.wtype == QType::Q2_K;
  if (p_in.n_tokens == 1 && p_in.kernel != 1 && gemv_staged_supported(p_in) && (p_in.kernel == 2 || staged_policy)) {
    dispatch_staged<Epi::Store>(p_in, 1, nullptr, 0.0f, stream);
    return;
  }
  if (p_in.kernel == 2) fail("gemv_cuda: kernel=2 (staged) does not support this launch (see gemv_staged_supported)");

  // Batches beyond kGemvMaxTokens run as several launches of up to 8 tokens (dense only).
  for (int t0 = 0; t0 < p_in.n_tokens; t0 += kGemvMaxTokens) {
    GemvParams p = p_in;
    p.n_tokens = std::min(kGemvMaxTokens, p_in.n_tokens - t0);
    p.xq = static_cast<const uint8_t*>(p_in.xq) + t0 * gpu_activation_bytes(p.wtype, p.cols, p.layout);
    p.y = p_in.y + int64_t(t0) * p.rows;
    if (p_in.y2) p.y2 = p_in.y2 + int64_t(t0) * p.rows;
    // y rows of a chunk are [t][rows] with the chunk's own token count; only valid when n_slots == 1.
    if (p_in.n_tokens > kGemvMaxTokens && p_in.n_slots != 1) fail("gemv_cuda: > %d tokens needs n_slots == 1", kGemvMaxTokens);
    switch (p.wtype) {
      case QType::Q8_0:
        if (p.layout == GemvLayout::Q8Split) launch_tokens<TraitsQ8Split>(p, stream);
        else launch_tokens<TraitsQ8_0>(p, stream);
        break;
      case QType::Q2_K: launch_tokens<TraitsQ2_K>(p, stream); break;
      case QType::Q4_K: launch_tokens<TraitsQ4_K>(p, stream); break;
      // Default (iq2_rep 0 or 1): the 2 KiB uint2 grid; iq2_rep >= 2: 8 interleaved selector copies. The
      // selectors were slower in the streaming kernel on the H200 (MoE gate 19.3 us vs 16.2 us, commit f736620).
      case QType::IQ2_XXS:
        if (p.iq2_rep >= 2) launch_tokens<TraitsIQ2Sel>(p, stream);
        else launch_tokens<TraitsIQ2_XXS>(p, stream);
        break;
      case QType::F16: launch_tokens<TraitsF16>(p, stream); break;
      case QType::F32: launch_tokens<TraitsF32>(p, stream); break;
      default: break;
    }
  }
}

bool q8_split_supported(int64_t cols) { return cols > 0 && cols % 256 == 0; }
int64_t q8_split_row_bytes(int64_t cols) { return cols + cols / 16; }

GemvLayout preferred_layout(QType wtype, int64_t cols, bool /*expert_stack*/) {
  return wtype == QType::Q8_0 && q8_split_supported(cols) ? GemvLayout::Q8Split : GemvLayout::Ggml;
}

int64_t layout_row_bytes(QType wtype, GemvLayout layout, int64_t cols) {
  return layout == GemvLayout::Q8Split ? q8_split_row_bytes(cols) : row_bytes(wtype, cols);
}

void repack_weight_cuda(QType wtype, GemvLayout layout, const void* src, int64_t n_rows, int64_t cols, void* dst,
                        cudaStream_t stream) {
  switch (layout) {
    case GemvLayout::Ggml:
      check(cudaMemcpyAsync(dst, src, size_t(n_rows) * size_t(row_bytes(wtype, cols)), cudaMemcpyDeviceToDevice,
                            stream), "repack_weight_cuda: copy");
      return;
    case GemvLayout::Q8Split:
      if (wtype != QType::Q8_0) fail("repack_weight_cuda: the Q8Split layout needs Q8_0 weights, got %s",
                                     qtype_name(wtype).c_str());
      q8_0_split_cuda(src, n_rows, cols, dst, stream);
      return;
  }
  fail("repack_weight_cuda: unknown layout %d", int(layout));
}

void q8_0_split_cuda(const void* src, int64_t n_rows, int64_t cols, void* dst, cudaStream_t stream) {
  if (!q8_split_supported(cols)) fail("q8_0_split_cuda: cols=%lld is not a multiple of 256", (long long)cols);
  const int64_t n_blocks = n_rows * cols / kQK8_0;
  if (n_blocks <= 0) return;
  constexpr int kThreads = 256;
  q8_0_split_kernel<<<unsigned((n_blocks + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      static_cast<const block_q8_0*>(src), n_blocks, cols, static_cast<uint8_t*>(dst));
  check_launch("q8_0_split_kernel");
}

void quantize_activations_cuda(QType wtype, const float* x, int64_t n_rows, int64_t cols, void* xq,
                               cudaStream_t stream, GemvLayout layout) {
  const QType at = activation_type(wtype);
  if (n_rows <= 0) return;
  constexpr int kThreads = 256;
  if (layout == GemvLayout::Q8Split) {
    if (wtype != QType::Q8_0 || !q8_split_supported(cols))
      fail("quantize_activations_cuda: split layout needs Q8_0 and cols %% 256 == 0, got %lld", (long long)cols);
    const int64_t n_blocks = n_rows * cols / kQK8_0;
    launch_pdl("quantize_q8_0_split_kernel", quantize_q8_0_split_kernel,
               dim3(unsigned((n_blocks * 32 + kThreads - 1) / kThreads)), dim3(kThreads), 0, stream, x, n_blocks, cols,
               static_cast<uint8_t*>(xq));
    return;
  }
  if (at == QType::F32) {
    check(cudaMemcpyAsync(xq, x, size_t(n_rows * cols) * sizeof(float), cudaMemcpyDeviceToDevice, stream),
          "quantize_activations_cuda: copy");
    return;
  }
  const int64_t qk = at == QType::Q8_0 ? kQK8_0 : kQK_K;
  if (cols % qk != 0) fail("quantize_activations_cuda: cols=%lld not a multiple of %lld", (long long)cols, (long long)qk);
  const int64_t n_blocks = n_rows * cols / qk;  // rows are whole blocks, so blocks are contiguous across rows
  const unsigned grid = unsigned((n_blocks * 32 + kThreads - 1) / kThreads);
  if (at == QType::Q8_0) {
    launch_pdl("quantize_q8_0_kernel", quantize_q8_0_kernel, dim3(grid), dim3(kThreads), 0, stream, x, n_blocks,
               static_cast<block_q8_0*>(xq));
  } else if (at == QType::Q8_K) {
    launch_pdl("quantize_q8_K_kernel", quantize_q8_K_kernel, dim3(grid), dim3(kThreads), 0, stream, x, n_blocks,
               static_cast<ActQ8K*>(xq));
  } else {
    fail("quantize_activations_cuda: no GPU quantizer for %s", qtype_name(at).c_str());
  }
}

}  // namespace dsv4::cuda
