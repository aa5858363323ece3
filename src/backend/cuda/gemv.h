// Quantized matrix-vector products on the GPU (decode path): y = W x for GGUF-layout weights of type Q8_0, Q2_K,
// Q4_K, IQ2_XXS, F16 or F32, reading every weight byte once.
//
// Numerics match the CPU dot kernels of src/quant (quant.h): activations are first quantized on the GPU to
// the weight type's partner format, bit-identically to quantize_activation() on the CPU (Q8_0 for Q8_0 weights,
// Q8_K for Q2_K/Q4_K/IQ2_XXS; plain f32 for F16/F32), then each weight block's integer dot product is formed
// exactly (dp4a) and scaled in fp32. Only the fp32 summation order across blocks differs from the CPU.
//
// Three shapes, one kernel family:
//   dense        y[t][r] = W[r] . x[t]              for t < n_tokens (1..8 per launch; weights read once)
//   batched      the same with n_tokens > 1: every weight block is decoded once and dotted with each token
//   paired       w and w2 in one launch (same activations): gate and up projections together
//   MoE          n_slots experts in one launch: slot s uses expert expert_ids[s] (device memory, so the
//                launch is graph-capturable) and activation row s / act_slot_div (act_slot_div = k when the
//                k experts of a token share its input, as gate/up do; 1 when each slot has its own, as down).
// All pointers are device pointers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "quant/quant.h"

namespace dsv4::cuda {

inline constexpr int kGemvMaxTokens = 8;  // tokens per launch; gemv_cuda splits larger batches

// Device layout of the weights. Ggml: the file's blocks as they are. Q8Split (Q8_0 only, cols % 256 == 0): each
// row repacked by q8_0_split_cuda into [cols int8 quants][cols/32 f16 scales] (34 bytes per 32 values either
// way), so the kernel loads 16 quants with one 16-byte load; the workbench prototype of this layout reached
// 65-75% of the H200's read bandwidth on the big attention matrices vs ~55% for the block layout. Values are
// unchanged.
enum class GemvLayout : uint8_t { Ggml, Q8Split };
bool q8_split_supported(int64_t cols);
int64_t q8_split_row_bytes(int64_t cols);
// n_rows rows (all experts of a stack together) of Q8_0 blocks at src -> split rows at dst (device pointers).
void q8_0_split_cuda(const void* src, int64_t n_rows, int64_t cols, void* dst, cudaStream_t stream);

// Layout policy, in one place: the backend asks which device layout a weight gets, how long a device row is, and
// repacks at upload through these (new layouts, e.g. a repacked expert layout, are added here only).
//   expert_stack: the tensor is a 3-D stack of routed experts (read a few rows at a time by MoE launches).
GemvLayout preferred_layout(QType wtype, int64_t cols, bool expert_stack);
int64_t layout_row_bytes(QType wtype, GemvLayout layout, int64_t cols);
// n_rows file-layout rows at src (device) -> n_rows rows of `layout` at dst (device, layout_row_bytes each).
// Ggml: a plain device copy.
void repack_weight_cuda(QType wtype, GemvLayout layout, const void* src, int64_t n_rows, int64_t cols, void* dst,
                        cudaStream_t stream);

struct GemvParams {
  QType wtype = QType::F16;
  const void* w = nullptr;            // rows x cols (x experts), GGUF row layout: row r = row_bytes(cols) bytes
  int64_t rows = 0, cols = 0;
  GemvLayout layout = GemvLayout::Ggml;
  int64_t expert_stride = 0;          // bytes between experts of a 3-D stack (MoE only)
  const int32_t* expert_ids = nullptr;  // [n_slots] expert per slot, or null for a dense 2-D matrix
  int n_slots = 1;
  int act_slot_div = 1;
  const void* xq = nullptr;           // [n_slots / act_slot_div * n_tokens] activation rows of
                                      // gpu_activation_bytes(wtype, cols) from quantize_activations_cuda
  // moe_down_sum_cuda only: float activation rows ([n_slots / act_slot_div][cols]) instead of xq, quantized to
  // Q8_K inside the launch (each CTA its own rows in shared memory, while its weight copies are in flight), with
  // the same bytes quantize_activations_cuda writes: saves the quantize launch. Q8_K-activation types only.
  const float* xf = nullptr;
  int n_tokens = 1;                   // dense: tokens; MoE: must be 1
  float* y = nullptr;                 // [n_slots][n_tokens][rows]
  // Paired launch: a second matrix (stack) of the same type, shape and layout over the same activations and
  // expert ids, written to y2 (MoE gate + up, shared-expert gate + up: one launch instead of two).
  const void* w2 = nullptr;
  float* y2 = nullptr;
  // Tuning knobs (0 = the type's default): weight blocks whose loads a lane issues before computing (1, 2, 4),
  // rows per warp sharing one activation load (1, 2, 4) — both for single-token launches — and warps per CTA
  // (4..16, any launch). dev/cuda/gemv.cu sweeps them; results do not depend on them beyond fp32 summation order.
  int unroll = 0;
  int row_group = 0;
  int cta_warps = 0;
  // Kernel choice for single-token launches: 0 = the policy in gemv_cuda, 1 = the register-streaming kernel
  // above, 2 = the staged kernel (each CTA copies a tile of whole rows into shared memory with cp.async, every
  // row's bytes issued up front, then decodes from shared memory; needs gemv_staged_supported). Staged knobs
  // (0 = default): tile_rows = rows per CTA tile, iq2_rep = copies of the IQ2_XXS grid table in shared memory
  // (1..32, power of two: 32 copies make every lane's lookup hit its own bank). The staged kernel uses
  // row_group (2 or 4) as rows per warp sharing one activation load and cta_warps as warps per CTA.
  // Streaming kernel and IQ2_XXS: iq2_rep 0/1 = the plain 2 KiB uint2 grid table (default: measured faster there),
  // >= 2 = 8 copies of the byte-permute selector table (same values).
  // 3, 4 (gemv_cuda only): dense single-token variant 2 of gemv_dense_v2.h (4 = with programmatic dependent launch).
  int kernel = 0;
  int tile_rows = 0;
  int iq2_rep = 0;
};
void gemv_cuda(const GemvParams& p, cudaStream_t stream);

// Whether the staged kernel can run p: one token per slot (or a dense single token), Ggml or Q8Split layout,
// every row span 16-byte aligned (weight pointers, expert_stride and the device row length multiples of 16).
bool gemv_staged_supported(const GemvParams& p);

// Fused MoE decode pieces (one token per slot).
//
// gate + up + clamped SwiGLU * route weight in one launch: p.w = gate stack, p.w2 = up stack (same type, shape,
// layout; Q2_K, Q4_K or IQ2_XXS routed experts, or Q8_0 in either layout: the shared expert as one slot with
// expert_ids null), expert_ids / n_slots / act_slot_div / xq as for gemv_cuda, p.y = h
// [n_slots][rows] with
//   h[s][r] = silu(min(g, clamp)) * clamp(u, -clamp, clamp) * route_w[s]   (route_w may be null: weight 1),
// g = gate_{ids[s]} row r . x, u = up_{ids[s]} row r . x, rounded as swiglu_cuda (moe.h). p.y2 is unused.
// p.kernel 0/1: the streaming kernel, each warp dotting gate row r and up row r with one activation load (the
// default: faster than the staged kernel for IQ2_XXS and Q4_K on the H200); 2: the staged kernel (needs
// gemv_staged_supported; equals gemv_cuda(kernel 2, paired) + swiglu_cuda bit for bit).
void moe_gate_up_swiglu_cuda(const GemvParams& p, const float* route_w, float clamp, cudaStream_t stream);
// down projection + in-order sum over each token's k slots in one launch (staged kernel: needs
// gemv_staged_supported; equals gemv_cuda(kernel 2) + moe_sum_cuda bit for bit): slots s = t*k + j (n_slots = T*k,
// act_slot_div = 1: each slot has its own input row of xq, or of xf: see GemvParams::xf), p.y = [T][rows]
// accumulated:
//   y[t][r] += sum_{j<k} down_{ids[t*k+j]} row r . xq[t*k+j]   (summed in j order first, then added: moe_sum_cuda)
void moe_down_sum_cuda(const GemvParams& p, int k, cudaStream_t stream);

// Quantizes n_rows rows of `cols` floats into activation_type(wtype) rows of gpu_activation_bytes(wtype, cols)
// bytes each (for F16/F32 weights it copies the floats). Values are bit-identical to quantize_activation();
// the layout equals the CPU's for Q8_0 and f32, while Q8_K blocks are padded to 304 bytes on the GPU
// ({float d; float pad[3]; int8 qs[256]; int16 bsums[16]}) so the quants are 16-byte aligned.
// With layout Q8Split the activation rows are [cols int8][cols/32 f32 scales] to match the split weights.
int64_t gpu_activation_bytes(QType wtype, int64_t cols, GemvLayout layout = GemvLayout::Ggml);
void quantize_activations_cuda(QType wtype, const float* x, int64_t n_rows, int64_t cols, void* xq,
                               cudaStream_t stream, GemvLayout layout = GemvLayout::Ggml);

// Weight types gemv_cuda accepts.
bool gemv_supports(QType wtype);

}  // namespace dsv4::cuda
