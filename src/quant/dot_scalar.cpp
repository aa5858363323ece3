// Scalar dot kernels: the portable fallback and the oracle the SIMD paths are tested against.
//
// Integer products are summed exactly in int32 per block (the int8 formats bound every partial sum far below
// 2^31), then scaled in float, in the same per-block order the SIMD kernels use, so SIMD and scalar differ
// only by float summation order.
#include "quant/iq2xxs_tables.h"
#include "quant/kernels.h"

namespace dsv4::quant_detail {

namespace {

// E2M1 codes as doubled integers (x2 so that 0.5 and 1.5 are integral); scale by e8m0_to_f32_half.
constexpr int8_t kE2M1x2[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

float dot_f32(const void* w, const void* a, int64_t n) {
  const float* x = static_cast<const float*>(w);
  const float* y = static_cast<const float*>(a);
  float s = 0;
  for (int64_t i = 0; i < n; ++i) s += x[i] * y[i];
  return s;
}

float dot_f16(const void* w, const void* a, int64_t n) {
  const uint16_t* x = static_cast<const uint16_t*>(w);
  const float* y = static_cast<const float*>(a);
  float s = 0;
  for (int64_t i = 0; i < n; ++i) s += f16_to_f32(x[i]) * y[i];
  return s;
}

float dot_bf16(const void* w, const void* a, int64_t n) {
  const uint16_t* x = static_cast<const uint16_t*>(w);
  const float* y = static_cast<const float*>(a);
  float s = 0;
  for (int64_t i = 0; i < n; ++i) s += bf16_to_f32(x[i]) * y[i];
  return s;
}

float dot_fp8(const void* w, const void* a, int64_t n) {
  // 256-entry decode table built once; e4m3 NaN codes decode to NaN and poison the sum, as they should.
  static const auto table = [] {
    struct T {
      float v[256];
    } t{};
    for (int i = 0; i < 256; ++i) t.v[i] = fp8_e4m3_to_f32(uint8_t(i));
    return t;
  }();
  const uint8_t* x = static_cast<const uint8_t*>(w);
  const float* y = static_cast<const float*>(a);
  float s = 0;
  for (int64_t i = 0; i < n; ++i) s += table.v[x[i]] * y[i];
  return s;
}

float dot_q8_0(const void* w, const void* a, int64_t n) {
  const block_q8_0* x = static_cast<const block_q8_0*>(w);
  const block_q8_0* y = static_cast<const block_q8_0*>(a);
  float s = 0;
  for (int64_t b = 0; b < n / kQK8_0; ++b) {
    int32_t sumi = 0;
    for (int i = 0; i < kQK8_0; ++i) sumi += int32_t(x[b].qs[i]) * int32_t(y[b].qs[i]);
    s += f16_to_f32(x[b].d) * f16_to_f32(y[b].d) * float(sumi);
  }
  return s;
}

float dot_mxfp4(const void* w, const void* a, int64_t n) {
  const block_mxfp4* x = static_cast<const block_mxfp4*>(w);
  const block_q8_0* y = static_cast<const block_q8_0*>(a);
  float s = 0;
  for (int64_t b = 0; b < n / kQKMXFP4; ++b) {
    int32_t sumi = 0;
    for (int j = 0; j < 16; ++j) {
      sumi += kE2M1x2[x[b].qs[j] & 15] * int32_t(y[b].qs[j]);
      sumi += kE2M1x2[x[b].qs[j] >> 4] * int32_t(y[b].qs[j + 16]);
    }
    s += e8m0_to_f32_half(x[b].e) * f16_to_f32(y[b].d) * float(sumi);
  }
  return s;
}

float dot_q2_K(const void* w, const void* a, int64_t n) {
  const block_q2_K* x = static_cast<const block_q2_K*>(w);
  const block_q8_K* y = static_cast<const block_q8_K*>(a);
  float s = 0;
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    int32_t sum_q = 0, sum_m = 0;
    for (int j = 0; j < 16; ++j) sum_m += int32_t(x[b].scales[j] >> 4) * y[b].bsums[j];
    for (int h = 0; h < 2; ++h)
      for (int sh = 0; sh < 4; ++sh)
        for (int half = 0; half < 2; ++half) {
          int32_t part = 0;
          for (int l = 16 * half; l < 16 * half + 16; ++l)
            part += int32_t((x[b].qs[32 * h + l] >> (2 * sh)) & 3) * y[b].qs[128 * h + 32 * sh + l];
          sum_q += int32_t(x[b].scales[8 * h + 2 * sh + half] & 15) * part;
        }
    s += y[b].d * (f16_to_f32(x[b].d) * float(sum_q) - f16_to_f32(x[b].dmin) * float(sum_m));
  }
  return s;
}

float dot_q4_K(const void* w, const void* a, int64_t n) {
  const block_q4_K* x = static_cast<const block_q4_K*>(w);
  const block_q8_K* y = static_cast<const block_q8_K*>(a);
  float s = 0;
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    int32_t sum_q = 0, sum_m = 0;
    for (int c = 0; c < 4; ++c) {
      uint8_t sc0, m0, sc1, m1;
      q4k_scale_min(2 * c, x[b].scales, &sc0, &m0);
      q4k_scale_min(2 * c + 1, x[b].scales, &sc1, &m1);
      int32_t p0 = 0, p1 = 0;
      for (int l = 0; l < 32; ++l) {
        p0 += int32_t(x[b].qs[32 * c + l] & 15) * y[b].qs[64 * c + l];
        p1 += int32_t(x[b].qs[32 * c + l] >> 4) * y[b].qs[64 * c + 32 + l];
      }
      sum_q += int32_t(sc0) * p0 + int32_t(sc1) * p1;
      sum_m += int32_t(m0) * (y[b].bsums[4 * c] + y[b].bsums[4 * c + 1]) +
               int32_t(m1) * (y[b].bsums[4 * c + 2] + y[b].bsums[4 * c + 3]);
    }
    s += y[b].d * (f16_to_f32(x[b].d) * float(sum_q) - f16_to_f32(x[b].dmin) * float(sum_m));
  }
  return s;
}

float dot_iq2_xxs(const void* w, const void* a, int64_t n) {
  const block_iq2_xxs* x = static_cast<const block_iq2_xxs*>(w);
  const block_q8_K* y = static_cast<const block_q8_K*>(a);
  float s = 0;
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    // (0.5 + ls) * 0.25 = (2 ls + 1) / 8: keep the sum integral and apply 1/8 once.
    int32_t bsum = 0;
    for (int gi = 0; gi < 8; ++gi) {
      const uint32_t a0 = uint32_t(x[b].qs[4 * gi]) | uint32_t(x[b].qs[4 * gi + 1]) << 16;
      const uint32_t a1 = uint32_t(x[b].qs[4 * gi + 2]) | uint32_t(x[b].qs[4 * gi + 3]) << 16;
      int32_t sumi = 0;
      for (int t = 0; t < 4; ++t) {
        const uint64_t grid = iq2xxs_grid[(a0 >> (8 * t)) & 255];
        const uint8_t signs = ksigns_iq2xs((a1 >> (7 * t)) & 127);
        for (int k = 0; k < 8; ++k) {
          const int32_t v = int32_t((grid >> (8 * k)) & 255) * y[b].qs[32 * gi + 8 * t + k];
          sumi += (signs >> k) & 1 ? -v : v;
        }
      }
      bsum += sumi * int32_t(2 * (a1 >> 28) + 1);
    }
    s += 0.125f * f16_to_f32(x[b].d) * y[b].d * float(bsum);
  }
  return s;
}

}  // namespace

const DotTable& dot_table_scalar() {
  static const DotTable t = [] {
    DotTable d;
    d.f32 = dot_f32;
    d.f16 = dot_f16;
    d.bf16 = dot_bf16;
    d.fp8 = dot_fp8;
    d.q8_0 = dot_q8_0;
    d.mxfp4 = dot_mxfp4;
    d.q2_K = dot_q2_K;
    d.q4_K = dot_q4_K;
    d.iq2_xxs = dot_iq2_xxs;
    return d;
  }();
  return t;
}

}  // namespace dsv4::quant_detail
