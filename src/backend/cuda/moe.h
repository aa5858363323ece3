// MoE pieces on the GPU (model-spec §7) that sit between the expert GEMVs (gemv.h): routing from router
// logits, the clamped SwiGLU with the routing weight, and the sum of the k expert outputs. Numerics mirror the
// CPU backend (src/backend/cpu/cpu_ops.cpp) operation for operation. All pointers are device pointers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace dsv4::cuda {

// Per token t: s[e] = sqrt(softplus(z[t][e])); unless ids are given (hash layers), ids[t] = the k experts of
// largest s[e] + bias[e] in selection order (ties to the lower expert id, as the CPU's strict '>' scan);
// weights[t][j] = s[ids[j]] / sum_j s[ids[j]] * scale (the sum taken in selection order).
//   z: [T, E] router logits, bias: [E] or null, ids: [T, k] (input when hash, else output), weights: [T, k].
// E <= 1024, k <= 32.
void moe_route_cuda(const float* z, const float* bias, int64_t n_tokens, int n_experts, int k, float scale,
                    bool hash, int32_t* ids, float* weights, cudaStream_t stream);

// out[r][f] = silu(min(g, clamp)) * clamp(u, -clamp, clamp) * (row_weight ? row_weight[r] : 1).
//   g, u, out: [rows, F] (out may alias g), row_weight: [rows] or null.
void swiglu_cuda(const float* g, const float* u, const float* row_weight, int64_t rows, int64_t f, float clamp,
                 float* out, cudaStream_t stream);

// y[t][d] += sum_j ye[t][j][d], j in order 0..k-1 (summed first, then added, as the CPU).
void moe_sum_cuda(const float* ye, int64_t n_tokens, int k, int64_t d, float* y, cudaStream_t stream);

}  // namespace dsv4::cuda
