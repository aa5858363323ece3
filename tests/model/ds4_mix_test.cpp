// Files with ds4's tensor types (model-spec §13.1: F16 HC/compressor/indexer/router/embedding, Q8_0
// projections and head, K-quant experts), written by `dsv4 synth --shape tiny --mix q2|q4`, bind unchanged and
// keep the chunking invariants on the quantized paths (Q8_0 / Q8_K activations).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <filesystem>
#include <string>
#include <vector>

#include "dsv4/engine.h"
#include "gguf/gguf.h"

using namespace dsv4;

namespace {

std::string tmp(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("dsv4_ds4mix_" + std::to_string(::getpid()) + "_" + name))
      .string();
}

}  // namespace

class Ds4Mix : public ::testing::TestWithParam<const char*> {};

TEST_P(Ds4Mix, BindsRunsAndChunksBitwise) {
  const std::string mix = GetParam(), path = tmp(mix + ".gguf");
  const std::string cmd = std::string(DSV4_BINARY) + " synth --shape tiny --mix " + mix + " --out " + path +
                          " > /dev/null 2>&1";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  {
    // The file really carries the quantized types this test is about.
    auto f = GgufFile::open(path);
    EXPECT_EQ(f->get_tensor("token_embd.weight").type, 1u);  // F16
    EXPECT_EQ(f->get_tensor("blk.3.attn_q_a.weight").type, 8u);  // Q8_0
    EXPECT_EQ(f->get_tensor("blk.3.ffn_down_exps.weight").type, mix == "q2" ? 10u : 12u);  // Q2_K / Q4_K
  }
  EngineOptions o;
  o.model_path = path;
  o.backend = BackendKind::Cpu;
  auto e = Engine::load(o);
  const size_t V = size_t(e->info().n_vocab);
  std::vector<Token> toks;
  for (int i = 0; i < 24; ++i) toks.push_back(Token((i * 5281 + 3) % int(V)));
  auto whole = e->new_session(32);
  std::vector<float> a, b, rows;
  whole->eval(toks, &a);
  for (float v : a) ASSERT_TRUE(std::isfinite(v));
  auto parts = e->new_session(32);
  for (size_t at = 0; at < toks.size();) {
    size_t n = at < 5 ? 1 : 7;  // decode steps, then uneven chunks
    n = std::min(n, toks.size() - at);
    parts->eval(std::span<const Token>(toks.data() + at, n), &rows);
    b.insert(b.end(), rows.begin(), rows.end());
    at += n;
  }
  ASSERT_EQ(a.size(), toks.size() * V);
  ASSERT_EQ(b.size(), a.size());
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0) << "chunked/decoded logits differ from whole prefill on mix " << mix;
  std::remove(path.c_str());
}

INSTANTIATE_TEST_SUITE_P(Mixes, Ds4Mix, ::testing::Values("q2", "q4"));
