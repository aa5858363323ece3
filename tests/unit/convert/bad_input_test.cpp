// Bad checkpoints fail with a dsv4::Error that names the file, tensor, key or field at fault.
#include <gtest/gtest.h>

#include <random>

#include "common/error.h"
#include "convert/convert.h"
#include "convert/hf_config.h"
#include "convert/safetensors.h"
#include "st_util.h"

namespace dsv4 {
namespace {

using test::RawCheckpoint;
using test::RawTensor;
using test::TempDir;

// Runs fn, expects a dsv4::Error whose message contains every one of `parts`.
template <typename Fn>
void expect_error(Fn&& fn, std::initializer_list<std::string> parts) {
  try {
    fn();
    ADD_FAILURE() << "no error thrown";
  } catch (const Error& e) {
    for (const auto& p : parts) EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << "message: " << e.what() << "\nmissing: " << p;
  }
}

void write_header(const std::string& path, const std::string& json, size_t data_bytes, uint64_t len_override = 0) {
  std::string b(8, '\0');
  const uint64_t n = len_override ? len_override : json.size();
  std::memcpy(b.data(), &n, 8);
  b += json;
  b += std::string(data_bytes, '\0');
  test::spit(path, b.data(), b.size());
}

TEST(BadSafetensors, HeaderProblems) {
  TempDir t;
  const std::string p = t.str("x.safetensors");
  test::spit(p, "abc", 3);
  expect_error([&] { SafetensorsFile::open(p); }, {p, "header length is missing"});
  write_header(p, "{}", 0, 1000);
  expect_error([&] { SafetensorsFile::open(p); }, {p, "header length 1000", "exceeds the file"});
  write_header(p, "{\"a\": [", 0);
  expect_error([&] { SafetensorsFile::open(p); }, {p, "does not parse"});
  write_header(p, R"({"w": {"dtype": "F7", "shape": [2], "data_offsets": [0, 8]}})", 8);
  expect_error([&] { SafetensorsFile::open(p); }, {p, "tensor 'w'", "field 'dtype'", "F7"});
  write_header(p, R"({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})", 8);
  expect_error([&] { SafetensorsFile::open(p); }, {p, "tensor 'w'", "field 'data_offsets'", "needs 12"});
  write_header(p, R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", 8);
  expect_error([&] { SafetensorsFile::open(p); }, {p, "tensor 'w'", "outside the data section"});
  write_header(p, R"({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}})", 0);
  expect_error([&] { SafetensorsFile::open(p); }, {p, "tensor 'w'", "field 'shape'"});
  write_header(p,
               R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                   "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
               12);
  expect_error([&] { SafetensorsFile::open(p); }, {p, "overlap", "data byte 4"});
}

// Random corruption of a real fixture shard (header and data lengths): open() either succeeds with every tensor
// inside the file or throws dsv4::Error; it never crashes or reads out of bounds (run under ASan in `make asan`).
TEST(BadSafetensors, RandomCorruptionNeverCrashes) {
  const auto good = test::slurp(test::fixture_dir("pro_w8") / "model-00001-of-00005.safetensors");
  uint64_t hlen = 0;
  std::memcpy(&hlen, good.data(), 8);
  TempDir t;
  const std::string p = t.str("m.safetensors");
  std::mt19937_64 rng(99);
  int errors = 0, opened = 0;
  for (int it = 0; it < 300; ++it) {
    auto b = good;
    const int kind = it % 3;
    if (kind == 0) {  // flip bytes inside the JSON header
      for (int k = 0; k < 4; ++k) b[8 + rng() % hlen] ^= uint8_t(1 + rng() % 255);
    } else if (kind == 1) {  // truncate anywhere
      b.resize(rng() % b.size());
    } else {  // overwrite digits of the header (offsets/shapes) with other digits
      for (int k = 0; k < 6; ++k) {
        const size_t at = 8 + rng() % hlen;
        if (b[at] >= '0' && b[at] <= '9') b[at] = uint8_t('0' + rng() % 10);
      }
    }
    test::spit(p, b.data(), b.size());
    try {
      auto f = SafetensorsFile::open(p);
      ++opened;
      for (const auto& x : f->tensors()) ASSERT_LE(x.offset + x.n_bytes, b.size()) << x.name;
    } catch (const Error&) {
      ++errors;
    }
  }
  EXPECT_GT(errors, 100);  // most corruptions must be detected, not silently accepted
  EXPECT_EQ(errors + opened, 300);
}

TEST(BadSafetensors, ShardIndexProblems) {
  TempDir t;
  RawCheckpoint c;
  c["a"] = RawTensor{"F32", {1}, std::vector<uint8_t>(4)};
  test::write_st_file(t.path / "s1.safetensors", c);
  auto idx = [&](const std::string& j) { test::spit(t.path / "model.safetensors.index.json", j.data(), j.size()); };
  idx(R"({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}})");
  expect_error([&] { Checkpoint::open(t.path.string()); }, {"s2.safetensors", "missing"});
  idx(R"({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}})");
  expect_error([&] { Checkpoint::open(t.path.string()); }, {"tensor 'b'", "missing from shard 's1.safetensors'"});
  idx(R"({"weight_map": {"b": "s1.safetensors"}})");
  expect_error([&] { Checkpoint::open(t.path.string()); }, {"tensor 'a'", "not listed"});
  idx(R"({"weight_map": {}})");
  expect_error([&] { Checkpoint::open(t.path.string()); }, {"model.safetensors.index.json", "lists no tensors"});
  idx(R"({"nope": 1})");
  expect_error([&] { Checkpoint::open(t.path.string()); }, {"weight_map"});
}

// A copy of the flash_w8 fixture with one edit, converted.
void convert_edited(const std::function<void(RawCheckpoint&)>& edit, std::initializer_list<std::string> parts) {
  RawCheckpoint c = test::read_st_dir(test::fixture_dir("flash_w8"));
  edit(c);
  TempDir t;
  std::filesystem::copy_file(test::fixture_dir("flash_w8") / "config.json", t.path / "config.json");
  test::write_st_file(t.path / "model.safetensors", c);
  ConvertOptions o{t.path.string(), t.str("out.gguf"), Mix::F32, nullptr};
  expect_error([&] { convert_checkpoint(o); }, parts);
}

TEST(BadCheckpoint, TensorProblems) {
  convert_edited([](RawCheckpoint& c) { c.erase("model.layers.2.attn.wq_a.weight"); },
                 {"missing tensor", "blk.2.attn_q_a.weight", "[64, 32]"});
  convert_edited([](RawCheckpoint& c) { c["model.layers.2.attn.wq_a.weight"].shape = {64, 32}; },
                 {"model.layers.2.attn.wq_a.weight", "blk.2.attn_q_a.weight", "must be [64, 32]"});
  convert_edited([](RawCheckpoint& c) { c["model.layers.2.attn.bogus.weight"] = RawTensor{"F32", {1}, {0, 0, 0, 0}}; },
                 {"model.layers.2.attn.bogus.weight", "not part of a DeepSeek-V4 model"});
  convert_edited([](RawCheckpoint& c) { c.erase("model.layers.4.ffn.experts.5.w2.weight"); },
                 {"blk.4.ffn_down_exps.weight", "expert 5 is missing"});
  convert_edited([](RawCheckpoint& c) { c["model.layers.1.ffn.gate.tid2eid"].bytes[8 * 7] = 99; },
                 {"model.layers.1.ffn.gate.tid2eid", "element 7", "99", "not an expert id"});
  convert_edited([](RawCheckpoint& c) { c["model.layers.2.attn.wq_a.weight"].dtype = "I32"; },
                 {"model.layers.2.attn.wq_a.weight", "integer dtype"});
  convert_edited(
      [](RawCheckpoint& c) {
        auto& t = c["model.layers.2.attn.wq_a.weight"];
        t.dtype = "F8_E4M3";
        t.bytes.resize(t.bytes.size() / 4);
      },
      {"model.layers.2.attn.wq_a.weight", "FP8 weight without its '.scale'"});
}

TEST(BadConfig, KeysAreNamed) {
  const std::string where = "cfg.json";
  auto base = nlohmann::json::parse(test::slurp(test::fixture_dir("flash_w8") / "config.json"));
  auto with = [&](const std::function<void(nlohmann::json&)>& edit) {
    auto j = base;
    edit(j);
    return j;
  };
  EXPECT_NO_THROW(model_config_from_hf_json(base, where));
  expect_error([&] { model_config_from_hf_json(with([](auto& j) { j.erase("hidden_size"); }), where); },
               {where, "'hidden_size' is missing"});
  expect_error([&] { model_config_from_hf_json(with([](auto& j) { j["head_dim"] = "x"; }), where); },
               {where, "'head_dim' must be an integer"});
  expect_error([&] { model_config_from_hf_json(with([](auto& j) { j["layer_types"][1] = "full_attention"; }), where); },
               {where, "layer_types[1]"});
  expect_error([&] { model_config_from_hf_json(with([](auto& j) { j["rope_parameters"]["compress"]["attention_factor"] = 1.3; }), where); },
               {where, "attention_factor"});
  expect_error([&] { model_config_from_hf_json(with([](auto& j) { j["compress_rates"]["compressed_sparse_attention"] = 8; }), where); },
               {where, "compressed_sparse_attention rate 8"});
  expect_error([&] { model_config_from_hf_json(with([](auto& j) { j["mlp_layer_types"][4] = "hash_moe"; }), where); },
               {where, "mlp_layer_types[4]"});
  // The official dialect: compress_ratios + num_hash_layers + qk_rope_head_dim + rope_scaling.
  auto off = with([](auto& j) {
    j.erase("layer_types");
    j.erase("mlp_layer_types");
    j.erase("rope_parameters");
    j.erase("partial_rotary_factor");
    j["compress_ratios"] = {0, 0, 4, 128, 4, 128, 4, 0};
    j["num_hash_layers"] = 2;
    j["qk_rope_head_dim"] = 32;
    j["rope_scaling"] = {{"type", "yarn"}, {"factor", 4}, {"original_max_position_embeddings", 4096},
                         {"beta_fast", 32}, {"beta_slow", 1}};
  });
  const ModelConfig c = model_config_from_hf_json(off, where);
  EXPECT_EQ(c.compress_ratios, (std::vector<int>{0, 0, 4, 128, 4, 128, 4, 0}));
  EXPECT_EQ(c.n_hash_layers, 2);
  EXPECT_EQ(c.rope_dim, 32);
  EXPECT_EQ(c.yarn_factor, 4.f);
  EXPECT_EQ(c.yarn_orig_ctx, 4096u);
}

}  // namespace
}  // namespace dsv4
