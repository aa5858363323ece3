// Prefill-size control projections through the CUDA op table: hc_pre / hc_head (HC mix [4 x 4096 -> 24 / 4]) and
// moe_route (router [4096 -> 256]) at T = 300 tokens take the exact FP32 GEMM (gemm.h GemmParams::exact) instead
// of ceil(T / 8) GEMV launches. Their outputs choose the Sinkhorn weights and the experts, so prefill must decide
// as decode (the GEMV) and the CPU oracle do: the same backend with DSV4_CUDA_GEMM=0 (every product on the GEMVs)
// and the CPU backend are the references.
//
// Tolerances: the projections differ by fp32 summation order only (gemm_test.cpp ExactControlProjections: rel-L2
// <= 2e-5, typically ~1e-6); the composite ops add a few fp32 roundings per value (RMS, Sinkhorn, collapse), as in
// backend_test.cpp: rel-L2 2e-5 for hc_pre / hc_head outputs, 1e-6 absolute on routing weights (values ~0.1-0.3),
// and identical expert ids (random router logits have no near-ties at the 1e-6 level: 300 tokens x 6 of 256).
#include <cstdlib>
#include <cstring>

#include "backend/cpu/cpu_backend.h"
#include "backend/cuda/cuda_backend.h"
#include "ops_common.h"
#include "quant/quant.h"

namespace dsv4 {
namespace {

constexpr int64_t D = 4096;
constexpr int kT = 300;  // not a multiple of 8: the GEMV reference ends on a partial launch

struct Tensor {
  std::vector<uint8_t> bytes;
  WeightView view;
};

// F16 (matrices) or F32 (vectors) random tensor, ne = {cols, rows}.
Tensor make_tensor(QType t, int64_t cols, int64_t rows, uint64_t seed, float sigma, const char* name) {
  Tensor x;
  const int64_t n = cols * rows;
  const auto f = test::random_normal(size_t(n), seed, sigma);
  if (t == QType::F32) {
    x.bytes.resize(size_t(n) * 4);
    std::memcpy(x.bytes.data(), f.data(), x.bytes.size());
  } else {
    x.bytes.resize(size_t(n) * 2);
    for (int64_t i = 0; i < n; ++i) test::put_f16(&x.bytes[size_t(2 * i)], f[size_t(i)]);
  }
  x.view.type = t, x.view.data = x.bytes.data(), x.view.n_bytes = x.bytes.size(), x.view.name = name;
  x.view.ne[0] = cols, x.view.ne[1] = rows, x.view.n_dims = 2;
  return x;
}

using test::get;
using test::put;

// The three backends: CPU oracle, CUDA (exact GEMM at this T), CUDA with every product on the GEMVs.
struct Three {
  std::unique_ptr<Backend> cpu = make_cpu_backend(), gemm = make_cuda_backend(), gemv;
  Three() {
    setenv("DSV4_CUDA_GEMM", "0", 1);
    gemv = make_cuda_backend();
    unsetenv("DSV4_CUDA_GEMM");
  }
};

TEST(CudaPrefillControl, HcPreAndHeadAtPrefillSize) {
  DSV4_REQUIRE_CUDA();
  Three b;
  const int n = 4;
  HcParams p;
  p.n = n, p.d = D;
  const Tensor fn = make_tensor(QType::F16, n * D, 24, 81, 0.02f, "blk.0.hc_attn_fn.weight");
  const Tensor base = make_tensor(QType::F32, 24, 1, 82, 0.5f, "hc_base");
  const Tensor scale = make_tensor(QType::F32, 3, 1, 83, 1.0f, "hc_scale");
  HcWeights w;
  w.fn = fn.view, w.base = base.view, w.scale = scale.view;
  const auto X = test::random_normal(size_t(kT) * n * D, 84);
  struct Pre {
    std::vector<float> a, post, comb;
  };
  auto pre = [&](Backend& be) {
    auto bX = put(be, X);
    DeviceBuffer a = be.alloc(size_t(kT) * D * 4), po = be.alloc(size_t(kT) * n * 4);
    DeviceBuffer co = be.alloc(size_t(kT) * n * n * 4);
    be.hc_pre(w, p, bX.f32(), kT, a.f32(), po.f32(), co.f32());
    return Pre{get<float>(be, a, size_t(kT) * D), get<float>(be, po, size_t(kT) * n),
               get<float>(be, co, size_t(kT) * n * n)};
  };
  const Pre c = pre(*b.cpu), g = pre(*b.gemm), v = pre(*b.gemv);
  for (const auto& [got, what] : {std::pair{&g, "exact GEMM"}, std::pair{&v, "GEMV"}}) {
    EXPECT_LE(test::rel_l2(got->a, c.a), 2e-5) << what << ": hc_pre a vs cpu";
    EXPECT_LE(test::rel_l2(got->post, c.post), 2e-5) << what << ": hc_pre post vs cpu";
    EXPECT_LE(test::rel_l2(got->comb, c.comb), 2e-5) << what << ": hc_pre comb vs cpu";
  }
  EXPECT_LE(test::rel_l2(g.comb, v.comb), 2e-5) << "hc_pre comb: exact GEMM vs GEMV";
  EXPECT_LE(test::rel_l2(g.post, v.post), 2e-5) << "hc_pre post: exact GEMM vs GEMV";
  std::printf("[prefill control] hc_pre T=%d comb rel-L2: gemm vs cpu %.2e, gemv vs cpu %.2e, gemm vs gemv %.2e\n", kT,
              test::rel_l2(g.comb, c.comb), test::rel_l2(v.comb, c.comb), test::rel_l2(g.comb, v.comb));

  const Tensor hfn = make_tensor(QType::F16, n * D, 4, 85, 0.02f, "output_hc_fn.weight");
  const Tensor hbase = make_tensor(QType::F32, 4, 1, 86, 0.5f, "head_base");
  const Tensor hscale = make_tensor(QType::F32, 1, 1, 87, 1.0f, "head_scale");
  HcHeadWeights hw;
  hw.fn = hfn.view, hw.base = hbase.view, hw.scale = hscale.view;
  auto head = [&](Backend& be) {
    auto bX = put(be, X);
    DeviceBuffer h = be.alloc(size_t(kT) * D * 4);
    be.hc_head(hw, p, bX.f32(), kT, h.f32());
    return get<float>(be, h, size_t(kT) * D);
  };
  const auto hc = head(*b.cpu);
  EXPECT_LE(test::rel_l2(head(*b.gemm), hc), 2e-5) << "hc_head, exact GEMM vs cpu";
}

TEST(CudaPrefillControl, RouterAtPrefillSize) {
  DSV4_REQUIRE_CUDA();
  Three b;
  const int E = 256, k = 6;
  MoeParams p;
  p.n_experts = E, p.n_used = k, p.d = D, p.ff = 2048, p.weights_scale = 1.5f;
  const Tensor gate = make_tensor(QType::F16, D, E, 91, 0.03f, "blk.3.ffn_gate_inp.weight");
  const Tensor bias = make_tensor(QType::F32, E, 1, 92, 0.1f, "blk.3.exp_probs_b.bias");
  MoeWeights w;
  w.gate_inp = gate.view, w.exp_probs_b = bias.view;
  const auto x = test::random_normal(size_t(kT) * D, 93);
  std::vector<int32_t> tokens(static_cast<size_t>(kT));
  for (int t = 0; t < kT; ++t) tokens[size_t(t)] = t;
  struct Route {
    std::vector<int32_t> ids;
    std::vector<float> wts;
  };
  auto route = [&](Backend& be) {
    auto bx = put(be, x), bt = put(be, tokens);
    DeviceBuffer ids = be.alloc(size_t(kT) * k * 4), wts = be.alloc(size_t(kT) * k * 4);
    be.moe_route(w, p, bx.f32(), bt.i32(), kT, ids.i32(), wts.f32());
    return Route{get<int32_t>(be, ids, size_t(kT) * k), get<float>(be, wts, size_t(kT) * k)};
  };
  const Route c = route(*b.cpu), g = route(*b.gemm), v = route(*b.gemv);
  EXPECT_EQ(g.ids, c.ids) << "exact GEMM vs cpu";
  EXPECT_EQ(g.ids, v.ids) << "exact GEMM vs GEMV";
  EXPECT_LE(test::max_abs_err(g.wts, c.wts), 1e-6);
  EXPECT_LE(test::max_abs_err(g.wts, v.wts), 1e-6);
  std::printf("[prefill control] moe_route T=%d weights max abs: gemm vs cpu %.2e, gemm vs gemv %.2e\n", kT,
              test::max_abs_err(g.wts, c.wts), test::max_abs_err(g.wts, v.wts));
}

}  // namespace
}  // namespace dsv4
