// Tokenizer::from_gguf: the arrays written under the §1.7 keys load back into a tokenizer that encodes
// exactly like the in-memory one; bad metadata is an error naming the file and key.
#include <gtest/gtest.h>

#include "dsv4/text.h"
#include "gguf/gguf.h"
#include "test_util.h"
#include "text/vocab.h"

namespace dsv4::test {
namespace {

void write_vocab(const std::string& path, const TokenizerData& d, const std::string& model = "gpt2",
                 bool with_ids = true) {
  GgufWriter w(path);
  w.add_string(text::kGgufKeyModel, model);
  w.add_string(text::kGgufKeyPre, d.pre);
  w.add_array_string(text::kGgufKeyTokens, d.tokens);
  w.add_array_i32(text::kGgufKeyTokenType, d.token_types);
  w.add_array_string(text::kGgufKeyMerges, d.merges);
  if (with_ids) {
    w.add_u32(text::kGgufKeyBos, uint32_t(d.bos_id));
    w.add_u32(text::kGgufKeyEos, uint32_t(d.eos_id));
  }
  w.begin_data();
  w.finish();
}

TEST(TokenizerGguf, RealVocabularyRoundTrip) {
  std::string path = testing::TempDir() + "/v4_vocab.gguf";
  write_vocab(path, v4_data());
  Tokenizer tok = Tokenizer::from_gguf(path);
  EXPECT_EQ(tok.n_vocab(), 129280);
  EXPECT_EQ(tok.encode("Hello 你好 World 世界!"),
            (std::vector<Token>{19923, 223, 30594, 4495, 223, 3427, 3}));
  EXPECT_EQ(tok.special("<｜Assistant｜>"), 128804);
  EXPECT_EQ(tok.bos(), 0);
  EXPECT_EQ(tok.eos(), 1);
}

TEST(TokenizerGguf, SyntheticWithoutIdKeys) {
  std::string path = testing::TempDir() + "/syn_vocab.gguf";
  write_vocab(path, text::synthetic_vocab(512), "gpt2", false);
  Tokenizer tok = Tokenizer::from_gguf(path);
  EXPECT_EQ(tok.n_vocab(), 512);
  EXPECT_EQ(tok.bos(), 0);  // found by string
  EXPECT_EQ(tok.decode(tok.encode("abc")), "abc");
}

TEST(TokenizerGguf, WrongModelNamesKey) {
  std::string path = testing::TempDir() + "/llama_vocab.gguf";
  write_vocab(path, text::synthetic_vocab(512), "llama");
  try {
    Tokenizer::from_gguf(path);
    FAIL();
  } catch (const dsv4::Error& e) {
    EXPECT_NE(std::string(e.what()).find("tokenizer.ggml.model"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("llama_vocab.gguf"), std::string::npos) << e.what();
  }
  EXPECT_THROW(Tokenizer::from_gguf(path + ".missing"), dsv4::Error);
}

}  // namespace
}  // namespace dsv4::test
