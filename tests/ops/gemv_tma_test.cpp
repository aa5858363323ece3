// Dense GEMV variant 5 (src/backend/cuda/gemv_dense_tma.h): per-warp rings of bulk-copied stages.
//
// Same per-unit products as variant 2 (exact dp4a integer dots times the same two scales, same order) and the same
// per-lane order (units ascending, then the warp tree), so:
//   * where variant 2 keeps a row in one warp (P = 1: attn_q_b, 1024 wide), the outputs are BIT FOR BIT variant 2's;
//   * elsewhere (variant 2 splits long rows into parts added in shared memory) only the fp32 order of a row's
//     partial sums differs: rel-L2 <= 1e-6 against variant 2 (a few ulps of the partials; a wrong row, stage, slot or
//     activation row moves outputs by ~1e-2 or more), and rel-L2 <= 1e-5 against an independent reference
//     (operands dequantized on the CPU, dot in double, as gemv_test.cpp), so both kernels cannot share a mistake.
// Outputs are NaN-poisoned first: every output must be written. Argument checks need no device.
#include <cmath>
#include <cstring>
#include <string>

#include "backend/cuda/cuda_util.h"
#include "backend/cuda/gemv.h"
#include "backend/cuda/gemv_dense_tma.h"
#include "backend/cuda/gemv_dense_v2.h"
#include "ops_common.h"
#include "quant/quant.h"

namespace dsv4 {
namespace {

using cuda::DeviceArray;
using cuda::GemvLayout;

bool identical(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

struct TmaCase {
  int64_t rows, cols;
  int groups;
  uint64_t seed;
  bool bitwise_v2;  // variant 2 keeps each row in one warp for this shape
};

void run_tma_case(const TmaCase& c) {
  const QType t = QType::Q8_0;
  const std::string what = std::to_string(c.groups) + " x " + std::to_string(c.rows) + "x" + std::to_string(c.cols);
  const auto w = test::random_weights(t, c.rows * c.groups, c.cols, c.seed);
  const auto x = test::random_normal(size_t(c.groups * c.cols), c.seed + 1);
  const int64_t drb = cuda::q8_split_row_bytes(c.cols);
  DeviceArray<uint8_t> d_file{std::span<const uint8_t>(w)};
  DeviceArray<uint8_t> d_w(size_t(c.rows * c.groups * drb));
  cuda::q8_0_split_cuda(d_file.get(), c.rows * c.groups, c.cols, d_w.get(), nullptr);
  DeviceArray<float> d_x{std::span<const float>(x)};
  DeviceArray<uint8_t> d_xq(size_t(c.groups * cuda::gpu_activation_bytes(t, c.cols, GemvLayout::Q8Split)));
  cuda::quantize_activations_cuda(t, d_x.get(), c.groups, c.cols, d_xq.get(), nullptr, GemvLayout::Q8Split);

  cuda::GemvParams p;
  p.wtype = t, p.layout = GemvLayout::Q8Split, p.w = d_w.get(), p.rows = c.rows, p.cols = c.cols, p.xq = d_xq.get();
  p.n_slots = c.groups, p.expert_stride = c.rows * drb;
  ASSERT_TRUE(cuda::gemv_tma_supported(p)) << what;
  DeviceArray<float> d_v2(size_t(c.groups * c.rows)), d_tma(size_t(c.groups * c.rows));
  d_v2.fill_bytes(0xFF), d_tma.fill_bytes(0xFF);
  cuda::GemvParams v2 = p;
  v2.y = d_v2.get(), v2.kernel = cuda::kGemvKernelV2;
  cuda::gemv_cuda(v2, nullptr);
  cuda::GemvParams tm = p;
  tm.y = d_tma.get(), tm.kernel = cuda::kGemvKernelTma;
  for (int rep = 0; rep < 3; ++rep) cuda::gemv_tma_cuda(tm, nullptr);  // repeated launches: fresh barriers each
  cuda::check(cudaDeviceSynchronize(), what.c_str());
  const auto y_v2 = d_v2.download(), y_tma = d_tma.download();

  std::vector<double> ref(size_t(c.groups * c.rows));
  std::vector<float> wrow(static_cast<size_t>(c.cols)), xdeq(static_cast<size_t>(c.cols));
  std::vector<uint8_t> xq(static_cast<size_t>(activation_bytes(t, c.cols)));
  const int64_t rb = row_bytes(t, c.cols);
  for (int g = 0; g < c.groups; ++g) {
    quantize_activation(t, &x[size_t(g * c.cols)], xq.data(), c.cols);
    dequantize_row(activation_type(t), xq.data(), xdeq.data(), c.cols);
    for (int64_t r = 0; r < c.rows; ++r) {
      dequantize_row(t, &w[size_t((g * c.rows + r) * rb)], wrow.data(), c.cols);
      double s = 0;
      for (int64_t i = 0; i < c.cols; ++i) s += double(wrow[size_t(i)]) * double(xdeq[size_t(i)]);
      ref[size_t(g * c.rows + r)] = s;
    }
  }
  for (size_t i = 0; i < y_tma.size(); ++i) ASSERT_TRUE(std::isfinite(y_tma[i])) << what << ": output " << i;
  EXPECT_LE(test::rel_l2(y_tma, std::span<const double>(ref)), 1e-5) << what << ": vs double reference";
  if (c.bitwise_v2) {
    EXPECT_TRUE(identical(y_tma, y_v2)) << what << ": vs variant 2 bit for bit";
  } else {
    std::vector<double> v2d(y_v2.begin(), y_v2.end());
    EXPECT_LE(test::rel_l2(y_tma, std::span<const double>(v2d)), 1e-6) << what << ": vs variant 2";
  }
}

TEST(CudaGemvTma, FlashWidths) {
  DSV4_REQUIRE_CUDA();
  run_tma_case({32768, 1024, 1, 301, true});   // attn_q_b: 4-row stages
  run_tma_case({4096, 8192, 1, 302, false});   // attn_output_b: 1-row stages of 8.5 KiB, 2 per warp
  run_tma_case({1024, 4096, 8, 303, false});   // attn_output_a grouped: CTAs spanning two groups' activations
  run_tma_case({1024, 4096, 1, 304, false});   // attn_q_a: fewer rows than warps x SMs' worth of stages
  run_tma_case({4096, 2048, 1, 305, false});   // shared expert down
  run_tma_case({8, 1024, 1, 306, true});       // 8 rows: one CTA, one row per warp
  run_tma_case({13, 4096, 3, 307, false});     // odd rows, slots inside one CTA
}

TEST(CudaGemvTma, RejectsShapesOutsideTheKernel) {  // answers before any device call
  cuda::GemvParams p;
  uint8_t dummy[64] = {};
  float y[4];
  p.wtype = QType::Q8_0, p.layout = GemvLayout::Q8Split, p.w = dummy, p.xq = dummy, p.y = y, p.rows = 4;
  p.cols = 4096, p.n_slots = 1;
  EXPECT_TRUE(cuda::gemv_tma_supported(p));
  cuda::GemvParams q = p;
  q.layout = GemvLayout::Ggml;
  EXPECT_FALSE(cuda::gemv_tma_supported(q));
  q = p, q.cols = 1536;
  EXPECT_FALSE(cuda::gemv_tma_supported(q));
  q = p, q.n_tokens = 2;
  EXPECT_FALSE(cuda::gemv_tma_supported(q));
  q = p, q.n_slots = 2, q.expert_stride = 0;  // slots not contiguous
  EXPECT_FALSE(cuda::gemv_tma_supported(q));
  q = p, q.w = dummy + 2;  // misaligned
  EXPECT_FALSE(cuda::gemv_tma_supported(q));
  EXPECT_THROW(cuda::gemv_tma_cuda(q, nullptr), Error);
}

}  // namespace
}  // namespace dsv4
