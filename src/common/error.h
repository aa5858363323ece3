// Error policy: code inside the engine throws dsv4::Error with a message that names the problem precisely
// (file, tensor, key, field, byte offset). The CLI and server catch it at their boundary and report it.
#pragma once

#include <cstdio>
#include <stdexcept>
#include <string>
#include <utility>

#include "dsv4/error.h"

namespace dsv4 {

// printf-style formatting into std::string (used by error messages everywhere). Callers pass string literals;
// the format check cannot see through the template, hence the local silencing of -Wformat-security (clang warns
// on the zero-argument instantiation).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wformat-security"
#pragma GCC diagnostic ignored "-Wformat-nonliteral"
template <typename... Args>
std::string strfmt(const char* fmt, Args&&... args) {
  int n = std::snprintf(nullptr, 0, fmt, args...);
  std::string s(n > 0 ? size_t(n) : 0, '\0');
  if (n > 0) std::snprintf(s.data(), s.size() + 1, fmt, args...);
  return s;
}
#pragma GCC diagnostic pop

template <typename... Args>
[[noreturn]] void fail(const char* fmt, Args&&... args) {
  throw Error(strfmt(fmt, std::forward<Args>(args)...));
}

}  // namespace dsv4

// Internal invariant check: a failure is a bug in dsv4, not bad input.
#define DSV4_CHECK(cond)                                                                          \
  do {                                                                                            \
    if (!(cond)) ::dsv4::fail("internal check failed: %s (%s:%d)", #cond, __FILE__, __LINE__);   \
  } while (0)
