// Weight binding: every tensor of names.h's table is looked up, its shape checked exactly and its type checked
// against its class; small vectors stored as F16/BF16 are widened to owned F32 copies so ops read plain floats.
#include "model/model.h"

#include <map>

#include "common/error.h"
#include "gguf/gguf.h"
#include "model/names.h"
#include "quant/quant.h"

namespace dsv4 {

namespace {

bool allowed_type(TensorClass cls, QType t) {
  switch (cls) {
    case TensorClass::Vector:
    case TensorClass::Ape:
      return t == QType::F32 || t == QType::F16 || t == QType::BF16;
    case TensorClass::Dense:
    case TensorClass::Projection:
    case TensorClass::Expert:
      return t == QType::F32 || t == QType::F16 || t == QType::BF16 || t == QType::Q8_0 || t == QType::Q2_K ||
             t == QType::Q4_K || t == QType::IQ2_XXS || t == QType::MXFP4;
    case TensorClass::Index:
      return t == QType::I32;
  }
  return false;
}

}  // namespace

Model::~Model() = default;

std::unique_ptr<Model> Model::load(const std::string& path) {
  std::unique_ptr<Model> m(new Model());
  m->file_ = GgufFile::open(path);
  m->config_ = ModelConfig::from_gguf(*m->file_);
  m->bind();
  return m;
}

void Model::bind() {
  const GgufFile& f = *file_;
  const std::string& path = f.path();
  std::vector<TensorSpec> specs = all_tensor_specs(config_);
  names_.reserve(specs.size());
  f32_copies_.reserve(specs.size());
  std::map<std::string, WeightView> views;
  for (const TensorSpec& s : specs) {
    const GgufTensorInfo* ti = f.find_tensor(s.name);
    if (!ti) {
      if (s.optional) continue;
      fail("%s: missing tensor '%s' (expected %s, shape %s)", path.c_str(), s.name.c_str(),
           tensor_class_name(s.cls), shape_str(s.ne).c_str());
    }
    // Shape: exactly the expected dims, trailing dims 1.
    bool ok = ti->n_dims >= 1;
    for (int d = 0; d < 4; ++d) ok &= ti->ne[size_t(d)] == (d < int(s.ne.size()) ? s.ne[size_t(d)] : 1);
    if (!ok)
      fail("%s: tensor '%s': expected shape %s, found %s", path.c_str(), s.name.c_str(), shape_str(s.ne).c_str(),
           ti->shape_string().c_str());
    if (!qtype_is_known(ti->type) || !allowed_type(s.cls, QType(ti->type)))
      fail("%s: tensor '%s': expected %s, found type %s", path.c_str(), s.name.c_str(), tensor_class_name(s.cls),
           ggml_type_name(ti->type).c_str());
    names_.push_back(s.name);
    WeightView v;
    v.type = QType(ti->type);
    v.data = ti->data;
    v.n_dims = int(ti->n_dims);
    for (int d = 0; d < 4; ++d) v.ne[d] = ti->ne[size_t(d)];
    v.n_bytes = ti->n_bytes;
    v.name = names_.back().c_str();
    weight_bytes_ += ti->n_bytes;
    if ((s.cls == TensorClass::Vector || s.cls == TensorClass::Ape) && v.type != QType::F32) {
      std::vector<float> wide(size_t(ti->n_elements()));
      dequantize_row(v.type, ti->data, wide.data(), ti->n_elements());
      f32_copies_.push_back(std::move(wide));
      v.type = QType::F32;
      v.data = f32_copies_.back().data();
    }
    views[s.name] = v;
  }
  auto G = [&](const std::string& n) -> WeightView {
    auto it = views.find(n);
    return it == views.end() ? WeightView{} : it->second;
  };
  weights_.token_embd = G("token_embd.weight");
  weights_.output_norm = G("output_norm.weight");
  weights_.output = G("output.weight");
  weights_.hc_head = {G("output_hc_fn.weight"), G("output_hc_base.weight"), G("output_hc_scale.weight")};
  weights_.layers.assign(size_t(config_.n_layers), LayerWeights{});
  for (int il = 0; il < config_.n_layers; ++il) {
    auto L = [&](const char* s) { return G(layer_tensor_name(il, s)); };
    LayerWeights& l = weights_.layers[size_t(il)];
    l.hc_attn = {L("hc_attn_fn.weight"), L("hc_attn_base.weight"), L("hc_attn_scale.weight")};
    l.hc_ffn = {L("hc_ffn_fn.weight"), L("hc_ffn_base.weight"), L("hc_ffn_scale.weight")};
    l.attn_norm = L("attn_norm.weight");
    l.ffn_norm = L("ffn_norm.weight");
    AttentionWeights& a = l.attn;
    a.q_a = L("attn_q_a.weight");
    a.q_a_norm = L("attn_q_a_norm.weight");
    a.q_b = L("attn_q_b.weight");
    a.kv = L("attn_kv.weight");
    a.kv_norm = L("attn_kv_a_norm.weight");
    a.sinks = L("attn_sinks.weight");
    a.output_a = L("attn_output_a.weight");
    a.output_b = L("attn_output_b.weight");
    a.compressor = {L("attn_compressor_ape.weight"), L("attn_compressor_kv.weight"),
                    L("attn_compressor_gate.weight"), L("attn_compressor_norm.weight")};
    a.indexer.q_b = L("indexer.attn_q_b.weight");
    a.indexer.proj = L("indexer.proj.weight");
    a.indexer.compressor = {L("indexer_compressor_ape.weight"), L("indexer_compressor_kv.weight"),
                            L("indexer_compressor_gate.weight"), L("indexer_compressor_norm.weight")};
    MoeWeights& m = l.moe;
    m.gate_inp = L("ffn_gate_inp.weight");
    m.exp_probs_b = L("exp_probs_b.bias");
    m.tid2eid = L("ffn_gate_tid2eid.weight");
    m.gate_exps = L("ffn_gate_exps.weight");
    m.up_exps = L("ffn_up_exps.weight");
    m.down_exps = L("ffn_down_exps.weight");
    m.gate_shexp = L("ffn_gate_shexp.weight");
    m.up_shexp = L("ffn_up_shexp.weight");
    m.down_shexp = L("ffn_down_shexp.weight");
    if (m.gate_exps.type != m.up_exps.type)
      fail("%s: tensors '%s' (%s) and '%s' (%s): gate and up experts must share a quant type", path.c_str(),
           m.gate_exps.name, qtype_name(m.gate_exps.type).c_str(), m.up_exps.name, qtype_name(m.up_exps.type).c_str());
  }
}

}  // namespace dsv4
