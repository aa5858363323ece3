// Lightning-indexer selection (model-spec §6.4, §6.8): which compressed rows a CSA query attends to.
#pragma once

#include <cstdint>

namespace dsv4 {

// Compressed rows a query at position p may see: windows complete at p, rows 0 .. floor((p+1)/m) - 1
// (model-spec §6.3 availability rule). m > 0.
inline int64_t compressed_visible(int64_t p, int m) { return (p + 1) / m; }
// First position of the sliding window of a query at p (W rows including p itself).
inline int64_t window_first(int64_t p, int W) { return p - W + 1 > 0 ? p - W + 1 : 0; }

// Picks the top min(k, n_vis) rows by score among rows [0, n_vis) (scores[i] for row i). Ties prefer the lower
// row; the result is written to sel in ascending row order (so attention visits rows in a fixed order) and its
// count returned. With n_vis <= k every visible row is selected and scores is not read (may be null).
int indexer_top_k(const float* scores, int64_t n_vis, int k, int32_t* sel);

}  // namespace dsv4
