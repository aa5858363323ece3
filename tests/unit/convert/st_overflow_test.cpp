// Regression tests from the QA pass over the safetensors reader: shapes whose byte size wraps 64 bits and the
// in-memory entry point the fuzz target uses.
#include <gtest/gtest.h>

#include <cstring>
#include <string>

#include "common/error.h"
#include "convert/safetensors.h"

namespace dsv4 {
namespace {

std::string image(const std::string& json, size_t data_bytes) {
  std::string b(8, '\0');
  const uint64_t n = json.size();
  std::memcpy(b.data(), &n, 8);
  return b + json + std::string(data_bytes, '\0');
}

std::string open_error(const std::string& img) {
  try {
    SafetensorsFile::open_memory("mem.safetensors", reinterpret_cast<const uint8_t*>(img.data()), img.size());
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// 2^61 F64 elements are 2^64 bytes, which wrapped to 0 and matched an empty [0, 0) span: the tensor claimed
// 2^61 elements backed by no data at all.
TEST(SafetensorsOverflow, ShapeTimesDtypeSizeWrapping) {
  std::string e =
      open_error(image(R"({"w": {"dtype": "F64", "shape": [2305843009213693952], "data_offsets": [0, 0]}})", 0));
  EXPECT_NE(e.find("tensor 'w'"), std::string::npos) << e;
  EXPECT_NE(e.find("data_offsets"), std::string::npos) << e;
  // Same with the size split over two dims (2^31 x 2^30 x F32 = 2^63 bytes, fine; x F64 with 2^31 x 2^30 = 2^64).
  e = open_error(image(R"({"w": {"dtype": "F64", "shape": [2147483648, 1073741824], "data_offsets": [0, 0]}})", 0));
  EXPECT_NE(e.find("tensor 'w'"), std::string::npos) << e;
}

TEST(SafetensorsOverflow, OpenMemoryAcceptsAValidImage) {
  std::string img = image(R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})", 8);
  auto f = SafetensorsFile::open_memory("mem.safetensors", reinterpret_cast<const uint8_t*>(img.data()), img.size());
  ASSERT_EQ(f->tensors().size(), 1u);
  EXPECT_EQ(f->tensors()[0].n_bytes, 8u);
  EXPECT_EQ(f->tensors()[0].n_elements(), 2);
  // Errors name the stand-in path given by the caller.
  EXPECT_NE(open_error("abc").find("mem.safetensors"), std::string::npos);
}

}  // namespace
}  // namespace dsv4
