// AVX-512 (F, BW, VL, DQ) dot kernels, compiled with target attributes and used only after cpuid confirms
// the extensions (dot.cpp). Same integer scheme as the AVX2 kernels at twice the width: two Q8_0/MXFP4 blocks
// or two 64-value Q4_K chunks per instruction. Integer per-block totals equal the scalar kernel's.
#if defined(__x86_64__) || defined(__i386__)
// GCC 12's AVX-512 insert/extract/reduce intrinsics build their pass-through operand from a self-initialized
// "undefined" vector, which -Wuninitialized reports once the intrinsics are inlined into target("avx512")
// functions. The value is never read (all-ones masks), so the warning is silenced for this file only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#endif

#include "quant/kernels.h"

namespace dsv4::quant_detail {

#if defined(__x86_64__) || defined(__i386__)

#define DSV4_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))

namespace {

DSV4_AVX512 inline __m512i dot_u8s8(__m512i u, __m512i s) {
  return _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1));
}

// Signed x signed int8 dot as 16 int32 lanes (neither operand is -128 in our formats).
DSV4_AVX512 inline __m512i dot_s8(__m512i x, __m512i y) {
  const __m512i ax = _mm512_abs_epi8(x);
  const __mmask64 neg = _mm512_movepi8_mask(x);
  const __m512i sy = _mm512_mask_sub_epi8(y, neg, _mm512_setzero_si512(), y);
  return dot_u8s8(ax, sy);
}

DSV4_AVX512 float dot_f32(const void* w, const void* a, int64_t n) {
  const float* x = static_cast<const float*>(w);
  const float* y = static_cast<const float*>(a);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(y + i + 16), acc1);
  }
  float s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  for (; i < n; ++i) s += x[i] * y[i];
  return s;
}

DSV4_AVX512 float dot_f16(const void* w, const void* a, int64_t n) {
  const uint16_t* x = static_cast<const uint16_t*>(w);
  const float* y = static_cast<const float*>(a);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 w0 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i)));
    const __m512 w1 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i + 16)));
    acc0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(y + i), acc0);
    acc1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(y + i + 16), acc1);
  }
  float s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  for (; i < n; ++i) s += f16_to_f32(x[i]) * y[i];
  return s;
}

DSV4_AVX512 float dot_bf16(const void* w, const void* a, int64_t n) {
  const uint16_t* x = static_cast<const uint16_t*>(w);
  const float* y = static_cast<const float*>(a);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 w0 = _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i))), 16));
    const __m512 w1 = _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i + 16))), 16));
    acc0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(y + i), acc0);
    acc1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(y + i + 16), acc1);
  }
  float s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  for (; i < n; ++i) s += bf16_to_f32(x[i]) * y[i];
  return s;
}

// Two 32-value blocks at once: 256-bit halves of a zmm, per-half scale broadcast into 8 lanes each.
DSV4_AVX512 float dot_q8_0(const void* w, const void* a, int64_t n) {
  const block_q8_0* x = static_cast<const block_q8_0*>(w);
  const block_q8_0* y = static_cast<const block_q8_0*>(a);
  const int64_t nb = n / kQK8_0;
  __m512 acc = _mm512_setzero_ps();
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    const __m512i qx = _mm512_inserti64x4(
        _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[b].qs))),
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[b + 1].qs)), 1);
    const __m512i qy = _mm512_inserti64x4(
        _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[b].qs))),
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[b + 1].qs)), 1);
    const float d0 = f16_to_f32(x[b].d) * f16_to_f32(y[b].d);
    const float d1 = f16_to_f32(x[b + 1].d) * f16_to_f32(y[b + 1].d);
    const __m512 d = _mm512_insertf32x8(_mm512_set1_ps(d0), _mm256_set1_ps(d1), 1);
    acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(dot_s8(qx, qy)), acc);
  }
  float s = _mm512_reduce_add_ps(acc);
  for (; b < nb; ++b) {
    const __m256i qx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[b].qs));
    const __m256i qy = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[b].qs));
    const __m512i p = dot_s8(_mm512_zextsi256_si512(qx), _mm512_zextsi256_si512(qy));
    // Upper half of the cast is undefined: reduce only the low 8 lanes.
    s += f16_to_f32(x[b].d) * f16_to_f32(y[b].d) * float(_mm512_mask_reduce_add_epi32(__mmask16(0x00FF), p));
  }
  return s;
}

DSV4_AVX512 float dot_mxfp4(const void* w, const void* a, int64_t n) {
  const block_mxfp4* x = static_cast<const block_mxfp4*>(w);
  const block_q8_0* y = static_cast<const block_q8_0*>(a);
  const __m128i lut = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
  const __m128i m4 = _mm_set1_epi8(0x0F);
  float s = 0;
  for (int64_t b = 0; b < n / kQKMXFP4; ++b) {
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x[b].qs));
    const __m128i lo = _mm_shuffle_epi8(lut, _mm_and_si128(q, m4));
    const __m128i hi = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(q, 4), m4));
    const __m256i qx = _mm256_set_m128i(hi, lo);
    const __m256i qy = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[b].qs));
    const __m256i ax = _mm256_sign_epi8(qx, qx), sy = _mm256_sign_epi8(qy, qx);
    const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), _mm256_set1_epi16(1));
    __m128i r = _mm_add_epi32(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1));
    r = _mm_add_epi32(r, _mm_shuffle_epi32(r, 0x4E));
    r = _mm_add_epi32(r, _mm_shuffle_epi32(r, 0xB1));
    s += e8m0_to_f32_half(x[b].e) * f16_to_f32(y[b].d) * float(_mm_cvtsi128_si32(r));
  }
  return s;
}

DSV4_AVX512 float dot_q4_K(const void* w, const void* a, int64_t n) {
  const block_q4_K* x = static_cast<const block_q4_K*>(w);
  const block_q8_K* y = static_cast<const block_q8_K*>(a);
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  float s = 0;
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    uint8_t sc[8], mn[8];
    for (int j = 0; j < 8; ++j) q4k_scale_min(j, x[b].scales, &sc[j], &mn[j]);
    __m512i sumq = _mm512_setzero_si512();
    for (int c = 0; c < 4; c += 2) {
      // Chunks c and c+1: 64 packed bytes -> 4 sub-blocks (2c, 2c+1, 2c+2, 2c+3).
      const __m512i q = _mm512_loadu_si512(x[b].qs + 32 * c);
      const __m512i ql = _mm512_and_si512(q, m4);                        // sub-blocks 2c | 2c+2
      const __m512i qh = _mm512_and_si512(_mm512_srli_epi16(q, 4), m4);  // sub-blocks 2c+1 | 2c+3
      const __m512i y_lo = _mm512_inserti64x4(
          _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[b].qs + 64 * c))),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[b].qs + 64 * c + 64)), 1);
      const __m512i y_hi = _mm512_inserti64x4(
          _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[b].qs + 64 * c + 32))),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[b].qs + 64 * c + 96)), 1);
      // Scales as int16 folded into the pair-sum madd (pair sums <= 3810, scales <= 63).
      const __m512i s_lo =
          _mm512_inserti64x4(_mm512_set1_epi16(sc[2 * c]), _mm256_set1_epi16(sc[2 * c + 2]), 1);
      const __m512i s_hi =
          _mm512_inserti64x4(_mm512_set1_epi16(sc[2 * c + 1]), _mm256_set1_epi16(sc[2 * c + 3]), 1);
      sumq = _mm512_add_epi32(sumq, _mm512_madd_epi16(_mm512_maddubs_epi16(ql, y_lo), s_lo));
      sumq = _mm512_add_epi32(sumq, _mm512_madd_epi16(_mm512_maddubs_epi16(qh, y_hi), s_hi));
    }
    int32_t summ = 0;
    for (int j = 0; j < 8; ++j) summ += int32_t(mn[j]) * (y[b].bsums[2 * j] + y[b].bsums[2 * j + 1]);
    s += y[b].d *
         (f16_to_f32(x[b].d) * float(_mm512_reduce_add_epi32(sumq)) - f16_to_f32(x[b].dmin) * float(summ));
  }
  return s;
}

DSV4_AVX512 float dot_q2_K(const void* w, const void* a, int64_t n) {
  const block_q2_K* x = static_cast<const block_q2_K*>(w);
  const block_q8_K* y = static_cast<const block_q8_K*>(a);
  const __m512i m3 = _mm512_set1_epi8(3);
  const __m128i m4 = _mm_set1_epi8(0x0F);
  // pshufb control per 128-bit lane: int16 = scale byte {0, 1, 8, 9} (+2sh below), high byte zeroed (0x80).
  const __m512i ctrl_base = _mm512_inserti64x4(
      _mm512_zextsi256_si512(
          _mm256_set_m128i(_mm_set1_epi16(int16_t(0x8001)), _mm_set1_epi16(int16_t(0x8000)))),
      _mm256_set_m128i(_mm_set1_epi16(int16_t(0x8009)), _mm_set1_epi16(int16_t(0x8008))), 1);
  float s = 0;
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    const __m512i sc = _mm512_broadcast_i32x4(
        _mm_and_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x[b].scales)), m4));
    // Both 32-byte halves side by side: zmm bytes 0..31 = half 0, 32..63 = half 1.
    const __m512i q = _mm512_loadu_si512(x[b].qs);
    __m512i sumq = _mm512_setzero_si512();
    for (int sh = 0; sh < 4; ++sh) {
      const __m512i qv = _mm512_and_si512(_mm512_srli_epi16(q, 2 * sh), m3);
      const __m512i yv = _mm512_inserti64x4(
          _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[b].qs + 32 * sh))),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[b].qs + 128 + 32 * sh)), 1);
      // 128-bit lane k of the products covers sub-block {2sh, 2sh+1, 8+2sh, 9+2sh}[k].
      const __m512i scale =
          _mm512_shuffle_epi8(sc, _mm512_add_epi16(ctrl_base, _mm512_set1_epi16(int16_t(2 * sh))));
      sumq = _mm512_add_epi32(sumq, _mm512_madd_epi16(_mm512_maddubs_epi16(qv, yv), scale));
    }
    int32_t summ = 0;
    for (int j = 0; j < 16; ++j) summ += int32_t(x[b].scales[j] >> 4) * y[b].bsums[j];
    s += y[b].d *
         (f16_to_f32(x[b].d) * float(_mm512_reduce_add_epi32(sumq)) - f16_to_f32(x[b].dmin) * float(summ));
  }
  return s;
}

}  // namespace

const DotTable& dot_table_avx512() {
  static const DotTable t = [] {
    DotTable d;
    d.f32 = dot_f32;
    d.f16 = dot_f16;
    d.bf16 = dot_bf16;
    d.q8_0 = dot_q8_0;
    d.mxfp4 = dot_mxfp4;
    d.q2_K = dot_q2_K;
    d.q4_K = dot_q4_K;
    // IQ2_XXS uses the AVX2 kernel: its cost is the per-tuple grid/sign lookups, not vector width, and a
    // 512-bit version (scalar-built or vpgatherqq-loaded grid rows) measured 15-50% slower on this machine.
    // FP8 falls back to the scalar table-lookup kernel (converter input, not a GEMV format).
    return d;
  }();
  return t;
}

#else

const DotTable& dot_table_avx512() {
  static const DotTable t{};
  return t;
}

#endif

}  // namespace dsv4::quant_detail
