// The decode MoE launches added for issue #5 against CPU twins, at Flash widths (D 4096, F 2048, 256 experts,
// k 6; IQ2_XXS gate/up + Q2_K down routed experts, Q8_0 shared expert, F16 router):
//   - moe_route_fused_cuda (router projection + routing in one launch, moe.h) vs a double-precision router
//     projection and the CPU's scoring/selection code (cpu::sqrt_softplus, cpu::route_topk / route_weights);
//     and, bit for bit, vs moe_route_cuda run on the fused launch's own logits (the shared selection code).
//   - moe_gate_up_swiglu_cuda for the Q8_0 shared expert (one slot, no ids; block and split layouts) vs double
//     dots of the dequantized operands.
//   - moe_down_sum_cuda with float input rows (GemvParams::xf, quantized in the launch) vs the same launch on
//     quantize_activations_cuda rows (bit for bit) and vs double dots (rel-L2 1e-5, as gemv_test).
//   - the CUDA backend's one-token moe_route + moe_ffn (fused router, shared expert on the side stream) vs the CPU
//     backend, and vs its own unfused path (DSV4_CUDA_MOE_FUSED=0), the session-8 routed kernels
//     (DSV4_CUDA_MOE_KERNEL=0) and variant 2 gate+up with the staged down+sum (DSV4_CUDA_MOE_KERNEL=auto).
// Tolerances: router logits are fp32 sums of 4096 products (|z| ~ 2): rel-L2 1e-5 vs double covers the fp32
// summation order with margin. Expert ids must be identical: the test inputs are chosen without near-ties
// (pick_x: every gap among the top k+1 biased scores > 1e-4, while the logit error is ~1e-6). Routing weights ~0.3: 1e-6
// absolute. SwiGLU outputs: as CudaMoeFused.GateUpSwiglu (rel-L2 2e-5, max 2e-4 of rms). moe_ffn: as
// CudaBackend.MoeRouteAndFfn (rel-L2 2e-5 vs the CPU backend).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <string>

#include <cuda_runtime.h>

#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/cpu_ops.h"
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/gemv.h"
#include "backend/cuda/moe.h"
#include "ops_common.h"
#include "quant/quant.h"

namespace dsv4 {
namespace {

using cuda::DeviceArray;

constexpr int64_t kD = 4096, kF = 2048;
constexpr int kE = 256, kK = 6;

// ---- fused router ------------------------------------------------------------------------------------------------
struct RouterCase {
  QType type;
  int64_t d;
  int e, k;
  std::vector<uint8_t> w;  // [e][d] F16 or F32
  std::vector<float> bias;  // [e] or empty
  float scale;
};

RouterCase router_case(QType t, int64_t d, int e, int k, bool with_bias, uint64_t seed) {
  RouterCase c{t, d, e, k, {}, {}, 1.5f};
  const auto f = test::random_normal(size_t(d) * e, seed, 0.03f);
  c.w.resize(f.size() * (t == QType::F16 ? 2 : 4));
  for (size_t i = 0; i < f.size(); ++i) {
    if (t == QType::F16) test::put_f16(&c.w[2 * i], f[i]);
    else std::memcpy(&c.w[4 * i], &f[i], 4);
  }
  if (with_bias) c.bias = test::random_normal(size_t(e), seed + 1, 0.1f);
  return c;
}

// Router logits in double over the stored (F16-rounded) weights.
std::vector<double> ref_logits(const RouterCase& c, const std::vector<float>& x) {
  std::vector<float> row(static_cast<size_t>(c.d));
  std::vector<double> z(static_cast<size_t>(c.e));
  const int64_t rb = row_bytes(c.type, c.d);
  for (int e = 0; e < c.e; ++e) {
    dequantize_row(c.type, &c.w[size_t(e * rb)], row.data(), c.d);
    double s = 0;
    for (int64_t i = 0; i < c.d; ++i) s += double(row[size_t(i)]) * double(x[size_t(i)]);
    z[size_t(e)] = s;
  }
  return z;
}

struct RouteOut {
  std::vector<int32_t> ids;
  std::vector<float> w;
};

// Smallest gap among the k+1 best biased scores (reference logits): ids can only be compared exactly when it is
// far above the logit error (~1e-6).
float min_gap(const RouterCase& c, const std::vector<double>& z) {
  std::vector<float> v(static_cast<size_t>(c.e));
  for (int e = 0; e < c.e; ++e)
    v[size_t(e)] = cpu::sqrt_softplus(float(z[size_t(e)])) + (c.bias.empty() ? 0.0f : c.bias[size_t(e)]);
  std::sort(v.begin(), v.end(), std::greater<float>());
  float g = INFINITY;
  for (int j = 0; j < std::min(c.k, c.e - 1); ++j) g = std::min(g, v[size_t(j)] - v[size_t(j + 1)]);
  return g;
}

// A token for the router: the first input from `seed` on whose top-(k+1) gaps all exceed 1e-4 (random data sits
// that close to a tie in ~0.5% of draws per gap; such a draw tests the tie, not the kernel, and is skipped).
std::vector<float> pick_x(const RouterCase& c, uint64_t seed) {
  for (uint64_t s = seed;; ++s) {
    auto x = test::random_normal(size_t(c.d), s);
    if (min_gap(c, ref_logits(c, x)) > 1e-4f) return x;
  }
}

// CPU twin: scores from the reference logits, then the CPU backend's own selection and weights.
RouteOut ref_route(const RouterCase& c, const std::vector<double>& z, const std::vector<int32_t>* hash_ids) {
  std::vector<float> s(static_cast<size_t>(c.e));
  for (int e = 0; e < c.e; ++e) s[size_t(e)] = cpu::sqrt_softplus(float(z[size_t(e)]));
  RouteOut r{std::vector<int32_t>(size_t(c.k)), std::vector<float>(size_t(c.k))};
  if (hash_ids) {
    r.ids = *hash_ids;
    cpu::route_weights(s.data(), r.ids.data(), c.k, c.scale, r.w.data());
  } else {
    cpu::route_topk(s.data(), c.bias.empty() ? nullptr : c.bias.data(), c.e, c.k, c.scale, r.ids.data(), r.w.data());
  }
  return r;
}

struct DeviceRouter {
  DeviceArray<uint8_t> w, ws, xq8k;
  DeviceArray<float> x, bias, weights;
  DeviceArray<int32_t> ids;
  explicit DeviceRouter(const RouterCase& c)
      : w(std::span<const uint8_t>(c.w)), ws(cuda::moe_route_fused_workspace_bytes(c.e)),
        xq8k(size_t(cuda::gpu_activation_bytes(QType::Q2_K, c.d))), x(size_t(c.d)),
        weights(size_t(c.k)), ids(size_t(c.k)) {
    if (!c.bias.empty()) bias = DeviceArray<float>(std::span<const float>(c.bias));
    ws.fill_bytes(0);
  }
  cuda::MoeRouteFusedParams params(const RouterCase& c, bool hash) {
    cuda::MoeRouteFusedParams p;
    p.wtype = c.type, p.w = w.get(), p.d = c.d, p.n_experts = c.e, p.k = c.k, p.x = x.get();
    p.bias = c.bias.empty() ? nullptr : bias.get(), p.scale = c.scale, p.hash = hash, p.ids = ids.get();
    p.weights = weights.get(), p.workspace = ws.get(), p.xq8k = xq8k.get();
    return p;
  }
};

void check_route(const RouterCase& c, DeviceRouter& dr, const std::vector<float>& x, const std::string& what) {
  const auto z = ref_logits(c, x);
  const RouteOut ref = ref_route(c, z, nullptr);
  const auto ids = dr.ids.download();
  const auto w = dr.weights.download();
  EXPECT_EQ(ids, ref.ids) << what;
  EXPECT_LE(test::max_abs_err(w, ref.w), 1e-6) << what;
  // The logits the launch kept (workspace: z first) and moe_route_cuda on those logits: the same bits.
  std::vector<float> zg(static_cast<size_t>(c.e));
  cuda::check(cudaMemcpy(zg.data(), dr.ws.get(), zg.size() * 4, cudaMemcpyDeviceToHost), "z");
  EXPECT_LE(test::rel_l2(zg, z), 1e-5) << what << " logits";
  DeviceArray<float> dz{std::span<const float>(zg)}, w2(size_t(c.k));
  DeviceArray<int32_t> ids2(size_t(c.k));
  cuda::moe_route_cuda(dz.get(), c.bias.empty() ? nullptr : dr.bias.get(), 1, c.e, c.k, c.scale, false, ids2.get(),
                       w2.get(), nullptr);
  const auto ids_u = ids2.download();
  const auto w_u = w2.download();
  EXPECT_EQ(ids_u, ids) << what << " vs moe_route_cuda";
  EXPECT_EQ(0, std::memcmp(w_u.data(), w.data(), w.size() * 4)) << what << " vs moe_route_cuda";
  // The routed experts' Q8_K input written along the way: the quantizer's bytes exactly.
  DeviceArray<uint8_t> ref_q(dr.xq8k.size());
  cuda::quantize_activations_cuda(QType::Q2_K, dr.x.get(), 1, c.d, ref_q.get(), nullptr);
  EXPECT_EQ(dr.xq8k.download(), ref_q.download()) << what << " Q8_K x";
}

TEST(CudaMoeRoute, FusedDecodeRouter) {
  DSV4_REQUIRE_CUDA();
  for (bool with_bias : {true, false}) {
    const RouterCase c = router_case(QType::F16, kD, kE, kK, with_bias, 801 + with_bias);
    DeviceRouter dr(c);
    // Three tokens in a row on one workspace: each launch must leave the ticket ready for the next.
    for (int t = 0; t < 3; ++t) {
      const auto x = pick_x(c, 810 + 10 * t);
      dr.x.upload(x);
      cuda::moe_route_fused_cuda(dr.params(c, false), nullptr);
      check_route(c, dr, x, "F16 E=256 bias=" + std::to_string(with_bias) + " token " + std::to_string(t));
    }
  }
  // F32 router, other sizes (E not a multiple of 32, k = 4).
  const RouterCase c = router_case(QType::F32, 512, 40, 4, true, 820);
  DeviceRouter dr(c);
  const auto x = pick_x(c, 821);
  dr.x.upload(x);
  cuda::moe_route_fused_cuda(dr.params(c, false), nullptr);
  check_route(c, dr, x, "F32 E=40 k=4");
}

// Hash layers: ids are an input (left unchanged); weights from the scores of those experts.
TEST(CudaMoeRoute, FusedDecodeRouterHash) {
  DSV4_REQUIRE_CUDA();
  const RouterCase c = router_case(QType::F16, kD, kE, kK, true, 830);
  DeviceRouter dr(c);
  const auto x = test::random_normal(size_t(kD), 831);
  const std::vector<int32_t> hid = {7, 255, 0, 100, 31, 64};
  dr.x.upload(x);
  dr.ids.upload(hid);
  cuda::moe_route_fused_cuda(dr.params(c, true), nullptr);
  const RouteOut ref = ref_route(c, ref_logits(c, x), &hid);
  EXPECT_EQ(dr.ids.download(), hid);
  EXPECT_LE(test::max_abs_err(dr.weights.download(), ref.w), 1e-6);
}

// Capture-safe: one launch recorded in a CUDA graph and replayed for two different inputs.
TEST(CudaMoeRoute, FusedDecodeRouterInGraph) {
  DSV4_REQUIRE_CUDA();
  const RouterCase c = router_case(QType::F16, kD, kE, kK, true, 840);
  DeviceRouter dr(c);
  cudaStream_t s;
  cuda::check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "stream");
  cudaGraph_t g;
  cudaGraphExec_t exec;
  cuda::check(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), "capture");
  cuda::moe_route_fused_cuda(dr.params(c, false), s);
  cuda::check(cudaStreamEndCapture(s, &g), "capture end");
  cuda::check(cudaGraphInstantiate(&exec, g, 0), "instantiate");
  for (int t = 0; t < 2; ++t) {
    const auto x = pick_x(c, 841 + 10 * t);
    dr.x.upload(x);
    cuda::check(cudaGraphLaunch(exec, s), "launch");
    cuda::check(cudaStreamSynchronize(s), "sync");
    check_route(c, dr, x, "graph replay " + std::to_string(t));
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(g);
  cudaStreamDestroy(s);
}

TEST(CudaMoeRoute, FusedDecodeRouterRejectsBadLaunches) {
  DSV4_REQUIRE_CUDA();
  EXPECT_FALSE(cuda::moe_route_fused_supported(QType::F16, kD, 2000, 6));  // E > 1024
  EXPECT_FALSE(cuda::moe_route_fused_supported(QType::F16, kD, 4, 6));     // k > E
  EXPECT_FALSE(cuda::moe_route_fused_supported(QType::F16, 4100, 256, 6));  // D % 8
  EXPECT_FALSE(cuda::moe_route_fused_supported(QType::Q8_0, kD, 256, 6));
  const RouterCase c = router_case(QType::F16, kD, kE, kK, false, 850);
  DeviceRouter dr(c);
  cuda::MoeRouteFusedParams p = dr.params(c, false);
  p.n_experts = 2000;
  EXPECT_THROW(cuda::moe_route_fused_cuda(p, nullptr), Error);
  p = dr.params(c, false);
  p.x = dr.x.get() + 1;  // 4-byte aligned only
  EXPECT_THROW(cuda::moe_route_fused_cuda(p, nullptr), Error);
  p = dr.params(c, false);
  p.workspace = nullptr;
  EXPECT_THROW(cuda::moe_route_fused_cuda(p, nullptr), Error);
  const RouterCase c2 = router_case(QType::F16, 128, 16, 2, false, 851);  // Q8_K x needs D % 256 == 0
  DeviceRouter dr2(c2);
  dr2.xq8k = DeviceArray<uint8_t>(304);
  EXPECT_THROW(cuda::moe_route_fused_cuda(dr2.params(c2, false), nullptr), Error);
}

// ---- routed down + sum with the input quantized inside the launch (GemvParams::xf) --------------------------------
void run_down_sum_xf(QType t, int64_t rows, int64_t cols, int n_experts, const std::vector<int32_t>& ids, int k,
                     uint64_t seed) {
  const int n_slots = int(ids.size()), n_tok = n_slots / k;
  const std::string what = "down+sum xf " + qtype_name(t) + " slots=" + std::to_string(n_slots);
  const auto w = test::random_weights(t, rows, cols, seed, n_experts);
  const auto x = test::random_normal(size_t(n_slots) * size_t(cols), seed + 1);
  const auto y0 = test::random_normal(size_t(n_tok) * size_t(rows), seed + 2);  // the shared expert's output
  const int64_t rb = row_bytes(t, cols);
  DeviceArray<uint8_t> d_w{std::span<const uint8_t>(w)};
  DeviceArray<float> d_x{std::span<const float>(x)}, d_y{std::span<const float>(y0)}, d_y2{std::span<const float>(y0)};
  DeviceArray<uint8_t> d_xq(size_t(n_slots * cuda::gpu_activation_bytes(t, cols)));
  DeviceArray<int32_t> d_ids{std::span<const int32_t>(ids)};
  cuda::GemvParams p;
  p.wtype = t, p.w = d_w.get(), p.rows = rows, p.cols = cols, p.expert_stride = rows * rb;
  p.expert_ids = d_ids.get(), p.n_slots = n_slots, p.act_slot_div = 1, p.xf = d_x.get(), p.y = d_y.get();
  cuda::moe_down_sum_cuda(p, k, nullptr);
  cuda::GemvParams q = p;  // the same launch on separately quantized rows
  q.xf = nullptr, q.xq = d_xq.get(), q.y = d_y2.get();
  cuda::quantize_activations_cuda(t, d_x.get(), n_slots, cols, d_xq.get(), nullptr);
  cuda::moe_down_sum_cuda(q, k, nullptr);
  cuda::check(cudaDeviceSynchronize(), what.c_str());
  const auto y = d_y.download(), y2 = d_y2.download();
  EXPECT_EQ(0, std::memcmp(y.data(), y2.data(), y.size() * 4)) << what << " vs quantized input";
  // CPU twin: the CPU's activation quantization, dequantized operands, double dots, summed per token.
  const int64_t ab = activation_bytes(t, cols);
  std::vector<uint8_t> aq(static_cast<size_t>(ab));
  std::vector<float> xd(static_cast<size_t>(cols)), row(static_cast<size_t>(cols));
  std::vector<double> ref(y0.begin(), y0.end());
  for (int s = 0; s < n_slots; ++s) {
    quantize_activation(t, &x[size_t(s) * size_t(cols)], aq.data(), cols);
    dequantize_row(activation_type(t), aq.data(), xd.data(), cols);
    for (int64_t r = 0; r < rows; ++r) {
      dequantize_row(t, &w[size_t((int64_t(ids[size_t(s)]) * rows + r) * rb)], row.data(), cols);
      double d = 0;
      for (int64_t i = 0; i < cols; ++i) d += double(row[size_t(i)]) * double(xd[size_t(i)]);
      ref[size_t((s / k) * rows + r)] += d;
    }
  }
  EXPECT_LE(test::rel_l2(y, ref), 1e-5) << what;
}

TEST(CudaMoeFused, DownSumFloatInput) {
  DSV4_REQUIRE_CUDA();
  run_down_sum_xf(QType::Q2_K, kD, kF, kE, {255, 1, 100, 42, 0, 199}, kK, 951);  // Flash decode
  run_down_sum_xf(QType::Q2_K, kD, kF, 16, {3, 1, 10, 4, 0, 15, 2, 2, 9, 8, 7, 6}, kK, 952);  // two tokens
  run_down_sum_xf(QType::Q4_K, kD, kF, 32, {31, 1, 7, 9, 0, 16}, kK, 953);
  run_down_sum_xf(QType::IQ2_XXS, 1024, 4096, 8, {7, 0, 3}, 3, 954);
  // xf is taken by moe_down_sum_cuda only, and for Q8_K-activation types only.
  DeviceArray<float> xf(4096);
  cuda::GemvParams p;
  p.wtype = QType::Q2_K, p.rows = 16, p.cols = 256, p.n_slots = 1, p.xf = xf.get();
  EXPECT_THROW(cuda::gemv_cuda(p, nullptr), Error);
  p.w2 = xf.get(), p.y = xf.get();
  EXPECT_THROW(cuda::moe_gate_up_swiglu_cuda(p, nullptr, 1.0f, nullptr), Error);
  p.wtype = QType::Q8_0, p.w2 = nullptr;
  EXPECT_THROW(cuda::moe_down_sum_cuda(p, 1, nullptr), Error);
}

// ---- shared expert: Q8_0 gate + up + SwiGLU in one launch --------------------------------------------------------
double swiglu_ref(double g, double u, double clamp) {
  const double gc = std::min(g, clamp), uc = std::max(std::min(u, clamp), -clamp);
  return gc / (1.0 + std::exp(-gc)) * uc;
}

void run_shared_gate_up(cuda::GemvLayout layout, int kernel, float clamp, uint64_t seed) {
  const bool split = layout == cuda::GemvLayout::Q8Split;
  const std::string what = std::string("shared Q8_0 gate+up+swiglu") + (split ? " split" : "") + " kernel=" +
                           std::to_string(kernel) + " clamp=" + std::to_string(clamp);
  const auto wg = test::random_weights(QType::Q8_0, kF, kD, seed), wu = test::random_weights(QType::Q8_0, kF, kD, seed + 1);
  const auto x = test::random_normal(size_t(kD), seed + 2);
  // Reference operands: the CPU's activation quantization, dequantized; weights dequantized.
  std::vector<uint8_t> xq(static_cast<size_t>(activation_bytes(QType::Q8_0, kD)));
  std::vector<float> xd(static_cast<size_t>(kD)), row(static_cast<size_t>(kD));
  quantize_activation(QType::Q8_0, x.data(), xq.data(), kD);
  dequantize_row(activation_type(QType::Q8_0), xq.data(), xd.data(), kD);
  const int64_t rb = row_bytes(QType::Q8_0, kD);
  auto dot = [&](const std::vector<uint8_t>& w, int64_t r) {
    dequantize_row(QType::Q8_0, &w[size_t(r * rb)], row.data(), kD);
    double s = 0;
    for (int64_t i = 0; i < kD; ++i) s += double(row[size_t(i)]) * double(xd[size_t(i)]);
    return s;
  };
  std::vector<double> ref(static_cast<size_t>(kF));
  for (int64_t r = 0; r < kF; ++r) ref[size_t(r)] = swiglu_ref(dot(wg, r), dot(wu, r), clamp);

  DeviceArray<uint8_t> d_wg{std::span<const uint8_t>(wg)}, d_wu{std::span<const uint8_t>(wu)};
  if (split) {
    DeviceArray<uint8_t> sg(size_t(kF * cuda::q8_split_row_bytes(kD))), su(sg.size());
    cuda::q8_0_split_cuda(d_wg.get(), kF, kD, sg.get(), nullptr);
    cuda::q8_0_split_cuda(d_wu.get(), kF, kD, su.get(), nullptr);
    d_wg = std::move(sg), d_wu = std::move(su);
  }
  DeviceArray<float> d_x{std::span<const float>(x)}, d_h{size_t(kF)}, d_g{size_t(kF)}, d_u{size_t(kF)};
  DeviceArray<uint8_t> d_xq(size_t(cuda::gpu_activation_bytes(QType::Q8_0, kD, layout)));
  cuda::quantize_activations_cuda(QType::Q8_0, d_x.get(), 1, kD, d_xq.get(), nullptr, layout);
  d_h.fill_bytes(0xFF);
  cuda::GemvParams p;
  p.wtype = QType::Q8_0, p.layout = layout, p.w = d_wg.get(), p.w2 = d_wu.get(), p.rows = kF, p.cols = kD;
  p.xq = d_xq.get(), p.y = d_h.get(), p.kernel = kernel;
  cuda::moe_gate_up_swiglu_cuda(p, nullptr, clamp, nullptr);
  cuda::GemvParams q = p;  // unfused: paired GEMV (same kernel family), then swiglu_cuda
  q.y = d_g.get(), q.y2 = d_u.get();
  cuda::gemv_cuda(q, nullptr);
  cuda::swiglu_cuda(d_g.get(), d_u.get(), nullptr, 1, kF, clamp, d_g.get(), nullptr);
  cuda::check(cudaDeviceSynchronize(), what.c_str());
  const auto h = d_h.download(), h_unfused = d_g.download();
  double ms = 0;
  for (double v : ref) ms += v * v;
  EXPECT_LE(test::rel_l2(h, ref), 2e-5) << what;
  EXPECT_LE(test::max_rel_err(h, ref, std::sqrt(ms / double(ref.size()))), 2e-4) << what;
  // Staged: the same per-row sums as the staged paired GEMV, so equal bits; streaming: split across warps by
  // its own launch shape, so within the tolerance of each other only.
  if (kernel == 2) EXPECT_EQ(0, std::memcmp(h.data(), h_unfused.data(), h.size() * 4)) << what << " vs unfused";
  else EXPECT_LE(test::rel_l2(h, std::span<const float>(h_unfused)), 4e-5) << what << " vs unfused";
}

TEST(CudaMoeFused, SharedExpertGateUpSwigluQ8) {
  DSV4_REQUIRE_CUDA();
  // Random Q8_0 rows give dots of O(1-10): clamp 10 and 0.5 both clip some values (both clamp branches run).
  for (auto layout : {cuda::GemvLayout::Q8Split, cuda::GemvLayout::Ggml})
    for (int kernel : {0, 2}) run_shared_gate_up(layout, kernel, 10.0f, 860);
  run_shared_gate_up(cuda::GemvLayout::Q8Split, 0, 0.5f, 861);
}

// ---- the backend's one-token MoE --------------------------------------------------------------------------------
struct Tensor {
  std::vector<uint8_t> bytes;
  WeightView view;
};

Tensor make_tensor(QType t, int64_t cols, int64_t rows, int64_t experts, uint64_t seed, const char* name) {
  Tensor x;
  if (t == QType::F16 || t == QType::F32) {
    const auto f = test::random_normal(size_t(cols * rows * experts), seed, t == QType::F16 ? 0.03f : 0.1f);
    x.bytes.resize(f.size() * (t == QType::F16 ? 2 : 4));
    for (size_t i = 0; i < f.size(); ++i) {
      if (t == QType::F16) test::put_f16(&x.bytes[2 * i], f[i]);
      else std::memcpy(&x.bytes[4 * i], &f[i], 4);
    }
  } else {
    x.bytes = test::random_weights(t, rows, cols, seed, experts);
  }
  x.view.type = t, x.view.data = x.bytes.data(), x.view.n_bytes = x.bytes.size(), x.view.name = name;
  x.view.ne[0] = cols, x.view.ne[1] = rows, x.view.ne[2] = experts, x.view.n_dims = experts > 1 ? 3 : 2;
  return x;
}

using test::get;
using test::put;

TEST(CudaBackend, MoeDecodeFlashWidths) {
  DSV4_REQUIRE_CUDA();
  // The q2 mix at full size (256 experts: ~1.8 GB of routed stacks), tensors kept alive for the backends.
  std::vector<Tensor> t;
  t.push_back(make_tensor(QType::F16, kD, kE, 1, 901, "blk.5.ffn_gate_inp.weight"));
  t.push_back(make_tensor(QType::F32, kE, 1, 1, 902, "blk.5.exp_probs_b.bias"));
  t.push_back(make_tensor(QType::IQ2_XXS, kD, kF, kE, 903, "blk.5.ffn_gate_exps.weight"));
  t.push_back(make_tensor(QType::IQ2_XXS, kD, kF, kE, 904, "blk.5.ffn_up_exps.weight"));
  t.push_back(make_tensor(QType::Q2_K, kF, kD, kE, 905, "blk.5.ffn_down_exps.weight"));
  t.push_back(make_tensor(QType::Q8_0, kD, kF, 1, 906, "blk.5.ffn_gate_shexp.weight"));
  t.push_back(make_tensor(QType::Q8_0, kD, kF, 1, 907, "blk.5.ffn_up_shexp.weight"));
  t.push_back(make_tensor(QType::Q8_0, kF, kD, 1, 908, "blk.5.ffn_down_shexp.weight"));
  MoeWeights w;
  w.gate_inp = t[0].view, w.exp_probs_b = t[1].view, w.gate_exps = t[2].view, w.up_exps = t[3].view;
  w.down_exps = t[4].view, w.gate_shexp = t[5].view, w.up_shexp = t[6].view, w.down_shexp = t[7].view;
  MoeParams p;
  p.n_experts = kE, p.n_used = kK, p.d = kD, p.ff = kF, p.weights_scale = 1.5f;
  RouterCase rc{QType::F16, kD, kE, kK, t[0].bytes, std::vector<float>(size_t(kE)), p.weights_scale};
  std::memcpy(rc.bias.data(), t[1].bytes.data(), rc.bias.size() * 4);
  auto cpu = make_cpu_backend();
  auto gpu = make_cuda_backend();
  auto route = [&](Backend& be, const std::vector<float>& x) {
    auto bx = put(be, x), bt = put(be, std::vector<int32_t>{3});
    DeviceBuffer ids = be.alloc(kK * 4), wts = be.alloc(kK * 4);
    be.moe_route(w, p, bx.f32(), bt.i32(), 1, ids.i32(), wts.f32());
    return RouteOut{get<int32_t>(be, ids, kK), get<float>(be, wts, kK)};
  };
  auto ffn = [&](Backend& be, const std::vector<float>& x, const RouteOut& r) {
    auto bx = put(be, x), bi = put(be, r.ids), bw = put(be, r.w);
    DeviceBuffer y = be.alloc(size_t(kD) * 4);
    be.moe_ffn(w, p, bx.f32(), bi.i32(), bw.f32(), 1, y.f32());
    return get<float>(be, y, size_t(kD));
  };
  // Several tokens in a row on one backend (the side stream and the router's ticket carry over between calls),
  // on the fused path (default: variant 2 for both routed launches), with the session-8 routed kernels
  // (DSV4_CUDA_MOE_KERNEL=0) and with variant 2 gate+up + staged down+sum (DSV4_CUDA_MOE_KERNEL=auto) — gemv_moe_v2.h:
  // same products and summation order as the session-8 kernels, so these must equal the default fused path's
  // output within 1e-6 rel-L2 — and on the unfused one (DSV4_CUDA_MOE_FUSED=0). All read per call.
  std::vector<std::vector<float>> fused_y;
  for (const char* mode : {"fused", "fused, session-8 routed kernels", "fused, routed auto", "unfused"}) {
    const bool old = std::strcmp(mode, "fused, session-8 routed kernels") == 0;
    const bool v2 = old || std::strcmp(mode, "fused, routed auto") == 0;  // compared with the default
    const bool unfused = std::strcmp(mode, "unfused") == 0;
    if (old) setenv("DSV4_CUDA_MOE_KERNEL", "0", 1);
    else if (v2) setenv("DSV4_CUDA_MOE_KERNEL", "auto", 1);
    if (unfused) setenv("DSV4_CUDA_MOE_FUSED", "0", 1);
    for (int tok = 0; tok < 3; ++tok) {
      const std::string what = std::string(mode) + " token " + std::to_string(tok);
      const auto x = pick_x(rc, 910 + 10 * tok);
      const RouteOut c = route(*cpu, x), g = route(*gpu, x);
      EXPECT_EQ(g.ids, c.ids) << what;
      EXPECT_LE(test::max_abs_err(g.w, c.w), 1e-6) << what;
      const auto yg = ffn(*gpu, x, c);
      EXPECT_LE(test::rel_l2(yg, ffn(*cpu, x, c)), 2e-5) << what;
      if (!v2 && !unfused) fused_y.push_back(yg);
      if (v2) {
        EXPECT_LE(test::rel_l2(yg, fused_y[size_t(tok)]), 1e-6) << what << " vs the default fused kernels";
      }
    }
    unsetenv("DSV4_CUDA_MOE_KERNEL");
    unsetenv("DSV4_CUDA_MOE_FUSED");
  }
}

}  // namespace
}  // namespace dsv4
