// Quantization-aware-training simulations of the attention sublayer (model-spec §3.4). The official model
// rounds some activations through low-precision grids during training, so inference reproduces the round trip
// (quantize then dequantize immediately) to see the values the model was trained on:
//   * FP8 (e4m3fn) with power-of-two ("ue8m0") block scales on the non-rotary dims of every main KV row;
//   * Walsh-Hadamard rotation + FP4 (e2m1) with power-of-two block scales on indexer queries and keys.
// The engine option --no-qat-sim skips both (the HF reference has neither).
#pragma once

namespace dsv4 {

// Nearest e4m3fn value (bias 7, subnormal step 2^-9, max 448), ties to even. |v| must be <= 448.
float e4m3_round(float v);
// Nearest e2m1 value in {0, 0.5, 1, 1.5, 2, 3, 4, 6} (with sign), ties to the even code. |v| must be <= 6.
float e2m1_round(float v);

// FP8 simulation of x[0, n) in blocks of `block` (last block may be shorter): amax = max(|x|, 1e-4),
// s = 2^ceil(log2(amax/448)), x <- e4m3(clamp(x/s, -448, 448)) * s.
void qat_fp8_blocks(float* x, int n, int block = 64);

// In-place orthonormal Walsh-Hadamard transform (Sylvester order, scaled by 1/sqrt(n)); n a power of two.
void hadamard_orthonormal(float* x, int n);

// Indexer FP4 simulation of one n-dim row (model-spec §3.4): Hadamard over all n dims, then per block of 32
// amax = max(|x|, 6*2^-126), s = 2^ceil(log2(amax/6)), x <- e2m1(clamp(x/s, -6, 6)) * s.
void qat_fp4_indexer_row(float* x, int n);

}  // namespace dsv4
