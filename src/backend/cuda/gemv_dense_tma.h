// Dense single-token GEMV, variant 5: each warp streams a contiguous range of rows through its own ring of
// shared-memory stages filled by bulk asynchronous copies (cp.async.bulk, the Hopper TMA's 1-D form), so the weight
// bytes a warp has in flight do not depend on its registers and the next stages arrive while it computes.
//
// Why (variant 2, gemv_dense_v2.h, is the default it is measured against): variant 2 holds a warp's item in
// registers (4 KiB at most) and issues the next item's loads only after the current one is reduced, so each CTA
// walks its 2-3 tiles as dependent round trips; one wave of 3 CTAs per SM fits only a third of a 35.6 MB matrix in
// flight. Here every warp requests its first ~17 KiB (139 KiB per SM) before the PDL wait, and each consumed stage is
// refilled at once: the stream never drains between rows. One CTA of 8 warps per SM, a balanced contiguous range of
// rows per warp (the largest warp has at most one row more than the smallest).
//
// Shapes: Q8_0 weights in the Q8Split layout, one token; n_slots >= 1 with the slots' matrices contiguous
// (expert_stride == rows * row bytes, or one slot): the grouped attn_output_a. Activations pre-quantized (xq, split
// layout), activation row s / act_slot_div for slot s. Products are variant 2's (UnitSplit: exact dp4a integer dot
// of 16 quants, times the f16 weight scale and the f32 activation scale, in that order); each lane adds its units in
// ascending order and the warp tree joins the lanes, so a row equals variant 2's output bit for bit where variant 2
// does not split rows into parts (e.g. attn_q_b), and to fp32 reordering otherwise.
// Launched with PDL when enabled: weight copies go out before griddepcontrol.wait (the weights are constant).
#pragma once

#include "backend/cuda/gemv.h"

namespace dsv4::cuda {

inline constexpr int kGemvKernelTma = 5;

// Whether gemv_tma_cuda accepts p (type, layout, shape, alignment, slot layout; p.kernel is not looked at).
bool gemv_tma_supported(const GemvParams& p);
// Runs p with variant 5; fails with a reason if !gemv_tma_supported(p).
void gemv_tma_cuda(const GemvParams& p, cudaStream_t stream);

}  // namespace dsv4::cuda
