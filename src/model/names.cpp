#include "model/names.h"

#include "common/error.h"

namespace dsv4 {

std::string layer_tensor_name(int layer, const std::string& suffix) {
  return "blk." + std::to_string(layer) + "." + suffix;
}

std::vector<TensorSpec> global_tensor_specs(const ModelConfig& c) {
  const int64_t D = c.d_model, V = c.n_vocab, n = c.hc_mult;
  return {
      {"token_embd.weight", {D, V}, TensorClass::Dense, false},
      {"output_norm.weight", {D}, TensorClass::Vector, false},
      {"output.weight", {D, V}, TensorClass::Projection, false},
      {"output_hc_fn.weight", {n * D, n}, TensorClass::Dense, false},
      {"output_hc_base.weight", {n}, TensorClass::Vector, false},
      {"output_hc_scale.weight", {1}, TensorClass::Vector, false},
  };
}

std::vector<TensorSpec> layer_tensor_specs(const ModelConfig& c, int il) {
  if (il < 0 || il >= c.n_layers) fail("layer_tensor_specs: layer %d out of range [0, %d)", il, c.n_layers);
  const int64_t D = c.d_model, n = c.hc_mult, mix = c.mix_hc(), rq = c.q_lora_rank, dh = c.head_dim;
  const int64_t H = c.n_heads, G = c.o_groups, ro = c.o_lora_rank, E = c.n_experts, F = c.expert_ff;
  auto L = [il](const char* s) { return layer_tensor_name(il, s); };
  std::vector<TensorSpec> t = {
      {L("hc_attn_fn.weight"), {n * D, mix}, TensorClass::Dense, false},
      {L("hc_attn_base.weight"), {mix}, TensorClass::Vector, false},
      {L("hc_attn_scale.weight"), {3}, TensorClass::Vector, false},
      {L("attn_norm.weight"), {D}, TensorClass::Vector, false},
      {L("attn_q_a.weight"), {D, rq}, TensorClass::Projection, false},
      {L("attn_q_a_norm.weight"), {rq}, TensorClass::Vector, false},
      {L("attn_q_b.weight"), {rq, H * dh}, TensorClass::Projection, false},
      {L("attn_kv.weight"), {D, dh}, TensorClass::Projection, false},
      {L("attn_kv_a_norm.weight"), {dh}, TensorClass::Vector, false},
      {L("attn_sinks.weight"), {H}, TensorClass::Vector, false},
      {L("attn_output_a.weight"), {(H / G) * dh, G * ro}, TensorClass::Projection, false},
      {L("attn_output_b.weight"), {G * ro, D}, TensorClass::Projection, false},
  };
  const int m = c.ratio(il);
  if (m > 0) {
    const int64_t cw = int64_t(c.compress_overlap(il)) * dh;
    t.push_back({L("attn_compressor_ape.weight"), {cw, m}, TensorClass::Ape, false});
    t.push_back({L("attn_compressor_kv.weight"), {D, cw}, TensorClass::Dense, false});
    t.push_back({L("attn_compressor_gate.weight"), {D, cw}, TensorClass::Dense, false});
    t.push_back({L("attn_compressor_norm.weight"), {dh}, TensorClass::Vector, false});
  }
  if (c.has_indexer(il)) {
    const int64_t HI = c.idx_heads, dI = c.idx_head_dim, cw = 2 * dI;
    t.push_back({L("indexer.attn_q_b.weight"), {rq, HI * dI}, TensorClass::Dense, false});
    t.push_back({L("indexer.proj.weight"), {D, HI}, TensorClass::Dense, false});
    t.push_back({L("indexer_compressor_ape.weight"), {cw, m}, TensorClass::Ape, false});
    t.push_back({L("indexer_compressor_kv.weight"), {D, cw}, TensorClass::Dense, false});
    t.push_back({L("indexer_compressor_gate.weight"), {D, cw}, TensorClass::Dense, false});
    t.push_back({L("indexer_compressor_norm.weight"), {dI}, TensorClass::Vector, false});
  }
  t.push_back({L("hc_ffn_fn.weight"), {n * D, mix}, TensorClass::Dense, false});
  t.push_back({L("hc_ffn_base.weight"), {mix}, TensorClass::Vector, false});
  t.push_back({L("hc_ffn_scale.weight"), {3}, TensorClass::Vector, false});
  t.push_back({L("ffn_norm.weight"), {D}, TensorClass::Vector, false});
  t.push_back({L("ffn_gate_inp.weight"), {D, E}, TensorClass::Dense, false});
  if (c.is_hash_layer(il)) {
    t.push_back({L("ffn_gate_tid2eid.weight"), {c.n_experts_used, c.n_vocab}, TensorClass::Index, false});
  } else {
    // ds4 treats the selection bias as optional per layer (model-spec §13.3); absent means zero bias.
    t.push_back({L("exp_probs_b.bias"), {E}, TensorClass::Vector, true});
  }
  t.push_back({L("ffn_gate_exps.weight"), {D, F, E}, TensorClass::Expert, false});
  t.push_back({L("ffn_up_exps.weight"), {D, F, E}, TensorClass::Expert, false});
  t.push_back({L("ffn_down_exps.weight"), {F, D, E}, TensorClass::Expert, false});
  t.push_back({L("ffn_gate_shexp.weight"), {D, F}, TensorClass::Projection, false});
  t.push_back({L("ffn_up_shexp.weight"), {D, F}, TensorClass::Projection, false});
  t.push_back({L("ffn_down_shexp.weight"), {F, D}, TensorClass::Projection, false});
  return t;
}

std::vector<TensorSpec> all_tensor_specs(const ModelConfig& c) {
  std::vector<TensorSpec> all = global_tensor_specs(c);
  for (int il = 0; il < c.n_layers; ++il) {
    auto l = layer_tensor_specs(c, il);
    all.insert(all.end(), std::make_move_iterator(l.begin()), std::make_move_iterator(l.end()));
  }
  return all;
}

std::string shape_str(const int64_t* ne, int n_dims) {
  std::string s = "[";
  for (int i = 0; i < n_dims; ++i) s += (i ? ", " : "") + std::to_string(ne[i]);
  return s + "]";
}

std::string shape_str(const std::vector<int64_t>& ne) { return shape_str(ne.data(), int(ne.size())); }

const char* tensor_class_name(TensorClass c) {
  switch (c) {
    case TensorClass::Vector: return "vector (F32/F16/BF16)";
    case TensorClass::Dense: return "dense matrix (F32/F16/BF16)";
    case TensorClass::Projection: return "projection matrix";
    case TensorClass::Expert: return "expert stack";
    case TensorClass::Ape: return "position bias (F32/F16/BF16)";
    case TensorClass::Index: return "I32 index table";
  }
  return "?";
}

}  // namespace dsv4
