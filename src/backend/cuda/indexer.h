// Lightning indexer on the GPU (model-spec §6.4, §6.8): per CSA query token, score every visible compressed
// indexer key, score(i) = sum_h w_h * ReLU(q_h . k_i), and select the top-k rows in ascending row order.
// CPU twins: dsv4::cpu::indexer_score and dsv4::indexer_top_k. All pointers are device pointers.
//
// Scores, two kernels (IndexerImpl):
//   CudaCore   a CTA stages 32 keys (transposed, padded: conflict-free) and the token's queries in shared
//              memory; thread (key, head group) accumulates 8 heads' weighted ReLU dots in fp32, a fixed-order
//              sum over groups finishes. Any dI <= 128, HI <= 64.
//   TensorCore prefill, dI == 128, HI <= 64: a CTA owns one token; each tile of 64 keys is a [64 heads x 128] x
//              [128 x 64 keys] mma.sync m16n8k16 GEMM on hi/lo-split fp16 operands (hi*hi + hi*lo + lo*hi, fp32
//              accumulation: ~2^-22 relative per product, as the sink attention's tensor-core path), then ReLU,
//              the head weights and the sum over heads in fp32 (shuffles within a 16-head tile, a fixed-order
//              sum over the 4 tiles). Needs |q|, |k| < 65504 (fp16 range).
// Selection: one 1024-thread block per token: 8-bit radix select of the k-th largest score (order-preserving
// integer keys, warp-aggregated histograms) over the token's visible rows, then one ordered pass that keeps
// rows above the threshold and the lowest-index rows equal to it (ties toward the lower row, as the CPU), so
// the selection comes out ascending with no sort. With every visible row fitting in k, no scoring happens
// (all rows, as the CPU).
// Fused decode path (default where it applies: dI == 128, HI <= 64, impl Auto/TensorCore, k < visible rows <=
// kIndexerFusedMaxRows, i.e. contexts up to 4k at ratio 4): one launch of a cluster of 8 CTAs per token. Each CTA
// scores its 64-key tiles with the tensor-core tile code (the same score bits as the TensorCore kernel) into its
// shared memory; CTA 0 gathers the scores over DSMEM and runs the same selection, so the rows equal the two-launch
// path's exactly. Why: at 2k context (513..524 visible rows for k = 512) the two launches (9 score CTAs, then a
// 1024-thread select block with 4 radix passes over a global score row) cost 13.85 us per CSA layer (H200, eager
// event profile incl. ~3 us event overhead) for ~0.3 MB of keys. IndexerLaunch::fused = false or
// DSV4_CUDA_INDEXER_FUSED=0 (read once) gives the two launches back (A/B, tests).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace dsv4::cuda {

enum class IndexerImpl : int { Auto = 0, CudaCore = 1, TensorCore = 2 };
// Tensor cores win from one token on (H200, decode: 8k 14.4 us vs 23.2, 64k 52 vs 85, whole selection).
inline constexpr int kIndexerTcMinTokens = 1;

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
  IndexerImpl impl = IndexerImpl::Auto;  // scores kernel; Auto: TensorCore when it fits (dI 128)
  // Bound on the score matrix of one launch, in floats (0: kIndexerMaxScoreFloats). indexer_select_cuda runs the
  // tokens in chunks whose [chunk, visible rows] scores fit under it; tests set it small to force chunks.
  int64_t max_score_floats = 0;
  bool fused = true;            // false: never the fused decode path (see above)
};

// Default bound on the scores of one launch: 2^28 floats (1 GiB). Without it a pass of T = 8192 tokens at 1M
// context would need 8192 x 262144 floats (8 GiB) of scratch; tokens are independent (own score row, own
// selection), so chunking changes no result.
inline constexpr int64_t kIndexerMaxScoreFloats = int64_t(1) << 28;

// Most visible rows the fused path takes: 8 CTAs x 2 tiles x 64 keys; past it the two launches spread the scores
// over more CTAs.
inline constexpr int64_t kIndexerFusedMaxRows = 1024;
// Whether indexer_select_cuda takes p in the fused launch.
bool indexer_fused_applies(const IndexerLaunch& p);

// Visible rows of the last token: the width of the score matrix.
inline int64_t indexer_max_visible(const IndexerLaunch& p) { return (p.pos0 + p.T) / p.ratio; }
// Scratch floats a call needs (scores [chunk, n] of its largest token chunk, <= the bound above); 0 when every
// row fits in k.
int64_t indexer_scratch_floats(const IndexerLaunch& p);
void indexer_select_cuda(const IndexerLaunch& p, float* scratch, cudaStream_t stream);

// The scoring step alone (tests, workbench): scores [T, n_cols], -inf where row >= the token's visible count.
void indexer_scores_cuda(const IndexerLaunch& p, float* scores, int64_t n_cols, cudaStream_t stream);

}  // namespace dsv4::cuda
