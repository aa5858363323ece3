// Writes the seed corpus for fuzz/fuzz_gguf.cpp with GgufWriter: small files covering every metadata value
// type, nested arrays, several tensor types, a custom alignment and an empty file with metadata only.
// Not a fuzz target (fuzz/*.cpp are); build and run by hand when the format coverage should change:
//   g++ -std=c++20 -Isrc -Iinclude fuzz/tools/make_gguf_seeds.cpp build/<dir>/libdsv4_gguf.a
//       build/<dir>/libdsv4_common.a -o /tmp/make_gguf_seeds && /tmp/make_gguf_seeds fuzz/corpus/fuzz_gguf
// (the files have no .gguf suffix because *.gguf is git-ignored).
#include <cstdio>
#include <string>
#include <vector>

#include "gguf/gguf.h"

using namespace dsv4;

static void all_types(const std::string& path) {
  GgufWriter w(path);
  w.add_u8("u8", 1);
  w.add_i8("i8", -1);
  w.add_u16("u16", 2);
  w.add_i16("i16", -2);
  w.add_u32("u32", 3);
  w.add_i32("i32", -3);
  w.add_u64("u64", 4);
  w.add_i64("i64", -4);
  w.add_f32("f32", 0.5f);
  w.add_f64("f64", 0.25);
  w.add_bool("bool", true);
  w.add_string("str", "deepseek4");
  std::vector<std::string> toks = {"<｜begin▁of▁sentence｜>", "a", ""};
  w.add_array_string("tokens", toks);
  std::vector<int32_t> ratios = {0, 0, 4, 128};
  w.add_array_i32("ratios", ratios);
  GgufArrayBuilder nested(GgufType::ARRAY);
  GgufArrayBuilder inner(GgufType::BOOL);
  inner.push_bool(true).push_bool(false);
  nested.push_array(inner).push_array(GgufArrayBuilder(GgufType::STRING).push_string("x"));
  w.add_array("nested", nested);
  w.add_tensor("f32", 0, {4, 2});
  w.add_tensor("q8_0", 8, {32, 1});
  w.add_tensor("empty", 26, {0});
  w.begin_data();
  std::vector<uint8_t> bytes(34, 0x3c);
  w.write_tensor_data("f32", bytes.data(), 32);
  w.write_tensor_data("q8_0", bytes.data(), 34);
  w.finish();
}

static void quant_types(const std::string& path) {
  GgufWriter w(path);
  w.set_alignment(64);
  w.add_string("general.architecture", "deepseek4");
  w.add_tensor("q4_k", 12, {256, 1});
  w.add_tensor("iq2_xxs", 16, {256, 1, 1});
  w.add_tensor("q2_k", 10, {256, 1, 1, 1});
  w.add_tensor("mxfp4", 39, {32});
  w.add_tensor("bf16", 30, {3});
  w.begin_data();
  for (const char* n : {"q4_k", "iq2_xxs", "q2_k", "mxfp4", "bf16"}) w.skip_tensor_data(n);
  w.finish();
}

static void metadata_only(const std::string& path) {
  GgufWriter w(path);
  w.add_u32("deepseek4.block_count", 43);
  w.add_array_f32("deepseek4.swiglu_clamp_exp", std::vector<float>(4, 10.0f));
  w.finish();
}

int main(int argc, char** argv) {
  std::string dir = argc > 1 ? argv[1] : "fuzz/corpus/fuzz_gguf";
  all_types(dir + "/all_types");
  quant_types(dir + "/quant_types");
  metadata_only(dir + "/metadata_only");
  std::printf("wrote 3 seeds to %s\n", dir.c_str());
  return 0;
}
