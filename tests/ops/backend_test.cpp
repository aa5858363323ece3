// The CUDA op table (make_cuda_backend) against the CPU oracle (make_cpu_backend), op by op, on random weights
// of the q2 mix types (experts IQ2_XXS gate/up + Q2_K down, Q8_0 shared expert, F16 router and HC control) at
// D = 4096, HC n = 4, 6 of 32 experts, and 1..3 tokens.
//
// Tolerances: both backends quantize activations identically and form the same integer block dots, so matmul
// outputs differ by fp32 summation order only (rel-L2 <= 1e-5, as in gemv_test). Composite ops add a few fp32
// roundings per value (RMS accumulated in double on the CPU, float on the GPU: ~1e-7 relative; expf/log1pf ulps):
// 2e-5 for hc_pre/hc_head/moe_ffn outputs, 1e-6 absolute on routing weights (values ~0.25). Expert ids must be
// identical (random logits have no near-ties at the 1e-6 level).
#include <cstring>

#include "backend/cpu/cpu_backend.h"
#include "backend/cuda/cuda_backend.h"
#include "ops_common.h"
#include "quant/quant.h"

namespace dsv4 {
namespace {

// Owns the bytes of one random tensor and a WeightView onto them.
struct Tensor {
  std::vector<uint8_t> bytes;
  WeightView view;
};

Tensor make_tensor(QType t, int64_t cols, int64_t rows, int64_t experts, uint64_t seed, float sigma,
                   const char* name) {
  Tensor x;
  const int64_t n = cols * rows * experts;
  const auto f = test::random_normal(size_t(t == QType::F32 || t == QType::F16 ? n : 0), seed, sigma);
  if (t == QType::F32) {
    x.bytes.resize(size_t(n) * sizeof(float));
    std::memcpy(x.bytes.data(), f.data(), x.bytes.size());
  } else if (t == QType::F16) {
    x.bytes.resize(size_t(n) * 2);
    for (int64_t i = 0; i < n; ++i) test::put_f16(&x.bytes[size_t(2 * i)], f[size_t(i)]);
  } else {
    x.bytes = test::random_weights(t, rows, cols, seed, experts);
  }
  x.view.type = t, x.view.data = x.bytes.data(), x.view.n_bytes = x.bytes.size(), x.view.name = name;
  x.view.ne[0] = cols, x.view.ne[1] = rows, x.view.ne[2] = experts, x.view.n_dims = experts > 1 ? 3 : 2;
  return x;
}

void expect_close(const std::vector<float>& got, const std::vector<float>& ref, double tol, const char* what) {
  EXPECT_LE(test::rel_l2(got, ref), tol) << what;
}

struct Backends {
  std::unique_ptr<Backend> cpu = make_cpu_backend();
  std::unique_ptr<Backend> gpu = make_cuda_backend();
};

constexpr int64_t D = 4096;

TEST(CudaBackend, MatmulAndRmsNorm) {
  DSV4_REQUIRE_CUDA();
  Backends b;
  const int T = 3;
  // The backend caches device copies by host address for its lifetime (the model's mmap never moves), so every
  // tensor here must outlive the backend: a freed tensor's address could be reused by the next one.
  std::vector<Tensor> keep;
  for (QType t : {QType::Q8_0, QType::F16, QType::Q4_K, QType::F32}) {
    keep.push_back(make_tensor(t, D, 512, 1, 11, 0.05f, "w"));
    const Tensor& w = keep.back();
    const auto x = test::random_normal(size_t(T * D), 12);
    std::vector<float> yc(size_t(T * 512)), yg(yc.size(), NAN);
    b.cpu->matmul(w.view, -1, x.data(), T, yc.data());
    b.gpu->matmul(w.view, -1, x.data(), T, yg.data());
    expect_close(yg, yc, 1e-5, qtype_name(t).c_str());
  }
  const Tensor stack = make_tensor(QType::IQ2_XXS, D, 256, 4, 13, 0.05f, "stack");
  const auto x = test::random_normal(size_t(2 * D), 14);
  std::vector<float> yc(2 * 256), yg(yc.size(), NAN);
  b.cpu->matmul(stack.view, 3, x.data(), 2, yc.data());
  b.gpu->matmul(stack.view, 3, x.data(), 2, yg.data());
  expect_close(yg, yc, 1e-5, "IQ2_XXS expert 3");

  const Tensor nw = make_tensor(QType::F32, D, 1, 1, 15, 1.0f, "norm");
  std::vector<float> nc(size_t(T * D)), ng(nc.size(), NAN);
  const auto xn = test::random_normal(size_t(T * D), 16, 3.0f);
  b.cpu->rms_norm(xn.data(), &nw.view, T, D, 1e-6f, nc.data());
  b.gpu->rms_norm(xn.data(), &nw.view, T, D, 1e-6f, ng.data());
  expect_close(ng, nc, 1e-6, "rms_norm");
}

TEST(CudaBackend, HyperConnections) {
  DSV4_REQUIRE_CUDA();
  Backends b;
  const int T = 2, n = 4;
  HcParams p;
  p.n = n, p.d = D;
  HcWeights w;
  const Tensor fn = make_tensor(QType::F16, n * D, 24, 1, 21, 0.02f, "hc_fn");
  const Tensor base = make_tensor(QType::F32, 24, 1, 1, 22, 0.5f, "hc_base");
  const Tensor scale = make_tensor(QType::F32, 3, 1, 1, 23, 1.0f, "hc_scale");
  w.fn = fn.view, w.base = base.view, w.scale = scale.view;
  const auto X = test::random_normal(size_t(T * n * D), 24);
  std::vector<float> ac(size_t(T * D)), pc(size_t(T * n)), cc(size_t(T * n * n));
  std::vector<float> ag(ac.size(), NAN), pg(pc.size(), NAN), cg(cc.size(), NAN);
  b.cpu->hc_pre(w, p, X.data(), T, ac.data(), pc.data(), cc.data());
  b.gpu->hc_pre(w, p, X.data(), T, ag.data(), pg.data(), cg.data());
  expect_close(ag, ac, 2e-5, "hc_pre a");
  expect_close(pg, pc, 2e-5, "hc_pre post");
  expect_close(cg, cc, 2e-5, "hc_pre comb");

  const auto y = test::random_normal(size_t(T * D), 25);
  auto Xc = X, Xg = X;
  b.cpu->hc_post(p, y.data(), pc.data(), cc.data(), T, Xc.data());
  b.gpu->hc_post(p, y.data(), pc.data(), cc.data(), T, Xg.data());
  expect_close(Xg, Xc, 1e-6, "hc_post");

  HcHeadWeights hw;
  const Tensor hfn = make_tensor(QType::F16, n * D, 4, 1, 26, 0.02f, "head_fn");
  const Tensor hbase = make_tensor(QType::F32, 4, 1, 1, 27, 0.5f, "head_base");
  const Tensor hscale = make_tensor(QType::F32, 1, 1, 1, 28, 1.0f, "head_scale");
  hw.fn = hfn.view, hw.base = hbase.view, hw.scale = hscale.view;
  std::vector<float> hc(size_t(T * D)), hg(hc.size(), NAN);
  b.cpu->hc_head(hw, p, X.data(), T, hc.data());
  b.gpu->hc_head(hw, p, X.data(), T, hg.data());
  expect_close(hg, hc, 2e-5, "hc_head");
}

TEST(CudaBackend, MoeRouteAndFfn) {
  DSV4_REQUIRE_CUDA();
  Backends b;
  const int T = 3, E = 32, k = 6;
  const int64_t F = 2048;
  MoeParams p;
  p.n_experts = E, p.n_used = k, p.d = D, p.ff = F;
  MoeWeights w;
  const Tensor router = make_tensor(QType::F16, D, E, 1, 31, 0.03f, "router");
  const Tensor bias = make_tensor(QType::F32, E, 1, 1, 32, 0.1f, "bias");
  const Tensor gate = make_tensor(QType::IQ2_XXS, D, F, E, 33, 0.03f, "gate_exps");
  const Tensor up = make_tensor(QType::IQ2_XXS, D, F, E, 34, 0.03f, "up_exps");
  const Tensor down = make_tensor(QType::Q2_K, F, D, E, 35, 0.03f, "down_exps");
  const Tensor gs = make_tensor(QType::Q8_0, D, F, 1, 36, 0.03f, "gate_shexp");
  const Tensor us = make_tensor(QType::Q8_0, D, F, 1, 37, 0.03f, "up_shexp");
  const Tensor ds = make_tensor(QType::Q8_0, F, D, 1, 38, 0.03f, "down_shexp");
  w.gate_inp = router.view, w.exp_probs_b = bias.view, w.gate_exps = gate.view, w.up_exps = up.view;
  w.down_exps = down.view, w.gate_shexp = gs.view, w.up_shexp = us.view, w.down_shexp = ds.view;
  const auto x = test::random_normal(size_t(T * D), 39);
  const std::vector<int32_t> tokens = {5, 6, 7};
  std::vector<int32_t> ic(size_t(T * k)), ig(ic.size(), -1);
  std::vector<float> wc(size_t(T * k)), wg(wc.size(), NAN);
  b.cpu->moe_route(w, p, x.data(), tokens.data(), T, ic.data(), wc.data());
  b.gpu->moe_route(w, p, x.data(), tokens.data(), T, ig.data(), wg.data());
  EXPECT_EQ(ig, ic);
  EXPECT_LE(test::max_abs_err(wg, wc), 1e-6);

  std::vector<float> yc(size_t(T * D)), yg(yc.size(), NAN);
  b.cpu->moe_ffn(w, p, x.data(), ic.data(), wc.data(), T, yc.data());
  b.gpu->moe_ffn(w, p, x.data(), ic.data(), wc.data(), T, yg.data());
  expect_close(yg, yc, 2e-5, "moe_ffn");
}

TEST(CudaBackend, EmbedAndBadInput) {
  DSV4_REQUIRE_CUDA();
  Backends b;
  const Tensor e = make_tensor(QType::F16, D, 64, 1, 41, 1.0f, "token_embd");
  const std::vector<int32_t> tokens = {0, 63, 17};
  std::vector<float> xc(size_t(3 * 4 * D)), xg(xc.size(), NAN);
  b.cpu->embed(e.view, tokens.data(), 3, 4, xc.data());
  b.gpu->embed(e.view, tokens.data(), 3, 4, xg.data());
  EXPECT_EQ(xg, xc);
  const std::vector<int32_t> bad = {64};
  EXPECT_THROW(b.gpu->embed(e.view, bad.data(), 1, 4, xg.data()), Error);
}

}  // namespace
}  // namespace dsv4
