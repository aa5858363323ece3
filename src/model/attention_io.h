// Little-endian binary read/write helpers for the attention state streams (internal to the attention files).
// Every read failure names what was being read and the stream byte offset where it started.
#pragma once

#include <cstdint>
#include <cstring>
#include <istream>
#include <ostream>
#include <string>
#include <vector>

#include "common/error.h"

namespace dsv4::attn_io {

static_assert(sizeof(float) == 4, "state format stores IEEE binary32");

// The engine only targets little-endian hosts (x86-64, arm64), so values are written as their raw bytes.
inline void put_bytes(std::ostream& os, const void* p, size_t n) {
  os.write(static_cast<const char*>(p), std::streamsize(n));
  if (!os) fail("attention state: write of %zu bytes failed", n);
}
inline void put_i64(std::ostream& os, int64_t v) { put_bytes(os, &v, sizeof v); }
inline void put_floats(std::ostream& os, const float* p, size_t n) { put_bytes(os, p, n * sizeof(float)); }

inline void get_bytes(std::istream& is, void* p, size_t n, const char* what) {
  std::streamoff at = is.tellg();
  is.read(static_cast<char*>(p), std::streamsize(n));
  if (!is || size_t(is.gcount()) != n)
    fail("attention state: truncated while reading %s (%zu bytes at stream offset %lld)", what, n,
         (long long)at);
}
inline int64_t get_i64(std::istream& is, const char* what) {
  int64_t v = 0;
  get_bytes(is, &v, sizeof v, what);
  return v;
}
// Reads an i64 and requires it to equal `expect`.
inline void expect_i64(std::istream& is, int64_t expect, const char* what) {
  std::streamoff at = is.tellg();
  int64_t v = get_i64(is, what);
  if (v != expect)
    fail("attention state: field %s at stream offset %lld is %lld, this session expects %lld", what,
         (long long)at, (long long)v, (long long)expect);
}
inline void get_floats(std::istream& is, float* p, size_t n, const char* what) {
  get_bytes(is, p, n * sizeof(float), what);
}

}  // namespace dsv4::attn_io
