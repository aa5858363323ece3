// Internal to src/gguf: a bounds-checked cursor over the mapped file, shared by the reader (validation at
// open) and GgufValue (walking strings and nested arrays afterwards). Every read checks the bytes left first
// and fails with the file path, the current context (key or tensor) and the byte offset.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include "common/error.h"
#include "gguf/gguf.h"

namespace dsv4 {

struct GgufParser {
  // Deepest array nesting accepted: real files use 1 level; the limit keeps recursion bounded on hostile input.
  static constexpr int kMaxArrayDepth = 16;

  const std::string& path;
  const uint8_t* data;
  uint64_t size;
  uint64_t pos = 0;
  std::string context;  // "key 'general.name'" / "tensor 'blk.0.attn_q_a.weight'" / "header"

  GgufParser(const std::string& p, const uint8_t* d, uint64_t s) : path(p), data(d), size(s) {}

  uint64_t left() const { return size - pos; }

  template <typename... Args>
  [[noreturn]] void error_at(uint64_t at, const char* fmt, Args... args) const {
    std::string msg;
    if constexpr (sizeof...(Args) == 0)
      msg = fmt;  // no arguments: not a format (and clang's -Wformat-security stays quiet)
    else
      msg = strfmt(fmt, args...);
    fail("%s: %s%sbyte offset %llu: %s", path.c_str(), context.c_str(), context.empty() ? "" : ", ",
         (unsigned long long)at, msg.c_str());
  }

  void need(uint64_t n, const char* what) const {
    if (n > left())
      error_at(pos, "truncated %s: need %llu bytes, %llu left in the file", what, (unsigned long long)n,
               (unsigned long long)left());
  }

  template <typename T>
  T read(const char* what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, data + pos, sizeof(T));
    pos += sizeof(T);
    return v;
  }

  std::string_view read_string(const char* what) {
    uint64_t at = pos;
    uint64_t len = read<uint64_t>(what);
    if (len > left())
      error_at(at, "%s length %llu exceeds the %llu bytes left in the file", what, (unsigned long long)len,
               (unsigned long long)left());
    std::string_view s(reinterpret_cast<const char*>(data + pos), size_t(len));
    pos += len;
    return s;
  }

  // Bytes of one element of a fixed-size value type, 0 for STRING/ARRAY, -1 for an unknown type id.
  static int fixed_size(GgufType t) {
    switch (t) {
      case GgufType::UINT8: case GgufType::INT8: case GgufType::BOOL: return 1;
      case GgufType::UINT16: case GgufType::INT16: return 2;
      case GgufType::UINT32: case GgufType::INT32: case GgufType::FLOAT32: return 4;
      case GgufType::UINT64: case GgufType::INT64: case GgufType::FLOAT64: return 8;
      case GgufType::STRING: case GgufType::ARRAY: return 0;
    }
    return -1;
  }

  GgufType read_type(const char* what) {
    uint64_t at = pos;
    uint32_t raw = read<uint32_t>(what);
    if (fixed_size(GgufType(raw)) < 0) error_at(at, "unknown %s %u", what, raw);
    return GgufType(raw);
  }

  // Validates and steps over one value of type t (whose type tag was already read).
  void skip_value(GgufType t, int depth) {
    int fs = fixed_size(t);
    if (t == GgufType::BOOL) {
      uint64_t at = pos;
      uint8_t b = read<uint8_t>("bool value");
      if (b > 1) error_at(at, "bool value %u is not 0 or 1", unsigned(b));
    } else if (fs > 0) {
      need(uint64_t(fs), "value");
      pos += uint64_t(fs);
    } else if (t == GgufType::STRING) {
      read_string("string");
    } else {
      skip_array(depth);
    }
  }

  void skip_array(int depth) {
    uint64_t at = pos;
    if (depth >= kMaxArrayDepth) error_at(at, "arrays nested deeper than %d levels", kMaxArrayDepth);
    GgufType et = read_type("array element type");
    uint64_t count_at = pos;
    uint64_t count = read<uint64_t>("array length");
    int fs = fixed_size(et);
    // Smallest encoding of one element: its fixed size, a string's u64 length, an array's type + length.
    uint64_t min_elem = fs > 0 ? uint64_t(fs) : et == GgufType::STRING ? 8 : 12;
    if (count > left() / min_elem)
      error_at(count_at, "array of %llu %s elements needs at least %llu bytes per element, only %llu bytes left",
               (unsigned long long)count, gguf_type_name(et).c_str(), (unsigned long long)min_elem,
               (unsigned long long)left());
    if (fs > 0 && et != GgufType::BOOL) {
      pos += count * uint64_t(fs);
      return;
    }
    for (uint64_t i = 0; i < count; ++i) skip_value(et, depth + 1);
  }
};

}  // namespace dsv4
