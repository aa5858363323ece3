// L2 prefetch of weights (Backend::prefetch): a hint that moves bytes a later kernel will read from HBM into the
// L2 cache while the GPU runs latency-bound work that leaves the memory pipe idle.
//
// Why: a decode token on Flash is ~40% weight streaming (GEMVs at 2.5-3.4 TB/s) and ~60% small dependent kernels
// (HC mixing, the attention core, routing: 33 us per layer for the attention core alone) during which HBM is
// nearly idle. The attention core's 33 us could pull ~100 MB into the 50-60 MB L2; a GEMV whose matrix already
// sits in L2 waits ~2x less per load. The prefetch kernels only issue cp.async.bulk.prefetch.L2 (fire and forget:
// a kernel ends long before its bytes arrive), read nothing but the expert ids, and write nothing, so they can
// never change a result; they run on a low-priority side stream.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace dsv4::cuda {

// Prefetch bytes [p, p + bytes) into L2 (the 16-byte aligned interior; the edges are a few bytes).
void l2_prefetch_cuda(const void* p, size_t bytes, cudaStream_t stream);

// Prefetch the `bytes` bytes at base + ids[j] * stride for j < n_ids (the selected experts' slices of a stacked
// expert tensor; ids are read on the device, so the kernel follows the router through the stream order).
// Ids outside [0, n_experts) are skipped (a prefetch must never touch memory outside the tensor).
void l2_prefetch_experts_cuda(const void* base, int64_t stride, int64_t bytes, const int32_t* ids, int n_ids,
                              int n_experts, cudaStream_t stream);

}  // namespace dsv4::cuda
