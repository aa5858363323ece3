#include "convert/convert.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <vector>

#include "common/error.h"
#include "convert/hf_config.h"
#include "convert/safetensors.h"
#include "gguf/gguf.h"
#include "model/names.h"
#include "quant/blocks.h"

namespace dsv4 {

namespace {

bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }
bool ends_with(const std::string& s, const std::string& t) {
  return s.size() >= t.size() && s.compare(s.size() - t.size(), t.size(), t) == 0;
}

// Official per-layer suffix -> ds4 GGUF suffix (model-spec §13.3).
const std::map<std::string, std::string>& layer_table() {
  static const std::map<std::string, std::string> t = {
      {"hc_attn_fn", "hc_attn_fn.weight"},
      {"hc_attn_base", "hc_attn_base.weight"},
      {"hc_attn_scale", "hc_attn_scale.weight"},
      {"attn_norm.weight", "attn_norm.weight"},
      {"attn.wq_a.weight", "attn_q_a.weight"},
      {"attn.q_norm.weight", "attn_q_a_norm.weight"},
      {"attn.wq_b.weight", "attn_q_b.weight"},
      {"attn.wkv.weight", "attn_kv.weight"},
      {"attn.kv_norm.weight", "attn_kv_a_norm.weight"},
      {"attn.attn_sink", "attn_sinks.weight"},
      {"attn.wo_a.weight", "attn_output_a.weight"},
      {"attn.wo_b.weight", "attn_output_b.weight"},
      {"attn.compressor.ape", "attn_compressor_ape.weight"},
      {"attn.compressor.wkv.weight", "attn_compressor_kv.weight"},
      {"attn.compressor.wgate.weight", "attn_compressor_gate.weight"},
      {"attn.compressor.norm.weight", "attn_compressor_norm.weight"},
      {"attn.indexer.wq_b.weight", "indexer.attn_q_b.weight"},
      {"attn.indexer.weights_proj.weight", "indexer.proj.weight"},
      {"attn.indexer.compressor.ape", "indexer_compressor_ape.weight"},
      {"attn.indexer.compressor.wkv.weight", "indexer_compressor_kv.weight"},
      {"attn.indexer.compressor.wgate.weight", "indexer_compressor_gate.weight"},
      {"attn.indexer.compressor.norm.weight", "indexer_compressor_norm.weight"},
      {"hc_ffn_fn", "hc_ffn_fn.weight"},
      {"hc_ffn_base", "hc_ffn_base.weight"},
      {"hc_ffn_scale", "hc_ffn_scale.weight"},
      {"ffn_norm.weight", "ffn_norm.weight"},
      {"ffn.gate.weight", "ffn_gate_inp.weight"},
      {"ffn.gate.bias", "exp_probs_b.bias"},
      {"ffn.gate.tid2eid", "ffn_gate_tid2eid.weight"},
      {"ffn.shared_experts.w1.weight", "ffn_gate_shexp.weight"},
      {"ffn.shared_experts.w3.weight", "ffn_up_shexp.weight"},
      {"ffn.shared_experts.w2.weight", "ffn_down_shexp.weight"},
  };
  return t;
}

const std::map<std::string, std::string>& global_table() {
  static const std::map<std::string, std::string> t = {
      {"embed.weight", "token_embd.weight"},     {"norm.weight", "output_norm.weight"},
      {"head.weight", "output.weight"},          {"hc_head_fn", "output_hc_fn.weight"},
      {"hc_head_base", "output_hc_base.weight"}, {"hc_head_scale", "output_hc_scale.weight"},
  };
  return t;
}

// One [rows, cols] source matrix in the checkpoint and how its values are encoded.
struct Source {
  enum Enc { Plain, Fp8, Fp4, Int } enc = Plain;
  const StTensor* w = nullptr;
  const StTensor* scale = nullptr;
  std::string name;  // canonical
  int64_t rows = 1, cols = 1;
};

std::string where(const Source& s) { return strfmt("%s: tensor '%s'", s.w->file->c_str(), s.w->name.c_str()); }

Source make_source(const std::string& canon, const StTensor* w, const std::map<std::string, const StTensor*>& all) {
  Source s;
  s.name = canon;
  s.w = w;
  const auto& sh = w->shape;
  const bool is_matrix_weight = ends_with(canon, ".weight");
  const StTensor* scale = nullptr;
  if (is_matrix_weight) {
    auto it = all.find(canon.substr(0, canon.size() - 7) + ".scale");
    if (it != all.end()) scale = it->second;
  }
  if (w->dtype == StDtype::F8_E4M3) {
    if (!scale) fail("%s: FP8 weight without its '.scale' tensor", where(s).c_str());
    if (sh.size() != 2) fail("%s: FP8 weight must be 2-D, found %s", where(s).c_str(), w->shape_string().c_str());
    s.enc = Source::Fp8;
    s.rows = sh[0];
    s.cols = sh[1];
    const std::vector<int64_t> want = {(s.rows + 127) / 128, (s.cols + 127) / 128};
    if (scale->shape != want)
      fail("%s: FP8 block scale '%s' has shape %s, expected [%lld, %lld] (128x128 blocks)", where(s).c_str(),
           scale->name.c_str(), scale->shape_string().c_str(), (long long)want[0], (long long)want[1]);
  } else if ((w->dtype == StDtype::I8 || w->dtype == StDtype::U8) && scale) {
    if (sh.size() != 2) fail("%s: FP4 weight must be 2-D, found %s", where(s).c_str(), w->shape_string().c_str());
    s.enc = Source::Fp4;
    s.rows = sh[0];
    s.cols = sh[1] * 2;  // two E2M1 values per byte
    const std::vector<int64_t> want = {s.rows, s.cols / 32};
    if (s.cols % 32 != 0 || scale->shape != want)
      fail("%s: FP4 scale '%s' has shape %s, expected [%lld, %lld] (one per 32 values)", where(s).c_str(),
           scale->name.c_str(), scale->shape_string().c_str(), (long long)want[0], (long long)want[1]);
  } else {
    const bool integer = w->dtype == StDtype::I64 || w->dtype == StDtype::I32 || w->dtype == StDtype::I16 ||
                         w->dtype == StDtype::I8 || w->dtype == StDtype::U8;
    const bool floating = w->dtype == StDtype::F32 || w->dtype == StDtype::F16 || w->dtype == StDtype::BF16 ||
                          w->dtype == StDtype::F64;
    if (!integer && !floating)
      fail("%s: dtype %s is not a weight encoding the converter knows", where(s).c_str(), st_dtype_name(w->dtype));
    if (scale)
      fail("%s: has a scale tensor '%s' but dtype %s is not FP8/FP4", where(s).c_str(), scale->name.c_str(),
           st_dtype_name(w->dtype));
    s.enc = integer ? Source::Int : Source::Plain;
    s.cols = sh.empty() ? 1 : sh.back();
    s.rows = sh.empty() ? 1 : w->n_elements() / std::max<int64_t>(1, s.cols);
  }
  if (scale) s.scale = scale;
  return s;
}

// Reads rows [r0, r0 + n) of a source as float (dequantizing FP8/FP4 with their scales).
void read_rows(const Source& s, int64_t r0, int64_t n, float* out) {
  if (s.enc == Source::Plain) {
    st_read_f32(*s.w, r0 * s.cols, n * s.cols, out);
    return;
  }
  if (s.enc == Source::Fp8) {
    const int64_t sc_cols = s.scale->shape[1];
    std::vector<float> sc(static_cast<size_t>(sc_cols));
    for (int64_t r = r0; r < r0 + n; ++r) {
      st_read_f32(*s.scale, (r / 128) * sc_cols, sc_cols, sc.data());
      float* o = out + (r - r0) * s.cols;
      st_read_f32(*s.w, r * s.cols, s.cols, o);
      for (int64_t c = 0; c < s.cols; ++c) {
        const float v = std::isnan(o[c]) ? 0.f : o[c];  // e4m3 NaN codes carry no weight (as ds4's converter)
        o[c] = v * sc[size_t(c / 128)];
      }
    }
    return;
  }
  if (s.enc == Source::Fp4) {
    const int64_t sc_cols = s.cols / 32;
    std::vector<float> sc(static_cast<size_t>(sc_cols));
    for (int64_t r = r0; r < r0 + n; ++r) {
      st_read_f32(*s.scale, r * sc_cols, sc_cols, sc.data());
      const uint8_t* p = s.w->data + r * (s.cols / 2);
      float* o = out + (r - r0) * s.cols;
      for (int64_t j = 0; j < s.cols / 2; ++j) {  // element 2j in the low nibble, 2j+1 in the high nibble
        o[2 * j] = e2m1_to_f32(p[j] & 15) * sc[size_t(2 * j / 32)];
        o[2 * j + 1] = e2m1_to_f32(p[j] >> 4) * sc[size_t((2 * j + 1) / 32)];
      }
    }
    return;
  }
  fail("%s: integer tensor read as float", where(s).c_str());
}

struct Target {
  TensorSpec spec;
  QType type = QType::F32;
  std::vector<Source> sources;  // one, or one per expert in expert order
};

void check_shape(const Target& t, const ModelConfig& cfg) {
  const auto& ne = t.spec.ne;
  const bool expert = t.spec.cls == TensorClass::Expert;
  for (const auto& s : t.sources) {
    std::vector<int64_t> got(s.w->shape.rbegin(), s.w->shape.rend());
    if (s.enc == Source::Fp4 || s.enc == Source::Fp8) got = {s.cols, s.rows};
    std::vector<int64_t> want = ne;
    if (expert) want.resize(2);
    if (got != want)
      fail("%s: shape %s (as GGUF %s) does not match the config: %s must be %s", where(s).c_str(),
           s.w->shape_string().c_str(), shape_str(got).c_str(), t.spec.name.c_str(), shape_str(want).c_str());
  }
  if (expert && int64_t(t.sources.size()) != ne[2])
    fail("%s: found %zu experts for %s, config has %lld", cfg.name.c_str(), t.sources.size(), t.spec.name.c_str(),
         (long long)ne[2]);
}

// Writes one target tensor in bounded chunks.
uint64_t write_target(GgufWriter& w, const Target& t, const ModelConfig& cfg) {
  uint64_t written = 0;
  std::vector<float> buf;
  std::vector<uint8_t> bytes;
  if (t.type == QType::I32) {  // tid2eid: validate expert ids while narrowing I64 -> I32
    const Source& s = t.sources[0];
    std::vector<int64_t> ids(size_t(s.w->n_elements()));
    st_read_i64(*s.w, 0, int64_t(ids.size()), ids.data());
    std::vector<int32_t> out(ids.size());
    for (size_t i = 0; i < ids.size(); ++i) {
      if (ids[i] < 0 || ids[i] >= cfg.n_experts)
        fail("%s: element %zu (token %lld) = %lld is not an expert id in [0, %d)", where(s).c_str(), i,
             (long long)(int64_t(i) / s.cols), (long long)ids[i], cfg.n_experts);
      out[i] = int32_t(ids[i]);
    }
    w.write_tensor_data(t.spec.name, out.data(), out.size() * 4);
    return out.size() * 4;
  }
  const int64_t budget = int64_t(16) << 20;  // floats per chunk (64 MB) for non-expert tensors
  for (const auto& s : t.sources) {
    if (s.enc == Source::Int) fail("%s: integer dtype for a float tensor (%s)", where(s).c_str(), t.spec.name.c_str());
    // Expert matrices go whole, so importance-free quantizers see every row of the matrix at once.
    const int64_t step = t.spec.cls == TensorClass::Expert ? s.rows : std::max<int64_t>(1, budget / s.cols);
    for (int64_t r = 0; r < s.rows; r += step) {
      const int64_t n = std::min(step, s.rows - r);
      buf.resize(size_t(n * s.cols));
      read_rows(s, r, n, buf.data());
      for (float v : buf)
        if (!std::isfinite(v)) fail("%s: non-finite value in rows [%lld, %lld)", where(s).c_str(), (long long)r, (long long)(r + n));
      bytes.clear();
      encode_f32_rows(t.type, buf.data(), n, s.cols, bytes);
      w.write_tensor_data(t.spec.name, bytes.data(), bytes.size());
      written += bytes.size();
    }
  }
  return written;
}

}  // namespace

std::string canonical_tensor_name(const std::string& in) {
  std::string s = in;
  if (starts_with(s, "model.")) s = s.substr(6);
  if (ends_with(s, ".weight_scale_inv")) s = s.substr(0, s.size() - 17) + ".scale";
  static const std::map<std::string, std::string> alias = {
      {"embed_tokens.weight", "embed.weight"}, {"lm_head.weight", "head.weight"},
      {"hc_head.hc_fn", "hc_head_fn"},         {"hc_head.hc_base", "hc_head_base"},
      {"hc_head.hc_scale", "hc_head_scale"},
  };
  if (auto it = alias.find(s); it != alias.end()) return it->second;
  // HF writes the KV RMSNorm of attention as attn.norm.weight (the compressor's stays compressor.norm).
  if (starts_with(s, "layers.") && ends_with(s, ".attn.norm.weight"))
    return s.substr(0, s.size() - 17) + ".attn.kv_norm.weight";
  return s;
}

bool gguf_name_for(const std::string& canon, std::string* gguf_name, int* expert) {
  *expert = -1;
  if (auto it = global_table().find(canon); it != global_table().end()) {
    *gguf_name = it->second;
    return true;
  }
  if (!starts_with(canon, "layers.")) return false;
  const size_t dot = canon.find('.', 7);
  if (dot == std::string::npos) return false;
  const std::string num = canon.substr(7, dot - 7);
  if (num.empty() || num.size() > 6 || !std::all_of(num.begin(), num.end(), ::isdigit)) return false;
  const int layer = std::stoi(num);
  const std::string rest = canon.substr(dot + 1);
  if (auto it = layer_table().find(rest); it != layer_table().end()) {
    *gguf_name = layer_tensor_name(layer, it->second);
    return true;
  }
  // ffn.experts.E.w{1,2,3}.weight
  const std::string pre = "ffn.experts.";
  if (!starts_with(rest, pre)) return false;
  const size_t d2 = rest.find('.', pre.size());
  if (d2 == std::string::npos) return false;
  const std::string e = rest.substr(pre.size(), d2 - pre.size());
  if (e.empty() || e.size() > 6 || !std::all_of(e.begin(), e.end(), ::isdigit)) return false;
  const std::string w = rest.substr(d2 + 1);
  const char* suffix = w == "w1.weight" ? "ffn_gate_exps.weight"
                       : w == "w3.weight" ? "ffn_up_exps.weight"
                       : w == "w2.weight" ? "ffn_down_exps.weight"
                                          : nullptr;
  if (!suffix) return false;
  *gguf_name = layer_tensor_name(layer, suffix);
  *expert = std::stoi(e);
  return true;
}

ConvertReport convert_checkpoint(const ConvertOptions& o) {
  auto log = [&](const std::string& s) {
    if (o.log) o.log(s);
  };
  ConvertReport rep;
  const std::string cfg_path = (std::filesystem::path(o.in_dir) / "config.json").string();
  rep.config = model_config_from_hf_file(cfg_path);
  const ModelConfig& cfg = rep.config;
  auto ckpt = Checkpoint::open(o.in_dir);
  log(strfmt("%s: %zu tensors in %zu files; %d layers, d_model %d, vocab %d, %d experts", o.in_dir.c_str(),
             ckpt->all().size(), ckpt->n_files(), cfg.n_layers, cfg.d_model, cfg.n_vocab, cfg.n_experts));

  // Canonicalize every checkpoint name; MTP is skipped (separate file in ds4).
  std::map<std::string, const StTensor*> canon;
  for (const auto& [name, t] : ckpt->all()) {
    const std::string c = canonical_tensor_name(name);
    if (starts_with(c, "mtp.")) {
      ++rep.n_skipped;
      continue;
    }
    auto [it, fresh] = canon.emplace(c, t);
    if (!fresh) fail("%s: tensors '%s' and '%s' both map to '%s'", o.in_dir.c_str(), it->second->name.c_str(), name.c_str(), c.c_str());
  }
  // Group sources by GGUF tensor.
  std::map<std::string, std::map<int, Source>> by_gguf;
  for (const auto& [c, t] : canon) {
    if (ends_with(c, ".scale")) continue;  // block scales travel with their weight (make_source)
    std::string g;
    int e = -1;
    if (!gguf_name_for(c, &g, &e))
      fail("%s: tensor '%s' (file %s) is not part of a DeepSeek-V4 model", o.in_dir.c_str(), t->name.c_str(), t->file->c_str());
    auto& slot = by_gguf[g];
    if (slot.count(e)) fail("%s: tensor '%s' appears twice", o.in_dir.c_str(), t->name.c_str());
    slot.emplace(e, make_source(c, t, canon));
  }
  std::vector<Target> targets;
  for (const auto& spec : all_tensor_specs(cfg)) {
    auto it = by_gguf.find(spec.name);
    if (it == by_gguf.end()) {
      if (spec.optional) continue;
      fail("%s: missing tensor for %s (shape %s)", o.in_dir.c_str(), spec.name.c_str(), shape_str(spec.ne).c_str());
    }
    Target t;
    t.spec = spec;
    t.type = mix_tensor_type(spec, o.mix);
    int want = 0;
    for (auto& [e, src] : it->second) {
      if (spec.cls == TensorClass::Expert ? e != want : e != -1)
        fail("%s: %s: expert %d is missing (next found: %d)", o.in_dir.c_str(), spec.name.c_str(), want, e);
      ++want;
      t.sources.push_back(src);
    }
    check_shape(t, cfg);
    by_gguf.erase(it);
    targets.push_back(std::move(t));
  }
  for (const auto& [g, srcs] : by_gguf) {
    const Source& s = srcs.begin()->second;
    if (ends_with(g, "exp_probs_b.bias")) {  // a bias on a hash layer is unused by every implementation (§16.8)
      log(strfmt("skipping %s: hash layers route by tid2eid", s.w->name.c_str()));
      ++rep.n_skipped;
      continue;
    }
    fail("%s: tensor '%s' maps to %s, which this config does not have", o.in_dir.c_str(), s.w->name.c_str(), g.c_str());
  }

  GgufWriter w(o.out_path);
  cfg.write_gguf_metadata(w);
  w.add_string("dsv4.convert.mix", mix_name(o.mix));
  write_tokenizer_metadata(w, cfg.n_vocab);
  for (const auto& t : targets) {
    std::vector<int64_t> ne = t.spec.ne;
    w.add_tensor(t.spec.name, uint32_t(t.type), std::span<const int64_t>(ne));
  }
  w.begin_data();
  for (const auto& t : targets) {
    rep.out_bytes += write_target(w, t, cfg);
    ++rep.n_tensors;
  }
  w.finish();
  log(strfmt("wrote %s: %d tensors, %.1f MB of tensor data, mix %s", o.out_path.c_str(), rep.n_tensors,
             double(rep.out_bytes) / 1e6, mix_name(o.mix)));
  return rep;
}

}  // namespace dsv4
