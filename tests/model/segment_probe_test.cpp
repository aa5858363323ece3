// The forward's recorded segments (Backend::run_segment, forward.cpp) checked on the CPU: a probe backend
// (opaque device-like memory, every op delegated) logs each op call inside a segment with all its arguments.
// A device backend replays a segment's first recording whenever the key repeats, so the forward must promise:
//   * equal keys -> identical op calls (same ops, pointers, sizes, weights): checked for every repeated key;
//   * no position- or state-dependent op inside a segment (RoPE head_prep, compressor_step, indexer_topk,
//     sink_attention, window_store) and no memory traffic (alloc, free, upload, download);
//   * single-token passes of one session are cut into n_layers + 1 segments, keyed 0..n_layers in order, and
//     the keys repeat from token to token (otherwise nothing would ever be replayed);
//   * other passes (prefill, multi-session batches, a debug tap) use no segments.
// The logits must also stay bitwise those of the CPU backend.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "common/error.h"
#include "model/forward.h"
#include "model/model.h"
#include "opaque_backend.h"
#include "tiny_model.h"

namespace dsv4 {
namespace {

class SegmentProbe final : public Backend {
 public:
  const char* name() const override { return "segment-probe"; }
  void* mem_alloc(size_t bytes) override { return bad("mem_alloc"), o_.mem_alloc(bytes); }
  void mem_free(void* p) noexcept override {
    if (in_) violations.push_back("mem_free");
    o_.mem_free(p);
  }
  void upload(void* d, const void* s, size_t n) override { bad("upload"), o_.upload(d, s, n); }
  void download(void* d, const void* s, size_t n) override { bad("download"), o_.download(d, s, n); }
  void copy(void* d, const void* s, size_t n) override { log("copy", {d, s}, {int64_t(n)}), o_.copy(d, s, n); }
  void fill(float* d, float v, size_t n) override { log("fill", {d}, {int64_t(n)}), o_.fill(d, v, n); }

  void embed(const WeightView& e, const int32_t* t, int T, int n, float* X) override {
    log("embed", {e.data, t, X}, {T, n}), o_.embed(e, t, T, n, X);
  }
  void rms_norm(const float* x, const WeightView* w, int T, int64_t dim, float eps, float* y) override {
    log("rms_norm", {x, w ? w->data : nullptr, y}, {T, dim}), o_.rms_norm(x, w, T, dim, eps, y);
  }
  void matmul(const WeightView& w, int ex, const float* x, int T, float* y) override {
    log("matmul", {w.data, x, y}, {ex, T}), o_.matmul(w, ex, x, T, y);
  }
  void hc_pre(const HcWeights& w, const HcParams& p, const float* X, int T, float* a, float* post,
              float* comb) override {
    log("hc_pre", {w.fn.data, X, a, post, comb}, {T}), o_.hc_pre(w, p, X, T, a, post, comb);
  }
  void hc_post(const HcParams& p, const float* y, const float* post, const float* comb, int T, float* X) override {
    log("hc_post", {y, post, comb, X}, {T}), o_.hc_post(p, y, post, comb, T, X);
  }
  void hc_head(const HcHeadWeights& w, const HcParams& p, const float* X, int T, float* h) override {
    log("hc_head", {w.fn.data, X, h}, {T}), o_.hc_head(w, p, X, T, h);
  }
  void moe_route(const MoeWeights& w, const MoeParams& p, const float* x, const int32_t* t, int T, int32_t* ids,
                 float* wts) override {
    log("moe_route", {w.gate_inp.data, x, t, ids, wts}, {T, p.hash}), o_.moe_route(w, p, x, t, T, ids, wts);
  }
  void moe_ffn(const MoeWeights& w, const MoeParams& p, const float* x, const int32_t* ids, const float* wts, int T,
               float* y) override {
    log("moe_ffn", {w.gate_exps.data, x, ids, wts, y}, {T}), o_.moe_ffn(w, p, x, ids, wts, T, y);
  }
  void matmul_grouped(const WeightView& w, int g, const float* x, int T, float* y) override {
    log("matmul_grouped", {w.data, x, y}, {g, T}), o_.matmul_grouped(w, g, x, T, y);
  }
  void head_prep(float* x, int T, int H, int dim, const HeadPrep& p) override {
    if (p.rope) bad("head_prep with RoPE");
    log("head_prep", {x, p.norm_w ? p.norm_w->data : nullptr}, {T, H, dim, p.norm, int(p.qat)});
    o_.head_prep(x, T, H, dim, p);
  }
  void compressor_step(const CompressorParams& p, const CompressorBuffers& s, const float* v, const float* z, int T,
                       int64_t p0) override {
    bad("compressor_step"), o_.compressor_step(p, s, v, z, T, p0);
  }
  void indexer_topk(const IndexerParams& p, const float* qI, const float* wI, const float* keys, int T, int64_t p0,
                    int32_t* sel) override {
    bad("indexer_topk"), o_.indexer_topk(p, qI, wI, keys, T, p0, sel);
  }
  void sink_attention(const SinkAttnParams& p, const float* q, const float* kv, const float* ring, const float* comp,
                      const int32_t* sel, int T, int64_t p0, float* out) override {
    bad("sink_attention"), o_.sink_attention(p, q, kv, ring, comp, sel, T, p0, out);
  }
  void window_store(float* ring, int W, int dim, const float* kv, int T, int64_t p0) override {
    bad("window_store"), o_.window_store(ring, W, dim, kv, T, p0);
  }

  void run_segment(const std::vector<uint64_t>& key, const std::function<void()>& ops) override {
    EXPECT_FALSE(in_) << "nested segment";
    ids.push_back(key.empty() ? -1 : int64_t(key[0]));
    in_ = true;
    calls_.clear();
    ops();
    in_ = false;
    auto [it, fresh] = recorded_.emplace(key, calls_);
    if (!fresh) {
      ++repeats;
      EXPECT_EQ(it->second, calls_) << "segment " << key[0] << ": same key, different op calls";
    }
    EXPECT_FALSE(calls_.empty()) << "segment " << key[0] << " has no ops";
  }

  std::vector<int64_t> ids;             // key[0] of every segment, in call order
  std::vector<std::string> violations;  // forbidden calls inside a segment
  long long repeats = 0;                // segments whose key was seen before

 private:
  void bad(const char* what) {
    if (in_) violations.push_back(what);
  }
  void log(const char* op, std::initializer_list<const void*> ptrs, std::initializer_list<int64_t> ints) {
    if (!in_) return;
    std::string s = op;
    for (const void* p : ptrs) s += " " + std::to_string(reinterpret_cast<uintptr_t>(p));
    for (int64_t v : ints) s += " " + std::to_string(v);
    calls_.push_back(s);
  }
  test::OpaqueBackend o_;
  bool in_ = false;
  std::vector<std::string> calls_;
  std::map<std::vector<uint64_t>, std::vector<std::string>> recorded_;
};

class SegmentForward : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    path_ = (std::filesystem::temp_directory_path() / ("dsv4_segprobe_" + std::to_string(::getpid()) + ".gguf")).string();
    test::write_tiny_model(path_, test::tiny_config(), {});
  }
  static void TearDownTestSuite() { std::remove(path_.c_str()); }
  static std::string path_;
};
std::string SegmentForward::path_;

std::vector<int32_t> tokens(int n) {
  test::Rng r(5);
  std::vector<int32_t> t;
  for (int i = 0; i < n; ++i) t.push_back(int32_t(r.next() % 96));
  return t;
}

TEST_F(SegmentForward, DecodeSegmentsArePositionFreeAndKeyed) {
  auto m = Model::load(path_);
  const int L = m->config().n_layers, V = m->config().n_vocab;
  auto cpu = make_cpu_backend();
  SegmentProbe probe;
  const auto t = tokens(40);
  SequenceState a, b;
  a.init(m->config(), 64, cpu.get());
  b.init(m->config(), 64, &probe);
  ForwardScratch scratch;
  ForwardOptions o;
  o.scratch = &scratch;
  std::vector<float> la(V), lb(V);
  // Prefill: no segments.
  model_forward(*m, *cpu, a, t.data(), 11, la.data(), false, {});
  model_forward(*m, probe, b, t.data(), 11, lb.data(), false, o);
  EXPECT_TRUE(probe.ids.empty());
  // 29 decodes: positions 11..39 (the window of 8 wraps, the ratio-4 and ratio-8 compressors emit rows).
  const int n_dec = 29;
  for (int i = 11; i < 11 + n_dec; ++i) {
    model_forward(*m, *cpu, a, t.data() + i, 1, la.data(), false, {});
    model_forward(*m, probe, b, t.data() + i, 1, lb.data(), false, o);
    ASSERT_EQ(std::memcmp(la.data(), lb.data(), size_t(V) * sizeof(float)), 0) << "decode token " << i;
  }
  ASSERT_EQ(probe.ids.size(), size_t(n_dec) * size_t(L + 1));
  for (size_t i = 0; i < probe.ids.size(); ++i) EXPECT_EQ(probe.ids[i], int64_t(i % size_t(L + 1))) << i;
  for (const std::string& v : probe.violations) ADD_FAILURE() << "inside a segment: " << v;
  EXPECT_EQ(probe.repeats, (n_dec - 1) * (L + 1));  // one scratch, one model: every token repeats the keys

  // A decode without logits (key differs: no head) and with a debug tap (no segments).
  const size_t before = probe.ids.size();
  model_forward(*m, probe, b, t.data(), 1, nullptr, false, o);
  EXPECT_EQ(probe.ids.size(), before + size_t(L + 1));
  ForwardOptions tapped = o;
  int taps = 0;
  tapped.tap = [&](const char*, int, const float*, int, int64_t) { ++taps; };
  model_forward(*m, probe, b, t.data(), 1, lb.data(), false, tapped);
  EXPECT_EQ(probe.ids.size(), before + size_t(L + 1));
  EXPECT_GT(taps, 0);

  // Two sessions in one single-token-each batch: no segments (the attention scratch is shared per sequence).
  SequenceState c;
  c.init(m->config(), 64, &probe);
  model_forward(*m, probe, c, t.data(), 3, nullptr, false, o);
  const size_t before_batch = probe.ids.size();
  BatchSlice sl[2] = {{&b, 1}, {&c, 1}};
  const int32_t two[2] = {t[0], t[1]};
  std::vector<float> l2(size_t(2) * V);
  model_forward_batch(*m, probe, sl, two, l2.data(), false, o);
  EXPECT_EQ(probe.ids.size(), before_batch);
  for (const std::string& v : probe.violations) ADD_FAILURE() << "inside a segment: " << v;
}

}  // namespace
}  // namespace dsv4
