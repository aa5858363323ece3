// Format data: the DeepSeek V4 (Flash, original release) added-token table, ids 128000..129279.
//
// Sources: ../shared/docs/io-and-api.md §1.6 (a V4 special-token table in a tiktoken-style Rust crate that
// agrees with fixtures reading the real tokenizer.json), and for ids 129265..129279 — which §1.6 only
// describes — a public table of the V4 vs V4.1 added-token differences (ids 128799, 129264..129270, 129279)
// and the V4.1 table for 129271..129278, which both name the same strings. 129265 really is spelled
// "<｜/table>｜" in V4 (a typo in DeepSeek's file that the sources agree on).
// A GGUF we load is always authoritative: the tokenizer reads its token array and never these ids.
#include <cstdio>

#include "common/error.h"
#include "text/vocab.h"

namespace dsv4::text {

namespace {

std::vector<std::string> build_added() {
  std::vector<std::string> t;
  t.reserve(1280);
  for (int i = 0; i < 800; ++i)  // 128000..128799
    t.push_back("<｜place▁holder▁no▁" + std::to_string(i) + "｜>");
  const char* named[] = {
      "<｜fim▁hole｜>",
      "<｜fim▁begin｜>",
      "<｜fim▁end｜>",  // 128800..128802
      "<｜User｜>",
      "<｜Assistant｜>",
      "<|EOT|>",  // 128803..128805
      "<｜tool▁calls▁begin｜>",
      "<｜tool▁calls▁end｜>",
      "<｜tool▁call▁begin｜>",  // 128806..
      "<｜tool▁call▁end｜>",
      "<｜tool▁outputs▁begin｜>",
      "<｜tool▁outputs▁end｜>",
      "<｜tool▁output▁begin｜>",
      "<｜tool▁output▁end｜>",
      "<｜tool▁sep｜>",  // ..128814
      "<｜begin▁of▁repo▁name｜>",
      "<｜end▁of▁repo▁name｜>",
      "<｜begin▁of▁file▁name｜>",  // 128815..
      "<｜end▁of▁file▁name｜>",
      "<｜begin▁of▁file｜>",
      "<｜end▁of▁file｜>",  // ..128820
      "<think>",
      "</think>",  // 128821, 128822
      "<｜place▁holder▁for▁copy｜>",
      "<｜place▁holder▁for▁pointer▁replace｜>",  // 128823, 128824
      "｜DSML｜",
      "<｜begin▁sys｜>",
      "<｜end▁sys｜>",
      "<｜latest_reminder｜>",  // 128825..128828
      "<｜action｜>",
      "<｜query｜>",
      "<｜authority｜>",
      "<｜domain｜>",
      "<｜task｜>",  // 128829..128833
      "<｜political｜>",
      "<｜entity｜>",
      "<｜title｜>",
      "<｜safety｜>",
      "<｜answer｜>",  // 128834..128838
      "<｜search｜>",
      "<dsml:",
      "</dsml:",
      "<｜search▁begin｜>",
      "<｜search▁end｜>",  // 128839..128843
      "<｜extracted_url｜>",
      "<｜read_url｜>",
      "<｜end_of_query｜>",  // 128844..128846
  };
  for (const char* s : named) t.push_back(s);
  for (int i = 21; i <= 435; ++i) {  // 128847..129261
    char buf[48];
    std::snprintf(buf, sizeof buf, "<|place_holder_mm_span_%04d|>", i);
    t.push_back(buf);
  }
  const char* tail[] = {
      "<｜rl_image_pad｜>", "<｜rl_image_start｜>",
      "<｜image2｜>",  // 129262..129264
      "<｜/table>｜",       "<｜table｜>",
      "<｜/td｜>",          "<｜td｜>",
      "<｜/tr｜>",          "<｜tr｜>",  // 129265..129270
      "<｜/polygon｜>",     "<｜polygon｜>",
      "<｜/point｜>",       "<｜point｜>",  // 129271..129274
      "<｜/box｜>",         "<｜box｜>",
      "<｜/ref｜>",         "<｜ref｜>",  // 129275..129278
      "<｜image｜>",                      // 129279
  };
  for (const char* s : tail) t.push_back(s);
  return t;
}

}  // namespace

const std::vector<std::string>& v4_added_tokens() {
  static const std::vector<std::string> table = [] {
    auto t = build_added();
    DSV4_CHECK(t.size() == size_t(kDeepSeekV4VocabSize - kDeepSeekBaseVocabSize));
    return t;
  }();
  return table;
}

}  // namespace dsv4::text
