// Lightning-indexer top-k selection; see indexer.h.
#include "model/indexer.h"

#include <algorithm>
#include <numeric>
#include <vector>

namespace dsv4 {

int indexer_top_k(const float* scores, int64_t n_vis, int k, int32_t* sel) {
  if (n_vis <= 0 || k <= 0) return 0;
  if (n_vis <= k) {
    std::iota(sel, sel + n_vis, 0);
    return int(n_vis);
  }
  std::vector<int32_t> idx(static_cast<size_t>(n_vis));
  std::iota(idx.begin(), idx.end(), 0);
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int32_t a, int32_t b) {
    return scores[a] != scores[b] ? scores[a] > scores[b] : a < b;
  });
  std::sort(idx.begin(), idx.begin() + k);
  std::copy_n(idx.begin(), k, sel);
  return k;
}

}  // namespace dsv4
