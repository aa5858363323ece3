// dsv4 text API: tokenizer, chat prompt rendering (encoding_dsv4), output parsing (reasoning / content /
// DSML tool calls) and sampling. Tensor-free: used by the CLI, the server and the tests without the model.
//
// Error policy as everywhere: bad input throws dsv4::Error naming the file / key / field / offset.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "dsv4/error.h"

namespace dsv4 {

using Token = int32_t;

// Tokenizer arrays in GGUF form (tokenizer.ggml.*): token strings in the GPT-2 byte-to-unicode alphabet,
// merges "left right" by rank, llama.cpp token types. See src/text/vocab.h for builders and key names.
struct TokenizerData {
  std::vector<std::string> tokens;
  std::vector<std::string> merges;
  std::vector<int32_t> token_types;
  std::string model = "gpt2";
  std::string pre = "deepseek-v3";
  int32_t bos_id = 0, eos_id = 1, pad_id = 2;
  bool add_bos = false;  // V4 tooling writes BOS itself (§1.1)
};

}  // namespace dsv4
