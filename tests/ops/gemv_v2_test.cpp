// Dense GEMV variant 2 (src/backend/cuda/gemv_dense_v2.h, GemvParams::kernel 3 and 4) against the current kernels
// at Flash's dense decode widths, and its argument checks.
//
// Variant 2 forms the same per-unit products as the streaming kernel (exact dp4a integer dots times the same two
// scales in the same order; F16: the same 8-term fp32 expression), so against the current kernel on the SAME device
// activations only the fp32 order in which a row's units are added differs: rel-L2 <= 1e-6 over the output. Both
// kernels sum a row as short per-lane chains (<= 8 units) joined by a warp tree and a few parts, so the reordering
// moves an output by a few ulps of its partial sums (~1e-7 relative); a wrong unit, row, part or group moves it by
// ~1e-2 or more. Each launch is also checked against an independent reference (operands
// dequantized on the CPU, dot in double; rel-L2 <= 1e-5 as in gemv_test.cpp), so the two kernels cannot agree on a
// shared mistake. Outputs are NaN-poisoned first: every output must be written.
// The argument tests need no device (the checks run before any CUDA call), so they also run in CPU-only CI.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

#include "backend/cpu/cpu_backend.h"
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/gemv.h"
#include "backend/cuda/gemv_dense_v2.h"
#include "ops_common.h"
#include "quant/quant.h"

namespace dsv4 {
namespace {

using cuda::DeviceArray;
using cuda::GemvLayout;

// One case: G groups (G == 1: a plain dense matrix) of rows x cols; group g's rows follow group g-1's, and group g
// takes activation row g (attn_output_a's grouped form). The current path is what the backend runs today: the
// streaming kernel (kernel 1) for G == 1, the MoE-mode launch over ids 0..G-1 for G > 1.
void run_case(QType t, GemvLayout layout, int64_t rows, int64_t cols, int groups, uint64_t seed) {
  const bool split = layout == GemvLayout::Q8Split;
  const std::string what = qtype_name(t) + (split ? " split " : " ") + std::to_string(groups) + " x " +
                           std::to_string(rows) + "x" + std::to_string(cols);
  const auto w = test::random_weights(t, rows * groups, cols, seed);
  const auto x = test::random_normal(size_t(groups * cols), seed + 1);
  const int64_t drb = split ? cuda::q8_split_row_bytes(cols) : row_bytes(t, cols);

  DeviceArray<uint8_t> d_w{std::span<const uint8_t>(w)};
  if (split) {
    DeviceArray<uint8_t> d_split(size_t(rows * groups * drb));
    cuda::q8_0_split_cuda(d_w.get(), rows * groups, cols, d_split.get(), nullptr);
    d_w = std::move(d_split);
  }
  DeviceArray<float> d_x{std::span<const float>(x)};
  DeviceArray<uint8_t> d_xq(size_t(groups * cuda::gpu_activation_bytes(t, cols, layout)));
  cuda::quantize_activations_cuda(t, d_x.get(), groups, cols, d_xq.get(), nullptr, layout);
  std::vector<int32_t> ids(static_cast<size_t>(groups), 0);
  for (int g = 0; g < groups; ++g) ids[size_t(g)] = g;
  DeviceArray<int32_t> d_ids{std::span<const int32_t>(ids)};

  cuda::GemvParams p;
  p.wtype = t, p.layout = layout, p.w = d_w.get(), p.rows = rows, p.cols = cols, p.xq = d_xq.get();
  p.n_slots = groups, p.expert_stride = rows * drb;
  DeviceArray<float> d_cur(size_t(groups * rows));
  d_cur.fill_bytes(0xFF);
  cuda::GemvParams cur = p;
  cur.y = d_cur.get();
  if (groups > 1) cur.expert_ids = d_ids.get();
  else cur.kernel = 1;
  cuda::gemv_cuda(cur, nullptr);
  cuda::check(cudaDeviceSynchronize(), (what + " current").c_str());
  const auto y_cur = d_cur.download();

  // Independent reference: dequantized operands, double dot.
  std::vector<double> ref(size_t(groups * rows));
  std::vector<float> wrow(static_cast<size_t>(cols)), xdeq(static_cast<size_t>(cols));
  std::vector<uint8_t> xq(static_cast<size_t>(activation_bytes(t, cols)));
  const int64_t rb = row_bytes(t, cols);
  for (int g = 0; g < groups; ++g) {
    quantize_activation(t, &x[size_t(g * cols)], xq.data(), cols);
    dequantize_row(activation_type(t), xq.data(), xdeq.data(), cols);
    for (int64_t r = 0; r < rows; ++r) {
      dequantize_row(t, &w[size_t((g * rows + r) * rb)], wrow.data(), cols);
      double s = 0;
      for (int64_t i = 0; i < cols; ++i) s += double(wrow[size_t(i)]) * double(xdeq[size_t(i)]);
      ref[size_t(g * rows + r)] = s;
    }
  }
  EXPECT_LE(test::rel_l2(y_cur, ref), 1e-5) << what << " current kernel vs double reference";

  for (const int kernel : {cuda::kGemvKernelV2, cuda::kGemvKernelV2Pdl}) {
    const std::string name = what + " kernel=" + std::to_string(kernel);
    DeviceArray<float> d_y(size_t(groups * rows));
    d_y.fill_bytes(0xFF);
    cuda::GemvParams v = p;
    v.y = d_y.get(), v.kernel = kernel;
    ASSERT_TRUE(cuda::gemv_v2_supported(v)) << name;  // with its output set (a null y is rejected)
    cuda::gemv_cuda(v, nullptr);
    cuda::check(cudaDeviceSynchronize(), name.c_str());
    const auto y = d_y.download();
    bool finite = true;
    for (float f : y) finite = finite && std::isfinite(f);
    EXPECT_TRUE(finite) << name << ": an output was not written";
    EXPECT_LE(test::rel_l2(y, y_cur), 1e-6) << name << " vs the current kernel";
    EXPECT_LE(test::rel_l2(y, ref), 1e-5) << name << " vs double reference";
  }
}

// Flash's dense decode GEMVs, split layout (what the backend uploads): q_a (2 parts per row), kv (4 parts), q_b (4
// rows per warp), o_b (2 parts, several tiles per CTA), output_a grouped 8 x (4096 -> 1024), plus rows that leave the
// last tile partial. (Rows per warp and parts follow the SM count: the comments are for 132 SMs.)
TEST(CudaGemvV2, SplitFlashWidths) {
  DSV4_REQUIRE_CUDA();
  const auto s = GemvLayout::Q8Split;
  run_case(QType::Q8_0, s, 1024, 4096, 1, 11);   // attn_q_a
  run_case(QType::Q8_0, s, 512, 4096, 1, 12);    // attn_kv
  run_case(QType::Q8_0, s, 32768, 1024, 1, 13);  // attn_q_b
  run_case(QType::Q8_0, s, 4096, 8192, 1, 14);   // attn_output_b
  run_case(QType::Q8_0, s, 1024, 4096, 8, 15);   // attn_output_a, grouped
  run_case(QType::Q8_0, s, 32764, 1024, 1, 16);  // partial last tile at 4 rows per warp
  run_case(QType::Q8_0, s, 1002, 4096, 1, 17);   // partial last tile with parts
  run_case(QType::Q8_0, s, 4000, 1024, 1, 18);   // 2 rows per warp (on a 132-SM card)
}

// The 34-byte block layout (Q8_0 with cols % 256 != 0 stays in it) and F16 (compressor, indexer, HC widths).
TEST(CudaGemvV2, BlockLayoutAndF16) {
  DSV4_REQUIRE_CUDA();
  const auto g = GemvLayout::Ggml;
  run_case(QType::Q8_0, g, 1024, 4096, 1, 21);
  run_case(QType::Q8_0, g, 4096, 8192, 1, 22);
  run_case(QType::Q8_0, g, 1000, 4128, 1, 23);  // cols % 256 != 0, partial tiles
  run_case(QType::Q8_0, g, 1024, 4096, 8, 24);  // grouped
  run_case(QType::Q8_0, g, 32768, 1024, 1, 28); // 2 rows per warp (128 units per row)
  run_case(QType::F16, g, 1024, 4096, 1, 25);   // compressor kv + gate
  run_case(QType::F16, g, 256, 4096, 1, 26);    // 8 parts per row
  run_case(QType::F16, g, 24, 16384, 1, 27);    // HC control: 8 parts per row, one tile per CTA
}

// ---- float mode (GemvParams::xf: the activation row quantized inside the launch) ---------------------------------

// Restores an environment variable on scope exit.
struct EnvVarGuard {
  const char* name;
  bool had = false;
  std::string saved;
  explicit EnvVarGuard(const char* n) : name(n) {
    const char* v = std::getenv(name);
    had = v != nullptr, saved = v ? v : "";
  }
  ~EnvVarGuard() {
    if (had) setenv(name, saved.c_str(), 1);
    else unsetenv(name);
  }
  void set(const char* v) {
    if (v) setenv(name, v, 1);
    else unsetenv(name);
  }
};

// A random activation row with blocks (32 values) that stress the quantize rule: exact halves after scaling
// (amax 127 gives d = 1, so v * id = v: roundf rounds 2.5 to 3, a round-to-even would give 2), just below a half
// (0.49999997), an all-zero block (d = 0), one tiny value among zeros (its f16 scale rounds to 0), large values,
// and blocks whose amax is negative. Rows shorter than 8 blocks get the random part only.
std::vector<float> xf_row(int64_t cols, uint64_t seed) {
  std::vector<float> x = test::random_normal(size_t(cols), seed);
  if (cols < 8 * 32) return x;
  const float halves[] = {127.0f, -2.5f, 2.5f, 0.5f, -0.5f, 1.5f, -1.5f, 3.5f, 126.5f, -126.5f, 0.49999997f,
                          -0.49999997f, 64.5f, -64.5f, 100.5f, 7.5f};
  for (int i = 0; i < 32; ++i) x[size_t(i)] = halves[i % 16] * (i < 16 ? 1.0f : -1.0f);
  for (int i = 32; i < 64; ++i) x[size_t(i)] = 0.0f;
  for (int i = 64; i < 96; ++i) x[size_t(i)] = i == 70 ? 1e-30f : 0.0f;
  for (int i = 96; i < 128; ++i) x[size_t(i)] *= 1e5f;  // d ~ 3e3: still finite in f16 (the stored scale)
  for (int i = 128; i < 160; ++i) x[size_t(i)] = i == 140 ? -1000.0f : x[size_t(i)];
  // amax 127 from a negative value, then halves -14.5 .. 15.5: all ties at d = 1.
  for (int i = 160; i < 192; ++i) x[size_t(i)] = i == 160 ? -127.0f : float(i - 176) + 0.5f;
  return x;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// One dense split-layout matrix (rows x cols) over one row: variant 2 with p.xq (the separate quantize launch's
// bytes) vs p.xf, kernels 3 and 4, both float-mode CTA shapes (DSV4_CUDA_GEMV_XF unset: one CTA of 24 warps per
// SM; 3: three of 8). The plan (parts, rows per warp) does not depend on the mode, so the outputs must be equal
// bit for bit: one quantized byte or scale off moves a row's sum. Also against the double reference (1e-5), so the
// two modes cannot share a mistake. Outputs are NaN-poisoned first: every output must be written.
void xf_case(int64_t rows, int64_t cols, uint64_t seed) {
  const std::string what = "xf " + std::to_string(rows) + "x" + std::to_string(cols);
  const auto w = test::random_weights(QType::Q8_0, rows, cols, seed);
  const auto x = xf_row(cols, seed + 1);
  const int64_t drb = cuda::q8_split_row_bytes(cols);
  DeviceArray<uint8_t> d_w{std::span<const uint8_t>(w)};
  DeviceArray<uint8_t> d_split(size_t(rows * drb));
  cuda::q8_0_split_cuda(d_w.get(), rows, cols, d_split.get(), nullptr);
  DeviceArray<float> d_x{std::span<const float>(x)};
  DeviceArray<uint8_t> d_xq(size_t(cuda::gpu_activation_bytes(QType::Q8_0, cols, GemvLayout::Q8Split)));
  cuda::quantize_activations_cuda(QType::Q8_0, d_x.get(), 1, cols, d_xq.get(), nullptr, GemvLayout::Q8Split);
  cuda::check(cudaDeviceSynchronize(), (what + " setup").c_str());

  std::vector<double> ref(static_cast<size_t>(rows));
  {
    std::vector<float> wrow(static_cast<size_t>(cols)), xdeq(static_cast<size_t>(cols));
    std::vector<uint8_t> xq(static_cast<size_t>(activation_bytes(QType::Q8_0, cols)));
    quantize_activation(QType::Q8_0, x.data(), xq.data(), cols);
    dequantize_row(QType::Q8_0, xq.data(), xdeq.data(), cols);
    const int64_t rb = row_bytes(QType::Q8_0, cols);
    for (int64_t r = 0; r < rows; ++r) {
      dequantize_row(QType::Q8_0, &w[size_t(r * rb)], wrow.data(), cols);
      double acc = 0;
      for (int64_t i = 0; i < cols; ++i) acc += double(wrow[size_t(i)]) * double(xdeq[size_t(i)]);
      ref[size_t(r)] = acc;
    }
  }
  EnvVarGuard env("DSV4_CUDA_GEMV_XF");
  for (const int kernel : {cuda::kGemvKernelV2, cuda::kGemvKernelV2Pdl}) {
    auto run = [&](bool xf, const char* shape) {
      env.set(shape);
      DeviceArray<float> d_y(static_cast<size_t>(rows));
      d_y.fill_bytes(0xFF);
      cuda::GemvParams p;
      p.wtype = QType::Q8_0, p.layout = GemvLayout::Q8Split, p.w = d_split.get(), p.rows = rows, p.cols = cols;
      p.y = d_y.get(), p.kernel = kernel;
      if (xf) p.xf = d_x.get();
      else p.xq = d_xq.get();
      EXPECT_TRUE(cuda::gemv_v2_supported(p)) << what;
      cuda::gemv_cuda(p, nullptr);
      cuda::check(cudaDeviceSynchronize(), what.c_str());
      return d_y.download();
    };
    const std::string k = what + " kernel=" + std::to_string(kernel);
    const auto y_xq = run(false, nullptr);
    EXPECT_LE(test::rel_l2(y_xq, ref), 1e-5) << k << " xq vs double reference";
    for (const char* shape : {static_cast<const char*>(nullptr), "3"}) {
      const auto y_xf = run(true, shape);
      const std::string name = k + " DSV4_CUDA_GEMV_XF=" + (shape ? shape : "unset");
      EXPECT_TRUE(same_bits(y_xf, y_xq)) << name << ": float mode differs from the xq launch (rel-L2 "
                                         << test::rel_l2(y_xf, y_xq) << ")";
      EXPECT_LE(test::rel_l2(y_xf, ref), 1e-5) << name << " vs double reference";
    }
  }
}

// Flash's dense split-layout widths: o_b (the launch this mode is for: 8192 columns, 2 parts per row), q_b (1024
// columns, 4 rows per warp), q_a (4096, 2 parts), kv; a partial last tile; and the smallest split row (256).
TEST(CudaGemvV2, FloatModeBitIdentical) {
  DSV4_REQUIRE_CUDA();
  xf_case(4096, 8192, 81);   // attn_output_b
  xf_case(32768, 1024, 82);  // attn_q_b
  xf_case(1024, 4096, 83);   // attn_q_a
  xf_case(512, 4096, 84);    // attn_kv
  xf_case(1002, 4096, 85);   // partial last tile with parts
  xf_case(4000, 1024, 86);   // 2 rows per warp
  xf_case(96, 256, 87);      // one unit per lane
}

// gemv_v2_multi_cuda in float mode (q_a + kv over one row: 3 slots of 512 rows, every slot reading row 0) vs the
// same launch with xq: bit for bit, both CTA shapes.
TEST(CudaGemvV2, FloatModeMultiBitIdentical) {
  DSV4_REQUIRE_CUDA();
  const int64_t cols = 4096, rows_a = 1024, rows_b = 512;
  const int64_t drb = cuda::q8_split_row_bytes(cols);
  auto split = [&](int64_t rows, uint64_t seed) {
    const auto w = test::random_weights(QType::Q8_0, rows, cols, seed);
    DeviceArray<uint8_t> d_w{std::span<const uint8_t>(w)};
    DeviceArray<uint8_t> d_split(size_t(rows * drb));
    cuda::q8_0_split_cuda(d_w.get(), rows, cols, d_split.get(), nullptr);
    cuda::check(cudaDeviceSynchronize(), "multi split");
    return d_split;
  };
  DeviceArray<uint8_t> wa = split(rows_a, 91), wb = split(rows_b, 92);
  const auto x = xf_row(cols, 93);
  DeviceArray<float> d_x{std::span<const float>(x)};
  DeviceArray<uint8_t> d_xq(size_t(cuda::gpu_activation_bytes(QType::Q8_0, cols, GemvLayout::Q8Split)));
  cuda::quantize_activations_cuda(QType::Q8_0, d_x.get(), 1, cols, d_xq.get(), nullptr, GemvLayout::Q8Split);
  EnvVarGuard env("DSV4_CUDA_GEMV_XF");
  auto run = [&](bool xf, const char* shape) {
    env.set(shape);
    DeviceArray<float> ya(static_cast<size_t>(rows_a)), yb(static_cast<size_t>(rows_b));
    ya.fill_bytes(0xFF), yb.fill_bytes(0xFF);
    cuda::GemvParams g;
    g.wtype = QType::Q8_0, g.layout = GemvLayout::Q8Split, g.cols = cols, g.kernel = cuda::kGemvKernelV2Pdl;
    if (xf) g.xf = d_x.get();
    else g.xq = d_xq.get();
    const cuda::GemvV2Part parts[] = {{wa.get(), ya.get(), rows_a}, {wb.get(), yb.get(), rows_b}};
    EXPECT_TRUE(cuda::gemv_v2_multi_cuda(g, parts, nullptr)) << "multi launch refused (xf " << xf << ")";
    cuda::check(cudaDeviceSynchronize(), "multi");
    std::vector<float> y = ya.download();
    const auto b = yb.download();
    y.insert(y.end(), b.begin(), b.end());
    return y;
  };
  const auto y_xq = run(false, nullptr);
  bool finite = true;
  for (float f : y_xq) finite = finite && std::isfinite(f);
  EXPECT_TRUE(finite) << "xq multi: an output was not written";
  for (const char* shape : {static_cast<const char*>(nullptr), "3"})
    EXPECT_TRUE(same_bits(run(true, shape), y_xq))
        << "multi float mode, DSV4_CUDA_GEMV_XF=" << (shape ? shape : "unset");
}

// Argument checks: host-only (fake, aligned device addresses that are never dereferenced).
cuda::GemvParams valid_split() {
  cuda::GemvParams p;
  p.wtype = QType::Q8_0, p.layout = GemvLayout::Q8Split, p.rows = 1024, p.cols = 4096;
  p.w = reinterpret_cast<const void*>(uintptr_t(1) << 20);
  p.xq = reinterpret_cast<const void*>(uintptr_t(2) << 20);
  p.y = reinterpret_cast<float*>(uintptr_t(3) << 20);
  p.kernel = cuda::kGemvKernelV2;
  return p;
}

// Float mode's argument checks (host-only, as RejectsBadArguments below): valid_split's launch with the float row
// (xf instead of xq) at 4096 x 8192 and PDL.
cuda::GemvParams valid_xf() {
  cuda::GemvParams p = valid_split();
  p.rows = 4096, p.cols = 8192;
  p.xq = nullptr;
  p.xf = reinterpret_cast<const float*>(uintptr_t(2) << 20);
  p.kernel = cuda::kGemvKernelV2Pdl;
  return p;
}

void expect_rejected(const cuda::GemvParams& p, const char* why) {
  EXPECT_FALSE(cuda::gemv_v2_supported(p)) << why;
  try {
    cuda::gemv_cuda(p, nullptr);  // kernel 3/4 routes to gemv_v2_cuda, which must refuse before any CUDA call
    ADD_FAILURE() << why << ": accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("gemv_v2_cuda"), std::string::npos) << why << ": " << e.what();
  }
}

TEST(CudaGemvV2, RejectsBadArguments) {
  EXPECT_TRUE(cuda::gemv_v2_supported(valid_split()));
  cuda::GemvParams p = valid_split();
  p.n_tokens = 2;
  expect_rejected(p, "two tokens");
  p = valid_split();
  p.expert_ids = reinterpret_cast<const int32_t*>(uintptr_t(4) << 20), p.n_slots = 8;
  expect_rejected(p, "device expert ids");
  p = valid_split();
  p.w2 = p.w, p.y2 = p.y;
  expect_rejected(p, "paired launch");
  p = valid_split();
  p.wtype = QType::Q2_K, p.layout = GemvLayout::Ggml;
  expect_rejected(p, "Q2_K");
  p = valid_split();
  p.cols = 4128;  // the split layout needs cols % 256 == 0
  expect_rejected(p, "split cols");
  p = valid_split();
  p.cols = 65536;  // 4096 units per row > 8 parts x 32 lanes x 8
  expect_rejected(p, "row too long");
  p = valid_split();
  p.xq = reinterpret_cast<const void*>((uintptr_t(2) << 20) + 4);
  expect_rejected(p, "misaligned activations");
  p = valid_split();
  p.expert_stride = 8, p.n_slots = 2;
  expect_rejected(p, "misaligned group stride");
  p = valid_split();
  p.rows = 0;
  expect_rejected(p, "no rows");
  p = valid_split();
  p.y = nullptr;
  expect_rejected(p, "no output");
  p = valid_split();
  p.wtype = QType::F16, p.layout = GemvLayout::Ggml, p.cols = 4100;
  expect_rejected(p, "F16 cols % 8");
  p.cols = 4096;
  EXPECT_TRUE(cuda::gemv_v2_supported(p)) << "F16 4096";
  p.wtype = QType::Q8_0, p.cols = 4128, p.w = reinterpret_cast<const void*>((uintptr_t(1) << 20) + 2);
  EXPECT_TRUE(cuda::gemv_v2_supported(p)) << "block Q8_0 needs only 2-byte alignment";
}

TEST(CudaGemvV2, FloatModeRejectsBadArguments) {
  EXPECT_TRUE(cuda::gemv_v2_supported(valid_xf()));
  cuda::GemvParams p = valid_xf();
  p.n_slots = 3, p.act_slot_div = 3;  // grouped over one shared row (gemv_v2_multi_cuda's form)
  EXPECT_TRUE(cuda::gemv_v2_supported(p)) << "slots sharing row 0";
  p = valid_xf();
  p.n_slots = 8, p.act_slot_div = 1, p.rows = 1024, p.cols = 4096;
  expect_rejected(p, "a row per slot (attn_output_a's grouped form)");
  p = valid_xf();
  p.xq = reinterpret_cast<const void*>(uintptr_t(4) << 20);
  expect_rejected(p, "both xq and xf");
  p = valid_xf();
  p.xf = reinterpret_cast<const float*>((uintptr_t(2) << 20) + 4);
  expect_rejected(p, "misaligned float activations");
  p = valid_xf();
  p.cols = 8448;  // over the shared-memory budget
  expect_rejected(p, "float row too long");
  p = valid_xf();
  p.layout = GemvLayout::Ggml, p.cols = 4096;
  expect_rejected(p, "block layout");
  p = valid_xf();
  p.wtype = QType::F16, p.layout = GemvLayout::Ggml, p.cols = 4096;
  expect_rejected(p, "F16");
  p = valid_xf();
  p.xf = nullptr;
  expect_rejected(p, "no activations");
}

TEST(CudaGemvV2, FloatModeEnvKnobParsing) {
  EnvVarGuard env("DSV4_CUDA_GEMV_XF");
  env.set(nullptr);
  EXPECT_EQ(cuda::gemv_xf_env(), cuda::kGemvXfOff);  // the default (measured slower on: gemv_dense_v2.cu)
  env.set("1");
  EXPECT_EQ(cuda::gemv_xf_env(), cuda::kGemvXfOneCta);
  env.set("3");
  EXPECT_EQ(cuda::gemv_xf_env(), cuda::kGemvXfThreeCtas);
  env.set("0");
  EXPECT_EQ(cuda::gemv_xf_env(), cuda::kGemvXfOff);
  env.set("2");
  EXPECT_THROW(cuda::gemv_xf_env(), Error);
}

// Restores DSV4_CUDA_GEMV_KERNEL on scope exit.
struct EnvGuard : EnvVarGuard {
  EnvGuard() : EnvVarGuard("DSV4_CUDA_GEMV_KERNEL") {}
};

TEST(CudaGemvV2, EnvKnobParsing) {
  EnvGuard env;
  env.set(nullptr);
  EXPECT_EQ(cuda::gemv_dense_kernel_env(), cuda::kGemvKernelV2Pdl);  // the default
  env.set("0");
  EXPECT_EQ(cuda::gemv_dense_kernel_env(), 0);
  env.set("3");
  EXPECT_EQ(cuda::gemv_dense_kernel_env(), cuda::kGemvKernelV2);
  env.set("4");
  EXPECT_EQ(cuda::gemv_dense_kernel_env(), cuda::kGemvKernelV2Pdl);
  env.set("2");
  EXPECT_THROW(cuda::gemv_dense_kernel_env(), Error);
}

// The backend plumbing: matmul (dmatmul's GEMV path) and matmul_grouped at T = 1 with DSV4_CUDA_GEMV_KERNEL unset,
// 3 and 4 on one CUDA backend (same cached device activations), against each other (1e-6: summation order) and
// the CPU backend (1e-5, as backend_test.cpp). Q8_0 at 4096 and 512 columns is uploaded in the split layout.
struct HostTensor {
  std::vector<uint8_t> bytes;
  WeightView view;
};
HostTensor host_tensor(QType t, int64_t cols, int64_t rows, uint64_t seed, const char* name) {
  HostTensor h;
  h.bytes = test::random_weights(t, rows, cols, seed);
  h.view.type = t, h.view.data = h.bytes.data(), h.view.n_bytes = h.bytes.size(), h.view.name = name;
  h.view.ne[0] = cols, h.view.ne[1] = rows, h.view.ne[2] = 1, h.view.n_dims = 2;
  return h;
}
std::vector<float> backend_run(Backend& be, const WeightView& w, int groups, const std::vector<float>& x) {
  DeviceBuffer bx = be.alloc(x.size() * sizeof(float));
  be.upload(bx.data(), x.data(), x.size() * sizeof(float));
  const size_t n = size_t(w.ne[1]);
  DeviceBuffer by = be.alloc(n * sizeof(float));
  if (groups > 1) be.matmul_grouped(w, groups, bx.f32(), 1, by.f32());
  else be.matmul(w, -1, bx.f32(), 1, by.f32());
  std::vector<float> y(n);
  be.download(y.data(), by.data(), n * sizeof(float));
  return y;
}

TEST(CudaGemvV2, BackendKnob) {
  DSV4_REQUIRE_CUDA();
  EnvGuard env;
  std::vector<HostTensor> keep;  // outlive the backends (device copies are cached by host address)
  keep.push_back(host_tensor(QType::Q8_0, 4096, 1024, 31, "attn_q_a"));
  keep.push_back(host_tensor(QType::F16, 4096, 256, 32, "compressor"));
  keep.push_back(host_tensor(QType::Q8_0, 512, 4 * 256, 33, "attn_output_a"));  // 4 groups of 512 -> 256
  const int groups[] = {1, 1, 4};
  std::unique_ptr<Backend> cpu = make_cpu_backend(), gpu = make_cuda_backend();
  for (size_t i = 0; i < keep.size(); ++i) {
    const WeightView& w = keep[i].view;
    const auto x = test::random_normal(size_t(w.ne[0] * groups[i]), 40 + i);
    const std::string what = std::string(w.name) + " " + qtype_name(w.type);
    env.set("0");  // the streaming kernels (the default before variant 2 with PDL)
    const auto y_default = backend_run(*gpu, w, groups[i], x);
    const auto y_cpu = backend_run(*cpu, w, groups[i], x);
    EXPECT_LE(test::rel_l2(y_default, y_cpu), 1e-5) << what << " streaming kernels vs CPU";
    for (const char* k : {"3", "4", static_cast<const char*>(nullptr)}) {
      env.set(k);
      const auto y = backend_run(*gpu, w, groups[i], x);
      EXPECT_LE(test::rel_l2(y, y_default), 1e-6) << what << " DSV4_CUDA_GEMV_KERNEL=" << (k ? k : "unset") << " vs streaming";
      EXPECT_LE(test::rel_l2(y, y_cpu), 1e-5) << what << " DSV4_CUDA_GEMV_KERNEL=" << (k ? k : "unset") << " vs CPU";
    }
  }
}

// matmul_multi at T = 1: one launch for attn_q_a + attn_kv (split Q8_0, 1024 + 512 rows: 3 slots of 512), a
// compressor's kv + gate (F16), the indexer's kv + gate + proj (F16, 256 + 256 + 64 rows: 9 slots of 64), and a set
// that cannot share a launch (different widths: one matmul each). Each output against the same backend's single
// matmul (1e-6 rel-L2: only the fp32 order of a row's parts may differ) and the CPU backend (1e-5, as above).
// The CPU backend's matmul_multi is the default (one matmul each), so it is also the twin.
TEST(CudaGemvV2, MatmulMulti) {
  DSV4_REQUIRE_CUDA();
  EnvGuard env;
  env.set(nullptr);
  struct Set {
    std::vector<HostTensor> t;
    int64_t cols;
  };
  std::vector<Set> sets;
  sets.push_back({{}, 4096});
  sets.back().t.push_back(host_tensor(QType::Q8_0, 4096, 1024, 51, "attn_q_a"));
  sets.back().t.push_back(host_tensor(QType::Q8_0, 4096, 512, 52, "attn_kv"));
  sets.push_back({{}, 4096});
  sets.back().t.push_back(host_tensor(QType::F16, 4096, 1024, 53, "attn_compressor_kv"));
  sets.back().t.push_back(host_tensor(QType::F16, 4096, 1024, 54, "attn_compressor_gate"));
  sets.push_back({{}, 4096});
  sets.back().t.push_back(host_tensor(QType::F16, 4096, 256, 55, "indexer_compressor_kv"));
  sets.back().t.push_back(host_tensor(QType::F16, 4096, 256, 56, "indexer_compressor_gate"));
  sets.back().t.push_back(host_tensor(QType::F16, 4096, 64, 57, "indexer.proj"));
  sets.push_back({{}, 512});  // q8 512 wide + F16 512 wide: different types, two matmuls
  sets.back().t.push_back(host_tensor(QType::Q8_0, 512, 256, 58, "q8_512"));
  sets.back().t.push_back(host_tensor(QType::F16, 512, 128, 59, "f16_512"));
  std::unique_ptr<Backend> cpu = make_cpu_backend(), gpu = make_cuda_backend();
  for (size_t si = 0; si < sets.size(); ++si) {
    const Set& set = sets[si];
    const auto x = test::random_normal(size_t(set.cols), 60 + si);
    auto run_multi = [&](Backend& be) {
      DeviceBuffer bx = be.alloc(x.size() * sizeof(float));
      be.upload(bx.data(), x.data(), x.size() * sizeof(float));
      std::vector<DeviceBuffer> ys;
      for (const HostTensor& h : set.t) ys.push_back(be.alloc(size_t(h.view.ne[1]) * sizeof(float)));
      const size_t n = set.t.size();
      auto out = [&](size_t i) { return Backend::MatmulOut{&set.t[i].view, ys[i].f32()}; };
      if (n == 2) be.matmul_multi({out(0), out(1)}, bx.f32(), 1);
      else be.matmul_multi({out(0), out(1), out(2)}, bx.f32(), 1);
      std::vector<std::vector<float>> r;
      for (size_t i = 0; i < n; ++i) {
        r.emplace_back(size_t(set.t[i].view.ne[1]));
        be.download(r.back().data(), ys[i].data(), r.back().size() * sizeof(float));
      }
      return r;
    };
    const auto multi = run_multi(*gpu);
    const auto multi_cpu = run_multi(*cpu);
    for (size_t i = 0; i < set.t.size(); ++i) {
      const WeightView& w = set.t[i].view;
      const auto single = backend_run(*gpu, w, 1, x);
      const auto ref = backend_run(*cpu, w, 1, x);
      EXPECT_LE(test::rel_l2(multi[i], single), 1e-6) << w.name << ": one launch vs its own matmul";
      EXPECT_LE(test::rel_l2(multi[i], ref), 1e-5) << w.name << ": one launch vs CPU";
      EXPECT_EQ(multi_cpu[i], ref) << w.name << ": the CPU default is one matmul each";
    }
  }
}

// The side line (Backend::begin_side, decode): F16 products on the side stream beside Q8_0 products on the main
// line, then one more F16 product appended to the open side line that reads a main-line output, joined, give the
// same bits as the same calls in order (DSV4_CUDA_SIDE=0 is the in-order
// path; here the order is the comparison); a Q8_0 product issued on the side line leaves it (it would share the
// activation cache) and still gives its bits. Repeated 20 times to give a missing dependency a chance to show.
TEST(CudaGemvV2, SideLineKeepsResults) {
  DSV4_REQUIRE_CUDA();
  EnvGuard env;
  env.set(nullptr);
  std::vector<HostTensor> t;
  t.push_back(host_tensor(QType::F16, 4096, 1024, 71, "attn_compressor_kv"));
  t.push_back(host_tensor(QType::F16, 4096, 1024, 72, "attn_compressor_gate"));
  t.push_back(host_tensor(QType::Q8_0, 4096, 1024, 73, "attn_q_a"));
  t.push_back(host_tensor(QType::Q8_0, 4096, 512, 74, "attn_kv"));
  t.push_back(host_tensor(QType::Q8_0, 4096, 512, 75, "side_q8"));
  t.push_back(host_tensor(QType::F16, 1024, 2048, 77, "indexer.attn_q_b"));  // reads attn_q_a's output
  std::unique_ptr<Backend> gpu = make_cuda_backend();
  const auto x = test::random_normal(4096, 76);
  DeviceBuffer bx = gpu->alloc(x.size() * sizeof(float));
  gpu->upload(bx.data(), x.data(), x.size() * sizeof(float));
  std::vector<DeviceBuffer> ys;
  for (const HostTensor& h : t) ys.push_back(gpu->alloc(size_t(h.view.ne[1]) * sizeof(float)));
  auto out = [&](size_t i) { return Backend::MatmulOut{&t[i].view, ys[i].f32()}; };
  auto get_all = [&] {
    std::vector<std::vector<float>> r;
    for (size_t i = 0; i < t.size(); ++i) {
      r.emplace_back(size_t(t[i].view.ne[1]));
      gpu->download(r.back().data(), ys[i].data(), r.back().size() * sizeof(float));
    }
    return r;
  };
  gpu->matmul_multi({out(0), out(1)}, bx.f32(), 1);
  gpu->matmul_multi({out(2), out(3)}, bx.f32(), 1);
  gpu->matmul(t[5].view, -1, ys[2].f32(), 1, ys[5].f32());
  gpu->matmul(t[4].view, -1, bx.f32(), 1, ys[4].f32());
  const auto in_order = get_all();
  for (int rep = 0; rep < 20; ++rep) {
    for (DeviceBuffer& y : ys) gpu->fill(y.f32(), std::nanf(""), y.bytes() / sizeof(float));
    gpu->begin_side(1);
    gpu->matmul_multi({out(0), out(1)}, bx.f32(), 1);
    gpu->end_side();
    gpu->matmul_multi({out(2), out(3)}, bx.f32(), 1);
    gpu->begin_side(1);  // appended to the open side line, after the main line's q_a + kv
    gpu->matmul(t[5].view, -1, ys[2].f32(), 1, ys[5].f32());  // reads q_a's output
    gpu->end_side();
    gpu->join_side();
    gpu->begin_side(1);
    gpu->matmul(t[4].view, -1, bx.f32(), 1, ys[4].f32());  // Q8_0 on the side line: leaves it first
    gpu->end_side();
    gpu->join_side();
    const auto r = get_all();
    for (size_t i = 0; i < t.size(); ++i) ASSERT_EQ(r[i], in_order[i]) << t[i].view.name << " rep " << rep;
  }
}

// The backend's float mode (dmatmul and matmul_multi at T = 1 on a split-layout input nobody quantized): y with
// DSV4_CUDA_GEMV_XF unset (quantized inside the GEMV) and =3 (three CTAs per SM) equals y with =0 (the separate
// quantize launch) bit for bit, and the CPU backend to 1e-5. Each run uploads its input into a fresh allocation
// (backend_run; a freed block drops every cached activation), so no run can reuse another's quantized row.
TEST(CudaGemvV2, BackendFloatModeKnob) {
  DSV4_REQUIRE_CUDA();
  EnvVarGuard xf_env("DSV4_CUDA_GEMV_XF");
  EnvGuard kernel_env;
  kernel_env.set(nullptr);
  std::vector<HostTensor> keep;
  keep.push_back(host_tensor(QType::Q8_0, 8192, 4096, 101, "attn_output_b"));
  keep.push_back(host_tensor(QType::Q8_0, 4096, 1024, 102, "attn_q_a"));
  keep.push_back(host_tensor(QType::Q8_0, 1024, 2048, 103, "attn_q_b (part)"));
  std::unique_ptr<Backend> cpu = make_cpu_backend(), gpu = make_cuda_backend();
  for (size_t i = 0; i < keep.size(); ++i) {
    const WeightView& w = keep[i].view;
    const auto x = xf_row(w.ne[0], 110 + i);
    xf_env.set("0");
    const auto y_sep = backend_run(*gpu, w, 1, x);
    EXPECT_LE(test::rel_l2(y_sep, backend_run(*cpu, w, 1, x)), 1e-5) << w.name << " separate quantize vs CPU";
    for (const char* v : {static_cast<const char*>(nullptr), "1", "3"}) {
      xf_env.set(v);
      EXPECT_TRUE(same_bits(backend_run(*gpu, w, 1, x), y_sep))
          << w.name << " DSV4_CUDA_GEMV_XF=" << (v ? v : "unset") << " vs =0";
    }
  }
  // matmul_multi: q_a + kv in one launch.
  std::vector<HostTensor> multi;
  multi.push_back(host_tensor(QType::Q8_0, 4096, 1024, 121, "attn_q_a"));
  multi.push_back(host_tensor(QType::Q8_0, 4096, 512, 122, "attn_kv"));
  const auto x = xf_row(4096, 123);
  auto run_multi = [&] {
    DeviceBuffer bx = gpu->alloc(x.size() * sizeof(float));
    gpu->upload(bx.data(), x.data(), x.size() * sizeof(float));
    DeviceBuffer ya = gpu->alloc(1024 * sizeof(float)), yb = gpu->alloc(512 * sizeof(float));
    gpu->fill(ya.f32(), std::nanf(""), 1024), gpu->fill(yb.f32(), std::nanf(""), 512);
    gpu->matmul_multi({{&multi[0].view, ya.f32()}, {&multi[1].view, yb.f32()}}, bx.f32(), 1);
    std::vector<float> y(1024 + 512);
    gpu->download(y.data(), ya.data(), 1024 * sizeof(float));
    gpu->download(y.data() + 1024, yb.data(), 512 * sizeof(float));
    return y;
  };
  xf_env.set("0");
  const auto y_sep = run_multi();
  std::vector<float> y_ref = backend_run(*cpu, multi[0].view, 1, x);
  const auto ref_b = backend_run(*cpu, multi[1].view, 1, x);
  y_ref.insert(y_ref.end(), ref_b.begin(), ref_b.end());
  EXPECT_LE(test::rel_l2(y_sep, y_ref), 1e-5) << "matmul_multi separate quantize vs CPU";
  for (const char* v : {static_cast<const char*>(nullptr), "3"}) {
    xf_env.set(v);
    EXPECT_TRUE(same_bits(run_multi(), y_sep)) << "matmul_multi DSV4_CUDA_GEMV_XF=" << (v ? v : "unset") << " vs =0";
  }
}

}  // namespace
}  // namespace dsv4
