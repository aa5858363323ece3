// The one exception type dsv4 throws. Messages name the problem precisely (file, tensor, key, field, offset).
#pragma once

#include <stdexcept>
#include <string>

namespace dsv4 {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

}  // namespace dsv4
