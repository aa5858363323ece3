// Reference (scalar) dequantizers and quantizers for Q8_0, Q8_K, Q2_K, Q4_K and MXFP4.
//
// Dequantizers follow ggml's reference (ggml-quants.c) value for value. The quantizers are our own: they
// produce ggml-compatible blocks but do not try to reproduce ggml's bytes, except Q8_0 (same rounding rule,
// so converted files match llama.cpp's) — the CPU dot kernels and CUDA only depend on the layout.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "quant/kernels.h"

namespace dsv4::quant_detail {

namespace {

int nearest_int(float v) {
  return int(std::lrintf(v));
}

// Weighted least-squares fit of x ~ a*q + b over one sub-block with q in [0, nmax], b <= 0 (the K-quant
// "min" is stored as a non-negative number subtracted from every value). Tries a range of step sizes around
// (max-min)/nmax and keeps the one with the lowest weighted squared error. Returns a >= 0 and b <= 0.
void fit_affine(const float* x, const float* w, int n, int nmax, float* a_out, float* b_out, uint8_t* q) {
  float lo = x[0], hi = x[0];
  for (int i = 1; i < n; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
  lo = std::min(lo, 0.0f);
  if (hi <= lo) {  // all values equal and <= 0: x = 0*q - (-lo)
    *a_out = 0.0f;
    *b_out = lo;
    std::memset(q, 0, size_t(n));
    return;
  }
  float best_err = INFINITY, best_a = (hi - lo) / float(nmax), best_b = lo;
  uint8_t trial[32];
  for (int step = -8; step <= 12; ++step) {
    // iscale sweeps around nmax/(hi-lo); larger iscale clips the top values, smaller wastes levels.
    const float iscale = (float(nmax) + 0.1f * float(step)) / (hi - lo);
    float sw = 0, swq = 0, swqq = 0, swx = 0, swqx = 0;
    for (int i = 0; i < n; ++i) {
      const int l = std::clamp(nearest_int(iscale * (x[i] - lo)), 0, nmax);
      trial[i] = uint8_t(l);
      sw += w[i];
      swq += w[i] * float(l);
      swqq += w[i] * float(l) * float(l);
      swx += w[i] * x[i];
      swqx += w[i] * float(l) * x[i];
    }
    // Solve the 2x2 normal equations; fall back to b = 0 when the optimum has b > 0.
    float a, b;
    const float det = sw * swqq - swq * swq;
    if (det > 0) {
      a = (sw * swqx - swq * swx) / det;
      b = (swqq * swx - swq * swqx) / det;
    } else {
      a = best_a;
      b = lo;
    }
    if (b > 0) {
      b = 0;
      a = swqq > 0 ? swqx / swqq : 0.0f;
    }
    if (a < 0) continue;
    float err = 0;
    for (int i = 0; i < n; ++i) {
      const float d = a * float(trial[i]) + b - x[i];
      err += w[i] * d * d;
    }
    if (err < best_err) {
      best_err = err;
      best_a = a;
      best_b = b;
      std::memcpy(q, trial, size_t(n));
    }
  }
  *a_out = best_a;
  *b_out = best_b;
}

// Requantize one sub-block with the final (quantized) step and offset.
void requant(const float* x, int n, int nmax, float step, float offset, uint8_t* q) {
  const float inv = step > 0 ? 1.0f / step : 0.0f;
  for (int i = 0; i < n; ++i) q[i] = uint8_t(std::clamp(nearest_int((x[i] + offset) * inv), 0, nmax));
}

void weights_for(const float* importance, int64_t offset, int n, float* w) {
  for (int i = 0; i < n; ++i) w[i] = importance ? std::max(importance[offset + i], 0.0f) + 1e-12f : 1.0f;
}

}  // namespace

// ---- Q8_0 -------------------------------------------------------------------------------------------------
void dequant_q8_0(const block_q8_0* x, float* y, int64_t n) {
  for (int64_t b = 0; b < n / kQK8_0; ++b) {
    const float d = f16_to_f32(x[b].d);
    for (int i = 0; i < kQK8_0; ++i) y[b * kQK8_0 + i] = d * float(x[b].qs[i]);
  }
}

void quant_q8_0(const float* x, block_q8_0* y, int64_t n) {
  for (int64_t b = 0; b < n / kQK8_0; ++b) {
    const float* xb = x + b * kQK8_0;
    float amax = 0;
    for (int i = 0; i < kQK8_0; ++i) amax = std::max(amax, std::fabs(xb[i]));
    // Same rule as ggml's quantize_row_q8_0_ref: d = amax/127, q = round-half-away(x/d) with the f32 d.
    const float d = amax / 127.0f;
    const float id = d != 0 ? 1.0f / d : 0.0f;
    y[b].d = f32_to_f16(d);
    for (int i = 0; i < kQK8_0; ++i) {
      // |x*id| <= 127 for finite input; the clamp only keeps NaN/inf (no meaningful code) away from an
      // undefined float->int conversion.
      const float v = std::roundf(xb[i] * id);
      y[b].qs[i] = int8_t(v >= -127.0f && v <= 127.0f ? v : 0.0f);
    }
  }
}

// ---- Q8_K -------------------------------------------------------------------------------------------------
void dequant_q8_K(const block_q8_K* x, float* y, int64_t n) {
  for (int64_t b = 0; b < n / kQK_K; ++b)
    for (int i = 0; i < kQK_K; ++i) y[b * kQK_K + i] = x[b].d * float(x[b].qs[i]);
}

void quant_q8_K(const float* x, block_q8_K* y, int64_t n) {
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    const float* xb = x + b * kQK_K;
    float amax = 0;
    for (int i = 0; i < kQK_K; ++i) amax = std::max(amax, std::fabs(xb[i]));
    // Symmetric [-127, 127] (ggml uses -128 for the extreme value): keeping -128 out lets the SIMD
    // IQ2_XXS kernel apply weight signs to the activations without int8 overflow.
    const float iscale = amax != 0 ? 127.0f / amax : 0.0f;
    y[b].d = amax != 0 ? amax / 127.0f : 0.0f;
    for (int i = 0; i < kQK_K; ++i) y[b].qs[i] = int8_t(std::clamp(nearest_int(iscale * xb[i]), -127, 127));
    for (int j = 0; j < kQK_K / 16; ++j) {
      int s = 0;
      for (int i = 0; i < 16; ++i) s += y[b].qs[16 * j + i];
      y[b].bsums[j] = int16_t(s);
    }
  }
}

// ---- Q2_K -------------------------------------------------------------------------------------------------
void dequant_q2_K(const block_q2_K* x, float* y, int64_t n) {
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    const float d = f16_to_f32(x[b].d), dmin = f16_to_f32(x[b].dmin);
    float* yb = y + b * kQK_K;
    for (int h = 0; h < 2; ++h)
      for (int s = 0; s < 4; ++s)
        for (int l = 0; l < 32; ++l) {
          const uint8_t sc = x[b].scales[8 * h + 2 * s + (l >= 16)];
          const int q = (x[b].qs[32 * h + l] >> (2 * s)) & 3;
          yb[128 * h + 32 * s + l] = d * float(sc & 15) * float(q) - dmin * float(sc >> 4);
        }
  }
}

void quant_q2_K(const float* x, block_q2_K* y, int64_t n, const float* importance) {
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    const float* xb = x + b * kQK_K;
    float a[16], m[16], w[16];
    uint8_t q[kQK_K];
    for (int j = 0; j < 16; ++j) {
      weights_for(importance, b * kQK_K + 16 * j, 16, w);
      float bb;
      fit_affine(xb + 16 * j, w, 16, 3, &a[j], &bb, q + 16 * j);
      m[j] = -bb;
    }
    const float amax = *std::max_element(a, a + 16), mmax = *std::max_element(m, m + 16);
    y[b].d = f32_to_f16(amax / 15.0f);
    y[b].dmin = f32_to_f16(mmax / 15.0f);
    const float d = f16_to_f32(y[b].d), dmin = f16_to_f32(y[b].dmin);
    for (int j = 0; j < 16; ++j) {
      const int ls = d > 0 ? std::clamp(nearest_int(a[j] / d), 0, 15) : 0;
      const int lm = dmin > 0 ? std::clamp(nearest_int(m[j] / dmin), 0, 15) : 0;
      y[b].scales[j] = uint8_t(ls | (lm << 4));
      requant(xb + 16 * j, 16, 3, d * float(ls), dmin * float(lm), q + 16 * j);
    }
    // Pack: value 128h + 32s + l at bits 2s of qs[32h + l].
    std::memset(y[b].qs, 0, sizeof(y[b].qs));
    for (int h = 0; h < 2; ++h)
      for (int s = 0; s < 4; ++s)
        for (int l = 0; l < 32; ++l) y[b].qs[32 * h + l] |= uint8_t(q[128 * h + 32 * s + l] << (2 * s));
  }
}

// ---- Q4_K -------------------------------------------------------------------------------------------------
void dequant_q4_K(const block_q4_K* x, float* y, int64_t n) {
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    const float d = f16_to_f32(x[b].d), dmin = f16_to_f32(x[b].dmin);
    float* yb = y + b * kQK_K;
    for (int c = 0; c < 4; ++c) {
      uint8_t sc0, m0, sc1, m1;
      q4k_scale_min(2 * c, x[b].scales, &sc0, &m0);
      q4k_scale_min(2 * c + 1, x[b].scales, &sc1, &m1);
      for (int l = 0; l < 32; ++l) {
        const uint8_t byte = x[b].qs[32 * c + l];
        yb[64 * c + l] = d * float(sc0) * float(byte & 15) - dmin * float(m0);
        yb[64 * c + 32 + l] = d * float(sc1) * float(byte >> 4) - dmin * float(m1);
      }
    }
  }
}

void quant_q4_K(const float* x, block_q4_K* y, int64_t n, const float* importance) {
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    const float* xb = x + b * kQK_K;
    float a[8], m[8], w[32];
    uint8_t q[kQK_K];
    for (int j = 0; j < 8; ++j) {
      weights_for(importance, b * kQK_K + 32 * j, 32, w);
      float bb;
      fit_affine(xb + 32 * j, w, 32, 15, &a[j], &bb, q + 32 * j);
      m[j] = -bb;
    }
    const float amax = *std::max_element(a, a + 8), mmax = *std::max_element(m, m + 8);
    y[b].d = f32_to_f16(amax / 63.0f);
    y[b].dmin = f32_to_f16(mmax / 63.0f);
    const float d = f16_to_f32(y[b].d), dmin = f16_to_f32(y[b].dmin);
    uint8_t ls[8], lm[8];
    for (int j = 0; j < 8; ++j) {
      ls[j] = uint8_t(d > 0 ? std::clamp(nearest_int(a[j] / d), 0, 63) : 0);
      lm[j] = uint8_t(dmin > 0 ? std::clamp(nearest_int(m[j] / dmin), 0, 63) : 0);
      requant(xb + 32 * j, 32, 15, d * float(ls[j]), dmin * float(lm[j]), q + 32 * j);
    }
    // Pack the 6-bit pairs (inverse of q4k_scale_min).
    for (int j = 0; j < 4; ++j) {
      y[b].scales[j] = uint8_t((ls[j] & 63) | ((ls[j + 4] >> 4) << 6));
      y[b].scales[j + 4] = uint8_t((lm[j] & 63) | ((lm[j + 4] >> 4) << 6));
      y[b].scales[j + 8] = uint8_t((ls[j + 4] & 15) | ((lm[j + 4] & 15) << 4));
    }
    for (int c = 0; c < 4; ++c)
      for (int l = 0; l < 32; ++l) y[b].qs[32 * c + l] = uint8_t(q[64 * c + l] | (q[64 * c + 32 + l] << 4));
  }
}

// ---- MXFP4 ------------------------------------------------------------------------------------------------
void dequant_mxfp4(const block_mxfp4* x, float* y, int64_t n) {
  for (int64_t b = 0; b < n / kQKMXFP4; ++b) {
    const float s = e8m0_to_f32(x[b].e);
    for (int j = 0; j < 16; ++j) {
      y[b * 32 + j] = e2m1_to_f32(x[b].qs[j] & 15) * s;
      y[b * 32 + 16 + j] = e2m1_to_f32(x[b].qs[j] >> 4) * s;
    }
  }
}

void quant_mxfp4(const float* x, block_mxfp4* y, int64_t n) {
  for (int64_t b = 0; b < n / kQKMXFP4; ++b) {
    const float* xb = x + b * 32;
    float amax = 0;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(xb[i]));
    // Two candidate exponents: ggml's floor(log2 amax) - 2 (the largest value may clip at 6*scale) and one
    // above it (no clipping, coarser steps); keep whichever reconstructs the block with less error.
    const float l2 = std::log2(amax);
    int e0 = amax > 0 ? (std::isfinite(l2) ? int(std::floor(l2)) - 2 + 127 : 253) : 0;  // inf: largest scale
    e0 = std::clamp(e0, 0, 253);
    uint8_t best_e = uint8_t(e0);
    float best_err = INFINITY;
    for (int e = e0; e <= e0 + 1; ++e) {
      const float s = e8m0_to_f32(uint8_t(e)), inv = 1.0f / s;
      float err = 0;
      for (int i = 0; i < 32; ++i) {
        const float r = e2m1_to_f32(f32_to_e2m1(xb[i] * inv)) * s - xb[i];
        err += r * r;
      }
      if (err < best_err) {
        best_err = err;
        best_e = uint8_t(e);
      }
    }
    y[b].e = best_e;
    const float inv = 1.0f / e8m0_to_f32(best_e);
    for (int j = 0; j < 16; ++j)
      y[b].qs[j] = uint8_t(f32_to_e2m1(xb[j] * inv) | (f32_to_e2m1(xb[16 + j] * inv) << 4));
  }
}

}  // namespace dsv4::quant_detail
