// Tokenizer vocabularies as plain arrays, in the exact form GGUF stores them (tokenizer.ggml.*).
//
// Two sources:
//   * deepseek_v4_vocab(): the real 129,280-entry DeepSeek V4 vocabulary, rebuilt from the tiktoken file of
//     the 128,000 base tokens (data/deepseek_v3_base_vocab.tiktoken) plus the V4 added-token table
//     (v4_added_tokens.cpp). Merges are derived from the ranks (see derive_merges in vocab.cpp).
//   * synthetic_vocab(n): a byte-level vocabulary of any size >= 256 + specials for small test models; it has
//     every special the chat renderer and the output parser need, so chat works on a tiny model.
//
// This module does NOT write GGUF itself: it returns a TokenizerData (include/dsv4/text.h) and the converter
// writes each field under the key named next to it there (kGgufKey* below). That keeps src/text independent
// of the GGUF writer's API; the reading side (Tokenizer::from_gguf) lives in tokenizer_gguf.cpp.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "dsv4/text.h"

namespace dsv4::text {

// GGUF metadata keys for the tokenizer (io-and-api.md §1.7).
inline constexpr const char* kGgufKeyModel = "tokenizer.ggml.model";           // string: "gpt2"
inline constexpr const char* kGgufKeyPre = "tokenizer.ggml.pre";               // string: "joyai-llm" (V4)
inline constexpr const char* kGgufKeyTokens = "tokenizer.ggml.tokens";         // string array
inline constexpr const char* kGgufKeyTokenType = "tokenizer.ggml.token_type";  // int32 array
inline constexpr const char* kGgufKeyMerges = "tokenizer.ggml.merges";         // string array "a b"
inline constexpr const char* kGgufKeyBos = "tokenizer.ggml.bos_token_id";      // uint32
inline constexpr const char* kGgufKeyEos = "tokenizer.ggml.eos_token_id";      // uint32
inline constexpr const char* kGgufKeyPad = "tokenizer.ggml.padding_token_id";  // uint32
inline constexpr const char* kGgufKeyAddBos = "tokenizer.ggml.add_bos_token";  // bool: false for V4

// llama.cpp token types (tokenizer.ggml.token_type values).
enum TokenType : int32_t {
  kTokenNormal = 1,
  kTokenUnknown = 2,
  kTokenControl = 3,
  kTokenUserDefined = 4,
  kTokenUnused = 5,
  kTokenByte = 6
};

// The real vocabulary size of DeepSeek V3/V4 (embedding rows and tokenizer length).
inline constexpr int kDeepSeekV4VocabSize = 129280;
inline constexpr int kDeepSeekBaseVocabSize = 128000;

// GPT-2 byte <-> unicode remapping (§1.3). byte_to_unicode(b) is the code point GGUF strings use for byte b.
uint32_t byte_to_unicode(uint8_t b);
// Remapped string (UTF-8) -> raw bytes. Returns false if a code point is not in the table (e.g. a special
// token such as <｜User｜>, which is not byte-level text).
bool unicode_to_bytes(std::string_view remapped, std::string& bytes);
// Raw bytes -> remapped string (UTF-8).
std::string bytes_to_unicode(std::string_view bytes);

// The V4 added tokens, ids 128000..129279 in order (1,280 strings). Source and caveats in
// v4_added_tokens.cpp.
const std::vector<std::string>& v4_added_tokens();

// Reads a tiktoken file (`base64(token) id` per line, ids dense from 0). Bad lines -> dsv4::Error naming the
// file and line number.
std::vector<std::string> read_tiktoken(const std::string& path);

// Derives one merge "left right" per multi-byte base token, in id order (rank = id), from token strings in
// the remapped alphabet. Tokens that are not byte-level text (specials) and the 256 byte tokens get no merge.
std::vector<std::string> derive_merges(const std::vector<std::string>& tokens, int first_added_id);

// The full DeepSeek V4 tokenizer arrays from the tiktoken file.
TokenizerData deepseek_v4_vocab(const std::string& tiktoken_path);

// Path of the tiktoken file shipped in the repository (data/deepseek_v3_base_vocab.tiktoken), found from
// DSV4_DATA_DIR (env), the build's source dir, or next to the executable. Throws if none exists.
std::string default_tiktoken_path();

// Byte-level vocabulary of exactly n_vocab entries: 0..2 BOS/EOS/pad, 3..258 the bytes in GPT-2 table order
// (as in the real vocabulary), then the chat specials, then placeholder control tokens up to n_vocab.
// No merges (every text byte is one token). Throws if n_vocab is too small to hold bytes + specials.
TokenizerData synthetic_vocab(int n_vocab);
// The smallest n_vocab synthetic_vocab accepts.
int synthetic_vocab_min_size();

}  // namespace dsv4::text
