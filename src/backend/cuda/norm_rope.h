// RMSNorm and partial interleaved RoPE (model-spec §3.1, §3.2) on the GPU. All pointers are device pointers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace dsv4::cuda {

// y[r] = x[r] * rsqrt(mean(x[r]^2) + eps) * w   (w null: unweighted, e.g. the per-head query norm).
//   x, y: [rows, n] with row strides (in floats) x_stride / y_stride; x and y may alias. w: [n] or null.
// The sum of squares is accumulated in fp32 (each thread strided, then a tree): the CPU sums in order, so the
// two agree to a few ulp of the scale, not bitwise. The thread count per row depends on n only (never on rows),
// so a decode step and a prefill pass normalize the same row to the same bits.
//   q8 (optional, n % 32 == 0): y also quantized to Q8_0 activations in the split layout (q8_split_act.cuh),
//   rows of n + n / 8 bytes, bit-identical to quantize_activations_cuda(Q8_0, y, rows, n, q8, Q8Split). Not used
//   by the backend: for a 4096-wide decode row it costs 3.0 us on top of the norm (one CTA quantizes the whole
//   row; H200 graph, dev/cuda/small.cu at dc6bea6), a separate quantize launch 1.7 us. Spreading a row's norm
//   over several CTAs (each re-summing the squares, quantizing its slice) would be the way to make it pay.
// Why the register kernel: a 4096-wide decode row is one CTA; the earlier 256-thread strided loop spent two
// dependent memory round trips per pass over the row, the register kernel (<= 16 values per thread, all loads
// issued before the reduction, the weight included) one.
struct RmsNormParams {
  const float* x = nullptr;
  const float* w = nullptr;
  float* y = nullptr;
  int64_t rows = 0;
  int n = 0;
  int64_t x_stride = 0;  // 0 = n
  int64_t y_stride = 0;  // 0 = n
  float eps = 1e-6f;
  void* q8 = nullptr;
  // Knobs (workbench A/B): threads per row (multiple of 32, <= 1024; 0 = n/4 rounded up to 32, at most 1024),
  // strided = the strided-loop kernel (the earlier default; also used when n > 16 x threads).
  int threads = 0;
  bool strided = false;
};
void rms_norm_cuda(const RmsNormParams& p, cudaStream_t stream);

// scale[r] = rsqrt(mean(x[r]^2) + eps) for rows of n floats (the HC control's RMS over all 4 x D stream values).
void rms_scale_cuda(const float* x, int64_t rows, int64_t n, float eps, float* scale, cudaStream_t stream);

// Rotates the last n_rot dims of every head vector in place, pairs adjacent (x[2j], x[2j+1]) by angle
// pos * omega_j (or its negation when inverse). Angles are formed in double and cos/sin taken in double, then
// rounded to float once, exactly as the CPU path (src/model/rope.cpp), so the rotation factors are bitwise
// equal; the complex product is done without FMA contraction, also as on the CPU.
//   x: [n_tokens, n_heads, head_dim] (token stride token_stride floats, 0 = n_heads * head_dim)
//   positions: [n_tokens] int64 device array (absolute positions; per row so a batch may mix sessions)
inline constexpr int kRopeMaxPairs = 64;
struct RopeParams {
  float* x = nullptr;
  const int64_t* positions = nullptr;
  int64_t n_tokens = 0;
  int n_heads = 0;
  int head_dim = 0;
  int64_t token_stride = 0;
  int n_rot = 64;
  bool inverse = false;
  double omega[kRopeMaxPairs] = {};  // per-pair angular frequency (rope_freqs_* in src/model/rope.h)
};
void rope_cuda(const RopeParams& p, cudaStream_t stream);

}  // namespace dsv4::cuda
