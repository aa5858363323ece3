// dsv4 synth: ds4 names/types/metadata, the real tokenizer, determinism, sane value scales, sparse experts.
#include <gtest/gtest.h>

#include <cmath>
#include <sys/stat.h>

#include "convert/synth.h"
#include "gguf/gguf.h"
#include "model/names.h"
#include "quant/quant.h"
#include "st_util.h"

namespace dsv4 {
namespace {

using test::TempDir;

SynthReport run(const std::string& path, Mix mix, uint64_t seed, bool sparse) {
  SynthOptions o;
  o.shape = "tiny";
  o.mix = mix;
  o.out_path = path;
  o.seed = seed;
  o.sparse_experts = sparse;
  return synth_model(o);
}

double rms_of(const GgufTensorInfo& t) {
  std::vector<float> v(size_t(t.n_elements()));
  dequantize_row(QType(t.type), t.data, v.data(), t.n_elements());
  double s = 0;
  for (float x : v) s += double(x) * x;
  return std::sqrt(s / double(v.size()));
}

TEST(Synth, TinyQ2LayoutTypesAndTokenizer) {
  TempDir tmp;
  run(tmp.str("a.gguf"), Mix::Q2, 7, false);
  auto f = GgufFile::open(tmp.str("a.gguf"));
  const ModelConfig c = ModelConfig::from_gguf(*f);
  EXPECT_EQ(c, synth_config("tiny"));
  EXPECT_EQ(c.n_vocab, 129280);
  EXPECT_EQ(f->get_array_size("tokenizer.ggml.tokens"), 129280u);
  const auto specs = all_tensor_specs(c);
  EXPECT_EQ(f->tensors().size(), specs.size());
  for (const auto& s : specs) {
    const auto& t = f->get_tensor(s.name);
    EXPECT_EQ(std::vector<int64_t>(t.ne.begin(), t.ne.begin() + int64_t(s.ne.size())), s.ne) << s.name;
  }
  // ds4's q2 types (model-spec §13.1); tiny's d_model is one super-block, so gate/up stay IQ2_XXS.
  EXPECT_EQ(f->get_tensor("token_embd.weight").type, uint32_t(QType::F16));
  EXPECT_EQ(f->get_tensor("output.weight").type, uint32_t(QType::Q8_0));
  EXPECT_EQ(f->get_tensor("blk.1.attn_q_b.weight").type, uint32_t(QType::Q8_0));
  EXPECT_EQ(f->get_tensor("blk.1.attn_compressor_kv.weight").type, uint32_t(QType::F16));
  EXPECT_EQ(f->get_tensor("blk.1.indexer.proj.weight").type, uint32_t(QType::F16));
  EXPECT_EQ(f->get_tensor("blk.1.ffn_down_exps.weight").type, uint32_t(QType::Q2_K));
  EXPECT_EQ(f->get_tensor("blk.1.ffn_gate_exps.weight").type, uint32_t(QType::IQ2_XXS));
  EXPECT_EQ(f->get_tensor("blk.0.ffn_gate_tid2eid.weight").type, uint32_t(QType::I32));
  EXPECT_EQ(f->get_tensor("blk.1.attn_norm.weight").type, uint32_t(QType::F32));
  // Scales: matrices ~ N(0, 1/in) -> rms 1/sqrt(in); quantization changes the rms by well under 20%.
  EXPECT_NEAR(rms_of(f->get_tensor("output.weight")) * std::sqrt(double(c.d_model)), 1.0, 0.2);
  EXPECT_NEAR(rms_of(f->get_tensor("blk.1.ffn_down_exps.weight")) * std::sqrt(256.0), 1.0, 0.2);
  EXPECT_NEAR(rms_of(f->get_tensor("token_embd.weight")), 1.0, 0.05);
  // tid2eid rows hold distinct experts in range.
  const auto& tid = f->get_tensor("blk.0.ffn_gate_tid2eid.weight");
  const int32_t* ids = reinterpret_cast<const int32_t*>(tid.data);
  for (int64_t tok = 0; tok < tid.ne[1]; ++tok) {
    ASSERT_TRUE(ids[2 * tok] >= 0 && ids[2 * tok] < 8 && ids[2 * tok + 1] >= 0 && ids[2 * tok + 1] < 8);
    ASSERT_NE(ids[2 * tok], ids[2 * tok + 1]) << "token " << tok;
  }
}

TEST(Synth, DeterministicPerSeed) {
  TempDir tmp;
  run(tmp.str("a.gguf"), Mix::Q4, 3, false);
  run(tmp.str("b.gguf"), Mix::Q4, 3, false);
  run(tmp.str("c.gguf"), Mix::Q4, 4, false);
  const auto a = test::slurp(tmp.path / "a.gguf"), b = test::slurp(tmp.path / "b.gguf"), c = test::slurp(tmp.path / "c.gguf");
  EXPECT_TRUE(a == b);
  EXPECT_FALSE(a == c);
  auto f = GgufFile::open(tmp.str("a.gguf"));
  EXPECT_EQ(f->get_tensor("blk.1.ffn_down_exps.weight").type, uint32_t(QType::Q4_K));
}

TEST(Synth, SparseExpertsAreHoles) {
  TempDir tmp;
  const auto rep = run(tmp.str("s.gguf"), Mix::Q2, 1, true);
  EXPECT_GT(rep.hole_bytes, 0u);
  auto f = GgufFile::open(tmp.str("s.gguf"));
  for (const auto& t : f->tensors()) {
    if (t.name.find("_exps.weight") == std::string::npos) continue;
    bool zero = true;
    for (uint64_t i = 0; i < t.n_bytes && zero; ++i) zero = t.data[i] == 0;
    EXPECT_TRUE(zero) << t.name;
  }
  EXPECT_FALSE(rms_of(f->get_tensor("blk.1.attn_q_b.weight")) == 0.0);
}

}  // namespace
}  // namespace dsv4
