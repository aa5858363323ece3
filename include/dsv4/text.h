// dsv4 text API: tokenizer, chat prompt rendering (encoding_dsv4), output parsing (reasoning / content /
// DSML tool calls) and sampling. Tensor-free: used by the CLI, the server and the tests without the model.
//
// Error policy as everywhere: bad input throws dsv4::Error naming the file / key / field / offset.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
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

// A prompt as the renderer builds it: text segments (client or template text, always tokenized as plain
// BPE) and special segments (one control token each, looked up by string). Keeping the two apart is what
// stops a user who types "<｜User｜>" from forging a turn marker (ds4 #95).
struct PromptSegment {
  bool special = false;
  std::string text;
};
struct Prompt {
  std::vector<PromptSegment> segments;
  void add_text(std::string_view s);
  void add_special(std::string_view s);
  void append(const Prompt& other);
  std::string str() const;  // the rendered string (what the official encoder returns)
};

// Byte-level BPE tokenizer (DeepSeek V3/V4: GPT-2 bytes, three-regex pre-tokenizer, rank-ordered merges).
// Immutable after construction and cheap to copy (shared state); safe to use from several threads.
class Tokenizer {
 public:
  explicit Tokenizer(const TokenizerData& data);
  // Reads tokenizer.ggml.* from a GGUF file (tokens, merges; model must be "gpt2").
  static Tokenizer from_gguf(const std::string& path);
  // The real DeepSeek V4 vocabulary rebuilt from the tiktoken file shipped in data/ (used without -m).
  static Tokenizer builtin();
  static Tokenizer from_tiktoken(const std::string& path);

  int n_vocab() const;
  Token bos() const;
  Token eos() const;

  // Plain text -> tokens. Never yields a control token, whatever the text contains.
  std::vector<Token> encode(std::string_view text) const;
  // Rendered prompt -> tokens: text segments as encode(), special segments as their single token.
  std::vector<Token> encode(const Prompt& prompt) const;
  // The pre-tokenizer alone (for tests and diagnostics): the pieces BPE runs on.
  std::vector<std::string> pre_tokenize(std::string_view text) const;

  // Token id of an exact token string (any token), or nullopt.
  std::optional<Token> find(std::string_view token_string) const;
  // Like find() for a control token; throws dsv4::Error naming the string when the vocabulary lacks it.
  Token special(std::string_view token_string) const;
  bool is_special(Token t) const;  // not byte-level text (BOS, <think>, <｜User｜>, ...)

  // Bytes of one token (special tokens: their string); throws on an id out of range.
  std::string token_bytes(Token t) const;
  std::string decode(std::span<const Token> tokens) const;

  struct Impl;

 private:
  std::shared_ptr<const Impl> impl_;
};

// Incremental decoder: feeds tokens, returns only complete UTF-8 (an incomplete trailing sequence is held
// back until the next token completes it, or flush()).
class TokenStream {
 public:
  explicit TokenStream(const Tokenizer& tok) : tok_(&tok) {}
  std::string push(Token t);
  std::string flush();  // whatever is held back (possibly invalid UTF-8)

 private:
  const Tokenizer* tok_;
  std::string pending_;
};

}  // namespace dsv4
