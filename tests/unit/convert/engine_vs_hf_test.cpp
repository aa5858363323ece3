// End to end: HF checkpoint -> `convert --mix f32` -> engine (CPU, QAT simulations off) vs the HF reference
// logits recorded on CUDA in fp32 (tools/reference/make_fixtures.py).
//
// Tolerance: max|engine - ref| / max|ref| <= 1e-4 and identical argmax on every row. Both sides compute in fp32
// with different summation orders; HF itself differs from its own cached decode by <= 6.3e-6 relative on these
// fixtures (meta.json hf_self_rel_diff), so 1e-4 leaves >10x headroom for rounding while any real difference
// (a wrong RoPE pair, a missed compressed row, a flipped top-k selection) moves logits by >1e-2.
// Paths: one full prefill, token-by-token decode, and prefill in uneven chunks 7, 13, rest.
// Quantized mixes (q8_0, q2, q4) are run and their mean KL divergence to the f32 logits is logged (no quality
// threshold: the toy widths fall back to Q8_0/F16, see convert/mix.h).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <sstream>

#include "convert/convert.h"
#include "dsv4/engine.h"
#include "st_util.h"

namespace dsv4 {
namespace {

using test::TempDir;

struct Sequence {
  std::vector<Token> tokens;
  std::vector<float> logits;  // rows x vocab
  int vocab = 0;
};

std::vector<Sequence> load_sequences(const std::string& fixture) {
  const auto dir = test::fixture_dir(fixture);
  const auto meta = nlohmann::json::parse(test::slurp(dir / "meta.json"));
  std::vector<Sequence> out;
  for (const auto& s : meta["sequences"]) {
    Sequence q;
    for (int t : s["tokens"]) q.tokens.push_back(t);
    q.vocab = s["vocab"];
    const auto b = test::slurp(dir / s["logits"].get<std::string>());
    q.logits.resize(b.size() / 4);
    std::memcpy(q.logits.data(), b.data(), b.size());
    EXPECT_EQ(q.logits.size(), q.tokens.size() * size_t(q.vocab));
    out.push_back(std::move(q));
  }
  return out;
}

// Converted GGUFs, one per (fixture, mix), shared by the tests of this binary.
class Converted {
 public:
  static const std::string& path(const std::string& fixture, Mix mix) {
    static Converted c;
    const std::string key = fixture + "/" + mix_name(mix);
    auto it = c.files_.find(key);
    if (it != c.files_.end()) return it->second;
    ConvertOptions o{test::fixture_dir(fixture).string(), c.dir_.str(fixture + "." + mix_name(mix) + ".gguf"), mix,
                     nullptr};
    convert_checkpoint(o);
    return c.files_.emplace(key, o.out_path).first->second;
  }

 private:
  TempDir dir_;
  std::map<std::string, std::string> files_;
};

// DSV4_TEST_BACKEND=cuda runs the same comparisons on the CUDA backend (GPU box); default CPU.
std::unique_ptr<Engine> load(const std::string& path) {
  EngineOptions eo;
  eo.model_path = path;
  const char* be = std::getenv("DSV4_TEST_BACKEND");
  eo.backend = be && std::string(be) == "cuda" ? BackendKind::Cuda : BackendKind::Cpu;
  eo.qat_sim = false;  // HF implements no QAT simulation
  return Engine::load(eo);
}

// Feeds `tokens` in chunks (0 = the rest) and returns all rows of logits.
std::vector<float> run(Engine& e, const std::vector<Token>& tokens, const std::vector<size_t>& chunks) {
  auto s = e.new_session(int64_t(tokens.size()));
  std::vector<float> all, rows;
  size_t at = 0;
  for (size_t ci = 0; at < tokens.size(); ++ci) {
    size_t n = ci < chunks.size() ? chunks[ci] : tokens.size() - at;
    n = std::min(n, tokens.size() - at);
    s->eval(std::span<const Token>(tokens.data() + at, n), &rows);
    EXPECT_EQ(rows.size(), n * size_t(e.info().n_vocab));
    all.insert(all.end(), rows.begin(), rows.end());
    at += n;
  }
  return all;
}


class EngineVsHf : public ::testing::TestWithParam<const char*> {};

TEST_P(EngineVsHf, F32LogitsMatchReference) {
  const std::string fx = GetParam();
  auto engine = load(Converted::path(fx, Mix::F32));
  const auto seqs = load_sequences(fx);
  ASSERT_FALSE(seqs.empty());
  for (size_t si = 0; si < seqs.size(); ++si) {
    const auto& q = seqs[si];
    const size_t n = q.tokens.size(), V = size_t(q.vocab);
    ASSERT_EQ(size_t(engine->info().n_vocab), V);
    float ref_max = 0;
    for (float v : q.logits) ref_max = std::max(ref_max, std::fabs(v));
    const std::pair<const char*, std::vector<size_t>> paths[] = {
        {"prefill", {}}, {"decode", std::vector<size_t>(n, 1)}, {"chunks_7_13", {7, 13}}};
    for (const auto& [label, chunks] : paths) {
      SCOPED_TRACE(fx + " seq" + std::to_string(si) + " " + label);
      const auto got = run(*engine, q.tokens, chunks);
      ASSERT_EQ(got.size(), q.logits.size());
      float dmax = 0;
      int argmax_diff = 0;
      for (size_t r = 0; r < n; ++r) {
        size_t ag = 0, ar = 0;
        for (size_t v = 0; v < V; ++v) {
          const float g = got[r * V + v], f = q.logits[r * V + v];
          ASSERT_TRUE(std::isfinite(g)) << "row " << r;
          dmax = std::max(dmax, std::fabs(g - f));
          if (g > got[r * V + ag]) ag = v;
          if (f > q.logits[r * V + ar]) ar = v;
        }
        argmax_diff += ag != ar;
      }
      const double rel = dmax / ref_max;
      std::printf("[engine-vs-hf] %-10s seq%zu n=%3zu %-12s max|d|/max|ref| = %.3e  argmax mismatches = %d\n",
                  fx.c_str(), si, n, label, rel, argmax_diff);
      EXPECT_LE(rel, 1e-4);
      EXPECT_EQ(argmax_diff, 0);
    }
  }
}

TEST_P(EngineVsHf, QuantizedMixesRunAndReportKl) {
  const std::string fx = GetParam();
  const auto seqs = load_sequences(fx);
  auto f32 = load(Converted::path(fx, Mix::F32));
  const auto base = run(*f32, seqs[0].tokens, {});
  const size_t V = size_t(seqs[0].vocab), n = seqs[0].tokens.size();
  for (Mix mix : {Mix::Q8_0, Mix::Q2, Mix::Q4}) {
    auto e = load(Converted::path(fx, mix));
    const auto got = run(*e, seqs[0].tokens, {});
    ASSERT_EQ(got.size(), base.size());
    double kl_sum = 0;
    for (size_t r = 0; r < n; ++r) {
      // KL(p_f32 || p_mix) with log-sum-exp on both rows.
      const float* a = base.data() + r * V;
      const float* b = got.data() + r * V;
      const double ma = *std::max_element(a, a + V), mb = *std::max_element(b, b + V);
      double za = 0, zb = 0;
      for (size_t v = 0; v < V; ++v) {
        za += std::exp(a[v] - ma);
        zb += std::exp(b[v] - mb);
      }
      double kl = 0;
      for (size_t v = 0; v < V; ++v) {
        const double la = a[v] - ma - std::log(za), lb = b[v] - mb - std::log(zb);
        kl += std::exp(la) * (la - lb);
      }
      kl_sum += kl;
    }
    const double kl = kl_sum / double(n);
    std::printf("[engine-kl] %-10s mix %-5s mean KL(f32 || mix) over %zu positions = %.3e\n", fx.c_str(),
                mix_name(mix), n, kl);
    EXPECT_TRUE(std::isfinite(kl));
    EXPECT_GE(kl, -1e-9);  // KL is non-negative up to rounding
  }
}

// Save mid-sequence (after 29 tokens: inside a CSA window and an HCA window, past the sliding window), restore
// into a fresh session, continue: the logits of the remaining tokens equal an uninterrupted run bitwise.
TEST_P(EngineVsHf, SaveRestoreMidSequenceIsBitwise) {
  const std::string fx = GetParam();
  auto engine = load(Converted::path(fx, Mix::F32));
  const auto q = load_sequences(fx)[0];
  const size_t cut = 29;
  ASSERT_GT(q.tokens.size(), cut);
  const std::vector<Token> head(q.tokens.begin(), q.tokens.begin() + cut), tail(q.tokens.begin() + cut, q.tokens.end());
  auto a = engine->new_session(int64_t(q.tokens.size()));
  std::vector<float> rows, straight;
  a->eval(head, &rows);
  a->eval(tail, &straight);
  auto b = engine->new_session(int64_t(q.tokens.size()));
  b->eval(head, &rows);
  std::stringstream bytes;
  b->save(bytes);
  auto c = engine->new_session(int64_t(q.tokens.size()));
  c->restore(bytes);
  EXPECT_EQ(c->position(), int64_t(cut));
  std::vector<float> resumed;
  c->eval(tail, &resumed);
  ASSERT_EQ(resumed.size(), straight.size());
  EXPECT_EQ(std::memcmp(resumed.data(), straight.data(), straight.size() * sizeof(float)), 0);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, EngineVsHf, ::testing::Values("flash_w8", "mixed_w16", "pro_w8"),
                         [](const auto& info) { return std::string(info.param); });

}  // namespace
}  // namespace dsv4
