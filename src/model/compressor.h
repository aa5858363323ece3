// Streaming KV compressor (model-spec §6.3, §6.9): gated per-channel softmax pooling of windows of m tokens
// into one row. One instance per compressor: the main one (dC = head_dim) of every layer with m > 0 and the
// indexer's (dC = idx_dim) on m == 4 layers.
//
// Layout invariants:
//   * All arrays are backend memory (DeviceBuffer); the backend's compressor_step op updates them.
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

#include "backend/backend.h"
#include "model/rope.h"

namespace dsv4 {

struct CompressorState {
  int ratio = 0;            // m
  int dim = 0;              // dC, pooled row width
  bool overlap = false;     // c == 2
  int64_t max_rows = 0;     // capacity limit: max_context / m
  Backend* be = nullptr;    // owner of the buffers
  DeviceBuffer cur_v, cur_z;    // [m, c*dC]
  DeviceBuffer prev_v, prev_z;  // [m, dC] (overlap only)
  DeviceBuffer rows;            // [capacity, dC] emitted rows (after norm, RoPE and QAT); grows on demand
  int64_t n_rows = 0;           // = n_past / m: the host always knows it

  int width() const { return overlap ? 2 * dim : dim; }  // c*dC, the projection width
  // overlap iff ratio == 4; be == nullptr: host_backend().
  void init(int ratio, int dim, int64_t max_context, Backend* be = nullptr);
  void reset();
  int64_t capacity() const { return int64_t(rows.bytes() / sizeof(float)) / (dim > 0 ? dim : 1); }
  // Grows `rows` (keeping the first n_rows) so that n rows fit; n <= max_rows. A host-side decision made from
  // token counts before the ops run.
  void reserve(int64_t n);
  CompressorBuffers buffers() const;
  std::vector<float> download_rows() const;  // [n_rows, dC] on the host (tests, save)

  void save(std::ostream& os) const;
  void load(std::istream& is, const char* what);  // `what` names the compressor in error messages
};

// Weighted RMSNorm over n values in place (fp32 sequential sum): x * rsqrt(mean(x^2) + eps) * w (w may be
// null: unweighted). Defined in the CPU backend library (src/backend/cpu/attention_ops.cpp).
void rms_norm_inplace(float* x, int n, const float* w, float eps);

}  // namespace dsv4
