// Quantized mixes on a model wide enough for ds4's real expert types (rows of 256: IQ2_XXS / Q2_K / Q4_K
// instead of the toy-width Q8_0 fallback of the HF fixtures). The checkpoint is random (HF layout, written
// here), converted with f32, q8_0, q4 and q2, and run through the engine (CPU, QAT off). The mean
// KL(p_f32 || p_mix) per position is logged; the only assertions are that every mix loads, runs, gives finite
// logits, uses the expected expert types, and orders q8_0 <= q4 <= q2 in KL (more bits, less divergence; on
// this model the gaps are orders of magnitude, so the ordering is not a noise-level claim).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <random>

#include "convert/convert.h"
#include "dsv4/engine.h"
#include "gguf/gguf.h"
#include "quant/quant.h"
#include "st_util.h"

namespace dsv4 {
namespace {

using test::RawCheckpoint;
using test::RawTensor;
using test::TempDir;

struct Builder {
  RawCheckpoint c;
  std::mt19937_64 rng{12345};
  void normal(const std::string& name, std::vector<int64_t> shape, float sigma, float mean = 0.f) {
    std::normal_distribution<float> d(mean, sigma);
    int64_t n = 1;
    for (auto s : shape) n *= s;
    std::vector<float> v(static_cast<size_t>(n));
    for (auto& x : v) x = d(rng);
    RawTensor t{"F32", shape, std::vector<uint8_t>(v.size() * 4)};
    std::memcpy(t.bytes.data(), v.data(), t.bytes.size());
    c[name] = std::move(t);
  }
  void matrix(const std::string& name, int64_t out, int64_t in) { normal(name, {out, in}, 1.f / std::sqrt(float(in))); }
};

constexpr int D = 256, H = 2, DH = 64, RQ = 64, G = 1, RO = 64, E = 4, K = 2, F = 256, V = 512, N = 4, HI = 2, DI = 32;
const int kRatios[] = {0, 4, 16};

void write_checkpoint(const std::filesystem::path& dir) {
  Builder b;
  b.normal("model.embed_tokens.weight", {V, D}, 1.f);
  b.matrix("head.weight", V, D);
  b.normal("model.norm.weight", {D}, 0.1f, 1.f);
  b.normal("model.hc_head.hc_fn", {N, N * D}, 2.f / std::sqrt(float(N * D)));
  b.normal("model.hc_head.hc_base", {N}, 0.5f);
  b.normal("model.hc_head.hc_scale", {1}, 0.2f, 1.f);
  for (int l = 0; l < 3; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    for (const char* hc : {"hc_attn", "hc_ffn"}) {
      b.normal(p + hc + "_fn", {24, N * D}, 2.f / std::sqrt(float(N * D)));
      b.normal(p + hc + "_base", {24}, 0.5f);
      b.normal(p + hc + "_scale", {3}, 0.2f, 1.f);
    }
    b.normal(p + "attn_norm.weight", {D}, 0.1f, 1.f);
    b.normal(p + "ffn_norm.weight", {D}, 0.1f, 1.f);
    b.matrix(p + "attn.wq_a.weight", RQ, D);
    b.normal(p + "attn.q_norm.weight", {RQ}, 0.1f, 1.f);
    b.matrix(p + "attn.wq_b.weight", H * DH, RQ);
    b.matrix(p + "attn.wkv.weight", DH, D);
    b.normal(p + "attn.norm.weight", {DH}, 0.1f, 1.f);
    b.normal(p + "attn.attn_sink", {H}, 1.f);
    b.matrix(p + "attn.wo_a.weight", G * RO, H * DH / G);
    b.matrix(p + "attn.wo_b.weight", D, G * RO);
    const int m = kRatios[l], c = m == 4 ? 2 : 1;
    if (m > 0) {
      b.normal(p + "attn.compressor.ape", {m, c * DH}, 0.5f);
      b.matrix(p + "attn.compressor.wkv.weight", c * DH, D);
      b.matrix(p + "attn.compressor.wgate.weight", c * DH, D);
      b.normal(p + "attn.compressor.norm.weight", {DH}, 0.1f, 1.f);
    }
    if (m == 4) {
      b.matrix(p + "attn.indexer.wq_b.weight", HI * DI, RQ);
      b.matrix(p + "attn.indexer.weights_proj.weight", HI, D);
      b.normal(p + "attn.indexer.compressor.ape", {4, 2 * DI}, 0.5f);
      b.matrix(p + "attn.indexer.compressor.wkv.weight", 2 * DI, D);
      b.matrix(p + "attn.indexer.compressor.wgate.weight", 2 * DI, D);
      b.normal(p + "attn.indexer.compressor.norm.weight", {DI}, 0.1f, 1.f);
    }
    b.matrix(p + "ffn.gate.weight", E, D);
    if (l == 0) {  // hash layer: distinct expert pairs per token
      RawTensor t{"I64", {V, K}, std::vector<uint8_t>(size_t(V * K * 8))};
      for (int64_t tok = 0; tok < V; ++tok) {
        const int64_t a = tok % E, z = (a + 1 + (tok / E) % (E - 1)) % E;
        std::memcpy(t.bytes.data() + tok * 16, &a, 8);
        std::memcpy(t.bytes.data() + tok * 16 + 8, &z, 8);
      }
      b.c[p + "ffn.gate.tid2eid"] = t;
    } else {
      b.normal(p + "ffn.gate.bias", {E}, 0.1f);
    }
    for (int e = 0; e <= E; ++e) {
      const std::string q = e < E ? p + "ffn.experts." + std::to_string(e) + "." : p + "ffn.shared_experts.";
      b.matrix(q + "w1.weight", F, D);
      b.matrix(q + "w3.weight", F, D);
      b.matrix(q + "w2.weight", D, F);
    }
  }
  test::write_st_file(dir / "model.safetensors", b.c);
  const nlohmann::json cfg = {
      {"model_type", "deepseek_v4"}, {"vocab_size", V}, {"hidden_size", D}, {"num_hidden_layers", 3},
      {"num_attention_heads", H}, {"num_key_value_heads", 1}, {"head_dim", DH}, {"qk_rope_head_dim", 16},
      {"q_lora_rank", RQ}, {"o_groups", G}, {"o_lora_rank", RO}, {"sliding_window", 8},
      {"index_n_heads", HI}, {"index_head_dim", DI}, {"index_topk", 2}, {"compress_ratios", {0, 4, 16}},
      {"num_hash_layers", 1}, {"n_routed_experts", E}, {"num_experts_per_tok", K}, {"moe_intermediate_size", F},
      {"n_shared_experts", 1}, {"routed_scaling_factor", 1.5}, {"scoring_func", "sqrtsoftplus"},
      {"norm_topk_prob", true}, {"hc_mult", N}, {"hc_sinkhorn_iters", 20}, {"hc_eps", 1e-6},
      {"rms_norm_eps", 1e-6}, {"swiglu_limit", 10.0}, {"rope_theta", 10000.0}, {"compress_rope_theta", 160000.0},
      {"rope_scaling", {{"type", "yarn"}, {"factor", 16}, {"original_max_position_embeddings", 65536},
                        {"beta_fast", 32}, {"beta_slow", 1}}}};
  const std::string s = cfg.dump(1);
  test::spit(dir / "config.json", s.data(), s.size());
}

std::vector<float> logits(const std::string& path, const std::vector<Token>& toks) {
  EngineOptions eo;
  eo.model_path = path;
  eo.backend = BackendKind::Cpu;
  eo.qat_sim = false;
  auto e = Engine::load(eo);
  auto s = e->new_session(int64_t(toks.size()));
  std::vector<float> all;
  s->eval(toks, &all);
  return all;
}

double mean_kl(const std::vector<float>& a, const std::vector<float>& b, size_t rows) {
  const size_t v = a.size() / rows;
  double sum = 0;
  for (size_t r = 0; r < rows; ++r) {
    const float* x = a.data() + r * v;
    const float* y = b.data() + r * v;
    const double mx = *std::max_element(x, x + v), my = *std::max_element(y, y + v);
    double zx = 0, zy = 0;
    for (size_t i = 0; i < v; ++i) {
      zx += std::exp(x[i] - mx);
      zy += std::exp(y[i] - my);
    }
    for (size_t i = 0; i < v; ++i) {
      const double lx = x[i] - mx - std::log(zx), ly = y[i] - my - std::log(zy);
      sum += std::exp(lx) * (lx - ly);
    }
  }
  return sum / double(rows);
}

TEST(EngineQuantKl, Ds4ExpertTypesRunAndReportKl) {
  TempDir tmp;
  write_checkpoint(tmp.path);
  std::vector<Token> toks;
  for (int i = 0; i < 48; ++i) toks.push_back((i * 37 + 11) % V);
  std::map<std::string, std::vector<float>> out;
  const std::pair<Mix, QType> mixes[] = {
      {Mix::F32, QType::F32}, {Mix::Q8_0, QType::Q8_0}, {Mix::Q4, QType::Q4_K}, {Mix::Q2, QType::IQ2_XXS}};
  for (const auto& [mix, gate_type] : mixes) {
    ConvertOptions o{tmp.path.string(), tmp.str(std::string(mix_name(mix)) + ".gguf"), mix, nullptr};
    convert_checkpoint(o);
    {
      auto f = GgufFile::open(o.out_path);
      EXPECT_EQ(f->get_tensor("blk.1.ffn_gate_exps.weight").type, uint32_t(gate_type)) << mix_name(mix);
      if (mix == Mix::Q2) {
        EXPECT_EQ(f->get_tensor("blk.1.ffn_down_exps.weight").type, uint32_t(QType::Q2_K));
      }
    }
    out[mix_name(mix)] = logits(o.out_path, toks);
    for (float x : out[mix_name(mix)]) ASSERT_TRUE(std::isfinite(x)) << mix_name(mix);
  }
  const double kl8 = mean_kl(out["f32"], out["q8_0"], toks.size());
  const double kl4 = mean_kl(out["f32"], out["q4"], toks.size());
  const double kl2 = mean_kl(out["f32"], out["q2"], toks.size());
  std::printf("[engine-kl] random d256 model, %zu positions: mean KL(f32 || q8_0) = %.3e, q4 = %.3e, q2 = %.3e\n",
              toks.size(), kl8, kl4, kl2);
  EXPECT_LE(kl8, kl4);
  EXPECT_LE(kl4, kl2);
}

}  // namespace
}  // namespace dsv4
