// Dot kernels and GEMV: every SIMD level this CPU supports against the scalar kernel, the scalar kernel
// against dequantize + f64 dot, gemv/matmul against vec_dot, and argument errors.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/thread_pool.h"
#include "quant/quant.h"

using namespace dsv4;

namespace {

const QType kWeightTypes[] = {QType::F32,  QType::F16,  QType::BF16,    QType::FP8_E4M3, QType::Q8_0,
                              QType::Q2_K, QType::Q4_K, QType::IQ2_XXS, QType::MXFP4};

std::vector<float> gaussian(int64_t n, uint32_t seed, float sigma = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, sigma);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& f : v) f = nd(rng);
  return v;
}

std::vector<uint8_t> quantize(QType t, const std::vector<float>& x, int64_t rows, int64_t cols) {
  std::vector<uint8_t> q(static_cast<size_t>(row_bytes(t, cols) * rows));
  quantize_rows(t, x.data(), q.data(), rows, cols);
  return q;
}

// Restores the SIMD level after each test so a failing test cannot leak a lowered level into the next.
struct LevelGuard {
  SimdLevel saved = simd_level();
  ~LevelGuard() { set_simd_level(saved); }
};

std::vector<SimdLevel> supported_levels() {
  std::vector<SimdLevel> v{SimdLevel::Scalar};
  if (int(simd_supported()) >= int(SimdLevel::AVX2)) v.push_back(SimdLevel::AVX2);
  if (int(simd_supported()) >= int(SimdLevel::AVX512)) v.push_back(SimdLevel::AVX512);
  return v;
}

}  // namespace

TEST(Dot, ScalarMatchesDequantizedReference) {
  // vec_dot(W, quantize_activation(x)) vs sum(dequant(W) * dequant(xq)) in double. Integer parts are exact in
  // both; the only difference is f32 rounding of per-block products and the running sum, bounded by
  // ~n * 2^-24 * sum|w x|. Tolerance: 1e-5 * sum|w*x| (n = 4096 gives a 2.4e-4 worst case, typical is
  // sqrt(n) * 6e-8 ~ 4e-6).
  LevelGuard guard;
  set_simd_level(SimdLevel::Scalar);
  const int64_t n = 4096;
  const auto w = gaussian(n, 11);
  const auto x = gaussian(n, 12, 0.5f);
  for (QType t : kWeightTypes) {
    const auto wq = quantize(t, w, 1, n);
    std::vector<uint8_t> xq(static_cast<size_t>(activation_bytes(t, n)));
    quantize_activation(t, x.data(), xq.data(), n);
    std::vector<float> wd(static_cast<size_t>(n)), xd(static_cast<size_t>(n));
    dequantize_row(t, wq.data(), wd.data(), n);
    dequantize_row(activation_type(t), xq.data(), xd.data(), n);
    double ref = 0, mag = 0;
    for (int64_t i = 0; i < n; ++i) {
      ref += double(wd[size_t(i)]) * xd[size_t(i)];
      mag += std::fabs(double(wd[size_t(i)]) * xd[size_t(i)]);
    }
    const float got = vec_dot(t, wq.data(), xq.data(), n);
    EXPECT_NEAR(got, ref, 1e-5 * mag) << qtype_name(t);
  }
}

TEST(Dot, SimdMatchesScalar) {
  // Same tolerance argument as above: SIMD and scalar share every integer partial sum and differ only in the
  // order of f32 additions (lanes, FMA), so |simd - scalar| <= 1e-5 * sum|w*x|. Several lengths exercise
  // the block loops (one block, odd block counts, long rows).
  LevelGuard guard;
  for (int64_t n : {256, 768, 4096, 11008 - 11008 % 256}) {
    const auto w = gaussian(n, uint32_t(n) + 1);
    const auto x = gaussian(n, uint32_t(n) + 2, 2.0f);
    for (QType t : kWeightTypes) {
      const auto wq = quantize(t, w, 1, n);
      std::vector<uint8_t> xq(static_cast<size_t>(activation_bytes(t, n)));
      quantize_activation(t, x.data(), xq.data(), n);
      std::vector<float> wd(static_cast<size_t>(n));
      dequantize_row(t, wq.data(), wd.data(), n);
      double mag = 0;
      for (int64_t i = 0; i < n; ++i) mag += std::fabs(double(wd[size_t(i)]) * x[size_t(i)]);
      set_simd_level(SimdLevel::Scalar);
      const float ref = vec_dot(t, wq.data(), xq.data(), n);
      for (SimdLevel l : supported_levels()) {
        set_simd_level(l);
        const float got = vec_dot(t, wq.data(), xq.data(), n);
        EXPECT_NEAR(got, ref, 1e-5 * mag) << qtype_name(t) << " n=" << n << " level " << simd_name(l);
      }
    }
  }
}

TEST(Dot, ExtremeValuesAgreeAcrossLevels) {
  // Saturated activations (+-127 after quantization) and maximal weights stress int16/int32 intermediate
  // sums in the SIMD kernels; any overflow shows up as a gross mismatch. Tolerance as above.
  LevelGuard guard;
  const int64_t n = 1024;
  std::vector<float> w(static_cast<size_t>(n)), x(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    w[size_t(i)] = (i % 3 == 0) ? -8.0f : 8.0f;
    x[size_t(i)] = (i % 5 == 0) ? -100.0f : 100.0f;
  }
  for (QType t : kWeightTypes) {
    const auto wq = quantize(t, w, 1, n);
    std::vector<uint8_t> xq(static_cast<size_t>(activation_bytes(t, n)));
    quantize_activation(t, x.data(), xq.data(), n);
    set_simd_level(SimdLevel::Scalar);
    const float ref = vec_dot(t, wq.data(), xq.data(), n);
    for (SimdLevel l : supported_levels()) {
      set_simd_level(l);
      EXPECT_NEAR(vec_dot(t, wq.data(), xq.data(), n), ref, 1e-5 * 800.0 * n)
          << qtype_name(t) << simd_name(l);
    }
  }
}

TEST(Gemv, MatchesVecDotPerRowAndIsThreadCountIndependent) {
  // gemv must equal vec_dot row by row exactly (same kernel, same activation quantization), whatever the
  // thread count: each output is computed by one thread, so results are bitwise identical.
  const int64_t rows = 67, cols = 512;
  const auto w = gaussian(rows * cols, 21);
  const auto x = gaussian(cols, 22);
  ThreadPool one(1), four(4);
  for (QType t : kWeightTypes) {
    const auto wq = quantize(t, w, rows, cols);
    std::vector<uint8_t> xq(static_cast<size_t>(activation_bytes(t, cols)));
    quantize_activation(t, x.data(), xq.data(), cols);
    std::vector<float> y1(static_cast<size_t>(rows)), y4(static_cast<size_t>(rows));
    gemv(t, wq.data(), rows, cols, x.data(), y1.data(), &one);
    gemv(t, wq.data(), rows, cols, x.data(), y4.data(), &four);
    const int64_t rb = row_bytes(t, cols);
    for (int64_t r = 0; r < rows; ++r) {
      ASSERT_EQ(y1[size_t(r)], vec_dot(t, wq.data() + r * rb, xq.data(), cols))
          << qtype_name(t) << " row " << r;
      ASSERT_EQ(y1[size_t(r)], y4[size_t(r)]) << qtype_name(t) << " row " << r;
    }
  }
}

TEST(Gemv, CloseToFloatProduct) {
  // End to end: gemv on quantized weights vs the exact f64 product of the *dequantized* weights with the
  // unquantized x. The gap is the activation quantization only: Q8_0/Q8_K steps of amax/127 give a relative
  // error ~ 1/(127*sqrt(3)) per element; over a row the error is ~0.5% of ||w|| ||x||. Bound: 2% of
  // ||w_r|| * ||x|| per row (f32/f16/bf16/fp8 activations are exact: ~1e-6).
  const int64_t rows = 32, cols = 1024;
  const auto w = gaussian(rows * cols, 31);
  const auto x = gaussian(cols, 32);
  double xn = 0;
  for (float v : x) xn += double(v) * v;
  xn = std::sqrt(xn);
  for (QType t : kWeightTypes) {
    const auto wq = quantize(t, w, rows, cols);
    std::vector<float> y(static_cast<size_t>(rows));
    gemv(t, wq.data(), rows, cols, x.data(), y.data());
    std::vector<float> wd(static_cast<size_t>(cols));
    for (int64_t r = 0; r < rows; ++r) {
      dequantize_row(t, wq.data() + r * row_bytes(t, cols), wd.data(), cols);
      double ref = 0, wn = 0;
      for (int64_t c = 0; c < cols; ++c) {
        ref += double(wd[size_t(c)]) * x[size_t(c)];
        wn += double(wd[size_t(c)]) * wd[size_t(c)];
      }
      EXPECT_NEAR(y[size_t(r)], ref, 0.02 * std::sqrt(wn) * xn) << qtype_name(t) << " row " << r;
    }
  }
}

TEST(Gemv, MatmulEqualsGemvPerToken) {
  const int64_t rows = 40, cols = 256, T = 5;
  const auto w = gaussian(rows * cols, 41);
  const auto X = gaussian(T * cols, 42);
  for (QType t : kWeightTypes) {
    const auto wq = quantize(t, w, rows, cols);
    std::vector<float> Y(static_cast<size_t>(T * rows)), y(static_cast<size_t>(rows));
    matmul(t, wq.data(), rows, cols, X.data(), T, Y.data());
    for (int64_t k = 0; k < T; ++k) {
      gemv(t, wq.data(), rows, cols, X.data() + k * cols, y.data());
      for (int64_t r = 0; r < rows; ++r) ASSERT_EQ(Y[size_t(k * rows + r)], y[size_t(r)]) << qtype_name(t);
    }
  }
}

TEST(Dot, DotKernelIsWhatVecDotRuns) {
  LevelGuard guard;
  const int64_t n = 512;
  const auto w = gaussian(n, 51);
  const auto x = gaussian(n, 52);
  for (SimdLevel l : supported_levels()) {
    set_simd_level(l);
    for (QType t : kWeightTypes) {
      const auto wq = quantize(t, w, 1, n);
      std::vector<uint8_t> xq(static_cast<size_t>(activation_bytes(t, n)));
      quantize_activation(t, x.data(), xq.data(), n);
      EXPECT_EQ(dot_kernel(t)(wq.data(), xq.data(), n), vec_dot(t, wq.data(), xq.data(), n)) << qtype_name(t);
    }
  }
  EXPECT_THROW(dot_kernel(QType::Q8_K), Error);
}

TEST(Gemv, Errors) {
  std::vector<uint8_t> W(4096);
  std::vector<float> x(256), y(8);
  EXPECT_THROW(gemv(QType::Q4_K, W.data(), 1, 100, x.data(), y.data()), Error);  // cols not a block multiple
  EXPECT_THROW(gemv(QType::Q8_0, W.data(), -1, 32, x.data(), y.data()), Error);
  EXPECT_THROW(gemv(QType::Q8_K, W.data(), 1, 256, x.data(), y.data()), Error);  // activation-only type
  EXPECT_THROW(gemv(QType::I32, W.data(), 1, 4, x.data(), y.data()), Error);
  EXPECT_THROW(activation_type(QType::I32), Error);
  EXPECT_THROW(vec_dot(QType::MXFP4, W.data(), W.data(), 48), Error);
  EXPECT_EQ(activation_type(QType::IQ2_XXS), QType::Q8_K);
  EXPECT_EQ(activation_type(QType::MXFP4), QType::Q8_0);
  EXPECT_EQ(activation_type(QType::BF16), QType::F32);
}

TEST(Simd, LevelSwitch) {
  LevelGuard guard;
  set_simd_level(SimdLevel::Scalar);
  EXPECT_EQ(simd_level(), SimdLevel::Scalar);
  set_simd_level(simd_supported());
  EXPECT_EQ(simd_level(), simd_supported());
  if (simd_supported() != SimdLevel::AVX512) {
    EXPECT_THROW(set_simd_level(SimdLevel::AVX512), Error);
  }
  std::printf("  supported SIMD level: %s\n", simd_name(simd_supported()));
}

TEST(Dot, Q8_0WeightsWithMinus128) {
  // Our quantizer never writes -128, but Q8_0 files from other tools may (ggml's own rounding cannot, other
  // writers can). The SIMD kernels take |x| as unsigned, which is exact for -128, so every level must agree
  // with the scalar sum exactly here: all products are small integers and the one block scale is 1.
  LevelGuard guard;
  block_q8_0 w[2], x[2];
  for (int b = 0; b < 2; ++b) {
    w[b].d = 0x3C00;  // 1.0
    x[b].d = 0x3C00;
    for (int i = 0; i < 32; ++i) {
      w[b].qs[i] = int8_t(i % 2 ? -128 : 127);
      x[b].qs[i] = int8_t(i % 3 ? 127 : -127);
    }
  }
  // Hand sum per block: i odd -> -128 * (i%3 ? 127 : -127), i even -> 127 * (i%3 ? 127 : -127).
  int64_t expect = 0;
  for (int i = 0; i < 32; ++i) expect += int64_t(i % 2 ? -128 : 127) * (i % 3 ? 127 : -127);
  expect *= 2;
  for (SimdLevel l : supported_levels()) {
    set_simd_level(l);
    EXPECT_EQ(vec_dot(QType::Q8_0, w, x, 64), float(expect)) << simd_name(l);
  }
}

// Helper for EnvSelectsInitialLevel, run only in its child process (disabled in normal runs): prints the
// level the process started with.
TEST(Simd, DISABLED_PrintInitialLevel) {
  std::printf("initial-level=%s\n", simd_name(simd_level()));
}

TEST(Simd, EnvSelectsInitialLevel) {
  // DSV4_SIMD is read once at start-up, so it is checked in a child copy of this test binary.
  char self[4096] = {};
  if (readlink("/proc/self/exe", self, sizeof self - 1) <= 0) GTEST_SKIP() << "no /proc/self/exe";
  auto run = [&](const char* env) {
    const std::string cmd =
        std::string(env) + " '" + self +
        "' --gtest_filter=Simd.DISABLED_PrintInitialLevel --gtest_also_run_disabled_tests 2>&1";
    std::string out;
    if (FILE* p = popen(cmd.c_str(), "r")) {
      char buf[512];
      while (fgets(buf, sizeof buf, p)) out += buf;
      pclose(p);
    }
    return out;
  };
  EXPECT_NE(run("DSV4_SIMD=scalar").find("initial-level=scalar"), std::string::npos);
  if (simd_supported() >= SimdLevel::AVX2) {
    EXPECT_NE(run("DSV4_SIMD=avx2").find("initial-level=avx2"), std::string::npos);
  }
  EXPECT_NE(run("env -u DSV4_SIMD").find(std::string("initial-level=") + simd_name(simd_supported())),
            std::string::npos);
  // A bad value fails loudly (dsv4::Error escapes static initialization -> non-zero exit, message shown).
  EXPECT_NE(run("DSV4_SIMD=avx9").find("DSV4_SIMD=avx9"), std::string::npos);
}
