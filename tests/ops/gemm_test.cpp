// Parity of the tensor-core prefill GEMMs (src/backend/cuda/gemm.h): dense y = W x for many tokens, both kernels
// (our MMA kernel with on-the-fly dequantization, and dequantize + cuBLAS), and the routed-expert MoE chain.
//
// Reference ("exact"): weights dequantized with the CPU reference dequantize_row(), activations as f32, products
// and sums in double. The GPU rounds both operands to FP16 (11-bit significand: relative rounding error <= 2^-11,
// RMS ~2^-11/sqrt(3) ~ 2.8e-4 each), accumulating in FP32; for random data that gives a rel-L2 error of ~4e-4.
// Tolerances: rel-L2 <= 1.5e-3 for one GEMM (~4x the expected value) and every output within 1e-2 of the
// reference relative to max(|ref|, rms(ref)) (a >20-sigma bound per element; near-zero outputs are cancellations
// judged against the typical output size). The MoE chain has three GEMMs and an FP16 intermediate: 3e-3.
// The CPU oracle (dsv4::matmul: activations quantized to 8 bits, Q8_0 / Q8_K) is measured against the same
// reference, and for quantized weights the GPU error must not exceed it: "FP16 is no worse than the CPU path".
// F32 weights take cuBLAS SGEMM without TF32: rel-L2 <= 1e-5 (fp32 summation of <= 4096 terms), so the HF-fixture
// tests (F32 weights, 1e-4) keep passing on CUDA. The exact path for F16 control projections (GemmParams::exact)
// has its own tolerances, stated at its tests below.
#include <algorithm>
#include <cstring>
#include <numeric>
#include <thread>

#include "backend/cpu/cpu_ops.h"
#include "backend/cuda/gemm.h"
#include "backend/cuda/gemv.h"
#include "ops_common.h"
#include "quant/quant.h"

namespace dsv4 {
namespace {

using cuda::DeviceArray;
using cuda::GemmImpl;
using cuda::GemvLayout;

// Runs f(i) for i in [0, n) on all hardware threads (the double references are the slow part of these tests).
template <class F>
void parallel_for(int64_t n, F f) {
  const int nt = std::max(1u, std::thread::hardware_concurrency());
  std::vector<std::thread> th;
  for (int t = 0; t < nt; ++t)
    th.emplace_back([&, t] {
      for (int64_t i = t; i < n; i += nt) f(i);
    });
  for (auto& x : th) x.join();
}

std::vector<float> dequantize_matrix(QType t, const uint8_t* w, int64_t rows, int64_t cols) {
  std::vector<float> out(size_t(rows * cols));
  const int64_t rb = row_bytes(t, cols);
  parallel_for(rows, [&](int64_t r) { dequantize_row(t, w + r * rb, &out[size_t(r * cols)], cols); });
  return out;
}

// y[t][r] = sum_c W[r][c] x[t][c] in double.
std::vector<double> ref_matmul(const std::vector<float>& W, int64_t rows, int64_t cols, const float* x, int T) {
  std::vector<double> y(size_t(T) * size_t(rows));
  parallel_for(rows, [&](int64_t r) {
    const float* wr = &W[size_t(r * cols)];
    for (int t = 0; t < T; ++t) {
      double s = 0;
      for (int64_t c = 0; c < cols; ++c) s += double(wr[c]) * double(x[t * cols + c]);
      y[size_t(t * rows + r)] = s;
    }
  });
  return y;
}

double rms_of(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x * x;
  return std::sqrt(s / double(v.size()));
}

// Device copy of a weight (stack of n_rows rows) in `layout`, repacked on the device as the backend does.
DeviceArray<uint8_t> upload_weight(QType t, GemvLayout layout, const std::vector<uint8_t>& w, int64_t n_rows,
                                   int64_t cols) {
  DeviceArray<uint8_t> d{std::span<const uint8_t>(w)};
  if (layout == GemvLayout::Ggml) return d;
  DeviceArray<uint8_t> packed(size_t(n_rows * cuda::layout_row_bytes(t, layout, cols)));
  cuda::repack_weight_cuda(t, layout, d.get(), n_rows, cols, packed.get(), nullptr);
  return packed;
}

std::vector<float> run_gemm(QType t, GemvLayout layout, const DeviceArray<uint8_t>& d_w, int64_t rows, int64_t cols,
                            const DeviceArray<float>& d_x, int T, GemmImpl impl, bool db = false) {
  DeviceArray<float> d_y(size_t(T) * size_t(rows));
  d_y.fill_bytes(0xFF);  // NaN poison: every output must be written
  cuda::GemmParams p;
  p.wtype = t, p.layout = layout, p.w = d_w.get(), p.rows = rows, p.cols = cols, p.x = d_x.get(), p.n_tokens = T;
  p.y = d_y.get(), p.impl = impl, p.mma_double_buffer = db;
  DeviceArray<uint8_t> ws(cuda::gemm_workspace_bytes(p));
  cuda::gemm_cuda(p, ws.get(), nullptr);
  cuda::check(cudaDeviceSynchronize(), "gemm_cuda");
  return d_y.download();
}

// One weight, several token counts, the requested kernels; both checked against the double reference, and the
// CPU oracle's error measured for comparison.
void run_dense(QType t, GemvLayout layout, int64_t rows, int64_t cols, const std::vector<int>& token_counts,
               const std::vector<GemmImpl>& impls, uint64_t seed) {
  const auto w = test::random_weights(t, rows, cols, seed);
  const auto W = dequantize_matrix(t, w.data(), rows, cols);
  const auto d_w = upload_weight(t, layout, w, rows, cols);
  for (int T : token_counts) {
    const auto x = test::random_normal(size_t(T) * size_t(cols), seed + uint64_t(T));
    const auto ref = ref_matmul(W, rows, cols, x.data(), T);
    std::vector<float> cpu(size_t(T) * size_t(rows));
    matmul(t, w.data(), rows, cols, x.data(), T, cpu.data());
    const double e_cpu = test::rel_l2(cpu, ref);
    DeviceArray<float> d_x{std::span<const float>(x)};
    for (GemmImpl impl : impls) {
      const std::string what = qtype_name(t) + (layout == GemvLayout::Q8Split ? " split " : " ") +
                               std::to_string(rows) + "x" + std::to_string(cols) + " T=" + std::to_string(T) +
                               (impl == GemmImpl::Mma ? " mma" : " cublas");
      const auto y = run_gemm(t, layout, d_w, rows, cols, d_x, T, impl);
      const double e = test::rel_l2(y, ref), e_max = test::max_rel_err(y, ref, rms_of(ref));
      EXPECT_LE(e, 1.5e-3) << what;
      EXPECT_LE(e_max, 1e-2) << what;
      if (t != QType::F16) {
        EXPECT_LE(e, e_cpu) << what << ": the CPU path (8-bit activations) is closer";
      }
      // Argmax per token: the logit-like question "same winner?" (a tie within the error may flip, so allow 2%).
      int flips = 0;
      for (int tok = 0; tok < T; ++tok) {
        const std::span<const float> yr(&y[size_t(tok) * size_t(rows)], size_t(rows));
        const std::span<const double> rr(&ref[size_t(tok) * size_t(rows)], size_t(rows));
        flips += test::argmax(yr) != test::argmax(rr);
      }
      EXPECT_LE(flips, std::max(1, T / 50)) << what;
      std::printf("[gemm] %-44s rel-L2 %.2e (cpu oracle %.2e) max %.2e argmax flips %d/%d\n", what.c_str(), e,
                  e_cpu, e_max, flips, T);
    }
  }
}

const std::vector<GemmImpl> kBoth = {GemmImpl::Mma, GemmImpl::Cublas};

// Every type at a small shape with a partial N tile (320 rows = 2.5 x 128) and partial M tiles (9, 1000 tokens).
TEST(CudaGemm, DenseAllTypes) {
  DSV4_REQUIRE_CUDA();
  run_dense(QType::Q8_0, GemvLayout::Ggml, 320, 1024, {9, 64, 1000}, kBoth, 11);
  run_dense(QType::Q8_0, GemvLayout::Q8Split, 320, 1024, {9, 256}, kBoth, 12);
  run_dense(QType::Q2_K, GemvLayout::Ggml, 320, 1024, {9, 32, 64}, kBoth, 13);  // tile heights 16, 32, 64
  run_dense(QType::Q4_K, GemvLayout::Ggml, 320, 1024, {9, 256}, kBoth, 14);
  run_dense(QType::IQ2_XXS, GemvLayout::Ggml, 320, 1024, {9, 64, 1000}, kBoth, 15);
  run_dense(QType::F16, GemvLayout::Ggml, 320, 1024, {9, 256}, kBoth, 16);
}

// Flash attention/shared-expert widths (Q8_0, split layout as the backend stores it).
TEST(CudaGemm, DenseFlashWidths) {
  DSV4_REQUIRE_CUDA();
  run_dense(QType::Q8_0, GemvLayout::Q8Split, 1024, 4096, {64, 256}, kBoth, 21);  // wq_a 4096 -> 1024
  run_dense(QType::Q8_0, GemvLayout::Q8Split, 32768, 1024, {9}, kBoth, 22);       // wq_b 1024 -> 32768
  run_dense(QType::Q8_0, GemvLayout::Q8Split, 2048, 4096, {100}, kBoth, 23);      // shared expert gate
}

// F32 weights: exact FP32 (cuBLAS, TF32 off).
TEST(CudaGemm, DenseF32IsFp32) {
  DSV4_REQUIRE_CUDA();
  const int64_t rows = 320, cols = 1024;
  const int T = 64;
  const auto Wv = test::random_normal(size_t(rows * cols), 31, 0.05f);
  std::vector<uint8_t> w(Wv.size() * 4);
  std::memcpy(w.data(), Wv.data(), w.size());
  const auto x = test::random_normal(size_t(T * cols), 32);
  const auto ref = ref_matmul(Wv, rows, cols, x.data(), T);
  const auto d_w = upload_weight(QType::F32, GemvLayout::Ggml, w, rows, cols);
  DeviceArray<float> d_x{std::span<const float>(x)};
  const auto y = run_gemm(QType::F32, GemvLayout::Ggml, d_w, rows, cols, d_x, T, GemmImpl::Auto);
  EXPECT_LE(test::rel_l2(y, ref), 1e-5);
}

// ---- exact FP32 path (GemmParams::exact): the control projections ----------------------------------------------
// The HC mixes [16384 -> 24] and the router [4096 -> 256] are F16 weights; the CPU and the F16 GEMV multiply them
// with the f32 activations as they are and sum in fp32. The exact path (FP32-widened weight, cuBLAS SGEMM with TF32
// off) must give the same products, so only the summation order differs. Tolerances, with u = 2^-24 and random
// inputs (|partial sums| ~ sqrt(i) rms(w x)): rounding errors of a sequential fp32 sum have an RMS of about
// u sqrt(K / 6) relative to |y|, i.e. 3.1e-6 at K = 16384 (the worst order; blocked/split sums are smaller), and
// about 0.7 u = 4e-8 of sum_c |w_c x_c| per element. Bounds: rel-L2 <= 2e-5 against the double reference and
// against the GEMV, and every element within 4e-6 * sum_c |w_c x_c| of the reference (>= 6x and ~20x margin).
// Rounding the activations to TF32 or FP16 (11-bit significands: RMS relative error 2.8e-4 per product) would give
// rel-L2 ~2.8e-4 and per-element errors of ~3.6e-6 sigma at K = 16384: both bounds fail. ExactPathKeepsFp32Bits
// checks the same directly.

// Double reference y and a[t][r] = sum_c |W[r][c] x[t][c]| (the per-element error scale).
void ref_matmul_abs(const std::vector<float>& W, int64_t rows, int64_t cols, const float* x, int T,
                    std::vector<double>& y, std::vector<double>& a) {
  y.assign(size_t(T) * size_t(rows), 0.0);
  a.assign(y.size(), 0.0);
  parallel_for(rows, [&](int64_t r) {
    const float* wr = &W[size_t(r * cols)];
    for (int t = 0; t < T; ++t) {
      double s = 0, m = 0;
      for (int64_t c = 0; c < cols; ++c) {
        const double v = double(wr[c]) * double(x[t * cols + c]);
        s += v, m += std::fabs(v);
      }
      y[size_t(t * rows + r)] = s, a[size_t(t * rows + r)] = m;
    }
  });
}

std::vector<float> run_exact(const DeviceArray<uint8_t>& d_w, int64_t rows, int64_t cols, const DeviceArray<float>& d_x,
                             int T) {
  DeviceArray<float> d_y(size_t(T) * size_t(rows));
  d_y.fill_bytes(0xFF);  // NaN poison: every output must be written
  cuda::GemmParams p;
  p.wtype = QType::F16, p.w = d_w.get(), p.rows = rows, p.cols = cols, p.x = d_x.get(), p.n_tokens = T;
  p.y = d_y.get(), p.exact = true;
  DeviceArray<uint8_t> ws(cuda::gemm_workspace_bytes(p));
  cuda::gemm_cuda(p, ws.get(), nullptr);
  cuda::check(cudaDeviceSynchronize(), "gemm_cuda (exact)");
  return d_y.download();
}

// The F16 GEMV the backend ran before (activations passed as f32: the F16 partner format is plain f32).
std::vector<float> run_f16_gemv(const DeviceArray<uint8_t>& d_w, int64_t rows, int64_t cols,
                                const DeviceArray<float>& d_x, int T) {
  DeviceArray<float> d_y(size_t(T) * size_t(rows));
  d_y.fill_bytes(0xFF);
  cuda::GemvParams g;
  g.wtype = QType::F16, g.w = d_w.get(), g.rows = rows, g.cols = cols, g.xq = d_x.get(), g.n_tokens = T;
  g.y = d_y.get();
  cuda::gemv_cuda(g, nullptr);
  cuda::check(cudaDeviceSynchronize(), "gemv_cuda (f16)");
  return d_y.download();
}

void run_exact_case(const char* name, int64_t rows, int64_t cols, const std::vector<int>& token_counts, uint64_t seed) {
  const auto w = test::random_weights(QType::F16, rows, cols, seed);
  const auto W = dequantize_matrix(QType::F16, w.data(), rows, cols);
  const auto d_w = upload_weight(QType::F16, GemvLayout::Ggml, w, rows, cols);
  for (int T : token_counts) {
    const std::string what = std::string(name) + " T=" + std::to_string(T);
    const auto x = test::random_normal(size_t(T) * size_t(cols), seed + uint64_t(T));
    std::vector<double> ref, abs_sum;
    ref_matmul_abs(W, rows, cols, x.data(), T, ref, abs_sum);
    DeviceArray<float> d_x{std::span<const float>(x)};
    const auto y = run_exact(d_w, rows, cols, d_x, T), yv = run_f16_gemv(d_w, rows, cols, d_x, T);
    double worst = 0, worst_gemv = 0;  // max |y - ref| / sum |w x|
    for (size_t i = 0; i < y.size(); ++i) {
      worst = std::max(worst, std::fabs(double(y[i]) - ref[i]) / abs_sum[i]);
      worst_gemv = std::max(worst_gemv, std::fabs(double(yv[i]) - ref[i]) / abs_sum[i]);
    }
    const double e = test::rel_l2(y, ref), e_gemv = test::rel_l2(yv, ref), e_vs = test::rel_l2(y, yv);
    EXPECT_LE(e, 2e-5) << what;
    EXPECT_LE(e_vs, 2e-5) << what << ": exact GEMM vs the F16 GEMV";
    EXPECT_LE(worst, 4e-6) << what;  // also false for NaN (an unwritten output)
    std::printf("[gemm exact] %-28s rel-L2 %.2e (gemv %.2e, gemm vs gemv %.2e) max/sum|wx| %.2e (gemv %.2e)\n",
                what.c_str(), e, e_gemv, e_vs, worst, worst_gemv);
  }
}

// Flash widths: HC mix [4 x 4096 -> 24] and router [4096 -> 256], from the smallest GEMM batch to a full pass.
TEST(CudaGemm, ExactControlProjections) {
  DSV4_REQUIRE_CUDA();
  run_exact_case("hc mix 16384->24", 24, 16384, {16, 37, 256, 2048}, 61);
  run_exact_case("router 4096->256", 256, 4096, {16, 100, 2048}, 62);
}

// Bits the FP32 path keeps and TF32/FP16 drop: x = 1 + 2^-13 (14 significant bits) times w = 1 over 64 columns.
// Every partial sum k (1 + 2^-13), k <= 64, is exact in fp32 (21 bits), so any fp32 order gives exactly
// 64 + 2^-7; 11-bit operands round x to 1 and give 64.
TEST(CudaGemm, ExactPathKeepsFp32Bits) {
  DSV4_REQUIRE_CUDA();
  const int64_t rows = 24, cols = 64;
  const int T = 16;
  std::vector<uint8_t> w(size_t(rows * cols) * 2);
  for (size_t i = 0; i < w.size(); i += 2) test::put_f16(&w[i], 1.0f);
  const std::vector<float> x(size_t(T * cols), 1.0f + 0x1p-13f);
  const auto d_w = upload_weight(QType::F16, GemvLayout::Ggml, w, rows, cols);
  DeviceArray<float> d_x{std::span<const float>(x)};
  const auto y = run_exact(d_w, rows, cols, d_x, T);
  for (size_t i = 0; i < y.size(); ++i) ASSERT_EQ(y[i], 64.0f + 0x1p-7f) << "output " << i;
}

// Bad arguments are dsv4::Error naming the problem, before any device work.
TEST(CudaGemm, RejectsBadArguments) {
  cuda::GemmParams p;
  p.wtype = QType::BF16, p.rows = 128, p.cols = 256, p.n_tokens = 16;
  EXPECT_THROW(cuda::gemm_workspace_bytes(p), Error);  // type without a kernel
  p.wtype = QType::Q8_0, p.cols = 96;
  EXPECT_THROW(cuda::gemm_workspace_bytes(p), Error);  // cols not a multiple of 64
  p.cols = 256, p.layout = GemvLayout::Q8Split, p.wtype = QType::Q4_K;
  EXPECT_THROW(cuda::gemm_workspace_bytes(p), Error);  // split layout is Q8_0 only
  EXPECT_FALSE(cuda::gemm_supports(QType::BF16, GemvLayout::Ggml));
  EXPECT_TRUE(cuda::gemm_supports(QType::IQ2_XXS, GemvLayout::Ggml));
  p.layout = GemvLayout::Ggml, p.wtype = QType::Q8_0, p.exact = true;
  EXPECT_THROW(cuda::gemm_workspace_bytes(p), Error);  // the exact path is F16/F32 only
  p.wtype = QType::F16, p.impl = GemmImpl::Mma;
  EXPECT_THROW(cuda::gemm_workspace_bytes(p), Error);  // ... and cuBLAS only
  p.impl = GemmImpl::Auto;
  float dummy = 0;  // never dereferenced: the size query only checks that the pointers are set
  p.w = &dummy, p.x = &dummy, p.y = &dummy;
  EXPECT_EQ(cuda::gemm_workspace_bytes(p), size_t(128 * 256 * 4));  // the widened weight
  EXPECT_TRUE(cuda::gemm_exact_supports(QType::F16));
  EXPECT_FALSE(cuda::gemm_exact_supports(QType::Q8_0));
  cuda::MoeGemmParams m;
  m.gate.type = m.up.type = m.down.type = QType::Q8_0;
  m.d = 4096, m.ff = 2048, m.n_experts = 2000, m.k = 6, m.n_tokens = 4;
  EXPECT_THROW(cuda::moe_gemm_workspace_bytes(m), Error);  // > 1024 experts
  m.n_experts = 256, m.down.type = QType::F32;
  EXPECT_THROW(cuda::moe_gemm_workspace_bytes(m), Error);  // F32 experts have no MMA kernel
}

// ---- routed experts ------------------------------------------------------------------------------------------------
struct MoeCase {
  QType gate_up, down;
  GemvLayout layout_gu = GemvLayout::Ggml, layout_down = GemvLayout::Ggml;
  int64_t d, ff;
  int n_experts, k, T;
  bool skewed = false;  // every token picks experts 0..k-1 (many M tiles per expert)
  uint64_t seed;
};

void run_moe(const MoeCase& c) {
  const int64_t D = c.d, F = c.ff;
  const int E = c.n_experts, k = c.k, T = c.T, S = T * k;
  const float clamp = 10.0f;
  const std::string what = "MoE " + qtype_name(c.gate_up) + "/" + qtype_name(c.down) + " d=" + std::to_string(D) +
                           " ff=" + std::to_string(F) + " E=" + std::to_string(E) + " k=" + std::to_string(k) +
                           " T=" + std::to_string(T) + (c.skewed ? " skewed" : "");
  const auto wg = test::random_weights(c.gate_up, F, D, c.seed, E);
  const auto wu = test::random_weights(c.gate_up, F, D, c.seed + 1, E);
  const auto wd = test::random_weights(c.down, D, F, c.seed + 2, E);
  const auto x = test::random_normal(size_t(T) * size_t(D), c.seed + 3);
  std::vector<int32_t> ids(static_cast<size_t>(S));
  std::vector<float> rw(static_cast<size_t>(S));
  std::mt19937_64 rng(c.seed + 4);
  for (int t = 0; t < T; ++t) {
    std::vector<int32_t> perm(static_cast<size_t>(E));
    std::iota(perm.begin(), perm.end(), 0);
    if (!c.skewed) std::shuffle(perm.begin(), perm.end(), rng);  // k distinct experts, as top-k gives
    float sum = 0;
    for (int j = 0; j < k; ++j) {
      ids[size_t(t * k + j)] = perm[size_t(j)];
      rw[size_t(t * k + j)] = 0.2f + float(rng() % 1000) / 1000.0f;
      sum += rw[size_t(t * k + j)];
    }
    for (int j = 0; j < k; ++j) rw[size_t(t * k + j)] /= sum;
  }

  // GPU.
  const auto d_wg = upload_weight(c.gate_up, c.layout_gu, wg, int64_t(E) * F, D);
  const auto d_wu = upload_weight(c.gate_up, c.layout_gu, wu, int64_t(E) * F, D);
  const auto d_wd = upload_weight(c.down, c.layout_down, wd, int64_t(E) * D, F);
  DeviceArray<float> d_x{std::span<const float>(x)};
  DeviceArray<int32_t> d_ids{std::span<const int32_t>(ids)};
  DeviceArray<float> d_rw{std::span<const float>(rw)};
  DeviceArray<float> d_y(size_t(S) * size_t(D));
  d_y.fill_bytes(0xFF);
  cuda::MoeGemmParams p;
  p.gate = {c.gate_up, c.layout_gu, d_wg.get(), F * cuda::layout_row_bytes(c.gate_up, c.layout_gu, D)};
  p.up = {c.gate_up, c.layout_gu, d_wu.get(), F * cuda::layout_row_bytes(c.gate_up, c.layout_gu, D)};
  p.down = {c.down, c.layout_down, d_wd.get(), D * cuda::layout_row_bytes(c.down, c.layout_down, F)};
  p.d = D, p.ff = F, p.n_experts = E, p.k = k, p.ids = d_ids.get(), p.weights = d_rw.get(), p.x = d_x.get();
  p.n_tokens = T, p.swiglu_clamp = clamp, p.y_slots = d_y.get();
  DeviceArray<uint8_t> ws(cuda::moe_gemm_workspace_bytes(p));
  cuda::moe_gemm_cuda(p, ws.get(), nullptr);
  cuda::check(cudaDeviceSynchronize(), what.c_str());
  const auto y = d_y.download();

  // Exact reference (double) and the CPU oracle (dsv4::matmul + cpu::swiglu_clamped, as CpuBackend::moe_ffn),
  // expert by expert over the slots that use it.
  std::vector<double> ref(size_t(S) * size_t(D));
  std::vector<float> cpu(size_t(S) * size_t(D));
  const int64_t rbg = row_bytes(c.gate_up, D), rbd = row_bytes(c.down, F);
  for (int e = 0; e < E; ++e) {
    std::vector<int> us;
    for (int s = 0; s < S; ++s)
      if (ids[size_t(s)] == e) us.push_back(s);
    if (us.empty()) continue;
    const int n = int(us.size());
    std::vector<float> xs(size_t(n) * size_t(D));
    for (int i = 0; i < n; ++i) std::memcpy(&xs[size_t(i) * D], &x[size_t(us[size_t(i)] / k) * D], size_t(D) * 4);
    const auto Wg = dequantize_matrix(c.gate_up, &wg[size_t(e * F * rbg)], F, D);
    const auto Wu = dequantize_matrix(c.gate_up, &wu[size_t(e * F * rbg)], F, D);
    const auto Wd = dequantize_matrix(c.down, &wd[size_t(e * D * rbd)], D, F);
    const auto g = ref_matmul(Wg, F, D, xs.data(), n), u = ref_matmul(Wu, F, D, xs.data(), n);
    std::vector<float> h(size_t(n) * size_t(F));  // exact h, rounded to float only for the double dot below
    for (int i = 0; i < n; ++i)
      for (int64_t f = 0; f < F; ++f) {
        const size_t q = size_t(i) * F + size_t(f);
        const double gc = std::min(g[q], double(clamp)), uc = std::clamp(u[q], -double(clamp), double(clamp));
        h[q] = float(gc / (1.0 + std::exp(-gc)) * uc * double(rw[size_t(us[size_t(i)])]));
      }
    const auto out = ref_matmul(Wd, D, F, h.data(), n);
    // CPU oracle.
    std::vector<float> cg(size_t(n) * size_t(F)), cu(cg.size()), co(size_t(n) * size_t(D));
    matmul(c.gate_up, &wg[size_t(e * F * rbg)], F, D, xs.data(), n, cg.data());
    matmul(c.gate_up, &wu[size_t(e * F * rbg)], F, D, xs.data(), n, cu.data());
    for (int i = 0; i < n; ++i)
      for (int64_t f = 0; f < F; ++f) {
        const size_t q = size_t(i) * F + size_t(f);
        cg[q] = cpu::swiglu_clamped(cg[q], cu[q], clamp) * rw[size_t(us[size_t(i)])];
      }
    matmul(c.down, &wd[size_t(e * D * rbd)], D, F, cg.data(), n, co.data());
    for (int i = 0; i < n; ++i) {
      std::copy_n(&out[size_t(i) * D], D, &ref[size_t(us[size_t(i)]) * D]);
      std::copy_n(&co[size_t(i) * D], D, &cpu[size_t(us[size_t(i)]) * D]);
    }
  }
  const double e = test::rel_l2(y, ref), e_cpu = test::rel_l2(cpu, ref);
  const double e_max = test::max_rel_err(y, ref, rms_of(ref));
  EXPECT_LE(e, 3e-3) << what;
  EXPECT_LE(e_max, 2e-2) << what;
  EXPECT_LE(e, e_cpu) << what << ": the CPU path (8-bit activations) is closer";
  std::printf("[gemm] %-60s rel-L2 %.2e (cpu oracle %.2e) max %.2e\n", what.c_str(), e, e_cpu, e_max);
}

// Flash q2 mix (IQ2_XXS gate/up, Q2_K down), 256 experts, k = 6, at reduced widths (the double reference of
// full widths would take minutes), then Flash widths with fewer experts.
TEST(CudaGemm, MoeQ2Mix) {
  DSV4_REQUIRE_CUDA();
  run_moe({QType::IQ2_XXS, QType::Q2_K, GemvLayout::Ggml, GemvLayout::Ggml, 1024, 512, 256, 6, 9, false, 41});
  run_moe({QType::IQ2_XXS, QType::Q2_K, GemvLayout::Ggml, GemvLayout::Ggml, 1024, 512, 256, 6, 256, false, 42});
  run_moe({QType::IQ2_XXS, QType::Q2_K, GemvLayout::Ggml, GemvLayout::Ggml, 512, 256, 256, 6, 1000, false, 43});  // 32-row tiles
  run_moe({QType::IQ2_XXS, QType::Q2_K, GemvLayout::Ggml, GemvLayout::Ggml, 1024, 512, 256, 6, 64, true, 44});
  run_moe({QType::IQ2_XXS, QType::Q2_K, GemvLayout::Ggml, GemvLayout::Ggml, 4096, 2048, 16, 6, 9, false, 45});
}

TEST(CudaGemm, MoeQ4AndQ8Mixes) {
  DSV4_REQUIRE_CUDA();
  run_moe({QType::Q4_K, QType::Q4_K, GemvLayout::Ggml, GemvLayout::Ggml, 1024, 512, 256, 6, 64, false, 51});
  run_moe({QType::Q8_0, QType::Q8_0, GemvLayout::Q8Split, GemvLayout::Q8Split, 1024, 512, 256, 6, 64, false, 52});
  run_moe({QType::Q8_0, QType::Q8_0, GemvLayout::Ggml, GemvLayout::Ggml, 1024, 512, 64, 6, 33, false, 53});
  // Few experts, many rows each: 64-row tiles (T*k/E = 75), several tiles per expert.
  run_moe({QType::Q4_K, QType::Q2_K, GemvLayout::Ggml, GemvLayout::Ggml, 1024, 512, 8, 6, 100, false, 54});
}

// The double-buffered MMA kernel (mma_double_buffer) accumulates the same products in the same order as the
// default one, so every output must be bit-identical: dense at each tile height (16/32/64 rows, partial M and N
// tiles) for the quantized layouts, and the routed-expert chain (gate/up, SwiGLU, down) of the q2 mix, uniform and
// skewed (many M tiles per expert).
TEST(CudaGemm, DoubleBufferedMmaIsBitIdentical) {
  DSV4_REQUIRE_CUDA();
  struct Dense {
    QType t;
    GemvLayout layout;
    int64_t rows, cols;
    int T;
  };
  for (const Dense& c : {Dense{QType::IQ2_XXS, GemvLayout::Ggml, 320, 1024, 9},
                         Dense{QType::Q2_K, GemvLayout::Ggml, 320, 1024, 32},
                         Dense{QType::Q8_0, GemvLayout::Q8Split, 1024, 4096, 64},
                         Dense{QType::Q4_K, GemvLayout::Ggml, 320, 1024, 200},
                         Dense{QType::F16, GemvLayout::Ggml, 320, 1024, 100}}) {
    const auto w = test::random_weights(c.t, c.rows, c.cols, 81);
    const auto d_w = upload_weight(c.t, c.layout, w, c.rows, c.cols);
    const auto x = test::random_normal(size_t(c.T) * size_t(c.cols), 82);
    DeviceArray<float> d_x{std::span<const float>(x)};
    const auto y0 = run_gemm(c.t, c.layout, d_w, c.rows, c.cols, d_x, c.T, GemmImpl::Mma, false);
    const auto y1 = run_gemm(c.t, c.layout, d_w, c.rows, c.cols, d_x, c.T, GemmImpl::Mma, true);
    ASSERT_EQ(y0.size(), y1.size());
    EXPECT_EQ(std::memcmp(y0.data(), y1.data(), y0.size() * sizeof(float)), 0)
        << qtype_name(c.t) << " " << c.rows << "x" << c.cols << " T=" << c.T;
  }
  // Routed experts, q2 mix: 256 experts, k = 6.
  const int64_t D = 1024, F = 512;
  const int E = 256, k = 6;
  const auto wg = test::random_weights(QType::IQ2_XXS, F, D, 83, E), wu = test::random_weights(QType::IQ2_XXS, F, D, 84, E);
  const auto wd = test::random_weights(QType::Q2_K, D, F, 85, E);
  const auto d_wg = upload_weight(QType::IQ2_XXS, GemvLayout::Ggml, wg, int64_t(E) * F, D);
  const auto d_wu = upload_weight(QType::IQ2_XXS, GemvLayout::Ggml, wu, int64_t(E) * F, D);
  const auto d_wd = upload_weight(QType::Q2_K, GemvLayout::Ggml, wd, int64_t(E) * D, F);
  for (const auto& [T, skewed] : {std::pair{300, false}, std::pair{64, true}}) {
    const int S = T * k;
    std::vector<int32_t> ids(static_cast<size_t>(S));
    std::vector<float> rw(static_cast<size_t>(S), 1.0f / float(k));
    std::mt19937_64 rng(86);
    for (int t = 0; t < T; ++t) {
      std::vector<int32_t> perm(static_cast<size_t>(E));
      std::iota(perm.begin(), perm.end(), 0);
      if (!skewed) std::shuffle(perm.begin(), perm.end(), rng);
      for (int j = 0; j < k; ++j) ids[size_t(t * k + j)] = perm[size_t(j)];
    }
    const auto x = test::random_normal(size_t(T) * size_t(D), 87);
    DeviceArray<float> d_x{std::span<const float>(x)};
    DeviceArray<int32_t> d_ids{std::span<const int32_t>(ids)};
    DeviceArray<float> d_rw{std::span<const float>(rw)};
    std::vector<float> out[2];
    for (int db = 0; db < 2; ++db) {
      DeviceArray<float> d_y(size_t(S) * size_t(D));
      d_y.fill_bytes(0xFF);
      cuda::MoeGemmParams p;
      p.gate = {QType::IQ2_XXS, GemvLayout::Ggml, d_wg.get(), F * row_bytes(QType::IQ2_XXS, D)};
      p.up = {QType::IQ2_XXS, GemvLayout::Ggml, d_wu.get(), F * row_bytes(QType::IQ2_XXS, D)};
      p.down = {QType::Q2_K, GemvLayout::Ggml, d_wd.get(), D * row_bytes(QType::Q2_K, F)};
      p.d = D, p.ff = F, p.n_experts = E, p.k = k, p.ids = d_ids.get(), p.weights = d_rw.get(), p.x = d_x.get();
      p.n_tokens = T, p.swiglu_clamp = 10.0f, p.y_slots = d_y.get(), p.mma_double_buffer = db == 1;
      DeviceArray<uint8_t> ws(cuda::moe_gemm_workspace_bytes(p));
      cuda::moe_gemm_cuda(p, ws.get(), nullptr);
      cuda::check(cudaDeviceSynchronize(), "moe_gemm_cuda");
      out[db] = d_y.download();
    }
    EXPECT_TRUE(std::all_of(out[0].begin(), out[0].end(), [](float v) { return std::isfinite(v); })) << "T=" << T;
    EXPECT_EQ(std::memcmp(out[0].data(), out[1].data(), out[0].size() * sizeof(float)), 0)
        << "MoE q2 T=" << T << (skewed ? " skewed" : "");
  }
}

}  // namespace
}  // namespace dsv4
