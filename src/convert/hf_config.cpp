#include "convert/hf_config.h"

#include <cmath>
#include <fstream>

#include <nlohmann/json.hpp>

#include "common/error.h"

namespace dsv4 {

namespace {

using json = nlohmann::json;

struct Reader {
  const json& j;
  const std::string& where;

  const json* find(const char* key) const {
    auto it = j.find(key);
    return (it == j.end() || it->is_null()) ? nullptr : &*it;
  }
  int64_t integer(const char* key) const {
    const json* v = find(key);
    if (!v) fail("%s: key '%s' is missing", where.c_str(), key);
    if (!v->is_number_integer()) fail("%s: key '%s' must be an integer, found %s", where.c_str(), key, v->dump().c_str());
    return v->get<int64_t>();
  }
  int64_t integer_or(const char* key, int64_t def) const { return find(key) ? integer(key) : def; }
  double number(const char* key) const {
    const json* v = find(key);
    if (!v) fail("%s: key '%s' is missing", where.c_str(), key);
    if (!v->is_number()) fail("%s: key '%s' must be a number, found %s", where.c_str(), key, v->dump().c_str());
    return v->get<double>();
  }
  double number_or(const char* key, double def) const { return find(key) ? number(key) : def; }
};

int to_int(int64_t v, const char* key, const std::string& where) {
  if (v < 0 || v > (int64_t(1) << 31) - 1) fail("%s: key '%s' = %lld is out of range", where.c_str(), key, (long long)v);
  return int(v);
}

// Per-layer compress ratios: legacy `compress_ratios` (decoder layers + MTP), or layer_types + compress_rates.
std::vector<int> compress_ratios(const Reader& r, int n_layers, int n_mtp) {
  const std::string& where = r.where;
  if (const json* cr = r.find("compress_ratios")) {
    if (!cr->is_array()) fail("%s: key 'compress_ratios' must be an array", where.c_str());
    std::vector<int> out;
    for (const auto& v : *cr) {
      if (!v.is_number_integer() || v.get<int64_t>() < 0)
        fail("%s: key 'compress_ratios' has a bad entry %s", where.c_str(), v.dump().c_str());
      out.push_back(int(v.get<int64_t>()));
    }
    if (int(out.size()) < n_layers)
      fail("%s: key 'compress_ratios' has %zu entries, need >= num_hidden_layers %d", where.c_str(), out.size(),
           n_layers);
    return out;
  }
  const json* lt = r.find("layer_types");
  if (!lt || !lt->is_array())
    fail("%s: neither 'compress_ratios' nor a 'layer_types' array is present", where.c_str());
  if (int(lt->size()) < n_layers)
    fail("%s: key 'layer_types' has %zu entries, need num_hidden_layers %d", where.c_str(), lt->size(), n_layers);
  int64_t csa = 4, hca = 128;
  if (const json* rates = r.find("compress_rates")) {
    if (!rates->is_object()) fail("%s: key 'compress_rates' must be an object", where.c_str());
    Reader rr{*rates, where};
    csa = rr.integer_or("compressed_sparse_attention", csa);
    hca = rr.integer_or("heavily_compressed_attention", hca);
  }
  csa = r.integer_or("compress_rate_csa", csa);
  hca = r.integer_or("compress_rate_hca", hca);
  if (csa != 4)
    fail("%s: compressed_sparse_attention rate %lld: the overlapping compressor and indexer are defined for 4 only",
         where.c_str(), (long long)csa);
  if (hca <= 0 || hca == 4)
    fail("%s: heavily_compressed_attention rate %lld must be > 0 and != 4", where.c_str(), (long long)hca);
  std::vector<int> out;
  for (int i = 0; i < n_layers; ++i) {
    const json& t = (*lt)[size_t(i)];
    const std::string s = t.is_string() ? t.get<std::string>() : "";
    if (s == "sliding_attention") out.push_back(0);
    else if (s == "compressed_sparse_attention") out.push_back(int(csa));
    else if (s == "heavily_compressed_attention") out.push_back(int(hca));
    else fail("%s: layer_types[%d] = %s is not a DeepSeek-V4 attention type", where.c_str(), i, t.dump().c_str());
  }
  for (int i = 0; i < n_mtp; ++i) out.push_back(0);  // MTP blocks are sliding (model-spec §1.2)
  return out;
}

int hash_layers(const Reader& r, int n_layers) {
  if (const json* mt = r.find("mlp_layer_types")) {
    if (!mt->is_array()) fail("%s: key 'mlp_layer_types' must be an array", r.where.c_str());
    int n = 0;
    bool done = false;
    for (size_t i = 0; i < mt->size() && int(i) < n_layers; ++i) {
      const std::string s = (*mt)[i].is_string() ? (*mt)[i].get<std::string>() : "";
      if (s != "hash_moe" && s != "moe")
        fail("%s: mlp_layer_types[%zu] = %s is not hash_moe/moe", r.where.c_str(), i, (*mt)[i].dump().c_str());
      if (s == "hash_moe" && done)
        fail("%s: mlp_layer_types[%zu] is hash_moe after a moe layer: hash layers must be the first ones "
             "(deepseek4.hash_layer_count cannot express this)", r.where.c_str(), i);
      if (s == "hash_moe") ++n;
      else done = true;
    }
    return n;
  }
  return to_int(r.integer_or("num_hash_layers", 3), "num_hash_layers", r.where);
}

// YaRN of the compressed layers (model-spec §3.2). Sources: rope_parameters.compress (HF) or rope_scaling.
void read_rope(const Reader& r, ModelConfig& c) {
  const std::string& where = r.where;
  c.rope_theta = float(r.number_or("rope_theta", 10000.0));
  c.compress_rope_theta = float(r.number_or("compress_rope_theta", 160000.0));
  const json* yarn = nullptr;
  std::string yarn_key;
  if (const json* rp = r.find("rope_parameters")) {
    if (rp->contains("main") && (*rp)["main"].is_object()) {
      Reader m{(*rp)["main"], where};
      c.rope_theta = float(m.number_or("rope_theta", c.rope_theta));
      const std::string t = m.find("rope_type") ? (*rp)["main"]["rope_type"].get<std::string>() : "default";
      if (t != "default")
        fail("%s: rope_parameters.main.rope_type '%s': sliding layers use plain RoPE only", where.c_str(), t.c_str());
    }
    if (rp->contains("compress") && (*rp)["compress"].is_object()) {
      yarn = &(*rp)["compress"];
      yarn_key = "rope_parameters.compress";
    } else if (!rp->contains("main")) {
      yarn = rp;  // flat rope_parameters describe the compressed rope (HF folds them into "compress")
      yarn_key = "rope_parameters";
    }
  }
  if (!yarn) {
    if (const json* rs = r.find("rope_scaling")) {
      yarn = rs;
      yarn_key = "rope_scaling";
    }
  }
  c.yarn_factor = 1.f;  // no scaling unless the config says yarn
  if (!yarn) return;
  Reader y{*yarn, where};
  if (yarn->contains("rope_theta") && yarn_key == "rope_parameters.compress")
    c.compress_rope_theta = float(y.number("rope_theta"));
  std::string type = "default";
  if (y.find("rope_type")) type = (*yarn)["rope_type"].get<std::string>();
  else if (y.find("type")) type = (*yarn)["type"].get<std::string>();
  if (type == "default" || type == "none") return;
  if (type != "yarn") fail("%s: %s.rope_type '%s' is not supported (only yarn)", where.c_str(), yarn_key.c_str(), type.c_str());
  c.yarn_factor = float(y.number("factor"));
  c.yarn_orig_ctx = uint64_t(y.integer("original_max_position_embeddings"));
  c.yarn_beta_fast = float(y.number_or("beta_fast", 32.0));
  c.yarn_beta_slow = float(y.number_or("beta_slow", 1.0));
  // V4 applies no YaRN magnitude scaling; HF pins attention_factor to 1. Anything else cannot be represented.
  const double af = y.number_or("attention_factor", 1.0);
  if (std::fabs(af - 1.0) > 1e-12)
    fail("%s: %s.attention_factor = %g: DeepSeek-V4 uses no YaRN magnitude scaling (must be 1)", where.c_str(),
         yarn_key.c_str(), af);
}

}  // namespace

ModelConfig model_config_from_hf_json(const json& j, const std::string& where) {
  if (!j.is_object()) fail("%s: not a JSON object", where.c_str());
  Reader r{j, where};
  if (const json* mt = r.find("model_type"))
    if (!mt->is_string() || mt->get<std::string>().rfind("deepseek_v4", 0) != 0)
      fail("%s: model_type %s is not deepseek_v4", where.c_str(), mt->dump().c_str());
  ModelConfig c;
  c.name = "DeepSeek-V4";
  c.n_layers = to_int(r.integer("num_hidden_layers"), "num_hidden_layers", where);
  c.d_model = to_int(r.integer("hidden_size"), "hidden_size", where);
  c.n_vocab = to_int(r.integer("vocab_size"), "vocab_size", where);
  c.n_heads = to_int(r.integer("num_attention_heads"), "num_attention_heads", where);
  c.n_kv_heads = to_int(r.integer_or("num_key_value_heads", 1), "num_key_value_heads", where);
  c.head_dim = to_int(r.integer("head_dim"), "head_dim", where);
  if (r.find("qk_rope_head_dim")) {
    c.rope_dim = to_int(r.integer("qk_rope_head_dim"), "qk_rope_head_dim", where);
  } else {
    const double f = r.number_or("partial_rotary_factor", 64.0 / 512.0);
    const double d = f * c.head_dim;
    if (std::fabs(d - std::round(d)) > 1e-9)
      fail("%s: partial_rotary_factor %g x head_dim %d is not an integer", where.c_str(), f, c.head_dim);
    c.rope_dim = int(std::lround(d));
  }
  c.q_lora_rank = to_int(r.integer("q_lora_rank"), "q_lora_rank", where);
  c.o_lora_rank = to_int(r.integer("o_lora_rank"), "o_lora_rank", where);
  c.o_groups = to_int(r.integer("o_groups"), "o_groups", where);
  c.sliding_window = to_int(r.integer("sliding_window"), "sliding_window", where);
  c.context_length = uint64_t(r.integer_or("max_position_embeddings", 1048576));
  c.idx_heads = to_int(r.integer("index_n_heads"), "index_n_heads", where);
  c.idx_head_dim = to_int(r.integer("index_head_dim"), "index_head_dim", where);
  c.idx_topk = to_int(r.integer("index_topk"), "index_topk", where);
  const int n_mtp = to_int(r.integer_or("num_nextn_predict_layers", 0), "num_nextn_predict_layers", where);
  c.compress_ratios = compress_ratios(r, c.n_layers, n_mtp);
  read_rope(r, c);
  c.rms_eps = float(r.number_or("rms_norm_eps", 1e-6));
  c.n_experts = to_int(r.integer("n_routed_experts"), "n_routed_experts", where);
  c.n_experts_used = to_int(r.integer("num_experts_per_tok"), "num_experts_per_tok", where);
  c.expert_ff = to_int(r.integer("moe_intermediate_size"), "moe_intermediate_size", where);
  c.n_shared_experts = to_int(r.integer_or("n_shared_experts", 1), "n_shared_experts", where);
  c.expert_weights_scale = float(r.number_or("routed_scaling_factor", 1.5));
  if (const json* v = r.find("norm_topk_prob")) c.expert_weights_norm = v->is_boolean() && v->get<bool>();
  if (const json* v = r.find("scoring_func"))
    if (!v->is_string() || v->get<std::string>() != "sqrtsoftplus")
      fail("%s: scoring_func %s: only sqrtsoftplus is supported", where.c_str(), v->dump().c_str());
  c.n_hash_layers = hash_layers(r, c.n_layers);
  c.swiglu_clamp.assign(c.compress_ratios.size(), float(r.number_or("swiglu_limit", 10.0)));
  c.hc_mult = to_int(r.integer("hc_mult"), "hc_mult", where);
  c.hc_sinkhorn_iters = to_int(r.integer_or("hc_sinkhorn_iters", 20), "hc_sinkhorn_iters", where);
  c.hc_eps = float(r.number_or("hc_eps", 1e-6));
  c.validate(where);
  return c;
}

ModelConfig model_config_from_hf_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) fail("%s: cannot open", path.c_str());
  json j;
  try {
    j = json::parse(in);
  } catch (const std::exception& e) {
    fail("%s: does not parse: %s", path.c_str(), e.what());
  }
  return model_config_from_hf_json(j, path);
}

}  // namespace dsv4
