// CPU kernels of the attention sublayer (model-spec §6.4, §6.5): sink attention of one query head over a set of
// KV rows, and the lightning-indexer score of one compressed key. Plain fp32, fixed summation order (rows in
// the order given, dims ascending), so the result depends only on the inputs: the oracle the CUDA kernels are
// checked against.
#pragma once

#include <cstdint>

#include "backend/backend.h"

namespace dsv4 {
class ThreadPool;
}

namespace dsv4::cpu {

// The KV rows one query attends to (K = V): window rows window[0 .. n_window) (contiguous, `dim` floats each),
// then compressed rows comp + idx[i]*dim for i < n_comp (idx == nullptr: rows 0 .. n_comp-1 in order).
struct SinkAttnRows {
  const float* window = nullptr;
  int64_t n_window = 0;
  const float* comp = nullptr;
  const int32_t* comp_idx = nullptr;
  int64_t n_comp = 0;
};

// out = sum_r exp(l_r - M) row_r / (exp(sink - M) + sum_r exp(l_r - M)), l_r = scale * (q . row_r),
// M = max(sink, max_r l_r): one joint softmax over window and compressed rows; the sink is a value-less extra
// logit. scratch: n_window + n_comp floats.
void sink_attention_head(const float* q, int dim, const SinkAttnRows& rows, float sink, float scale,
                         float* scratch, float* out);

// Lightning-indexer score of one key: sum_h w[h] * ReLU(q_h . k). q: [n_heads, dim], w: [n_heads], k: [dim].
float indexer_score(const float* q, const float* w, const float* k, int n_heads, int dim);

// The CPU implementations of the attention ops of the table (backend.h documents the semantics). Arrays are host
// memory. Parallel over independent rows only (tokens / heads / keys), so results do not depend on the pool.
void head_prep(ThreadPool& pool, float* x, int T, int H, int dim, const HeadPrep& p);
void compressor_step(const CompressorParams& p, const CompressorBuffers& s, const float* v, const float* z, int T,
                     int64_t p0);
void indexer_topk(ThreadPool& pool, const IndexerParams& p, const float* qI, const float* wI, const float* keys,
                  int T, int64_t p0, int32_t* sel);
void sink_attention(ThreadPool& pool, const SinkAttnParams& p, const float* q, const float* kv_new,
                    const float* ring, const float* comp, const int32_t* sel, int T, int64_t p0, float* out);
void window_store(float* ring, int W, int dim, const float* kv, int T, int64_t p0);

}  // namespace dsv4::cpu
