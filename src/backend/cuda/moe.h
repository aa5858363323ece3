// MoE pieces on the GPU (model-spec §7) that sit between the expert GEMVs (gemv.h): routing from router
// logits, the clamped SwiGLU with the routing weight, and the sum of the k expert outputs. Numerics mirror the
// CPU backend (src/backend/cpu/cpu_ops.cpp) operation for operation. All pointers are device pointers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "quant/quant.h"

namespace dsv4::cuda {

// Per token t: s[e] = sqrt(softplus(z[t][e])); unless ids are given (hash layers), ids[t] = the k experts of
// largest s[e] + bias[e] in selection order (ties to the lower expert id, as the CPU's strict '>' scan; a NaN
// score ranks below every number);
// weights[t][j] = s[ids[j]] / sum_j s[ids[j]] * scale (the sum taken in selection order).
//   z: [T, E] router logits, bias: [E] or null, ids: [T, k] (input when hash, else output), weights: [T, k].
// E <= 1024, k <= 32. One warp per token; PDL-launched (pdl.cuh).
void moe_route_cuda(const float* z, const float* bias, int64_t n_tokens, int n_experts, int k, float scale,
                    bool hash, int32_t* ids, float* weights, cudaStream_t stream);

// Decode routing in one launch: the router projection z[e] = W[e] . x of one token (W: [E, D] F16 or F32 rows
// in file layout, x: [D] floats) followed by moe_route_cuda's scoring, selection and weights (same operations,
// so equal z give equal ids and weights bit for bit). Each CTA dots two router rows (thread t takes the 16-byte
// chunks t, t + 256, ...; partial sums added in warp order), and the last CTA to finish (a ticket in `workspace`)
// routes the token: one launch instead of the GEMV and moe_route_cuda. z is kept in the workspace. PDL-launched:
// the router rows (weights) are loaded before the dependency wait. DSV4_CUDA_ROUTE_KERNEL=0 (read per call) runs
// the pre-session-9 kernel instead (one row per CTA, plain launch; same z, ids and weights), for A/B timing.
int route_kernel_env();
//   workspace: moe_route_fused_workspace_bytes(E) bytes, zeroed once before the first launch; every launch
//   leaves the ticket at zero again, so launches on one stream (or replayed graphs) may share it.
// Needs E <= 1024, k <= 32, D % 8 == 0 (F16) or % 4 == 0 (F32), 16-byte aligned W and x.
struct MoeRouteFusedParams {
  QType wtype = QType::F16;
  const void* w = nullptr;
  int64_t d = 0;
  int n_experts = 0, k = 0;
  const float* x = nullptr;
  const float* bias = nullptr;  // [E] or null
  float scale = 1.0f;
  bool hash = false;            // ids are an input (the token's table row)
  int32_t* ids = nullptr;       // [k]
  float* weights = nullptr;     // [k]
  void* workspace = nullptr;
  // Optional: x quantized to Q8_K as well (the routed experts' input: the bytes quantize_activations_cuda writes
  // for Q2_K / Q4_K / IQ2_XXS weights, D / 256 blocks; needs D % 256 == 0), written by the CTAs along the way so
  // the expert launch needs no quantize launch of its own.
  void* xq8k = nullptr;
};
size_t moe_route_fused_workspace_bytes(int n_experts);
bool moe_route_fused_supported(QType wtype, int64_t d, int n_experts, int k);
void moe_route_fused_cuda(const MoeRouteFusedParams& p, cudaStream_t stream);

// A second stream for work that may overlap the main stream's (the shared expert next to the routed experts),
// created on first use. fork(main): later work on side() runs after everything enqueued on main so far;
// join(main): later work on main runs after everything enqueued on side() so far. Both are event record + wait,
// so a CUDA graph capture of main follows the fork into side() and back (the capture sees two branches).
class SideStream {
 public:
  SideStream() = default;
  SideStream(const SideStream&) = delete;
  SideStream& operator=(const SideStream&) = delete;
  ~SideStream();
  cudaStream_t side();
  void fork(cudaStream_t main);
  void join(cudaStream_t main);
  // Priority of the side stream, before its first use (default 0: the device's lowest).
  void set_priority(int priority) { priority_ = priority; }

 private:
  int priority_ = 0;
  cudaStream_t side_ = nullptr;
  cudaEvent_t fork_ = nullptr, join_ = nullptr;
};

// out[r][f] = silu(min(g, clamp)) * clamp(u, -clamp, clamp) * (row_weight ? row_weight[r] : 1).
//   g, u, out: [rows, F] (out may alias g), row_weight: [rows] or null.
void swiglu_cuda(const float* g, const float* u, const float* row_weight, int64_t rows, int64_t f, float clamp,
                 float* out, cudaStream_t stream);

// y[t][d] += sum_j ye[t][j][d], j in order 0..k-1 (summed first, then added, as the CPU).
void moe_sum_cuda(const float* ye, int64_t n_tokens, int k, int64_t d, float* y, cudaStream_t stream);

}  // namespace dsv4::cuda
