// Tokenizer::from_gguf: the tokenizer.ggml.* keys of a GGUF file (io-and-api.md §1.7).
#include "common/error.h"
#include "dsv4/text.h"
#include "gguf/gguf.h"
#include "text/vocab.h"

namespace dsv4 {

Tokenizer Tokenizer::from_gguf(const std::string& path) {
  auto f = GgufFile::open(path);
  TokenizerData d;
  d.model = f->get_string(text::kGgufKeyModel);
  if (d.model != "gpt2")
    fail("%s: key '%s' is '%s'; only byte-level BPE ('gpt2') is supported", path.c_str(), text::kGgufKeyModel,
         d.model.c_str());
  // V3 conversions say "deepseek-v3", the antirez V4 files "joyai-llm": llama.cpp maps both to the same three
  // regexes, which are the ones built in here. Anything else would tokenize differently.
  d.pre = f->get_string_opt(text::kGgufKeyPre).value_or("deepseek-v3");
  if (d.pre != "deepseek-v3" && d.pre != "joyai-llm")
    fail(
        "%s: key '%s' is '%s'; this engine implements the DeepSeek V3/V4 pre-tokenizer only "
        "('deepseek-v3', 'joyai-llm')",
        path.c_str(), text::kGgufKeyPre, d.pre.c_str());
  d.tokens = f->get_array_string(text::kGgufKeyTokens);
  d.merges =
      f->has(text::kGgufKeyMerges) ? f->get_array_string(text::kGgufKeyMerges) : std::vector<std::string>{};
  if (f->has(text::kGgufKeyTokenType)) d.token_types = f->get_array_i32(text::kGgufKeyTokenType);
  // BOS/EOS ids from the keys when present, else by their V4 strings (never hard-coded ids).
  auto by_string = [&](const char* s, const char* key) -> int32_t {
    for (size_t i = 0; i < d.tokens.size(); ++i)
      if (d.tokens[i] == s) return int32_t(i);
    fail("%s: no key '%s' and no token '%s' in '%s'", path.c_str(), key, s, text::kGgufKeyTokens);
  };
  auto bos = f->get_u32_opt(text::kGgufKeyBos), eos = f->get_u32_opt(text::kGgufKeyEos);
  d.bos_id = bos ? int32_t(*bos) : by_string(chat_tokens::kBos, text::kGgufKeyBos);
  d.eos_id = eos ? int32_t(*eos) : by_string(chat_tokens::kEos, text::kGgufKeyEos);
  try {
    return Tokenizer(d);
  } catch (const dsv4::Error& e) {
    fail("%s: %s", path.c_str(), e.what());
  }
}

}  // namespace dsv4
