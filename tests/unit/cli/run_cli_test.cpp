// `dsv4 run` end to end on the tiny random-weight model (written once per test run by `dsv4 synth`): one-shot
// output and status line, multi-turn over stdin on one live session, /save + /load, the missing-model help,
// and the tmux-driven interactive check (scripts/chat-tmux-test.sh). The model's text is noise, so the checks
// are on structure: token counts of each turn's prompt (derived by hand below) and the status lines.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <regex>

#include "cli_util.h"

namespace dsv4::test {
namespace {

const std::string& tiny_model() {
  static const std::string path = [] {
    std::string p = testing::TempDir() + "/dsv4-cli-tiny.gguf";
    // Always rewritten: a file left by an older build could be in an older layout (synth is fast).
    std::filesystem::remove(p);
    run_dsv4("synth --shape tiny --seed 1 --out '" + p + "'");
    return p;
  }();
  return path;
}

std::vector<int> status_numbers(const std::string& out, const char* field) {
  std::vector<int> v;
  std::regex re(std::string("\\[prompt (\\d+) tok.*\\| ctx (\\d+)/"));
  for (auto it = std::sregex_iterator(out.begin(), out.end(), re); it != std::sregex_iterator(); ++it)
    v.push_back(std::stoi((*it)[std::string(field) == "prompt" ? 1 : 2]));
  return v;
}

TEST(RunCli, OneShot) {
  ASSERT_TRUE(std::filesystem::exists(tiny_model()));
  Ran r = run_dsv4("run -m '" + tiny_model() + "' -s '' --nothink -n 5 --seed 1 -p 'Hello world'", true);
  EXPECT_EQ(r.status, 0) << r.out;
  // BOS <｜User｜> Hello world <｜Assistant｜> </think> = 6 tokens; 5 generated -> ctx 11.
  EXPECT_EQ(status_numbers(r.out, "prompt"), std::vector<int>{6}) << r.out;
  EXPECT_EQ(status_numbers(r.out, "ctx"), std::vector<int>{11}) << r.out;
  EXPECT_NE(r.out.find("| nothink | length]"), std::string::npos) << r.out;
}

TEST(RunCli, SameSeedSameReply) {
  std::string cmd = "run -m '" + tiny_model() + "' -n 6 --seed 5 -p 'x'";
  Ran a = run_dsv4(cmd), b = run_dsv4(cmd);
  EXPECT_EQ(a.status, 0);
  EXPECT_FALSE(a.out.empty());
  EXPECT_EQ(a.out, b.out);
}

TEST(RunCli, MultiTurnOverStdinExtendsOneSession) {
  std::string save = testing::TempDir() + "/dsv4-cli-session";
  std::string input_path = testing::TempDir() + "/dsv4-cli-input.txt";
  std::ofstream(input_path) << "Hello world\n/nothink\nHello world\n/save " << save << "\n/load " << save
                            << "\n/think\nHello world\n/quit\n";
  Ran r = run_dsv4("run -m '" + tiny_model() + "' -s '' -n 4 --seed 2 < '" + input_path + "'", true);
  EXPECT_EQ(r.status, 0) << r.out;
  // Turn 1: BOS User "Hello world"(2) Assistant <think> = 6. Later turns: EOS (closing the previous reply,
  // cut by -n) + User + 2 + Assistant + </think> or <think> = 6, and nothing else is re-evaluated.
  EXPECT_EQ(status_numbers(r.out, "prompt"), (std::vector<int>{6, 6, 6})) << r.out;
  EXPECT_EQ(status_numbers(r.out, "ctx"), (std::vector<int>{10, 20, 30})) << r.out;
  EXPECT_NE(r.out.find("saved " + save + " (20 tokens)"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("loaded " + save + " (20 tokens)"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("| nothink | length]"), std::string::npos) << r.out;
}

TEST(RunCli, ReadFileAndLongPrefill) {
  // /read sends a file as the message; 300 x " word" is 300 tokens (" word" is one token), more than one
  // prefill chunk (256), so the chunked path and its progress bar run. /help and an unknown command too.
  std::string file = testing::TempDir() + "/dsv4-cli-long.txt";
  {
    std::ofstream f(file);
    for (int i = 0; i < 300; ++i) f << " word";
  }
  std::string input_path = testing::TempDir() + "/dsv4-cli-input2.txt";
  std::ofstream(input_path) << "/help\n/read " << file << "\n/nope\n/read /nonexistent\n";
  Ran r =
      run_dsv4("run -m '" + tiny_model() + "' -s '' --nothink -n 2 --seed 3 < '" + input_path + "'", true);
  EXPECT_EQ(r.status, 0) << r.out;
  // BOS + <｜User｜> + 300 + <｜Assistant｜> + </think> = 304.
  EXPECT_EQ(status_numbers(r.out, "prompt"), std::vector<int>{304}) << r.out;
  EXPECT_NE(r.out.find("/think-max"), std::string::npos);  // the help text
  EXPECT_NE(r.out.find("unknown command /nope"), std::string::npos);
  EXPECT_NE(r.out.find("dsv4: error: /read '/nonexistent': No such file"), std::string::npos) << r.out;
}

TEST(RunCli, ContextFullIsReportedAndTheChatGoesOn) {
  std::string file = testing::TempDir() + "/dsv4-cli-long2.txt";
  {
    std::ofstream f(file);
    for (int i = 0; i < 300; ++i) f << " word";
  }
  std::string input_path = testing::TempDir() + "/dsv4-cli-input3.txt";
  std::ofstream(input_path) << "/read " << file << "\nHello world\n";
  Ran r = run_dsv4("run -m '" + tiny_model() + "' -s '' --nothink -c 64 -n 2 --seed 3 < '" + input_path + "'",
                   true);
  EXPECT_EQ(r.status, 0) << r.out;
  EXPECT_NE(r.out.find("context full"), std::string::npos) << r.out;
  // The failed turn left nothing behind: the next one starts from BOS (6 tokens, see OneShot).
  EXPECT_EQ(status_numbers(r.out, "prompt"), std::vector<int>{6}) << r.out;
}

TEST(RunCli, MissingModelExplainsWhereToGetIt) {
  Ran r = run_dsv4("run -m /nonexistent/ds4flash.gguf -p hi", true);
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.out.find("antirez/deepseek-v4-gguf"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("make run"), std::string::npos) << r.out;
}

TEST(RunCli, TmuxDrivenChat) {
  if (std::system("command -v tmux >/dev/null 2>&1") != 0) GTEST_SKIP() << "tmux not installed";
  std::string build = std::filesystem::path(DSV4_BINARY).parent_path().string();
  std::string cmd = std::string(DSV4_SOURCE_DIR) + "/scripts/chat-tmux-test.sh '" + build + "' 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  ASSERT_NE(p, nullptr);
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  int st = pclose(p);
  EXPECT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 0) << out;
  EXPECT_NE(out.find("chat-tmux-test: PASS"), std::string::npos) << out;
}

}  // namespace
}  // namespace dsv4::test
