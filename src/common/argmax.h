// Greedy pick over logits, shared by the sampler (temperature 0) and Backend::argmax's host path, so both choose
// the same id: the largest value that is neither NaN nor -inf, the lowest index among equal ones; -1 when no
// entry is usable.
#pragma once

#include <cmath>
#include <cstdint>

namespace dsv4 {

inline bool usable_logit(float v) { return !std::isnan(v) && v != -INFINITY; }

inline int64_t argmax_usable(const float* x, int64_t n) {
  int64_t best = -1;
  float best_v = 0.0f;
  for (int64_t i = 0; i < n; ++i)
    if (usable_logit(x[i]) && (best < 0 || x[i] > best_v)) best = i, best_v = x[i];
  return best;
}

}  // namespace dsv4
