// The attention sublayer forward (model-spec §6, §6.7-6.8); see attention.h for the contract.
//
// One pass handles up to opt.max_tokens_per_pass consecutive tokens in this order:
//   1. projections for all tokens (quant matmul: one fixed summation order per output value, per token)
//   2. Q/KV post-processing per token (norms, RoPE, FP8 QAT)
//   3. compressors fed token by token (rows become visible per the availability rule, not per pass)
//   4. indexer top-k per token (CSA)
//   5. sink attention per (token, head) over [window rows | compressed rows]
//   6. inverse RoPE, grouped output projection
//   7. window ring update
// Nothing in a token's result depends on which other tokens share its pass, hence the chunking invariance.
#include "model/attention.h"

#include <algorithm>
#include <cmath>

#include "backend/cpu/attention_cpu.h"
#include "common/error.h"
#include "common/thread_pool.h"
#include "model/attention_qat.h"
#include "model/config.h"
#include "model/indexer.h"
#include "quant/quant.h"

namespace dsv4 {
namespace {

// Fails unless view w is present with GGUF shape [cols, rows] (cols = input width).
void check_matrix(const WeightView& w, int64_t cols, int64_t rows, const char* role) {
  if (!w.present()) fail("attention: weight %s (%s) is missing", role, w.name);
  if (w.n_dims != 2 || w.ne[0] != cols || w.ne[1] != rows)
    fail("attention: tensor %s (%s) has shape [%lld, %lld] (%d dims), expected [%lld, %lld]", w.name, role,
         (long long)w.ne[0], (long long)w.ne[1], w.n_dims, (long long)cols, (long long)rows);
}

// Fails unless view w is a present F32 vector of n values (binding converts F16/BF16 vectors to F32).
void check_vector(const WeightView& w, int64_t n, const char* role) {
  if (!w.present()) fail("attention: weight %s (%s) is missing", role, w.name);
  int64_t total = w.ne[0] * w.ne[1] * w.ne[2] * w.ne[3];
  if (total != n) fail("attention: tensor %s (%s) has %lld values, expected %lld", w.name, role, (long long)total,
                       (long long)n);
  if (w.type != QType::F32) fail("attention: tensor %s (%s) must be bound as F32, is %s", w.name, role,
                                 qtype_name(w.type).c_str());
}

void check_compressor(const CompressorWeights& c, int64_t d_model, int m, int width, int dim, const char* role) {
  check_matrix(c.kv, d_model, width, role);
  check_matrix(c.gate, d_model, width, role);
  check_vector(c.ape, int64_t(m) * width, role);
  check_vector(c.norm, dim, role);
}

void check_weights(const AttentionWeights& w, const AttentionShape& s) {
  const int64_t D = s.d_model, qd = int64_t(s.n_heads) * s.head_dim;
  check_matrix(w.q_a, D, s.q_rank, "q_a");
  check_vector(w.q_a_norm, s.q_rank, "q_a_norm");
  check_matrix(w.q_b, s.q_rank, qd, "q_b");
  check_matrix(w.kv, D, s.head_dim, "kv");
  check_vector(w.kv_norm, s.head_dim, "kv_norm");
  check_vector(w.sinks, s.n_heads, "sinks");
  check_matrix(w.output_a, qd / s.o_groups, int64_t(s.o_groups) * s.o_rank, "output_a");
  check_matrix(w.output_b, int64_t(s.o_groups) * s.o_rank, D, "output_b");
  const int c = s.has_indexer() ? 2 : 1;
  if (s.has_compressor()) check_compressor(w.compressor, D, s.ratio, c * s.head_dim, s.head_dim, "compressor");
  if (s.has_indexer()) {
    check_matrix(w.indexer.q_b, s.q_rank, int64_t(s.idx_heads) * s.idx_dim, "indexer.q_b");
    check_matrix(w.indexer.proj, D, s.idx_heads, "indexer.proj");
    check_compressor(w.indexer.compressor, D, s.ratio, 2 * s.idx_dim, s.idx_dim, "indexer.compressor");
  }
}

// Y[t] = W X[t] for T tokens (W: GGUF [cols, rows]).
void project(const WeightView& w, const float* X, int T, float* Y, ThreadPool* pool) {
  matmul(w.type, w.data, w.rows(), w.cols(), X, T, Y, pool);
}

// Scratch of one pass, sized for T tokens.
struct Pass {
  int T = 0;
  int64_t p0 = 0;
  ThreadPool* pool = nullptr;
  std::vector<float> cs;    // [T, dr] cos/sin per token position
  std::vector<float> qr;    // [T, rq]
  std::vector<float> q;     // [T, H*dh]
  std::vector<float> kv;    // [T, dh]
  std::vector<float> o;     // [T, H*dh]
  std::vector<int32_t> sel; // [T, KI] indexer-selected compressed rows, ascending (CSA)
  std::vector<int32_t> n_sel;  // [T]
};

// Steps 1-2 for Q and KV: qr, q (normed, roped) and kv (normed, roped, FP8 QAT).
void q_kv_path(const AttentionWeights& w, const AttentionShape& s, const float* x, Pass& P, bool qat) {
  const int T = P.T, H = s.n_heads, dh = s.head_dim, dr = s.rope_dim, rq = s.q_rank;
  P.qr.resize(size_t(T) * rq);
  P.q.resize(size_t(T) * H * dh);
  P.kv.resize(size_t(T) * dh);
  project(w.q_a, x, T, P.qr.data(), P.pool);
  for (int t = 0; t < T; ++t) rms_norm_inplace(P.qr.data() + size_t(t) * rq, rq, w.q_a_norm.f32(), s.eps);
  project(w.q_b, P.qr.data(), T, P.q.data(), P.pool);
  project(w.kv, x, T, P.kv.data(), P.pool);
  for (int t = 0; t < T; ++t) {
    const float* cs = P.cs.data() + size_t(t) * dr;
    for (int h = 0; h < H; ++h) {
      float* qh = P.q.data() + (size_t(t) * H + h) * dh;
      rms_norm_inplace(qh, dh, nullptr, s.eps);
      rope_rotate(qh, dh, dr, cs);
    }
    float* kv = P.kv.data() + size_t(t) * dh;
    rms_norm_inplace(kv, dh, w.kv_norm.f32(), s.eps);
    rope_rotate(kv, dh, dr, cs);
    if (qat) qat_fp8_blocks(kv, dh - dr, 64);
  }
}

// Step 3: feed T tokens to one compressor; emitted rows are appended to cs.rows.
void run_compressor(const CompressorWeights& cw, CompressorState& st, const AttentionShape& s, const float* x,
                    const Pass& P, CompressorQat qat) {
  const int T = P.T, width = st.width();
  std::vector<float> v(size_t(T) * width), z(size_t(T) * width), u(static_cast<size_t>(st.dim));
  project(cw.kv, x, T, v.data(), P.pool);
  project(cw.gate, x, T, z.data(), P.pool);
  for (int t = 0; t < T; ++t) {
    int64_t p = P.p0 + t;
    const float* ape_row = cw.ape.f32() + (p % st.ratio) * width;
    if (compressor_push(st, p, v.data() + size_t(t) * width, z.data() + size_t(t) * width, ape_row, u.data()))
      compressor_emit(st, u.data(), cw.norm.f32(), s.eps, s.rope, qat);
  }
}

// Top-k of one query over indexer rows [0, n_vis) (see indexer_top_k); scoring skipped when all rows fit.
int select_top_k(const float* qI, const float* wI, const CompressorState& rows, int64_t n_vis, int k, int HI,
                 int dI, ThreadPool* pool, int32_t* sel) {
  if (n_vis <= k) return indexer_top_k(nullptr, n_vis, k, sel);
  std::vector<float> score(static_cast<size_t>(n_vis));
  auto score_range = [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) score[size_t(i)] = cpu::indexer_score(qI, wI, rows.row(i), HI, dI);
  };
  if (pool) pool->parallel_for(n_vis, score_range); else score_range(0, n_vis);
  return indexer_top_k(score.data(), n_vis, k, sel);
}

// Step 4 (CSA): indexer queries and weights, then the selected compressed rows of every token.
void indexer_path(const AttentionWeights& w, AttentionState& st, const float* x, Pass& P, bool qat,
                  ThreadPool& pool) {
  const AttentionShape& s = st.shape;
  const int T = P.T, HI = s.idx_heads, dI = s.idx_dim, dr = s.rope_dim, K = s.idx_topk;
  std::vector<float> qI(size_t(T) * HI * dI), wI(size_t(T) * HI);
  project(w.indexer.q_b, P.qr.data(), T, qI.data(), P.pool);
  project(w.indexer.proj, x, T, wI.data(), P.pool);
  const float wscale = float(1.0 / std::sqrt(double(dI) * double(HI)));
  for (int t = 0; t < T; ++t) {
    for (int h = 0; h < HI; ++h) {
      float* qh = qI.data() + (size_t(t) * HI + h) * dI;
      rope_rotate(qh, dI, dr, P.cs.data() + size_t(t) * dr);
      if (qat) qat_fp4_indexer_row(qh, dI);
    }
    for (int h = 0; h < HI; ++h) wI[size_t(t) * HI + h] *= wscale;
  }
  P.sel.assign(size_t(T) * K, 0);
  P.n_sel.assign(size_t(T), 0);
  auto one = [&](int t, ThreadPool* inner) {
    int64_t n_vis = compressed_visible(P.p0 + t, s.ratio);
    P.n_sel[size_t(t)] = select_top_k(qI.data() + size_t(t) * HI * dI, wI.data() + size_t(t) * HI, st.idx_comp,
                                      n_vis, K, HI, dI, inner, P.sel.data() + size_t(t) * K);
  };
  if (T == 1) {
    one(0, &pool);  // decode: parallel over rows
  } else {
    pool.parallel_for(T, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) one(int(t), nullptr);
    });
  }
}

// Step 5: attention for every (token, head). win: [n_prev + T, dh] KV rows of positions p0 - n_prev .. p0+T-1.
void attend(const AttentionWeights& w, const AttentionState& st, const std::vector<float>& win, int64_t n_prev,
            Pass& P, ThreadPool& pool) {
  const AttentionShape& s = st.shape;
  const int T = P.T, H = s.n_heads, dh = s.head_dim, W = s.window;
  const float scale = float(1.0 / std::sqrt(double(dh)));
  const int64_t first = P.p0 - n_prev;  // position of win row 0
  P.o.assign(size_t(T) * H * dh, 0.0f);
  int64_t max_comp = s.has_indexer() ? s.idx_topk : (s.has_compressor() ? st.comp.n_rows : 0);
  pool.parallel_for(int64_t(T) * H, [&](int64_t b, int64_t e) {
    std::vector<float> scratch(size_t(W + max_comp));
    for (int64_t i = b; i < e; ++i) {
      int t = int(i / H), h = int(i % H);
      int64_t p = P.p0 + t, lo = window_first(p, W);
      cpu::SinkAttnRows rows;
      rows.window = win.data() + (lo - first) * dh;
      rows.n_window = p - lo + 1;
      if (s.has_indexer()) {
        rows.comp = st.comp.rows.data();
        rows.comp_idx = P.sel.data() + size_t(t) * s.idx_topk;
        rows.n_comp = P.n_sel[size_t(t)];
      } else if (s.has_compressor()) {
        rows.comp = st.comp.rows.data();
        rows.n_comp = compressed_visible(p, s.ratio);  // HCA: every complete window
      }
      cpu::sink_attention_head(P.q.data() + size_t(i) * dh, dh, rows, w.sinks.f32()[h], scale, scratch.data(),
                               P.o.data() + size_t(i) * dh);
    }
  });
}

// Step 6: inverse RoPE per head, grouped wo_a, then wo_b into out [T, D].
void output_path(const AttentionWeights& w, const AttentionShape& s, Pass& P, float* out) {
  const int T = P.T, H = s.n_heads, dh = s.head_dim, dr = s.rope_dim, G = s.o_groups, ro = s.o_rank;
  for (int t = 0; t < T; ++t)
    for (int h = 0; h < H; ++h)
      rope_rotate(P.o.data() + (size_t(t) * H + h) * dh, dh, dr, P.cs.data() + size_t(t) * dr, /*inverse=*/true);
  const int64_t gin = int64_t(H / G) * dh;  // inputs per group
  const int64_t grow = row_bytes(w.output_a.type, gin);
  std::vector<float> xin(size_t(T) * gin), y(size_t(T) * ro), low(size_t(T) * G * ro);
  for (int g = 0; g < G; ++g) {
    for (int t = 0; t < T; ++t)
      std::copy_n(P.o.data() + size_t(t) * H * dh + size_t(g) * gin, gin, xin.data() + size_t(t) * gin);
    const auto* wg = static_cast<const uint8_t*>(w.output_a.data) + int64_t(g) * ro * grow;
    matmul(w.output_a.type, wg, ro, gin, xin.data(), T, y.data(), P.pool);
    for (int t = 0; t < T; ++t)
      std::copy_n(y.data() + size_t(t) * ro, ro, low.data() + (size_t(t) * G + g) * ro);
  }
  project(w.output_b, low.data(), T, out, P.pool);
}

void forward_pass(const AttentionWeights& w, AttentionState& st, const float* x, int T, float* out,
                  const AttentionOptions& opt, ThreadPool& pool) {
  const AttentionShape& s = st.shape;
  const int dh = s.head_dim, dr = s.rope_dim, W = s.window;
  Pass P;
  P.T = T;
  P.p0 = st.n_past;
  P.pool = &pool;
  P.cs.resize(size_t(T) * dr);
  for (int t = 0; t < T; ++t) rope_cos_sin(s.rope, P.p0 + t, P.cs.data() + size_t(t) * dr);

  q_kv_path(w, s, x, P, opt.qat_sim);
  if (s.has_compressor())
    run_compressor(w.compressor, st.comp, s, x, P, opt.qat_sim ? CompressorQat::Fp8Kv : CompressorQat::None);
  if (s.has_indexer()) {
    run_compressor(w.indexer.compressor, st.idx_comp, s, x, P,
                   opt.qat_sim ? CompressorQat::Fp4Indexer : CompressorQat::None);
    indexer_path(w, st, x, P, opt.qat_sim, pool);
  }

  // Window rows: the last min(W-1, p0) positions from the ring, then this pass's tokens.
  const int64_t n_prev = std::min<int64_t>(W - 1, P.p0);
  std::vector<float> win(size_t(n_prev + T) * dh);
  for (int64_t i = 0; i < n_prev; ++i) {
    int64_t p = P.p0 - n_prev + i;
    std::copy_n(st.window.data() + (p % W) * dh, dh, win.data() + i * dh);
  }
  std::copy(P.kv.begin(), P.kv.end(), win.begin() + n_prev * dh);
  attend(w, st, win, n_prev, P, pool);
  output_path(w, s, P, out);

  for (int t = std::max(0, T - W); t < T; ++t)
    std::copy_n(P.kv.data() + size_t(t) * dh, dh, st.window.data() + ((P.p0 + t) % W) * dh);
  st.n_past += T;
}

}  // namespace

void attention_forward(const AttentionWeights& w, AttentionState& st, const float* x, const int64_t* positions,
                       int T, float* out, const AttentionOptions& opt) {
  const AttentionShape& s = st.shape;
  if (T <= 0) return;
  for (int t = 0; t < T; ++t)
    if (positions[t] != st.n_past + t)
      fail("attention: token %d has position %lld, expected %lld (positions must continue the session)", t,
           (long long)positions[t], (long long)(st.n_past + t));
  if (st.n_past + T > s.max_context)
    fail("attention: positions up to %lld exceed the session's max context %lld", (long long)(st.n_past + T - 1),
         (long long)s.max_context);
  check_weights(w, s);
  ThreadPool& pool = opt.pool ? *opt.pool : default_thread_pool();
  const int step = std::max(1, opt.max_tokens_per_pass);
  for (int t0 = 0; t0 < T; t0 += step) {
    int n = std::min(step, T - t0);
    forward_pass(w, st, x + size_t(t0) * s.d_model, n, out + size_t(t0) * s.d_model, opt, pool);
  }
}

void attention_forward(const ModelConfig& cfg, int layer, const AttentionWeights& w, AttentionState& st,
                       const float* x, const int64_t* positions, int T, float* out, const AttentionOptions& opt) {
  if (st.shape.ratio != cfg.ratio(layer) || st.shape.head_dim != cfg.head_dim || st.shape.d_model != cfg.d_model)
    fail("attention: layer %d state was initialized for another shape (ratio %d, expected %d)", layer,
         st.shape.ratio, cfg.ratio(layer));
  attention_forward(w, st, x, positions, T, out, opt);
}

}  // namespace dsv4
