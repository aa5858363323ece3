// Tensor-core GEMMs for prefill (see gemm.h for the contract).
//
// The mma kernel: a CTA computes a BM x BN tile of Y = A W^T (A: BM activation rows gathered by index, FP16;
// W: BN weight rows, dequantized on the fly). 256 threads = 8 warps as 2 (M) x 4 (N), each warp 32 x 32 with
// mma.sync m16n8k16 (FP16 in, FP32 accumulate). Per BK = 64 step every thread dequantizes one 32-value chunk of
// one weight row into shared memory and copies two 16-byte pieces of activations; the global loads of step
// kt + 1 are issued before the MMAs of step kt (register prefetch) so their latency hides behind the math.
// Fragments come from shared memory with ldmatrix; rows are padded by 8 halves (144-byte stride) so the eight
// 16-byte row reads of one ldmatrix phase hit distinct bank groups.
//
// Routed experts: the T*k (token, slot) pairs are grouped by expert on the device (count, scan, scatter) into a
// list padded per expert to a multiple of BM, so every M tile belongs to one expert; the grid covers the worst
// case number of tiles and surplus CTAs exit at once (the host never reads the ids). A row of the result does
// not depend on which other rows share its tile, so the (atomic) order within an expert does not change any
// value: results are deterministic.
#include "backend/cuda/gemm.h"

#include <cublas_v2.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "backend/cuda/common.cuh"
#include "backend/cuda/cuda_util.h"
#include "common/error.h"
#include "quant/blocks.h"
#include "quant/iq2xxs_tables.h"

namespace dsv4::cuda {
namespace {

constexpr int kBN = 128, kBK = 64;  // weight rows and K columns per tile (tokens per tile: BM, 16/32/64)
constexpr int kThreads = 256;
constexpr int kPad = 8;                 // halves of padding per shared-memory row
constexpr int kLds = kBK + kPad;        // shared-memory row stride in halves (144 bytes)
constexpr int64_t kAlign = 256;         // workspace sub-buffer alignment

__device__ __forceinline__ uint32_t pack_half2(float a, float b) {
  const __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&h);
}
__device__ __forceinline__ float half_bits_to_float(uint16_t h) { return __half2float(__ushort_as_half(h)); }

// Byte I of w (0..255) as a float without an integer -> float conversion instruction: conversions issue at 16 per
// clock per SM on sm_80/sm_90 against 128 FP32 adds, and the decoders below convert every weight value, so I2F
// bounded the dequantizing GEMMs. The byte goes into the low mantissa bits of 2^23 (0x4B0000bb = 2^23 + b, one
// byte permute), and subtracting 2^23 is exact: the same float as float(b), so results are bit-identical.
// i in 0..3 (a constant once the callers' loops are unrolled).
__device__ __forceinline__ float byte_to_float(uint32_t w, int i) {
  return __int_as_float(int(__byte_perm(w, 0x4B000000u, 0x7650u + unsigned(i)))) - 8388608.0f;
}
// Signed byte I of w: x + 128 = (x ^ 0x80) as an unsigned byte, so float(x) = (2^23 + (x ^ 0x80)) - (2^23 + 128),
// exact again. `w_biased` is w ^ 0x80808080.
__device__ __forceinline__ float sbyte_to_float(uint32_t w_biased, int i) {
  return __int_as_float(int(__byte_perm(w_biased, 0x4B000000u, 0x7650u + unsigned(i)))) - 8388736.0f;
}

// ---- dequantization of one 32-value chunk of a weight row --------------------------------------------------------
// fetch() issues the global loads (kept in registers across the MMAs of the previous steps); decode() turns them
// into 32 FP16 values (16 packed pairs, column order). c0 % 32 == 0. kDepth: K steps the MMA kernel keeps in
// flight, as deep as the 128 registers of two CTAs per SM allow without (much) spilling: deeper for fewer bytes.
struct DqF16 {
  static constexpr int kDepth = 2;
  struct Raw {
    uint4 v[4];
  };
  __device__ static Raw fetch(const uint8_t* row, int64_t c0, int64_t) {
    const uint4* p = reinterpret_cast<const uint4*>(row + 2 * c0);
    return {{p[0], p[1], p[2], p[3]}};
  }
  __device__ static void decode(const Raw& r, uint32_t out[16], const uint2*) {
#pragma unroll
    for (int i = 0; i < 4; ++i) out[4 * i] = r.v[i].x, out[4 * i + 1] = r.v[i].y, out[4 * i + 2] = r.v[i].z, out[4 * i + 3] = r.v[i].w;
  }
};

__device__ __forceinline__ void decode_i8x32(const uint32_t q[8], float d, uint32_t out[16]) {
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const uint32_t v = q[i] ^ 0x80808080u;
    // d * q is exact in fp32 (11 x 8 significant bits); one rounding to FP16 follows.
    out[2 * i] = pack_half2(d * sbyte_to_float(v, 0), d * sbyte_to_float(v, 1));
    out[2 * i + 1] = pack_half2(d * sbyte_to_float(v, 2), d * sbyte_to_float(v, 3));
  }
}

struct DqQ8_0 {  // GGUF blocks: {f16 d; int8 qs[32]}, 34 bytes, payload 2-byte aligned
  static constexpr int kDepth = 3;
  struct Raw {
    uint32_t q[8];
    uint16_t d;
  };
  __device__ static Raw fetch(const uint8_t* row, int64_t c0, int64_t) {
    const uint8_t* b = row + (c0 / kQK8_0) * int64_t(sizeof(block_q8_0));
    Raw r;
    r.d = *reinterpret_cast<const uint16_t*>(b);
#pragma unroll
    for (int i = 0; i < 8; ++i) r.q[i] = uint32_t(load_i32_a2(b + 2 + 4 * i));
    return r;
  }
  __device__ static void decode(const Raw& r, uint32_t out[16], const uint2*) {
    decode_i8x32(r.q, half_bits_to_float(r.d), out);
  }
};

struct DqQ8Split {  // gemv.h's split rows: [cols int8][cols/32 f16 scales]
  static constexpr int kDepth = 3;
  struct Raw {
    uint32_t q[8];
    uint16_t d;
  };
  __device__ static Raw fetch(const uint8_t* row, int64_t c0, int64_t cols) {
    const uint4 a = *reinterpret_cast<const uint4*>(row + c0);
    const uint4 b = *reinterpret_cast<const uint4*>(row + c0 + 16);
    Raw r{{a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w}, 0};
    r.d = reinterpret_cast<const uint16_t*>(row + cols)[c0 / kQK8_0];
    return r;
  }
  __device__ static void decode(const Raw& r, uint32_t out[16], const uint2*) {
    decode_i8x32(r.q, half_bits_to_float(r.d), out);
  }
};

// Q2_K: value 128h + 32s + l = d*(sc&15)*q - dmin*(sc>>4), q = bits 2s..2s+1 of qs[32h + l],
// sc = scales[8h + 2s + (l >= 16)]. A 32-value chunk is one (h, s): all 32 qs bytes of half h.
struct DqQ2_K {
  static constexpr int kDepth = 3;
  struct Raw {
    uint32_t q[8];
    uint32_t sc;  // the two scale bytes
    uint32_t dd;  // d | dmin << 16
    int shift;
  };
  __device__ static Raw fetch(const uint8_t* row, int64_t c0, int64_t) {
    const uint8_t* b = row + (c0 / kQK_K) * int64_t(sizeof(block_q2_K));
    const int j = int(c0 % kQK_K), h = j >> 7, s = (j >> 5) & 3;
    Raw r;
#pragma unroll
    for (int i = 0; i < 8; ++i) r.q[i] = uint32_t(load_i32_a4(b + 16 + 32 * h + 4 * i));
    r.sc = uint32_t(b[8 * h + 2 * s]) | (uint32_t(b[8 * h + 2 * s + 1]) << 8);
    r.dd = uint32_t(load_i32_a4(b + 80));
    r.shift = 2 * s;
    return r;
  }
  __device__ static void decode(const Raw& r, uint32_t out[16], const uint2*) {
    const float d = half_bits_to_float(uint16_t(r.dd)), dmin = half_bits_to_float(uint16_t(r.dd >> 16));
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const uint32_t sc = (r.sc >> (8 * half)) & 255u;
      const float dl = d * float(sc & 15u), ml = dmin * float(sc >> 4);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint32_t v = (r.q[4 * half + i] >> r.shift) & 0x03030303u;
        out[8 * half + 2 * i] = pack_half2(dl * byte_to_float(v, 0) - ml, dl * byte_to_float(v, 1) - ml);
        out[8 * half + 2 * i + 1] = pack_half2(dl * byte_to_float(v, 2) - ml, dl * byte_to_float(v, 3) - ml);
      }
    }
  }
};

// Q4_K: sub-block sb (32 values) = nibbles (low for even sb, high for odd) of qs[32 (sb/2) ..], 6-bit scale/min.
struct DqQ4_K {
  static constexpr int kDepth = 3;
  struct Raw {
    uint4 a, b;
    uint32_t dd;
    uint8_t sc, mn;
    int shift;
  };
  __device__ static Raw fetch(const uint8_t* row, int64_t c0, int64_t) {
    const uint8_t* blk = row + (c0 / kQK_K) * int64_t(sizeof(block_q4_K));
    const int sb = int(c0 % kQK_K) >> 5;
    const uint8_t* qs = blk + 16 + 32 * (sb >> 1);
    Raw r;
    r.a = *reinterpret_cast<const uint4*>(qs);
    r.b = *reinterpret_cast<const uint4*>(qs + 16);
    r.dd = uint32_t(load_i32_a4(blk));
    q4k_scale_min(sb, blk + 4, &r.sc, &r.mn);
    r.shift = 4 * (sb & 1);
    return r;
  }
  __device__ static void decode(const Raw& r, uint32_t out[16], const uint2*) {
    const float d = half_bits_to_float(uint16_t(r.dd)) * float(r.sc);
    const float m = half_bits_to_float(uint16_t(r.dd >> 16)) * float(r.mn);
    const uint32_t w[8] = {r.a.x, r.a.y, r.a.z, r.a.w, r.b.x, r.b.y, r.b.z, r.b.w};
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const uint32_t v = (w[i] >> r.shift) & 0x0F0F0F0Fu;
      out[2 * i] = pack_half2(d * byte_to_float(v, 0) - m, d * byte_to_float(v, 1) - m);
      out[2 * i + 1] = pack_half2(d * byte_to_float(v, 2) - m, d * byte_to_float(v, 3) - m);
    }
  }
};

// IQ2_XXS: group g of 32 = 4 grid entries (bytes of a0) with 7-bit sign codes (a1), scale d (0.5 + ls) / 4.
struct DqIQ2_XXS {
  static constexpr int kDepth = 4;
  struct Raw {
    uint32_t a0, a1;
    uint16_t d;
  };
  __device__ static Raw fetch(const uint8_t* row, int64_t c0, int64_t) {
    const uint8_t* b = row + (c0 / kQK_K) * int64_t(sizeof(block_iq2_xxs));
    const uint8_t* q = b + 2 + 8 * ((c0 % kQK_K) >> 5);
    return {uint32_t(load_i32_a2(q)), uint32_t(load_i32_a2(q + 4)), *reinterpret_cast<const uint16_t*>(b)};
  }
  __device__ static void decode(const Raw& r, uint32_t out[16], const uint2* grid) {
    const float db = half_bits_to_float(r.d) * (0.5f + float(r.a1 >> 28)) * 0.25f;
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      const uint2 g = grid[(r.a0 >> (8 * t)) & 255u];
      const uint32_t code = (r.a1 >> (7 * t)) & 127u;
      const uint32_t signs = code | ((__popc(code) & 1u) << 7);  // ksigns_iq2xs: even parity in bit 7
      float v[8];
#pragma unroll
      for (int k = 0; k < 8; ++k) {  // sign bit k of `signs` into bit 31: the same bits as -mag, without a select
        const uint32_t sign = (signs << (31 - k)) & 0x80000000u;
        v[k] = __uint_as_float(__float_as_uint(db * byte_to_float(k < 4 ? g.x : g.y, k & 3)) ^ sign);
      }
#pragma unroll
      for (int k = 0; k < 4; ++k) out[4 * t + k] = pack_half2(v[2 * k], v[2 * k + 1]);
    }
  }
};

template <class D>
constexpr bool kNeedsGrid = std::is_same_v<D, DqIQ2_XXS>;

// ---- the grouped/dense MMA kernel ---------------------------------------------------------------------------------
struct MmaArgs {
  const uint8_t* w[2];     // weight (stack) per blockIdx.z
  float* y[2];             // output per blockIdx.z: y[out_row][rows]
  int64_t expert_stride;   // bytes
  int64_t rows, cols, row_bytes;
  const __half* a;         // activation rows [*, cols] FP16
  int act_div;             // activation row = index / act_div
  int n_tokens;            // dense: rows of A; MoE: unused
  const int32_t* sorted;   // MoE: [tiles * BM] slot per position (-1 = padding); null = dense
  const int32_t* tile_expert;  // MoE: expert per M tile, -1 = unused tile
};

__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const __half* p) {
  const uint32_t a = uint32_t(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
__device__ __forceinline__ void mma_16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// BM (tokens per tile) is 16, 32 or 64: routed experts see ~T*k/256 rows each, and the MMA work of a tile is
// paid in full however few of its rows are real (T = 256 gives ~6 rows per expert: 64-row tiles spent ~90% of
// the tensor-core time on padding). Warps: 2 (M) x 4 (N) for BM 32/64, 1 x 8 for BM 16.
template <class D, int P, int BM>
__global__ void __launch_bounds__(kThreads, 2) mma_kernel(MmaArgs p) {
  constexpr int kWarpsM = BM == 16 ? 1 : 2, kWarpsN = 8 / kWarpsM;
  constexpr int kMI = BM / kWarpsM / 16, kNI = kBN / kWarpsN / 8;  // m16 and n8 tiles per warp
  constexpr int kAPieces = BM * kBK / 8, kAIters = (kAPieces + kThreads - 1) / kThreads;
  __shared__ __align__(16) __half sA[BM][kLds];
  __shared__ __align__(16) __half sB[kBN][kLds];
  __shared__ int s_act[BM], s_out[BM];
  __shared__ uint2 s_grid[kNeedsGrid<D> ? 256 : 1];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int mt = blockIdx.x, z = blockIdx.z;
  const int64_t n0 = int64_t(blockIdx.y) * kBN;
  int64_t expert = 0;
  if (p.sorted) {
    expert = p.tile_expert[mt];
    if (expert < 0) return;  // beyond the last expert's tiles (whole CTA exits: no barrier reached)
  }
  if constexpr (kNeedsGrid<D>) {
    for (int i = tid; i < 256; i += kThreads) {
      const uint64_t g = iq2xxs_grid[i];
      s_grid[i] = make_uint2(uint32_t(g), uint32_t(g >> 32));
    }
  }
  if (tid < BM) {
    int idx;
    if (p.sorted) idx = p.sorted[int64_t(mt) * BM + tid];
    else idx = mt * BM + tid < p.n_tokens ? mt * BM + tid : -1;
    s_out[tid] = idx;
    s_act[tid] = idx < 0 ? -1 : idx / p.act_div;
  }
  __syncthreads();

  // This thread's loads: weight row n0 + brow, columns bcol..bcol+31 of each K step; activation pieces
  // (row ar[i], 8 halves at column acol; ar < 0: this thread has no piece i; null arow: a padding row).
  const int brow = tid >> 1, bcol = (tid & 1) * 32;
  const uint8_t* wrow =
      (z ? p.w[1] : p.w[0]) + expert * p.expert_stride + std::min<int64_t>(n0 + brow, p.rows - 1) * p.row_bytes;
  const int acol = (tid & 7) * 8;
  const __half* arow[kAIters];
  int ar[kAIters];
#pragma unroll
  for (int i = 0; i < kAIters; ++i) {
    const int piece = tid + kThreads * i;
    ar[i] = piece < kAPieces ? piece >> 3 : -1;
    const int act = ar[i] < 0 ? -1 : s_act[ar[i]];
    arow[i] = act < 0 ? nullptr : p.a + int64_t(act) * p.cols + acol;
  }

  float acc[kMI][kNI][4];
#pragma unroll
  for (int i = 0; i < kMI; ++i)
#pragma unroll
    for (int j = 0; j < kNI; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.0f;

  // Register ring of P steps: the loads of step kt + P are issued right after step kt's data went to shared
  // memory, so P steps of weight and activation bytes are in flight per thread (a 2-bit weight step is only
  // ~2 KiB per CTA: one step ahead left the memory system idle, see docs/cuda.md "Prefill GEMM").
  const int64_t nk = p.cols / kBK;
  typename D::Raw raw[P];
  uint4 av[P][kAIters];
#pragma unroll
  for (int s = 0; s < P; ++s)
    if (s < nk) {
      raw[s] = D::fetch(wrow, int64_t(s) * kBK + bcol, p.cols);
#pragma unroll
      for (int i = 0; i < kAIters; ++i)
        av[s][i] = arow[i] ? *reinterpret_cast<const uint4*>(arow[i] + s * kBK) : make_uint4(0, 0, 0, 0);
    }

  const int wm = warp / kWarpsN, wn = warp % kWarpsN;
  for (int64_t k0 = 0; k0 < nk; k0 += P) {
#pragma unroll
    for (int s = 0; s < P; ++s) {
      const int64_t kt = k0 + s;
      if (kt >= nk) break;  // uniform across the CTA
      {
        uint32_t dec[16];
        D::decode(raw[s], dec, s_grid);
        uint4* dst = reinterpret_cast<uint4*>(&sB[brow][bcol]);
#pragma unroll
        for (int i = 0; i < 4; ++i) dst[i] = make_uint4(dec[4 * i], dec[4 * i + 1], dec[4 * i + 2], dec[4 * i + 3]);
#pragma unroll
        for (int i = 0; i < kAIters; ++i)
          if (ar[i] >= 0) *reinterpret_cast<uint4*>(&sA[ar[i]][acol]) = av[s][i];
      }
      __syncthreads();
      if (kt + P < nk) {
        const int64_t k1 = (kt + P) * kBK;
        raw[s] = D::fetch(wrow, k1 + bcol, p.cols);
#pragma unroll
        for (int i = 0; i < kAIters; ++i)
          av[s][i] = arow[i] ? *reinterpret_cast<const uint4*>(arow[i] + k1) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int kk = 0; kk < kBK; kk += 16) {
        uint32_t af[kMI][4], bf[kNI / 2][4];
#pragma unroll
        for (int mi = 0; mi < kMI; ++mi)
          ldmatrix_x4(af[mi], &sA[wm * (BM / kWarpsM) + mi * 16 + (lane & 15)][kk + (lane >> 4) * 8]);
        // B x4: matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
#pragma unroll
        for (int nj = 0; nj < kNI / 2; ++nj)
          ldmatrix_x4(bf[nj],
                      &sB[wn * (kNI * 8) + nj * 16 + ((lane >> 4) << 3) + (lane & 7)][kk + ((lane >> 3) & 1) * 8]);
#pragma unroll
        for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
          for (int ni = 0; ni < kNI; ++ni)
            mma_16816(acc[mi][ni], af[mi], bf[ni >> 1][2 * (ni & 1)], bf[ni >> 1][2 * (ni & 1) + 1]);
      }
      __syncthreads();
    }
  }

  float* y = z ? p.y[1] : p.y[0];
#pragma unroll
  for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int out = s_out[wm * (BM / kWarpsM) + mi * 16 + h * 8 + (lane >> 2)];
      if (out < 0) continue;
      float* yr = y + int64_t(out) * p.rows;
#pragma unroll
      for (int ni = 0; ni < kNI; ++ni) {
        const int64_t n = n0 + wn * (kNI * 8) + ni * 8 + (lane & 3) * 2;
        if (n < p.rows) yr[n] = acc[mi][ni][2 * h];
        if (n + 1 < p.rows) yr[n + 1] = acc[mi][ni][2 * h + 1];
      }
    }
}

// Double-buffered variant (GemmParams / MoeGemmParams::mma_double_buffer, or DSV4_CUDA_MMA_DB=1 for every call):
// two shared-memory stages, so one barrier per K step instead of two, and each warp issues step kt's MMAs before it
// decodes step kt + 1 into the other stage, so one warp's tensor and ALU work overlap (mma_kernel alternates
// whole-CTA phases: all warps decode, barrier, all warps multiply, barrier). The same products are accumulated in
// the same order: results are bit-identical to mma_kernel. Stages in dynamic shared memory: 2 x (BM + 128) rows of
// 144 bytes (54 KiB at BM = 64, above the 48 KiB static limit; launch_mma opts in).
template <class D, int P, int BM>
__global__ void __launch_bounds__(kThreads, 2) mma_kernel_db(MmaArgs p) {
  constexpr int kWarpsM = BM == 16 ? 1 : 2, kWarpsN = 8 / kWarpsM;
  constexpr int kMI = BM / kWarpsM / 16, kNI = kBN / kWarpsN / 8;
  constexpr int kAPieces = BM * kBK / 8, kAIters = (kAPieces + kThreads - 1) / kThreads;
  using Row = __half[kLds];
  extern __shared__ __align__(16) unsigned char mma_db_smem[];
  // Stage st: A rows at stage0 + st * BM ([BM][kLds]), B rows at stage0 + 2 * BM + st * kBN ([kBN][kLds]);
  // addressed by arithmetic, not a pointer array (a runtime index into a local array would live in local memory).
  Row* const stage0 = reinterpret_cast<Row*>(mma_db_smem);
  __shared__ int s_act[BM], s_out[BM];
  __shared__ uint2 s_grid[kNeedsGrid<D> ? 256 : 1];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int mt = blockIdx.x, z = blockIdx.z;
  const int64_t n0 = int64_t(blockIdx.y) * kBN;
  int64_t expert = 0;
  if (p.sorted) {
    expert = p.tile_expert[mt];
    if (expert < 0) return;
  }
  if constexpr (kNeedsGrid<D>) {
    for (int i = tid; i < 256; i += kThreads) {
      const uint64_t g = iq2xxs_grid[i];
      s_grid[i] = make_uint2(uint32_t(g), uint32_t(g >> 32));
    }
  }
  if (tid < BM) {
    int idx;
    if (p.sorted) idx = p.sorted[int64_t(mt) * BM + tid];
    else idx = mt * BM + tid < p.n_tokens ? mt * BM + tid : -1;
    s_out[tid] = idx;
    s_act[tid] = idx < 0 ? -1 : idx / p.act_div;
  }
  __syncthreads();

  const int brow = tid >> 1, bcol = (tid & 1) * 32;
  const uint8_t* wrow =
      (z ? p.w[1] : p.w[0]) + expert * p.expert_stride + std::min<int64_t>(n0 + brow, p.rows - 1) * p.row_bytes;
  const int acol = (tid & 7) * 8;
  const __half* arow[kAIters];
  int ar[kAIters];
#pragma unroll
  for (int i = 0; i < kAIters; ++i) {
    const int piece = tid + kThreads * i;
    ar[i] = piece < kAPieces ? piece >> 3 : -1;
    const int act = ar[i] < 0 ? -1 : s_act[ar[i]];
    arow[i] = act < 0 ? nullptr : p.a + int64_t(act) * p.cols + acol;
  }

  float acc[kMI][kNI][4];
#pragma unroll
  for (int i = 0; i < kMI; ++i)
#pragma unroll
    for (int j = 0; j < kNI; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.0f;

  // Register ring of P steps as in mma_kernel: slot j holds the next unconsumed step = j (mod P).
  const int64_t nk = p.cols / kBK;
  typename D::Raw raw[P];
  uint4 av[P][kAIters];
#pragma unroll
  for (int s = 0; s < P; ++s)
    if (s < nk) {
      raw[s] = D::fetch(wrow, int64_t(s) * kBK + bcol, p.cols);
#pragma unroll
      for (int i = 0; i < kAIters; ++i)
        av[s][i] = arow[i] ? *reinterpret_cast<const uint4*>(arow[i] + s * kBK) : make_uint4(0, 0, 0, 0);
    }
  // Decodes ring slot `slot` into stage `st` and refills the slot with step `next` (if there is one).
#define DSV4_MMA_DB_STAGE(slot, st, next)                                                                    \
  do {                                                                                                       \
    uint32_t dec[16];                                                                                        \
    D::decode(raw[slot], dec, s_grid);                                                                       \
    uint4* dst = reinterpret_cast<uint4*>(&stage0[2 * BM + (st) * kBN + brow][bcol]);                        \
    _Pragma("unroll") for (int i = 0; i < 4; ++i) dst[i] =                                                   \
        make_uint4(dec[4 * i], dec[4 * i + 1], dec[4 * i + 2], dec[4 * i + 3]);                              \
    _Pragma("unroll") for (int i = 0; i < kAIters; ++i) if (ar[i] >= 0) *reinterpret_cast<uint4*>(          \
        &stage0[(st) * BM + ar[i]][acol]) = av[slot][i];                                                     \
    if ((next) < nk) {                                                                                       \
      const int64_t k1 = (next) * kBK;                                                                       \
      raw[slot] = D::fetch(wrow, k1 + bcol, p.cols);                                                         \
      _Pragma("unroll") for (int i = 0; i < kAIters; ++i) av[slot][i] =                                      \
          arow[i] ? *reinterpret_cast<const uint4*>(arow[i] + k1) : make_uint4(0, 0, 0, 0);                  \
    }                                                                                                        \
  } while (0)

  DSV4_MMA_DB_STAGE(0, 0, int64_t(P));  // step 0 -> stage 0; slot 0 now holds step P
  __syncthreads();
  const int wm = warp / kWarpsN, wn = warp % kWarpsN;
  for (int64_t k0 = 0; k0 < nk; k0 += P) {
#pragma unroll
    for (int s = 0; s < P; ++s) {
      const int64_t kt = k0 + s;
      if (kt >= nk) break;  // uniform across the CTA
      const int cur = int(kt & 1);
      const Row* const a_cur = stage0 + cur * BM;
      const Row* const b_cur = stage0 + 2 * BM + cur * kBN;
      // Step kt's MMAs on stage cur (written before the last barrier)...
#pragma unroll
      for (int kk = 0; kk < kBK; kk += 16) {
        uint32_t af[kMI][4], bf[kNI / 2][4];
#pragma unroll
        for (int mi = 0; mi < kMI; ++mi)
          ldmatrix_x4(af[mi], &a_cur[wm * (BM / kWarpsM) + mi * 16 + (lane & 15)][kk + (lane >> 4) * 8]);
#pragma unroll
        for (int nj = 0; nj < kNI / 2; ++nj)
          ldmatrix_x4(bf[nj], &b_cur[wn * (kNI * 8) + nj * 16 + ((lane >> 4) << 3) + (lane & 7)]
                                    [kk + ((lane >> 3) & 1) * 8]);
#pragma unroll
        for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
          for (int ni = 0; ni < kNI; ++ni)
            mma_16816(acc[mi][ni], af[mi], bf[ni >> 1][2 * (ni & 1)], bf[ni >> 1][2 * (ni & 1) + 1]);
      }
      // ...then step kt + 1 (ring slot (s + 1) % P) into the other stage, last read by step kt - 1's MMAs, which
      // every warp finished before the previous barrier.
      if (kt + 1 < nk) DSV4_MMA_DB_STAGE((s + 1) % P, cur ^ 1, kt + 1 + P);
      __syncthreads();
    }
  }
#undef DSV4_MMA_DB_STAGE

  float* y = z ? p.y[1] : p.y[0];
#pragma unroll
  for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int out = s_out[wm * (BM / kWarpsM) + mi * 16 + h * 8 + (lane >> 2)];
      if (out < 0) continue;
      float* yr = y + int64_t(out) * p.rows;
#pragma unroll
      for (int ni = 0; ni < kNI; ++ni) {
        const int64_t n = n0 + wn * (kNI * 8) + ni * 8 + (lane & 3) * 2;
        if (n < p.rows) yr[n] = acc[mi][ni][2 * h];
        if (n + 1 < p.rows) yr[n + 1] = acc[mi][ni][2 * h + 1];
      }
    }
}

// ---- helpers: conversion, dequantization to a buffer, routing groups -------------------------------------------
__global__ void to_half_kernel(const float* x, int64_t n, __half* y) {
  const int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * 4;
  if (i + 3 < n) {
    const float4 v = *reinterpret_cast<const float4*>(x + i);
    reinterpret_cast<__half2*>(y + i)[0] = __floats2half2_rn(v.x, v.y);
    reinterpret_cast<__half2*>(y + i)[1] = __floats2half2_rn(v.z, v.w);
  } else {
    for (int64_t j = i; j < n; ++j) y[j] = __float2half_rn(x[j]);
  }
}

// F16 -> F32 (exact: every FP16 value is an FP32 value), four per thread; the exact path's weight copy.
__global__ void widen_f16_kernel(const __half* w, int64_t n, float* y) {
  const int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * 4;
  if (i + 3 < n) {
    const float2 a = __half22float2(reinterpret_cast<const __half2*>(w + i)[0]);
    const float2 b = __half22float2(reinterpret_cast<const __half2*>(w + i)[1]);
    *reinterpret_cast<float4*>(y + i) = make_float4(a.x, a.y, b.x, b.y);
  } else {
    for (int64_t j = i; j < n; ++j) y[j] = __half2float(w[j]);
  }
}

// n_rows rows from `w` (row_bytes each) -> FP16 rows of cols, one thread per 32-value chunk.
template <class D>
__global__ void dequant_kernel(const uint8_t* w, int64_t row_bytes, int64_t n_rows, int64_t cols, __half* out) {
  __shared__ uint2 s_grid[kNeedsGrid<D> ? 256 : 1];
  if constexpr (kNeedsGrid<D>) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) {
      const uint64_t g = iq2xxs_grid[i];
      s_grid[i] = make_uint2(uint32_t(g), uint32_t(g >> 32));
    }
    __syncthreads();
  }
  const int64_t chunk = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t per_row = cols / 32;
  if (chunk >= n_rows * per_row) return;
  const int64_t r = chunk / per_row, c0 = (chunk % per_row) * 32;
  uint32_t dec[16];
  D::decode(D::fetch(w + r * row_bytes, c0, cols), dec, s_grid);
  uint4* dst = reinterpret_cast<uint4*>(out + r * cols + c0);
#pragma unroll
  for (int i = 0; i < 4; ++i) dst[i] = make_uint4(dec[4 * i], dec[4 * i + 1], dec[4 * i + 2], dec[4 * i + 3]);
}

__global__ void moe_count_kernel(const int32_t* ids, int n_slots, int32_t* counts) {
  const int s = blockIdx.x * blockDim.x + threadIdx.x;
  if (s < n_slots) atomicAdd(&counts[ids[s]], 1);
}

// One CTA: per-expert tile counts -> first tile per expert (serial scan, E <= 1024), the per-tile expert map
// (-1 past the last used tile) and each expert's fill cursor (first padded position).
__global__ void moe_scan_kernel(const int32_t* counts, int n_experts, int max_tiles, int bm, int32_t* cursor,
                                int32_t* tile_expert) {
  __shared__ int32_t first[1025];
  if (threadIdx.x == 0) {
    int t = 0;
    for (int e = 0; e < n_experts; ++e) {
      first[e] = t;
      t += (counts[e] + bm - 1) / bm;
    }
    first[n_experts] = t;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < n_experts; e += blockDim.x) {
    cursor[e] = first[e] * bm;
    for (int i = first[e]; i < first[e + 1]; ++i) tile_expert[i] = e;
  }
  for (int i = first[n_experts] + threadIdx.x; i < max_tiles; i += blockDim.x) tile_expert[i] = -1;
}

__global__ void moe_scatter_kernel(const int32_t* ids, int n_slots, int32_t* cursor, int32_t* sorted) {
  const int s = blockIdx.x * blockDim.x + threadIdx.x;
  if (s < n_slots) sorted[atomicAdd(&cursor[ids[s]], 1)] = s;
}

// h[s][f] = FP16( silu(min(g, clamp)) * clamp(u, -clamp, clamp) * w[s] ), the CPU's swiglu_clamped order.
__global__ void swiglu_half_kernel(const float* g, const float* u, const float* row_weight, int64_t rows, int64_t f,
                                   float clamp, __half* h) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * f) return;
  const float gc = fminf(g[idx], clamp);
  const float uc = fmaxf(fminf(u[idx], clamp), -clamp);
  const float v = __fmul_rn(gc / (1.0f + expf(-gc)), uc);
  h[idx] = __float2half_rn(__fmul_rn(v, row_weight[idx / f]));
}

// ---- dispatch ---------------------------------------------------------------------------------------------------
// mma_kernel_db<D, P, BM> with its two dynamic shared-memory stages (opted in once per instantiation).
template <class D, int BM>
void launch_mma_db(const dim3& grid, const MmaArgs& a, cudaStream_t stream) {
  constexpr int kBytes = 2 * (BM + kBN) * kLds * int(sizeof(__half));
  // Per call (a host-side attribute write, microseconds): the setting is per device.
  check(cudaFuncSetAttribute(mma_kernel_db<D, D::kDepth, BM>, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes),
        "gemm: cudaFuncSetAttribute (mma_kernel_db shared memory)");
  mma_kernel_db<D, D::kDepth, BM><<<grid, kThreads, kBytes, stream>>>(a);
}

template <class D>
void launch_mma(const MmaArgs& a, int bm, int m_tiles, int n_mats, bool db, cudaStream_t stream) {
  const dim3 grid(unsigned(m_tiles), unsigned((a.rows + kBN - 1) / kBN), unsigned(n_mats));
  switch (bm * 2 + int(db)) {
    case 32: mma_kernel<D, D::kDepth, 16><<<grid, kThreads, 0, stream>>>(a); break;
    case 64: mma_kernel<D, D::kDepth, 32><<<grid, kThreads, 0, stream>>>(a); break;
    case 128: mma_kernel<D, D::kDepth, 64><<<grid, kThreads, 0, stream>>>(a); break;
    case 33: launch_mma_db<D, 16>(grid, a, stream); break;
    case 65: launch_mma_db<D, 32>(grid, a, stream); break;
    case 129: launch_mma_db<D, 64>(grid, a, stream); break;
    default: fail("gemm: tile height %d (16, 32 or 64)", bm);
  }
  check_launch(db ? "gemm mma_kernel_db" : "gemm mma_kernel");
}

// Tokens per tile from the rows a weight sees per launch (dense: T; MoE: ~T*k/E per expert): the smallest tile
// that holds them, so padding costs at most what the rows themselves cost.
int tile_rows_for(double rows_per_weight) { return rows_per_weight <= 16 ? 16 : rows_per_weight <= 32 ? 32 : 64; }

// DSV4_CUDA_MMA_DB=1: every MMA launch takes the double-buffered kernel (whole-model A/B; read once).
bool mma_db_env() {
  static const bool on = [] {
    const char* e = std::getenv("DSV4_CUDA_MMA_DB");
    return e && std::strcmp(e, "1") == 0;
  }();
  return on;
}

void mma_dispatch(QType t, GemvLayout layout, const MmaArgs& a, int bm, int m_tiles, int n_mats, bool db,
                  cudaStream_t stream) {
  db = db || mma_db_env();
  switch (t) {
    case QType::F16: return launch_mma<DqF16>(a, bm, m_tiles, n_mats, db, stream);
    case QType::Q8_0:
      if (layout == GemvLayout::Q8Split) return launch_mma<DqQ8Split>(a, bm, m_tiles, n_mats, db, stream);
      return launch_mma<DqQ8_0>(a, bm, m_tiles, n_mats, db, stream);
    case QType::Q2_K: return launch_mma<DqQ2_K>(a, bm, m_tiles, n_mats, db, stream);
    case QType::Q4_K: return launch_mma<DqQ4_K>(a, bm, m_tiles, n_mats, db, stream);
    case QType::IQ2_XXS: return launch_mma<DqIQ2_XXS>(a, bm, m_tiles, n_mats, db, stream);
    default: fail("gemm: no MMA kernel for %s", qtype_name(t).c_str());
  }
}

template <class D>
void launch_dequant(const uint8_t* w, int64_t row_bytes, int64_t n_rows, int64_t cols, __half* out, cudaStream_t s) {
  const int64_t chunks = n_rows * cols / 32;
  dequant_kernel<D><<<unsigned((chunks + 255) / 256), 256, 0, s>>>(w, row_bytes, n_rows, cols, out);
  check_launch("gemm dequant_kernel");
}

void dequant_dispatch(QType t, GemvLayout layout, const uint8_t* w, int64_t row_bytes, int64_t n_rows, int64_t cols,
                      __half* out, cudaStream_t s) {
  switch (t) {
    case QType::Q8_0:
      if (layout == GemvLayout::Q8Split) return launch_dequant<DqQ8Split>(w, row_bytes, n_rows, cols, out, s);
      return launch_dequant<DqQ8_0>(w, row_bytes, n_rows, cols, out, s);
    case QType::Q2_K: return launch_dequant<DqQ2_K>(w, row_bytes, n_rows, cols, out, s);
    case QType::Q4_K: return launch_dequant<DqQ4_K>(w, row_bytes, n_rows, cols, out, s);
    case QType::IQ2_XXS: return launch_dequant<DqIQ2_XXS>(w, row_bytes, n_rows, cols, out, s);
    default: fail("gemm: no dequantizer for %s", qtype_name(t).c_str());
  }
}

void to_half(const float* x, int64_t n, __half* y, cudaStream_t s) {
  if (n <= 0) return;
  to_half_kernel<<<unsigned((n / 4 + 256) / 256), 256, 0, s>>>(x, n, y);
  check_launch("gemm to_half_kernel");
}

// One cuBLAS handle per device, created on first use and kept for the process (creation costs milliseconds).
cublasHandle_t cublas_handle() {
  static std::mutex mu;
  static cublasHandle_t handles[64] = {};
  int dev = 0;
  check(cudaGetDevice(&dev), "gemm: cudaGetDevice");
  if (dev < 0 || dev >= 64) fail("gemm: device %d out of range", dev);
  std::lock_guard<std::mutex> lock(mu);
  if (!handles[dev]) {
    if (cublasCreate(&handles[dev]) != CUBLAS_STATUS_SUCCESS) fail("gemm: cublasCreate failed");
    // FP32 products stay IEEE FP32: no TF32 (the F32 weights are the exact reference path).
    cublasSetMathMode(handles[dev], CUBLAS_DEFAULT_MATH);
  }
  return handles[dev];
}

void cublas_check(cublasStatus_t st, const char* what) {
  if (st != CUBLAS_STATUS_SUCCESS) fail("gemm: %s failed: cuBLAS status %d", what, int(st));
}

int64_t align_up(int64_t v) { return (v + kAlign - 1) / kAlign * kAlign; }

// Rows of a dequantized FP16 chunk for the cuBLAS path: ~16 M values (32 MiB), which stays in the 50 MiB L2 of
// an H100/H200 between the dequantization that writes it and the GEMM that reads it.
int64_t cublas_chunk_rows(const GemmParams& p) {
  const int64_t r = std::max<int64_t>(kBN, (int64_t(16) << 20) / p.cols / kBN * kBN);
  return std::min(r, p.rows);
}

GemmImpl choose_impl(const GemmParams& p) {
  if (p.wtype == QType::F32 || p.exact) return GemmImpl::Cublas;
  if (p.impl != GemmImpl::Auto) return p.impl;
  // H200 measurements (wb_gemm, docs/cuda.md "Prefill GEMM"): F16 needs no dequantization, so cuBLAS. For
  // quantized weights dequantize + cuBLAS wins except where the MMA kernel has enough CTAs (>= 128 N tiles of
  // 128 rows) and few tokens: attn_q_b 1024 -> 32768 at T <= 64 took 29-36 us (MMA) vs 74-77 us (cuBLAS, whose
  // time is mostly the 67 MB FP16 copy it writes and reads).
  if (p.wtype == QType::F16) return GemmImpl::Cublas;
  return p.n_tokens <= 64 && p.rows >= 16384 ? GemmImpl::Mma : GemmImpl::Cublas;
}

void check_dense(const GemmParams& p) {
  if (!gemm_supports(p.wtype, p.layout))
    fail("gemm_cuda: weight type %s (layout %d) not supported", qtype_name(p.wtype).c_str(), int(p.layout));
  if (p.rows <= 0 || p.cols <= 0 || p.cols % kBK != 0 || p.cols % block_elems(p.wtype) != 0)
    fail("gemm_cuda: bad shape %lld x %lld (cols must be a multiple of %d and of the block size)",
         (long long)p.rows, (long long)p.cols, kBK);
  if (p.n_tokens < 0) fail("gemm_cuda: n_tokens = %d", p.n_tokens);
  if ((p.rows + kBN - 1) / kBN > 65535) fail("gemm_cuda: %lld rows exceed one launch", (long long)p.rows);
  if (p.n_tokens > 0 && (!p.w || !p.x || !p.y)) fail("gemm_cuda: null w, x or y");
  if (p.impl == GemmImpl::Mma && p.wtype == QType::F32) fail("gemm_cuda: F32 weights have no MMA kernel");
  if (p.exact && (!gemm_exact_supports(p.wtype) || p.layout != GemvLayout::Ggml || p.impl == GemmImpl::Mma))
    fail("gemm_cuda: the exact FP32 path takes F16/F32 weights in the file layout on cuBLAS, not %s (layout %d%s)",
         qtype_name(p.wtype).c_str(), int(p.layout), p.impl == GemmImpl::Mma ? ", MMA asked" : "");
}

// Y^T (rows x T, column-major) = W (cols x rows column-major, transposed) * X^T (cols x T), all FP32. cuBLAS
// runs it on the CUDA cores in IEEE FP32: the handle's math mode is CUBLAS_DEFAULT_MATH (no TF32 tensor ops).
void sgemm(const float* w, const GemmParams& p, cudaStream_t stream);

}  // namespace

bool gemm_exact_supports(QType wtype) { return wtype == QType::F16 || wtype == QType::F32; }

int gemm_exact_min_tokens() {
  // H200, wb_gemm --only control (dev/cuda/results/h200_prefill_2eba04e.txt): at T = 16 the two GEMV launches
  // still win (hc mix 24.4 vs 29.3 us, router 16.6 vs 21.2 us); the GEMV grows ~1-1.5 us per token while the
  // SGEMM stays ~20-30 us up to T = 256, so from the third launch (T = 17) the exact GEMM is as fast or faster.
  return 2 * kGemvMaxTokens + 1;
}

bool gemm_supports(QType wtype, GemvLayout layout) {
  if (layout == GemvLayout::Q8Split) return wtype == QType::Q8_0;
  return wtype == QType::Q8_0 || wtype == QType::Q2_K || wtype == QType::Q4_K || wtype == QType::IQ2_XXS ||
         wtype == QType::F16 || wtype == QType::F32;
}

int gemm_min_tokens(QType wtype) {
  // H200 (wb_gemm): F16 compressor 4096 -> 1024 at T = 8: cuBLAS 16.0 us vs GEMV 21.1 us, so any batch beyond
  // one GEMV launch. Q8_0 at T = 16 is a wash per matrix (q_a GEMV 26 vs 31 us, q_b 60 vs 30, o_b 67 vs 79,
  // shared gate 28 vs 26; sum 181 vs 166 us) and at T = 32 the GEMM wins everywhere (1.3-3.5x).
  return wtype == QType::F16 || wtype == QType::F32 ? kGemvMaxTokens + 1 : 16;
}

int moe_gemm_min_tokens(QType gate_type) {
  // H200, q2 layer (IQ2_XXS gate/up, Q2_K down; wb_gemm, commit 50027d2): GEMV path 2.62 ms vs 3.13 ms at T = 64,
  // GEMM 4.06 ms at T = 256 where the GEMV path grows ~41 us per token (~10.5 ms): linear interpolation puts the
  // crossover near T = 80. Other types were not timed; the same bound is used for them.
  (void)gate_type;
  return 96;
}

size_t gemm_workspace_bytes(const GemmParams& p) {
  check_dense(p);
  if (p.n_tokens == 0) return 0;
  const GemmImpl impl = choose_impl(p);
  if (p.wtype == QType::F32) return 0;
  if (p.exact) return size_t(align_up(p.rows * p.cols * 4));  // the F16 weight widened to FP32
  int64_t bytes = align_up(int64_t(p.n_tokens) * p.cols * 2);  // FP16 activations
  if (impl == GemmImpl::Cublas && p.wtype != QType::F16) bytes += align_up(cublas_chunk_rows(p) * p.cols * 2);
  return size_t(bytes);
}

void gemm_cuda(const GemmParams& p, void* workspace, cudaStream_t stream) {
  check_dense(p);
  if (p.n_tokens == 0) return;
  const GemmImpl impl = choose_impl(p);
  if (gemm_workspace_bytes(p) > 0 && !workspace) fail("gemm_cuda: workspace is null");
  const float one = 1.0f, zero = 0.0f;
  if (p.wtype == QType::F32) return sgemm(static_cast<const float*>(p.w), p, stream);
  if (p.exact) {
    // Widened per call rather than kept: the control matrices are small (HC mix 16384 x 24, router 4096 x 256:
    // 1.5 / 4 MiB as FP32), so the copy costs microseconds against the product's tens.
    float* w32 = static_cast<float*>(workspace);
    const int64_t n = p.rows * p.cols;
    widen_f16_kernel<<<unsigned((n / 4 + 256) / 256), 256, 0, stream>>>(static_cast<const __half*>(p.w), n, w32);
    check_launch("gemm widen_f16_kernel");
    return sgemm(w32, p, stream);
  }
  uint8_t* ws = static_cast<uint8_t*>(workspace);
  __half* x16 = reinterpret_cast<__half*>(ws);
  to_half(p.x, int64_t(p.n_tokens) * p.cols, x16, stream);
  const int64_t rb = layout_row_bytes(p.wtype, p.layout, p.cols);
  if (impl == GemmImpl::Mma) {
    MmaArgs a{};
    a.w[0] = static_cast<const uint8_t*>(p.w);
    a.y[0] = p.y;
    a.rows = p.rows, a.cols = p.cols, a.row_bytes = rb;
    a.a = x16, a.act_div = 1, a.n_tokens = p.n_tokens;
    const int bm = tile_rows_for(p.n_tokens);
    mma_dispatch(p.wtype, p.layout, a, bm, (p.n_tokens + bm - 1) / bm, 1, p.mma_double_buffer, stream);
    return;
  }
  cublasHandle_t h = cublas_handle();
  cublas_check(cublasSetStream(h, stream), "cublasSetStream");
  if (p.wtype == QType::F16) {
    cublas_check(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, int(p.rows), p.n_tokens, int(p.cols), &one, p.w,
                              CUDA_R_16F, int(p.cols), x16, CUDA_R_16F, int(p.cols), &zero, p.y, CUDA_R_32F,
                              int(p.rows), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                 "cublasGemmEx (f16)");
    return;
  }
  __half* w16 = reinterpret_cast<__half*>(ws + align_up(int64_t(p.n_tokens) * p.cols * 2));
  const int64_t chunk = cublas_chunk_rows(p);
  for (int64_t r0 = 0; r0 < p.rows; r0 += chunk) {
    const int64_t nr = std::min(chunk, p.rows - r0);
    dequant_dispatch(p.wtype, p.layout, static_cast<const uint8_t*>(p.w) + r0 * rb, rb, nr, p.cols, w16, stream);
    cublas_check(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, int(nr), p.n_tokens, int(p.cols), &one, w16, CUDA_R_16F,
                              int(p.cols), x16, CUDA_R_16F, int(p.cols), &zero, p.y + r0, CUDA_R_32F, int(p.rows),
                              CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                 "cublasGemmEx (dequantized f16)");
  }
}

namespace {
void sgemm(const float* w, const GemmParams& p, cudaStream_t stream) {
  const float one = 1.0f, zero = 0.0f;
  cublasHandle_t h = cublas_handle();
  cublas_check(cublasSetStream(h, stream), "cublasSetStream");
  cublas_check(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, int(p.rows), p.n_tokens, int(p.cols), &one, w, CUDA_R_32F,
                            int(p.cols), p.x, CUDA_R_32F, int(p.cols), &zero, p.y, CUDA_R_32F, int(p.rows),
                            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
               "cublasGemmEx (f32)");
}
}  // namespace

// ---- routed experts -----------------------------------------------------------------------------------------------
namespace {

struct MoeWs {
  int32_t *counts, *cursor, *tile_expert, *sorted;
  __half *x16, *h16;
  float *g, *u;
  int bm, max_tiles;
  int64_t bytes;
};

MoeWs moe_layout(const MoeGemmParams& p, uint8_t* base) {
  MoeWs w{};
  const int64_t slots = int64_t(p.n_tokens) * p.k;
  // Each used expert pads its slot list to a multiple of bm: at most one partial tile per used expert.
  w.bm = tile_rows_for(double(slots) / p.n_experts);
  w.max_tiles = int((slots + w.bm - 1) / w.bm + std::min<int64_t>(p.n_experts, slots));
  int64_t off = 0;
  auto take = [&](int64_t bytes) {
    uint8_t* q = base ? base + off : nullptr;
    off += align_up(bytes);
    return q;
  };
  w.counts = reinterpret_cast<int32_t*>(take(int64_t(p.n_experts) * 4));
  w.cursor = reinterpret_cast<int32_t*>(take(int64_t(p.n_experts) * 4));
  w.tile_expert = reinterpret_cast<int32_t*>(take(int64_t(w.max_tiles) * 4));
  w.sorted = reinterpret_cast<int32_t*>(take(int64_t(w.max_tiles) * w.bm * 4));
  w.x16 = reinterpret_cast<__half*>(take(int64_t(p.n_tokens) * p.d * 2));
  w.g = reinterpret_cast<float*>(take(slots * p.ff * 4));
  w.u = reinterpret_cast<float*>(take(slots * p.ff * 4));
  w.h16 = reinterpret_cast<__half*>(take(slots * p.ff * 2));
  w.bytes = off;
  return w;
}

void check_moe(const MoeGemmParams& p) {
  const ExpertStack* st[3] = {&p.gate, &p.up, &p.down};
  const char* names[3] = {"gate", "up", "down"};
  for (int i = 0; i < 3; ++i) {
    if (!gemm_supports(st[i]->type, st[i]->layout) || st[i]->type == QType::F32)
      fail("moe_gemm_cuda: %s experts of type %s (layout %d) not supported", names[i],
           qtype_name(st[i]->type).c_str(), int(st[i]->layout));
    const int64_t cols = i < 2 ? p.d : p.ff;
    if (cols % block_elems(st[i]->type) != 0) fail("moe_gemm_cuda: %s width %lld not a multiple of its block", names[i], (long long)cols);
  }
  if (p.d <= 0 || p.ff <= 0 || p.d % kBK != 0 || p.ff % kBK != 0 || p.d / kBN > 65535 || p.ff / kBN > 65535)
    fail("moe_gemm_cuda: d=%lld ff=%lld must be positive multiples of %d", (long long)p.d, (long long)p.ff, kBK);
  if (p.n_experts < 1 || p.n_experts > 1024 || p.k < 1 || p.n_tokens < 0)
    fail("moe_gemm_cuda: n_experts=%d (1..1024) k=%d n_tokens=%d", p.n_experts, p.k, p.n_tokens);
  if (int64_t(p.n_tokens) * p.k > (int64_t(1) << 30)) fail("moe_gemm_cuda: %d tokens x %d slots too many", p.n_tokens, p.k);
  if (p.n_tokens > 0 && (!p.ids || !p.weights || !p.x || !p.y_slots || !p.gate.base || !p.up.base || !p.down.base))
    fail("moe_gemm_cuda: null pointer argument");
}

}  // namespace

size_t moe_gemm_workspace_bytes(const MoeGemmParams& p) {
  check_moe(p);
  return size_t(moe_layout(p, nullptr).bytes);
}

void moe_gemm_cuda(const MoeGemmParams& p, void* workspace, cudaStream_t stream) {
  check_moe(p);
  if (p.n_tokens == 0) return;
  if (!workspace) fail("moe_gemm_cuda: workspace is null");
  const MoeWs w = moe_layout(p, static_cast<uint8_t*>(workspace));
  const int slots = p.n_tokens * p.k;
  // Group slots by expert: counts -> padded tile map and cursors -> scatter slot ids (padding stays -1).
  check(cudaMemsetAsync(w.counts, 0, size_t(p.n_experts) * 4, stream), "moe_gemm: memset counts");
  check(cudaMemsetAsync(w.sorted, 0xFF, size_t(w.max_tiles) * w.bm * 4, stream), "moe_gemm: memset sorted");
  moe_count_kernel<<<unsigned((slots + 255) / 256), 256, 0, stream>>>(p.ids, slots, w.counts);
  check_launch("moe_count_kernel");
  moe_scan_kernel<<<1, 256, 0, stream>>>(w.counts, p.n_experts, w.max_tiles, w.bm, w.cursor, w.tile_expert);
  check_launch("moe_scan_kernel");
  moe_scatter_kernel<<<unsigned((slots + 255) / 256), 256, 0, stream>>>(p.ids, slots, w.cursor, w.sorted);
  check_launch("moe_scatter_kernel");

  to_half(p.x, int64_t(p.n_tokens) * p.d, w.x16, stream);
  MmaArgs a{};
  a.sorted = w.sorted, a.tile_expert = w.tile_expert;
  a.a = w.x16, a.act_div = p.k, a.cols = p.d, a.rows = p.ff;
  a.row_bytes = layout_row_bytes(p.gate.type, p.gate.layout, p.d);
  if (p.gate.type == p.up.type && p.gate.layout == p.up.layout && p.gate.expert_stride == p.up.expert_stride) {
    a.w[0] = static_cast<const uint8_t*>(p.gate.base), a.w[1] = static_cast<const uint8_t*>(p.up.base);
    a.y[0] = w.g, a.y[1] = w.u, a.expert_stride = p.gate.expert_stride;
    mma_dispatch(p.gate.type, p.gate.layout, a, w.bm, w.max_tiles, 2, p.mma_double_buffer, stream);  // gate + up
  } else {
    const ExpertStack* st[2] = {&p.gate, &p.up};
    float* out[2] = {w.g, w.u};
    for (int i = 0; i < 2; ++i) {
      a.w[0] = static_cast<const uint8_t*>(st[i]->base), a.y[0] = out[i], a.expert_stride = st[i]->expert_stride;
      a.row_bytes = layout_row_bytes(st[i]->type, st[i]->layout, p.d);
      mma_dispatch(st[i]->type, st[i]->layout, a, w.bm, w.max_tiles, 1, p.mma_double_buffer, stream);
    }
  }
  const int64_t n = int64_t(slots) * p.ff;
  swiglu_half_kernel<<<unsigned((n + 255) / 256), 256, 0, stream>>>(w.g, w.u, p.weights, slots, p.ff,
                                                                     p.swiglu_clamp, w.h16);
  check_launch("swiglu_half_kernel");
  MmaArgs b = a;
  b.a = w.h16, b.act_div = 1, b.cols = p.ff, b.rows = p.d;
  b.w[0] = static_cast<const uint8_t*>(p.down.base), b.y[0] = p.y_slots, b.expert_stride = p.down.expert_stride;
  b.row_bytes = layout_row_bytes(p.down.type, p.down.layout, p.ff);
  mma_dispatch(p.down.type, p.down.layout, b, w.bm, w.max_tiles, 1, p.mma_double_buffer, stream);
}

}  // namespace dsv4::cuda
