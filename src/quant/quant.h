// Public API of the quant area: type table, reference (de)quantizers, CPU dot kernels and GEMV/matmul.
//
// Layouts live in quant/blocks.h (shared with CUDA and the converter). Everything here is CPU code.
// Kernels follow the llama.cpp/ds4 convention: a weight row is dotted against activations already quantized
// to the weight type's partner format (activation_type): Q8_0 for Q8_0 and MXFP4, Q8_K for the K-quants and
// IQ2_XXS, plain f32 for F32/F16/BF16/FP8_E4M3. gemv()/matmul() do that quantization themselves.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "quant/blocks.h"

namespace dsv4 {

class ThreadPool;  // common/thread_pool.h

// Values match GGUF's ggml_type ids, except FP8_E4M3 which has none (converter-internal).
enum class QType : uint32_t {
  F32 = 0,
  F16 = 1,
  Q8_0 = 8,
  Q2_K = 10,
  Q4_K = 12,
  Q8_K = 15,
  IQ2_XXS = 16,
  I32 = 26,
  BF16 = 30,
  MXFP4 = 39,
  FP8_E4M3 = 1000,  // raw e4m3 bytes, one per value; the 128x128 E8M0 scales are a separate tensor
};

// "F32", "Q4_K", ...; a value outside the enum gives "QType(<n>)" (never throws: used in error messages).
std::string qtype_name(QType t);
// Checked conversion from a GGUF ggml_type id; throws dsv4::Error naming the id for types dsv4 lacks.
QType qtype_from_id(uint32_t id);
bool qtype_is_known(uint32_t id);

// Values per block and bytes per block (1 and sizeof(element) for the plain types).
int64_t block_elems(QType t);
int64_t block_bytes(QType t);
// Bytes of a row of n values; throws if n is negative or not a multiple of block_elems(t).
int64_t row_bytes(QType t, int64_t n);

// Block pointers need only the alignment of their struct (2 bytes for f16 fields, 4 for Q8_K); kernels use
// unaligned vector loads, so rows inside a GGUF tensor can be passed as they are.

// Reference scalar dequantization of n values (n must be a multiple of the block size; I32 is rejected:
// it is an index type, not a float encoding). FP8_E4M3 yields the unscaled e4m3 values.
void dequantize_row(QType t, const void* src, float* dst, int64_t n);

// Reference quantization of n values. `importance` (n weights >= 0, optional) steers Q2_K/Q4_K/IQ2_XXS
// toward the columns that matter; IQ2_XXS falls back to x[i]^2 per column when it is null (as ds4 does).
// Q8_K may be produced here too (it is the activation format). I32 is rejected.
void quantize_row(QType t, const float* src, void* dst, int64_t n, const float* importance = nullptr);

// Quantize a rows x cols matrix row by row. When `importance` is null and the type wants one, the column
// importance is sum over rows of w^2 (ds4's fallback for IQ2_XXS). Runs in parallel over rows.
void quantize_rows(QType t, const float* src, void* dst, int64_t rows, int64_t cols,
                   const float* importance = nullptr);

// ---- dot products --------------------------------------------------------------------------------------
// The activation format a weight type is dotted against (F32, Q8_0 or Q8_K). Throws for Q8_K/I32 weights.
QType activation_type(QType w);
// Bytes needed for n activations quantized for weight type w.
int64_t activation_bytes(QType w, int64_t n);
// x (n floats) -> activation_type(w) encoding in xq (activation_bytes(w, n) bytes).
void quantize_activation(QType w, const float* x, void* xq, int64_t n);
// sum_i W[i] * X[i] for one weight row and activations prepared by quantize_activation(w, ...).
float vec_dot(QType w, const void* wrow, const void* xq, int64_t n);
// The kernel vec_dot(w, ...) runs at the current SIMD level, for loops that call it once per row: it does
// no argument checks (validate n once with row_bytes(w, n)), saving vec_dot's ~25 ns per call.
using DotKernel = float (*)(const void* wrow, const void* xq, int64_t n);
DotKernel dot_kernel(QType w);

// y[r] = sum_c W[r][c] * x[c] for a row-major quantized matrix W of rows x cols. Threaded over rows on
// `pool` (null = default_thread_pool()); results do not depend on the thread count.
void gemv(QType w, const void* W, int64_t rows, int64_t cols, const float* x, float* y,
          ThreadPool* pool = nullptr);
// Y[t][r] = sum_c W[r][c] * X[t][c] for n_tokens activation rows X (n_tokens x cols, row-major).
void matmul(QType w, const void* W, int64_t rows, int64_t cols, const float* X, int64_t n_tokens, float* Y,
            ThreadPool* pool = nullptr);

// ---- SIMD dispatch ---------------------------------------------------------------------------------------
// Kernels are compiled per function with target attributes and chosen at run time from cpuid. The level can
// be lowered programmatically (tests run every supported path); DSV4_SIMD=scalar|avx2|avx512 in the
// environment sets the initial level.
enum class SimdLevel : int { Scalar = 0, AVX2 = 1, AVX512 = 2 };
SimdLevel simd_supported();            // best level this CPU can run
SimdLevel simd_level();                // level in use
void set_simd_level(SimdLevel level);  // throws if the CPU lacks it
const char* simd_name(SimdLevel level);

}  // namespace dsv4
