// Helpers shared by the text tests: where the reference data lives, and the built-in vocabulary loaded once.
#pragma once

#include <gtest/gtest.h>

#include <filesystem>
#include <string>

#include "dsv4/text.h"

namespace dsv4::test {

inline std::string source_data(const char* name) {
  return std::string(DSV4_SOURCE_DIR) + "/data/" + name;
}
inline std::string shared_data(const char* name) {
  return std::string(DSV4_SHARED_DIR) + "/data/" + name;
}

// The real V4 arrays, built once per test binary (deriving 127,741 merges takes a moment).
const TokenizerData& v4_data();

}  // namespace dsv4::test
