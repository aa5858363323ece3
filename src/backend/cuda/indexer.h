// Lightning indexer on the GPU (model-spec §6.4, §6.8): per CSA query token, score every visible compressed
// indexer key, score(i) = sum_h w_h * ReLU(q_h . k_i), and select the top-k rows in ascending row order.
// CPU twins: dsv4::cpu::indexer_score and dsv4::indexer_top_k. All pointers are device pointers.
//
// Scores: a CTA stages 32 keys (transposed, padded: conflict-free) and the token's queries in shared memory;
// thread (key, head group) accumulates 8 heads' weighted ReLU dots, a fixed-order sum over groups finishes.
// Selection: topk_cuda (select.h: radix select, ties toward the lower row, as the CPU) over the token's row
// range (rows beyond a token's visible count score -inf), then the winners are sorted ascending by rank
// counting. With every visible row fitting in k, no scoring happens (all rows, as the CPU).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace dsv4::cuda {

struct IndexerLaunch {
  const float* q = nullptr;     // [T, HI, dI] queries after RoPE / QAT
  const float* w = nullptr;     // [T, HI] raw head weights; each is multiplied by weight_scale before use
  float weight_scale = 1.0f;    // 1/sqrt(dI*HI) (the CPU multiplies the weights in place by it first)
  const float* keys = nullptr;  // [n_keys, dI] indexer compressor rows
  int T = 0, HI = 0, dI = 0;
  int64_t pos0 = 0;             // token t is at position pos0 + t; sees rows 0 .. (pos + 1) / ratio - 1
  int ratio = 4;
  int k = 0;                    // top-k (512 for Flash)
  int32_t* sel = nullptr;       // [T, k] selected rows, ascending; entries past count are unspecified
  int32_t* count = nullptr;     // optional [T]: min(k, visible rows) (the host also knows it)
};

// Visible rows of the last token: the width of the score matrix.
inline int64_t indexer_max_visible(const IndexerLaunch& p) { return (p.pos0 + p.T) / p.ratio; }
// Scratch floats a call needs (scores [T, n] and top-k indices [T, k]); 0 when every row fits in k.
int64_t indexer_scratch_floats(const IndexerLaunch& p);
void indexer_select_cuda(const IndexerLaunch& p, float* scratch, cudaStream_t stream);

// The scoring step alone (tests, workbench): scores [T, n_cols], -inf where row >= the token's visible count.
void indexer_scores_cuda(const IndexerLaunch& p, float* scores, int64_t n_cols, cudaStream_t stream);

}  // namespace dsv4::cuda
