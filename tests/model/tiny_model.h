// Builds tiny DeepSeek-V4-topology GGUF files in-test: the real tensor names and metadata keys (through
// ModelConfig::write_gguf_metadata and model/names.h), small dims, deterministic random weights scaled so that
// activations stay O(1). Options let a test drop, reshape or retype one tensor to check load errors.
#pragma once

#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "gguf/gguf.h"
#include "model/config.h"
#include "model/names.h"
#include "quant/quant.h"

namespace dsv4::test {

// Every path at short length: sliding + CSA (ratio 4, indexer, overlap) + HCA (ratio 8) layers, window 8,
// index top-k 3 (smaller than the visible rows after 16 tokens), 2 hash layers, 8 experts / 2 used, 2 groups.
inline ModelConfig tiny_config() {
  ModelConfig c;
  c.name = "tiny";
  c.n_layers = 4;
  c.d_model = 64;
  c.n_vocab = 96;
  c.n_heads = 4;
  c.head_dim = 64;
  c.rope_dim = 16;
  c.q_lora_rank = 32;
  c.o_lora_rank = 16;
  c.o_groups = 2;
  c.sliding_window = 8;
  c.context_length = 4096;
  c.idx_heads = 4;
  c.idx_head_dim = 32;
  c.idx_topk = 3;
  c.compress_ratios = {0, 4, 8, 4, 0};  // last entry: MTP
  c.n_experts = 8;
  c.n_experts_used = 2;
  c.expert_ff = 16;
  c.expert_weights_scale = 1.5f;
  c.n_hash_layers = 2;
  c.swiglu_clamp.assign(5, 10.f);
  c.hc_mult = 4;
  c.hc_sinkhorn_iters = 20;
  return c;
}

// Small deterministic generator (xorshift64*), uniform in [-1, 1).
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ULL + 1) {}
  uint64_t next() {
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    return s * 0x2545F4914F6CDD1DULL;
  }
  float uniform() { return float(double(next() >> 11) / double(1ULL << 53) * 2.0 - 1.0); }
};

struct TinyOptions {
  uint64_t seed = 1;
  std::string drop;                 // tensor left out of the file
  std::string reshape;              // tensor written with ne[0] doubled
  std::string retype;               // tensor written as I32 (matrix/vector) or F32 (index)
  QType matrix_type = QType::F32;   // storage of Dense/Projection/Expert tensors
  QType roundtrip = QType::F32;     // F32 storage of values first rounded through this type (reference files)
  // Writes the metadata; default cfg.write_gguf_metadata(w).
  std::function<void(GgufWriter&, const ModelConfig&)> metadata;
};

inline std::vector<float> tiny_values(const TensorSpec& s, const ModelConfig& c, Rng& r) {
  int64_t n = 1;
  for (int64_t d : s.ne) n *= d;
  std::vector<float> v(static_cast<size_t>(n));
  const std::string& nm = s.name;
  auto has = [&](const char* k) { return nm.find(k) != std::string::npos; };
  for (auto& x : v) {
    float u = r.uniform();
    if (s.cls == TensorClass::Vector) {
      if (has("norm")) x = 1.f + 0.25f * u;
      else if (has("_scale")) x = 0.6f + 0.3f * u;
      else if (has("_base")) x = 0.5f * u;
      else if (has("sinks")) x = u;
      else x = 0.5f * u;  // exp_probs_b
    } else if (s.cls == TensorClass::Ape) {
      x = 0.5f * u;
    } else {
      // Matrices: unit-variance-ish outputs for O(1) inputs (uniform has variance 1/3).
      x = u * std::sqrt(3.f / float(s.ne[0]));
    }
  }
  return v;
}

// tid2eid [k, V]: each token gets k distinct random experts.
inline std::vector<int32_t> tiny_tid2eid(const ModelConfig& c, Rng& r) {
  std::vector<int32_t> t;
  for (int v = 0; v < c.n_vocab; ++v) {
    std::vector<int32_t> row;
    while (int(row.size()) < c.n_experts_used) {
      int32_t e = int32_t(r.next() % uint64_t(c.n_experts));
      bool dup = false;
      for (int32_t q : row) dup |= q == e;
      if (!dup) row.push_back(e);
    }
    t.insert(t.end(), row.begin(), row.end());
  }
  return t;
}

inline void write_tiny_model(const std::string& path, const ModelConfig& c, const TinyOptions& o = {}) {
  GgufWriter w(path);
  if (o.metadata) o.metadata(w, c);
  else c.write_gguf_metadata(w);
  struct Item {
    TensorSpec spec;
    QType type;
    std::vector<int64_t> ne;
  };
  std::vector<Item> items;
  for (const TensorSpec& s : all_tensor_specs(c)) {
    if (s.name == o.drop) continue;
    QType t = s.cls == TensorClass::Index ? QType::I32
              : (s.cls == TensorClass::Vector || s.cls == TensorClass::Ape) ? QType::F32
                                                                          : o.matrix_type;
    if (s.name == o.retype) t = (t == QType::I32) ? QType::F32 : QType::I32;
    std::vector<int64_t> ne = s.ne;
    if (s.name == o.reshape) ne[0] *= 2;
    w.add_tensor(s.name, uint32_t(t), ne);
    items.push_back({s, t, ne});
  }
  w.begin_data();
  Rng r(o.seed);
  for (const Item& it : items) {
    TensorSpec s = it.spec;
    s.ne = it.ne;
    if (it.type == QType::I32) {
      std::vector<int32_t> t;
      if (s.cls == TensorClass::Index) t = tiny_tid2eid(c, r);
      else {
        int64_t n = 1;
        for (int64_t d : s.ne) n *= d;
        t.assign(size_t(n), 0);
      }
      w.write_tensor_data(s.name, t.data(), t.size() * sizeof(int32_t));
      continue;
    }
    std::vector<float> v = tiny_values(s, c, r);
    const bool matrix = s.cls == TensorClass::Dense || s.cls == TensorClass::Projection || s.cls == TensorClass::Expert;
    if (matrix && o.roundtrip != QType::F32) {
      const int64_t cols = s.ne[0], rows = int64_t(v.size()) / cols;
      std::vector<uint8_t> q(size_t(row_bytes(o.roundtrip, cols) * rows));
      quantize_rows(o.roundtrip, v.data(), q.data(), rows, cols);
      for (int64_t rr = 0; rr < rows; ++rr)
        dequantize_row(o.roundtrip, q.data() + rr * row_bytes(o.roundtrip, cols), v.data() + rr * cols, cols);
    }
    if (it.type == QType::F32) {
      w.write_tensor_data(s.name, v.data(), v.size() * sizeof(float));
    } else {
      const int64_t cols = s.ne[0], rows = int64_t(v.size()) / cols;
      std::vector<uint8_t> q(size_t(row_bytes(it.type, cols) * rows));
      quantize_rows(it.type, v.data(), q.data(), rows, cols);
      w.write_tensor_data(s.name, q.data(), q.size());
    }
  }
  w.finish();
}

}  // namespace dsv4::test
