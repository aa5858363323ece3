// Tensor-core matrix products for prefill (many tokens per weight read): dense y = W x for T tokens, and the
// routed-expert part of the MoE FFN for T tokens x k slots with the expert ids on the device.
//
// Numerics: both operands are rounded to FP16 (weights dequantized from their block format, activations from
// f32) and multiplied on the tensor cores with FP32 accumulation. The CPU path instead quantizes activations to
// 8 bits (Q8_0 / Q8_K), so FP16 (11-bit significand) is closer to the exact product than the CPU oracle is;
// docs/cuda.md ("Prefill GEMM") gives the measured errors. F32 weights stay exact FP32 (cuBLAS SGEMM, TF32 off)
// so the HF-fixture tests (F32 weights, 1e-4) hold on CUDA too; GemmParams::exact asks the same of F16 weights
// (widened to FP32 exactly, times the unrounded f32 activations, as the F16 GEMV and the CPU do).
// FP16 range: |weights| and |activations| must stay below 65504 (true after RMSNorm and for every quant type's
// scale range); larger values would become inf.
//
// Two kernels, chosen per call (GemmParams::impl):
//   mma   our own kernel: weight tiles dequantized on the fly into shared memory (every supported block layout),
//         activation rows gathered by index, mma.sync m16n8k16 FP16 -> FP32. Reads the quantized bytes only;
//         the routed experts always use it (grouped by expert on the device, no host sync).
//   cublas  dense only: the weight dequantized to FP16 in row chunks into the workspace, then cuBLAS GEMM.
// All pointers are device pointers; every call is asynchronous on `stream` (no host synchronization), so it
// can be captured in a CUDA graph.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "backend/cuda/gemv.h"
#include "quant/quant.h"

namespace dsv4::cuda {

// Weight types and device layouts the GEMMs take (the device layouts of gemv.h: Q8Split for Q8_0 only).
bool gemm_supports(QType wtype, GemvLayout layout);
// Fewest tokens for which gemm_cuda beats the batched GEMV (gemv_cuda, 8 tokens per weight read), measured on
// the H100/H200 by dev/cuda/gemm.cu. Below it the caller should use gemv_cuda.
int gemm_min_tokens(QType wtype);
// The same for the routed experts (moe_gemm_cuda vs the MoE GEMV path: paired gate/up over T*k slots, SwiGLU,
// down), by the gate/up weight type; below it the caller should keep the GEMV path.
int moe_gemm_min_tokens(QType gate_type);

enum class GemmImpl : uint8_t { Auto, Mma, Cublas };

struct GemmParams {
  QType wtype = QType::F16;
  GemvLayout layout = GemvLayout::Ggml;
  const void* w = nullptr;  // rows x cols in `layout` (layout_row_bytes per row)
  int64_t rows = 0, cols = 0;
  const float* x = nullptr;  // [n_tokens][cols]
  int n_tokens = 0;
  float* y = nullptr;  // [n_tokens][rows]: y[t][r] = sum_c W[r][c] x[t][c]
  GemmImpl impl = GemmImpl::Auto;  // workbench/test knob; Auto picks per type and size
  // Exact FP32 product (F16 or F32 weights, Ggml layout): an F16 weight is widened to FP32 in the workspace and
  // cuBLAS SGEMM (TF32 off) multiplies it with the f32 activations as they are, so the result differs from the
  // F16 GEMV and the CPU (f32 activations, fp32 sums) only in summation order. For the control projections (HC
  // mixes, router) whose outputs choose Sinkhorn weights and experts: prefill must decide as decode does.
  bool exact = false;
  // Workbench/test knob: the double-buffered MMA kernel (bit-identical results; gemm.cu mma_kernel_db), not yet
  // timed on a GPU, hence off by default. DSV4_CUDA_MMA_DB=1 turns it on for every MMA launch.
  bool mma_double_buffer = false;
};
// Weight types the exact path takes (GemmParams::exact).
bool gemm_exact_supports(QType wtype);
// Fewest tokens for which the exact path beats the F16 GEMV (8 tokens per launch) on the control projections.
int gemm_exact_min_tokens();
size_t gemm_workspace_bytes(const GemmParams& p);
// workspace: gemm_workspace_bytes(p) bytes of device memory (256-byte aligned), or null when that is 0.
void gemm_cuda(const GemmParams& p, void* workspace, cudaStream_t stream);

// One weight stack of routed experts: n_experts matrices of rows x cols, expert e at base + e * expert_stride.
struct ExpertStack {
  QType type = QType::F16;
  GemvLayout layout = GemvLayout::Ggml;
  const void* base = nullptr;
  int64_t expert_stride = 0;  // bytes
};

// Routed part of the MoE FFN (the CPU backend's moe_ffn before the shared expert and the slot sum):
//   y_slots[t][j] = down_e( swiglu_clamped(gate_e x[t], up_e x[t], clamp) * weights[t][j] ),  e = ids[t][j]
// gate/up: ff x d per expert, down: d x ff per expert.
struct MoeGemmParams {
  ExpertStack gate, up, down;
  int64_t d = 0, ff = 0;
  int n_experts = 0, k = 0;
  const int32_t* ids = nullptr;    // [n_tokens][k], each in [0, n_experts) (not checked on the device)
  const float* weights = nullptr;  // [n_tokens][k]
  const float* x = nullptr;        // [n_tokens][d]
  int n_tokens = 0;
  float swiglu_clamp = 0.0f;
  float* y_slots = nullptr;  // [n_tokens][k][d]
  bool mma_double_buffer = false;  // as GemmParams::mma_double_buffer
};
size_t moe_gemm_workspace_bytes(const MoeGemmParams& p);
void moe_gemm_cuda(const MoeGemmParams& p, void* workspace, cudaStream_t stream);

}  // namespace dsv4::cuda
