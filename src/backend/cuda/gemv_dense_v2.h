// Dense single-token GEMV, variant 2 (GemvParams::kernel 3 or 4; the backend's default is 4 since session 9,
// DSV4_CUDA_GEMV_KERNEL=0 gives the streaming kernels back, =3 variant 2 without PDL).
//
// Same products as gemv_cuda's streaming kernel (each weight unit's integer dot formed exactly with dp4a, scaled in
// fp32; F16 in fp32 FMAs); only the fp32 summation order differs. What changes is the schedule (see the .cu):
//   * one wave of CTAs (as many as are resident at once) loops over tiles of rows: no second wave, no tail of
//     late CTAs, and each warp holds all of its item's weight loads (up to 4 KiB) in flight before any arithmetic;
//   * kernel 4 adds programmatic dependent launch: the kernel may start while the producer of its activations is
//     still finishing, issues its first tile's weight loads (weights are constant), then waits on the producer
//     (griddepcontrol.wait) before it reads activations or writes y. It also lets its own dependents launch early.
// Shapes: n_tokens 1, no device expert ids, no paired matrix. n_slots >= 1 is the grouped form (attn_output_a):
// slot s reads weights at w + s * expert_stride (expert_stride 0: the same matrix) and activation row
// s / act_slot_div, and writes y[s * rows + r]. NOTE: the streaming kernel ignores expert_stride without ids; here
// it places the groups, so a grouped launch needs no id table (ids would have to be read after the wait).
// Types: Q8_0 (Ggml or Q8Split layout) and F16.
// Activations: p.xq (quantize_activations_cuda's rows), or, for Q8Split weights with one activation row shared by
// every slot (act_slot_div == n_slots: a dense T = 1 launch, gemv_v2_multi_cuda) and cols <= 8192, the float row
// p.xf instead (p.xq null): each CTA quantizes it into shared memory after its dependency wait, byte for byte as
// quantize_activations_cuda(Q8_0, .., Q8Split) would, so the outputs equal the xq launch's bit for bit and the
// separate quantize launch is gone. GemvParams::xf's comment in gemv.h predates this (moe_down_sum_cuda only).
// Kernel 4 reads the weights before its dependency wait: they must not be written by a kernel that may still be
// running when it launches (decode weights are written once, at upload; tests synchronize after repacking).
#pragma once

#include <span>

#include "backend/cuda/gemv.h"

namespace dsv4::cuda {

inline constexpr int kGemvKernelV2 = 3;     // one wave, all loads up front
inline constexpr int kGemvKernelV2Pdl = 4;  // the same + programmatic dependent launch

// One launch for several matrices of one type, layout and width over the same single activation row (T = 1),
// e.g. attn_q_a + attn_kv, or a compressor's kv + gate: matrix i (w, rows rows) writes y[0 .. rows). The rows are
// cut into slots of the largest row count dividing every matrix's rows, at most kGemvV2MaxSlots slots in all.
inline constexpr int kGemvV2MaxSlots = 16;
struct GemvV2Part {
  const void* w = nullptr;
  float* y = nullptr;
  int64_t rows = 0;
};
// p gives wtype, layout, cols, xq and kernel (3 or 4); its w, y, rows, n_slots, expert_stride are ignored. Returns
// false, launching nothing, when the set does not fit (then run the matrices one by one). Each output value is the
// product gemv_v2_cuda computes for that row, up to the fp32 order in which a row's parts are added (the split of
// a row into parts depends on the total row count).
bool gemv_v2_multi_cuda(const GemvParams& p, std::span<const GemvV2Part> parts, cudaStream_t stream);

// Whether gemv_v2_cuda accepts p (shape, type, layout, alignment; p.kernel is not looked at).
bool gemv_v2_supported(const GemvParams& p);
// Runs p with variant 2 (p.kernel 4: with PDL, else without); fails with a reason if !gemv_v2_supported(p).
void gemv_v2_cuda(const GemvParams& p, cudaStream_t stream);

// DSV4_CUDA_GEMV_XF, read at every call: whether the backend's dense T = 1 split-layout GEMVs whose input nobody
// quantized take the float row (p.xf), and the CTA shape of float-mode launches. "1" -> kGemvXfOneCta (one CTA of
// 24 warps per SM quantizes the row once per SM), "3" -> kGemvXfThreeCtas (three CTAs of 8 warps per SM, the xq
// mode's shape: three copies per SM), unset or "0" -> kGemvXfOff (default: the backend quantizes in a separate
// launch; float mode measured ~1% slower end to end on the H200, session 10). Anything else fails.
inline constexpr int kGemvXfOff = 0;
inline constexpr int kGemvXfOneCta = 1;
inline constexpr int kGemvXfThreeCtas = 3;
int gemv_xf_env();

// DSV4_CUDA_GEMV_KERNEL for the backend's dense single-token GEMVs: unset or "4" -> kGemvKernelV2Pdl (default),
// "3" -> kGemvKernelV2, "0" -> 0 (gemv_cuda's streaming kernels); anything else fails. Read at every call.
int gemv_dense_kernel_env();

}  // namespace dsv4::cuda
