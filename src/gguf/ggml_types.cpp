// Storage layouts of ggml tensor type ids, and the GGUF metadata value type names.
//
// Format data, not code: the (id, name, block size, bytes per block) rows below are ggml's type table as
// defined by ggml/include/ggml.h (enum ggml_type) and ggml/src/ggml.c (type_traits: blck_size, type_size),
// with block byte counts from ggml/src/ggml-common.h (block_q8_0, block_q4_K, block_iq2_xxs, ...).
// Removed ids (4, 5: Q4_2/Q4_3; 31-33: old Q4_0 repacks; 36-38: IQ4_NL repacks) are absent on purpose.
#include <cstdint>
#include <limits>
#include <optional>
#include <span>
#include <string>

#include "common/error.h"
#include "gguf/gguf.h"

namespace dsv4 {

namespace {

struct TypeRow {
  uint32_t id;
  GgmlTypeLayout layout;
};

// clang-format off
constexpr TypeRow kGgmlTypes[] = {
  { 0, {"F32",      1,   4}},
  { 1, {"F16",      1,   2}},
  { 2, {"Q4_0",    32,  18}},
  { 3, {"Q4_1",    32,  20}},
  { 6, {"Q5_0",    32,  22}},
  { 7, {"Q5_1",    32,  24}},
  { 8, {"Q8_0",    32,  34}},
  { 9, {"Q8_1",    32,  36}},
  {10, {"Q2_K",   256,  84}},
  {11, {"Q3_K",   256, 110}},
  {12, {"Q4_K",   256, 144}},
  {13, {"Q5_K",   256, 176}},
  {14, {"Q6_K",   256, 210}},
  {15, {"Q8_K",   256, 292}},
  {16, {"IQ2_XXS",256,  66}},
  {17, {"IQ2_XS", 256,  74}},
  {18, {"IQ3_XXS",256,  98}},
  {19, {"IQ1_S",  256,  50}},
  {20, {"IQ4_NL",  32,  18}},
  {21, {"IQ3_S",  256, 110}},
  {22, {"IQ2_S",  256,  82}},
  {23, {"IQ4_XS", 256, 136}},
  {24, {"I8",       1,   1}},
  {25, {"I16",      1,   2}},
  {26, {"I32",      1,   4}},
  {27, {"I64",      1,   8}},
  {28, {"F64",      1,   8}},
  {29, {"IQ1_M",  256,  56}},
  {30, {"BF16",     1,   2}},
  {34, {"TQ1_0",  256,  54}},
  {35, {"TQ2_0",  256,  66}},
  {39, {"MXFP4",   32,  17}},
};
// clang-format on

}  // namespace

std::optional<GgmlTypeLayout> ggml_type_layout(uint32_t type_id) {
  for (const auto& row : kGgmlTypes)
    if (row.id == type_id) return row.layout;
  return std::nullopt;
}

std::string ggml_type_name(uint32_t type_id) {
  if (auto l = ggml_type_layout(type_id)) return l->name;
  return "type#" + std::to_string(type_id);
}

std::string gguf_type_name(GgufType t) {
  switch (t) {
    case GgufType::UINT8: return "u8";
    case GgufType::INT8: return "i8";
    case GgufType::UINT16: return "u16";
    case GgufType::INT16: return "i16";
    case GgufType::UINT32: return "u32";
    case GgufType::INT32: return "i32";
    case GgufType::FLOAT32: return "f32";
    case GgufType::BOOL: return "bool";
    case GgufType::STRING: return "string";
    case GgufType::ARRAY: return "array";
    case GgufType::UINT64: return "u64";
    case GgufType::INT64: return "i64";
    case GgufType::FLOAT64: return "f64";
  }
  return "type#" + std::to_string(uint32_t(t));
}

uint64_t ggml_tensor_bytes(uint32_t type, std::span<const int64_t> ne, const std::string& what,
                           const GgmlTypeLookup& extra_types) {
  std::optional<GgmlTypeLayout> layout = ggml_type_layout(type);
  if (!layout && extra_types) layout = extra_types(type);
  if (!layout) fail("%s: unknown tensor type id %u", what.c_str(), type);
  if (layout->block_size == 0 || layout->type_size == 0)
    fail("%s: type %s has an empty block layout", what.c_str(), layout->name);
  if (ne.empty() || ne.size() > 4) fail("%s: %zu dimensions (expected 1 to 4)", what.c_str(), ne.size());
  for (size_t i = 0; i < ne.size(); ++i)
    if (ne[i] < 0) fail("%s: dimension %zu is negative (%lld)", what.c_str(), i, (long long)ne[i]);
  if (ne[0] % layout->block_size != 0)
    fail("%s: ne[0] = %lld is not a multiple of the %s block size %u", what.c_str(), (long long)ne[0],
         layout->name, layout->block_size);
  // Element count must fit int64 (ggml's int64 ne products); the byte count must fit uint64.
  constexpr uint64_t kMaxElems = uint64_t(std::numeric_limits<int64_t>::max());
  uint64_t elems = 1;
  for (int64_t d : ne) {
    if (d != 0 && elems > kMaxElems / uint64_t(d))
      fail("%s: element count overflows 64 bits", what.c_str());
    elems *= uint64_t(d);
  }
  uint64_t bytes = uint64_t(ne[0]) / layout->block_size * layout->type_size;
  for (size_t i = 1; i < ne.size(); ++i) {
    uint64_t d = uint64_t(ne[i]);
    if (d != 0 && bytes > std::numeric_limits<uint64_t>::max() / d)
      fail("%s: byte size overflows 64 bits", what.c_str());
    bytes *= d;
  }
  return bytes;
}

}  // namespace dsv4
