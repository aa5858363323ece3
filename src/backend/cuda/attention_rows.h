// Per-row post-processing of attention vectors on the GPU (model-spec §3.1, §3.2, §3.4, §6.2-6.4): an optional
// RMSNorm, RoPE of the last n_rot dims at the row's position, then an optional QAT round trip. One kernel serves
//   * the main KV row of each token      (weighted norm, RoPE at p, FP8 on the first d - n_rot dims)
//   * compressor rows when they close    (weighted norm, RoPE at w*m, FP8 or Hadamard+FP4)
//   * indexer queries                    (no norm, RoPE at p, Hadamard+FP4)
// CPU twins: rms_norm_inplace, rope_rotate, qat_fp8_blocks, qat_fp4_indexer_row (src/model). The QAT grids and
// the Hadamard butterflies are computed with the CPU's exact operation order, so on identical inputs the QAT
// step is bitwise equal; the norm's sum of squares is a tree (not the CPU's sequential sum), so after a norm
// an element sitting on an FP8/FP4 rounding boundary may land one grid step away (tests bound how often).
// All pointers are device pointers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace dsv4::cuda {

enum class RowQat : int { None = 0, Fp8 = 1, Fp4Hadamard = 2 };
enum class RowNorm : int { None = 0, Unweighted = 1, Weighted = 2 };

inline constexpr int kRowMaxDim = 1024;
inline constexpr int kRowMaxPairs = 32;

struct RowFinishParams {
  float* x = nullptr;            // [n_rows, stride], processed in place
  int64_t n_rows = 0;
  int d = 0;                     // row width (<= 1024; a power of two for Fp4Hadamard)
  int64_t stride = 0;            // floats between rows (0 = d)
  RowNorm norm = RowNorm::None;
  const float* norm_w = nullptr; // [d] (Weighted)
  float eps = 1e-6f;
  int n_rot = 0;                 // 0: no RoPE
  int64_t pos0 = 0;              // row r rotates at position pos0 + (r / rows_per_pos) * pos_step
  int64_t pos_step = 1;
  int rows_per_pos = 1;          // e.g. the number of heads of a query
  bool inverse = false;
  double omega[kRowMaxPairs] = {};
  RowQat qat = RowQat::None;     // Fp8: blocks of 64 over the first d - n_rot dims; Fp4Hadamard: all d dims
  // Optional (d % 32 == 0): the finished rows also as Q8_0 activations in the split layout, [n_rows][d + d/8]
  // bytes, bit-identical to quantize_activations_cuda(Q8_0, x, n_rows, d, q8, Q8Split) on the output (the q_a
  // norm's output is the q_b projection's input: its quantize launch is skipped).
  void* q8 = nullptr;
};
void row_finish_cuda(const RowFinishParams& p, cudaStream_t stream);
// The argument checks of row_finish_cuda (dsv4::Error on a bad width, RoPE, Hadamard width, missing norm weights,
// Q8 width); fills stride 0 with d. For kernels that finish rows themselves (compressor.cu).
void row_finish_check(RowFinishParams& p);

// Up to kRowMaxJobs independent row sets (disjoint buffers) in ONE launch, each row finished exactly as
// row_finish_cuda finishes it (same bits): the decode q, kv and indexer-query rows of a layer. No q8 output.
inline constexpr int kRowMaxJobs = 3;
struct RowFinishBatch {
  RowFinishParams job[kRowMaxJobs];
  int n_jobs = 0;
};
void row_finish_batch_cuda(const RowFinishBatch& b, cudaStream_t stream);

}  // namespace dsv4::cuda
