// Small device kernels the CUDA op table needs around the big ones (gemv, attention, HC, MoE): filling memory,
// the embedding gather, the hash-routing gather and the constant expert-id ramp of the grouped projection. They
// exist so that no op of the backend reads device memory on the host (a decode step stays asynchronous and
// graph-capturable). All pointers are device pointers; every launch goes on the given stream.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "quant/quant.h"

namespace dsv4::cuda {

// dst[i] = value for i < n.
void fill_f32_cuda(float* dst, float value, size_t n, cudaStream_t stream);

// Embedding types embed_rows_cuda decodes on the device.
bool embed_supports(QType type);

// X[t][s][:] = dequantized row tokens[t] of table (GGUF row layout, `vocab` rows of `dim` values) for every
// stream s < n_streams. Values equal dequantize_row(): Q8_0 d * q with d the f16 scale widened exactly, F16
// widened exactly, F32 copied. A token outside [0, vocab) (the caller validates ids on the host before upload)
// gives a zero row instead of an out-of-bounds read.   X: [T, n_streams, dim], tokens: [T]
void embed_rows_cuda(QType type, const void* table, int64_t vocab, int64_t dim, const int32_t* tokens, int T,
                     int n_streams, float* X, cudaStream_t stream);

// ids[t][j] = table[tokens[t]][j] for j < k (the hash layers' tid2eid lookup). table: [vocab, k] int32, values
// already validated on the host; a token outside [0, vocab) gives expert 0 (no out-of-bounds read).
void gather_hash_ids_cuda(const int32_t* table, int64_t vocab, int k, const int32_t* tokens, int T, int32_t* ids,
                          cudaStream_t stream);

// argmax_usable(x, n) (common/argmax.h: the largest value neither NaN nor -inf, the lowest index among equal ones,
// -1 when none) as a 64-bit key in device memory (*key; a memset and one launch, n < 2^32): Backend::argmax of the
// CUDA backend, which copies back these 8 bytes instead of the logits. argmax_index_of_key decodes it on the host.
void argmax_usable_cuda(const float* x, int64_t n, uint64_t* key, cudaStream_t stream);
int64_t argmax_index_of_key(uint64_t key);

// ids[s] = s mod period for s < n (expert ids of a grouped projection run as a MoE launch).
void ramp_mod_cuda(int32_t* ids, int64_t n, int period, cudaStream_t stream);

}  // namespace dsv4::cuda
