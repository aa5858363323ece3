// The attention sublayer forward (model-spec §6, §6.7-6.8) as backend ops; see attention.h for the contract.
//
// One pass handles up to opt.max_tokens_per_pass consecutive tokens in this order:
//   1. projections for all tokens (matmul: one fixed summation order per output value, per token), including
//      the compressors' and the indexer's                                              [attention_project]
//   2. Q/KV/indexer-query post-processing per token (head_prep_batch: norms, RoPE, QAT)  [attention_core]
//   3. compressors fed token by token (compressor_step; rows become visible per the availability rule)
//   4. indexer top-k per token (CSA: indexer_topk)
//   5. sink attention per (token, head) over [window rows | compressed rows] (sink_attention), which also
//   6a. inverse-rotates the outputs (out_rope) and 7. updates the window ring (store_window)
//   6b. grouped output projection (matmul_grouped, matmul)                             [attention_output]
// Project and output read and write only the scratch, the input and the output, never the positions or the
// session state: a device backend can record them once and replay them every decode step (forward.cpp).
// Nothing in a token's result depends on which other tokens share its pass, hence the chunking invariance.
// The host only computes sizes and positions from st.n_past and T; all data stays in backend memory.
#include "model/attention.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "backend/backend.h"
#include "common/error.h"
#include "model/config.h"
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

void check_layer_shape(const ModelConfig& cfg, int layer, const AttentionState& st) {
  if (st.shape.ratio != cfg.ratio(layer) || st.shape.head_dim != cfg.head_dim || st.shape.d_model != cfg.d_model)
    fail("attention: layer %d state was initialized for another shape (ratio %d, expected %d)", layer,
         st.shape.ratio, cfg.ratio(layer));
}

// DSV4_ATTN_FUSED=0: the core as separate ops (q, kv and indexer-query head_preps; two compressor_steps; sink
// attention; window_store; the output de-rotation head_prep) instead of head_prep_batch, compressor_step_pair and
// sink attention's fused de-rotation and ring store. Same results either way; the knob is for A/B timing. Read
// once.
bool fused_core() {
  static const bool on = [] {
    const char* e = std::getenv("DSV4_ATTN_FUSED");
    return !(e && e[0] == '0' && e[1] == 0);
  }();
  return on;
}

// Step 3 (position-free half): a compressor's value and gate projections of T tokens into v, z.
void project_compressor(Backend& be, const CompressorWeights& cw, const float* x, int T, float* v, float* z) {
  be.matmul_multi({{&cw.kv, v}, {&cw.gate, z}}, x, T);
}

// Step 3 (positional half): the parameters of feeding T tokens at p0.. to one compressor; rows closed by them are
// written at their window index (the state grows first: reserve).
CompressorParams compressor_params(const CompressorWeights& cw, CompressorState& st, const AttentionShape& s, int T,
                                   int64_t p0, AttnQat qat) {
  st.reserve((p0 + T) / st.ratio);
  CompressorParams cp;
  cp.ape = &cw.ape;
  cp.norm = &cw.norm;
  cp.eps = s.eps;
  cp.rope = &s.rope;
  cp.qat = qat;
  return cp;
}

void step_compressor(Backend& be, const CompressorWeights& cw, CompressorState& st, const AttentionShape& s,
                     const float* v, const float* z, int T, int64_t p0, AttnQat qat) {
  const CompressorParams cp = compressor_params(cw, st, s, T, p0, qat);
  be.compressor_step(cp, st.buffers(), v, z, T, p0);
  st.n_rows = (p0 + T) / st.ratio;
}

}  // namespace

void AttentionScratch::ensure(Backend& be, const AttentionShape& s, int T) {
  if (owner != &be) *this = AttentionScratch();  // buffers of another backend: start over
  owner = &be;
  const size_t n = size_t(T), f = sizeof(float);
  const size_t qd = size_t(s.n_heads) * size_t(s.head_dim);
  // Grows a buffer to at least `bytes`; never shrinks, so layers of different kinds share one set.
  auto grow = [&](DeviceBuffer& b, size_t bytes) { grow_discarding(be, b, bytes); };
  grow(qr, f * n * size_t(s.q_rank));
  grow(q, f * n * qd);
  grow(kv, f * n * size_t(s.head_dim));
  grow(o, f * n * qd);
  grow(low, f * n * size_t(s.o_groups) * size_t(s.o_rank));
  // The main and the indexer compressor projections have their own buffers: both are computed before either
  // compressor steps (attention_project runs ahead of attention_core).
  if (s.has_compressor()) {
    const size_t cw = size_t(s.has_indexer() ? 2 : 1) * size_t(s.head_dim);
    grow(v, f * n * cw);
    grow(z, f * n * cw);
  }
  if (s.has_indexer()) {
    grow(iv, f * n * 2 * size_t(s.idx_dim));
    grow(iz, f * n * 2 * size_t(s.idx_dim));
    grow(qI, f * n * size_t(s.idx_heads) * size_t(s.idx_dim));
    grow(wI, f * n * size_t(s.idx_heads));
    grow(sel, sizeof(int32_t) * n * size_t(s.idx_topk));
  }
}

// 1. Projections of the layer input, position-free: the Q path up to q (before its per-head norm and RoPE), kv
// (before its norm), the compressors' value/gate projections and the indexer's query and head weights.
void attention_project(Backend& be, const AttentionWeights& w, const AttentionShape& s, const float* x, int T,
                       AttentionScratch& S) {
  float *qr = S.qr.f32(), *q = S.q.f32(), *kv = S.kv.f32();
  // The products of x go out in as few calls as the backend can fuse (matmul_multi: one launch per weight type on
  // the GPU); the order of independent products does not change any value. The compressor and indexer products
  // read only x and write their own buffers: a side line (Backend::begin_side) beside the q path.
  be.begin_side(T);
  if (s.has_compressor()) project_compressor(be, w.compressor, x, T, S.v.f32(), S.z.f32());
  if (s.has_indexer()) {
    const CompressorWeights& ic = w.indexer.compressor;
    be.matmul_multi({{&ic.kv, S.iv.f32()}, {&ic.gate, S.iz.f32()}, {&w.indexer.proj, S.wI.f32()}}, x, T);
  }
  be.end_side();
  be.matmul_multi({{&w.q_a, qr}, {&w.kv, kv}}, x, T);
  HeadPrep qa_norm;
  qa_norm.norm = true, qa_norm.norm_w = &w.q_a_norm, qa_norm.eps = s.eps;
  be.head_prep(qr, T, 1, s.q_rank, qa_norm);
  if (s.has_indexer()) {  // the indexer query (F16) beside q_b, once qr is normalized
    be.begin_side(T);
    be.matmul(w.indexer.q_b, -1, qr, T, S.qI.f32());
    be.end_side();
  }
  be.matmul(w.q_b, -1, qr, T, q);
  be.join_side();
}

// 2-5 and 7, everything that depends on the positions or the session state: q/kv norms with RoPE and QAT, the
// compressors and the indexer, sink attention, the window ring, the output de-rotation into S.o.
void attention_core(Backend& be, const AttentionWeights& w, AttentionState& st, int T, bool qat,
                    AttentionScratch& S) {
  const AttentionShape& s = st.shape;
  const int H = s.n_heads, dh = s.head_dim;
  const int64_t p0 = st.n_past;
  const bool fused = fused_core();
  float *q = S.q.f32(), *kv = S.kv.f32();
  // 2. q (per-head norm + RoPE), kv (weighted norm + RoPE + QAT) and the indexer query (RoPE + QAT): one
  // batched op (the indexer query depends on the projections only, so it is prepared ahead of the compressors).
  HeadPrepJob jobs[3];
  HeadPrep& qp = jobs[0].p;
  jobs[0].x = q, jobs[0].H = H, jobs[0].dim = dh;
  qp.norm = true, qp.eps = s.eps, qp.rope = &s.rope, qp.pos0 = p0;
  HeadPrep& kp = jobs[1].p;
  jobs[1].x = kv, jobs[1].H = 1, jobs[1].dim = dh;
  kp = qp;
  kp.norm_w = &w.kv_norm;
  kp.qat = qat ? AttnQat::Fp8 : AttnQat::None;
  int n_jobs = 2;
  if (s.has_indexer()) {
    HeadPrep& ip = jobs[2].p;
    jobs[2].x = S.qI.f32(), jobs[2].H = s.idx_heads, jobs[2].dim = s.idx_dim;
    ip.rope = &s.rope, ip.pos0 = p0, ip.qat = qat ? AttnQat::Fp4Indexer : AttnQat::None;
    n_jobs = 3;
  }
  if (fused) {
    be.head_prep_batch(jobs, n_jobs, T);
  } else {
    for (int j = 0; j < n_jobs; ++j) be.head_prep(jobs[j].x, T, jobs[j].H, jobs[j].dim, jobs[j].p);
  }

  // 3-4. Compressors and the indexer. A CSA layer's two compressors are independent: one paired op when fused.
  // (On the side line beside the head prep they measured slower: H200, session 10, 139.2 vs 141.6 t/s.)
  const AttnQat main_qat = qat ? AttnQat::Fp8 : AttnQat::None, idx_qat = qat ? AttnQat::Fp4Indexer : AttnQat::None;
  if (fused && s.has_compressor() && s.has_indexer()) {
    const CompressorParams cm = compressor_params(w.compressor, st.comp, s, T, p0, main_qat);
    const CompressorParams ci = compressor_params(w.indexer.compressor, st.idx_comp, s, T, p0, idx_qat);
    CompressorJob a, b;
    a.p = &cm, a.s = st.comp.buffers(), a.v = S.v.f32(), a.z = S.z.f32();
    b.p = &ci, b.s = st.idx_comp.buffers(), b.v = S.iv.f32(), b.z = S.iz.f32();
    be.compressor_step_pair(a, b, T, p0);
    st.comp.n_rows = (p0 + T) / st.comp.ratio;
    st.idx_comp.n_rows = (p0 + T) / st.idx_comp.ratio;
  } else {
    if (s.has_compressor()) step_compressor(be, w.compressor, st.comp, s, S.v.f32(), S.z.f32(), T, p0, main_qat);
    if (s.has_indexer())
      step_compressor(be, w.indexer.compressor, st.idx_comp, s, S.iv.f32(), S.iz.f32(), T, p0, idx_qat);
  }
  if (s.has_indexer()) {
    IndexerParams xp;
    xp.heads = s.idx_heads, xp.dim = s.idx_dim, xp.ratio = s.ratio, xp.top_k = s.idx_topk;
    xp.weight_scale = float(1.0 / std::sqrt(double(s.idx_dim) * double(s.idx_heads)));
    be.indexer_topk(xp, S.qI.f32(), S.wI.f32(), st.idx_comp.rows.f32(), T, p0, S.sel.i32());
  }

  // 5. Attention, before the ring takes this pass's rows (window rows of earlier positions come from it).
  SinkAttnParams ap;
  ap.heads = H, ap.dim = dh, ap.window = s.window, ap.ratio = s.ratio, ap.top_k = s.idx_topk;
  ap.comp = s.has_indexer() ? CompRows::Selected : s.has_compressor() ? CompRows::All : CompRows::None;
  ap.sinks = &w.sinks;
  ap.scale = float(1.0 / std::sqrt(double(dh)));
  // 7. (store_window) the window ring takes this pass's rows after the attention (kv is not read after this;
  // the output projections below do not touch the ring). 6a. (out_rope) each head's output is de-rotated.
  if (fused) ap.out_rope = &s.rope, ap.store_window = true;
  // 6b's grouped o_a projection reads the output as Q8_0 activations: a device backend may write them here.
  if (fused && w.output_a.type == QType::Q8_0) ap.q8_groups = s.o_groups;
  be.sink_attention(ap, q, kv, st.window.f32(), s.has_compressor() ? st.comp.rows.f32() : nullptr,
                    s.has_indexer() ? S.sel.i32() : nullptr, T, p0, S.o.f32());
  if (!fused) {
    be.window_store(st.window.f32(), s.window, dh, kv, T, p0);
    HeadPrep op;
    op.rope = &s.rope, op.pos0 = p0, op.inverse = true;
    be.head_prep(S.o.f32(), T, H, dh, op);
  }
  st.n_past += T;
}

// 6b. Output projections, position-free: grouped wo_a, then wo_b into out.
void attention_output(Backend& be, const AttentionWeights& w, const AttentionShape& s, int T, AttentionScratch& S,
                      float* out) {
  be.matmul_grouped(w.output_a, s.o_groups, S.o.f32(), T, S.low.f32());
  be.matmul(w.output_b, -1, S.low.f32(), T, out);
}

Backend& attention_check(const AttentionWeights& w, const AttentionState& st, const int64_t* positions, int T,
                         const AttentionOptions& opt) {
  const AttentionShape& s = st.shape;
  for (int t = 0; t < T; ++t)
    if (positions[t] != st.n_past + t)
      fail("attention: token %d has position %lld, expected %lld (positions must continue the session)", t,
           (long long)positions[t], (long long)(st.n_past + t));
  if (st.n_past + T > s.max_context)
    fail("attention: positions up to %lld exceed the session's max context %lld", (long long)(st.n_past + T - 1),
         (long long)s.max_context);
  check_weights(w, s);
  if (!st.be) fail("attention: state is not initialized (no backend)");
  Backend& be = opt.backend ? *opt.backend : *st.be;
  if (&be != st.be && !(be.host_memory() && st.be->host_memory()))
    fail("attention: state lives in %s backend memory, ops were asked to run on %s", st.be->name(), be.name());
  return be;
}

Backend& attention_check(const ModelConfig& cfg, int layer, const AttentionWeights& w, const AttentionState& st,
                         const int64_t* positions, int T, const AttentionOptions& opt) {
  check_layer_shape(cfg, layer, st);
  return attention_check(w, st, positions, T, opt);
}

void attention_forward(const AttentionWeights& w, AttentionState& st, const float* x, const int64_t* positions,
                       int T, float* out, const AttentionOptions& opt) {
  if (T <= 0) return;
  Backend& be = attention_check(w, st, positions, T, opt);
  const AttentionShape& s = st.shape;
  const int step = std::max(1, opt.max_tokens_per_pass);
  AttentionScratch local;
  AttentionScratch& S = opt.scratch ? *opt.scratch : local;
  S.ensure(be, s, std::min(step, T));
  for (int t0 = 0; t0 < T; t0 += step) {
    const int n = std::min(step, T - t0);
    attention_project(be, w, s, x + size_t(t0) * s.d_model, n, S);
    attention_core(be, w, st, n, opt.qat_sim, S);
    attention_output(be, w, s, n, S, out + size_t(t0) * s.d_model);
  }
}

void attention_forward(const ModelConfig& cfg, int layer, const AttentionWeights& w, AttentionState& st,
                       const float* x, const int64_t* positions, int T, float* out, const AttentionOptions& opt) {
  check_layer_shape(cfg, layer, st);
  attention_forward(w, st, x, positions, T, out, opt);
}

}  // namespace dsv4
