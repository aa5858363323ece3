// The attention ops of the op table (src/backend/backend.h: head_prep, compressor_step, indexer_topk,
// sink_attention) on DEVICE pointers: thin adapters from the op table's parameter structs to the kernels of
// attention.h, attention_rows.h, compressor.h and indexer.h. The CUDA backend calls them after staging its
// arguments on the device (today, while backend memory is host memory) or directly (once it is device memory).
// Weight vectors (norm, ape, sinks) are passed as device pointers the backend has mirrored.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "backend/backend.h"

namespace dsv4::cuda {

// q8 (optional): the finished rows also as split-layout Q8_0 activations (row_finish_cuda, attention_rows.h).
void head_prep_device(float* x, int T, int H, int dim, const HeadPrep& p, const float* norm_w, cudaStream_t stream,
                      void* q8 = nullptr);

// The jobs' head_preps in one launch (row_finish_batch_cuda); norm_w[j]: job j's norm weight on the device or null.
void head_prep_batch_device(const HeadPrepJob* jobs, const float* const* norm_w, int n, int T, cudaStream_t stream);

// s: the compressor buffers in device memory; rows of windows closing in this call are written to s.rows[w].
void compressor_step_device(const CompressorParams& p, const CompressorBuffers& s, const float* ape,
                            const float* norm_w, const float* v, const float* z, int T, int64_t p0,
                            cudaStream_t stream);

// Both steps (compressor_step_pair_cuda: one launch for a decode step); ape_* / norm_*: the jobs' device weights.
void compressor_step_pair_device(const CompressorJob& a, const float* ape_a, const float* norm_a,
                                 const CompressorJob& b, const float* ape_b, const float* norm_b, int T, int64_t p0,
                                 cudaStream_t stream);

// scratch: at least indexer_topk_scratch_floats() floats of device memory (may be null when that is 0).
int64_t indexer_topk_scratch_floats(const IndexerParams& p, int T, int64_t p0);
void indexer_topk_device(const IndexerParams& p, const float* qI, const float* wI, const float* keys, int T,
                         int64_t p0, int32_t* sel, float* scratch, cudaStream_t stream);

int64_t sink_attention_scratch_floats(const SinkAttnParams& p, int T, int64_t p0);
// q8 (optional): out also as split-layout Q8_0 activation rows of q8_cols columns (SinkAttnLaunch::q8).
void sink_attention_device(const SinkAttnParams& p, const float* sinks, const float* q, const float* kv_new,
                           const float* ring, const float* comp, const int32_t* sel, int T, int64_t p0, float* out,
                           float* scratch, cudaStream_t stream, void* q8 = nullptr, int64_t q8_cols = 0);

}  // namespace dsv4::cuda
