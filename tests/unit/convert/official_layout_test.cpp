// The official release layout: plain names (no "model." prefix, embed/head/hc_head_fn/kv_norm), FP8 E4M3
// weights with E8M0 128x128 block scales and FP4 E2M1 experts with E8M0 per-32 scales. The checkpoint is
// built from the flash_w8 fixture with two tensors re-encoded using hand-picked codes whose values are known
// from the format definitions (model-spec §12.1), so the expected numbers do not come from the converter.
#include <gtest/gtest.h>

#include "convert/convert.h"
#include "gguf/gguf.h"
#include "quant/quant.h"
#include "st_util.h"

namespace dsv4 {
namespace {

using test::RawCheckpoint;
using test::RawTensor;
using test::TempDir;

std::string official_name(std::string n) {
  if (n.rfind("model.", 0) == 0) n = n.substr(6);
  if (n == "embed_tokens.weight") return "embed.weight";
  if (n.rfind("hc_head.hc_", 0) == 0) return "hc_head_" + n.substr(11);
  const std::string kv = ".attn.norm.weight";
  if (n.size() > kv.size() && n.compare(n.size() - kv.size(), kv.size(), kv) == 0)
    return n.substr(0, n.size() - kv.size()) + ".attn.kv_norm.weight";
  return n;
}

// e4m3fn codes and their values (sign, 4-bit exponent with bias 7, 3-bit mantissa; exp 0 = subnormal m/512).
const std::pair<uint8_t, float> kE4M3[] = {{0x00, 0.f},  {0x38, 1.f},  {0x40, 2.f},      {0x3C, 1.5f},
                                           {0xB8, -1.f}, {0x30, 0.5f}, {0x01, 1.f / 512}, {0x7E, 448.f},
                                           {0xC4, -3.f}};
// E2M1 nibble code -> value.
const float kE2M1[16] = {0, .5f, 1, 1.5f, 2, 3, 4, 6, -0.f, -.5f, -1, -1.5f, -2, -3, -4, -6};

TEST(OfficialLayout, Fp8AndFp4AreDequantized) {
  const RawCheckpoint hf = test::read_st_dir(test::fixture_dir("flash_w8"));
  RawCheckpoint off;
  for (const auto& [n, t] : hf) off[official_name(n)] = t;

  // layers.0.attn.wq_a.weight [32, 64] as FP8 with one 128x128 block scale of 2^(128-127) = 2.
  std::vector<float> want_q((size_t)32 * 64);
  RawTensor q{"F8_E4M3", {32, 64}, std::vector<uint8_t>(32 * 64)};
  for (size_t i = 0; i < q.bytes.size(); ++i) {
    const auto& [code, val] = kE4M3[(i * 5) % std::size(kE4M3)];
    q.bytes[i] = code;
    want_q[i] = val * 2.f;
  }
  off["layers.0.attn.wq_a.weight"] = q;
  off["layers.0.attn.wq_a.scale"] = RawTensor{"F8_E8M0", {1, 1}, {128}};

  // Experts of layer 0: w1 [16, 64] as FP4 (I8 [16, 32]) with per-32 scales 2^-1 and 2^0 alternating.
  std::vector<std::vector<float>> want_w1;
  for (int e = 0; e < 8; ++e) {
    RawTensor w{"I8", {16, 32}, std::vector<uint8_t>(16 * 32)};
    RawTensor s{"F8_E8M0", {16, 2}, std::vector<uint8_t>(32)};
    for (size_t k = 0; k < s.bytes.size(); ++k) s.bytes[k] = (k + size_t(e)) % 2 ? 127 : 126;
    std::vector<float> want((size_t)16 * 64);
    for (int r = 0; r < 16; ++r)
      for (int j = 0; j < 32; ++j) {
        const uint8_t lo = uint8_t((r + j + e) % 16), hi = uint8_t((3 * j + r) % 16);
        w.bytes[size_t(r * 32 + j)] = uint8_t(lo | (hi << 4));
        const float s0 = s.bytes[size_t(r * 2 + (2 * j) / 32)] == 127 ? 1.f : 0.5f;
        const float s1 = s.bytes[size_t(r * 2 + (2 * j + 1) / 32)] == 127 ? 1.f : 0.5f;
        want[size_t(r * 64 + 2 * j)] = kE2M1[lo] * s0;
        want[size_t(r * 64 + 2 * j + 1)] = kE2M1[hi] * s1;
      }
    const std::string base = "layers.0.ffn.experts." + std::to_string(e) + ".w1.";
    off[base + "weight"] = w;
    off[base + "scale"] = s;
    want_w1.push_back(want);
  }

  TempDir tmp;
  std::filesystem::copy_file(test::fixture_dir("flash_w8") / "config.json", tmp.path / "config.json");
  // Two shards with an index, as the release ships.
  RawCheckpoint a, b;
  nlohmann::json idx = {{"weight_map", nlohmann::json::object()}};
  for (const auto& [n, t] : off) {
    const bool first = n.rfind("layers.0.", 0) == 0;
    (first ? a : b)[n] = t;
    idx["weight_map"][n] = first ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
  }
  test::write_st_file(tmp.path / "model-00001-of-00002.safetensors", a);
  test::write_st_file(tmp.path / "model-00002-of-00002.safetensors", b);
  const std::string js = idx.dump();
  test::spit(tmp.path / "model.safetensors.index.json", js.data(), js.size());

  ConvertOptions o{tmp.path.string(), tmp.str("out.gguf"), Mix::F32, nullptr};
  const auto rep = convert_checkpoint(o);
  EXPECT_EQ(rep.n_skipped, 0);
  auto f = GgufFile::open(o.out_path);
  const auto& gq = f->get_tensor("blk.0.attn_q_a.weight");
  ASSERT_EQ(gq.type, uint32_t(QType::F32));
  std::vector<float> got(size_t(gq.n_elements()));
  std::memcpy(got.data(), gq.data, got.size() * 4);
  EXPECT_EQ(got, want_q);  // exact: every value is a power-of-two multiple of an e4m3 value
  const auto& ge = f->get_tensor("blk.0.ffn_gate_exps.weight");
  for (int e = 0; e < 8; ++e) {
    std::vector<float> g(16 * 64);
    std::memcpy(g.data(), ge.data + size_t(e) * g.size() * 4, g.size() * 4);
    EXPECT_EQ(g, want_w1[size_t(e)]) << "expert " << e;
  }
  // A plain tensor under an official name is carried unchanged.
  const auto& emb = f->get_tensor("token_embd.weight");
  std::vector<float> ev(size_t(emb.n_elements()));
  std::memcpy(ev.data(), emb.data, ev.size() * 4);
  EXPECT_EQ(ev, hf.at("model.embed_tokens.weight").f32());
}

}  // namespace
}  // namespace dsv4
