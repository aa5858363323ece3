#include "model/forward.h"

#include <algorithm>
#include <cstring>
#include <istream>
#include <ostream>

#include "backend/backend.h"
#include "common/error.h"
#include "model/model.h"

namespace dsv4 {

namespace {

}  // namespace

// Scratch activations for passes of up to `cap` tokens, in backend memory.
struct ForwardScratch::Impl {
  int cap = 0;
  DeviceBuffer X;     // [T, n, D] residual streams
  DeviceBuffer a;     // [T, D] sublayer input (HC mix, then normed in place)
  DeviceBuffer y;     // [T, D] sublayer output
  DeviceBuffer post;  // [T, n]
  DeviceBuffer comb;  // [T, n, n]
  DeviceBuffer ids;   // [T, k] int32
  DeviceBuffer wts;   // [T, k]
  DeviceBuffer h;     // [T, n, D] residual rows gathered for the final head
  DeviceBuffer tok;   // [T] int32 token ids
  DeviceBuffer logits;// [rows, V] (device backends only; grown to the rows a pass asks for: usually 1 per
                      // sequence, all T only for all-rows logits; host-memory backends write the caller's array)
  std::vector<int64_t> pos; // [T] host: positions are host-known
  AttentionScratch attn;    // shared by all layers and segments
  Backend* owner = nullptr;
  void ensure(Backend& be, const ModelConfig& c, int T) {
    if (owner != &be) *this = Impl();  // buffers of another backend: start over
    owner = &be;
    if (T <= cap) return;
    const size_t f = sizeof(float), n = size_t(c.hc_mult), D = size_t(c.d_model), k = size_t(c.n_experts_used);
    const size_t t = size_t(T);
    auto grow = [&](DeviceBuffer& buf, size_t bytes) { grow_discarding(be, buf, bytes); };
    grow(X, f * t * n * D);
    grow(a, f * t * D);
    grow(y, f * t * D);
    grow(post, f * t * n);
    grow(comb, f * t * n * n);
    grow(ids, sizeof(int32_t) * t * k);
    grow(wts, f * t * k);
    grow(h, f * t * n * D);
    grow(tok, sizeof(int32_t) * t);
    pos.resize(t);
    cap = T;
  }
};

ForwardScratch::ForwardScratch() : impl(std::make_unique<Impl>()) {}
ForwardScratch::~ForwardScratch() = default;

namespace {

using Scratch = ForwardScratch::Impl;

HcParams hc_params(const ModelConfig& c) {
  HcParams p;
  p.n = c.hc_mult;
  p.d = c.d_model;
  p.sinkhorn_iters = c.hc_sinkhorn_iters;
  p.hc_eps = c.hc_eps;
  p.norm_eps = c.rms_eps;
  return p;
}

MoeParams moe_params(const ModelConfig& c, int il) {
  MoeParams p;
  p.n_experts = c.n_experts;
  p.n_used = c.n_experts_used;
  p.d = c.d_model;
  p.ff = c.expert_ff;
  p.weights_scale = c.expert_weights_scale;
  p.swiglu_clamp = c.swiglu_clamp[size_t(il)];
  p.hash = c.is_hash_layer(il);
  return p;
}

// A run of consecutive batch rows that belong to one sequence, inside one pass.
struct Segment {
  SequenceState* st;
  int begin, n;     // rows [begin, begin + n) of the pass
  bool ends_slice;  // the slice's last token is in this segment (its logits row is wanted)
};

// One pass over T tokens (T <= max_tokens_per_pass) made of segments of different sequences. Every op except
// attention runs over the whole batch; attention runs per segment on that sequence's state. Writes logits for
// every row (all_rows) or for the last row of each segment that ends its slice, in segment order, to `logits`.
//
// Recorded segments (decode graphs). The pass is cut at each layer's attention core (attention_core: the only
// ops that depend on the positions or on session state) into n_layers + 1 position-free runs:
//   run 0: embedding, layer 0's HC-pre, attn_norm, attention input projections;
//   run k: layer k-1's attention output projections, HC-post, the MoE sublayer, then layer k's HC-pre, attn_norm
//          and attention input projections (the last run: the final head instead);
// For one-token passes of one sequence without a debug tap, each run goes through Backend::run_segment under a
// key naming the run and every buffer it touches, so a device backend records it once and replays it every
// token (docs/backend.md). Every other pass calls the same ops in the same order directly.
void forward_pass(const Model& model, Backend& be, const std::vector<Segment>& segs, const int32_t* tokens, int T,
                  float* logits, float* dev_logits, bool all_rows, const ForwardOptions& opt, Scratch& s) {
  const ModelConfig& c = model.config();
  const ModelWeights& w = model.weights();
  const HcParams hp = hc_params(c);
  const int64_t D = c.d_model;
  const int L = c.n_layers;
  s.ensure(be, c, T);
  for (const Segment& g : segs)
    for (int t = 0; t < g.n; ++t) s.pos[size_t(g.begin + t)] = g.st->n_past + t;

  AttentionOptions ao;
  ao.qat_sim = opt.qat_sim;
  ao.backend = &be;
  ao.scratch = &s.attn;
  ao.max_tokens_per_pass = std::max(1, opt.max_tokens_per_pass);  // attention sub-chunks no finer than the pass
  // Every layer's attention inputs are checked and the attention scratch is sized for every layer kind before
  // any op runs: no buffer may move between (or inside) recorded runs, and bad input throws before state changes.
  int max_seg = 0;
  for (const Segment& g : segs) max_seg = std::max(max_seg, g.n);
  for (const Segment& g : segs)
    for (int il = 0; il < L; ++il) {
      const AttentionState& st = g.st->layers[size_t(il)];
      attention_check(c, il, w.layers[size_t(il)].attn, st, s.pos.data() + g.begin, g.n, ao);
      s.attn.ensure(be, st.shape, max_seg);
    }
  float *X = s.X.f32(), *a = s.a.f32(), *y = s.y.f32(), *post = s.post.f32(), *comb = s.comb.f32();
  float* wts = s.wts.f32();
  int32_t *ids = s.ids.i32(), *tok = s.tok.i32();
  const int64_t nD = int64_t(c.hc_mult) * D;
  const size_t row = size_t(nD);
  // Rows of the final head: all of them, or the last row of each segment that ends its slice.
  int rows = all_rows ? T : 0;
  if (!all_rows)
    for (const Segment& g : segs) rows += g.ends_slice ? 1 : 0;
  // Logits to the caller's host array, or to its backend buffer (opt.device_logits: this pass's rows start at
  // dev_logits). A device backend computes them into the scratch (a fixed address, so the recorded segments do
  // not depend on the destination) and downloads or copies them from there.
  if (!logits && !dev_logits) rows = 0;
  float* logits_dst = dev_logits ? dev_logits : logits;
  if (rows > 0 && !be.host_memory()) {
    grow_discarding(be, s.logits, sizeof(float) * size_t(rows) * size_t(c.n_vocab));
    logits_dst = s.logits.f32();
  }

  be.upload(tok, tokens, sizeof(int32_t) * size_t(T));                                 // validated by the caller
  // The debug tap sees host copies (a device backend downloads; only when a tap is installed).
  std::vector<float> tap_host;
  auto tap = [&](const char* name, int layer, const float* p, int n_rows, int64_t width) {
    if (!opt.tap) return;
    if (!be.host_memory()) {
      tap_host.resize(size_t(n_rows) * size_t(width));
      be.download(tap_host.data(), p, tap_host.size() * sizeof(float));
      p = tap_host.data();
    }
    opt.tap(name, layer, p, n_rows, width);
  };
  // One sequence: its attention projections join the run before the core and its output projections the run
  // after it. Several: the attention scratch is shared, so each sequence's three parts run back to back.
  const bool one = segs.size() == 1;
  // post_first: the previous layer's MoE hc_post (deferred by layer_out) goes with this hc_pre into one op.
  auto attn_in = [&](int il, bool post_first) {  // layer il up to its attention core
    const LayerWeights& lw = w.layers[size_t(il)];
    if (post_first) be.hc_post_pre_norm(hp, y, X, lw.hc_attn, T, &lw.attn_norm, c.rms_eps, a, post, comb);
    else be.hc_pre_norm(lw.hc_attn, hp, X, T, &lw.attn_norm, c.rms_eps, a, post, comb);  // a {T, D}, normed
    tap("attn_in", il, a, T, D);
    if (one) attention_project(be, lw.attn, segs[0].st->layers[size_t(il)].shape, a, T, s.attn);
  };
  auto attn_core = [&](int il) {
    const LayerWeights& lw = w.layers[size_t(il)];
    for (const Segment& g : segs) {
      AttentionState& st = g.st->layers[size_t(il)];
      const size_t off = size_t(g.begin) * size_t(D);
      if (!one) attention_project(be, lw.attn, st.shape, a + off, g.n, s.attn);
      attention_core(be, lw.attn, st, g.n, opt.qat_sim, s.attn);
      if (!one) attention_output(be, lw.attn, st.shape, g.n, s.attn, y + off);       // y {T, D}
    }
  };
  auto layer_out = [&](int il, bool defer_post) {  // layer il after its attention core (its last hc_post deferred)
    const LayerWeights& lw = w.layers[size_t(il)];
    if (one) attention_output(be, lw.attn, segs[0].st->layers[size_t(il)].shape, T, s.attn, y);
    tap("attn_out", il, y, T, D);
    // attention sublayer's hc_post + the MoE sublayer's hc_pre and ffn_norm
    be.hc_post_pre_norm(hp, y, X, lw.hc_ffn, T, &lw.ffn_norm, c.rms_eps, a, post, comb);
    tap("ffn_in", il, a, T, D);
    const MoeParams mp = moe_params(c, il);
    be.moe_route(lw.moe, mp, a, tok, T, ids, wts);                                     // ids, wts {T, k}
    be.moe_ffn(lw.moe, mp, a, ids, wts, T, y);                                         // y {T, D}
    tap("ffn_out", il, y, T, D);
    if (defer_post) return;  // the next attn_in applies it (y, post, comb stay untouched until then)
    be.hc_post(hp, y, post, comb, T, X);
    tap("residual", il, X, T, nD);
  };
  // Final head (model-spec §8) only for the rows asked for, gathered contiguously (backend-side copies).
  auto final_head = [&] {
    if (rows == 0) return;
    const float* Xr = X;
    if (!all_rows) {
      int r = 0;
      for (const Segment& g : segs)
        if (g.ends_slice) {
          be.copy(s.h.f32() + size_t(r) * row, X + size_t(g.begin + g.n - 1) * row, row * sizeof(float));
          ++r;
        }
      Xr = s.h.f32();
    }
    be.hc_head(w.hc_head, hp, Xr, rows, a);                                            // h {rows, D}
    be.rms_norm(a, &w.output_norm, rows, D, c.rms_eps, a);
    tap("head_in", -1, a, rows, D);
    be.matmul(w.output, -1, a, rows, logits_dst);                                      // {rows, V}
  };
  auto run_k = [&](int k) {
    // Between two layers the MoE hc_post and the next hc_pre are one op (a device backend fuses them), unless a
    // tap wants the residual in between.
    const bool join = k > 0 && k < L && !opt.tap;
    if (k == 0) {
      be.embed(w.token_embd, tok, T, c.hc_mult, X);                                    // X {T, n, D}
      tap("embed", -1, X, T, nD);
    } else {
      layer_out(k - 1, join);
    }
    if (k < L) attn_in(k, join);
    else final_head();
  };
  const bool record = T == 1 && one && !opt.tap;
  std::vector<uint64_t> key;
  if (record) {  // what a run's launches depend on besides its index: shapes, weights, every buffer address
    const AttentionScratch& A = s.attn;
    const std::initializer_list<const void*> addrs = {
        &w, X, a, y, post, comb, ids, wts, tok, s.h.data(), logits_dst, A.qr.data(), A.q.data(), A.kv.data(),
        A.o.data(), A.low.data(), A.v.data(), A.z.data(), A.iv.data(), A.iz.data(), A.qI.data(), A.wI.data(),
        A.sel.data()};
    for (const void* p : addrs)
      key.push_back(uint64_t(reinterpret_cast<uintptr_t>(p)));
    key.insert(key.begin(), {0, uint64_t(T), uint64_t(rows), uint64_t(all_rows)});
  }
  for (int k = 0; k <= L; ++k) {
    if (record) {
      key[0] = uint64_t(k);
      be.run_segment(key, [&] { run_k(k); });
    } else {
      run_k(k);
    }
    if (k < L) attn_core(k);
  }
  for (const Segment& g : segs) g.st->n_past += g.n;
  const size_t logits_bytes = sizeof(float) * size_t(rows) * size_t(c.n_vocab);
  if (rows > 0 && !be.host_memory()) {
    if (dev_logits) be.copy(dev_logits, s.logits.f32(), logits_bytes);
    else be.download(logits, s.logits.f32(), logits_bytes);
  }
}

void check_slice(const ModelConfig& c, Backend& be, const SequenceState& st, const int32_t* tokens, int T, size_t index) {
  if (T <= 0) fail("forward: batch slice %zu has no tokens", index);
  if (int64_t(st.layers.size()) != c.n_layers)
    fail("forward: batch slice %zu: sequence state has %zu layers, model has %d", index, st.layers.size(),
         c.n_layers);
  for (const AttentionState& l : st.layers)
    if (l.be != &be && !(l.be && l.be->host_memory() && be.host_memory()))
      fail("forward: batch slice %zu: sequence state lives in %s backend memory, the forward runs on %s", index,
           l.be ? l.be->name() : "no", be.name());
  if (st.n_past + T > st.max_context)
    fail("forward: %d tokens at position %lld exceed the session's max context %lld", T, (long long)st.n_past,
         (long long)st.max_context);
  for (int t = 0; t < T; ++t)
    if (tokens[t] < 0 || tokens[t] >= c.n_vocab)
      fail("forward: token id %d at batch row %d outside the vocabulary [0, %d)", tokens[t], t, c.n_vocab);
}

}  // namespace

void model_forward_batch(const Model& model, Backend& be, std::span<const BatchSlice> slices, const int32_t* tokens,
                         float* logits, bool all_rows, const ForwardOptions& opt) {
  const ModelConfig& c = model.config();
  if (slices.empty()) fail("forward: empty batch");
  if (logits && opt.device_logits) fail("forward: logits go to the host array or to device_logits, not both");
  int64_t total = 0;
  for (size_t i = 0; i < slices.size(); ++i) {
    for (size_t j = 0; j < i; ++j)
      if (slices[j].st == slices[i].st) fail("forward: batch slices %zu and %zu share one sequence state", j, i);
    check_slice(c, be, *slices[i].st, tokens + total, slices[i].n_tokens, i);
    total += slices[i].n_tokens;
  }
  // Passes of at most `step` rows; a slice may straddle passes (each row's result does not depend on it).
  ForwardScratch local;
  Scratch& s = opt.scratch ? *opt.scratch->impl : *local.impl;
  const int step = std::max(1, opt.max_tokens_per_pass);
  const size_t V = size_t(c.n_vocab);
  size_t slice = 0;
  int used_in_slice = 0;  // tokens of slices[slice] already run
  int64_t t0 = 0;         // first token row of the pass
  size_t out_row = 0;     // next logits row (all_rows: = t0; else: slice index of the next finished slice)
  while (t0 < total) {
    std::vector<Segment> segs;
    int n = 0;
    while (n < step && slice < slices.size()) {
      const int left = slices[slice].n_tokens - used_in_slice;
      const int take = std::min(left, step - n);
      segs.push_back({slices[slice].st, n, take, take == left});
      n += take;
      used_in_slice += take;
      if (used_in_slice == slices[slice].n_tokens) {
        ++slice;
        used_in_slice = 0;
      }
    }
    float* out = logits ? logits + out_row * V : nullptr;
    float* dev_out = opt.device_logits ? opt.device_logits + out_row * V : nullptr;
    forward_pass(model, be, segs, tokens + t0, n, out, dev_out, all_rows, opt, s);
    if (all_rows) out_row += size_t(n);
    else
      for (const Segment& g : segs) out_row += g.ends_slice ? 1 : 0;
    t0 += n;
  }
}

void model_forward(const Model& model, Backend& be, SequenceState& st, const int32_t* tokens, int T, float* logits,
                   bool all_rows, const ForwardOptions& opt) {
  const BatchSlice one{&st, T};
  model_forward_batch(model, be, std::span<const BatchSlice>(&one, 1), tokens, logits, all_rows, opt);
}

// ---- SequenceState ---------------------------------------------------------------------------------------

void SequenceState::init(const ModelConfig& c, int64_t max_ctx, Backend* be) {
  if (max_ctx <= 0) fail("session: max_context must be positive, got %lld", (long long)max_ctx);
  max_context = max_ctx;
  layers.clear();
  layers.reserve(size_t(c.n_layers));
  for (int il = 0; il < c.n_layers; ++il) layers.emplace_back(attention_shape(c, il, max_ctx), be);
  n_past = 0;
}

void SequenceState::reserve(int64_t n_tokens) {
  n_tokens = std::min(n_tokens, max_context);
  for (auto& l : layers) {
    if (l.shape.has_compressor()) l.comp.reserve(n_tokens / l.shape.ratio);
    if (l.shape.has_indexer()) l.idx_comp.reserve(n_tokens / l.shape.ratio);
  }
}

void SequenceState::reset() {
  for (auto& l : layers) l.reset();
  n_past = 0;
}

namespace {
constexpr uint32_t kSeqMagic = 0x51455344;  // "DSEQ"
constexpr uint32_t kSeqVersion = 1;
}  // namespace

void SequenceState::save(std::ostream& os) const {
  const int64_t hdr[4] = {int64_t(kSeqMagic) | (int64_t(kSeqVersion) << 32), int64_t(layers.size()), max_context,
                          n_past};
  os.write(reinterpret_cast<const char*>(hdr), sizeof hdr);
  if (!os) fail("session state: write failed");
  for (const auto& l : layers) l.save(os);
}

void SequenceState::load(std::istream& is) {
  int64_t hdr[4];
  is.read(reinterpret_cast<char*>(hdr), sizeof hdr);
  if (!is) fail("session state: truncated header (%zu bytes expected)", sizeof hdr);
  if (uint32_t(hdr[0]) != kSeqMagic) fail("session state: bad magic 0x%08x at byte 0", unsigned(uint32_t(hdr[0])));
  if (uint32_t(uint64_t(hdr[0]) >> 32) != kSeqVersion)
    fail("session state: unsupported version %u (expected %u)", unsigned(uint64_t(hdr[0]) >> 32), kSeqVersion);
  if (hdr[1] != int64_t(layers.size()))
    fail("session state: field 'layers' is %lld, this model has %zu", (long long)hdr[1], layers.size());
  if (hdr[2] != max_context)
    fail("session state: field 'max_context' is %lld, this session has %lld", (long long)hdr[2],
         (long long)max_context);
  if (hdr[3] < 0 || hdr[3] > max_context)
    fail("session state: field 'position' %lld outside [0, %lld]", (long long)hdr[3], (long long)max_context);
  std::vector<AttentionState> tmp = layers;
  for (size_t il = 0; il < tmp.size(); ++il) {
    tmp[il].load(is);
    if (tmp[il].n_past != hdr[3])
      fail("session state: layer %zu is at position %lld, header says %lld", il, (long long)tmp[il].n_past,
           (long long)hdr[3]);
  }
  layers = std::move(tmp);
  n_past = hdr[3];
}

}  // namespace dsv4
