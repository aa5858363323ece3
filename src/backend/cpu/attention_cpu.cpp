// CPU attention kernels; see attention_cpu.h.
#include "backend/cpu/attention_cpu.h"

#include <algorithm>
#include <cmath>

namespace dsv4::cpu {
namespace {

float dot(const float* a, const float* b, int n) {
  float s = 0.0f;
  for (int i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

const float* comp_row(const SinkAttnRows& r, int64_t i, int dim) {
  int64_t k = r.comp_idx ? int64_t(r.comp_idx[i]) : i;
  return r.comp + k * dim;
}

}  // namespace

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
    for (int d = 0; d < dim; ++d) out[d] += e * row[d];
  }
  float inv = 1.0f / den;
  for (int d = 0; d < dim; ++d) out[d] *= inv;
}

float indexer_score(const float* q, const float* w, const float* k, int n_heads, int dim) {
  float s = 0.0f;
  for (int h = 0; h < n_heads; ++h) s += w[h] * std::max(0.0f, dot(q + int64_t(h) * dim, k, dim));
  return s;
}

}  // namespace dsv4::cpu
