// IQ2_XXS reference dequantizer (ggml semantics) and an importance-weighted quantizer of our own.
//
// Quantizer outline, per 256-value block:
//   1. per 8-value tuple: signs from x; if the number of negatives is odd (the format stores only 7 signs,
//      the 8th is parity), flip the element whose flip costs least (smallest importance * |x|);
//   2. per 32-value group: search a scale s and, per tuple, the grid entry minimising
//      sum w * (|x| - s*grid)^2 (level-wise rounding plus a precomputed neighbour list, see best_grid),
//      refitting s by least squares;
//   3. the block scale d = max(s) / (0.25 * 15.5), each group's 4-bit ls picked among the nearest candidates
//      by re-running the tuple search at the quantized scale d*(0.5+ls)*0.25.
// Cost: ~150 multiply-adds per tuple and candidate scale (see docs/quant.md for measured speed).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>

#include "quant/iq2xxs_tables.h"
#include "quant/kernels.h"

namespace dsv4::quant_detail {

namespace {

inline uint8_t grid_byte(int index, int k) {
  return uint8_t(iq2xxs_grid[index] >> (8 * k));
}

// Candidate search. Each of the 8 magnitudes has 3 levels, so a tuple rounded level by level is one of
// 3^8 = 6561 points; 256 of them are grid entries. For every point we precompute the kNeighbours grid entries
// nearest to it (unweighted L2 on the magnitudes). A point on the grid is the exact weighted optimum (the
// error is separable and every coordinate is at its nearest level); off the grid the weighted error is
// evaluated over the neighbour list only, the same idea as ggml's iq2 neighbour tables.
constexpr int kPoints = 6561;
constexpr int kNeighbours = 24;
constexpr float kLevels[3] = {8.0f, 25.0f, 43.0f};

struct SearchTables {
  int16_t on_grid[kPoints];                  // grid index or -1
  uint8_t neighbours[kPoints][kNeighbours];  // nearest grid entries, closest first
  float grid[256][8];                        // magnitudes as floats
};

const SearchTables& tables() {
  static const SearchTables* t = [] {
    auto* st = new SearchTables;
    for (int g = 0; g < 256; ++g)
      for (int k = 0; k < 8; ++k) st->grid[g][k] = float(grid_byte(g, k));
    for (int p = 0; p < kPoints; ++p) st->on_grid[p] = -1;
    for (int g = 0; g < 256; ++g) {
      int key = 0;
      for (int k = 7; k >= 0; --k) key = key * 3 + (grid_byte(g, k) == 8 ? 0 : grid_byte(g, k) == 25 ? 1 : 2);
      st->on_grid[key] = int16_t(g);
    }
    for (int p = 0; p < kPoints; ++p) {
      float v[8];
      for (int k = 0, q = p; k < 8; ++k, q /= 3) v[k] = kLevels[q % 3];
      std::pair<float, int> d[256];
      for (int g = 0; g < 256; ++g) {
        float e = 0;
        for (int k = 0; k < 8; ++k) e += (v[k] - st->grid[g][k]) * (v[k] - st->grid[g][k]);
        d[g] = {e, g};
      }
      std::partial_sort(d, d + kNeighbours, d + 256);
      for (int i = 0; i < kNeighbours; ++i) st->neighbours[p][i] = uint8_t(d[i].second);
    }
    return st;
  }();
  return *t;
}

float tuple_error(const float* ax, const float* w, float s, const float* g) {
  float err = 0;
  for (int k = 0; k < 8; ++k) {
    const float r = ax[k] - s * g[k];
    err += w[k] * r * r;
  }
  return err;
}

// Best grid entry (by the neighbour search above) for |x| (8 values, weights w) at scale s; returns its
// weighted squared error.
float best_grid(const float* ax, const float* w, float s, int* best) {
  const SearchTables& st = tables();
  int key = 0;
  for (int k = 7; k >= 0; --k) {
    // Nearest of 8s, 25s, 43s: thresholds at the midpoints 16.5s and 34s.
    const int l = ax[k] < 16.5f * s ? 0 : ax[k] < 34.0f * s ? 1 : 2;
    key = key * 3 + l;
  }
  if (st.on_grid[key] >= 0) {
    *best = st.on_grid[key];
    return tuple_error(ax, w, s, st.grid[*best]);
  }
  float best_err = INFINITY;
  *best = st.neighbours[key][0];  // defined result even if every error is NaN (NaN input)
  for (int i = 0; i < kNeighbours; ++i) {
    const int g = st.neighbours[key][i];
    const float err = tuple_error(ax, w, s, st.grid[g]);
    if (err < best_err) {
      best_err = err;
      *best = g;
    }
  }
  return best_err;
}

struct Group {
  float ax[32];  // |x| after the parity fix (a flipped element keeps its magnitude, its sign is wrong)
  float w[32];
  uint8_t sign_code[4];  // 7-bit codes
  float scale = 0;       // fitted group scale (before block quantization)
};

void prepare_group(const float* x, const float* imp, Group* g) {
  for (int t = 0; t < 4; ++t) {
    int neg = 0;
    uint8_t bits = 0;
    int cheapest = 0;
    float cheapest_cost = INFINITY;
    for (int k = 0; k < 8; ++k) {
      const int i = 8 * t + k;
      g->ax[i] = std::fabs(x[i]);
      g->w[i] = imp[i] >= 0 ? imp[i] : 0.0f;  // negative or NaN importance counts as none
      if (x[i] < 0) {
        bits |= uint8_t(1u << k);
        ++neg;
      }
      const float cost = imp[i] * g->ax[i];
      if (cost < cheapest_cost) {
        cheapest_cost = cost;
        cheapest = k;
      }
    }
    if (neg & 1) bits ^= uint8_t(1u << cheapest);
    g->sign_code[t] = bits & 127;  // bit 7 is implied by parity
  }
}

// Tuple search for a whole group at scale s; fills idx and returns the total error.
float group_error(const Group& g, float s, int idx[4]) {
  float err = 0;
  for (int t = 0; t < 4; ++t) err += best_grid(g.ax + 8 * t, g.w + 8 * t, s, &idx[t]);
  return err;
}

float fit_group_scale(Group* g) {
  float amax = 0;
  for (float a : g->ax) amax = std::max(amax, a);
  if (amax == 0) return 0;
  float best_err = INFINITY, best_s = amax / 43.0f;
  // Candidate scales map the largest magnitude onto grid values between ~15 and ~50 (grid tops at 43).
  for (int step = 0; step < 16; ++step) {
    float s = amax / (15.0f + 2.4f * float(step));
    int idx[4];
    group_error(*g, s, idx);
    // Least-squares refit of s for the chosen entries.
    float num = 0, den = 0;
    for (int t = 0; t < 4; ++t)
      for (int k = 0; k < 8; ++k) {
        const float q = float(grid_byte(idx[t], k));
        num += g->w[8 * t + k] * g->ax[8 * t + k] * q;
        den += g->w[8 * t + k] * q * q;
      }
    if (den > 0 && num > 0) s = num / den;
    const float err = group_error(*g, s, idx);
    if (err < best_err) {
      best_err = err;
      best_s = s;
    }
  }
  return best_s;
}

void quant_block(const float* x, const float* imp, block_iq2_xxs* y) {
  Group groups[8];
  float smax = 0;
  for (int gi = 0; gi < 8; ++gi) {
    prepare_group(x + 32 * gi, imp + 32 * gi, &groups[gi]);
    groups[gi].scale = fit_group_scale(&groups[gi]);
    smax = std::max(smax, groups[gi].scale);
  }
  std::memset(y, 0, sizeof(*y));
  if (smax == 0) return;  // d = 0: the block decodes to zeros
  y->d = f32_to_f16(smax / (0.25f * 15.5f));
  const float d = f16_to_f32(y->d);
  for (int gi = 0; gi < 8; ++gi) {
    const Group& g = groups[gi];
    const int center = std::clamp(int(std::lrintf(g.scale / (0.25f * d) - 0.5f)), 0, 15);
    float best_err = INFINITY;
    int best_ls = center, best_idx[4] = {0, 0, 0, 0};
    for (int ls = std::max(0, center - 1); ls <= std::min(15, center + 1); ++ls) {
      int idx[4];
      const float err = group_error(g, d * (0.5f + float(ls)) * 0.25f, idx);
      if (err < best_err) {
        best_err = err;
        best_ls = ls;
        std::memcpy(best_idx, idx, sizeof(idx));
      }
    }
    const uint32_t a0 = uint32_t(best_idx[0]) | uint32_t(best_idx[1]) << 8 | uint32_t(best_idx[2]) << 16 |
                        uint32_t(best_idx[3]) << 24;
    const uint32_t a1 = uint32_t(g.sign_code[0]) | uint32_t(g.sign_code[1]) << 7 |
                        uint32_t(g.sign_code[2]) << 14 | uint32_t(g.sign_code[3]) << 21 |
                        uint32_t(best_ls) << 28;
    y->qs[4 * gi + 0] = uint16_t(a0 & 0xFFFF);
    y->qs[4 * gi + 1] = uint16_t(a0 >> 16);
    y->qs[4 * gi + 2] = uint16_t(a1 & 0xFFFF);
    y->qs[4 * gi + 3] = uint16_t(a1 >> 16);
  }
}

}  // namespace

void dequant_iq2_xxs(const block_iq2_xxs* x, float* y, int64_t n) {
  for (int64_t b = 0; b < n / kQK_K; ++b) {
    const float d = f16_to_f32(x[b].d);
    for (int gi = 0; gi < 8; ++gi) {
      const uint32_t a0 = uint32_t(x[b].qs[4 * gi]) | uint32_t(x[b].qs[4 * gi + 1]) << 16;
      const uint32_t a1 = uint32_t(x[b].qs[4 * gi + 2]) | uint32_t(x[b].qs[4 * gi + 3]) << 16;
      const float db = d * (0.5f + float(a1 >> 28)) * 0.25f;
      for (int t = 0; t < 4; ++t) {
        const int g = int((a0 >> (8 * t)) & 255);
        const uint8_t signs = ksigns_iq2xs((a1 >> (7 * t)) & 127);
        for (int k = 0; k < 8; ++k) {
          const float v = db * float(grid_byte(g, k));
          y[b * kQK_K + 32 * gi + 8 * t + k] = (signs >> k) & 1 ? -v : v;
        }
      }
    }
  }
}

void quant_iq2_xxs(const float* x, block_iq2_xxs* y, int64_t n, const float* importance) {
  for (int64_t b = 0; b < n / kQK_K; ++b) quant_block(x + b * kQK_K, importance + b * kQK_K, &y[b]);
}

}  // namespace dsv4::quant_detail
