// Hostile and truncated inputs: the reader must throw dsv4::Error naming the file (and the key / tensor /
// byte offset where it knows them), never crash, read out of bounds or allocate wildly. Files here are built
// byte by byte with a tiny encoder independent of GgufWriter, so the writer cannot mask a reader bug.
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "common/error.h"
#include "gguf/gguf.h"
#include "gguf_test_util.h"

using namespace dsv4;
using dsv4::test::TempPath;

namespace {

struct Bytes {
  std::vector<uint8_t> b;
  template <typename T>
  Bytes& raw(T v) {
    size_t at = b.size();
    b.resize(at + sizeof(T));
    std::memcpy(b.data() + at, &v, sizeof(T));
    return *this;
  }
  Bytes& u32(uint32_t v) { return raw(v); }
  Bytes& u64(uint64_t v) { return raw(v); }
  Bytes& str(const std::string& s) {
    u64(s.size());
    b.insert(b.end(), s.begin(), s.end());
    return *this;
  }
  Bytes& header(uint64_t n_tensors, uint64_t n_kv, uint32_t version = 3) {
    return u32(0x46554747).u32(version).u64(n_tensors).u64(n_kv);
  }
  Bytes& pad_to(size_t align) {
    while (b.size() % align) b.push_back(0);
    return *this;
  }
};

// Opens bytes written to a temp file; returns the error message ("" when it opened fine).
std::string open_error(const std::vector<uint8_t>& bytes, const std::string& path) {
  test::write_bytes(path, bytes);
  try {
    GgufFile::open(path);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// A valid file: 2 keys (u32, string array), 2 F32 tensors of 4 and 8 values.
Bytes valid_file() {
  Bytes f;
  f.header(2, 2);
  f.str("a.count").u32(4).u32(7);
  f.str("a.list").u32(9).u32(8).u64(2).str("xy").str("");
  f.str("t0").u32(1).u64(4).u32(0).u64(0);
  f.str("t1").u32(2).u64(4).u64(2).u32(0).u64(32);
  f.pad_to(32);
  for (int i = 0; i < 4; ++i) f.raw(float(i));  // t0 at 0: 16 bytes, then 16 bytes of padding
  f.pad_to(32);
  for (int i = 4; i < 12; ++i) f.raw(float(i));  // t1 at 32: 32 bytes, ending the file
  return f;
}

#define EXPECT_ERROR_HAS(msg, needle) \
  EXPECT_NE((msg).find(needle), std::string::npos) << "message: " << (msg) << "\nexpected to contain: " << (needle)

}  // namespace

TEST(GgufHostile, ValidBaselineOpens) {
  TempPath p("hostile");
  test::write_bytes(p, valid_file().b);
  auto g = GgufFile::open(p);
  EXPECT_EQ(g->get_u32("a.count"), 7u);
  EXPECT_EQ(g->get_array_string("a.list"), (std::vector<std::string>{"xy", ""}));
  float v;
  std::memcpy(&v, g->get_tensor("t1").data + 7 * 4, 4);
  EXPECT_EQ(v, 11.0f);
}

TEST(GgufHostile, EveryTruncationPointFails) {
  TempPath p("trunc");
  std::vector<uint8_t> full = valid_file().b;
  // Every strict prefix cuts either the header/directory or some tensor's data (the last tensor ends the file).
  for (size_t len = 0; len < full.size(); ++len) {
    std::vector<uint8_t> cut(full.begin(), full.begin() + long(len));
    std::string msg = open_error(cut, p);
    EXPECT_FALSE(msg.empty()) << "prefix of " << len << " bytes opened without error";
    EXPECT_ERROR_HAS(msg, p.str());
  }
  EXPECT_EQ(open_error(full, p), "");
}

TEST(GgufHostile, EveryTruncationPointOfWriterFileFails) {
  TempPath src("trunc_w"), p("trunc_w2");
  {
    GgufWriter w(src);
    w.add_string("s", "hello");
    GgufArrayBuilder outer(GgufType::ARRAY);
    GgufArrayBuilder inner(GgufType::STRING);
    inner.push_string("a").push_string("bc");
    outer.push_array(inner).push_array(GgufArrayBuilder(GgufType::BOOL).push_bool(true));
    w.add_array("nested", outer);
    w.add_f64("d", 0.5);
    w.add_tensor("w", 8, {32, 2});
    w.begin_data();
    std::vector<uint8_t> data(68, 0x11);
    w.write_tensor_data("w", data);
    w.finish();
  }
  std::vector<uint8_t> full = test::read_bytes(src);
  for (size_t len = 0; len < full.size(); ++len) {
    std::vector<uint8_t> cut(full.begin(), full.begin() + long(len));
    // The writer pads the last tensor's end to 32 bytes; cutting inside that padding leaves a valid file.
    std::string msg = open_error(cut, p);
    if (len < full.size() - (96 - 68)) {
      EXPECT_FALSE(msg.empty()) << "prefix of " << len << " bytes";
    }
  }
}

TEST(GgufHostile, BadMagicAndVersion) {
  TempPath p("hostile");
  Bytes f = valid_file();
  f.b[0] = 'X';
  EXPECT_ERROR_HAS(open_error(f.b, p), "not a GGUF file");
  f = valid_file();
  f.b[4] = 1;
  EXPECT_ERROR_HAS(open_error(f.b, p), "unsupported GGUF version 1");
  f = valid_file();
  f.b[4] = 0;
  f.b[7] = 3;  // what a big-endian v3 file looks like to a little-endian reader
  EXPECT_ERROR_HAS(open_error(f.b, p), "big-endian GGUF (version 0x03000000) is not supported");
  f = valid_file();
  f.b[4] = 2;  // v2 has the same layout as v3 (64-bit counts)
  EXPECT_EQ(open_error(f.b, p), "");
}

TEST(GgufHostile, HugeCounts) {
  TempPath p("hostile");
  Bytes f = valid_file();
  std::memcpy(f.b.data() + 16, "\xff\xff\xff\xff\xff\xff\xff\x7f", 8);  // n_kv
  EXPECT_ERROR_HAS(open_error(f.b, p), "metadata count 9223372036854775807 cannot fit");
  f = valid_file();
  std::memcpy(f.b.data() + 8, "\x00\x00\x00\x00\x01\x00\x00\x00", 8);  // n_tensors = 2^32
  EXPECT_ERROR_HAS(open_error(f.b, p), "tensor count 4294967296 cannot fit");
}

TEST(GgufHostile, HugeStringAndArrayLengths) {
  TempPath p("hostile");
  Bytes f = valid_file();
  std::memcpy(f.b.data() + 24, "\x00\x00\x00\x00\x00\x00\x00\x80", 8);  // first key's length
  std::string msg = open_error(f.b, p);
  EXPECT_ERROR_HAS(msg, "byte offset 24");
  EXPECT_ERROR_HAS(msg, "key length 9223372036854775808 exceeds");

  // a.list's element count: header 24 + "a.count" entry (8+7+4+4 = 23) + key "a.list" (8+6) + type 4 + elem 4.
  size_t count_at = 24 + 23 + 14 + 4 + 4;
  f = valid_file();
  uint64_t huge = uint64_t(1) << 61;
  std::memcpy(f.b.data() + count_at, &huge, 8);
  msg = open_error(f.b, p);
  EXPECT_ERROR_HAS(msg, "key 'a.list'");
  EXPECT_ERROR_HAS(msg, "byte offset " + std::to_string(count_at));
  EXPECT_ERROR_HAS(msg, "array of 2305843009213693952 string elements");

  // Second string's length pushed past the end.
  f = valid_file();
  uint64_t len = 1000;
  std::memcpy(f.b.data() + count_at + 8 + 8 + 2, &len, 8);
  EXPECT_ERROR_HAS(open_error(f.b, p), "string length 1000 exceeds");
}

TEST(GgufHostile, BadValueTypes) {
  TempPath p("hostile");
  Bytes f;
  f.header(0, 1).str("k").u32(13).u32(0);
  EXPECT_ERROR_HAS(open_error(f.b, p), "unknown value type 13");
  f = Bytes();
  f.header(0, 1).str("k").u32(9).u32(77).u64(0);
  EXPECT_ERROR_HAS(open_error(f.b, p), "unknown array element type 77");
  f = Bytes();
  f.header(0, 1).str("k").u32(7);
  f.b.push_back(2);
  EXPECT_ERROR_HAS(open_error(f.b, p), "bool value 2 is not 0 or 1");
}

TEST(GgufHostile, DeepNesting) {
  TempPath p("hostile");
  // 1000 levels of array-of-array: 12 bytes each, tiny file, must not recurse 1000 deep.
  Bytes f;
  f.header(0, 1).str("deep").u32(9);
  for (int i = 0; i < 1000; ++i) f.u32(9).u64(1);
  f.u32(0).u64(0);
  EXPECT_ERROR_HAS(open_error(f.b, p), "nested deeper than");
  // 3 levels is fine.
  f = Bytes();
  f.header(0, 1).str("ok").u32(9);
  f.u32(9).u64(1).u32(9).u64(1).u32(4).u64(2).u32(5).u32(6);
  test::write_bytes(p, f.b);
  auto g = GgufFile::open(p);
  GgufValue inner = g->get("ok").array_element(0).array_element(0);
  EXPECT_EQ(inner.array_element(1).as_u32(), 6u);
}

TEST(GgufHostile, DuplicateKeyAndTensor) {
  TempPath p("hostile");
  Bytes f;
  f.header(0, 2).str("k").u32(4).u32(1).str("k").u32(4).u32(2);  // 2nd key at 24 + (8 + 1 + 4 + 4)
  EXPECT_ERROR_HAS(open_error(f.b, p), "key 'k', byte offset 41: duplicate key");
  f = Bytes();
  f.header(2, 0).str("t").u32(1).u64(8).u32(0).u64(0).str("t").u32(1).u64(8).u32(0).u64(32);
  f.pad_to(32);
  f.b.resize(f.b.size() + 64);
  EXPECT_ERROR_HAS(open_error(f.b, p), "tensor 't'");
}

TEST(GgufHostile, BadTensorEntries) {
  TempPath p("hostile");
  auto one_tensor = [](uint32_t n_dims, std::vector<uint64_t> ne, uint32_t type, uint64_t off, size_t data) {
    Bytes f;
    f.header(1, 0).str("w").u32(n_dims);
    for (uint64_t d : ne) f.u64(d);
    f.u32(type).u64(off).pad_to(32);
    f.b.resize(f.b.size() + data);
    return f.b;
  };
  EXPECT_EQ(open_error(one_tensor(2, {32, 2}, 8, 0, 68), p), "");
  EXPECT_ERROR_HAS(open_error(one_tensor(5, {1, 1, 1, 1, 1}, 0, 0, 4), p), "n_dims = 5");
  EXPECT_ERROR_HAS(open_error(one_tensor(0, {}, 0, 0, 4), p), "n_dims = 0");
  EXPECT_ERROR_HAS(open_error(one_tensor(1, {4}, 4, 0, 64), p), "unknown tensor type id 4");
  EXPECT_ERROR_HAS(open_error(one_tensor(1, {33}, 8, 0, 64), p), "not a multiple of the Q8_0 block size 32");
  EXPECT_ERROR_HAS(open_error(one_tensor(1, {uint64_t(1) << 63}, 0, 0, 4), p), "out of range");
  EXPECT_ERROR_HAS(open_error(one_tensor(2, {uint64_t(1) << 40, uint64_t(1) << 40}, 0, 0, 4), p), "overflows");
  EXPECT_ERROR_HAS(open_error(one_tensor(1, {4}, 0, 16, 64), p), "not a multiple of the alignment 32");
  std::string msg = open_error(one_tensor(2, {32, 2}, 8, 0, 67), p);
  EXPECT_ERROR_HAS(msg, "tensor 'w'");
  EXPECT_ERROR_HAS(msg, "runs past the end of the file");
  EXPECT_ERROR_HAS(open_error(one_tensor(1, {4}, 0, uint64_t(-32), 64), p), "runs past the end");
}

TEST(GgufHostile, OverlappingTensors) {
  TempPath p("hostile");
  Bytes f;
  f.header(2, 0).str("a").u32(1).u64(16).u32(0).u64(0).str("b").u32(1).u64(8).u32(0).u64(32);
  f.pad_to(32);
  f.b.resize(f.b.size() + 64);
  EXPECT_ERROR_HAS(open_error(f.b, p), "tensor 'a' (bytes");
}

TEST(GgufHostile, BadAlignmentKey) {
  TempPath p("hostile");
  Bytes f;
  f.header(0, 1).str("general.alignment").u32(4).u32(48);
  EXPECT_ERROR_HAS(open_error(f.b, p), "alignment 48 is not a power of two");
  f = Bytes();
  f.header(0, 1).str("general.alignment").u32(10).u64(64);
  EXPECT_ERROR_HAS(open_error(f.b, p), "key 'general.alignment'");
  f = Bytes();
  f.header(0, 1).str("general.alignment").u32(4).u32(0);
  EXPECT_ERROR_HAS(open_error(f.b, p), "alignment 0");
}

TEST(GgufHostile, EmptyAndMissingFiles) {
  TempPath p("hostile");
  EXPECT_ERROR_HAS(open_error({}, p), "truncated magic");
  try {
    GgufFile::open("/nonexistent/dir/x.gguf");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_ERROR_HAS(std::string(e.what()), "/nonexistent/dir/x.gguf: cannot open: No such file");
  }
}

// ---- type-mismatch messages of the typed getters ----------------------------------------------------------

TEST(GgufGetters, MismatchMessages) {
  TempPath p("get");
  {
    GgufWriter w(p);
    w.add_f32("k.f32", 1.0f);
    w.add_u32("k.u32", 4000000000u);
    w.add_u64("k.u64big", uint64_t(1) << 40);
    w.add_u64("k.u64", 65536);
    w.add_i32("k.neg", -5);
    w.add_string("k.s", "v");
    w.add_array_f32("k.af", std::vector<float>{1.0f});
    w.add_tensor("w", 1, {8, 4});
    w.begin_data();
    w.skip_tensor_data("w");
    w.finish();
  }
  auto g = GgufFile::open(p);
  auto msg = [](auto&& fn) {
    try {
      fn();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("(no error)");
  };
  EXPECT_EQ(msg([&] { g->get_u32("k.f32"); }), p.str() + ": key 'k.f32': expected u32, found f32");
  EXPECT_EQ(msg([&] { g->get_string("k.u32"); }), p.str() + ": key 'k.u32': expected string, found u32");
  EXPECT_EQ(msg([&] { g->get_u32("nope"); }), p.str() + ": missing key 'nope'");
  EXPECT_ERROR_HAS(msg([&] { g->get_i32("k.u32"); }), "value 4000000000 does not fit i32");
  EXPECT_ERROR_HAS(msg([&] { g->get_u32("k.u64big"); }), "does not fit u32");
  EXPECT_EQ(g->get_u32("k.u64"), 65536u);  // u64 that fits
  EXPECT_EQ(g->get_u64("k.u32"), 4000000000u);
  EXPECT_ERROR_HAS(msg([&] { g->get_u64("k.neg"); }), "expected u64, found i32");
  EXPECT_EQ(msg([&] { g->get_array_i32("k.af"); }), p.str() + ": key 'k.af' element: expected i32, found f32");
  EXPECT_EQ(msg([&] { g->get_array_f32("k.s"); }), p.str() + ": key 'k.s': expected array, found string");
  EXPECT_EQ(msg([&] { g->get_bool_opt("k.s"); }), p.str() + ": key 'k.s': expected bool, found string");
  EXPECT_FALSE(g->get_u32_opt("absent").has_value());
  EXPECT_EQ(g->get_f32_opt("k.f32").value(), 1.0f);
  EXPECT_EQ(msg([&] { g->require_tensor("w", {8, 0}, {8, 4}); }),
            p.str() + ": tensor 'w': expected type Q8_0 or F32, found F16");
  EXPECT_EQ(msg([&] { g->require_tensor("w", {1}, {8, 5}); }),
            p.str() + ": tensor 'w': expected shape [8, 5], found [8, 4]");
  EXPECT_EQ(msg([&] { g->require_tensor("w", {1}, {8}); }), p.str() + ": tensor 'w': expected shape [8], found [8, 4]");
  EXPECT_EQ(msg([&] { g->require_tensor("x", {}, {}); }), p.str() + ": missing tensor 'x'");
  EXPECT_EQ(&g->require_tensor("w", {}, {}), g->find_tensor("w"));
}

TEST(GgufGetters, FormatValue) {
  TempPath p("fmt");
  {
    GgufWriter w(p);
    std::vector<int32_t> many(100);
    for (int i = 0; i < 100; ++i) many[size_t(i)] = i;
    w.add_array_i32("many", many);
    w.add_string("s", std::string("quote\"nl\n") + std::string(200, 'x'));
    w.add_f32("f", 0.1f);
    w.add_bool("b", true);
    w.add_i64("i", -3);
    std::vector<std::string> strs = {"a", "b"};
    w.add_array_string("strs", strs);
    w.finish();
  }
  auto g = GgufFile::open(p);
  EXPECT_EQ(g->format_value(g->get("many"), 3), "[0, 1, 2, ... (100 items)]");
  EXPECT_EQ(g->format_value(g->get("s"), 8, 10), "\"quote\\\"nl\\nx\"... (209 bytes)");
  EXPECT_EQ(g->format_value(g->get("f")), "0.100000001");
  EXPECT_EQ(g->format_value(g->get("b")), "true");
  EXPECT_EQ(g->format_value(g->get("i")), "-3");
  EXPECT_EQ(g->format_value(g->get("strs")), "[\"a\", \"b\"]");
}

TEST(GgufHostile, OpenMemoryMatchesFile) {
  std::vector<uint8_t> bytes = valid_file().b;
  auto g = GgufFile::open_memory("mem.gguf", bytes.data(), bytes.size());
  EXPECT_EQ(g->get_u32("a.count"), 7u);
  EXPECT_EQ(g->get_tensor("t1").data, bytes.data() + 224);  // 171 header+directory bytes -> data at 192, +32
  std::vector<uint8_t> cut(bytes.begin(), bytes.begin() + 100);
  try {
    GgufFile::open_memory("mem.gguf", cut.data(), cut.size());
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_ERROR_HAS(std::string(e.what()), "mem.gguf: ");
  }
}
