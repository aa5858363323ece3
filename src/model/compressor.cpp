// Streaming KV compressor (model-spec §6.3, §6.9); see compressor.h for the layout invariants.
#include "model/compressor.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "common/error.h"
#include "model/attention_io.h"
#include "model/attention_qat.h"

namespace dsv4 {

void rms_norm_inplace(float* x, int n, const float* w, float eps) {
  float ss = 0.0f;
  for (int i = 0; i < n; ++i) ss += x[i] * x[i];
  float r = 1.0f / std::sqrt(ss / float(n) + eps);
  if (w) {
    for (int i = 0; i < n; ++i) x[i] = x[i] * r * w[i];
  } else {
    for (int i = 0; i < n; ++i) x[i] *= r;
  }
}

void CompressorState::init(int m, int d, int64_t max_context) {
  if (m <= 0 || d <= 0) fail("compressor: bad ratio %d / dim %d", m, d);
  ratio = m;
  dim = d;
  overlap = (m == 4);
  max_rows = max_context / m;
  reset();
}

void CompressorState::reset() {
  const float ninf = -std::numeric_limits<float>::infinity();
  cur_v.assign(size_t(ratio) * size_t(width()), 0.0f);
  cur_z.assign(size_t(ratio) * size_t(width()), ninf);
  prev_v.assign(overlap ? size_t(ratio) * size_t(dim) : 0, 0.0f);
  prev_z.assign(overlap ? size_t(ratio) * size_t(dim) : 0, ninf);
  rows.clear();
  rows.shrink_to_fit();
  n_rows = 0;
}

bool compressor_push(CompressorState& s, int64_t pos, const float* v, const float* z, const float* ape_row,
                     float* u) {
  const int m = s.ratio, d = s.dim, cw = s.width();
  const int r = int(pos % m);
  float* cv = s.cur_v.data() + size_t(r) * cw;
  float* cz = s.cur_z.data() + size_t(r) * cw;
  for (int i = 0; i < cw; ++i) {
    cv[i] = v[i];
    cz[i] = z[i] + ape_row[i];
  }
  if (r != m - 1) return false;

  // Per channel: softmax over the slots of the window, in the fixed order prev[0..m) then cur[0..m).
  const int boff = s.overlap ? d : 0;  // the window's own contribution: B halves (overlap) or the whole row
  for (int c = 0; c < d; ++c) {
    float zmax = -std::numeric_limits<float>::infinity();
    if (s.overlap)
      for (int i = 0; i < m; ++i) zmax = std::max(zmax, s.prev_z[size_t(i) * d + c]);
    for (int i = 0; i < m; ++i) zmax = std::max(zmax, s.cur_z[size_t(i) * cw + boff + c]);
    float num = 0.0f, den = 0.0f;
    if (s.overlap) {
      for (int i = 0; i < m; ++i) {
        float e = std::exp(s.prev_z[size_t(i) * d + c] - zmax);  // -inf slots give exactly 0
        num += e * s.prev_v[size_t(i) * d + c];
        den += e;
      }
    }
    for (int i = 0; i < m; ++i) {
      float e = std::exp(s.cur_z[size_t(i) * cw + boff + c] - zmax);
      num += e * s.cur_v[size_t(i) * cw + boff + c];
      den += e;
    }
    u[c] = num / den;
  }
  if (s.overlap) {  // this window's A halves seed the next row
    for (int i = 0; i < m; ++i) {
      std::copy_n(s.cur_v.data() + size_t(i) * cw, d, s.prev_v.data() + size_t(i) * d);
      std::copy_n(s.cur_z.data() + size_t(i) * cw, d, s.prev_z.data() + size_t(i) * d);
    }
  }
  return true;
}

void compressor_emit(CompressorState& s, float* u, const float* norm, float eps, const RopeFreqs& rope,
                     CompressorQat qat) {
  if (s.n_rows >= s.max_rows)
    fail("compressor: row %lld exceeds the session capacity of %lld rows (max context too small)",
         (long long)s.n_rows, (long long)s.max_rows);
  const int d = s.dim, n_rot = rope.n_rot;
  rms_norm_inplace(u, d, norm, eps);
  std::vector<float> cs(static_cast<size_t>(n_rot));
  rope_cos_sin(rope, s.n_rows * s.ratio, cs.data());  // position of the window's first token
  rope_rotate(u, d, n_rot, cs.data());
  if (qat == CompressorQat::Fp8Kv) qat_fp8_blocks(u, d - n_rot, 64);
  if (qat == CompressorQat::Fp4Indexer) qat_fp4_indexer_row(u, d);
  s.rows.insert(s.rows.end(), u, u + d);
  s.n_rows += 1;
}

void CompressorState::save(std::ostream& os) const {
  using namespace attn_io;
  put_i64(os, ratio);
  put_i64(os, dim);
  put_i64(os, n_rows);
  put_floats(os, cur_v.data(), cur_v.size());
  put_floats(os, cur_z.data(), cur_z.size());
  put_floats(os, prev_v.data(), prev_v.size());
  put_floats(os, prev_z.data(), prev_z.size());
  put_floats(os, rows.data(), size_t(n_rows) * size_t(dim));
}

void CompressorState::load(std::istream& is, const char* what) {
  using namespace attn_io;
  std::string w(what);
  expect_i64(is, ratio, (w + ".ratio").c_str());
  expect_i64(is, dim, (w + ".dim").c_str());
  std::streamoff at = is.tellg();
  int64_t n = get_i64(is, (w + ".n_rows").c_str());
  if (n < 0 || n > max_rows)
    fail("attention state: field %s.n_rows at stream offset %lld is %lld, capacity is %lld", what,
         (long long)at, (long long)n, (long long)max_rows);
  get_floats(is, cur_v.data(), cur_v.size(), (w + ".cur_v").c_str());
  get_floats(is, cur_z.data(), cur_z.size(), (w + ".cur_z").c_str());
  get_floats(is, prev_v.data(), prev_v.size(), (w + ".prev_v").c_str());
  get_floats(is, prev_z.data(), prev_z.size(), (w + ".prev_z").c_str());
  rows.assign(size_t(n) * size_t(dim), 0.0f);
  get_floats(is, rows.data(), rows.size(), (w + ".rows").c_str());
  n_rows = n;
}

}  // namespace dsv4
