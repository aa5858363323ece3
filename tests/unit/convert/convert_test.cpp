// dsv4 convert on the HF reference fixtures: names, metadata, exact f32 values, expert stacking, quant mixes,
// and the official FP8/FP4 layout.
#include <gtest/gtest.h>

#include <cmath>

#include "common/error.h"
#include "convert/convert.h"
#include "gguf/gguf.h"
#include "model/config.h"
#include "quant/quant.h"
#include "st_util.h"

namespace dsv4 {
namespace {

using test::RawCheckpoint;
using test::TempDir;

struct Expect {
  const char* name;
  std::vector<int> ratios;
  int head_dim, rope_dim, n_heads, o_groups, o_lora, window, experts, used, hash, topk;
  float scale;
};

// Written from the generator's configs (tools/reference/make_fixtures.py), not from the converter.
const Expect kFixtures[] = {
    {"flash_w8", {0, 0, 4, 16, 4, 16, 4}, 64, 16, 4, 2, 16, 8, 8, 2, 3, 4, 1.5f},
    {"mixed_w16", {0, 4, 32, 4}, 32, 16, 4, 2, 16, 16, 6, 3, 1, 6, 1.5f},
    {"pro_w8", {16, 16, 4, 16, 4}, 32, 16, 8, 4, 8, 8, 12, 3, 2, 3, 2.5f},
};

std::vector<float> gguf_f32(const GgufTensorInfo& t) {
  std::vector<float> v(size_t(t.n_elements()));
  std::memcpy(v.data(), t.data, v.size() * 4);
  return v;
}

class FixtureConvert : public ::testing::TestWithParam<Expect> {};

TEST_P(FixtureConvert, F32IsExactWithDs4NamesAndMetadata) {
  const Expect& e = GetParam();
  TempDir tmp;
  ConvertOptions o;
  o.in_dir = test::fixture_dir(e.name).string();
  o.out_path = tmp.str("m.gguf");
  o.mix = Mix::F32;
  convert_checkpoint(o);
  auto f = GgufFile::open(o.out_path);
  const ModelConfig c = ModelConfig::from_gguf(*f);
  EXPECT_EQ(c.compress_ratios, e.ratios);
  EXPECT_EQ(c.n_layers, int(e.ratios.size()));
  EXPECT_EQ(c.d_model, 64);
  EXPECT_EQ(c.n_vocab, 512);
  EXPECT_EQ(c.head_dim, e.head_dim);
  EXPECT_EQ(c.rope_dim, e.rope_dim);
  EXPECT_EQ(c.n_heads, e.n_heads);
  EXPECT_EQ(c.o_groups, e.o_groups);
  EXPECT_EQ(c.o_lora_rank, e.o_lora);
  EXPECT_EQ(c.sliding_window, e.window);
  EXPECT_EQ(c.n_experts, e.experts);
  EXPECT_EQ(c.n_experts_used, e.used);
  EXPECT_EQ(c.n_hash_layers, e.hash);
  EXPECT_EQ(c.idx_topk, e.topk);
  EXPECT_EQ(c.expert_weights_scale, e.scale);
  // YaRN on the compressed layers, as the fixtures' rope_parameters.compress say.
  EXPECT_EQ(c.yarn_factor, 16.f);
  EXPECT_EQ(c.yarn_orig_ctx, 65536u);
  EXPECT_EQ(c.yarn_beta_fast, 32.f);
  EXPECT_EQ(c.yarn_beta_slow, 1.f);
  EXPECT_EQ(c.compress_rope_theta, 160000.f);
  EXPECT_EQ(c.rope_theta, 10000.f);
  EXPECT_EQ(f->get_array_size("tokenizer.ggml.tokens"), 512u);

  // Every value survives exactly: element totals match, and each mapped tensor is bit-identical.
  const RawCheckpoint st = test::read_st_dir(test::fixture_dir(e.name));
  int64_t st_elems = 0, gguf_elems = 0;
  for (const auto& [n, t] : st) {
    int64_t k = 1;
    for (auto d : t.shape) k *= d;
    st_elems += k;
  }
  for (const auto& t : f->tensors()) gguf_elems += t.n_elements();
  EXPECT_EQ(st_elems, gguf_elems);
  const std::pair<const char*, const char*> same[] = {
      {"model.embed_tokens.weight", "token_embd.weight"},
      {"head.weight", "output.weight"},
      {"model.norm.weight", "output_norm.weight"},
      {"model.hc_head.hc_fn", "output_hc_fn.weight"},
      {"model.hc_head.hc_scale", "output_hc_scale.weight"},
      {"model.layers.2.attn.norm.weight", "blk.2.attn_kv_a_norm.weight"},
      {"model.layers.2.attn.q_norm.weight", "blk.2.attn_q_a_norm.weight"},
      {"model.layers.2.attn.compressor.ape", "blk.2.attn_compressor_ape.weight"},
      {"model.layers.2.attn.compressor.norm.weight", "blk.2.attn_compressor_norm.weight"},
      {"model.layers.2.attn.wo_a.weight", "blk.2.attn_output_a.weight"},
      {"model.layers.2.attn.attn_sink", "blk.2.attn_sinks.weight"},
      {"model.layers.2.hc_ffn_fn", "blk.2.hc_ffn_fn.weight"},
      {"model.layers.3.ffn.gate.bias", "blk.3.exp_probs_b.bias"},
      {"model.layers.3.ffn.shared_experts.w2.weight", "blk.3.ffn_down_shexp.weight"},
  };
  for (const auto& [sn, gn] : same) {
    SCOPED_TRACE(sn);
    ASSERT_TRUE(st.count(sn));
    const auto& g = f->get_tensor(gn);
    ASSERT_EQ(g.type, uint32_t(QType::F32));
    EXPECT_EQ(gguf_f32(g), st.at(sn).f32());
    std::vector<int64_t> rev(st.at(sn).shape.rbegin(), st.at(sn).shape.rend());
    EXPECT_EQ(std::vector<int64_t>(g.ne.begin(), g.ne.begin() + g.n_dims), rev);
  }
  // Experts stack along ne[2], expert e contiguous.
  const auto& down = f->get_tensor("blk.3.ffn_down_exps.weight");
  const auto dv = gguf_f32(down);
  const int64_t per = down.ne[0] * down.ne[1];
  for (int x = 0; x < e.experts; ++x) {
    const auto w = st.at("model.layers.3.ffn.experts." + std::to_string(x) + ".w2.weight").f32();
    ASSERT_EQ(int64_t(w.size()), per);
    EXPECT_TRUE(std::equal(w.begin(), w.end(), dv.begin() + x * per)) << "expert " << x;
  }
  // tid2eid: I64 [V, k] -> I32 GGUF [k, V], same row-major order.
  const auto& tid = f->get_tensor("blk.0.ffn_gate_tid2eid.weight");
  ASSERT_EQ(tid.type, uint32_t(QType::I32));
  const auto& raw = st.at("model.layers.0.ffn.gate.tid2eid");
  ASSERT_EQ(raw.dtype, "I64");
  for (int64_t i = 0; i < tid.n_elements(); ++i) {
    int64_t want;
    int32_t got;
    std::memcpy(&want, raw.bytes.data() + 8 * i, 8);
    std::memcpy(&got, tid.data + 4 * i, 4);
    ASSERT_EQ(got, want) << "element " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(All, FixtureConvert, ::testing::ValuesIn(kFixtures),
                         [](const auto& info) { return std::string(info.param.name); });

// Quantized mixes: the tensor classes get ds4's types (with the short-row fallback at these toy widths) and
// the values stay close to the f32 originals.
TEST(ConvertMix, TypesAndValues) {
  const RawCheckpoint st = test::read_st_dir(test::fixture_dir("flash_w8"));
  for (Mix mix : {Mix::F16, Mix::BF16, Mix::Q8_0, Mix::Q2, Mix::Q4}) {
    SCOPED_TRACE(mix_name(mix));
    TempDir tmp;
    ConvertOptions o{test::fixture_dir("flash_w8").string(), tmp.str("m.gguf"), mix, nullptr};
    convert_checkpoint(o);
    auto f = GgufFile::open(o.out_path);
    const bool q = mix != Mix::F16 && mix != Mix::BF16;
    const uint32_t half = uint32_t(mix == Mix::BF16 ? QType::BF16 : QType::F16);
    EXPECT_EQ(f->get_tensor("blk.2.attn_norm.weight").type, uint32_t(QType::F32));
    EXPECT_EQ(f->get_tensor("blk.2.attn_sinks.weight").type, uint32_t(QType::F32));
    EXPECT_EQ(f->get_tensor("blk.0.ffn_gate_tid2eid.weight").type, uint32_t(QType::I32));
    EXPECT_EQ(f->get_tensor("token_embd.weight").type, q ? uint32_t(QType::F16) : half);
    EXPECT_EQ(f->get_tensor("blk.2.hc_attn_fn.weight").type, q ? uint32_t(QType::F16) : half);
    EXPECT_EQ(f->get_tensor("blk.2.attn_compressor_ape.weight").type, q ? uint32_t(QType::F16) : half);
    EXPECT_EQ(f->get_tensor("output.weight").type, q ? uint32_t(QType::Q8_0) : half);
    EXPECT_EQ(f->get_tensor("blk.2.attn_q_a.weight").type, q ? uint32_t(QType::Q8_0) : half);
    // Routed gate/up rows are 64 wide: too short for a 256-value super-block, so Q8_0; down rows are 16 wide:
    // too short for Q8_0 too, so F16 (the documented fallback).
    EXPECT_EQ(f->get_tensor("blk.3.ffn_gate_exps.weight").type, q ? uint32_t(QType::Q8_0) : half);
    EXPECT_EQ(f->get_tensor("blk.3.ffn_down_exps.weight").type, q ? uint32_t(QType::F16) : half);
    // Values: Q8_0 keeps ~8 bits per value, F16/BF16 at least 8 mantissa bits: relative L2 error < 1%.
    const auto& out = f->get_tensor("output.weight");
    std::vector<float> deq(size_t(out.n_elements()));
    dequantize_row(QType(out.type), out.data, deq.data(), out.n_elements());
    const auto ref = st.at("head.weight").f32();
    double num = 0, den = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
      num += (deq[i] - ref[i]) * double(deq[i] - ref[i]);
      den += double(ref[i]) * ref[i];
    }
    EXPECT_LT(std::sqrt(num / den), 1e-2);
  }
}

TEST(ConvertNames, CanonicalAndGguf) {
  EXPECT_EQ(canonical_tensor_name("model.embed_tokens.weight"), "embed.weight");
  EXPECT_EQ(canonical_tensor_name("model.layers.7.attn.norm.weight"), "layers.7.attn.kv_norm.weight");
  EXPECT_EQ(canonical_tensor_name("model.layers.7.attn.compressor.norm.weight"), "layers.7.attn.compressor.norm.weight");
  EXPECT_EQ(canonical_tensor_name("layers.1.attn.wq_a.weight_scale_inv"), "layers.1.attn.wq_a.scale");
  EXPECT_EQ(canonical_tensor_name("model.hc_head.hc_base"), "hc_head_base");
  std::string g;
  int e;
  ASSERT_TRUE(gguf_name_for("layers.12.ffn.experts.255.w3.weight", &g, &e));
  EXPECT_EQ(g, "blk.12.ffn_up_exps.weight");
  EXPECT_EQ(e, 255);
  ASSERT_TRUE(gguf_name_for("layers.2.attn.indexer.compressor.ape", &g, &e));
  EXPECT_EQ(g, "blk.2.indexer_compressor_ape.weight");
  EXPECT_EQ(e, -1);
  EXPECT_FALSE(gguf_name_for("layers.2.attn.bogus.weight", &g, &e));
  EXPECT_FALSE(gguf_name_for("layers.x.attn.wq_a.weight", &g, &e));
}

}  // namespace
}  // namespace dsv4
