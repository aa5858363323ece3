// The block dot products of the routed-expert weight types (Q4_K, Q2_K, IQ2_XXS) with a Q8_K activation row, and
// the per-lane decoded weights (W) they take. Shared by the default GEMV kernels (gemv.cu: TraitsQ4_K, TraitsQ2_K,
// TraitsIQ2_XXS) and routed-expert variant 2 (gemv_moe_v2.cu: DecQ4K, DecQ2K, DecIQ2), which decode the same ints
// into W in their own way (global vs shared-memory blocks) and must form the same products and fp32 expressions:
// one copy of the dot keeps them equal. Moved verbatim out of gemv.cu. Device code only.
#pragma once

#include <cstdint>

#include "backend/cuda/common.cuh"
#include "backend/cuda/q8k_act.cuh"

namespace dsv4::cuda {
namespace {

// Q4_K, lane of 16: 8 low-nibble values of sub-block 2c and 8 high of 2c+1.
struct DotQ4_K {
  struct W {
    float d, dmin;
    int lo0, lo1, hi0, hi1;
    int sc0, sc1, m0, m1;
  };
  __device__ static float dot(const W& w, const uint8_t* act, int sub) {
    const ActQ8K* a = reinterpret_cast<const ActQ8K*>(act);
    const int c = sub >> 2, part = sub & 3;
    const int8_t* lo = a->qs + 64 * c + 8 * part;
    const int2 al = *reinterpret_cast<const int2*>(lo), ah = *reinterpret_cast<const int2*>(lo + 32);
    const int pl = __dp4a(w.lo0, al.x, __dp4a(w.lo1, al.y, 0));
    const int ph = __dp4a(w.hi0, ah.x, __dp4a(w.hi1, ah.y, 0));
    const int isum = w.sc0 * pl + w.sc1 * ph;
    int imin = 0;
    if (part == 0)  // one lane per 64-value chunk adds the chunk's min term
      imin = w.m0 * (a->bsums[4 * c] + a->bsums[4 * c + 1]) + w.m1 * (a->bsums[4 * c + 2] + a->bsums[4 * c + 3]);
    return a->d * (w.d * float(isum) - w.dmin * float(imin));
  }
};

// Q2_K, lane t of 16: qs bytes 4t..4t+3 (16 values: 4 per 2-bit plane).
struct DotQ2_K {
  struct W {
    float d, dmin;
    int q;
    int sc[4];
    int m;
  };
  __device__ static float dot(const W& w, const uint8_t* act, int sub) {
    const ActQ8K* a = reinterpret_cast<const ActQ8K*>(act);
    const int h = sub >> 3, l0 = 4 * (sub & 7);
    int isum = 0;
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const int v = (w.q >> (2 * s)) & 0x03030303;
      isum += w.sc[s] * __dp4a(v, load_i32_a4(a->qs + 128 * h + 32 * s + l0), 0);
    }
    const int imin = w.m * a->bsums[sub];
    return a->d * (w.d * float(isum) - w.dmin * float(imin));
  }
};

// IQ2_XXS, lane g of 8: the 32-value group g.
struct DotIQ2_XXS {
  struct W {
    float d;
    int v[8];  // 32 signed int8 weights
    int ls;
  };
  __device__ static float dot(const W& w, const uint8_t* act, int g) {
    const ActQ8K* a = reinterpret_cast<const ActQ8K*>(act);
    const int4 x0 = *reinterpret_cast<const int4*>(a->qs + 32 * g);
    const int4 x1 = *reinterpret_cast<const int4*>(a->qs + 32 * g + 16);
    int s = __dp4a(w.v[0], x0.x, 0);
    s = __dp4a(w.v[1], x0.y, s);
    s = __dp4a(w.v[2], x0.z, s);
    s = __dp4a(w.v[3], x0.w, s);
    s = __dp4a(w.v[4], x1.x, s);
    s = __dp4a(w.v[5], x1.y, s);
    s = __dp4a(w.v[6], x1.z, s);
    s = __dp4a(w.v[7], x1.w, s);
    return 0.125f * w.d * a->d * float(s * w.ls);
  }
};

}  // namespace
}  // namespace dsv4::cuda
