// Selection and normalization over score rows on the GPU: top-k (MoE routing, indexer row selection) and
// softmax. All pointers are device pointers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace dsv4::cuda {

// For each row r of scores [rows, n] (row stride `stride` floats, 0 = n): the indices of the k largest values,
// ordered by value descending, ties broken toward the lower index (a total order, so the result is unique and
// deterministic). indices: [rows, k]; values (optional): [rows, k] the selected scores. k <= n, k <= 2048.
// Scores must not be NaN. Small k (<= 32) with n <= 8192 runs one warp per row (repeated argmax); otherwise one
// block per row does a 4-pass 8-bit radix select on order-preserving keys, then sorts the k winners.
inline constexpr int kTopkMax = 2048;
struct TopkParams {
  const float* scores = nullptr;
  int64_t rows = 0;
  int64_t n = 0;
  int64_t stride = 0;
  int k = 0;
  int32_t* indices = nullptr;
  float* values = nullptr;
};
void topk_cuda(const TopkParams& p, cudaStream_t stream);

// y[r] = softmax(x[r] * scale) over n, computed as exp(s - max) / sum in fp32. x, y: [rows, n] (may alias).
void softmax_cuda(const float* x, float* y, int64_t rows, int64_t n, float scale, cudaStream_t stream);

}  // namespace dsv4::cuda
