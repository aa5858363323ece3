// `dsv4 inspect` end to end: runs the built binary (DSV4_BINARY) on files written with GgufWriter and checks
// the text table, the --json output and the error path on a damaged file.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <sys/wait.h>

#include <cstdio>
#include <filesystem>
#include <string>

#include "gguf/gguf.h"
#include "gguf_test_util.h"

using namespace dsv4;

namespace {

struct RunResult {
  int exit_code;
  std::string out;
};

RunResult run_inspect(const std::string& args) {
  std::string cmd = std::string(DSV4_BINARY) + " inspect " + args + " 2>&1";
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) return {-1, "popen failed"};
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  int status = ::pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

void write_sample(const std::string& path) {
  GgufWriter w(path);
  w.add_string("general.architecture", "deepseek4");
  w.add_u32("deepseek4.block_count", 43);
  std::vector<int32_t> ratios(43, 4);
  w.add_array_i32("deepseek4.attention.compress_ratios", ratios);
  w.add_f32("deepseek4.rope.freq_base", 10000.0f);
  std::vector<std::string> toks = {"<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "a"};
  w.add_array_string("tokenizer.ggml.tokens", toks);
  w.add_tensor("token_embd.weight", 1, {64, 3});
  w.add_tensor("blk.0.ffn_gate_exps.weight", 12, {256, 8, 4});
  w.begin_data();
  w.skip_tensor_data("token_embd.weight");
  w.skip_tensor_data("blk.0.ffn_gate_exps.weight");
  w.finish();
}

bool have_binary() { return std::filesystem::exists(DSV4_BINARY); }

}  // namespace

TEST(Inspect, TextTable) {
  if (!have_binary()) GTEST_SKIP() << "dsv4 binary not built at " << DSV4_BINARY;
  test::TempPath p("inspect");
  write_sample(p);
  RunResult r = run_inspect(p.str() + " --max-items 4");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("GGUF v3, 5 metadata keys, 2 tensors"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("u32        deepseek4.block_count = 43"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("[i32]      deepseek4.attention.compress_ratios = [4, 4, 4, 4, ... (43 items)]"),
            std::string::npos)
      << r.out;
  EXPECT_NE(r.out.find("\"<｜begin▁of▁sentence｜>\""), std::string::npos) << r.out;
  // Q4_K [256, 8, 4]: 1 block of 144 bytes per row, 32 rows.
  EXPECT_NE(r.out.find("Q4_K     [256, 8, 4]"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(" 4608 "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("F16      [64, 3]"), std::string::npos) << r.out;
}

TEST(Inspect, Json) {
  if (!have_binary()) GTEST_SKIP() << "dsv4 binary not built at " << DSV4_BINARY;
  test::TempPath p("inspect");
  write_sample(p);
  RunResult r = run_inspect(p.str() + " --json --max-items 2");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  nlohmann::json j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["version"], 3);
  ASSERT_EQ(j["metadata"].size(), 5u);
  EXPECT_EQ(j["metadata"][1]["key"], "deepseek4.block_count");
  EXPECT_EQ(j["metadata"][1]["value"], 43);
  EXPECT_EQ(j["metadata"][2]["count"], 43);
  EXPECT_EQ(j["metadata"][2]["value"].size(), 2u);
  EXPECT_EQ(j["metadata"][2]["truncated"], true);
  EXPECT_EQ(j["metadata"][3]["value"], 10000.0);
  ASSERT_EQ(j["tensors"].size(), 2u);
  EXPECT_EQ(j["tensors"][1]["type"], "Q4_K");
  EXPECT_EQ(j["tensors"][1]["n_bytes"], 4608);
  EXPECT_EQ(j["tensors"][1]["shape"], nlohmann::json({256, 8, 4}));
}

TEST(Inspect, DamagedFileFailsWithReaderError) {
  if (!have_binary()) GTEST_SKIP() << "dsv4 binary not built at " << DSV4_BINARY;
  test::TempPath p("inspect");
  write_sample(p);
  std::vector<uint8_t> bytes = test::read_bytes(p);
  bytes.resize(bytes.size() - 1);
  test::write_bytes(p, bytes);
  RunResult r = run_inspect(p.str());
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.out.find("dsv4: error: " + p.str() + ": tensor 'blk.0.ffn_gate_exps.weight'"), std::string::npos)
      << r.out;
}
