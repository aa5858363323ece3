// CPU attention kernels; see attention_cpu.h.
#include "backend/cpu/attention_cpu.h"

#include <algorithm>
#include <cmath>

namespace dsv4::cpu {
namespace {

// Dot product with 16 explicit partial sums (lane i % 16) combined by a fixed pairwise tree: the summation
// order is defined here, not by the compiler, so every build and SIMD width gives the same bits, and the lane
// loop vectorizes without reassociation (a single running sum cannot: IEEE order forbids it).
constexpr int kLanes = 16;
inline float dot(const float* a, const float* b, int n) {
  float acc[kLanes] = {};
  int i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += a[i + l] * b[i + l];
  for (int l = 0; i < n; ++i, ++l) acc[l] += a[i] * b[i];
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

// out[d] += e * row[d]: independent per d, vectorizes as written.
inline void axpy(float* out, float e, const float* row, int n) {
  for (int d = 0; d < n; ++d) out[d] += e * row[d];
}

const float* comp_row(const SinkAttnRows& r, int64_t i, int dim) {
  int64_t k = r.comp_idx ? int64_t(r.comp_idx[i]) : i;
  return r.comp + k * dim;
}

}  // namespace

// Compiled for AVX2 and baseline x86-64, picked at load time; both clones compute the same bits (explicit lanes,
// no FMA contraction under ISO C++).
#if defined(__x86_64__) && defined(__GNUC__)
#define DSV4_ATTN_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define DSV4_ATTN_CLONES
#endif

DSV4_ATTN_CLONES
void sink_attention_head(const float* q, int dim, const SinkAttnRows& rows, float sink, float scale,
                         float* scratch, float* out) {
  const int64_t nw = rows.n_window, nc = rows.n_comp;
  float m = sink;
  for (int64_t i = 0; i < nw; ++i) {
    scratch[i] = scale * dot(q, rows.window + i * dim, dim);
    m = std::max(m, scratch[i]);
  }
  for (int64_t i = 0; i < nc; ++i) {
    scratch[nw + i] = scale * dot(q, comp_row(rows, i, dim), dim);
    m = std::max(m, scratch[nw + i]);
  }
  float den = std::exp(sink - m);
  std::fill(out, out + dim, 0.0f);
  for (int64_t i = 0; i < nw + nc; ++i) {
    float e = std::exp(scratch[i] - m);
    den += e;
    const float* row = i < nw ? rows.window + i * dim : comp_row(rows, i - nw, dim);
    axpy(out, e, row, dim);
  }
  float inv = 1.0f / den;
  for (int d = 0; d < dim; ++d) out[d] *= inv;
}

DSV4_ATTN_CLONES
float indexer_score(const float* q, const float* w, const float* k, int n_heads, int dim) {
  float s = 0.0f;
  for (int h = 0; h < n_heads; ++h) s += w[h] * std::max(0.0f, dot(q + int64_t(h) * dim, k, dim));
  return s;
}

}  // namespace dsv4::cpu
