// Vocabulary builders: the real V4 arrays rebuilt from the tiktoken file, and synthetic vocabularies.
// Expected values come from io-and-api.md §1.3–1.7 (GGUF dumps and the special-token table), not from the
// code.
#include "text/vocab.h"

#include <gtest/gtest.h>

#include <fstream>

#include "test_util.h"
#include "text/utf8.h"

namespace dsv4::test {

const TokenizerData& v4_data() {
  static const TokenizerData d = text::deepseek_v4_vocab(source_data("deepseek_v3_base_vocab.tiktoken"));
  return d;
}

namespace {

TEST(Vocab, ByteToUnicodeTable) {
  // §1.3: space -> Ġ (U+0120), newline -> Ċ (U+010A), printable ASCII unchanged, 0xAD -> last remapped slot.
  EXPECT_EQ(text::byte_to_unicode(' '), 0x120u);
  EXPECT_EQ(text::byte_to_unicode('\n'), 0x10Au);
  EXPECT_EQ(text::byte_to_unicode('A'), uint32_t('A'));
  EXPECT_EQ(text::byte_to_unicode(0xAD), 256u + 67u);
  std::string all, back;
  for (int b = 0; b < 256; ++b) all.push_back(char(b));
  ASSERT_TRUE(text::unicode_to_bytes(text::bytes_to_unicode(all), back));
  EXPECT_EQ(back, all);
  EXPECT_FALSE(text::unicode_to_bytes("<｜User｜>", back));  // U+FF5C is not in the byte table
}

TEST(Vocab, RealV4Arrays) {
  const TokenizerData& d = v4_data();
  ASSERT_EQ(d.tokens.size(), 129280u);  // §1.5: tokenizer length == embedding rows in V4
  ASSERT_EQ(d.token_types.size(), 129280u);
  // §1.4: 128,000 - 3 specials - 256 bytes = 127,741 merges; first ones as seen in GGUF dumps.
  ASSERT_EQ(d.merges.size(), 127741u);
  EXPECT_EQ(d.merges[0], "Ġ t");
  EXPECT_EQ(d.merges[1], "Ġ a");
  EXPECT_EQ(d.merges[2], "i n");
  EXPECT_EQ(d.merges[3], "Ġ Ġ");
  EXPECT_EQ(d.merges[4], "h e");
  EXPECT_EQ(d.tokens[0], "<｜begin▁of▁sentence｜>");
  EXPECT_EQ(d.tokens[1], "<｜end▁of▁sentence｜>");
  EXPECT_EQ(d.tokens[2], "<｜▁pad▁｜>");
  EXPECT_EQ(d.tokens[3], "!");
  EXPECT_EQ(d.tokens[223], "Ġ");
  // §1.6 table.
  EXPECT_EQ(d.tokens[128000], "<｜place▁holder▁no▁0｜>");
  EXPECT_EQ(d.tokens[128799], "<｜place▁holder▁no▁799｜>");
  EXPECT_EQ(d.tokens[128803], "<｜User｜>");
  EXPECT_EQ(d.tokens[128804], "<｜Assistant｜>");
  EXPECT_EQ(d.tokens[128805], "<|EOT|>");
  EXPECT_EQ(d.tokens[128821], "<think>");
  EXPECT_EQ(d.tokens[128822], "</think>");
  EXPECT_EQ(d.tokens[128825], "｜DSML｜");
  EXPECT_EQ(d.tokens[128828], "<｜latest_reminder｜>");
  EXPECT_EQ(d.tokens[128846], "<｜end_of_query｜>");
  EXPECT_EQ(d.tokens[128847], "<|place_holder_mm_span_0021|>");
  EXPECT_EQ(d.tokens[129261], "<|place_holder_mm_span_0435|>");
  EXPECT_EQ(d.tokens[129264], "<｜image2｜>");
  EXPECT_EQ(d.tokens[129279], "<｜image｜>");
  EXPECT_EQ(d.token_types[0], 3);  // dumps: [3, 3, 3, 1, 1, ...]
  EXPECT_EQ(d.token_types[3], 1);
  EXPECT_EQ(d.bos_id, 0);
  EXPECT_EQ(d.eos_id, 1);
  EXPECT_FALSE(d.add_bos);
  // Every merge joins two existing tokens into a third existing token (GGUF consistency).
  std::unordered_map<std::string, int> ids;
  for (size_t i = 0; i < d.tokens.size(); ++i) ids.emplace(d.tokens[i], int(i));
  size_t bad = 0;
  for (size_t k = 0; k < d.merges.size(); ++k) {
    auto sp = d.merges[k].find(' ');
    std::string l = d.merges[k].substr(0, sp), r = d.merges[k].substr(sp + 1);
    if (!ids.count(l) || !ids.count(r) || !ids.count(l + r)) ++bad;
  }
  EXPECT_EQ(bad, 0u);
}

TEST(Vocab, TiktokenErrorsNameFileAndLine) {
  std::string path = testing::TempDir() + "/bad.tiktoken";
  std::ofstream(path) << "IQ== 0\nnot-base64! 1\n";
  try {
    text::read_tiktoken(path);
    FAIL() << "expected dsv4::Error";
  } catch (const dsv4::Error& e) {
    EXPECT_NE(std::string(e.what()).find("bad.tiktoken:2"), std::string::npos) << e.what();
  }
  std::ofstream(path) << "IQ== 0\nIg== 5\n";
  EXPECT_THROW(text::read_tiktoken(path), dsv4::Error);
  EXPECT_THROW(text::read_tiktoken(path + ".missing"), dsv4::Error);
}

TEST(Vocab, SyntheticHasBytesAndSpecials) {
  int n = text::synthetic_vocab_min_size() + 10;
  TokenizerData d = text::synthetic_vocab(n);
  ASSERT_EQ(int(d.tokens.size()), n);
  ASSERT_EQ(int(d.token_types.size()), n);
  EXPECT_TRUE(d.merges.empty());
  // Bytes sit at 3..258 in the same order as the real vocabulary.
  for (int i = 0; i < 259; ++i) EXPECT_EQ(d.tokens[i], v4_data().tokens[i]) << i;
  for (const char* s : {"<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", "｜DSML｜"})
    EXPECT_NE(std::find(d.tokens.begin(), d.tokens.end(), s), d.tokens.end()) << s;
  EXPECT_THROW(text::synthetic_vocab(260), dsv4::Error);
}

}  // namespace
}  // namespace dsv4::test
