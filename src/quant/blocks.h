// Quant block layouts: the one definition shared by the CPU kernels, the CUDA backend and the converter.
//
// Every struct is bit-identical to ggml's (ggml-org/ggml, src/ggml-common.h), so GGUF files written by
// llama.cpp / ds4 load without repacking. Plain structs only: f16 fields are raw `uint16_t` bits and there
// are no CUDA types, so the header compiles unchanged under g++ and nvcc. The scalar conversion helpers are
// `DSV4_HD` (host+device under nvcc) and exact: every narrowing conversion rounds to nearest, ties to even.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define DSV4_HD __host__ __device__
#else
#define DSV4_HD
#endif

namespace dsv4 {

// ---- block sizes ---------------------------------------------------------------------------------------
inline constexpr int kQK8_0 = 32;          // Q8_0 values per block
inline constexpr int kQK_K = 256;          // K-quant / IQ super-block
inline constexpr int kQKMXFP4 = 32;        // MXFP4 values per block (one E8M0 scale)
inline constexpr int kFp8BlockRows = 128;  // official FP8 checkpoints: one E8M0 scale per 128x128 tile
inline constexpr int kFp8BlockCols = 128;

// Q8_0: x = d * q.
struct block_q8_0 {
  uint16_t d;  // f16 scale
  int8_t qs[kQK8_0];
};
static_assert(sizeof(block_q8_0) == 34, "Q8_0 block is 34 bytes");

// Q2_K: 16 sub-blocks of 16. scales[i] low nibble = scale, high nibble = min.
// x = d*(s&15)*q - dmin*(s>>4), q in 0..3. Value 128*h + 32*s + l lives at bits 2s..2s+1 of qs[32*h + l]
// and uses scales[8*h + 2*s + (l >= 16)].
struct block_q2_K {
  uint8_t scales[kQK_K / 16];
  uint8_t qs[kQK_K / 4];
  uint16_t d;     // f16 super-block scale for the 4-bit scales
  uint16_t dmin;  // f16 super-block scale for the 4-bit mins
};
static_assert(sizeof(block_q2_K) == 84, "Q2_K block is 84 bytes");

// Q4_K: 8 sub-blocks of 32 with 6-bit scale/min packed in 12 bytes (see q4k_scale_min below).
// x = d*sc*q - dmin*m, q in 0..15; 64-value chunk c: qs[32c..32c+31], low nibbles = sub-block 2c.
struct block_q4_K {
  uint16_t d;
  uint16_t dmin;
  uint8_t scales[12];
  uint8_t qs[kQK_K / 2];
};
static_assert(sizeof(block_q4_K) == 144, "Q4_K block is 144 bytes");

// Q8_K: the activation format for K-quant and IQ dot products. bsums[j] = sum of qs[16j..16j+15].
struct block_q8_K {
  float d;
  int8_t qs[kQK_K];
  int16_t bsums[kQK_K / 16];
};
static_assert(sizeof(block_q8_K) == 292, "Q8_K block is 292 bytes");

// IQ2_XXS: eight 32-value groups, each two u32 (a0 = qs[4g..4g+1], a1 = qs[4g+2..4g+3]) read little-endian.
// Bytes of a0 index iq2xxs_grid; a1 bits 7k..7k+6 index ksigns_iq2xs; a1>>28 = ls;
// x = d * (0.5 + ls) * 0.25 * grid * sign.
struct block_iq2_xxs {
  uint16_t d;
  uint16_t qs[kQK_K / 8];
};
static_assert(sizeof(block_iq2_xxs) == 66, "IQ2_XXS block is 66 bytes");

// MXFP4 (ggml order): byte j holds element j in the low nibble and element j+16 in the high nibble.
// x = e2m1(nibble) * 2^(e - 127).
struct block_mxfp4 {
  uint8_t e;  // E8M0 shared exponent
  uint8_t qs[kQKMXFP4 / 2];
};
static_assert(sizeof(block_mxfp4) == 17, "MXFP4 block is 17 bytes");

// ---- bit casts (device intrinsics under nvcc, memcpy elsewhere) --------------------------------------
DSV4_HD inline uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}
DSV4_HD inline float f32_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// ---- IEEE half
// ---------------------------------------------------------------------------------------------
DSV4_HD inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  if (exp == 0x1F) return f32_from_bits(sign | 0x7F800000u | (mant << 13));  // inf / nan (payload kept)
  if (exp != 0) return f32_from_bits(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return f32_from_bits(sign);
  // Subnormal half: renormalize. value = mant * 2^-24.
  int e = 113;  // exponent field for 2^-14 in f32 is 113 (127-14)
  while ((mant & 0x400u) == 0) {
    mant <<= 1;
    --e;
  }
  return f32_from_bits(sign | (uint32_t(e) << 23) | ((mant & 0x3FFu) << 13));
}

// Round to nearest even; overflow -> inf; NaN stays NaN (quiet).
DSV4_HD inline uint16_t f32_to_f16(float f) {
  const uint32_t x = f32_bits(f);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax > 0x7F800000u) return uint16_t(sign | 0x7E00u | ((ax >> 13) & 0x3FFu));  // NaN
  if (ax >= 0x477FF000u) return uint16_t(sign | 0x7C00u);  // >= 65520 rounds to inf (or is inf)
  if (ax >= 0x38800000u) {                                 // normal half range (>= 2^-14)
    const uint32_t mant_odd = (ax >> 13) & 1u;
    const uint32_t r = ax + 0xFFFu + mant_odd;  // RNE on the 13 dropped bits
    return uint16_t(sign | ((r - 0x38000000u) >> 13));
  }
  if (ax < 0x33000000u) return sign;  // < 2^-25: rounds to zero (2^-25 itself ties to even = 0)
  // Subnormal half: value / 2^-24, rounded to nearest even.
  const uint32_t e = ax >> 23;                      // 102..112
  const uint32_t m = (ax & 0x7FFFFFu) | 0x800000u;  // 24-bit significand
  const uint32_t shift = 126u - e;                  // bits to drop so that the unit is 2^-24
  uint32_t q = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (q & 1u))) ++q;
  return uint16_t(sign | q);
}

// ---- bfloat16
// -----------------------------------------------------------------------------------------------
DSV4_HD inline float bf16_to_f32(uint16_t h) {
  return f32_from_bits(uint32_t(h) << 16);
}
DSV4_HD inline uint16_t f32_to_bf16(float f) {
  const uint32_t x = f32_bits(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((x >> 16) | 0x40u);  // quiet NaN
  return uint16_t((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

// ---- E8M0 (power-of-two scale)
// ------------------------------------------------------------------------------ 2^(e-127). e = 0 is 2^-127
// (an f32 subnormal); e = 255 gives +inf as in ggml (OCP MX calls it NaN).
DSV4_HD inline float e8m0_to_f32(uint8_t e) {
  return f32_from_bits(e == 0 ? 0x00400000u : uint32_t(e) << 23);
}
// Half of e8m0_to_f32 (ggml's MXFP4 kernels use doubled integer E2M1 values with this scale).
DSV4_HD inline float e8m0_to_f32_half(uint8_t e) {
  return f32_from_bits(e < 2 ? (0x00200000u << e) : uint32_t(e - 1) << 23);
}

// Nearest E8M0 code for |f| (the format is unsigned), ties to the even code; saturates to 254 (2^127),
// values at or below 2^-127 give 0, NaN gives 255 (the OCP NaN code).
DSV4_HD inline uint8_t f32_to_e8m0(float f) {
  const uint32_t x = f32_bits(f) & 0x7FFFFFFFu;
  if (x > 0x7F800000u) return 255;
  if (x >= 0x7F000000u) return 254;  // >= 2^127, inf included
  uint32_t e = x >> 23, m = x & 0x7FFFFFu;
  if (e == 0) {  // subnormal: 2^-127 is m = 2^22; the midpoint to 2^-126 is m = 3 * 2^21
    return m > (3u << 21) ? 1 : 0;
  }
  // Between 2^(e-127) and 2^(e-126) the midpoint is mantissa 1.5 (m = 2^22).
  if (m > 0x400000u || (m == 0x400000u && (e & 1u))) ++e;
  return uint8_t(e);
}

// ---- FP4 E2M1
// ------------------------------------------------------------------------------------------------ Code ->
// value: [0, .5, 1, 1.5, 2, 3, 4, 6] for codes 0..7, bit 3 is the sign.
DSV4_HD inline float e2m1_to_f32(uint8_t code) {
  const float mag[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  const float v = mag[code & 7];
  return (code & 8) ? -v : v;
}
// Nearest E2M1 code (ties to the even code, i.e. even mantissa bit), saturating at +-6; NaN -> +0.
DSV4_HD inline uint8_t f32_to_e2m1(float f) {
  const uint8_t sign = (f32_bits(f) >> 31) ? 8 : 0;
  const float a = f < 0 ? -f : f;
  uint8_t c;
  if (!(a > 0.25f))
    c = 0;  // also NaN
  else if (a < 0.75f)
    c = 1;
  else if (a <= 1.25f)
    c = 2;  // tie 1.25 -> 1.0 (code 2, even)
  else if (a < 1.75f)
    c = 3;
  else if (a <= 2.5f)
    c = 4;  // tie 2.5 -> 2 (code 4)
  else if (a < 3.5f)
    c = 5;
  else if (a <= 5.0f)
    c = 6;  // tie 5 -> 4 (code 6)
  else
    c = 7;
  return uint8_t(sign | c);  // negative values that round to 0 keep the sign (code 8 = -0)
}

// ---- FP8 E4M3 (e4m3fn: bias 7, no inf, 0x7F/0xFF = NaN, max 448)
// -------------------------------------------
DSV4_HD inline float fp8_e4m3_to_f32(uint8_t b) {
  const uint32_t sign = uint32_t(b & 0x80u) << 24;
  const uint32_t exp = (b >> 3) & 0xFu;
  const uint32_t mant = b & 7u;
  if (exp == 0xF && mant == 7) return f32_from_bits(sign | 0x7FC00000u);
  if (exp != 0) return f32_from_bits(sign | ((exp + 120u) << 23) | (mant << 20));
  // Subnormal: mant * 2^-9, exact in f32.
  const float v = float(mant) * (1.0f / 512.0f);
  return sign ? -v : v;
}
// Round to nearest even, saturating to +-448 (the "satfinite" convention of the official converter);
// NaN -> 0x7F.
DSV4_HD inline uint8_t f32_to_fp8_e4m3(float f) {
  const uint32_t x = f32_bits(f);
  const uint8_t sign = uint8_t((x >> 24) & 0x80u);
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax > 0x7F800000u) return uint8_t(sign | 0x7Fu);
  if (ax >= 0x43E00000u) return uint8_t(sign | 0x7Eu);     // >= 448 (incl. inf) saturates
  if (ax >= 0x3C800000u) {                                 // normal e4m3 range (>= 2^-6)
    const uint32_t r = ax + 0x7FFFFu + ((ax >> 20) & 1u);  // RNE on the 20 dropped bits
    const uint32_t v = (r - 0x3C000000u) >> 20;            // rebias 127 -> 7
    return uint8_t(sign | (v > 0x7Eu ? 0x7Eu : v));
  }
  // Subnormal: quantum 2^-9. Values < 2^-10 round to 0 (2^-10 ties to even = 0).
  const float a = f32_from_bits(ax) * 512.0f;  // exact (power-of-two scaling, no overflow here)
  uint32_t q = uint32_t(a);
  const float rem = a - float(q);
  if (rem > 0.5f || (rem == 0.5f && (q & 1u))) ++q;
  return uint8_t(sign | q);  // q may reach 8 = smallest normal (exp 1, mant 0): still correct bits
}

// ---- helpers for the packed K-quant scales
// ------------------------------------------------------------------ Sub-block j (0..7) of a Q4_K block:
// 6-bit scale and 6-bit min.
DSV4_HD inline void q4k_scale_min(int j, const uint8_t* s, uint8_t* sc, uint8_t* mn) {
  if (j < 4) {
    *sc = s[j] & 63;
    *mn = s[j + 4] & 63;
  } else {
    *sc = uint8_t((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4));
    *mn = uint8_t((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
  }
}

}  // namespace dsv4
