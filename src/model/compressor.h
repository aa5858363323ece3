// Streaming KV compressor (model-spec §6.3, §6.9): gated per-channel softmax pooling of windows of m tokens
// into one row. One instance per compressor: the main one (dC = head_dim) of every layer with m > 0 and the
// indexer's (dC = idx_dim) on m == 4 layers.
//
// Layout invariants:
//   * cur_v / cur_z [m, c*dC]: rows of the open window by in-window slot r = p mod m; z already includes ape[r].
//   * overlap (c == 2, m == 4): a token's first dC channels ("A") belong to the NEXT window's row, the last dC
//     ("B") to its own. prev_v / prev_z [m, dC] keep the A halves of the last closed window; at sequence start
//     they are value 0 / gate -inf (weight exactly 0), never HF's static-cache gate 0 (model-spec §16.10).
//   * Row w closes when token p = (w+1)m - 1 arrives; its pooling reads slots in a fixed order (prev 0..m-1 then
//     cur 0..m-1), so a row's value depends only on the tokens, never on how the stream was chunked.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <vector>

#include "model/rope.h"

namespace dsv4 {

struct CompressorState {
  int ratio = 0;            // m
  int dim = 0;              // dC, pooled row width
  bool overlap = false;     // c == 2
  int64_t max_rows = 0;     // capacity: max_context / m
  std::vector<float> cur_v, cur_z;    // [m, c*dC]
  std::vector<float> prev_v, prev_z;  // [m, dC] (overlap only)
  std::vector<float> rows;            // [n_rows, dC] emitted rows (after norm, RoPE and QAT)
  int64_t n_rows = 0;

  int width() const { return overlap ? 2 * dim : dim; }  // c*dC, the projection width
  void init(int ratio, int dim, int64_t max_context);  // overlap iff ratio == 4
  void reset();
  const float* row(int64_t w) const { return rows.data() + w * dim; }

  void save(std::ostream& os) const;
  void load(std::istream& is, const char* what);  // `what` names the compressor in error messages
};

// Buffers the projections of the token at position `pos` (v, z: c*dC floats, z WITHOUT ape; ape_row: ape[pos
// mod m], c*dC floats). When this token closes its window, writes the pooled, not yet normalized row into
// u (dC floats) and returns true.
bool compressor_push(CompressorState& s, int64_t pos, const float* v, const float* z, const float* ape_row,
                     float* u);

enum class CompressorQat { None, Fp8Kv, Fp4Indexer };

// Turns a pooled row u (dC floats) of window w into its final form and appends it to s.rows:
// RMSNorm_w(u, norm), RoPE on the last n_rot dims at position w*m, then the QAT round trip (Fp8Kv: FP8 on the
// first dC - n_rot dims; Fp4Indexer: Hadamard + FP4 on all dC dims).
void compressor_emit(CompressorState& s, float* u, const float* norm, float eps, const RopeFreqs& rope,
                     CompressorQat qat);

// Weighted RMSNorm over n values in place (fp32 sum, double-free): x * rsqrt(mean(x^2) + eps) * w (w may be
// null: unweighted).
void rms_norm_inplace(float* x, int n, const float* w, float eps);

}  // namespace dsv4
