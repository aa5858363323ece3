// config.json -> ModelConfig, for both dialects a DeepSeek-V4 checkpoint may carry:
//   * HF transformers (5.x save_pretrained): layer_types + compress_rates, mlp_layer_types, nested
//     rope_parameters {main, compress}, partial_rotary_factor;
//   * the official release: compress_ratios, num_hash_layers, qk_rope_head_dim, rope_scaling (yarn).
// YaRN is whatever the config says for the compressed layers (rope_parameters.compress or rope_scaling); a
// compressed rope without yarn is written as factor 1 (which makes the YaRN blend the identity).
#pragma once

#include <string>

#include <nlohmann/json_fwd.hpp>

#include "model/config.h"

namespace dsv4 {

// `where` names the file in error messages ("DIR/config.json: key 'hidden_size' ...").
ModelConfig model_config_from_hf_json(const nlohmann::json& j, const std::string& where);
ModelConfig model_config_from_hf_file(const std::string& config_json_path);

}  // namespace dsv4
