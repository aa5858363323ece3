#include "convert/synth.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <numeric>
#include <tuple>
#include <vector>

#include "common/error.h"
#include "gguf/gguf.h"
#include "model/names.h"

namespace dsv4 {

namespace {

// splitmix64: tiny, fast, and good enough for synthetic weights; seeded per tensor so files are reproducible
// and independent of write order.
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed) {}
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return double(next() >> 11) * (1.0 / 9007199254740992.0); }  // [0, 1)
  uint64_t below(uint64_t n) { return next() % n; }
  // Box-Muller; the second value is dropped for simplicity (speed is dominated by writing, not this).
  float normal() {
    const double u1 = 1.0 - uniform(), u2 = uniform();
    return float(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
  }
};

uint64_t hash_str(const std::string& s, uint64_t seed) {
  uint64_t h = 1469598103934665603ull ^ seed;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

bool has(const std::string& s, const char* part) { return s.find(part) != std::string::npos; }

struct Recipe {
  bool uniform = false;
  float a = 0.f, b = 1.f;  // normal: mean a, sigma b; uniform: [a, b)
};

Recipe recipe(const TensorSpec& s) {
  const std::string& n = s.name;
  const float in = float(s.ne.empty() ? 1 : s.ne[0]);
  if (s.cls == TensorClass::Vector) {
    if (has(n, "norm")) return {true, 0.8f, 1.2f};
    if (has(n, "_scale")) return {true, 0.5f, 1.5f};
    if (has(n, "_base")) return {false, 0.f, 0.5f};
    if (has(n, "exp_probs_b")) return {false, 0.f, 0.1f};
    return {false, 0.f, 1.f};  // attention sinks
  }
  if (s.cls == TensorClass::Ape) return {false, 0.f, 0.5f};
  if (n == "token_embd.weight") return {false, 0.f, 1.f};
  if (has(n, "hc_")) return {false, 0.f, 2.f / std::sqrt(in)};  // HC control: mix logits O(1), not flat
  return {false, 0.f, 1.f / std::sqrt(in)};
}

void fill(Rng& rng, const Recipe& r, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    out[i] = r.uniform ? float(r.a + (r.b - r.a) * rng.uniform()) : r.a + r.b * rng.normal();
}

// Pool of valid quantized blocks for (type, row length, recipe): 64 rows of real random values, quantized.
class BlockPools {
 public:
  const std::vector<uint8_t>& get(QType t, int64_t cols, const Recipe& r, uint64_t seed) {
    const auto key = std::make_tuple(uint32_t(t), cols, r.uniform, r.a, r.b);
    auto it = pools_.find(key);
    if (it != pools_.end()) return it->second;
    const int64_t rows = 64;
    std::vector<float> x(size_t(rows * cols));
    Rng rng(seed ^ (uint64_t(t) << 32) ^ uint64_t(cols));
    fill(rng, r, x.data(), int64_t(x.size()));
    std::vector<uint8_t> bytes;
    encode_f32_rows(t, x.data(), rows, cols, bytes);
    return pools_.emplace(key, std::move(bytes)).first->second;
  }

 private:
  std::map<std::tuple<uint32_t, int64_t, bool, float, float>, std::vector<uint8_t>> pools_;
};

// Tensors up to this many values are generated and quantized exactly; larger ones are assembled from pools.
constexpr int64_t kExactLimit = int64_t(4) << 20;

uint64_t write_tensor(GgufWriter& w, const TensorSpec& s, QType t, const ModelConfig& c, uint64_t seed,
                      BlockPools& pools) {
  Rng rng(hash_str(s.name, seed));
  if (t == QType::I32) {  // tid2eid: k distinct experts per token
    const int k = int(s.ne[0]);
    std::vector<int32_t> ids(size_t(s.ne[0] * s.ne[1]));
    std::vector<int32_t> perm(size_t(c.n_experts));
    for (int64_t tok = 0; tok < s.ne[1]; ++tok) {
      std::iota(perm.begin(), perm.end(), 0);
      for (int j = 0; j < k; ++j) {
        std::swap(perm[size_t(j)], perm[size_t(j + int(rng.below(uint64_t(c.n_experts - j))))]);
        ids[size_t(tok * k + j)] = perm[size_t(j)];
      }
    }
    w.write_tensor_data(s.name, ids.data(), ids.size() * 4);
    return ids.size() * 4;
  }
  const int64_t cols = s.ne[0];
  int64_t rows = 1;
  for (size_t i = 1; i < s.ne.size(); ++i) rows *= s.ne[i];
  const Recipe r = recipe(s);
  const bool plain = t == QType::F32 || t == QType::F16 || t == QType::BF16;
  uint64_t written = 0;
  std::vector<float> x;
  std::vector<uint8_t> bytes;
  const int64_t step = std::max<int64_t>(1, (int64_t(8) << 20) / cols);
  if (plain || rows * cols <= kExactLimit) {
    for (int64_t r0 = 0; r0 < rows; r0 += step) {
      const int64_t n = std::min(step, rows - r0);
      x.resize(size_t(n * cols));
      fill(rng, r, x.data(), n * cols);
      bytes.clear();
      encode_f32_rows(t, x.data(), n, cols, bytes);
      w.write_tensor_data(s.name, bytes.data(), bytes.size());
      written += bytes.size();
    }
    return written;
  }
  const std::vector<uint8_t>& pool = pools.get(t, cols, r, seed);
  const int64_t bb = block_bytes(t), n_pool = int64_t(pool.size()) / bb, per_row = cols / block_elems(t);
  for (int64_t r0 = 0; r0 < rows; r0 += step) {
    const int64_t n = std::min(step, rows - r0);
    bytes.resize(size_t(n * per_row * bb));
    for (int64_t b = 0; b < n * per_row; ++b)
      std::memcpy(bytes.data() + b * bb, pool.data() + int64_t(rng.below(uint64_t(n_pool))) * bb, size_t(bb));
    w.write_tensor_data(s.name, bytes.data(), bytes.size());
    written += bytes.size();
  }
  return written;
}

}  // namespace

ModelConfig synth_config(const std::string& shape) {
  if (shape == "flash") return ModelConfig::flash();
  if (shape == "pro") return ModelConfig::pro();
  if (shape != "tiny") fail("unknown synth shape '%s' (expected flash, pro or tiny)", shape.c_str());
  // Flash's architecture at toy widths: sliding, CSA, HCA and CSA layers, one hash layer, the real
  // vocabulary. d_model and expert_ff are one 256-value super-block wide so every routed expert keeps its ds4
  // type (IQ2_XXS gate/up + Q2_K down for q2, Q4_K for q4): `make run` exercises the real quant kernels.
  ModelConfig c;
  c.name = "dsv4-tiny-synthetic";
  c.n_layers = 4;
  c.d_model = 256;
  c.n_vocab = 129280;
  c.n_heads = 4;
  c.head_dim = 128;
  c.rope_dim = 64;
  c.q_lora_rank = 64;
  c.o_lora_rank = 64;
  c.o_groups = 2;
  c.sliding_window = 32;
  c.context_length = 65536;
  c.idx_heads = 4;
  c.idx_head_dim = 64;
  c.idx_topk = 16;
  c.compress_ratios = {0, 4, 128, 4};
  c.n_experts = 8;
  c.n_experts_used = 2;
  c.expert_ff = 256;
  c.expert_weights_scale = 1.5f;
  c.n_hash_layers = 1;
  c.swiglu_clamp.assign(4, 10.f);
  c.hc_mult = 4;
  c.hc_sinkhorn_iters = 20;
  return c;
}

SynthReport synth_model(const SynthOptions& o) {
  SynthReport rep;
  rep.config = synth_config(o.shape);
  const ModelConfig& c = rep.config;
  const auto specs = all_tensor_specs(c);
  std::vector<QType> types;
  GgufWriter w(o.out_path);
  c.write_gguf_metadata(w);
  w.add_string("dsv4.synth.shape", o.shape);
  w.add_string("dsv4.convert.mix", mix_name(o.mix));
  w.add_u64("dsv4.synth.seed", o.seed);
  write_tokenizer_metadata(w, c.n_vocab);
  for (const auto& s : specs) {
    types.push_back(mix_tensor_type(s, o.mix));
    w.add_tensor(s.name, uint32_t(types.back()), std::span<const int64_t>(s.ne));
  }
  w.begin_data();
  BlockPools pools;
  for (size_t i = 0; i < specs.size(); ++i) {
    const auto& s = specs[i];
    if (o.sparse_experts && s.cls == TensorClass::Expert) {
      std::vector<int64_t> ne = s.ne;
      const uint64_t n = uint64_t(row_bytes(types[i], ne[0])) * uint64_t(ne[1]) * uint64_t(ne[2]);
      w.skip_tensor_data(s.name);
      rep.hole_bytes += n;
    } else {
      write_tensor(w, s, types[i], c, o.seed, pools);
    }
    ++rep.n_tensors;
    if (o.log && (i + 1) % 50 == 0) o.log(strfmt("%zu / %zu tensors", i + 1, specs.size()));
  }
  w.finish();
  rep.data_bytes = w.tensor_data_size();
  return rep;
}

}  // namespace dsv4
