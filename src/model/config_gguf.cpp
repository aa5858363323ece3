// ModelConfig <-> GGUF metadata (model-spec §13.2). The key list here is the contract with ds4's published
// files, our converter and `dsv4 synth`: write_gguf_metadata() writes exactly what from_gguf() reads.
#include "common/error.h"
#include "gguf/gguf.h"
#include "model/config.h"

namespace dsv4 {

namespace {
const std::string P = "deepseek4.";

int as_int(const GgufFile& f, const std::string& key, uint32_t v) {
  if (v > 0x7fffffffu) fail("%s: key '%s': value %u too large", f.path().c_str(), key.c_str(), v);
  return int(v);
}
}  // namespace

ModelConfig ModelConfig::from_gguf(const GgufFile& f) {
  ModelConfig c;
  const std::string& path = f.path();
  if (auto arch = f.get_string_opt("general.architecture"); arch && *arch != "deepseek4")
    fail("%s: key 'general.architecture': expected \"deepseek4\", found \"%s\"", path.c_str(), arch->c_str());
  if (auto name = f.get_string_opt("general.name")) c.name = *name;
  auto u = [&](const char* k) { return as_int(f, P + k, f.get_u32(P + k)); };

  c.n_layers = u("block_count");
  c.context_length = f.get_u64_opt(P + "context_length").value_or(0);
  c.d_model = u("embedding_length");
  c.n_vocab = u("vocab_size");
  c.n_heads = u("attention.head_count");
  c.n_kv_heads = u("attention.head_count_kv");
  c.head_dim = u("attention.key_length");
  int value_length = u("attention.value_length");
  if (value_length != c.head_dim)
    fail("%s: key 'deepseek4.attention.value_length': expected %d (= key_length, K = V), found %d", path.c_str(),
         c.head_dim, value_length);
  c.rope_dim = u("rope.dimension_count");
  c.q_lora_rank = u("attention.q_lora_rank");
  c.o_lora_rank = u("attention.output_lora_rank");
  c.o_groups = u("attention.output_group_count");
  c.sliding_window = u("attention.sliding_window");
  c.idx_heads = u("attention.indexer.head_count");
  c.idx_head_dim = u("attention.indexer.key_length");
  c.idx_topk = u("attention.indexer.top_k");
  c.compress_ratios.clear();
  for (int32_t m : f.get_array_i32(P + "attention.compress_ratios")) c.compress_ratios.push_back(m);
  c.compress_rope_theta = f.get_f32(P + "attention.compress_rope_freq_base");
  c.rms_eps = f.get_f32(P + "attention.layer_norm_rms_epsilon");
  c.n_experts = u("expert_count");
  c.n_experts_used = u("expert_used_count");
  c.expert_ff = u("expert_feed_forward_length");
  c.n_shared_experts = u("expert_shared_count");
  for (const char* k : {"expert_group_count", "expert_group_used_count"}) {
    auto v = f.get_u32_opt(P + k);
    if (v && *v != 0)
      fail("%s: key 'deepseek4.%s': expected 0 (DeepSeek V4 has no expert groups), found %u", path.c_str(), k, *v);
  }
  c.expert_weights_scale = f.get_f32(P + "expert_weights_scale");
  c.expert_weights_norm = f.get_bool(P + "expert_weights_norm");
  c.n_hash_layers = u("hash_layer_count");
  c.swiglu_clamp = f.get_array_f32(P + "swiglu_clamp_exp");
  c.hc_mult = u("hyper_connection.count");
  c.hc_sinkhorn_iters = u("hyper_connection.sinkhorn_iterations");
  c.hc_eps = f.get_f32(P + "hyper_connection.epsilon");
  c.rope_theta = f.get_f32(P + "rope.freq_base");
  c.yarn_factor = f.get_f32(P + "rope.scaling.factor");
  c.yarn_orig_ctx = f.get_u64(P + "rope.scaling.original_context_length");
  c.yarn_beta_fast = f.get_f32(P + "rope.scaling.yarn_beta_fast");
  c.yarn_beta_slow = f.get_f32(P + "rope.scaling.yarn_beta_slow");
  c.validate(path + ": metadata");
  return c;
}

void ModelConfig::write_gguf_metadata(GgufWriter& w) const {
  validate("write_gguf_metadata");
  w.add_string("general.architecture", "deepseek4");
  w.add_string("general.name", name);
  auto u = [&](const char* k, int v) { w.add_u32(P + k, uint32_t(v)); };
  u("block_count", n_layers);
  w.add_u64(P + "context_length", context_length);
  u("embedding_length", d_model);
  u("vocab_size", n_vocab);
  u("attention.head_count", n_heads);
  u("attention.head_count_kv", n_kv_heads);
  u("attention.key_length", head_dim);
  u("attention.value_length", head_dim);
  u("rope.dimension_count", rope_dim);
  u("attention.q_lora_rank", q_lora_rank);
  u("attention.output_lora_rank", o_lora_rank);
  u("attention.output_group_count", o_groups);
  u("attention.sliding_window", sliding_window);
  u("attention.indexer.head_count", idx_heads);
  u("attention.indexer.key_length", idx_head_dim);
  u("attention.indexer.top_k", idx_topk);
  std::vector<int32_t> ratios(compress_ratios.begin(), compress_ratios.end());
  w.add_array_i32(P + "attention.compress_ratios", ratios);
  w.add_f32(P + "attention.compress_rope_freq_base", compress_rope_theta);
  w.add_f32(P + "attention.layer_norm_rms_epsilon", rms_eps);
  u("expert_count", n_experts);
  u("expert_used_count", n_experts_used);
  u("expert_feed_forward_length", expert_ff);
  u("expert_shared_count", n_shared_experts);
  u("expert_group_count", 0);
  u("expert_group_used_count", 0);
  w.add_f32(P + "expert_weights_scale", expert_weights_scale);
  w.add_bool(P + "expert_weights_norm", expert_weights_norm);
  u("hash_layer_count", n_hash_layers);
  w.add_array_f32(P + "swiglu_clamp_exp", swiglu_clamp);
  u("hyper_connection.count", hc_mult);
  u("hyper_connection.sinkhorn_iterations", hc_sinkhorn_iters);
  w.add_f32(P + "hyper_connection.epsilon", hc_eps);
  w.add_f32(P + "rope.freq_base", rope_theta);
  w.add_f32(P + "rope.scaling.factor", yarn_factor);
  w.add_u64(P + "rope.scaling.original_context_length", yarn_orig_ctx);
  w.add_f32(P + "rope.scaling.yarn_beta_fast", yarn_beta_fast);
  w.add_f32(P + "rope.scaling.yarn_beta_slow", yarn_beta_slow);
}

}  // namespace dsv4
