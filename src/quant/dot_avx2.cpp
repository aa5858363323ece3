// AVX2 (+FMA, F16C) dot kernels, compiled with target attributes so the default build stays portable; only
// called after cpuid says the CPU has these extensions (dot.cpp).
//
// Integer formats: weights are unsigned nibble/crumb values or signed int8; products with the int8
// activations are formed with vpmaddubsw (u8 x s8 -> s16 pairs, |sum| <= 2*15*127 for Q4_K, no saturation)
// or, for signed x signed (Q8_0), by moving the sign of x onto y first. Per-block integer totals equal the
// scalar kernel's exactly; only the f32 accumulation order differs.
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <cstring>

#include "quant/iq2xxs_tables.h"
#include "quant/kernels.h"

namespace dsv4::quant_detail {

#if defined(__x86_64__) || defined(__i386__)

#define DSV4_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace {

DSV4_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

DSV4_AVX2 inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// Sum of products of 32 signed int8 pairs, as 8 int32 lanes.
DSV4_AVX2 inline __m256i dot_s8(__m256i x, __m256i y) {
  const __m256i ax = _mm256_sign_epi8(x, x);  // |x| (x = -128 never occurs in our formats)
  const __m256i sy = _mm256_sign_epi8(y, x);
  return _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), _mm256_set1_epi16(1));
}

// Sum of products u8 (small) x s8 as 8 int32 lanes.
DSV4_AVX2 inline __m256i dot_u8s8(__m256i u, __m256i s) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

DSV4_AVX2 float dot_f32(const void* w, const void* a, int64_t n) {
  const float* x = static_cast<const float*>(w);
  const float* y = static_cast<const float*>(a);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), _mm256_loadu_ps(y + i + 8), acc1);
  }
  float s = hsum(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) s += x[i] * y[i];
  return s;
}

DSV4_AVX2 float dot_f16(const void* w, const void* a, int64_t n) {
  const uint16_t* x = static_cast<const uint16_t*>(w);
  const float* y = static_cast<const float*>(a);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 w0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i)));
    const __m256 w1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i + 8)));
    acc0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(y + i), acc0);
    acc1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(y + i + 8), acc1);
  }
  float s = hsum(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) s += f16_to_f32(x[i]) * y[i];
  return s;
}

DSV4_AVX2 float dot_bf16(const void* w, const void* a, int64_t n) {
  const uint16_t* x = static_cast<const uint16_t*>(w);
  const float* y = static_cast<const float*>(a);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i));
    // bf16 -> f32 is a 16-bit left shift: widen each half of the 16 values.
    const __m256 w0 =
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(h)), 16));
    const __m256 w1 =
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(h, 1)), 16));
    acc0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(y + i), acc0);
    acc1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(y + i + 8), acc1);
  }
  float s = hsum(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) s += bf16_to_f32(x[i]) * y[i];
  return s;
}

DSV4_AVX2 float dot_q8_0(const void* w, const void* a, int64_t n) {
  const block_q8_0* x = static_cast<const block_q8_0*>(w);
  const block_q8_0* y = static_cast<const block_q8_0*>(a);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < n / kQK8_0; ++b) {
    const __m256i qx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[b].qs));
    const __m256i qy = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[b].qs));
    const __m256 d = _mm256_set1_ps(f16_to_f32(x[b].d) * f16_to_f32(y[b].d));
    acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot_s8(qx, qy)), acc);
  }
  return hsum(acc);
}

DSV4_AVX2 float dot_mxfp4(const void* w, const void* a, int64_t n) {
  const block_mxfp4* x = static_cast<const block_mxfp4*>(w);
  const block_q8_0* y = static_cast<const block_q8_0*>(a);
  // Doubled E2M1 values as int8, looked up 16 at a time with pshufb.
  const __m128i lut = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
  const __m128i m4 = _mm_set1_epi8(0x0F);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < n / kQKMXFP4; ++b) {
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x[b].qs));
    const __m128i lo = _mm_shuffle_epi8(lut, _mm_and_si128(q, m4));
    const __m128i hi = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(q, 4), m4));
    const __m256i qx = _mm256_set_m128i(hi, lo);  // elements 0..15 then 16..31
    const __m256i qy = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[b].qs));
    const __m256 d = _mm256_set1_ps(e8m0_to_f32_half(x[b].e) * f16_to_f32(y[b].d));
    acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot_s8(qx, qy)), acc);
  }
  return hsum(acc);
}

DSV4_AVX2 float dot_q4_K(const void* w, const void* a, int64_t n) {
  const block_q4_K* x = static_cast<const block_q4_K*>(w);
  const block_q8_K* y = static_cast<const block_q8_K*>(a);
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  float s = 0;
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    uint8_t sc[8], mn[8];
    for (int j = 0; j < 8; ++j) q4k_scale_min(j, x[b].scales, &sc[j], &mn[j]);
    __m256i sumq = _mm256_setzero_si256();
    for (int c = 0; c < 4; ++c) {
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[b].qs + 32 * c));
      const __m256i ql = _mm256_and_si256(q, m4);
      const __m256i qh = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
      const __m256i y0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[b].qs + 64 * c));
      const __m256i y1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[b].qs + 64 * c + 32));
      // Scale folded into the pair-sum step: madd(u8 x s8 pair sums (|.| <= 3810), scale <= 63) fits int32.
      const __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(ql, y0), _mm256_set1_epi16(sc[2 * c]));
      const __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(qh, y1), _mm256_set1_epi16(sc[2 * c + 1]));
      sumq = _mm256_add_epi32(sumq, _mm256_add_epi32(p0, p1));
    }
    int32_t summ = 0;
    for (int j = 0; j < 8; ++j) summ += int32_t(mn[j]) * (y[b].bsums[2 * j] + y[b].bsums[2 * j + 1]);
    s += y[b].d * (f16_to_f32(x[b].d) * float(hsum_i32(sumq)) - f16_to_f32(x[b].dmin) * float(summ));
  }
  return s;
}

DSV4_AVX2 float dot_q2_K(const void* w, const void* a, int64_t n) {
  const block_q2_K* x = static_cast<const block_q2_K*>(w);
  const block_q8_K* y = static_cast<const block_q8_K*>(a);
  const __m256i m3 = _mm256_set1_epi8(3);
  const __m128i m4 = _mm_set1_epi8(0x0F);
  // pshufb control giving int16 lanes 0..7 = scale byte j and lanes 8..15 = byte j+1 (0x80 = zero byte);
  // adding j to every lane selects sub-blocks j, j+1.
  const __m256i ctrl_base =
      _mm256_set_m128i(_mm_set1_epi16(int16_t(0x8001)), _mm_set1_epi16(int16_t(0x8000)));
  float s = 0;
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    const __m256i sc = _mm256_broadcastsi128_si256(
        _mm_and_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x[b].scales)), m4));
    __m256i sumq = _mm256_setzero_si256();
    for (int h = 0; h < 2; ++h) {
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[b].qs + 32 * h));
      for (int sh = 0; sh < 4; ++sh) {
        const __m256i qv = _mm256_and_si256(_mm256_srli_epi16(q, 2 * sh), m3);
        const __m256i yv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[b].qs + 128 * h + 32 * sh));
        // 16-bit pair sums: lanes 0..7 cover bytes 0..15 (sub-block 8h+2sh), 8..15 bytes 16..31.
        const __m256i p16 = _mm256_maddubs_epi16(qv, yv);
        const __m256i scale =
            _mm256_shuffle_epi8(sc, _mm256_add_epi16(ctrl_base, _mm256_set1_epi16(int16_t(8 * h + 2 * sh))));
        sumq = _mm256_add_epi32(sumq, _mm256_madd_epi16(p16, scale));
      }
    }
    int32_t summ = 0;
    for (int j = 0; j < 16; ++j) summ += int32_t(x[b].scales[j] >> 4) * y[b].bsums[j];
    s += y[b].d * (f16_to_f32(x[b].d) * float(hsum_i32(sumq)) - f16_to_f32(x[b].dmin) * float(summ));
  }
  return s;
}

// 7-bit sign code -> 8 bytes of +1/-1 (as a u64), for _mm256_sign_epi8 on the activations.
struct SignTable {
  uint64_t v[128];
};
const SignTable& sign_table() {
  static const SignTable t = [] {
    SignTable s{};
    for (uint32_t c = 0; c < 128; ++c) {
      const uint8_t bits = ksigns_iq2xs(c);
      for (int k = 0; k < 8; ++k) s.v[c] |= uint64_t((bits >> k) & 1 ? 0xFF : 0x01) << (8 * k);
    }
    return s;
  }();
  return t;
}

DSV4_AVX2 float dot_iq2_xxs(const void* w, const void* a, int64_t n) {
  const block_iq2_xxs* x = static_cast<const block_iq2_xxs*>(w);
  const block_q8_K* y = static_cast<const block_q8_K*>(a);
  const uint64_t* signs = sign_table().v;
  float s = 0;
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    __m256i acc = _mm256_setzero_si256();
    for (int gi = 0; gi < 8; ++gi) {
      uint32_t a0, a1;
      std::memcpy(&a0, x[b].qs + 4 * gi, 4);
      std::memcpy(&a1, x[b].qs + 4 * gi + 2, 4);
      const __m256i grid =
          _mm256_setr_epi64x(int64_t(iq2xxs_grid[a0 & 255]), int64_t(iq2xxs_grid[(a0 >> 8) & 255]),
                             int64_t(iq2xxs_grid[(a0 >> 16) & 255]), int64_t(iq2xxs_grid[a0 >> 24]));
      const __m256i sg =
          _mm256_setr_epi64x(int64_t(signs[a1 & 127]), int64_t(signs[(a1 >> 7) & 127]),
                             int64_t(signs[(a1 >> 14) & 127]), int64_t(signs[(a1 >> 21) & 127]));
      // Weight signs moved onto the activations (|y| <= 127, so negation cannot overflow).
      const __m256i yv =
          _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[b].qs + 32 * gi)), sg);
      // Pair sums (|.| <= 2*43*127) times the odd group scale (<= 31) in one madd.
      const __m256i p =
          _mm256_madd_epi16(_mm256_maddubs_epi16(grid, yv), _mm256_set1_epi16(int16_t(2 * (a1 >> 28) + 1)));
      acc = _mm256_add_epi32(acc, p);
    }
    s += 0.125f * f16_to_f32(x[b].d) * y[b].d * float(hsum_i32(acc));
  }
  return s;
}

}  // namespace

const DotTable& dot_table_avx2() {
  static const DotTable t = [] {
    DotTable d;
    d.f32 = dot_f32;
    d.f16 = dot_f16;
    d.bf16 = dot_bf16;
    d.q8_0 = dot_q8_0;
    d.mxfp4 = dot_mxfp4;
    d.q2_K = dot_q2_K;
    d.q4_K = dot_q4_K;
    d.iq2_xxs = dot_iq2_xxs;
    return d;  // fp8 stays scalar (table lookup; FP8 weights are converter input, not a GEMV format)
  }();
  return t;
}

#else  // not x86: no AVX2 kernels, everything falls back to scalar

const DotTable& dot_table_avx2() {
  static const DotTable t{};
  return t;
}

#endif

}  // namespace dsv4::quant_detail
