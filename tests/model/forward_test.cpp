// End-to-end forward on tiny in-test GGUF models (tiny_model.h): chunking, decode, save/restore, clone.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <sstream>
#include <string>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "common/argmax.h"
#include "dsv4/engine.h"
#include "model/forward.h"
#include "model/model.h"
#include "tiny_model.h"

using namespace dsv4;

namespace {

std::string tmp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("dsv4_model_test_" + std::to_string(::getpid()) + "_" + name))
      .string();
}

// 40 tokens: crosses 10 CSA windows (ratio 4, so > top-k 3 rows become visible), 5 HCA windows (ratio 8) and
// the sliding window (8) several times.
std::vector<Token> test_tokens(int n = 40, uint64_t seed = 7) {
  test::Rng r(seed);
  std::vector<Token> t;
  for (int i = 0; i < n; ++i) t.push_back(Token(r.next() % 96));
  return t;
}

struct TinyModel {
  std::string path;
  explicit TinyModel(const std::string& name, const test::TinyOptions& o = {}) : path(tmp_path(name)) {
    test::write_tiny_model(path, test::tiny_config(), o);
  }
  ~TinyModel() { std::remove(path.c_str()); }
};

std::unique_ptr<Engine> load(const std::string& path, bool qat = true, int threads = 2) {
  EngineOptions o;
  o.model_path = path;
  o.backend = BackendKind::Cpu;
  o.qat_sim = qat;
  o.threads = threads;
  return Engine::load(o);
}

// Feeds tokens in the given chunk sizes (the rest as a last chunk) and returns all logits rows.
std::vector<float> run_chunks(Session& s, const std::vector<Token>& toks, const std::vector<int>& chunks) {
  std::vector<float> all, rows;
  size_t at = 0;
  for (int c : chunks) {
    s.eval(std::span<const Token>(toks.data() + at, size_t(c)), &rows);
    all.insert(all.end(), rows.begin(), rows.end());
    at += size_t(c);
  }
  if (at < toks.size()) {
    s.eval(std::span<const Token>(toks.data() + at, toks.size() - at), &rows);
    all.insert(all.end(), rows.begin(), rows.end());
  }
  return all;
}

void expect_bitwise(const std::vector<float>& a, const std::vector<float>& b, const char* what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i)
    ASSERT_EQ(std::memcmp(&a[i], &b[i], sizeof(float)), 0) << what << ": first mismatch at " << i << ": " << a[i]
                                                           << " vs " << b[i];
}

}  // namespace

class TinyForward : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { model_ = new TinyModel("forward.gguf"); }
  static void TearDownTestSuite() { delete model_; }
  static TinyModel* model_;
};
TinyModel* TinyForward::model_ = nullptr;

TEST_F(TinyForward, LogitsAreFiniteAndVaried) {
  auto e = load(model_->path);
  EXPECT_EQ(e->info().n_vocab, 96);
  auto s = e->new_session(64);
  auto toks = test_tokens();
  auto all = run_chunks(*s, toks, {});
  ASSERT_EQ(all.size(), toks.size() * 96);
  double mx = 0;
  for (float v : all) {
    ASSERT_TRUE(std::isfinite(v));
    mx = std::max(mx, double(std::fabs(v)));
  }
  EXPECT_GT(mx, 1e-2);  // not a degenerate all-zero model
  EXPECT_EQ(s->position(), 40);
  // The last row equals logits().
  for (int v = 0; v < 96; ++v) EXPECT_EQ(s->logits()[size_t(v)], all[39 * 96 + size_t(v)]);
}

// Session::argmax is the greedy id over logits() (argmax_usable: the Sampler's temperature-0 rule) after prefill,
// decode, clone and restore; it throws before the first eval. logits() read after argmax() (the session's logits
// are copied out of the backend buffer only when asked) still equal the all-rows eval's last row bitwise.
TEST_F(TinyForward, ArgmaxIsTheGreedyIdOfLogits) {
  auto e = load(model_->path);
  auto toks = test_tokens();
  auto s = e->new_session(64);
  EXPECT_THROW(s->argmax(), Error);
  auto ref = e->new_session(64);
  std::vector<float> rows;
  ref->eval(std::span<const Token>(toks.data(), 20), &rows);
  s->eval(std::span<const Token>(toks.data(), 20));
  const Token a = s->argmax();  // before logits(): reduced in the backend buffer
  EXPECT_EQ(a, Token(argmax_usable(rows.data() + 19 * 96, 96)));
  ASSERT_EQ(s->logits().size(), size_t(96));
  EXPECT_EQ(std::memcmp(s->logits().data(), rows.data() + 19 * 96, 96 * sizeof(float)), 0);
  EXPECT_EQ(s->argmax(), a);  // after logits(): the host copy, same rule
  for (int i = 0; i < 5; ++i) {
    const Token next = s->argmax();
    s->eval(std::span<const Token>(&next, 1));
    auto c = s->clone();
    EXPECT_EQ(c->argmax(), s->argmax());
    std::stringstream ss;
    s->save(ss);
    auto r = e->new_session(64);
    r->restore(ss);
    EXPECT_EQ(r->argmax(), Token(argmax_usable(s->logits().data(), 96)));
  }
}

TEST_F(TinyForward, ChunkedPrefillIsBitwiseWholePrefill) {
  auto e = load(model_->path);
  auto toks = test_tokens();
  auto s1 = e->new_session(64);
  auto whole = run_chunks(*s1, toks, {});
  for (std::vector<int> chunks : {std::vector<int>{7, 13}, {1, 3, 4, 5, 8}, {16, 1, 1, 2}, {39}}) {
    auto s2 = e->new_session(64);
    auto chunked = run_chunks(*s2, toks, chunks);
    expect_bitwise(whole, chunked, "chunked prefill");
  }
}

TEST_F(TinyForward, ThreadCountDoesNotChangeBits) {
  auto toks = test_tokens();
  auto e1 = load(model_->path, true, 1);
  auto e3 = load(model_->path, true, 3);
  auto s1 = e1->new_session(64);
  auto s3 = e3->new_session(64);
  expect_bitwise(run_chunks(*s1, toks, {}), run_chunks(*s3, toks, {}), "1 vs 3 threads");
}

TEST_F(TinyForward, DecodeMatchesPrefill) {
  auto e = load(model_->path);
  auto toks = test_tokens();
  auto s1 = e->new_session(64);
  auto whole = run_chunks(*s1, toks, {});
  auto s2 = e->new_session(64);
  std::vector<int> ones(toks.size(), 1);
  auto dec = run_chunks(*s2, toks, ones);
  // Tolerance: every CPU op computes each token row independently of the batch, so decode is expected to be
  // bitwise equal; we allow 1e-5 relative to the largest logit (fp32 re-association in a backend that blocks
  // tokens, e.g. a future SIMD matmul) but no more: a wrong cache/position bug moves logits by >= 1e-2.
  double mx = 0, diff = 0;
  for (size_t i = 0; i < whole.size(); ++i) {
    mx = std::max(mx, double(std::fabs(whole[i])));
    diff = std::max(diff, double(std::fabs(whole[i] - dec[i])));
  }
  EXPECT_LE(diff, 1e-5 * mx) << "max |decode - prefill| = " << diff << ", max |logit| = " << mx;
}

TEST_F(TinyForward, SaveRestoreEqualsNeverStopping) {
  auto e = load(model_->path);
  auto toks = test_tokens();
  auto ref = e->new_session(64);
  auto expect = run_chunks(*ref, toks, {17});
  auto a = e->new_session(64);
  std::vector<float> rows;
  a->eval(std::span<const Token>(toks.data(), 17), &rows);
  std::stringstream ss;
  a->save(ss);
  auto b = e->new_session(64);
  b->restore(ss);
  EXPECT_EQ(b->position(), 17);
  EXPECT_EQ(b->tokens(), std::vector<Token>(toks.begin(), toks.begin() + 17));
  std::vector<float> rest;
  b->eval(std::span<const Token>(toks.data() + 17, toks.size() - 17), &rest);
  rows.insert(rows.end(), rest.begin(), rest.end());
  expect_bitwise(expect, rows, "save/restore");
}

TEST_F(TinyForward, CloneForksIndependently) {
  auto e = load(model_->path);
  auto toks = test_tokens();
  auto ref = e->new_session(64);
  auto expect = run_chunks(*ref, toks, {20});
  auto a = e->new_session(64);
  std::vector<float> head;
  a->eval(std::span<const Token>(toks.data(), 20), &head);
  auto b = a->clone();
  std::vector<float> other;
  a->eval(std::span<const Token>(toks.data(), 5), &other);  // diverge a; b must not notice
  std::vector<float> rest;
  b->eval(std::span<const Token>(toks.data() + 20, toks.size() - 20), &rest);
  head.insert(head.end(), rest.begin(), rest.end());
  expect_bitwise(expect, head, "clone");
}

TEST_F(TinyForward, CorruptOrTruncatedStateIsRejected) {
  auto e = load(model_->path);
  auto toks = test_tokens();
  auto a = e->new_session(64);
  a->eval(std::span<const Token>(toks.data(), 10));
  std::stringstream ss;
  a->save(ss);
  const std::string bytes = ss.str();
  {
    std::string bad = bytes;
    bad[bad.size() / 2] ^= 0x40;  // inside the layer records
    std::stringstream in(bad);
    auto b = e->new_session(64);
    try {
      b->restore(in);
      FAIL() << "corrupted state accepted";
    } catch (const Error& err) {
      EXPECT_NE(std::string(err.what()).find("session state"), std::string::npos) << err.what();
    }
    EXPECT_EQ(b->position(), 0);  // untouched
  }
  {
    std::stringstream in(bytes.substr(0, bytes.size() - 100));
    auto b = e->new_session(64);
    EXPECT_THROW(b->restore(in), Error);
  }
  {
    std::string bad = bytes;
    bad[0] = 'X';
    std::stringstream in(bad);
    auto b = e->new_session(64);
    try {
      b->restore(in);
      FAIL() << "bad magic accepted";
    } catch (const Error& err) {
      EXPECT_NE(std::string(err.what()).find("bad magic"), std::string::npos) << err.what();
    }
  }
}

TEST_F(TinyForward, QatSimulationChangesLogitsSlightly) {
  // The QAT round trips (FP8 on KV, FP4 on indexer q/k) change values: on vs off must differ, but only by
  // quantization noise (< 50% of the logit range; a wiring bug, e.g. the flag disabling attention, is larger).
  auto toks = test_tokens();
  auto on = load(model_->path, true);
  auto off = load(model_->path, false);
  auto s_on = on->new_session(64);
  auto s_off = off->new_session(64);
  auto a = run_chunks(*s_on, toks, {});
  auto b = run_chunks(*s_off, toks, {});
  double mx = 0, diff = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    mx = std::max(mx, double(std::fabs(a[i])));
    diff = std::max(diff, double(std::fabs(a[i] - b[i])));
  }
  EXPECT_GT(diff, 0.0);
  EXPECT_LT(diff, 0.5 * mx);
}

TEST_F(TinyForward, BadTokensAndContextOverflowLeaveSessionUntouched) {
  auto e = load(model_->path);
  auto s = e->new_session(8);
  std::vector<Token> bad = {1, 2, 96};
  try {
    s->eval(bad);
    FAIL();
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find("token id 96"), std::string::npos) << err.what();
  }
  EXPECT_EQ(s->position(), 0);
  auto toks = test_tokens(9);
  try {
    s->eval(toks);
    FAIL();
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find("max context 8"), std::string::npos) << err.what();
  }
  EXPECT_EQ(s->position(), 0);
}

TEST(TinyQuantized, Q8_0MatricesRunAndStayClose) {
  // Q8_0 needs widths that are multiples of 32; tiny dims are (64, 32, 16): F = 16 is not, so use F = 32.
  ModelConfig c = test::tiny_config();
  c.expert_ff = 32;
  std::string p32 = tmp_path("q32.gguf"), p8 = tmp_path("q8.gguf");
  // The F32 reference holds exactly the Q8_0-dequantized weights, so the two differ only by the Q8_0
  // activation rounding of the quantized matmul path.
  test::TinyOptions o;
  o.roundtrip = QType::Q8_0;
  test::write_tiny_model(p32, c, o);
  o.roundtrip = QType::F32;
  o.matrix_type = QType::Q8_0;
  test::write_tiny_model(p8, c, o);
  auto toks = test_tokens(24);
  auto e32 = load(p32), e8 = load(p8);
  auto s32 = e32->new_session(32), s8 = e8->new_session(32);
  auto a = run_chunks(*s32, toks, {}), b = run_chunks(*s8, toks, {});
  // Quality is not graded here (the issue asks only that quantized files run). Q8_0 activation rounding moves
  // a position's logits by ~2-4% of the logit range (measured), but where it flips a discrete choice (expert
  // top-2 of 8, indexer top-3) single positions move by up to ~70% (measured). So the check is on the MEDIAN
  // over positions of max|dlogit|: <= 15% of max|logit| (measured 4.6%); a layout bug (wrong block or row
  // stride) moves every position by O(100%). ops_test checks the quantized matmul itself tightly.
  const size_t V = 96, rows = a.size() / V;
  std::vector<double> per_row(rows, 0.0);
  double mx = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_TRUE(std::isfinite(b[i]));
    mx = std::max(mx, double(std::fabs(a[i])));
    per_row[i / V] = std::max(per_row[i / V], double(std::fabs(a[i] - b[i])));
  }
  std::sort(per_row.begin(), per_row.end());
  const double median = per_row[rows / 2];
  std::printf("[ info ] tiny Q8_0 vs F32: median over positions of max|dlogit| = %.4g, worst %.4g, max|logit| = %.4g\n",
              median, per_row.back(), mx);
  EXPECT_LT(median, 0.15 * mx);
  std::remove(p32.c_str());
  std::remove(p8.c_str());
}

TEST_F(TinyForward, BatchOfSessionsEqualsSeparateEvalsBitwise) {
  // Three sessions at different positions batched together (continuous batching), then continued alone:
  // logits and later state must be bitwise those of separate evals.
  auto e = load(model_->path);
  auto toks = test_tokens();
  std::vector<std::unique_ptr<Session>> ref, bat;
  const int hist[3] = {0, 9, 21};  // tokens already in each session before the batch
  for (int i = 0; i < 3; ++i) {
    ref.push_back(e->new_session(64));
    bat.push_back(e->new_session(64));
    if (hist[i] > 0) {
      ref[size_t(i)]->eval(std::span<const Token>(toks.data(), size_t(hist[i])));
      bat[size_t(i)]->eval(std::span<const Token>(toks.data(), size_t(hist[i])));
    }
  }
  const int len[3] = {5, 1, 3};
  std::vector<std::span<const Token>> lists;
  std::vector<Session*> ptrs;
  for (int i = 0; i < 3; ++i) {
    lists.emplace_back(toks.data() + hist[i], size_t(len[i]));
    ptrs.push_back(bat[size_t(i)].get());
    ref[size_t(i)]->eval(lists.back());
  }
  e->eval_batch(ptrs, lists);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(bat[size_t(i)]->position(), hist[i] + len[i]);
    std::vector<float> a(ref[size_t(i)]->logits().begin(), ref[size_t(i)]->logits().end());
    std::vector<float> b(bat[size_t(i)]->logits().begin(), bat[size_t(i)]->logits().end());
    expect_bitwise(a, b, "batched logits");
    // Continue alone: the states must match too.
    std::span<const Token> more(toks.data() + 30, 6);
    std::vector<float> ra, rb;
    ref[size_t(i)]->eval(more, &ra);
    bat[size_t(i)]->eval(more, &rb);
    expect_bitwise(ra, rb, "after batch");
  }
  // The same session twice, or a bad token, is rejected before anything changes.
  std::vector<Session*> twice = {ptrs[0], ptrs[0]};
  std::vector<std::span<const Token>> two = {lists[0], lists[0]};
  EXPECT_THROW(e->eval_batch(twice, two), Error);
  std::vector<Token> bad = {100};
  std::vector<std::span<const Token>> badl = {lists[0], std::span<const Token>(bad)};
  std::vector<Session*> two_s = {ptrs[0], ptrs[1]};
  const int64_t p0 = ptrs[0]->position();
  EXPECT_THROW(e->eval_batch(two_s, badl), Error);
  EXPECT_EQ(ptrs[0]->position(), p0);
}

TEST_F(TinyForward, SmallPassesGiveTheSameBits) {
  // ForwardOptions::max_tokens_per_pass splits batches internally; exercise it through the model API with
  // passes of 3 rows that cut slices of a multi-session batch in the middle.
  auto m = Model::load(model_->path);
  auto be = make_cpu_backend();
  const ModelConfig& c = m->config();
  auto toks = test_tokens();
  ForwardOptions big, small;
  small.max_tokens_per_pass = 3;
  SequenceState a1, a2, b1, b2;
  for (SequenceState* s : {&a1, &a2, &b1, &b2}) s->init(c, 64);
  BatchSlice sa[2] = {{&a1, 11}, {&a2, 7}}, sb[2] = {{&b1, 11}, {&b2, 7}};
  std::vector<float> la(18 * 96), lb(18 * 96);
  model_forward_batch(*m, *be, sa, toks.data(), la.data(), true, big);
  model_forward_batch(*m, *be, sb, toks.data(), lb.data(), true, small);
  expect_bitwise(la, lb, "pass size");
  std::vector<float> ea(2 * 96), eb(2 * 96);
  model_forward_batch(*m, *be, sa, toks.data() + 18, ea.data(), false, big);
  model_forward_batch(*m, *be, sb, toks.data() + 18, eb.data(), false, small);
  expect_bitwise(ea, eb, "last rows, pass size");
}

TEST_F(TinyForward, DebugTapReportsEveryStageInOrder) {
  auto m = Model::load(model_->path);
  auto be = make_cpu_backend();
  const ModelConfig& c = m->config();
  auto toks = test_tokens(5);
  SequenceState st;
  st.init(c, 16);
  std::vector<std::string> seen;
  std::vector<float> embed;
  ForwardOptions o;
  o.tap = [&](const char* name, int layer, const float* p, int rows, int64_t width) {
    seen.push_back(std::string(name) + "@" + std::to_string(layer) + ":" + std::to_string(rows) + "x" +
                   std::to_string(width));
    if (std::string(name) == "embed") embed.assign(p, p + rows * width);
  };
  std::vector<float> logits(96);
  model_forward(*m, *be, st, toks.data(), 5, logits.data(), false, o);
  // Per layer: the two sublayer inputs/outputs, then the residual streams after the layer.
  std::vector<std::string> ordered = {"embed@-1:5x256"};
  for (int il = 0; il < 4; ++il) {
    for (const char* n : {"attn_in", "attn_out", "ffn_in", "ffn_out"})
      ordered.push_back(std::string(n) + "@" + std::to_string(il) + ":5x64");
    ordered.push_back("residual@" + std::to_string(il) + ":5x256");
  }
  ordered.push_back("head_in@-1:1x64");  // last row only
  EXPECT_EQ(seen, ordered);
  // The embedding is copied into all 4 streams (model-spec §4).
  ASSERT_EQ(embed.size(), 5u * 256u);
  for (int t = 0; t < 5; ++t)
    for (int sidx = 1; sidx < 4; ++sidx)
      for (int d = 0; d < 64; ++d) ASSERT_EQ(embed[size_t(t * 256 + sidx * 64 + d)], embed[size_t(t * 256 + d)]);
}

// A state saved with one weights file must not continue on another file of the same shape (another seed stands
// in for another quant mix or imatrix run): the restore names the weights digest and leaves the session empty.
TEST(TinySessionFingerprint, StateFromOtherWeightsOfSameShapeIsRefused) {
  test::TinyOptions other;
  other.seed = 2;
  TinyModel ma("fp_a.gguf"), mb("fp_b.gguf", other);
  auto ea = load(ma.path), eb = load(mb.path);
  auto toks = test_tokens(12);
  auto a = ea->new_session(64);
  a->eval(toks);
  std::stringstream ss;
  a->save(ss);
  const std::string bytes = ss.str();
  auto b = eb->new_session(64);
  std::stringstream in(bytes);
  try {
    b->restore(in);
    FAIL() << "state from other weights accepted";
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find("different weights"), std::string::npos) << err.what();
  }
  EXPECT_EQ(b->position(), 0);
  std::stringstream same(bytes);  // the same file's engine still takes it
  auto c = ea->new_session(64);
  c->restore(same);
  EXPECT_EQ(c->position(), 12);
}

TEST_F(TinyForward, EnginePassTokensGiveTheSameBitsAndAreValidated) {
  // EngineOptions::pass_tokens (CLI -b/--batch-size) only changes how a prompt is cut into forward passes; the CPU
  // oracle's rows are independent of that, so logits and saved state must be bitwise equal.
  auto toks = test_tokens();
  std::vector<float> la, lb;
  std::ostringstream sa, sb;
  for (int pass : {0, 5}) {
    EngineOptions o;
    o.model_path = model_->path;
    o.backend = BackendKind::Cpu;
    o.threads = 2;
    o.pass_tokens = pass;
    auto e = Engine::load(o);
    auto s = e->new_session(64);
    s->eval(toks, pass == 0 ? &la : &lb);
    s->save(pass == 0 ? sa : sb);
  }
  expect_bitwise(la, lb, "pass_tokens 5 vs default");
  EXPECT_TRUE(sa.str() == sb.str()) << "saved state differs with pass_tokens";
  for (int bad : {-1, EngineOptions::kMaxPassTokens + 1}) {
    EngineOptions o;
    o.model_path = model_->path;
    o.backend = BackendKind::Cpu;
    o.pass_tokens = bad;
    try {
      Engine::load(o);
      ADD_FAILURE() << "pass_tokens " << bad << " was accepted";
    } catch (const Error& err) {
      EXPECT_NE(std::string(err.what()).find("pass_tokens"), std::string::npos) << err.what();
    }
  }
}
