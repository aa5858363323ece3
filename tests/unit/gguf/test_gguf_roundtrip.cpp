// Writer -> reader round trips: every metadata value type (incl. nested arrays and arrays of strings),
// tensors of several ggml types, alignment, chunked streaming and sparse (skipped) tensor data.
// Values are compared exactly: the writer stores raw bytes, so any difference is a bug (no tolerance).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

#include <sys/stat.h>

#include "common/error.h"
#include "gguf/gguf.h"
#include "gguf_test_util.h"

using namespace dsv4;
using dsv4::test::TempPath;

namespace {

// Writes one key of every scalar type plus arrays, and two tensors with known bytes.
void write_everything(const std::string& path, uint32_t alignment) {
  GgufWriter w(path);
  if (alignment != 32) w.set_alignment(alignment);
  w.add_u8("t.u8", 200);
  w.add_i8("t.i8", -100);
  w.add_u16("t.u16", 60000);
  w.add_i16("t.i16", -30000);
  w.add_u32("t.u32", 4000000000u);
  w.add_i32("t.i32", -2000000000);
  w.add_u64("t.u64", 18000000000000000000ull);
  w.add_i64("t.i64", -9000000000000000000ll);
  w.add_f32("t.f32", 1.5e-6f);
  w.add_f64("t.f64", 3.141592653589793);
  w.add_bool("t.true", true);
  w.add_bool("t.false", false);
  w.add_string("t.str", "DeepSeek \xef\xbd\x9c unicode");
  w.add_string("t.empty", "");
  std::vector<int32_t> ratios = {0, 0, 4, 128, 4, 128};
  w.add_array_i32("t.arr_i32", ratios);
  std::vector<uint32_t> u = {1, 2, 3};
  w.add_array_u32("t.arr_u32", u);
  std::vector<float> f = {10.0f, -0.25f};
  w.add_array_f32("t.arr_f32", f);
  std::vector<std::string> toks = {"<｜begin▁of▁sentence｜>", "", "a\nb", "x"};
  w.add_array_string("t.arr_str", toks);
  GgufArrayBuilder nested(GgufType::ARRAY);
  GgufArrayBuilder inner1(GgufType::STRING);
  inner1.push_string("p").push_string("q");
  GgufArrayBuilder inner2(GgufType::STRING);
  nested.push_array(inner1).push_array(inner2);
  w.add_array("t.nested", nested);
  GgufArrayBuilder f64s(GgufType::FLOAT64);
  f64s.push_f64(10.0).push_f64(2.5);
  w.add_array("t.arr_f64", f64s);
  w.add_array("t.arr_empty", GgufArrayBuilder(GgufType::UINT8));

  w.add_tensor("a.f32", 0, {3, 2});
  w.add_tensor("b.q8_0", 8, {64, 1});  // 2 blocks x 34 bytes
  w.add_tensor("c.empty", 0, {0});
  w.begin_data();
  std::vector<float> a = {1, 2, 3, 4, 5, 6};
  w.write_tensor_data("a.f32", a.data(), a.size() * sizeof(float));
  std::vector<uint8_t> b(68);
  std::iota(b.begin(), b.end(), uint8_t(1));
  w.write_tensor_data("b.q8_0", b.data(), 30);  // streamed in two chunks
  w.write_tensor_data("b.q8_0", b.data() + 30, 38);
  w.finish();
}

}  // namespace

TEST(GgufRoundTrip, AllScalarTypes) {
  TempPath p("rt");
  write_everything(p, 32);
  auto g = GgufFile::open(p);
  EXPECT_EQ(g->version(), 3u);
  EXPECT_EQ(g->alignment(), 32u);
  EXPECT_EQ(g->get("t.u8").as_u8(), 200);
  EXPECT_EQ(g->get("t.i8").as_i8(), -100);
  EXPECT_EQ(g->get("t.u16").as_u16(), 60000);
  EXPECT_EQ(g->get("t.i16").as_i16(), -30000);
  EXPECT_EQ(g->get_u32("t.u32"), 4000000000u);
  EXPECT_EQ(g->get_i32("t.i32"), -2000000000);
  EXPECT_EQ(g->get_u64("t.u64"), 18000000000000000000ull);
  EXPECT_EQ(g->get("t.i64").as_i64(), -9000000000000000000ll);
  EXPECT_EQ(g->get_f32("t.f32"), 1.5e-6f);
  EXPECT_EQ(g->get_f64("t.f64"), 3.141592653589793);
  EXPECT_TRUE(g->get_bool("t.true"));
  EXPECT_FALSE(g->get_bool("t.false"));
  EXPECT_EQ(g->get_string("t.str"), "DeepSeek \xef\xbd\x9c unicode");
  EXPECT_EQ(g->get_string("t.empty"), "");
  // Key order is the file order.
  ASSERT_GE(g->metadata().size(), 2u);
  EXPECT_EQ(g->metadata()[0].first, "t.u8");
  EXPECT_EQ(g->metadata()[1].first, "t.i8");
}

TEST(GgufRoundTrip, Arrays) {
  TempPath p("rt");
  write_everything(p, 32);
  auto g = GgufFile::open(p);
  EXPECT_EQ(g->get_array_i32("t.arr_i32"), (std::vector<int32_t>{0, 0, 4, 128, 4, 128}));
  EXPECT_EQ(g->get_array_u32("t.arr_u32"), (std::vector<uint32_t>{1, 2, 3}));
  EXPECT_EQ(g->get_array_i32("t.arr_u32"), (std::vector<int32_t>{1, 2, 3}));  // u32 -> i32 widening
  EXPECT_EQ(g->get_array_f32("t.arr_f32"), (std::vector<float>{10.0f, -0.25f}));
  EXPECT_EQ(g->get_array_f32("t.arr_f64"), (std::vector<float>{10.0f, 2.5f}));  // exact in f32
  EXPECT_EQ(g->get_array_string("t.arr_str"),
            (std::vector<std::string>{"<｜begin▁of▁sentence｜>", "", "a\nb", "x"}));
  EXPECT_EQ(g->get_array_size("t.arr_str"), 4u);
  EXPECT_EQ(g->get_array_type("t.arr_str"), GgufType::STRING);
  EXPECT_EQ(g->get_array_size("t.arr_empty"), 0u);
  EXPECT_TRUE(g->get_array_u32("t.arr_empty").empty());
  const GgufValue& n = g->get("t.nested");
  ASSERT_EQ(n.array_type(), GgufType::ARRAY);
  ASSERT_EQ(n.array_size(), 2u);
  GgufValue first = n.array_element(0);
  ASSERT_EQ(first.array_size(), 2u);
  EXPECT_EQ(first.array_element(1).as_string(), "q");
  EXPECT_EQ(n.array_element(1).array_size(), 0u);
  EXPECT_EQ(g->get("t.arr_str").array_element(2).as_string(), "a\nb");
  EXPECT_THROW(n.array_element(2), Error);
}

TEST(GgufRoundTrip, TensorsAndData) {
  TempPath p("rt");
  write_everything(p, 32);
  auto g = GgufFile::open(p);
  ASSERT_EQ(g->tensors().size(), 3u);
  const GgufTensorInfo& a = g->require_tensor("a.f32", {0}, {3, 2});
  EXPECT_EQ(a.n_dims, 2u);
  EXPECT_EQ(a.n_bytes, 24u);
  EXPECT_EQ(a.offset % 32, 0u);
  float av[6];
  std::memcpy(av, a.data, sizeof(av));
  EXPECT_EQ(av[0], 1.0f);
  EXPECT_EQ(av[5], 6.0f);
  const GgufTensorInfo& b = g->require_tensor("b.q8_0", {8}, {64});  // trailing 1 matches
  EXPECT_EQ(b.n_bytes, 68u);
  EXPECT_EQ(b.offset % 32, 0u);
  for (int i = 0; i < 68; ++i) ASSERT_EQ(b.data[i], uint8_t(i + 1)) << i;
  EXPECT_EQ(g->get_tensor("c.empty").n_bytes, 0u);
  g->prefetch(b);  // a hint only; must accept any tensor of the file
  EXPECT_EQ(g->find_tensor("nope"), nullptr);
  EXPECT_EQ(a.shape_string(), "[3, 2]");
}

TEST(GgufRoundTrip, CustomAlignment) {
  TempPath p("rt");
  write_everything(p, 4096);
  auto g = GgufFile::open(p);
  EXPECT_EQ(g->alignment(), 4096u);
  EXPECT_EQ(g->get_u32("general.alignment"), 4096u);
  for (const auto& t : g->tensors()) EXPECT_EQ(t.offset % 4096, 0u) << t.name;
  EXPECT_EQ(g->data_offset() % 4096, 0u);
}

TEST(GgufRoundTrip, AlignmentKeyRoutedToWriter) {
  TempPath p("rt");
  {
    GgufWriter w(p);
    w.add_u32("general.alignment", 64);
    w.add_tensor("x", 0, {5});
    w.begin_data();
    std::vector<float> x(5, 2.0f);
    w.write_tensor_data("x", x.data(), 20);
    w.finish();
  }
  auto g = GgufFile::open(p);
  EXPECT_EQ(g->alignment(), 64u);
  EXPECT_EQ(g->metadata().size(), 1u);  // not written twice
  EXPECT_EQ(g->get_tensor("x").offset % 64, 0u);
}

TEST(GgufRoundTrip, MetadataOnlyFile) {
  TempPath p("rt");
  {
    GgufWriter w(p);
    w.add_string("general.name", "empty");
    w.finish();  // begin_data implied
  }
  auto g = GgufFile::open(p);
  EXPECT_EQ(g->get_string("general.name"), "empty");
  EXPECT_TRUE(g->tensors().empty());
}

TEST(GgufRoundTrip, SparseSkippedTensorsReadAsZeros) {
  TempPath p("sparse");
  // 64 MiB declared, only a few bytes written: the file must read back as zeros where skipped.
  const int64_t rows = 16 * 1024;
  {
    GgufWriter w(p);
    w.add_tensor("big.0", 0, {1024, rows});
    w.add_tensor("small", 26, {4});
    w.add_tensor("big.1", 1, {1024, rows});
    w.begin_data();
    w.skip_tensor_data("big.0");
    int32_t v[4] = {7, -7, 70000, 0};
    w.write_tensor_data("small", v, sizeof(v));
    uint16_t head[2] = {0x3c00, 0x4000};
    w.write_tensor_data("big.1", head, sizeof(head));  // partial write, then skip the rest
    w.skip_tensor_data("big.1");
    w.finish();
  }
  auto g = GgufFile::open(p);
  const auto& big0 = g->get_tensor("big.0");
  EXPECT_EQ(big0.n_bytes, uint64_t(1024 * rows * 4));
  EXPECT_EQ(big0.data[0], 0);
  EXPECT_EQ(big0.data[big0.n_bytes - 1], 0);
  const auto& small = g->get_tensor("small");
  int32_t v[4];
  std::memcpy(v, small.data, sizeof(v));
  EXPECT_EQ(v[2], 70000);
  const auto& big1 = g->get_tensor("big.1");
  uint16_t h0;
  std::memcpy(&h0, big1.data, 2);
  EXPECT_EQ(h0, 0x3c00);
  EXPECT_EQ(big1.data[big1.n_bytes - 1], 0);
  EXPECT_EQ(g->file_size(), big1.offset + big1.n_bytes);  // 32-aligned already
  // 64 MiB (F32) + 32 MiB (F16) + 16 bytes and padding, plus the header.
  EXPECT_GT(g->file_size(), uint64_t(96) << 20);
  EXPECT_LT(g->file_size(), (uint64_t(96) << 20) + 4096);
  // Sparse on disk: skipped data is never written, so far fewer blocks are allocated than the apparent size
  // (the temp dir's filesystem — tmpfs, ext4, xfs, overlayfs on those — supports holes).
  struct stat st {};
  ASSERT_EQ(::stat(p.str().c_str(), &st), 0);
  EXPECT_LT(uint64_t(st.st_blocks) * 512, uint64_t(1) << 20) << "skipped tensor data was written out";
}

TEST(GgufRoundTrip, ExtraTypeHook) {
  TempPath p("rt");
  // A type id unknown to ggml (e.g. a custom FP8 id) works when both sides are given its layout.
  GgmlTypeLookup fp8 = [](uint32_t id) -> std::optional<GgmlTypeLayout> {
    if (id == 200) return GgmlTypeLayout{"FP8_TEST", 128, 132};
    return std::nullopt;
  };
  {
    GgufWriter w(p);
    w.add_tensor("w", 200, {256, 2}, fp8);
    w.begin_data();
    w.skip_tensor_data("w");
    w.finish();
  }
  EXPECT_THROW(GgufFile::open(p), Error);
  GgufOpenOptions opt;
  opt.extra_types = fp8;
  auto g = GgufFile::open(p, opt);
  EXPECT_EQ(g->get_tensor("w").n_bytes, 2u * 2 * 132);
}

TEST(GgufWriterErrors, OrderAndSizes) {
  TempPath p("werr");
  GgufWriter w(p);
  w.add_u32("k", 1);
  EXPECT_THROW(w.add_u32("k", 2), Error);  // duplicate key
  w.add_tensor("a", 0, {4});
  w.add_tensor("b", 0, {4});
  EXPECT_THROW(w.add_tensor("a", 0, {4}), Error);     // duplicate tensor
  EXPECT_THROW(w.add_tensor("q", 8, {33}), Error);    // not a multiple of the Q8_0 block
  EXPECT_THROW(w.add_tensor("u", 9999, {4}), Error);  // unknown type
  EXPECT_THROW(w.write_tensor_data("a", "x", 1), Error);  // before begin_data
  w.begin_data();
  EXPECT_THROW(w.add_u32("late", 1), Error);
  float x[5] = {};
  EXPECT_THROW(w.write_tensor_data("b", x, 16), Error);  // out of order
  EXPECT_THROW(w.write_tensor_data("a", x, 20), Error);  // too many bytes
  EXPECT_THROW(w.write_tensor_data("zz", x, 4), Error);  // unknown
  w.write_tensor_data("a", x, 16);
  EXPECT_THROW(w.finish(), Error);  // b incomplete
  w.write_tensor_data("b", x, 16);
  w.finish();
  EXPECT_THROW(w.finish(), Error);
}

TEST(GgufWriterErrors, ArrayBuilderTypeCheck) {
  GgufArrayBuilder a(GgufType::INT32);
  EXPECT_THROW(a.push_u32(1), Error);
  EXPECT_THROW(a.push_string("x"), Error);
  a.push_i32(1);
  EXPECT_EQ(a.size(), 1u);
}

TEST(GgufTypes, TableAndSizes) {
  // Block sizes from ggml-common.h, restated here by hand: QK8_0 = 32 with 2 + 32 bytes; QK_K = 256 with
  // Q4_K 2+2+12+128, Q2_K 16+64+2+2, IQ2_XXS 2+64, Q8_K 4+256+32; MXFP4 1 + 16 per 32.
  struct Row { uint32_t id; uint32_t bs, ts; const char* name; };
  const Row rows[] = {{0, 1, 4, "F32"}, {1, 1, 2, "F16"}, {8, 32, 34, "Q8_0"}, {10, 256, 84, "Q2_K"},
                      {12, 256, 144, "Q4_K"}, {15, 256, 292, "Q8_K"}, {16, 256, 66, "IQ2_XXS"},
                      {26, 1, 4, "I32"}, {30, 1, 2, "BF16"}, {39, 32, 17, "MXFP4"}};
  for (const Row& r : rows) {
    auto l = ggml_type_layout(r.id);
    ASSERT_TRUE(l) << r.id;
    EXPECT_EQ(l->block_size, r.bs) << r.name;
    EXPECT_EQ(l->type_size, r.ts) << r.name;
    EXPECT_STREQ(l->name, r.name);
  }
  EXPECT_FALSE(ggml_type_layout(4));
  EXPECT_EQ(ggml_type_name(4), "type#4");
  // The real model's largest tensor: 256 experts of [4096, 2048] Q4_K.
  std::vector<int64_t> ne = {4096, 2048, 256};
  EXPECT_EQ(ggml_tensor_bytes(12, ne, "x"), 4096ull / 256 * 144 * 2048 * 256);
  std::vector<int64_t> huge = {int64_t(1) << 40, int64_t(1) << 40};
  EXPECT_THROW(ggml_tensor_bytes(0, huge, "x"), Error);
}
