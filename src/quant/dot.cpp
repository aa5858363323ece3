// Dot-product dispatch (run-time SIMD level), activation quantization, GEMV and multi-token matmul.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "common/error.h"
#include "common/thread_pool.h"
#include "quant/kernels.h"
#include "quant/quant.h"

namespace dsv4 {

namespace qd = quant_detail;

namespace {

SimdLevel detect_simd() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma"))
    return SimdLevel::AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return SimdLevel::AVX2;
#endif
  return SimdLevel::Scalar;
}

SimdLevel initial_level() {
  SimdLevel best = detect_simd();
  if (const char* env = std::getenv("DSV4_SIMD")) {
    SimdLevel want = best;
    if (std::strcmp(env, "scalar") == 0)
      want = SimdLevel::Scalar;
    else if (std::strcmp(env, "avx2") == 0)
      want = SimdLevel::AVX2;
    else if (std::strcmp(env, "avx512") == 0)
      want = SimdLevel::AVX512;
    else
      fail("quant: DSV4_SIMD=%s: expected scalar, avx2 or avx512", env);
    if (int(want) > int(best))
      fail("quant: DSV4_SIMD=%s: this CPU supports at most %s", env, simd_name(best));
    best = want;
  }
  return best;
}

std::atomic<int>& level_ref() {
  static std::atomic<int> level{int(initial_level())};
  return level;
}

// Kernel for weight type w at the current level; falls back level by level where a SIMD table lacks it.
qd::DotFn pick(QType w) {
  const qd::DotTable* tables[3] = {&qd::dot_table_scalar(), &qd::dot_table_avx2(), &qd::dot_table_avx512()};
  for (int l = level_ref().load(std::memory_order_relaxed); l >= 0; --l) {
    const qd::DotTable& t = *tables[l];
    qd::DotFn f = nullptr;
    switch (w) {
      case QType::F32:
        f = t.f32;
        break;
      case QType::F16:
        f = t.f16;
        break;
      case QType::BF16:
        f = t.bf16;
        break;
      case QType::FP8_E4M3:
        f = t.fp8;
        break;
      case QType::Q8_0:
        f = t.q8_0;
        break;
      case QType::MXFP4:
        f = t.mxfp4;
        break;
      case QType::Q2_K:
        f = t.q2_K;
        break;
      case QType::Q4_K:
        f = t.q4_K;
        break;
      case QType::IQ2_XXS:
        f = t.iq2_xxs;
        break;
      case QType::Q8_K:
      case QType::I32:
        fail("quant: no dot product for %s weights", qtype_name(w).c_str());
    }
    if (f) return f;
  }
  fail("quant: no dot kernel for %s", qtype_name(w).c_str());
}

void check_dims(QType w, int64_t rows, int64_t cols, const char* what) {
  if (rows < 0) fail("quant: %s: negative row count %lld", what, static_cast<long long>(rows));
  (void)row_bytes(w, cols);  // throws if cols is not a whole number of blocks
}

}  // namespace

SimdLevel simd_supported() {
  static const SimdLevel s = detect_simd();
  return s;
}
SimdLevel simd_level() {
  return SimdLevel(level_ref().load());
}
void set_simd_level(SimdLevel level) {
  if (int(level) > int(simd_supported()))
    fail("quant: set_simd_level(%s): this CPU supports at most %s", simd_name(level),
         simd_name(simd_supported()));
  level_ref().store(int(level));
}
const char* simd_name(SimdLevel level) {
  switch (level) {
    case SimdLevel::Scalar:
      return "scalar";
    case SimdLevel::AVX2:
      return "avx2";
    case SimdLevel::AVX512:
      return "avx512";
  }
  return "?";
}

QType activation_type(QType w) {
  switch (w) {
    case QType::F32:
    case QType::F16:
    case QType::BF16:
    case QType::FP8_E4M3:
      return QType::F32;
    case QType::Q8_0:
    case QType::MXFP4:
      return QType::Q8_0;
    case QType::Q2_K:
    case QType::Q4_K:
    case QType::IQ2_XXS:
      return QType::Q8_K;
    case QType::Q8_K:
    case QType::I32:
      break;
  }
  fail("quant: %s is not a weight type with a dot kernel", qtype_name(w).c_str());
}

int64_t activation_bytes(QType w, int64_t n) {
  return row_bytes(activation_type(w), n);
}

void quantize_activation(QType w, const float* x, void* xq, int64_t n) {
  const QType a = activation_type(w);
  (void)row_bytes(w, n);  // the weight's block size decides validity (MXFP4 rows need multiples of 32)
  quantize_row(a, x, xq, n);
}

DotKernel dot_kernel(QType w) {
  return pick(w);
}

float vec_dot(QType w, const void* wrow, const void* xq, int64_t n) {
  (void)row_bytes(w, n);
  (void)row_bytes(activation_type(w), n);
  return pick(w)(wrow, xq, n);
}

void gemv(QType w, const void* W, int64_t rows, int64_t cols, const float* x, float* y, ThreadPool* pool) {
  matmul(w, W, rows, cols, x, 1, y, pool);
}

void matmul(QType w, const void* W, int64_t rows, int64_t cols, const float* X, int64_t n_tokens, float* Y,
            ThreadPool* pool) {
  check_dims(w, rows, cols, "matmul");
  if (n_tokens < 0) fail("quant: matmul: negative token count %lld", static_cast<long long>(n_tokens));
  const int64_t wrb = row_bytes(w, cols);
  const int64_t arb = activation_bytes(w, cols);
  const qd::DotFn dot = pick(w);
  const uint8_t* Wb = static_cast<const uint8_t*>(W);

  // F32 activations are used in place; the others are quantized once per token, not per row.
  const uint8_t* act;
  thread_local std::vector<uint8_t> scratch;
  if (activation_type(w) == QType::F32) {
    act = reinterpret_cast<const uint8_t*>(X);
  } else {
    scratch.resize(size_t(arb * n_tokens));
    for (int64_t t = 0; t < n_tokens; ++t)
      quantize_row(activation_type(w), X + t * cols, scratch.data() + t * arb, cols);
    act = scratch.data();
  }
  ThreadPool& tp = pool ? *pool : default_thread_pool();
  tp.parallel_for(rows, [&](int64_t begin, int64_t end) {
    // Rows outer, tokens inner: each weight row is streamed from memory once and reused from L1 per token.
    for (int64_t r = begin; r < end; ++r)
      for (int64_t t = 0; t < n_tokens; ++t) Y[t * rows + r] = dot(Wb + r * wrb, act + t * arb, cols);
  });
}

}  // namespace dsv4
