// DSV4_CUDA_SKIP (timing_skip.h): parsed once.
#include "backend/cuda/timing_skip.h"

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace dsv4::cuda {
namespace {

const std::vector<std::string>& skip_keys() {
  static const std::vector<std::string> keys = [] {
    std::vector<std::string> k;
    const char* e = std::getenv("DSV4_CUDA_SKIP");
    if (!e) return k;
    std::string_view s(e);
    while (!s.empty()) {
      const size_t c = s.find(',');
      const std::string_view item = s.substr(0, c);
      if (!item.empty()) k.emplace_back(item);
      if (c == std::string_view::npos) break;
      s.remove_prefix(c + 1);
    }
    if (!k.empty())
      std::fprintf(stderr,
                   "warning: DSV4_CUDA_SKIP=%s: those decode ops are left out (a timing tool): outputs are wrong\n", e);
    return k;
  }();
  return keys;
}

}  // namespace

bool timing_skip_active() { return !skip_keys().empty(); }

bool timing_skip(std::string_view key, int T) {
  if (T != 1) return false;
  for (const std::string& k : skip_keys())
    if (k == key) return true;
  return false;
}

bool timing_skip_weight(const char* weight_name, int T) {
  if (T != 1 || !weight_name || skip_keys().empty()) return false;
  std::string_view n(weight_name);
  if (n.substr(0, 4) == "blk.") {
    const size_t dot = n.find('.', 4);
    if (dot != std::string_view::npos) n.remove_prefix(dot + 1);
  }
  if (n.size() > 7 && n.substr(n.size() - 7) == ".weight") n.remove_suffix(7);
  return timing_skip(n, T);
}

}  // namespace dsv4::cuda
