// Routed-expert decode launches, variant 2 (opt-in: GemvParams::kernel = kMoeKernelV2 on moe_gate_up_swiglu_cuda /
// moe_down_sum_cuda, or DSV4_CUDA_MOE_KERNEL=5 in the backend). Same contract and the same products as the default
// kernels (gemv.h): every weight block's integer dot is formed exactly, scaled in fp32 by the same expressions, and
// each output row is summed in the default kernels' order (lane -> block mapping, warp_sum tree, parts, slot order),
// so results are meant to equal them bit for bit (the tests allow 1e-6 relative for compiler FMA contraction).
//
// What changes is the schedule and the decode (see gemv_moe_v2.cu for the numbers behind it):
//   * one warp per output row ("unit": gate row + up row of one slot, or the k down rows of one token), whole units
//     copied into the warp's own shared-memory ring with cp.async (2 units in flight per warp, issued before the
//     CTA's table setup), decoded from shared memory: no dependent DRAM steps inside a row, no registers held by
//     loads in flight, no CTA-wide barrier after the start;
//   * a single wave of CTAs (a multiple of the SM count) loops over the units, so there is no second wave / tail;
//   * IQ2_XXS weights are decoded through conflict-free 32-copy selector and sign tables in shared memory, one byte
//     permute per 4 signed weights; Q2_K loads its 4 scales with two 32-bit loads instead of four byte loads;
//   * the slots' expert offsets are read once per CTA; programmatic dependent launch (pdl.cuh);
//   * Q2_K down+sum with rows of <= 2048 columns (Flash) has its own kernel: CTAs of 8 rows of one token, warps
//     keeping one slot's activations in registers, 32 values per lane per block (gemv_moe_v2.cu); cta_warps is not
//     used there, and its sums equal the staged kernel's within fp32 reordering (not bit for bit).
// Types: Q2_K, Q4_K, IQ2_XXS routed stacks in the Ggml layout whose row length is a multiple of 16 bytes; one token
// per slot, at most 64 slots per launch; quantized activations (p.xq; p.xf is not taken); down+sum with k <= kMoeV2MaxSegs. Knobs: cta_warps 4
// or 8 (0 = 8). Everything else as in gemv.h.
#pragma once

#include "backend/cuda/gemv.h"

namespace dsv4::cuda {

inline constexpr int kMoeKernelV2 = 5;   // GemvParams::kernel value (3 and 4 are the dense variants)
inline constexpr int kMoeV2MaxSegs = 8;  // k of a down+sum launch

// Whether variant 2 accepts p as a gate+up+SwiGLU launch (segs = 2, p.w2 set) or a down+sum launch (segs = k).
// p.kernel is not looked at.
bool moe_v2_supported(const GemvParams& p, int segs);

// The launches (fail with a reason where !moe_v2_supported). moe_gate_up_swiglu_cuda / moe_down_sum_cuda call these
// when p.kernel == kMoeKernelV2.
void moe_v2_gate_up_swiglu_cuda(const GemvParams& p, const float* route_w, float clamp, cudaStream_t stream);
void moe_v2_down_sum_cuda(const GemvParams& p, int k, cudaStream_t stream);

// DSV4_CUDA_MOE_KERNEL for the backend's routed-expert decode launches, read per call (tests switch it):
//   unset / "" / "5" -> kMoeKernelV2: variant 2 for both launches where it takes them (the default since the
//                  session-9 H200 A/B, Flash q2 decode at 2k: 130.0 t/s vs 127.5 for "auto" and 126.9 for "0");
//   "auto"      -> kMoeKernelAuto: variant 2 for gate+up+SwiGLU, the staged kernel for down+sum;
//   "0"         -> 0: the session-8 kernels for both (streaming gate+up, staged down+sum); anything else fails.
inline constexpr int kMoeKernelAuto = -1;
int moe_kernel_env();

}  // namespace dsv4::cuda
