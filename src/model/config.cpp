#include "model/config.h"

#include "common/error.h"

namespace dsv4 {

ModelConfig ModelConfig::flash() {
  ModelConfig c;
  c.name = "DeepSeek-V4-Flash";
  c.n_layers = 43;
  c.d_model = 4096;
  c.n_vocab = 129280;
  c.n_heads = 64;
  c.head_dim = 512;
  c.rope_dim = 64;
  c.q_lora_rank = 1024;
  c.o_lora_rank = 1024;
  c.o_groups = 8;
  c.sliding_window = 128;
  c.context_length = 1048576;
  c.idx_heads = 64;
  c.idx_head_dim = 128;
  c.idx_topk = 512;
  // model-spec §1.2: layers 0,1 sliding; then CSA on even, HCA on odd layers; last decoder layer (42) is CSA;
  // entry 43 is the MTP block (sliding).
  c.compress_ratios.assign(44, 0);
  for (int il = 2; il < 43; ++il) c.compress_ratios[size_t(il)] = (il % 2 == 0) ? 4 : 128;
  c.n_experts = 256;
  c.n_experts_used = 6;
  c.expert_ff = 2048;
  c.expert_weights_scale = 1.5f;
  c.n_hash_layers = 3;
  c.swiglu_clamp.assign(44, 10.f);
  c.hc_mult = 4;
  c.hc_sinkhorn_iters = 20;
  return c;
}

ModelConfig ModelConfig::pro() {
  ModelConfig c = flash();
  c.name = "DeepSeek-V4-Pro";
  c.n_layers = 61;
  c.d_model = 7168;
  c.n_heads = 128;
  c.q_lora_rank = 1536;
  c.o_groups = 16;
  c.idx_topk = 1024;
  // model-spec §15: [128, 128] + 29 x [4, 128] + [4] + MTP [0]: no sliding-only decoder layers.
  c.compress_ratios = {128, 128};
  for (int i = 0; i < 29; ++i) {
    c.compress_ratios.push_back(4);
    c.compress_ratios.push_back(128);
  }
  c.compress_ratios.push_back(4);
  c.compress_ratios.push_back(0);
  c.n_experts = 384;
  c.expert_ff = 3072;
  c.expert_weights_scale = 2.5f;
  c.swiglu_clamp.assign(62, 10.f);
  return c;
}

void ModelConfig::validate(const std::string& where) const {
  auto positive = [&](const char* what, int64_t v) {
    if (v <= 0) fail("%s: %s must be positive, found %lld", where.c_str(), what, (long long)v);
  };
  positive("block_count", n_layers);
  positive("embedding_length", d_model);
  positive("vocab_size", n_vocab);
  positive("attention.head_count", n_heads);
  positive("attention.key_length", head_dim);
  positive("rope.dimension_count", rope_dim);
  positive("attention.q_lora_rank", q_lora_rank);
  positive("attention.output_lora_rank", o_lora_rank);
  positive("attention.output_group_count", o_groups);
  positive("attention.sliding_window", sliding_window);
  positive("expert_count", n_experts);
  positive("expert_used_count", n_experts_used);
  positive("expert_feed_forward_length", expert_ff);
  positive("hyper_connection.count", hc_mult);
  positive("hyper_connection.sinkhorn_iterations", hc_sinkhorn_iters);
  if (n_kv_heads != 1) fail("%s: attention.head_count_kv must be 1, found %d", where.c_str(), n_kv_heads);
  if (n_shared_experts != 1) fail("%s: expert_shared_count must be 1, found %d", where.c_str(), n_shared_experts);
  if (!expert_weights_norm) fail("%s: expert_weights_norm must be true", where.c_str());
  if (rope_dim > head_dim || rope_dim % 2 != 0)
    fail("%s: rope.dimension_count %d must be even and <= key_length %d", where.c_str(), rope_dim, head_dim);
  if (n_heads % o_groups != 0)
    fail("%s: head_count %d not divisible by output_group_count %d", where.c_str(), n_heads, o_groups);
  if (n_experts_used > n_experts)
    fail("%s: expert_used_count %d > expert_count %d", where.c_str(), n_experts_used, n_experts);
  if (n_hash_layers < 0 || n_hash_layers > n_layers)
    fail("%s: hash_layer_count %d outside [0, %d]", where.c_str(), n_hash_layers, n_layers);
  if (compress_ratios.size() < size_t(n_layers))
    fail("%s: attention.compress_ratios has %zu entries, need >= block_count %d", where.c_str(),
         compress_ratios.size(), n_layers);
  if (swiglu_clamp.size() < size_t(n_layers))
    fail("%s: swiglu_clamp_exp has %zu entries, need >= block_count %d", where.c_str(), swiglu_clamp.size(),
         n_layers);
  bool any_indexer = false;
  for (size_t i = 0; i < compress_ratios.size(); ++i) {
    int m = compress_ratios[i];
    if (m < 0) fail("%s: attention.compress_ratios[%zu] = %d is negative", where.c_str(), i, m);
    if (i < size_t(n_layers) && m == 4) any_indexer = true;
  }
  if (any_indexer) {
    positive("attention.indexer.head_count", idx_heads);
    positive("attention.indexer.key_length", idx_head_dim);
    positive("attention.indexer.top_k", idx_topk);
    if (rope_dim > idx_head_dim)
      fail("%s: rope.dimension_count %d > indexer.key_length %d", where.c_str(), rope_dim, idx_head_dim);
  }
  if (!(rms_eps > 0.f)) fail("%s: attention.layer_norm_rms_epsilon must be > 0", where.c_str());
  if (!(rope_theta > 0.f) || !(compress_rope_theta > 0.f)) fail("%s: rope bases must be > 0", where.c_str());
  if (!(yarn_factor >= 1.f)) fail("%s: rope.scaling.factor must be >= 1, found %g", where.c_str(), yarn_factor);
}

}  // namespace dsv4
