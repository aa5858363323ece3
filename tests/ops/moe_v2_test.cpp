// Variant 2 of the routed-expert decode launches (gemv_moe_v2.h, GemvParams::kernel = kMoeKernelV2) against the
// default kernels, at Flash widths (D 4096, F 2048, k 6; IQ2_XXS / Q2_K / Q4_K stacks):
//   - gate+up+SwiGLU (route weights, clamp) vs moe_gate_up_swiglu_cuda's default (streaming) kernel;
//   - down+sum (k = 6, accumulating into y) vs moe_down_sum_cuda's default (staged) kernel.
// Tolerance: variant 2 forms the same integer block dots, scales them with the same fp32 expressions and sums each
// row in the default kernels' order, so the outputs should be identical; the check allows 1e-6 of (|ref| + rms(ref))
// per element, room for the compiler contracting a multiply-add differently in the new kernel, and the test prints
// how many elements differ at all. Exception: variant 2's Q2_K down+sum for rows of <= 2048 columns (the Flash
// case) forms two sub-blocks' products in one fp32 expression per lane, so it differs from the staged kernel by
// fp32 reordering only (a few ulps of the row sums: far inside the same 1e-6 bound). Outputs start as NaN (gate+up) so an unwritten element fails.
// The bad-argument test runs without a GPU (every check happens before any CUDA call).
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "backend/cuda/gemv.h"
#include "backend/cuda/gemv_moe_v2.h"
#include "ops_common.h"
#include "quant/quant.h"

namespace dsv4 {
namespace {

using cuda::DeviceArray;

constexpr int64_t kD = 4096, kF = 2048;
constexpr int kK = 6;

// Worst |a - ref| / (|ref| + rms(ref)) over the elements (inf if any a is not finite), and the count of elements
// whose bits differ.
struct Cmp {
  double worst = 0;
  size_t n_diff = 0;
};
Cmp compare(const std::vector<float>& a, const std::vector<float>& ref) {
  double ss = 0;
  for (float v : ref) ss += double(v) * double(v);
  const double rms = std::sqrt(ss / double(ref.size()));
  Cmp c;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::memcmp(&a[i], &ref[i], 4) != 0) ++c.n_diff;
    const double e = std::isfinite(a[i]) ? std::fabs(double(a[i]) - double(ref[i])) / (std::fabs(double(ref[i])) + rms)
                                         : INFINITY;
    c.worst = std::max(c.worst, e);
  }
  return c;
}

// Quantized activation rows for n rows of random floats (quantize_activations_cuda: the bytes both kernels read).
DeviceArray<uint8_t> quantized_rows(QType t, int n, int64_t cols, uint64_t seed) {
  const auto x = test::random_normal(size_t(n) * size_t(cols), seed);
  DeviceArray<float> dx{std::span<const float>(x)};
  DeviceArray<uint8_t> xq(size_t(n * cuda::gpu_activation_bytes(t, cols)));
  cuda::quantize_activations_cuda(t, dx.get(), n, cols, xq.get(), nullptr);
  cuda::check(cudaDeviceSynchronize(), "quantize");
  return xq;
}

void run_gate_up(QType t, int n_experts, const std::vector<int32_t>& ids, int act_slot_div, float clamp,
                 uint64_t seed) {
  const int n_slots = int(ids.size());
  const std::string what = "gate+up " + qtype_name(t) + " slots=" + std::to_string(n_slots) +
                           " clamp=" + std::to_string(clamp);
  const int64_t rb = row_bytes(t, kD);
  const auto wg = test::random_weights(t, kF, kD, seed, n_experts), wu = test::random_weights(t, kF, kD, seed + 1, n_experts);
  DeviceArray<uint8_t> d_wg{std::span<const uint8_t>(wg)}, d_wu{std::span<const uint8_t>(wu)};
  DeviceArray<uint8_t> xq = quantized_rows(t, n_slots / act_slot_div, kD, seed + 2);
  const auto rw = test::random_normal(size_t(n_slots), seed + 3, 0.3f);
  DeviceArray<float> d_rw{std::span<const float>(rw)};
  DeviceArray<int32_t> d_ids{std::span<const int32_t>(ids)};
  const std::vector<float> nan(size_t(n_slots) * kF, std::nanf(""));
  DeviceArray<float> y0{std::span<const float>(nan)}, y1{std::span<const float>(nan)};
  cuda::GemvParams p;
  p.wtype = t, p.w = d_wg.get(), p.w2 = d_wu.get(), p.rows = kF, p.cols = kD, p.expert_stride = kF * rb;
  p.expert_ids = d_ids.get(), p.n_slots = n_slots, p.act_slot_div = act_slot_div, p.xq = xq.get();
  p.y = y0.get(), p.y2 = y0.get();
  cuda::moe_gate_up_swiglu_cuda(p, d_rw.get(), clamp, nullptr);  // default kernel
  ASSERT_TRUE(cuda::moe_v2_supported(p, 2)) << what;
  p.kernel = cuda::kMoeKernelV2, p.y = y1.get();
  cuda::moe_gate_up_swiglu_cuda(p, d_rw.get(), clamp, nullptr);
  cuda::check(cudaDeviceSynchronize(), what.c_str());
  const auto ref = y0.download(), got = y1.download();
  const Cmp c = compare(got, ref);
  EXPECT_LE(c.worst, 1e-6) << what;
  double ss = 0;
  for (float v : ref) ss += double(v) * double(v);
  EXPECT_GT(ss, 0.0) << what << ": the default kernel's output is all zero (test setup)";
  std::printf("  %s: %zu of %zu elements differ in their bits, worst %.3g\n", what.c_str(), c.n_diff, ref.size(),
              c.worst);
}

void run_down_sum(QType t, int64_t rows, int64_t cols, int n_experts, const std::vector<int32_t>& ids, int k,
                  uint64_t seed) {
  const int n_slots = int(ids.size()), n_tok = n_slots / k;
  const std::string what = "down+sum " + qtype_name(t) + " " + std::to_string(cols) + "->" + std::to_string(rows) +
                           " slots=" + std::to_string(n_slots) + " k=" + std::to_string(k);
  const int64_t rb = row_bytes(t, cols);
  const auto w = test::random_weights(t, rows, cols, seed, n_experts);
  DeviceArray<uint8_t> d_w{std::span<const uint8_t>(w)};
  DeviceArray<uint8_t> xq = quantized_rows(t, n_slots, cols, seed + 1);
  const auto y_init = test::random_normal(size_t(n_tok) * size_t(rows), seed + 2);  // the shared expert's output
  DeviceArray<float> y0{std::span<const float>(y_init)}, y1{std::span<const float>(y_init)};
  DeviceArray<int32_t> d_ids{std::span<const int32_t>(ids)};
  cuda::GemvParams p;
  p.wtype = t, p.w = d_w.get(), p.rows = rows, p.cols = cols, p.expert_stride = rows * rb;
  p.expert_ids = d_ids.get(), p.n_slots = n_slots, p.act_slot_div = 1, p.xq = xq.get(), p.y = y0.get();
  cuda::moe_down_sum_cuda(p, k, nullptr);  // default (staged) kernel
  ASSERT_TRUE(cuda::moe_v2_supported(p, k)) << what;
  p.kernel = cuda::kMoeKernelV2, p.y = y1.get();
  cuda::moe_down_sum_cuda(p, k, nullptr);
  cuda::check(cudaDeviceSynchronize(), what.c_str());
  const auto ref = y0.download(), got = y1.download();
  const Cmp c = compare(got, ref);
  EXPECT_LE(c.worst, 1e-6) << what;
  size_t moved = 0;  // the launch added something: y differs from its initial value almost everywhere
  for (size_t i = 0; i < ref.size(); ++i) moved += ref[i] != y_init[i];
  EXPECT_GT(moved, ref.size() / 2) << what << ": the default kernel left y unchanged (test setup)";
  std::printf("  %s: %zu of %zu elements differ in their bits, worst %.3g\n", what.c_str(), c.n_diff, ref.size(),
              c.worst);
}

TEST(CudaMoeV2, GateUpSwigluMatchesDefault) {
  DSV4_REQUIRE_CUDA();
  const std::vector<int32_t> ids = {15, 0, 7, 3, 12, 9};  // one token's 6 experts of 16 (first and last included)
  for (QType t : {QType::IQ2_XXS, QType::Q2_K, QType::Q4_K}) {
    run_gate_up(t, 16, ids, kK, 10.0f, 1001);  // the model's clamp
    run_gate_up(t, 16, ids, kK, 0.05f, 1002);  // a clamp that bites on most rows
  }
  // Two tokens (12 slots, two activation rows), repeated experts.
  run_gate_up(QType::IQ2_XXS, 8, {1, 2, 3, 4, 5, 6, 6, 5, 4, 3, 2, 0}, kK, 10.0f, 1003);
  // The most slots a launch takes (64: the per-CTA expert offset table), 8 tokens of 8 experts.
  std::vector<int32_t> many(64);
  for (int i = 0; i < 64; ++i) many[size_t(i)] = (i * 7 + i / 8) % 16;
  run_gate_up(QType::IQ2_XXS, 16, many, 8, 10.0f, 1004);
}

TEST(CudaMoeV2, DownSumMatchesDefault) {
  DSV4_REQUIRE_CUDA();
  run_down_sum(QType::Q2_K, kD, kF, 16, {15, 1, 10, 4, 0, 9}, kK, 1101);  // Flash decode
  run_down_sum(QType::Q2_K, kD, kF, 16, {3, 1, 10, 4, 0, 15, 2, 2, 9, 8, 7, 6}, kK, 1102);  // two tokens
  run_down_sum(QType::Q4_K, kD, kF, 16, {15, 1, 7, 9, 0, 12}, kK, 1103);
  run_down_sum(QType::IQ2_XXS, kD, kF, 8, {7, 0, 3, 5, 1, 2}, kK, 1104);
  // Rows long enough that the default kernel splits each into 2 block ranges (staged parts), k = 3 and k = 8.
  run_down_sum(QType::Q2_K, 1024, 4096, 8, {7, 0, 3}, 3, 1105);
  run_down_sum(QType::Q4_K, 512, kF, 16, {1, 3, 5, 7, 9, 11, 13, 15}, 8, 1106);
}

// Fake device pointers: the checks reject before any CUDA call, so nothing is dereferenced.
const void* fake(uintptr_t a) { return reinterpret_cast<const void*>(a); }

TEST(CudaMoeV2, RejectsBadLaunches) {
  float* y = reinterpret_cast<float*>(0x10000);
  const int32_t* ids = reinterpret_cast<const int32_t*>(0x20000);
  cuda::GemvParams gu;  // a valid Flash gate+up launch
  gu.wtype = QType::IQ2_XXS, gu.w = fake(0x100000), gu.w2 = fake(0x200000), gu.rows = kF, gu.cols = kD;
  gu.expert_stride = kF * row_bytes(QType::IQ2_XXS, kD), gu.expert_ids = ids, gu.n_slots = kK, gu.act_slot_div = kK;
  gu.xq = fake(0x30000), gu.y = y, gu.y2 = y, gu.kernel = cuda::kMoeKernelV2;
  cuda::GemvParams dn;  // a valid Flash down+sum launch
  dn.wtype = QType::Q2_K, dn.w = fake(0x100000), dn.rows = kD, dn.cols = kF;
  dn.expert_stride = kD * row_bytes(QType::Q2_K, kF), dn.expert_ids = ids, dn.n_slots = kK, dn.act_slot_div = 1;
  dn.xq = fake(0x30000), dn.y = y, dn.kernel = cuda::kMoeKernelV2;
  EXPECT_TRUE(cuda::moe_v2_supported(gu, 2));
  EXPECT_TRUE(cuda::moe_v2_supported(dn, kK));

  const auto bad_gu = [&](auto edit, const char* why) {
    cuda::GemvParams p = gu;
    edit(p);
    EXPECT_FALSE(cuda::moe_v2_supported(p, 2)) << why;
    EXPECT_THROW(cuda::moe_gate_up_swiglu_cuda(p, nullptr, 10.0f, nullptr), Error) << why;
  };
  bad_gu([](cuda::GemvParams& p) { p.wtype = QType::Q8_0; }, "Q8_0 (shared expert type)");
  bad_gu([](cuda::GemvParams& p) { p.layout = cuda::GemvLayout::Q8Split; }, "split layout");
  bad_gu([](cuda::GemvParams& p) { p.w = fake(0x100002); }, "misaligned gate stack");
  bad_gu([](cuda::GemvParams& p) { p.w2 = fake(0x200008); }, "misaligned up stack");
  bad_gu([](cuda::GemvParams& p) { p.expert_stride += 2; }, "misaligned expert stride");
  bad_gu([](cuda::GemvParams& p) { p.cols = 1024; }, "IQ2_XXS row of 264 bytes (not a multiple of 16)");
  bad_gu([](cuda::GemvParams& p) { p.cols = 4000; }, "cols not a multiple of 256");
  bad_gu([](cuda::GemvParams& p) { p.n_tokens = 2; }, "two tokens per slot");
  bad_gu([](cuda::GemvParams& p) { p.xq = nullptr; }, "no activations");
  bad_gu([](cuda::GemvParams& p) { p.cta_warps = 16; }, "cta_warps 16");
  bad_gu([](cuda::GemvParams& p) { p.n_slots = 0; }, "no slots");
  bad_gu([](cuda::GemvParams& p) { p.n_slots = 66; }, "66 slots (more than the 64 of the offset table)");
  {
    cuda::GemvParams p = gu;
    p.w2 = nullptr;
    EXPECT_THROW(cuda::moe_gate_up_swiglu_cuda(p, nullptr, 10.0f, nullptr), Error) << "no up stack";
  }

  const auto bad_dn = [&](auto edit, int k, const char* why) {
    cuda::GemvParams p = dn;
    edit(p);
    EXPECT_FALSE(cuda::moe_v2_supported(p, k)) << why;
    EXPECT_THROW(cuda::moe_down_sum_cuda(p, k, nullptr), Error) << why;
  };
  const auto none = [](cuda::GemvParams&) {};
  bad_dn(none, 9, "k = 9 > kMoeV2MaxSegs");
  bad_dn(none, 0, "k = 0");
  bad_dn(none, 4, "k does not divide n_slots");
  bad_dn([](cuda::GemvParams& p) { p.xq = nullptr, p.xf = reinterpret_cast<const float*>(0x40000); }, kK,
         "float input (xf) is not taken");
  bad_dn([](cuda::GemvParams& p) { p.cols = 256; }, kK, "Q2_K row of 84 bytes");
  bad_dn([](cuda::GemvParams& p) { p.w2 = fake(0x200000), p.y2 = reinterpret_cast<float*>(0x50000); }, kK,
         "paired launch");
  bad_dn([](cuda::GemvParams& p) { p.xq = fake(0x30004); }, kK, "misaligned activations");

  // Kernel 5 is a MoE-launch value: the plain GEMV entry point refuses it.
  {
    cuda::GemvParams p = dn;
    p.expert_ids = nullptr, p.n_slots = 1;
    EXPECT_THROW(cuda::gemv_cuda(p, nullptr), Error);
  }

  // The backend's switch: unset / "" / "5" -> variant 2, "auto" -> variant 2 gate+up with the staged down+sum,
  // "0" -> session-8 kernels, anything else fails.
  const char* old = std::getenv("DSV4_CUDA_MOE_KERNEL");
  const std::string saved = old ? old : "";
  unsetenv("DSV4_CUDA_MOE_KERNEL");
  EXPECT_EQ(cuda::moe_kernel_env(), cuda::kMoeKernelV2);
  setenv("DSV4_CUDA_MOE_KERNEL", "", 1);
  EXPECT_EQ(cuda::moe_kernel_env(), cuda::kMoeKernelV2);
  setenv("DSV4_CUDA_MOE_KERNEL", "auto", 1);
  EXPECT_EQ(cuda::moe_kernel_env(), cuda::kMoeKernelAuto);
  setenv("DSV4_CUDA_MOE_KERNEL", "0", 1);
  EXPECT_EQ(cuda::moe_kernel_env(), 0);
  setenv("DSV4_CUDA_MOE_KERNEL", "5", 1);
  EXPECT_EQ(cuda::moe_kernel_env(), cuda::kMoeKernelV2);
  setenv("DSV4_CUDA_MOE_KERNEL", "2", 1);
  EXPECT_THROW(cuda::moe_kernel_env(), Error);
  if (old) setenv("DSV4_CUDA_MOE_KERNEL", saved.c_str(), 1);
  else unsetenv("DSV4_CUDA_MOE_KERNEL");
}

}  // namespace
}  // namespace dsv4
