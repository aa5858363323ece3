// Internal to src/quant: per-type reference routines and the per-ISA dot kernel tables.
#pragma once

#include <cstdint>

#include "quant/quant.h"

namespace dsv4::quant_detail {

// ---- reference dequantizers (n is a multiple of the block size; checked by the caller) --------------------
void dequant_q8_0(const block_q8_0* x, float* y, int64_t n);
void dequant_q2_K(const block_q2_K* x, float* y, int64_t n);
void dequant_q4_K(const block_q4_K* x, float* y, int64_t n);
void dequant_q8_K(const block_q8_K* x, float* y, int64_t n);
void dequant_iq2_xxs(const block_iq2_xxs* x, float* y, int64_t n);
void dequant_mxfp4(const block_mxfp4* x, float* y, int64_t n);

// ---- reference quantizers
// ----------------------------------------------------------------------------------
void quant_q8_0(const float* x, block_q8_0* y, int64_t n);
void quant_q8_K(const float* x, block_q8_K* y, int64_t n);
void quant_q2_K(const float* x, block_q2_K* y, int64_t n, const float* importance);
void quant_q4_K(const float* x, block_q4_K* y, int64_t n, const float* importance);
void quant_mxfp4(const float* x, block_mxfp4* y, int64_t n);
// importance must be non-null here (the public entry supplies the x^2 fallback).
void quant_iq2_xxs(const float* x, block_iq2_xxs* y, int64_t n, const float* importance);

// ---- dot kernels: one table per ISA
// -------------------------------------------------------------------------- Weight row `w` (n values of the
// weight type) against activations `a` in activation_type() format.
using DotFn = float (*)(const void* w, const void* a, int64_t n);

struct DotTable {
  DotFn f32 = nullptr;      // F32 x F32
  DotFn f16 = nullptr;      // F16 x F32
  DotFn bf16 = nullptr;     // BF16 x F32
  DotFn fp8 = nullptr;      // FP8_E4M3 x F32
  DotFn q8_0 = nullptr;     // Q8_0 x Q8_0
  DotFn mxfp4 = nullptr;    // MXFP4 x Q8_0
  DotFn q2_K = nullptr;     // Q2_K x Q8_K
  DotFn q4_K = nullptr;     // Q4_K x Q8_K
  DotFn iq2_xxs = nullptr;  // IQ2_XXS x Q8_K
};

// Scalar kernels are complete; the SIMD tables may leave entries null, which falls back to the next lower
// level (AVX512 -> AVX2 -> scalar).
const DotTable& dot_table_scalar();
const DotTable& dot_table_avx2();
const DotTable& dot_table_avx512();

}  // namespace dsv4::quant_detail
