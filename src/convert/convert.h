// `dsv4 convert`: DeepSeek-V4 safetensors checkpoint -> ds4-layout GGUF (model-spec §12.3, §13).
//
// Accepts both naming layouts: HF transformers save_pretrained (model.layers.N.attn.wq_a.weight,
// model.embed_tokens.weight, model.hc_head.hc_fn, head.weight, attn.norm.weight for the KV norm, per-expert
// ffn.experts.E.w1/w2/w3) and the official release (layers.N..., embed.weight, hc_head_fn, ...) including its
// FP8 E4M3 weights with E8M0 128x128 block scales and FP4 E2M1 experts with E8M0 per-32 scales (or F32
// `weight_scale_inv` multipliers). MTP tensors (mtp.*) are skipped: ds4 ships MTP as a separate file.
//
// Streaming: tensors are written one at a time, large ones in row chunks and expert stacks one expert at a
// time, so memory stays bounded (~ one expert matrix in f32 plus its quantized copy) at any model size.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "convert/mix.h"
#include "model/config.h"

namespace dsv4 {

struct ConvertOptions {
  std::string in_dir;    // checkpoint directory (config.json + safetensors)
  std::string out_path;  // GGUF to write
  Mix mix = Mix::F32;
  std::function<void(const std::string&)> log;  // progress lines; null = silent
};

struct ConvertReport {
  ModelConfig config;
  int n_tensors = 0;          // GGUF tensors written
  int n_skipped = 0;          // checkpoint tensors deliberately not converted (MTP, hash-layer bias)
  uint64_t out_bytes = 0;     // tensor data bytes written
};

ConvertReport convert_checkpoint(const ConvertOptions& options);

// Maps a checkpoint tensor name (either layout) to the official canonical name without the "model." prefix,
// e.g. "model.embed_tokens.weight" -> "embed.weight", "model.layers.3.attn.norm.weight" ->
// "layers.3.attn.kv_norm.weight", "x.weight_scale_inv" -> "x.scale". Exposed for tests.
std::string canonical_tensor_name(const std::string& checkpoint_name);

// GGUF name for a canonical weight name, plus the expert index for per-expert tensors (-1 otherwise).
// Returns false for names the model does not have.
bool gguf_name_for(const std::string& canonical, std::string* gguf_name, int* expert);

}  // namespace dsv4
