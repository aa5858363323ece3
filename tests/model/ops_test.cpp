// CPU op building blocks against values computed by hand (derivations in the comments).
#include <gtest/gtest.h>

#include <cmath>
#include <algorithm>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/cpu_ops.h"
#include "quant/quant.h"

using namespace dsv4;

// Tolerance for all hand-computed checks below: 1e-6 absolute on O(1) values — a few fp32 ulps of the
// handful of sequential operations involved, far below any formula mistake (which moves values by >= 1e-2).
constexpr float kTol = 1e-6f;

TEST(Sinkhorn, TwoByTwoTwoIterationsExactFractions) {
  // C = [[ln 3, 0], [0, 0]], eps 0. Row softmax: [3/4, 1/4], [1/2, 1/2]. Column normalize: col0 sum 5/4 ->
  // [3/5, 2/5]; col1 sum 3/4 -> [1/3, 2/3]. Iteration 2: rows [3/5, 1/3] / (14/15) = [9/14, 5/14],
  // [2/5, 2/3] / (16/15) = [3/8, 5/8]; columns: col0 sum 57/56 -> [12/19, 7/19], col1 sum 55/56 -> [4/11, 7/11].
  float C[4] = {std::log(3.f), 0.f, 0.f, 0.f};
  cpu::sinkhorn(C, 2, 2, 0.f);
  EXPECT_NEAR(C[0], 12.f / 19.f, kTol);
  EXPECT_NEAR(C[1], 4.f / 11.f, kTol);
  EXPECT_NEAR(C[2], 7.f / 19.f, kTol);
  EXPECT_NEAR(C[3], 7.f / 11.f, kTol);
}

TEST(Sinkhorn, EpsilonPlacement) {
  // Zero logits, eps 0.1, one iteration: softmax 1/2 then + eps = 0.6 each; column normalize divides by
  // (0.6 + 0.6 + eps) = 1.3 -> 6/13 everywhere. (eps inside the softmax or missing gives 0.5.)
  float C[4] = {0.f, 0.f, 0.f, 0.f};
  cpu::sinkhorn(C, 2, 1, 0.1f);
  for (float v : C) EXPECT_NEAR(v, 6.f / 13.f, kTol);
}

TEST(HcSplit, PrePostAndCombFromMix) {
  // n = 1: mix = [pre, post, comb] = [0, 0, 5], base = [1, -1, 0], scale = [2, 3, 1], eps 0.01.
  // pre = sigmoid(0*2 + 1) + 0.01 = 0.7310586 + 0.01; post = 2 sigmoid(-1) = 0.5378828;
  // comb with 1 iteration: a 1x1 softmax is 1, + eps, / (1.01 + eps) = 1.01 / 1.02. With 20 iterations
  // every normalization maps v -> v / (v + eps), whose fixed point is 1 - eps = 0.99 (reached to < 1e-6).
  float mix[3] = {0.f, 0.f, 5.f}, base[3] = {1.f, -1.f, 0.f}, scale[3] = {2.f, 3.f, 1.f};
  float pre, post, comb;
  cpu::hc_split(mix, base, scale, 1, 1, 0.01f, &pre, &post, &comb);
  EXPECT_NEAR(pre, 0.7410586f, kTol);
  EXPECT_NEAR(post, 0.5378828f, kTol);
  EXPECT_NEAR(comb, 1.01f / 1.02f, kTol);
  cpu::hc_split(mix, base, scale, 1, 20, 0.01f, &pre, &post, &comb);
  EXPECT_NEAR(comb, 0.99f, 2e-5f);  // 39 steps of v/(v+eps) from 1.01: distance to the fixed point ~1e-5
}

TEST(Router, SqrtSoftplus) {
  // sqrt(ln 2) = 0.8325546; sqrt(ln(1 + e)) = sqrt(1.3132617) = 1.1459763; z = 25 -> sqrt(25) = 5;
  // z = -25 -> sqrt(e^-25) = e^-12.5 = 3.7266532e-6 (relative check: the value is tiny).
  EXPECT_NEAR(cpu::sqrt_softplus(0.f), 0.8325546f, kTol);
  EXPECT_NEAR(cpu::sqrt_softplus(1.f), 1.1459763f, kTol);
  EXPECT_NEAR(cpu::sqrt_softplus(25.f), 5.f, kTol);
  EXPECT_NEAR(cpu::sqrt_softplus(-25.f) / 3.7266532e-6f, 1.f, 1e-5f);
}

TEST(Router, BiasSelectsButDoesNotWeight) {
  // Scores [0.1, 0.5, 0.3, 0.4], bias [0, -0.3, 0.2, 0] -> biased [0.1, 0.2, 0.5, 0.4]: top-2 = {2, 3}
  // although expert 1 has the best unbiased score. Weights from unbiased scores: 0.3/0.7*1.5, 0.4/0.7*1.5.
  float s[4] = {0.1f, 0.5f, 0.3f, 0.4f}, b[4] = {0.f, -0.3f, 0.2f, 0.f};
  int32_t ids[2];
  float w[2];
  cpu::route_topk(s, b, 4, 2, 1.5f, ids, w);
  EXPECT_EQ(ids[0], 2);
  EXPECT_EQ(ids[1], 3);
  EXPECT_NEAR(w[0], 0.6428571f, kTol);
  EXPECT_NEAR(w[1], 0.8571429f, kTol);
}

TEST(Router, HashWeightsNormalizedOverGivenIds) {
  // ids {3, 0}: 0.4/(0.4+0.1)*2.5 = 2.0, 0.1/0.5*2.5 = 0.5.
  float s[4] = {0.1f, 0.5f, 0.3f, 0.4f};
  int32_t ids[2] = {3, 0};
  float w[2];
  cpu::route_weights(s, ids, 2, 2.5f, w);
  EXPECT_NEAR(w[0], 2.0f, kTol);
  EXPECT_NEAR(w[1], 0.5f, kTol);
}

TEST(SwiGlu, ClampsGateAboveAndUpBothSides) {
  // gate 12 -> 10, up -15 -> -10: silu(10) * -10 = 10 * sigmoid(10) * -10 = -99.995460.
  EXPECT_NEAR(cpu::swiglu_clamped(12.f, -15.f, 10.f), -99.995460f, 1e-4f);
  // gate -20 is not clamped (upper clamp only): silu(-20) * 2 = -20 * 2.0611537e-9 * 2 = -8.2446e-8.
  EXPECT_NEAR(cpu::swiglu_clamped(-20.f, 2.f, 10.f) / -8.2446148e-8f, 1.f, 1e-5f);
  // Unclamped: silu(1) * 3 = 0.7310586 * 3 = 2.1931758.
  EXPECT_NEAR(cpu::swiglu_clamped(1.f, 3.f, 10.f), 2.1931758f, kTol);
}

TEST(CpuBackend, HcPostDirection) {
  // n = 2, D = 2. X0 = [1, 2], X1 = [3, 4], y = [10, 20], post = [1, 2], C = [[0.6, 0.4], [0.3, 0.7]]
  // (row = input stream). X'0 = y + 0.6 X0 + 0.3 X1 = [11.5, 22.4]; X'1 = 2y + 0.4 X0 + 0.7 X1 = [22.5, 43.6].
  auto be = make_cpu_backend();
  HcParams p;
  p.n = 2;
  p.d = 2;
  float X[4] = {1, 2, 3, 4}, y[2] = {10, 20}, post[2] = {1, 2}, C[4] = {0.6f, 0.4f, 0.3f, 0.7f};
  be->hc_post(p, y, post, C, 1, X);
  EXPECT_NEAR(X[0], 11.5f, 1e-5f);
  EXPECT_NEAR(X[1], 22.4f, 1e-5f);
  EXPECT_NEAR(X[2], 22.5f, 1e-5f);
  EXPECT_NEAR(X[3], 43.6f, 1e-5f);
}

TEST(CpuBackend, RmsNormWeighted) {
  // x = [3, 4]: mean(x^2) = 12.5, rsqrt(12.5 + 1e-6) = 0.28284270; w = [1, 2] -> [0.8485281, 2.2627417].
  auto be = make_cpu_backend();
  float x[2] = {3, 4}, y[2], w[2] = {1, 2};
  WeightView wv;
  wv.type = QType::F32;
  wv.data = w;
  wv.ne[0] = 2;
  wv.n_dims = 1;
  be->rms_norm(x, &wv, 1, 2, 1e-6f, y);
  EXPECT_NEAR(y[0], 0.8485281f, kTol);
  EXPECT_NEAR(y[1], 2.2627417f, kTol);
}

TEST(CpuBackend, MoeFfnMatchesPlainLoops) {
  // One token, D = 2, F = 1, E = 2, k = 2, all F32, hand-set weights:
  //   expert 0: w1 = [1, 0], w3 = [0, 1], w2 = [1, 1]^T;  expert 1: w1 = [0, 2], w3 = [1, 1], w2 = [2, -1]^T;
  //   shared:   w1 = [1, 1], w3 = [1, -1], w2 = [0.5, 0.5]^T.   x = [1, 2], weights [0.25, 0.75].
  // expert 0: silu(1)*2 = 1.4621172, *0.25 = 0.3655293 -> [0.3655293, 0.3655293]
  // expert 1: silu(4)*3 = 3.9280552*3 = 11.7841656, *0.75 = 8.8381242 -> [17.6762484, -8.8381242]
  // shared:   silu(3)*(-1) = -2.8577223 -> [-1.4288612, -1.4288612]
  // y = [16.6129165, -9.9014561]
  auto be = make_cpu_backend();
  float g[4] = {1, 0, 0, 2}, u[4] = {0, 1, 1, 1}, d[4] = {1, 1, 2, -1};
  float gs[2] = {1, 1}, us[2] = {1, -1}, ds[2] = {0.5f, 0.5f};
  auto view = [](float* p, int64_t ne0, int64_t ne1, int64_t ne2) {
    WeightView v;
    v.type = QType::F32;
    v.data = p;
    v.ne[0] = ne0;
    v.ne[1] = ne1;
    v.ne[2] = ne2;
    v.n_dims = ne2 > 1 ? 3 : 2;
    return v;
  };
  MoeWeights w;
  w.gate_exps = view(g, 2, 1, 2);
  w.up_exps = view(u, 2, 1, 2);
  w.down_exps = view(d, 1, 2, 2);
  w.gate_shexp = view(gs, 2, 1, 1);
  w.up_shexp = view(us, 2, 1, 1);
  w.down_shexp = view(ds, 1, 2, 1);
  MoeParams p;
  p.n_experts = 2;
  p.n_used = 2;
  p.d = 2;
  p.ff = 1;
  float x[2] = {1, 2}, y[2];
  int32_t ids[2] = {0, 1};
  float wts[2] = {0.25f, 0.75f};
  be->moe_ffn(w, p, x, ids, wts, 1, y);
  EXPECT_NEAR(y[0], 16.6129165f, 1e-5f);
  EXPECT_NEAR(y[1], -9.9014561f, 1e-5f);
}

TEST(CpuBackend, QuantizedExpertMatmulMatchesDequantizedWeights) {
  // A 3-D Q8_0 stack (cols 64, rows 5, 3 experts), 4 tokens: y must equal the plain f32 product with the
  // dequantized weights of the chosen expert up to the Q8_0 activation rounding. Bound per output: each
  // activation block of 32 is rounded with step d = amax/127, error <= d/2 per value, so
  // |dy| <= sum_c |w_c| * d_block(c) / 2 (computed below), plus 1e-5 for fp32 summation.
  const int64_t cols = 64, rows = 5, E = 3;
  const int T = 4;
  std::vector<float> w(size_t(cols * rows * E)), x(size_t(cols * T));
  uint64_t st = 12345;
  auto rnd = [&] {
    st = st * 6364136223846793005ULL + 1442695040888963407ULL;
    return float(double(st >> 11) / double(1ULL << 53) * 2 - 1);
  };
  for (auto& v : w) v = rnd();
  for (auto& v : x) v = rnd() * 3;
  const int64_t rb = row_bytes(QType::Q8_0, cols);
  std::vector<uint8_t> q(size_t(rb * rows * E));
  quantize_rows(QType::Q8_0, w.data(), q.data(), rows * E, cols);
  std::vector<float> wd(w.size());
  for (int64_t r = 0; r < rows * E; ++r) dequantize_row(QType::Q8_0, q.data() + r * rb, wd.data() + r * cols, cols);
  WeightView v;
  v.type = QType::Q8_0;
  v.data = q.data();
  v.ne[0] = cols;
  v.ne[1] = rows;
  v.ne[2] = E;
  v.n_dims = 3;
  v.name = "test";
  auto be = make_cpu_backend();
  std::vector<float> y(size_t(rows * T));
  be->matmul(v, 2, x.data(), T, y.data());
  for (int t = 0; t < T; ++t)
    for (int64_t r = 0; r < rows; ++r) {
      const float* wr = wd.data() + (2 * rows + r) * cols;
      double ref = 0, bound = 1e-5;
      for (int64_t c = 0; c < cols; ++c) {
        ref += double(wr[c]) * x[size_t(t * cols + c)];
        float amax = 0;
        for (int64_t k = c / 32 * 32; k < c / 32 * 32 + 32; ++k) amax = std::max(amax, std::fabs(x[size_t(t * cols + k)]));
        bound += std::fabs(wr[c]) * amax / 127.0 / 2.0;
      }
      EXPECT_NEAR(y[size_t(t * rows + r)], ref, bound) << "token " << t << " row " << r;
    }
}
