// `dsv4 logits` (stable diagnostic interface): output layout and equality with the Session API, for full
// prefill, --decode and --chunks; precise errors for bad arguments.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "dsv4/engine.h"
#include "tiny_model.h"

using namespace dsv4;

namespace {

std::string tmp(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("dsv4_logits_cli_" + std::to_string(::getpid()) + "_" + name))
      .string();
}

std::string slurp(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

// Runs the dsv4 binary with `args`; returns the exit status, stderr in *err.
int run_dsv4(const std::string& args, std::string* err) {
  std::string e = tmp("stderr.txt");
  int rc = std::system((std::string(DSV4_BINARY) + " " + args + " 2> " + e).c_str());
  *err = slurp(e);
  std::remove(e.c_str());
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

class LogitsCli : public ::testing::Test {
 protected:
  void SetUp() override {
    model = tmp("model.gguf");
    test::write_tiny_model(model, test::tiny_config());
    for (int i = 0; i < 30; ++i) tokens.push_back(Token((i * 37 + 5) % 96));
    for (Token t : tokens) token_str += std::to_string(t) + " ";
  }
  void TearDown() override { std::remove(model.c_str()); }

  std::vector<float> reference() {
    EngineOptions o;
    o.model_path = model;
    o.backend = BackendKind::Cpu;
    auto e = Engine::load(o);
    auto s = e->new_session(int64_t(tokens.size()));
    std::vector<float> rows;
    s->eval(tokens, &rows);
    return rows;
  }

  std::string model, token_str;
  std::vector<Token> tokens;
};

}  // namespace

TEST_F(LogitsCli, AllModesEqualTheSessionApiBitwise) {
  const std::vector<float> ref = reference();
  const std::string expect(reinterpret_cast<const char*>(ref.data()), ref.size() * sizeof(float));
  ASSERT_EQ(expect.size(), tokens.size() * 96 * 4);  // one row of n_vocab f32 per input position
  for (const char* mode : {"", "--decode", "--chunks 7,13", "--chunks 1,1,29"}) {
    std::string out = tmp("out.f32"), err;
    int rc = run_dsv4("logits -m " + model + " --tokens \"" + token_str + "\" --out " + out + " " + mode, &err);
    ASSERT_EQ(rc, 0) << mode << ": " << err;
    EXPECT_TRUE(slurp(out) == expect) << "mode '" << mode << "' differs from Session::eval";
    std::remove(out.c_str());
  }
}

TEST_F(LogitsCli, BadArgumentsGivePreciseErrors) {
  std::string out = tmp("out.f32"), err;
  EXPECT_EQ(run_dsv4("logits -m " + model + " --tokens \"1 2 x3\" --out " + out, &err), 1);
  EXPECT_NE(err.find("--tokens: 'x3' is not a valid number"), std::string::npos) << err;
  EXPECT_EQ(run_dsv4("logits -m " + model + " --tokens \"1 2 500\" --out " + out, &err), 1);
  EXPECT_NE(err.find("token id 500"), std::string::npos) << err;
  EXPECT_EQ(run_dsv4("logits -m " + model + " --tokens \"1 2\" --backend tpu --out " + out, &err), 1);
  EXPECT_NE(err.find("--backend: expected cpu or cuda, found 'tpu'"), std::string::npos) << err;
  EXPECT_EQ(run_dsv4("logits -m " + tmp("missing.gguf") + " --tokens \"1\" --out " + out, &err), 1);
  EXPECT_NE(err.find("missing.gguf"), std::string::npos) << err;
  std::remove(out.c_str());
}
