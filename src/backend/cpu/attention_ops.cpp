// CPU attention ops of the op table (backend.h): the code the attention sublayer used to run inline, now behind
// the table so a device backend can replace it. Every output row is computed by one thread in a fixed order,
// so chunked and whole prefill agree bitwise.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "backend/cpu/attention_cpu.h"
#include "common/error.h"
#include "common/thread_pool.h"
#include "model/attention_qat.h"
#include "model/compressor.h"
#include "model/indexer.h"
#include "model/rope.h"

namespace dsv4 {

// Declared in model/compressor.h; defined here because the backend ops use it (the model library links the
// backend library, not the reverse).
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

namespace cpu {
namespace {

void apply_qat(float* x, int dim, int n_rot, AttnQat q) {
  if (q == AttnQat::Fp8) qat_fp8_blocks(x, dim - n_rot, 64);
  if (q == AttnQat::Fp4Indexer) qat_fp4_indexer_row(x, dim);
}

const float* f32_or_null(const WeightView* w) { return (w && w->present()) ? w->f32() : nullptr; }

// Pools the window that token p closes (see compressor_step in backend.h) into u[0, dC).
void pool_window(const CompressorBuffers& s, float* u) {
  const int m = s.ratio, d = s.dim, cw = s.width();
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
      std::copy_n(s.cur_v + size_t(i) * cw, d, s.prev_v + size_t(i) * d);
      std::copy_n(s.cur_z + size_t(i) * cw, d, s.prev_z + size_t(i) * d);
    }
  }
}

}  // namespace

void head_prep(ThreadPool& pool, float* x, int T, int H, int dim, const HeadPrep& p) {
  const int n_rot = p.rope ? p.rope->n_rot : 0;
  const float* nw = f32_or_null(p.norm_w);
  pool.parallel_for(T, [&](int64_t b, int64_t e) {
    std::vector<float> cs(static_cast<size_t>(n_rot));
    for (int64_t t = b; t < e; ++t) {
      if (p.rope) rope_cos_sin(*p.rope, p.pos0 + t, cs.data());
      for (int h = 0; h < H; ++h) {
        float* r = x + (size_t(t) * H + h) * dim;
        if (p.norm) rms_norm_inplace(r, dim, nw, p.eps);
        if (p.rope) rope_rotate(r, dim, n_rot, cs.data(), p.inverse);
        apply_qat(r, dim, n_rot, p.qat);
      }
    }
  });
}

void compressor_step(const CompressorParams& p, const CompressorBuffers& s, const float* v, const float* z, int T,
                     int64_t p0) {
  const int m = s.ratio, d = s.dim, cw = s.width();
  const int n_rot = p.rope ? p.rope->n_rot : 0;
  const float* ape = p.ape->f32();
  const float* nw = f32_or_null(p.norm);
  std::vector<float> u(static_cast<size_t>(d)), cs(static_cast<size_t>(n_rot));
  for (int t = 0; t < T; ++t) {
    const int64_t pos = p0 + t;
    const int r = int(pos % m);
    float* cv = s.cur_v + size_t(r) * cw;
    float* cz = s.cur_z + size_t(r) * cw;
    const float* ape_row = ape + size_t(r) * cw;
    for (int i = 0; i < cw; ++i) {
      cv[i] = v[size_t(t) * cw + i];
      cz[i] = z[size_t(t) * cw + i] + ape_row[i];
    }
    if (r != m - 1) continue;
    pool_window(s, u.data());
    const int64_t w = pos / m;  // the window this token closes
    rms_norm_inplace(u.data(), d, nw, p.eps);
    if (p.rope) {
      rope_cos_sin(*p.rope, w * m, cs.data());  // position of the window's first token
      rope_rotate(u.data(), d, n_rot, cs.data());
    }
    apply_qat(u.data(), d, n_rot, p.qat);
    std::copy(u.begin(), u.end(), s.rows + w * d);
  }
}

void indexer_topk(ThreadPool& pool, const IndexerParams& p, const float* qI, const float* wI, const float* keys,
                  int T, int64_t p0, int32_t* sel) {
  const int HI = p.heads, dI = p.dim, K = p.top_k;
  auto one = [&](int t, ThreadPool* inner) {
    const int64_t n_vis = (p0 + t + 1) / p.ratio;
    int32_t* out = sel + size_t(t) * K;
    if (n_vis <= K) {
      indexer_top_k(nullptr, n_vis, K, out);
      return;
    }
    std::vector<float> w(static_cast<size_t>(HI)), score(static_cast<size_t>(n_vis));
    for (int h = 0; h < HI; ++h) w[size_t(h)] = wI[size_t(t) * HI + h] * p.weight_scale;
    const float* q = qI + size_t(t) * HI * dI;
    auto score_range = [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) score[size_t(i)] = indexer_score(q, w.data(), keys + i * dI, HI, dI);
    };
    if (inner) inner->parallel_for(n_vis, score_range); else score_range(0, n_vis);
    indexer_top_k(score.data(), n_vis, K, out);
  };
  if (T == 1) {
    one(0, &pool);  // decode: parallel over keys
  } else {
    pool.parallel_for(T, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) one(int(t), nullptr);
    });
  }
}

void sink_attention(ThreadPool& pool, const SinkAttnParams& p, const float* q, const float* kv_new,
                    const float* ring, const float* comp, const int32_t* sel, int T, int64_t p0, float* out) {
  const int H = p.heads, dh = p.dim, W = p.window;
  // Window rows as one contiguous run: the last min(W-1, p0) positions from the ring, then this call's tokens.
  const int64_t n_prev = std::min<int64_t>(W - 1, p0);
  std::vector<float> win(size_t(n_prev + T) * dh);
  for (int64_t i = 0; i < n_prev; ++i) std::copy_n(ring + ((p0 - n_prev + i) % W) * dh, dh, win.data() + i * dh);
  std::copy_n(kv_new, size_t(T) * dh, win.data() + n_prev * dh);
  const int64_t first = p0 - n_prev;  // position of win row 0
  const int64_t max_comp = p.comp == CompRows::Selected ? p.top_k
                           : p.comp == CompRows::All    ? (p0 + T) / p.ratio
                                                        : 0;
  const float* sinks = p.sinks->f32();
  const int n_rot = p.out_rope ? p.out_rope->n_rot : 0;
  pool.parallel_for(int64_t(T) * H, [&](int64_t b, int64_t e) {
    std::vector<float> scratch(size_t(W + max_comp)), cs(static_cast<size_t>(n_rot));
    for (int64_t i = b; i < e; ++i) {
      const int t = int(i / H), h = int(i % H);
      const int64_t pos = p0 + t, lo = window_first(pos, W);
      SinkAttnRows rows;
      rows.window = win.data() + (lo - first) * dh;
      rows.n_window = pos - lo + 1;
      if (p.comp == CompRows::Selected) {
        rows.comp = comp;
        rows.comp_idx = sel + size_t(t) * p.top_k;
        rows.n_comp = std::min<int64_t>(p.top_k, compressed_visible(pos, p.ratio));
      } else if (p.comp == CompRows::All) {
        rows.comp = comp;
        rows.n_comp = compressed_visible(pos, p.ratio);
      }
      sink_attention_head(q + size_t(i) * dh, dh, rows, sinks[h], p.scale, scratch.data(), out + size_t(i) * dh);
      if (p.out_rope) {  // the de-rotation head_prep would apply: same cos/sin, same rotation
        rope_cos_sin(*p.out_rope, pos, cs.data());
        rope_rotate(out + size_t(i) * dh, dh, n_rot, cs.data(), true);
      }
    }
  });
  // The ring was copied into win above, so the store cannot disturb the attention.
  if (p.store_window) window_store(const_cast<float*>(ring), W, dh, kv_new, T, p0);
}

void window_store(float* ring, int W, int dim, const float* kv, int T, int64_t p0) {
  for (int t = std::max(0, T - W); t < T; ++t)
    std::copy_n(kv + size_t(t) * dim, dim, ring + ((p0 + t) % W) * dim);
}

}  // namespace cpu
}  // namespace dsv4
