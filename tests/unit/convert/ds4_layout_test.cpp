// `dsv4 synth --shape flash` must write files antirez/ds4 accepts. ds4 checks a Flash GGUF strictly: every
// metadata key with one exact GGUF value type and the Flash value, every tensor with one exact type, rank and
// shape, and seven special tokens by text. The tables below are written by hand from model-spec §13.2/§13.3
// (ds4's published layout), not taken from the code under test, and are compared with what synth declares:
// the tensor table synth_model() writes (all_tensor_specs + mix_tensor_type) and the metadata header it
// writes (ModelConfig::write_gguf_metadata + write_tokenizer_metadata), read back from a real GGUF file.
// docs/ds4-compat.md records the run of ds4 itself on the full 81 GB file.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <set>

#include "convert/mix.h"
#include "convert/synth.h"
#include "gguf/gguf.h"
#include "model/names.h"
#include "quant/quant.h"
#include "st_util.h"

namespace dsv4 {
namespace {

using test::TempDir;

struct Want {
  QType type;
  std::vector<int64_t> ne;  // its size is the rank ds4 requires
};

constexpr int64_t kEmbd = 4096, kVocab = 129280, kHc = 4, kHcDim = kEmbd * kHc, kHcMix = 2 * kHc + kHc * kHc;
constexpr int64_t kHeads = 64, kHeadDim = 512, kLoraQ = 1024, kLoraO = 1024, kGroups = 8;
constexpr int64_t kExperts = 256, kFf = 2048, kIdxHeads = 64, kIdxDim = 128;
constexpr int kLayers = 43, kHashLayers = 3;

// model-spec §1.2: layers 0 and 1 sliding only; then ratio 4 (CSA) on even and 128 (HCA) on odd layers.
int ratio_of(int il) {
  return il < 2 ? 0 : (il % 2 == 0 ? 4 : 128);
}

// The expected tensor table of a Flash file with the given routed-expert types (model-spec §13.3).
std::map<std::string, Want> ds4_table(QType gate_up, QType down) {
  std::map<std::string, Want> t;
  t["token_embd.weight"] = {QType::F16, {kEmbd, kVocab}};
  t["output_norm.weight"] = {QType::F32, {kEmbd}};
  t["output.weight"] = {QType::Q8_0, {kEmbd, kVocab}};
  t["output_hc_fn.weight"] = {QType::F16, {kHcDim, kHc}};
  t["output_hc_base.weight"] = {QType::F32, {kHc}};
  t["output_hc_scale.weight"] = {QType::F32, {1}};
  for (int il = 0; il < kLayers; ++il) {
    const std::string b = "blk." + std::to_string(il) + ".";
    auto put = [&](const std::string& n, QType ty, std::vector<int64_t> ne) {
      t[b + n] = {ty, std::move(ne)};
    };
    put("hc_attn_fn.weight", QType::F16, {kHcDim, kHcMix});
    put("hc_attn_scale.weight", QType::F32, {3});
    put("hc_attn_base.weight", QType::F32, {kHcMix});
    put("attn_norm.weight", QType::F32, {kEmbd});
    put("attn_q_a.weight", QType::Q8_0, {kEmbd, kLoraQ});
    put("attn_q_a_norm.weight", QType::F32, {kLoraQ});
    put("attn_q_b.weight", QType::Q8_0, {kLoraQ, kHeads * kHeadDim});
    put("attn_kv.weight", QType::Q8_0, {kEmbd, kHeadDim});
    put("attn_kv_a_norm.weight", QType::F32, {kHeadDim});
    put("attn_sinks.weight", QType::F32, {kHeads});
    put("attn_output_a.weight", QType::Q8_0, {kHeadDim * (kHeads / kGroups), kGroups * kLoraO});
    put("attn_output_b.weight", QType::Q8_0, {kGroups * kLoraO, kEmbd});
    const int m = ratio_of(il);
    if (m != 0) {
      const int64_t width = (m == 4 ? 2 : 1) * kHeadDim;  // overlapping windows double the CSA width
      put("attn_compressor_ape.weight", QType::F16, {width, m});
      put("attn_compressor_kv.weight", QType::F16, {kEmbd, width});
      put("attn_compressor_gate.weight", QType::F16, {kEmbd, width});
      put("attn_compressor_norm.weight", QType::F32, {kHeadDim});
    }
    if (m == 4) {
      put("indexer.attn_q_b.weight", QType::F16, {kLoraQ, kIdxHeads * kIdxDim});
      put("indexer.proj.weight", QType::F16, {kEmbd, kIdxHeads});
      put("indexer_compressor_ape.weight", QType::F16, {2 * kIdxDim, 4});
      put("indexer_compressor_kv.weight", QType::F16, {kEmbd, 2 * kIdxDim});
      put("indexer_compressor_gate.weight", QType::F16, {kEmbd, 2 * kIdxDim});
      put("indexer_compressor_norm.weight", QType::F32, {kIdxDim});
    }
    put("hc_ffn_fn.weight", QType::F16, {kHcDim, kHcMix});
    put("hc_ffn_scale.weight", QType::F32, {3});
    put("hc_ffn_base.weight", QType::F32, {kHcMix});
    put("ffn_norm.weight", QType::F32, {kEmbd});
    put("ffn_gate_inp.weight", QType::F16, {kEmbd, kExperts});
    if (il < kHashLayers)
      put("ffn_gate_tid2eid.weight", QType::I32, {6, kVocab});
    else
      put("exp_probs_b.bias", QType::F32, {kExperts});  // optional for ds4; present in its files
    put("ffn_gate_exps.weight", gate_up, {kEmbd, kFf, kExperts});
    put("ffn_up_exps.weight", gate_up, {kEmbd, kFf, kExperts});
    put("ffn_down_exps.weight", down, {kFf, kEmbd, kExperts});
    put("ffn_gate_shexp.weight", QType::Q8_0, {kEmbd, kFf});
    put("ffn_up_shexp.weight", QType::Q8_0, {kEmbd, kFf});
    put("ffn_down_shexp.weight", QType::Q8_0, {kFf, kEmbd});
  }
  return t;
}

void expect_table(Mix mix, QType gate_up, QType down) {
  const auto want = ds4_table(gate_up, down);
  const auto specs = all_tensor_specs(synth_config("flash"));
  std::set<std::string> seen;
  for (const auto& s : specs) {
    ASSERT_TRUE(seen.insert(s.name).second) << "duplicate tensor " << s.name;
    auto it = want.find(s.name);
    ASSERT_NE(it, want.end()) << "synth declares a tensor ds4's layout does not have: " << s.name;
    EXPECT_EQ(mix_tensor_type(s, mix), it->second.type) << s.name;
    EXPECT_EQ(s.ne, it->second.ne) << s.name << " (rank and dims)";
  }
  for (const auto& [name, w] : want) EXPECT_TRUE(seen.count(name)) << "synth leaves out " << name;
  // 6 global tensors; per layer 12 attention + 8 FFN + 3 experts + 1 routing table or bias, plus 4 compressor
  // tensors on the 41 compressed layers and 6 indexer tensors on the 21 ratio-4 layers.
  EXPECT_EQ(specs.size(), size_t(6 + 43 * 24 + 41 * 4 + 21 * 6));
}

TEST(Ds4Layout, FlashQ2TensorTable) {
  expect_table(Mix::Q2, QType::IQ2_XXS, QType::Q2_K);
}
TEST(Ds4Layout, FlashIq2TensorTable) {  // the 80 GB-card mix: every routed expert IQ2_XXS
  expect_table(Mix::IQ2, QType::IQ2_XXS, QType::IQ2_XXS);
}
TEST(Ds4Layout, FlashQ4TensorTable) {
  expect_table(Mix::Q4, QType::Q4_K, QType::Q4_K);
}

// ds4 reads integer keys as GGUF u32 only (an i32 or u64 would read as "missing"), a few as u64 or u32, the
// floats as f32 (f64/u32/i32 also taken), booleans as bool, and two arrays of at least 43 entries.
TEST(Ds4Layout, FlashMetadataTypesAndValues) {
  TempDir tmp;
  const std::string path = tmp.str("meta.gguf");
  {
    GgufWriter w(path);
    synth_config("flash").write_gguf_metadata(w);
    write_tokenizer_metadata(w, int(kVocab));
    w.begin_data();
    w.finish();
  }
  auto f = GgufFile::open(path);
  auto type_of = [&](const std::string& k) {
    const GgufValue* v = f->find(k);
    EXPECT_NE(v, nullptr) << "missing key " << k;
    return v ? v->type() : GgufType::ARRAY;
  };
  const std::pair<const char*, uint32_t> u32s[] = {
      {"block_count", 43},
      {"embedding_length", 4096},
      {"vocab_size", 129280},
      {"attention.head_count", 64},
      {"attention.head_count_kv", 1},
      {"attention.key_length", 512},
      {"attention.value_length", 512},
      {"rope.dimension_count", 64},
      {"attention.q_lora_rank", 1024},
      {"attention.output_lora_rank", 1024},
      {"attention.output_group_count", 8},
      {"attention.sliding_window", 128},
      {"attention.indexer.head_count", 64},
      {"attention.indexer.key_length", 128},
      {"attention.indexer.top_k", 512},
      {"expert_count", 256},
      {"expert_used_count", 6},
      {"expert_feed_forward_length", 2048},
      {"expert_shared_count", 1},
      {"expert_group_count", 0},
      {"expert_group_used_count", 0},
      {"hash_layer_count", 3},
      {"hyper_connection.count", 4},
      {"hyper_connection.sinkhorn_iterations", 20},
  };
  for (const auto& [k, v] : u32s) {
    const std::string key = std::string("deepseek4.") + k;
    ASSERT_EQ(type_of(key), GgufType::UINT32) << key;
    EXPECT_EQ(f->get_u32(key), v) << key;
  }
  // Exact float comparisons: each value is written from a decimal literal and stored as f32, so the read-back
  // must be that same f32 (ds4 itself allows a relative 1e-6).
  const std::pair<const char*, float> f32s[] = {
      {"attention.compress_rope_freq_base", 160000.f},
      {"attention.layer_norm_rms_epsilon", 1e-6f},
      {"expert_weights_scale", 1.5f},
      {"hyper_connection.epsilon", 1e-6f},
      {"rope.freq_base", 10000.f},
      {"rope.scaling.factor", 16.f},
      {"rope.scaling.yarn_beta_fast", 32.f},
      {"rope.scaling.yarn_beta_slow", 1.f},
  };
  for (const auto& [k, v] : f32s) {
    const std::string key = std::string("deepseek4.") + k;
    ASSERT_EQ(type_of(key), GgufType::FLOAT32) << key;
    EXPECT_EQ(f->get_f32(key), v) << key;
  }
  const std::string orig = "deepseek4.rope.scaling.original_context_length";
  const GgufType ot = type_of(orig);
  ASSERT_TRUE(ot == GgufType::UINT64 || ot == GgufType::UINT32) << gguf_type_name(ot);
  EXPECT_EQ(ot == GgufType::UINT64 ? f->get_u64(orig) : f->get_u32(orig), 65536u);
  ASSERT_EQ(type_of("deepseek4.expert_weights_norm"), GgufType::BOOL);
  EXPECT_TRUE(f->get_bool("deepseek4.expert_weights_norm"));

  const std::string ratios = "deepseek4.attention.compress_ratios";
  const GgufType rt = f->get_array_type(ratios);
  ASSERT_TRUE(rt == GgufType::INT32 || rt == GgufType::UINT32) << gguf_type_name(rt);
  ASSERT_GE(f->get_array_size(ratios), 43u);
  const std::vector<int32_t> r = rt == GgufType::INT32 ? f->get_array_i32(ratios) : [&] {
    const auto u = f->get_array_u32(ratios);
    return std::vector<int32_t>(u.begin(), u.end());
  }();
  for (int il = 0; il < kLayers; ++il) EXPECT_EQ(r[size_t(il)], ratio_of(il)) << "layer " << il;
  const std::string clamp = "deepseek4.swiglu_clamp_exp";
  ASSERT_EQ(f->get_array_type(clamp), GgufType::FLOAT32);
  const auto cl = f->get_array_f32(clamp);
  ASSERT_GE(cl.size(), 43u);
  for (int il = 0; il < kLayers; ++il) EXPECT_EQ(cl[size_t(il)], 10.f) << "layer " << il;

  // Tokenizer: string arrays of tokens (the whole vocabulary) and merges, and the seven special tokens ds4
  // looks up by text at load time.
  // ds4 ignores these two, but its published files carry them with these values (io-and-api §1.7).
  EXPECT_EQ(f->get_string("tokenizer.ggml.model"), "gpt2");
  EXPECT_EQ(f->get_string("tokenizer.ggml.pre"), "joyai-llm");
  ASSERT_EQ(f->get_array_type("tokenizer.ggml.tokens"), GgufType::STRING);
  ASSERT_EQ(f->get_array_type("tokenizer.ggml.merges"), GgufType::STRING);
  EXPECT_GT(f->get_array_size("tokenizer.ggml.merges"), 100000u);  // the V3/V4 BPE has ~127k merges
  const auto tokens = f->get_array_string_views("tokenizer.ggml.tokens");
  ASSERT_EQ(tokens.size(), size_t(kVocab));
  EXPECT_EQ(tokens[0], "<｜begin▁of▁sentence｜>");
  EXPECT_EQ(tokens[1], "<｜end▁of▁sentence｜>");
  for (const char* sp : {"<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", "｜DSML｜"})
    EXPECT_NE(std::find(tokens.begin(), tokens.end(), std::string_view(sp)), tokens.end()) << sp;
}

}  // namespace
}  // namespace dsv4
