// A loaded model: the mapped GGUF file, its ModelConfig and every tensor bound by ds4 name (model/names.h),
// validated for presence, shape and type class. Read-only after load; shared by all sessions.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "model/attention.h"
#include "model/config.h"
#include "model/weights.h"

namespace dsv4 {

class GgufFile;

struct LayerWeights {
  HcWeights hc_attn, hc_ffn;
  WeightView attn_norm, ffn_norm;
  AttentionWeights attn;
  MoeWeights moe;
};

struct ModelWeights {
  WeightView token_embd;   // [D, V]
  WeightView output_norm;  // [D]
  WeightView output;       // [D -> V]
  HcHeadWeights hc_head;
  std::vector<LayerWeights> layers;
};

class Model {
 public:
  // Opens, reads the config (model-spec §13.2) and binds every tensor (§13.3). Throws dsv4::Error naming the
  // file and the key / tensor (expected vs found) on any mismatch.
  static std::unique_ptr<Model> load(const std::string& path);
  ~Model();

  const ModelConfig& config() const { return config_; }
  const ModelWeights& weights() const { return weights_; }
  const GgufFile& file() const { return *file_; }
  uint64_t weight_bytes() const { return weight_bytes_; }

 private:
  Model() = default;
  void bind();

  std::unique_ptr<GgufFile> file_;
  ModelConfig config_;
  ModelWeights weights_;
  uint64_t weight_bytes_ = 0;
  std::vector<std::string> names_;                  // storage for WeightView::name (stable: reserved up front)
  std::vector<std::vector<float>> f32_copies_;      // F16/BF16 vectors widened to F32 (stable: reserved)
};

}  // namespace dsv4
