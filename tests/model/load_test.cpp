// Config metadata round trips and precise load errors for bad files (missing tensor, wrong shape, wrong type,
// wrong metadata).
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <string>

#include "dsv4/engine.h"
#include "gguf/gguf.h"
#include "model/model.h"
#include "tiny_model.h"

using namespace dsv4;

namespace {

std::string tmp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("dsv4_load_test_" + std::to_string(::getpid()) + "_" + name))
      .string();
}

// Loads `path` and returns the error message ("" if it loaded).
std::string load_error(const std::string& path) {
  try {
    Model::load(path);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

std::string error_for(const test::TinyOptions& o, const ModelConfig& c = test::tiny_config()) {
  std::string p = tmp_path("bad.gguf");
  test::write_tiny_model(p, c, o);
  std::string msg = load_error(p);
  std::remove(p.c_str());
  return msg;
}

// The metadata keys of model-spec §13.2, written by hand (independently of ModelConfig::write_gguf_metadata)
// for the tiny config; `skip` leaves one key out, `as_f32` writes that key as f32 instead of u32.
void handwritten_metadata(GgufWriter& w, const ModelConfig& c, const std::string& skip, const std::string& as_f32) {
  auto u = [&](const std::string& k, uint32_t v) {
    if (k == skip) return;
    if (k == as_f32) w.add_f32(k, float(v));
    else w.add_u32(k, v);
  };
  auto f = [&](const std::string& k, float v) {
    if (k != skip) w.add_f32(k, v);
  };
  w.add_string("general.architecture", "deepseek4");
  u("deepseek4.block_count", 4);
  u("deepseek4.embedding_length", 64);
  u("deepseek4.vocab_size", 96);
  u("deepseek4.attention.head_count", 4);
  u("deepseek4.attention.head_count_kv", 1);
  u("deepseek4.attention.key_length", 64);
  u("deepseek4.attention.value_length", 64);
  u("deepseek4.rope.dimension_count", 16);
  u("deepseek4.attention.q_lora_rank", 32);
  u("deepseek4.attention.output_lora_rank", 16);
  u("deepseek4.attention.output_group_count", 2);
  u("deepseek4.attention.sliding_window", 8);
  u("deepseek4.attention.indexer.head_count", 4);
  u("deepseek4.attention.indexer.key_length", 32);
  u("deepseek4.attention.indexer.top_k", 3);
  if (skip != "deepseek4.attention.compress_ratios") {
    std::vector<int32_t> r = {0, 4, 8, 4, 0};
    w.add_array_i32("deepseek4.attention.compress_ratios", r);
  }
  f("deepseek4.attention.compress_rope_freq_base", 160000.f);
  f("deepseek4.attention.layer_norm_rms_epsilon", 1e-6f);
  u("deepseek4.expert_count", 8);
  u("deepseek4.expert_used_count", 2);
  u("deepseek4.expert_feed_forward_length", 16);
  u("deepseek4.expert_shared_count", 1);
  f("deepseek4.expert_weights_scale", 1.5f);
  w.add_bool("deepseek4.expert_weights_norm", true);
  u("deepseek4.hash_layer_count", 2);
  std::vector<float> clamp(5, 10.f);
  w.add_array_f32("deepseek4.swiglu_clamp_exp", clamp);
  u("deepseek4.hyper_connection.count", 4);
  u("deepseek4.hyper_connection.sinkhorn_iterations", 20);
  f("deepseek4.hyper_connection.epsilon", 1e-6f);
  f("deepseek4.rope.freq_base", 10000.f);
  f("deepseek4.rope.scaling.factor", 16.f);
  if (skip != "deepseek4.rope.scaling.original_context_length")
    w.add_u64("deepseek4.rope.scaling.original_context_length", 65536);
  f("deepseek4.rope.scaling.yarn_beta_fast", 32.f);
  f("deepseek4.rope.scaling.yarn_beta_slow", 1.f);
  (void)c;
}

ModelConfig round_trip(const ModelConfig& c) {
  std::string p = tmp_path("meta.gguf");
  {
    GgufWriter w(p);
    c.write_gguf_metadata(w);
    w.begin_data();
    w.finish();
  }
  auto f = GgufFile::open(p);
  ModelConfig r = ModelConfig::from_gguf(*f);
  std::remove(p.c_str());
  return r;
}

}  // namespace

TEST(Config, MetadataRoundTripsForPresets) {
  EXPECT_EQ(round_trip(ModelConfig::flash()), ModelConfig::flash());
  EXPECT_EQ(round_trip(ModelConfig::pro()), ModelConfig::pro());
  EXPECT_EQ(round_trip(test::tiny_config()), test::tiny_config());
}

TEST(Config, FlashScheduleMatchesSpec) {
  // model-spec §1.2: layers 0,1 sliding; even 2..42 CSA (21); odd 3..41 HCA (20); index 43 MTP = 0.
  ModelConfig c = ModelConfig::flash();
  ASSERT_EQ(c.compress_ratios.size(), 44u);
  int csa = 0, hca = 0;
  for (int il = 0; il < 43; ++il) {
    csa += c.kind(il) == LayerKind::Csa;
    hca += c.kind(il) == LayerKind::Hca;
  }
  EXPECT_EQ(csa, 21);
  EXPECT_EQ(hca, 20);
  EXPECT_EQ(c.kind(0), LayerKind::Sliding);
  EXPECT_EQ(c.ratio(42), 4);
  EXPECT_EQ(c.n_mtp_layers(), 1);
  EXPECT_EQ(c.mix_hc(), 24);
  // Pro: no sliding decoder layers, 30 CSA + 31 HCA.
  ModelConfig p = ModelConfig::pro();
  csa = hca = 0;
  for (int il = 0; il < 61; ++il) {
    csa += p.kind(il) == LayerKind::Csa;
    hca += p.kind(il) == LayerKind::Hca;
  }
  EXPECT_EQ(csa, 30);
  EXPECT_EQ(hca, 31);
}

TEST(Config, HandwrittenSpecKeysLoad) {
  // A file whose metadata is written from the spec's key table (not by our writer) loads as the tiny config.
  test::TinyOptions o;
  o.metadata = [](GgufWriter& w, const ModelConfig& c) { handwritten_metadata(w, c, "", ""); };
  std::string p = tmp_path("hand.gguf");
  test::write_tiny_model(p, test::tiny_config(), o);
  auto m = Model::load(p);
  ModelConfig expect = test::tiny_config();
  expect.name = "deepseek4";  // no general.name written
  expect.context_length = 0;  // display-only key not written
  EXPECT_EQ(m->config(), expect);
  std::remove(p.c_str());
}

TEST(LoadErrors, MissingMetadataKey) {
  test::TinyOptions o;
  o.metadata = [](GgufWriter& w, const ModelConfig& c) {
    handwritten_metadata(w, c, "deepseek4.attention.indexer.top_k", "");
  };
  std::string msg = error_for(o);
  EXPECT_NE(msg.find("deepseek4.attention.indexer.top_k"), std::string::npos) << msg;
}

TEST(LoadErrors, WrongMetadataType) {
  test::TinyOptions o;
  o.metadata = [](GgufWriter& w, const ModelConfig& c) {
    handwritten_metadata(w, c, "", "deepseek4.expert_count");
  };
  std::string msg = error_for(o);
  EXPECT_NE(msg.find("deepseek4.expert_count"), std::string::npos) << msg;
  EXPECT_NE(msg.find("f32"), std::string::npos) << msg;
}

TEST(LoadErrors, InconsistentMetadata) {
  test::TinyOptions o;
  o.metadata = [](GgufWriter& w, const ModelConfig& c) {
    handwritten_metadata(w, c, "deepseek4.attention.compress_ratios", "");
    std::vector<int32_t> r = {0, 4};  // fewer entries than block_count
    w.add_array_i32("deepseek4.attention.compress_ratios", r);
  };
  std::string msg = error_for(o);
  EXPECT_NE(msg.find("compress_ratios has 2 entries"), std::string::npos) << msg;
}

TEST(LoadErrors, MissingTensor) {
  test::TinyOptions o;
  o.drop = "blk.2.attn_compressor_kv.weight";
  std::string msg = error_for(o);
  EXPECT_NE(msg.find("missing tensor 'blk.2.attn_compressor_kv.weight'"), std::string::npos) << msg;
}

TEST(LoadErrors, MissingHashTable) {
  test::TinyOptions o;
  o.drop = "blk.1.ffn_gate_tid2eid.weight";
  std::string msg = error_for(o);
  EXPECT_NE(msg.find("missing tensor 'blk.1.ffn_gate_tid2eid.weight'"), std::string::npos) << msg;
}

TEST(LoadErrors, OptionalBiasMayBeAbsent) {
  test::TinyOptions o;
  o.drop = "blk.3.exp_probs_b.bias";
  EXPECT_EQ(error_for(o), "");
}

TEST(LoadErrors, WrongShape) {
  test::TinyOptions o;
  o.reshape = "blk.3.attn_kv.weight";
  std::string msg = error_for(o);
  EXPECT_NE(msg.find("tensor 'blk.3.attn_kv.weight': expected shape [64, 64], found [128, 64]"), std::string::npos)
      << msg;
}

TEST(LoadErrors, WrongTypeVector) {
  test::TinyOptions o;
  o.retype = "blk.0.attn_norm.weight";
  std::string msg = error_for(o);
  EXPECT_NE(msg.find("tensor 'blk.0.attn_norm.weight'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("found type I32"), std::string::npos) << msg;
}

TEST(LoadErrors, WrongTypeIndex) {
  test::TinyOptions o;
  o.retype = "blk.0.ffn_gate_tid2eid.weight";
  std::string msg = error_for(o);
  EXPECT_NE(msg.find("tensor 'blk.0.ffn_gate_tid2eid.weight'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("found type F32"), std::string::npos) << msg;
}

TEST(LoadErrors, MetadataDisagreesWithTensors) {
  // Metadata claims 3 hash layers, the tensors are for 2: layer 2 must carry tid2eid.
  ModelConfig meta = test::tiny_config();
  meta.n_hash_layers = 3;
  test::TinyOptions o;
  o.metadata = [meta](GgufWriter& w, const ModelConfig&) { meta.write_gguf_metadata(w); };
  std::string msg = error_for(o);
  EXPECT_NE(msg.find("missing tensor 'blk.2.ffn_gate_tid2eid.weight'"), std::string::npos) << msg;
}

TEST(LoadErrors, EngineReportsThePath) {
  EngineOptions eo;
  eo.model_path = tmp_path("does_not_exist.gguf");
  try {
    Engine::load(eo);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("does_not_exist.gguf"), std::string::npos) << e.what();
  }
}
