// `dsv4 tokenize` end to end: golden ids (io-and-api.md §1.9) and the official API prompt counts through
// --chat --think none (BOS + <｜User｜> + text + <｜Assistant｜> + </think>). Exact integer comparisons.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli_util.h"

namespace dsv4::test {
namespace {

int count_words(const std::string& s) {
  std::istringstream in(s);
  std::string w;
  int n = 0;
  while (in >> w) ++n;
  return n;
}

TEST(TokenizeCli, GoldenText) {
  Ran r = run_dsv4("tokenize --text 'Hello 你好 World 世界!'");
  EXPECT_EQ(r.status, 0);
  EXPECT_EQ(r.out, "19923 223 30594 4495 223 3427 3\n");
}

TEST(TokenizeCli, ChatRendering) {
  // Non-thinking: BOS(0) <｜User｜>(128803) Hello world <｜Assistant｜>(128804) </think>(128822).
  Ran r = run_dsv4("tokenize --chat --think none --text 'Hello world'");
  EXPECT_EQ(r.out, "0 128803 19923 2058 128804 128822\n");
  r = run_dsv4("tokenize --chat --text 'Hello world'");  // default: thinking (high) -> <think> 128821
  EXPECT_EQ(r.out, "0 128803 19923 2058 128804 128821\n");
}

TEST(TokenizeCli, OfficialPromptCounts) {
  std::filesystem::path dir = std::filesystem::path(DSV4_SHARED_DIR) / "data" / "official-vectors";
  if (!std::filesystem::exists(dir)) GTEST_SKIP() << "reference data missing: " << dir;
  int checked = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    std::string p = e.path().string();
    if (p.size() < 14 || p.substr(p.size() - 14) != ".official.json") continue;
    nlohmann::json j = nlohmann::json::parse(std::ifstream(p));
    std::string txt = testing::TempDir() + "/prompt.txt";
    std::ofstream(txt, std::ios::binary) << j["prompt"].get<std::string>();
    Ran r = run_dsv4("tokenize --chat --think none --file '" + txt + "'");
    EXPECT_EQ(r.status, 0);
    EXPECT_EQ(count_words(r.out), j["usage"]["prompt_tokens"].get<int>()) << p;
    ++checked;
  }
  EXPECT_GE(checked, 3);
}

TEST(TokenizeCli, Errors) {
  Ran r = run_dsv4("tokenize", true);
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.out.find("--text"), std::string::npos) << r.out;
  r = run_dsv4("tokenize -m /nonexistent.gguf --text x", true);
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.out.find("/nonexistent.gguf"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace dsv4::test
