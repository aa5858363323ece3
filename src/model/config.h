// ModelConfig: every hyperparameter of DeepSeek V4 (model-spec §1), read from / written to GGUF metadata with
// exactly the `deepseek4.*` keys of model-spec §13.2, so ds4's published files, our converter and `dsv4 synth`
// all agree. Shape-generic: Flash, Pro and tiny test configs differ only in these numbers.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace dsv4 {

class GgufFile;
class GgufWriter;

// Attention kind of one layer, derived from its compress ratio m (model-spec §1.2, §15):
//   m == 0 -> Sliding (window only, plain RoPE theta=rope_theta)
//   m == 4 -> Csa (overlapping compressor c=2 + lightning indexer, compressed RoPE with YaRN)
//   m  > 0, m != 4 -> Hca (non-overlapping compressor c=1, all rows visible, compressed RoPE with YaRN)
enum class LayerKind { Sliding, Csa, Hca };

struct ModelConfig {
  std::string name = "deepseek4";  // general.name (display only)

  // --- shape -------------------------------------------------------------------------------------------
  int n_layers = 0;         // decoder layers, MTP excluded                  deepseek4.block_count
  int d_model = 0;          // D                                             deepseek4.embedding_length
  int n_vocab = 0;          // V                                             deepseek4.vocab_size
  int n_heads = 0;          // H                                             deepseek4.attention.head_count
  int n_kv_heads = 1;       // must be 1 (single shared K=V head)            deepseek4.attention.head_count_kv
  int head_dim = 0;         // dh (key_length == value_length)              deepseek4.attention.key_length
  int rope_dim = 0;         // dr, last dr dims of each head rotate          deepseek4.rope.dimension_count
  int q_lora_rank = 0;      // rq                                            deepseek4.attention.q_lora_rank
  int o_lora_rank = 0;      // ro (per group)                                deepseek4.attention.output_lora_rank
  int o_groups = 0;         // G                                             deepseek4.attention.output_group_count
  int sliding_window = 0;   // W (raw rows incl. the current token)          deepseek4.attention.sliding_window
  uint64_t context_length = 0;  // display only                              deepseek4.context_length

  // --- lightning indexer (CSA layers) ---------------------------------------------------------------------
  int idx_heads = 0;        // HI                                            deepseek4.attention.indexer.head_count
  int idx_head_dim = 0;     // dI                                            deepseek4.attention.indexer.key_length
  int idx_topk = 0;         // KI                                            deepseek4.attention.indexer.top_k

  // Per layer compress ratio; entries beyond n_layers describe MTP layers (model-spec §16.4).
  std::vector<int> compress_ratios;  //                                      deepseek4.attention.compress_ratios

  // --- RoPE -----------------------------------------------------------------------------------------------
  float rope_theta = 10000.f;             // sliding layers, no YaRN        deepseek4.rope.freq_base
  float compress_rope_theta = 160000.f;   // compressed layers, with YaRN   deepseek4.attention.compress_rope_freq_base
  float yarn_factor = 16.f;               //                                deepseek4.rope.scaling.factor
  uint64_t yarn_orig_ctx = 65536;         //                                deepseek4.rope.scaling.original_context_length
  float yarn_beta_fast = 32.f;            //                                deepseek4.rope.scaling.yarn_beta_fast
  float yarn_beta_slow = 1.f;             //                                deepseek4.rope.scaling.yarn_beta_slow

  float rms_eps = 1e-6f;                  //                                deepseek4.attention.layer_norm_rms_epsilon

  // --- MoE ------------------------------------------------------------------------------------------------
  int n_experts = 0;                // E                                     deepseek4.expert_count
  int n_experts_used = 0;           // k                                     deepseek4.expert_used_count
  int expert_ff = 0;                // F (routed and shared width)           deepseek4.expert_feed_forward_length
  int n_shared_experts = 1;         // must be 1                             deepseek4.expert_shared_count
  float expert_weights_scale = 1.5f;  // routed_scaling_factor               deepseek4.expert_weights_scale
  bool expert_weights_norm = true;  // must be true                          deepseek4.expert_weights_norm
  int n_hash_layers = 0;            // layers < this route via tid2eid       deepseek4.hash_layer_count
  std::vector<float> swiglu_clamp;  // per layer (>= n_layers entries)       deepseek4.swiglu_clamp_exp

  // --- hyper-connections ------------------------------------------------------------------------------------
  int hc_mult = 0;                  // n streams                             deepseek4.hyper_connection.count
  int hc_sinkhorn_iters = 0;        //                                       deepseek4.hyper_connection.sinkhorn_iterations
  float hc_eps = 1e-6f;             //                                       deepseek4.hyper_connection.epsilon

  // --- presets ----------------------------------------------------------------------------------------------
  static ModelConfig flash();  // DeepSeek-V4-Flash (model-spec §1.1), 44 compress ratios (43 + MTP)
  static ModelConfig pro();    // DeepSeek-V4-Pro, 62 compress ratios (61 + MTP)

  // Reads and validates every key of model-spec §13.2. Throws dsv4::Error naming the file and key.
  static ModelConfig from_gguf(const GgufFile& f);
  // Writes exactly the keys from_gguf reads (plus general.architecture/name). from_gguf(write(c)) == c.
  void write_gguf_metadata(GgufWriter& w) const;
  // Internal consistency (positive sizes, divisibility, array lengths); `where` prefixes error messages.
  void validate(const std::string& where) const;

  // --- derived quantities -----------------------------------------------------------------------------------
  int ratio(int layer) const { return compress_ratios.at(size_t(layer)); }
  LayerKind kind(int layer) const {
    int m = ratio(layer);
    return m == 0 ? LayerKind::Sliding : (m == 4 ? LayerKind::Csa : LayerKind::Hca);
  }
  bool has_compressor(int layer) const { return ratio(layer) > 0; }
  bool has_indexer(int layer) const { return ratio(layer) == 4; }
  // Overlapping compressor (c = 2) iff m == 4 (the reference ties overlap to ratio 4, model-spec §15).
  int compress_overlap(int layer) const { return ratio(layer) == 4 ? 2 : 1; }
  bool is_hash_layer(int layer) const { return layer < n_hash_layers; }
  int n_mtp_layers() const { return int(compress_ratios.size()) - n_layers; }
  int mix_hc() const { return (2 + hc_mult) * hc_mult; }  // HC control width, 24 for n=4
  int64_t hc_dim() const { return int64_t(hc_mult) * d_model; }
  int64_t q_dim() const { return int64_t(n_heads) * head_dim; }
  int heads_per_group() const { return n_heads / o_groups; }
  int nope_dim() const { return head_dim - rope_dim; }

  bool operator==(const ModelConfig&) const = default;
};

}  // namespace dsv4
