// Hostile input to the dsv4 commands (QA pass): each case must end with one "dsv4: error: ..." line naming
// the problem and a non-zero exit (or, inside the chat, an error line after which the chat goes on), never a
// crash, a hang, a silent wrong answer or the loss of a file saved before. Every test here failed before the
// fix it guards (the comment says what happened).
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>

#include "cli_util.h"

namespace dsv4::test {
namespace {

namespace fs = std::filesystem;

const std::string& model() {
  static const std::string path = [] {
    std::string p = testing::TempDir() + "/dsv4-cli-hostile-tiny.gguf";
    fs::remove(p);
    run_dsv4("synth --shape tiny --seed 1 --out '" + p + "'");
    return p;
  }();
  return path;
}

// Files of this run live in one directory, removed at exit (static destructor).
std::string scratch(const std::string& name) {
  struct Dir {
    fs::path path = fs::path(testing::TempDir()) / ("dsv4-hostile-" + std::to_string(::getpid()));
    ~Dir() {
      std::error_code ec;
      fs::remove_all(path, ec);
    }
  };
  static Dir dir;
  fs::create_directories(dir.path);
  return (dir.path / name).string();
}

std::string slurp(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// The error contract: non-zero exit, and the output holds a "dsv4: error:" line containing `needle`.
void expect_error_line(const Ran& r, const std::string& needle) {
  EXPECT_NE(r.status, 0) << r.out;
  EXPECT_NE(r.status, -1) << "killed by a signal: " << r.out;
  // Inside the chat the line follows the "> " prompt (stdout and stderr are merged here).
  const std::string quoted = std::regex_replace(needle, std::regex(R"([.^$|()\[\]{}*+?\\])"), R"(\$&)");
  std::regex line("(^|\n)(> )*dsv4: error: [^\n]*" + quoted);
  EXPECT_TRUE(std::regex_search(r.out, line))
      << "want an error line containing '" << needle << "', got:\n" << r.out;
}

// Was: CLI11's own "Could not convert: --threads = abc" / "The following argument was not expected", not the
// documented one-line error shape.
TEST(HostileCli, ParseErrorsAreOneErrorLine) {
  Ran r = run_dsv4("logits -m x.gguf --tokens 1 --out x.bin -t abc", true);
  expect_error_line(r, "--threads");
  r = run_dsv4("run --no-such-flag", true);
  expect_error_line(r, "--no-such-flag");
  r = run_dsv4("--help", true);  // help is not an error
  EXPECT_EQ(r.status, 0) << r.out;
}

// Was: -n -1 generated nothing and exited 0; --ctx 0 failed only after the model load with "session:
// max_context"; --ctx 10^12 (far past the model's 65536) was accepted.
TEST(HostileCli, RunRejectsAbsurdNumbers) {
  ASSERT_TRUE(fs::exists(model()));
  const std::string m = "run -m '" + model() + "' -s '' --temp 0 ";
  expect_error_line(run_dsv4(m + "-n -1 -p hi", true), "-n/--tokens");
  expect_error_line(run_dsv4(m + "-n 2 --ctx 0 -p hi", true), "--ctx");
  expect_error_line(run_dsv4(m + "-n 2 --ctx 1000000000000 -p hi", true), "context length 65536");
  expect_error_line(run_dsv4(m + "-n 2 -t -3 -p hi", true), "--threads");
}

// Was: -p '' fell through to the interactive chat (exit 0 at end of stdin); --prompt-file DIR read as empty
// and did the same.
TEST(HostileCli, EmptyPromptsAreErrors) {
  const std::string m = "run -m '" + model() + "' -s '' -n 2 ";
  expect_error_line(run_dsv4(m + "-p '' < /dev/null", true), "prompt is empty");
  expect_error_line(run_dsv4(m + "--prompt-file '" + testing::TempDir() + "' < /dev/null", true), "is a directory");
  std::string empty = scratch("empty.txt");
  std::ofstream(empty).close();
  expect_error_line(run_dsv4(m + "--prompt-file '" + empty + "' < /dev/null", true), "file is empty");
}

// Was: synth --seed -1 was taken as seed 2^64 - 1 (CLI11 wraps negatives into unsigned options).
TEST(HostileCli, SynthNegativeSeedIsAnError) {
  expect_error_line(run_dsv4("synth --shape tiny --seed -1 --out '" + scratch("neg.gguf") + "'", true), "--seed");
  EXPECT_FALSE(fs::exists(scratch("neg.gguf")));
}

// Was: a directory given as --file tokenized as the empty string (exit 0, empty line).
TEST(HostileCli, TokenizeDirectoryIsAnError) {
  expect_error_line(run_dsv4("tokenize --file '" + testing::TempDir() + "'", true), "is a directory");
}

// Was: -t 5000 started 5000 OS threads (and -t 100000 aborted under ASan).
TEST(HostileCli, AbsurdThreadCountIsAnError) {
  Ran r = run_dsv4("logits -m '" + model() + "' --tokens 1 -t 5000 --out '" + scratch("t.bin") + "'", true);
  expect_error_line(r, "thread count 5000");
}

// Was: "--out DIR" only failed after the whole forward, as "cannot open for writing".
TEST(HostileCli, LogitsOutputDirectoryRefusedUpFront) {
  expect_error_line(run_dsv4("logits -m '" + model() + "' --tokens 1 --out '" + testing::TempDir() + "'", true),
                    "is a directory");
}

// Was: /save wrote the state file in place and then failed on NAME.json, leaving the new state next to the
// old transcript (the earlier save was lost). Now both files are written to temporaries first.
TEST(HostileCli, FailedSaveKeepsTheEarlierSave) {
  std::string save = scratch("keep");
  { std::ofstream(save) << "OLDSTATE"; }
  fs::create_directories(save + ".json");  // makes writing the transcript fail
  std::string input = scratch("keep-input.txt");
  std::ofstream(input) << "Hello\n/save " << save << "\n/quit\n";
  Ran r = run_dsv4("run -m '" + model() + "' -s '' -n 2 --seed 1 < '" + input + "'", true);
  EXPECT_EQ(r.status, 0) << r.out;  // the chat survives the failed command
  EXPECT_NE(r.out.find("dsv4: error: "), std::string::npos) << r.out;
  EXPECT_EQ(slurp(save), "OLDSTATE");
  fs::remove_all(save + ".json");
}

// Was: a message with invalid UTF-8 made /save throw nlohmann's type_error, which ended the whole chat with
// "dsv4: internal error" (exit 2).
TEST(HostileCli, SaveWithInvalidUtf8MessageWorks) {
  std::string save = scratch("utf8");
  std::string input = scratch("utf8-input.txt");
  std::ofstream(input, std::ios::binary) << "bad \xff\xfe bytes \xc3\n/save " << save << "\n/load " << save
                                         << "\n/quit\n";
  Ran r = run_dsv4("run -m '" + model() + "' -s '' -n 2 --seed 1 < '" + input + "'", true);
  EXPECT_EQ(r.status, 0) << r.out;
  EXPECT_NE(r.out.find("saved " + save), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("loaded " + save), std::string::npos) << r.out;
}

// Was: a transcript with a wrongly typed field ("ctx": "abc") threw nlohmann's type_error out of the chat
// (exit 2, conversation gone). Now: an error line naming the file, and the chat goes on.
TEST(HostileCli, CorruptSessionFilesGiveErrorsAndTheChatGoesOn) {
  std::string bad_json = scratch("badjson");
  { std::ofstream(bad_json) << "state"; }
  { std::ofstream(bad_json + ".json") << R"({"ctx": "abc", "messages": []})"; }
  std::string bad_state = scratch("badstate");
  { std::ofstream(bad_state) << "not a session state stream"; }
  { std::ofstream(bad_state + ".json") << R"({"ctx": 64, "messages": []})"; }
  std::string input = scratch("load-input.txt");
  std::ofstream(input) << "/load " << bad_json << "\n/load " << bad_state << "\n/load " << scratch("missing")
                       << "\nHello world\n/quit\n";
  Ran r = run_dsv4("run -m '" + model() + "' -s '' -n 2 --seed 1 < '" + input + "'", true);
  EXPECT_EQ(r.status, 0) << r.out;
  expect_error_line({1, r.out}, bad_json + ".json");
  expect_error_line({1, r.out}, "missing.json");
  expect_error_line({1, r.out}, bad_state + ": ");  // restore()'s message, prefixed with the file
  // BOS + User + "Hello world"(2) + Assistant + <think>: a fresh first turn, nothing half-loaded.
  EXPECT_NE(r.out.find("[prompt 6 tok"), std::string::npos) << "the chat did not go on:\n" << r.out;
}

// Was: /ctx N too small for the transcript left a fresh session without BOS behind it: the next turn was
// evaluated without the conversation (prompt 5 tokens, ctx restarting from 0) and --ctx silently changed.
TEST(HostileCli, FailedCtxChangeKeepsTheSession) {
  std::string input = scratch("ctx-input.txt");
  std::string long_msg;
  for (int i = 0; i < 60; ++i) long_msg += "word" + std::to_string(i) + " ";
  std::ofstream(input) << long_msg << "\n/ctx 64\nHello world\n/quit\n";
  Ran r = run_dsv4("run -m '" + model() + "' -s '' --nothink -c 400 -n 2 --seed 1 < '" + input + "'", true);
  EXPECT_EQ(r.status, 0) << r.out;
  EXPECT_NE(r.out.find("dsv4: error: context full"), std::string::npos) << r.out;
  // Turn 2 continues the live session: EOS + User + "Hello world"(2) + Assistant + </think> = 6 tokens, and
  // the status still shows the old context size.
  std::regex second(R"(\[prompt 6 tok[^\]]*\| ctx (\d+)/400 )");
  std::smatch m;
  ASSERT_TRUE(std::regex_search(r.out, m, second)) << r.out;
  EXPECT_GT(std::stoi(m[1]), 70) << r.out;
}

// Was: --ctx-max 10^12 ran until killed; --csv DIR failed only after the whole benchmark; CSV/SVG were written
// in place (a failed write lost an earlier result).
TEST(HostileCli, BenchChecksContextAndOutputsUpFront) {
  ASSERT_TRUE(fs::exists(model()));
  const std::string b = "bench -m '" + model() + "' --backend cpu --gen-tokens 1 --ctx-start 16 ";
  expect_error_line(run_dsv4(b + "--ctx-max 1000000000000", true), "--ctx-max");
  expect_error_line(run_dsv4(b + "--ctx-max 2000000", true), "context length");
  expect_error_line(run_dsv4(b + "--ctx-max 32 --csv '" + testing::TempDir() + "'", true), "is a directory");
  const std::string csv = scratch("bench.csv");
  Ran ok = run_dsv4(b + "--ctx-max 32 --csv '" + csv + "'", true);
  EXPECT_EQ(ok.status, 0) << ok.out;
  EXPECT_EQ(slurp(csv).rfind("backend,ctx,", 0), 0u) << slurp(csv);
}

}  // namespace
}  // namespace dsv4::test
