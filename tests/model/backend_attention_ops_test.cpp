// The attention ops and memory of the op table (backend.h) on the CPU backend, each against a plain reference
// written here (double precision, straight from the header's definitions). These pin the op contract the CUDA
// backend implements; the end-to-end sublayer is checked in attention_forward_test.cpp.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu/cpu_backend.h"
#include "common/error.h"
#include "model/rope.h"
#include "quant/quant.h"

namespace dsv4 {
namespace {

std::vector<float> randn(size_t n, unsigned seed, float scale = 1.f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> g(0.f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = g(rng);
  return v;
}

WeightView f32_view(const std::vector<float>& v, int64_t ne0, int64_t ne1, int n_dims) {
  WeightView w;
  w.type = QType::F32;
  w.data = v.data();
  w.ne[0] = ne0;
  w.ne[1] = ne1;
  w.n_dims = n_dims;
  w.n_bytes = v.size() * sizeof(float);
  w.name = "test";
  return w;
}

TEST(BackendMemory, DeviceBufferCopyIsDeepAndMoveTransfers) {
  auto be = make_cpu_backend();
  DeviceBuffer a = be->alloc(4 * sizeof(float));
  const float src[4] = {1.f, 2.f, 3.f, 4.f};
  be->upload(a.data(), src, sizeof src);
  DeviceBuffer b = a;  // deep copy
  ASSERT_NE(b.data(), a.data());
  be->fill(a.f32(), 7.f, 4);
  float got[4];
  be->download(got, b.data(), sizeof got);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(got[i], src[i]);  // untouched by the fill of a: exact
  be->download(got, a.data(), sizeof got);
  for (float v : got) EXPECT_EQ(v, 7.f);
  void* p = a.data();
  DeviceBuffer c = std::move(a);
  EXPECT_EQ(c.data(), p);
  EXPECT_EQ(a.data(), nullptr);
  EXPECT_EQ(a.bytes(), 0u);
}

TEST(BackendAttentionOps, MatmulGroupedMatchesPerGroupDot) {
  auto be = make_cpu_backend();
  const int G = 3, gin = 20, ro = 5, T = 4;
  auto W = randn(size_t(G) * ro * gin, 1u);
  auto x = randn(size_t(T) * G * gin, 2u);
  std::vector<float> y(size_t(T) * G * ro);
  be->matmul_grouped(f32_view(W, gin, G * ro, 2), G, x.data(), T, y.data());
  for (int t = 0; t < T; ++t)
    for (int g = 0; g < G; ++g)
      for (int r = 0; r < ro; ++r) {
        double s = 0;
        for (int c = 0; c < gin; ++c)
          s += double(W[(size_t(g) * ro + r) * gin + c]) * x[(size_t(t) * G + g) * gin + c];
        // fp32 dot of 20 O(1) terms vs double: 1e-5 absolute.
        EXPECT_NEAR(y[(size_t(t) * G + g) * ro + r], s, 1e-5);
      }
  EXPECT_THROW(be->matmul_grouped(f32_view(W, gin, G * ro, 2), 4, x.data(), T, y.data()), Error);  // 15 % 4
}

TEST(BackendAttentionOps, HeadPrepInverseRopeUndoesRope) {
  auto be = make_cpu_backend();
  const int T = 3, H = 2, dim = 12;
  RopeFreqs rope = rope_freqs_plain(10000.0, 8);
  auto x0 = randn(size_t(T) * H * dim, 3u);
  auto x = x0;
  HeadPrep p;
  p.rope = &rope;
  p.pos0 = 1000;
  be->head_prep(x.data(), T, H, dim, p);
  EXPECT_NE(x, x0);
  for (int t = 0; t < T; ++t)  // the first dim - n_rot dims are not rotated: exact
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < dim - 8; ++i) EXPECT_EQ(x[(size_t(t) * H + h) * dim + i], x0[(size_t(t) * H + h) * dim + i]);
  p.inverse = true;
  be->head_prep(x.data(), T, H, dim, p);
  // Two fp32 rotations of O(1) values: a few ulps, 1e-6 absolute.
  for (size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(x[i], x0[i], 1e-6);
}

// Plain sink attention of one query over explicit rows (double).
std::vector<double> ref_attend(const float* q, const std::vector<const float*>& rows, int dim, double sink,
                               double scale) {
  std::vector<double> l;
  double M = sink;
  for (const float* r : rows) {
    double s = 0;
    for (int d = 0; d < dim; ++d) s += double(q[d]) * r[d];
    l.push_back(scale * s);
    M = std::max(M, l.back());
  }
  double den = std::exp(sink - M);
  std::vector<double> out(static_cast<size_t>(dim), 0.0);
  for (size_t i = 0; i < rows.size(); ++i) {
    double e = std::exp(l[i] - M);
    den += e;
    for (int d = 0; d < dim; ++d) out[size_t(d)] += e * rows[i][d];
  }
  for (auto& v : out) v /= den;
  return out;
}

TEST(BackendAttentionOps, SinkAttentionReadsRingThenNewRowsThenSelected) {
  // Window 4, 9 earlier positions in the ring (slots p mod 4 for p = 5..8), a pass of T = 3 tokens at p0 = 9,
  // ratio 4, top-2 selected compressed rows. Token t at p = 9 + t sees positions max(0, p - 3) .. p and
  // min(2, (p + 1) / 4) selected rows.
  auto be = make_cpu_backend();
  const int H = 2, dh = 8, W = 4, T = 3, m = 4, K = 2;
  const int64_t p0 = 9;
  auto all_kv = randn(size_t(p0 + T) * dh, 4u);  // row p = KV of position p
  std::vector<float> ring(size_t(W) * dh);
  for (int64_t p = p0 - W; p < p0; ++p) std::copy_n(&all_kv[size_t(p) * dh], dh, &ring[size_t(p % W) * dh]);
  std::vector<float> kv_new(all_kv.begin() + p0 * dh, all_kv.end());
  auto comp = randn(size_t(3) * dh, 5u);
  std::vector<int32_t> sel = {2, 0, 1, 2, 0, 1};  // token rows; token 0 (p 9) sees 2 rows, uses {2, 0} in order
  auto q = randn(size_t(T) * H * dh, 6u);
  std::vector<float> sinks = {0.5f, -1.f}, out(size_t(T) * H * dh);
  WeightView sv = f32_view(sinks, H, 1, 1);
  SinkAttnParams p;
  p.heads = H, p.dim = dh, p.window = W, p.ratio = m, p.comp = CompRows::Selected, p.top_k = K;
  p.sinks = &sv;
  p.scale = 0.35f;
  be->sink_attention(p, q.data(), kv_new.data(), ring.data(), comp.data(), sel.data(), T, p0, out.data());
  for (int t = 0; t < T; ++t) {
    const int64_t pos = p0 + t;
    std::vector<const float*> rows;
    for (int64_t r = std::max<int64_t>(0, pos - W + 1); r <= pos; ++r) rows.push_back(&all_kv[size_t(r) * dh]);
    const int64_t n_sel = std::min<int64_t>(K, (pos + 1) / m);
    for (int64_t i = 0; i < n_sel; ++i) rows.push_back(&comp[size_t(sel[size_t(t) * K + i]) * dh]);
    for (int h = 0; h < H; ++h) {
      auto ref = ref_attend(&q[(size_t(t) * H + h) * dh], rows, dh, sinks[size_t(h)], 0.35);
      // fp32 softmax over <= 6 rows of O(1) values vs double: 1e-5 absolute.
      for (int d = 0; d < dh; ++d) EXPECT_NEAR(out[(size_t(t) * H + h) * dh + d], ref[size_t(d)], 1e-5);
    }
  }
}

TEST(BackendAttentionOps, WindowStoreKeepsTheLastWRows) {
  auto be = make_cpu_backend();
  const int W = 4, dim = 2, T = 6;
  std::vector<float> ring(size_t(W) * dim, -1.f), kv(size_t(T) * dim);
  std::iota(kv.begin(), kv.end(), 0.f);  // row t = {2t, 2t+1}
  be->window_store(ring.data(), W, dim, kv.data(), T, /*p0=*/3);  // positions 3..8: last 4 are 5..8 (t 2..5)
  for (int t = 2; t < T; ++t) {
    const int slot = (3 + t) % W;
    EXPECT_EQ(ring[size_t(slot) * dim], float(2 * t));  // copies: exact
    EXPECT_EQ(ring[size_t(slot) * dim + 1], float(2 * t + 1));
  }
}

TEST(BackendAttentionOps, IndexerTopKMatchesBruteForce) {
  auto be = make_cpu_backend();
  const int HI = 2, dI = 16, m = 4, K = 3, T = 4;
  const int64_t p0 = 13;  // visible rows for t = 0..3: (14..17) / 4 = 3, 3, 4, 4
  const int n_keys = int((p0 + T) / m);
  auto keys = randn(size_t(n_keys) * dI, 7u);
  auto qI = randn(size_t(T) * HI * dI, 8u);
  auto wI = randn(size_t(T) * HI, 9u);
  std::vector<int32_t> sel(size_t(T) * K, -7);
  IndexerParams p;
  p.heads = HI, p.dim = dI, p.ratio = m, p.top_k = K, p.weight_scale = 0.125f;
  be->indexer_topk(p, qI.data(), wI.data(), keys.data(), T, p0, sel.data());
  for (int t = 0; t < T; ++t) {
    const int64_t n_vis = (p0 + t + 1) / m;
    std::vector<std::pair<double, int>> sc;
    for (int i = 0; i < n_vis; ++i) {
      double s = 0;
      for (int h = 0; h < HI; ++h) {
        double d = 0;
        for (int c = 0; c < dI; ++c) d += double(qI[(size_t(t) * HI + h) * dI + c]) * keys[size_t(i) * dI + c];
        s += double(wI[size_t(t) * HI + h]) * 0.125 * std::max(0.0, d);
      }
      sc.push_back({-s, i});
    }
    std::sort(sc.begin(), sc.end());
    std::vector<int32_t> want;
    for (int i = 0; i < std::min<int64_t>(K, n_vis); ++i) want.push_back(sc[size_t(i)].second);
    std::sort(want.begin(), want.end());
    // Random scores are separated by far more than fp32 error, so the selection must be identical.
    std::vector<int32_t> got(sel.begin() + t * K, sel.begin() + t * K + int(want.size()));
    EXPECT_EQ(got, want) << "token " << t;
  }
}

}  // namespace
}  // namespace dsv4
