// Streaming KV compressor on the GPU (model-spec §6.3, §6.9): gated per-channel softmax pooling of windows of
// m tokens (overlapping halves for m == 4), then RMSNorm, RoPE at the window's first position and the QAT round
// trip of the emitted rows. The state layout is the CPU's CompressorState (src/model/compressor.h) in device
// memory, so a state can move between the two byte for byte:
//   cur_v / cur_z [m, c*dC]  open-window slots by p mod m (z includes ape)
//   prev_v / prev_z [m, dC]  A halves of the last closed window (overlap only; reset: 0 / -inf)
//   rows [max_rows, dC]      emitted rows, row w = window w
// CPU twin: compressor_push + compressor_emit. One call consumes T consecutive tokens: every window closing in
// the pass is pooled in parallel (slots read from the pass inputs, the open window, or the prev halves, in the
// CPU's slot order), finished, and then the open-window / prev buffers are advanced. Pooling uses expf (a few
// ulp from std::exp) and the norm a tree sum, so rows agree with the CPU to ~1e-6 relative before QAT; an FP8/FP4
// rounding boundary can move an element by one grid step. All pointers are device pointers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "backend/cuda/attention_rows.h"

namespace dsv4::cuda {

struct CompressorStepParams {
  int ratio = 0;                 // m
  int dim = 0;                   // dC
  bool overlap = false;          // m == 4
  int64_t pos0 = 0;              // position of token 0 (= tokens consumed so far)
  int T = 0;
  const float* v = nullptr;      // [T, c*dC] kv projection of the pass
  const float* z = nullptr;      // [T, c*dC] gate projection (without ape)
  const float* ape = nullptr;    // [m, c*dC]
  float* cur_v = nullptr;
  float* cur_z = nullptr;
  float* prev_v = nullptr;
  float* prev_z = nullptr;
  float* rows = nullptr;
  int64_t max_rows = 0;
  const float* norm_w = nullptr; // [dC]
  float eps = 1e-6f;
  int n_rot = 0;
  double omega[kRowMaxPairs] = {};
  RowQat qat = RowQat::None;
  // T == 1: the one-launch decode kernel (same bits as the general path's pool + row_finish + update launches);
  // false, or DSV4_CUDA_COMPRESSOR_KERNEL=0 in the environment (read once), selects the general path (A/B).
  bool decode_kernel = true;
};

// Rows a call emits: floor((pos0 + T) / m) - floor(pos0 / m), starting at row floor(pos0 / m).
inline int64_t compressor_rows_emitted(int64_t pos0, int T, int m) { return (pos0 + T) / m - pos0 / m; }

// Runs the step; returns the number of rows emitted. Throws dsv4::Error when the rows would exceed max_rows.
int64_t compressor_step_cuda(const CompressorStepParams& p, cudaStream_t stream);

// Two independent steps (disjoint state; a CSA layer's main and indexer compressors): with T == 1 on both and the
// decode kernel on, ONE launch of two blocks (each step's bits as compressor_step_cuda gives them); otherwise the
// two calls.
void compressor_step_pair_cuda(const CompressorStepParams& a, const CompressorStepParams& b, cudaStream_t stream);

}  // namespace dsv4::cuda
