// Sink attention of DeepSeek V4 on the GPU (model-spec §6.5): H query heads share ONE KV head of dim dh
// (K = V, MQA), rows = the query's sliding-window rows followed by compressed rows (all visible ones for HCA,
// the indexer's selection for CSA), one softmax over them plus a per-head value-less sink logit.
// CPU twin: dsv4::cpu::sink_attention_head (src/backend/cpu/attention_cpu.h). All pointers are device pointers.
//
// Work split (flash-decoding): a CTA owns (token, group of 8 heads, split of rows). It streams its rows in
// tiles of 32 through shared memory, each row read from global memory once for all 8 heads, with an online
// softmax per head. With one split per token the CTA also applies the sink and writes the final output; with
// several it writes (normalized partial output, log-sum-exp) and the splits and the sink are combined by a
// second kernel or, for 2..8 splits, by the last CTA of the head group to finish (SinkAttnLaunch::split_ticket). Decode picks many splits (rows spread over the SMs), prefill one (enough CTAs from tokens x heads).
//
// Numerics of the CUDA-core path (the tensor-core one: see SinkAttnImpl): fp32 throughout; scores are
// scale * dot (dot as a warp tree, not the CPU's 16-lane order) and the softmax is rescaled per tile, so results
// agree with the CPU twin to a few ulp-scaled relative error, not bitwise.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace dsv4::cuda {

inline constexpr int kAttnMaxHeadDim = 512;  // registers hold dh/128 float4 accumulators per lane
inline constexpr int kAttnTileRows = 32;
inline constexpr int kAttnMaxRotPairs = 32;  // RoPE pairs of the fused output de-rotation (as kRowMaxPairs)

// Two kernels compute the same function:
//   CudaCore   fp32 FMAs, split over rows (flash-decoding) for decode; any dh <= 512.
//   TensorCore prefill: a CTA owns one token and 64 heads, so each 32-row tile of the token's K = V rows is a
//              real [64 x 512] x [512 x 32] GEMM (scores) and [64 x 32] x [32 x 512] (values) on mma.sync
//              m16n8k16. Operands are split x = hi + lo into two fp16 numbers and multiplied as
//              hi*hi + hi*lo + lo*hi with fp32 accumulation (the dropped lo*lo term is ~2^-22 relative), so
//              results stay within a few 1e-6 of the fp32 path; plain fp16 (~5e-4) would not, and the KV rows'
//              64 rotary dims are not on the FP8 grid, so they are not exact in one fp16 either.
//              Needs dh == 512 and |q|, |kv| < 65504 (fp16 range: normalized rows are O(1..10)); a larger
//              element becomes inf/NaN in the output instead of an error.
enum class SinkAttnImpl : int { Auto = 0, CudaCore = 1, TensorCore = 2 };
// H200 crossover (CSA at 8k): T = 16 fp32 122 us vs tensor cores 230, T = 64 351 vs 233.
inline constexpr int kAttnTcMinTokens = 40;

// Rows of token t (position p = pos0 + t), the semantics of Backend::sink_attention (src/backend/backend.h):
//   window rows  positions lo .. p with lo = max(0, p - window + 1): a position q >= pos0 is row q - pos0 of
//                kv_new [T, dh] (this call's tokens); an earlier one is slot q mod window of ring [window, dh]
//   compressed   comp_idx != null (Selected): rows comp + comp_idx[t * top_k + i] * dh for
//                i < min(top_k, (p + 1) / ratio)
//                comp_idx == null and ratio > 0 and comp != null (All, HCA): rows 0 .. (p + 1) / ratio - 1
//                otherwise none
struct SinkAttnLaunch {
  const float* q = nullptr;       // [T, H, dh]
  float* out = nullptr;           // [T, H, dh]
  const float* sinks = nullptr;   // [H]
  int T = 0, H = 0, dh = 0;
  int64_t pos0 = 0;
  int window = 0;
  const float* kv_new = nullptr;
  const float* ring = nullptr;
  const float* comp = nullptr;
  const int32_t* comp_idx = nullptr;  // [T, top_k]
  int top_k = 0;
  int ratio = 0;
  float scale = 0.0f;             // 0: 1/sqrt(dh)
  // Rows per split (a multiple of 32); 0 = automatic (decode: 32 rows per split, prefill: one split).
  // Used by the CUDA-core path only.
  int rows_per_split = 0;
  // Kernel: Auto picks TensorCore when dh == 512 and T >= kAttnTcMinTokens (prefill), else CudaCore.
  SinkAttnImpl impl = SinkAttnImpl::Auto;
  // Fusions (decode: two launches fewer per layer), results as the separate ops give them:
  //   n_rot > 0  every output row is de-rotated in the kernel that writes it: its last n_rot dims, pairs
  //              (2j, 2j+1), by the angle -(pos0 + t) * omega[j] with row_finish_kernel's float operations
  //              (double angle and sincos, one rounding to float, no FMA contraction), so out is bitwise what
  //              row_finish_cuda(inverse RoPE) would make of the un-rotated output
  //   ring_out   window_store of this call's rows into ring_out (the ring's buffer) after the attention:
  //              slot (pos0 + t) mod window = kv_new[t] for the last min(T, window) tokens. With T == 1 on the
  //              CUDA-core path one CTA copies the row inside the attention kernel (the slot holds position
  //              pos0 - window, which token pos0 does not read); otherwise device copies after the kernels.
  int n_rot = 0;
  double omega[kAttnMaxRotPairs] = {};
  float* ring_out = nullptr;
  // Split combine in the attention kernel (CUDA-core path with 2..8 splits, T x head groups <= 512): each CTA writes its partial as before, then counts its arrival on a device counter of its (token,
  // head group); the last CTA to arrive combines the group's heads with sink_attn_combine_kernel's float
  // operations (same bits), so decode runs one launch instead of two. false, or DSV4_CUDA_ATTN_TICKET unset (read
  // per call: the ticket path is opt-in with =1, measured slower end to end), launches the combine kernel. The counters are process-wide: no two such launches may run
  // concurrently on different streams.
  bool split_ticket = true;
  // Q8 output (decode: saves the grouped output projection's activation-quantize launch). q8 != null: the call
  // also writes the Q8_0 split-layout activations (gemv.h GemvLayout::Q8Split) of out
  // viewed as T*H*dh / q8_cols rows of q8_cols values (row r = out elements [r*q8_cols, (r+1)*q8_cols): for
  // Flash's o_a, 8 heads), each row [q8_cols int8][q8_cols/32 f32 scales], with q8_split_store_warp's rule on the
  // very floats stored to out: bytes equal to quantize_activations_cuda(Q8_0, out, rows, q8_cols, Q8Split).
  // Needs dh % 32 == 0 (a 32-value block never straddles two heads), q8_split_supported(q8_cols) and
  // T*H*dh % q8_cols == 0. Written in the epilogue of the split combine kernel (decode with 2+ splits: every
  // Flash layer at 2k), no launch added; the other paths (one split, the last-CTA combine, tensor cores) run a
  // quantize launch after their kernel.
  void* q8 = nullptr;
  int64_t q8_cols = 0;
};

// ring slot (p0 + t) mod W = kv[t] for the last min(T, W) tokens (rows of dim floats): at most two device copies.
void window_store_cuda(float* ring, int W, int dim, const float* kv, int T, int64_t p0, cudaStream_t stream);

// Scratch for the split path: partial outputs and log-sum-exps. Owned by the caller so a decode loop (or a
// CUDA graph) allocates once; sink_attention_scratch_floats() says how many floats a call needs (0: none).
int64_t sink_attention_scratch_floats(const SinkAttnLaunch& p);
void sink_attention_cuda(const SinkAttnLaunch& p, float* scratch, cudaStream_t stream);
// Whether sink_attention_cuda(p) combines its splits in the attention kernel (split_ticket; tests).
bool sink_attention_uses_split_ticket(const SinkAttnLaunch& p);

}  // namespace dsv4::cuda
