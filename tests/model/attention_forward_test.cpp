// The attention sublayer end to end on small random F32 weights:
//   * against a naive whole-sequence reference written plainly here in double precision (model-spec §6:
//     every token recomputes everything from the full input, no streaming, no ring, no sub-passes);
//   * chunked prefill == whole prefill (bitwise), T decodes == prefill, save/load == never stopping (bitwise).
// Shapes are tiny but keep every path: sliding (m=0), CSA (m=4, overlap + indexer with top-k below the visible
// count) and HCA-style (m=8), window 8 so the ring wraps, and enough tokens for several compressed rows.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <sstream>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "common/error.h"
#include "common/thread_pool.h"
#include "model/attention.h"
#include "model/attention_qat.h"
#include "quant/quant.h"

namespace dsv4 {
namespace {

AttentionShape tiny_shape(int ratio) {
  AttentionShape s;
  s.d_model = 48;
  s.n_heads = 4;
  s.head_dim = 64;
  s.rope_dim = 16;
  s.q_rank = 24;
  s.o_groups = 2;
  s.o_rank = 12;
  s.window = 8;
  s.ratio = ratio;
  s.idx_heads = 3;
  s.idx_dim = 32;
  s.idx_topk = 3;
  s.eps = 1e-6f;
  s.max_context = 256;
  s.rope = ratio == 0 ? rope_freqs_plain(10000.0, 16) : rope_freqs_yarn(160000.0, 16, RopeYarn{16.0, 64.0, 32.0, 1.0});
  return s;
}

// Owns random F32 tensors and the views onto them.
struct TinyWeights {
  std::vector<std::vector<float>> store;
  AttentionWeights w;
  std::mt19937 rng{7};

  WeightView make(int64_t ne0, int64_t ne1, float scale, float offset, int n_dims) {
    std::normal_distribution<float> g(0.f, 1.f);
    store.emplace_back(size_t(ne0 * ne1));
    for (auto& x : store.back()) x = offset + scale * g(rng);
    WeightView v;
    v.type = QType::F32;
    v.data = store.back().data();
    v.ne[0] = ne0;
    v.ne[1] = ne1;
    v.n_dims = n_dims;
    v.n_bytes = size_t(ne0 * ne1) * 4;
    v.name = "test";
    return v;
  }
  WeightView mat(int64_t in, int64_t out) { return make(in, out, 1.f / std::sqrt(float(in)), 0.f, 2); }
  WeightView vec(int64_t n, float scale, float offset) { return make(n, 1, scale, offset, 1); }
  CompressorWeights comp(int64_t D, int m, int width, int dim) {
    CompressorWeights c;
    c.kv = mat(D, width);
    c.gate = make(D, width, 2.f / std::sqrt(float(D)), 0.f, 2);
    c.ape = make(width, m, 0.5f, 0.f, 2);
    c.norm = vec(dim, 0.2f, 1.f);
    return c;
  }

  explicit TinyWeights(const AttentionShape& s) {
    store.reserve(64);  // views point into store: no reallocation
    const int64_t D = s.d_model, qd = int64_t(s.n_heads) * s.head_dim;
    w.q_a = mat(D, s.q_rank);
    w.q_a_norm = vec(s.q_rank, 0.2f, 1.f);
    w.q_b = mat(s.q_rank, qd);
    w.kv = mat(D, s.head_dim);
    w.kv_norm = vec(s.head_dim, 0.2f, 1.f);
    w.sinks = vec(s.n_heads, 1.f, 0.f);
    w.output_a = mat(qd / s.o_groups, int64_t(s.o_groups) * s.o_rank);
    w.output_b = mat(int64_t(s.o_groups) * s.o_rank, D);
    if (s.has_compressor()) w.compressor = comp(D, s.ratio, (s.has_indexer() ? 2 : 1) * s.head_dim, s.head_dim);
    if (s.has_indexer()) {
      w.indexer.q_b = mat(s.q_rank, int64_t(s.idx_heads) * s.idx_dim);
      // Indexer weights at a large scale so the top-k is decided by clear score gaps, not near-ties.
      w.indexer.proj = make(D, s.idx_heads, 4.f / std::sqrt(float(D)), 0.f, 2);
      w.indexer.compressor = comp(D, s.ratio, 2 * s.idx_dim, s.idx_dim);
    }
  }
};

std::vector<float> random_input(int T, int D, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> g(0.f, 1.f);
  std::vector<float> x(size_t(T) * D);
  for (auto& v : x) v = g(rng);
  return x;
}

// ---- naive reference ----------------------------------------------------------------------------------------
using Vec = std::vector<double>;

Vec matvec(const WeightView& w, const double* x) {  // y[r] = sum_c W[r][c] x[c], W GGUF [cols, rows]
  Vec y(size_t(w.ne[1]), 0.0);
  const float* W = static_cast<const float*>(w.data);
  for (int64_t r = 0; r < w.ne[1]; ++r)
    for (int64_t c = 0; c < w.ne[0]; ++c) y[size_t(r)] += double(W[r * w.ne[0] + c]) * x[c];
  return y;
}
void rmsnorm(double* x, int n, const float* w) {
  double ss = 0;
  for (int i = 0; i < n; ++i) ss += x[i] * x[i];
  double r = 1.0 / std::sqrt(ss / n + 1e-6);
  for (int i = 0; i < n; ++i) x[i] *= r * (w ? double(w[i]) : 1.0);
}
void rope(double* x, int len, const RopeFreqs& f, int64_t pos, double sign) {
  double* t = x + len - f.n_rot;
  for (int j = 0; j < f.n_rot / 2; ++j) {
    double a = sign * double(pos) * f.omega[size_t(j)], c = std::cos(a), s = std::sin(a);
    double x0 = t[2 * j], x1 = t[2 * j + 1];
    t[2 * j] = x0 * c - x1 * s;
    t[2 * j + 1] = x0 * s + x1 * c;
  }
}
void qat(double* x, int n, bool fp4) {  // the QAT functions are tested on their own (primitives test)
  std::vector<float> f(x, x + n);
  if (fp4) qat_fp4_indexer_row(f.data(), n); else qat_fp8_blocks(f.data(), n, 64);
  for (int i = 0; i < n; ++i) x[i] = f[size_t(i)];
}

// Compressed rows of every complete window of the whole sequence (model-spec §6.3).
std::vector<Vec> ref_compress(const CompressorWeights& cw, const std::vector<Vec>& xs, int m, int dim,
                              const RopeFreqs& f, int nrot_dims, bool qat_on, bool fp4) {
  const bool ov = (m == 4);
  const int width = (ov ? 2 : 1) * dim;
  std::vector<Vec> v, z;
  for (size_t t = 0; t < xs.size(); ++t) {
    v.push_back(matvec(cw.kv, xs[t].data()));
    z.push_back(matvec(cw.gate, xs[t].data()));
    for (int i = 0; i < width; ++i) z.back()[size_t(i)] += cw.ape.f32()[(t % m) * width + size_t(i)];
  }
  std::vector<Vec> rows;
  for (size_t w = 0; (w + 1) * m <= xs.size(); ++w) {
    Vec u(static_cast<size_t>(dim));
    for (int c = 0; c < dim; ++c) {
      std::vector<std::pair<double, double>> sl;
      if (ov && w > 0)
        for (int i = 0; i < m; ++i) sl.push_back({v[(w - 1) * m + i][size_t(c)], z[(w - 1) * m + i][size_t(c)]});
      for (int i = 0; i < m; ++i) sl.push_back({v[w * m + i][size_t(ov ? dim + c : c)], z[w * m + i][size_t(ov ? dim + c : c)]});
      double zm = -1e300, den = 0, num = 0;
      for (auto& p : sl) zm = std::max(zm, p.second);
      for (auto& p : sl) den += std::exp(p.second - zm), num += std::exp(p.second - zm) * p.first;
      u[size_t(c)] = num / den;
    }
    rmsnorm(u.data(), dim, cw.norm.f32());
    rope(u.data(), dim, f, int64_t(w) * m, 1.0);
    if (qat_on) qat(u.data(), fp4 ? dim : dim - nrot_dims, fp4);
    rows.push_back(u);
  }
  return rows;
}

// The sublayer output for every token of the sequence x [T, D].
std::vector<float> reference(const AttentionShape& s, const AttentionWeights& w, const std::vector<float>& xf,
                             int T, bool qat_on) {
  const int D = s.d_model, H = s.n_heads, dh = s.head_dim, dr = s.rope_dim, m = s.ratio;
  std::vector<Vec> xs, q, kv, qr;
  for (int t = 0; t < T; ++t) xs.emplace_back(xf.begin() + size_t(t) * D, xf.begin() + size_t(t + 1) * D);
  for (int t = 0; t < T; ++t) {
    Vec a = matvec(w.q_a, xs[size_t(t)].data());
    rmsnorm(a.data(), s.q_rank, w.q_a_norm.f32());
    qr.push_back(a);
    Vec b = matvec(w.q_b, a.data());
    for (int h = 0; h < H; ++h) rmsnorm(b.data() + h * dh, dh, nullptr), rope(b.data() + h * dh, dh, s.rope, t, 1);
    q.push_back(b);
    Vec k = matvec(w.kv, xs[size_t(t)].data());
    rmsnorm(k.data(), dh, w.kv_norm.f32());
    rope(k.data(), dh, s.rope, t, 1);
    if (qat_on) qat(k.data(), dh - dr, false);
    kv.push_back(k);
  }
  std::vector<Vec> comp, idx;
  if (m > 0) comp = ref_compress(w.compressor, xs, m, dh, s.rope, dr, qat_on, false);
  if (m == 4) idx = ref_compress(w.indexer.compressor, xs, m, s.idx_dim, s.rope, dr, qat_on, true);

  std::vector<float> out(size_t(T) * D);
  for (int t = 0; t < T; ++t) {
    std::vector<const Vec*> rows;
    for (int p = std::max(0, t - s.window + 1); p <= t; ++p) rows.push_back(&kv[size_t(p)]);
    int n_vis = m > 0 ? (t + 1) / m : 0;
    if (m == 4 && n_vis > s.idx_topk) {
      Vec qi = matvec(w.indexer.q_b, qr[size_t(t)].data()), wi = matvec(w.indexer.proj, xs[size_t(t)].data());
      for (int h = 0; h < s.idx_heads; ++h) {
        rope(qi.data() + h * s.idx_dim, s.idx_dim, s.rope, t, 1);
        if (qat_on) qat(qi.data() + h * s.idx_dim, s.idx_dim, true);
      }
      std::vector<std::pair<double, int>> sc;
      for (int r = 0; r < n_vis; ++r) {
        double v = 0;
        for (int h = 0; h < s.idx_heads; ++h) {
          double d = 0;
          for (int i = 0; i < s.idx_dim; ++i) d += qi[size_t(h * s.idx_dim + i)] * idx[size_t(r)][size_t(i)];
          v += wi[size_t(h)] / std::sqrt(double(s.idx_dim * s.idx_heads)) * std::max(0.0, d);
        }
        sc.push_back({-v, r});
      }
      std::sort(sc.begin(), sc.end());
      std::vector<int> pick;
      for (int i = 0; i < s.idx_topk; ++i) pick.push_back(sc[size_t(i)].second);
      std::sort(pick.begin(), pick.end());
      for (int r : pick) rows.push_back(&comp[size_t(r)]);
    } else {
      for (int r = 0; r < n_vis; ++r) rows.push_back(&comp[size_t(r)]);
    }
    Vec o(size_t(H) * dh, 0.0);
    for (int h = 0; h < H; ++h) {
      const double* qh = q[size_t(t)].data() + h * dh;
      std::vector<double> l;
      double mx = w.sinks.f32()[h];
      for (auto* r : rows) {
        double d = 0;
        for (int i = 0; i < dh; ++i) d += qh[i] * (*r)[size_t(i)];
        l.push_back(d / std::sqrt(double(dh)));
        mx = std::max(mx, l.back());
      }
      double den = std::exp(w.sinks.f32()[h] - mx);
      for (double v : l) den += std::exp(v - mx);
      for (size_t k = 0; k < rows.size(); ++k)
        for (int i = 0; i < dh; ++i) o[size_t(h * dh + i)] += std::exp(l[k] - mx) / den * (*rows[k])[size_t(i)];
      rope(o.data() + h * dh, dh, s.rope, t, -1.0);
    }
    const int gin = H / s.o_groups * dh;
    Vec low;
    for (int g = 0; g < s.o_groups; ++g) {
      const float* W = w.output_a.f32() + int64_t(g) * s.o_rank * gin;
      for (int r = 0; r < s.o_rank; ++r) {
        double acc = 0;
        for (int c = 0; c < gin; ++c) acc += double(W[r * gin + c]) * o[size_t(g * gin + c)];
        low.push_back(acc);
      }
    }
    Vec y = matvec(w.output_b, low.data());
    for (int i = 0; i < D; ++i) out[size_t(t) * D + i] = float(y[size_t(i)]);
  }
  return out;
}

// ---- runners --------------------------------------------------------------------------------------------
std::vector<float> run_chunks(const AttentionShape& s, const AttentionWeights& w, const std::vector<float>& x,
                              int T, const std::vector<int>& chunks, bool qat_on, int pass = 256,
                              AttentionState* state_out = nullptr, Backend* be = nullptr) {
  AttentionState st(s, be);  // be == nullptr: host_backend()
  AttentionOptions opt;
  opt.qat_sim = qat_on;
  opt.max_tokens_per_pass = pass;
  std::vector<float> out(size_t(T) * s.d_model);
  int t0 = 0;
  size_t ci = 0;
  while (t0 < T) {
    int n = ci < chunks.size() ? std::min(chunks[ci++], T - t0) : T - t0;
    std::vector<int64_t> pos(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) pos[size_t(i)] = t0 + i;
    attention_forward(w, st, x.data() + size_t(t0) * s.d_model, pos.data(), n, out.data() + size_t(t0) * s.d_model,
                      opt);
    t0 += n;
  }
  if (state_out) *state_out = st;
  return out;
}

double rel_err(const std::vector<float>& a, const std::vector<float>& ref) {
  double md = 0, mr = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    md = std::max(md, std::fabs(double(a[i]) - ref[i]));
    mr = std::max(mr, std::fabs(double(ref[i])));
  }
  return md / mr;
}

class AttentionForward : public ::testing::TestWithParam<int> {};

TEST_P(AttentionForward, MatchesNaiveReferenceWithoutQat) {
  AttentionShape s = tiny_shape(GetParam());
  TinyWeights tw(s);
  const int T = 41;
  auto x = random_input(T, s.d_model, 11u);
  auto ref = reference(s, tw.w, x, T, false);
  auto got = run_chunks(s, tw.w, x, T, {}, false);
  std::printf("[ info ] ratio %d, no QAT: max|d|/max|ref| vs naive double reference = %.3g\n", GetParam(),
              rel_err(got, ref));
  // fp32 engine vs double reference over sums of <= ~100 O(1) terms: max|diff|/max|ref| <= 1e-4 (the issue's
  // acceptance bound for logits vs HF); measured values are ~1e-6.
  EXPECT_LE(rel_err(got, ref), 1e-4);
}

TEST_P(AttentionForward, MatchesNaiveReferenceWithQat) {
  AttentionShape s = tiny_shape(GetParam());
  TinyWeights tw(s);
  const int T = 41;
  auto x = random_input(T, s.d_model, 12u);
  auto ref = reference(s, tw.w, x, T, true);
  auto got = run_chunks(s, tw.w, x, T, {}, true);
  std::printf("[ info ] ratio %d, QAT: max|d|/max|ref| vs naive double reference = %.3g\n", GetParam(),
              rel_err(got, ref));
  // Same bound as without QAT: both sides round the same float values onto the FP8/FP4 grids, so they agree
  // unless a value sits within ~1e-6 of a rounding midpoint (none does for this seed); a flipped grid point
  // or indexer pick would show up as an error of order 1e-2.
  EXPECT_LE(rel_err(got, ref), 1e-4);
}

TEST_P(AttentionForward, ChunkedPrefillIsBitwiseEqualToWhole) {
  AttentionShape s = tiny_shape(GetParam());
  TinyWeights tw(s);
  const int T = 61;
  auto x = random_input(T, s.d_model, 13u);
  AttentionState a, b, c;
  auto whole = run_chunks(s, tw.w, x, T, {}, true, 256, &a);
  auto chunked = run_chunks(s, tw.w, x, T, {7, 13, 1, 1, 5}, true, 256, &b);
  auto passes = run_chunks(s, tw.w, x, T, {}, true, /*pass=*/3, &c);  // internal sub-passes of 3 tokens
  EXPECT_EQ(whole, chunked);
  EXPECT_EQ(whole, passes);
  std::stringstream sa, sb, sc;
  a.save(sa);
  b.save(sb);
  c.save(sc);
  EXPECT_EQ(sa.str(), sb.str());
  EXPECT_EQ(sa.str(), sc.str());
}

TEST_P(AttentionForward, ThreadCountDoesNotChangeBits) {
  AttentionShape s = tiny_shape(GetParam());
  TinyWeights tw(s);
  const int T = 40;
  auto x = random_input(T, s.d_model, 16u);
  ThreadPool one(1), three(3);
  auto be1 = make_cpu_backend(&one), be3 = make_cpu_backend(&three);
  auto a = run_chunks(s, tw.w, x, T, {}, true, 256, nullptr, be1.get());
  auto b = run_chunks(s, tw.w, x, T, {}, true, 256, nullptr, be3.get());
  EXPECT_EQ(a, b);  // static partition, one owner per output value: bitwise
}

TEST_P(AttentionForward, DecodeEqualsPrefill) {
  AttentionShape s = tiny_shape(GetParam());
  TinyWeights tw(s);
  const int T = 45;
  auto x = random_input(T, s.d_model, 14u);
  auto prefill = run_chunks(s, tw.w, x, T, {}, true);
  auto decode = run_chunks(s, tw.w, x, T, std::vector<int>(size_t(T), 1), true);
  std::printf("[ info ] ratio %d: decode vs prefill max|d|/max|ref| = %.3g\n", GetParam(), rel_err(decode, prefill));
  // Every token's row is computed by the same code in the same order whatever the batch, and the F32 matmul
  // gives each output value one fixed summation order: decode is expected to be bitwise equal. The contract
  // only promises fp32 tolerance (1e-5 relative), so that is what is required.
  EXPECT_LE(rel_err(decode, prefill), 1e-5);
}

TEST_P(AttentionForward, SaveLoadEqualsNeverStopping) {
  AttentionShape s = tiny_shape(GetParam());
  TinyWeights tw(s);
  const int T = 50, cut = 23;  // cut inside a compressor window and after the ring wrapped
  auto x = random_input(T, s.d_model, 15u);
  auto straight = run_chunks(s, tw.w, x, T, {cut}, true);

  AttentionState st;
  run_chunks(s, tw.w, x, cut, {}, true, 256, &st);
  std::stringstream ss;
  st.save(ss);
  AttentionState restored(s);
  restored.load(ss);
  std::stringstream again;
  restored.save(again);
  EXPECT_EQ(ss.str(), again.str());  // byte-exact round trip

  std::vector<float> out(size_t(T - cut) * s.d_model);
  std::vector<int64_t> pos(size_t(T - cut));
  for (int i = 0; i < T - cut; ++i) pos[size_t(i)] = cut + i;
  attention_forward(tw.w, restored, x.data() + size_t(cut) * s.d_model, pos.data(), T - cut, out.data(), {});
  std::vector<float> tail(straight.begin() + size_t(cut) * s.d_model, straight.end());
  EXPECT_EQ(out, tail);
}

INSTANTIATE_TEST_SUITE_P(Kinds, AttentionForward, ::testing::Values(0, 4, 8),
                         [](const auto& info) { return info.param == 0 ? std::string("Sliding")
                                                       : info.param == 4 ? std::string("Csa") : std::string("Hca8"); });

// Flash's per-head geometry (head_dim 512 with 64 rotary dims: seven full FP8 blocks; indexer heads of 128:
// a full-size Hadamard and four FP4 blocks; YaRN with Flash's constants; HCA ratio 128) at a small model
// width, against the same naive reference, with and without the QAT round trips.
TEST(AttentionForwardFlashHeads, MatchesNaiveReference) {
  for (int ratio : {0, 4, 128}) {
    AttentionShape s = tiny_shape(ratio);
    s.head_dim = 512;
    s.rope_dim = 64;
    s.n_heads = 2;
    s.o_groups = 2;
    s.idx_heads = 4;
    s.idx_dim = 128;
    s.idx_topk = 8;
    s.max_context = 512;
    s.rope = ratio == 0 ? rope_freqs_plain(10000.0, 64)
                        : rope_freqs_yarn(160000.0, 64, RopeYarn{16.0, 65536.0, 32.0, 1.0});
    TinyWeights tw(s);
    const int T = ratio == 128 ? 260 : 60;  // HCA: two compressed rows; CSA: 15 rows, top-k 8 prunes
    auto x = random_input(T, s.d_model, 31u + unsigned(ratio));
    std::vector<float> got_noqat;
    for (bool q : {false, true}) {
      auto ref = reference(s, tw.w, x, T, q);
      auto got = run_chunks(s, tw.w, x, T, {17, 50}, q);
      double e = rel_err(got, ref);
      std::printf("[ info ] Flash heads, ratio %d, QAT %d: max|d|/max|ref| vs naive reference = %.3g\n", ratio,
                  int(q), e);
      if (!q) {
        // fp32 vs double: 1e-4 of the output range, as in MatchesNaiveReference*.
        EXPECT_LE(e, 1e-4) << "ratio " << ratio;
        got_noqat = got;
        continue;
      }
      // With QAT, fp32 and double round the rare value that sits within ~1e-7 of an FP8 midpoint to
      // neighbouring grid points (one step = 1/8 of the value). Diagnosed for ratio 128: the compressed rows
      // agree on the grid, one window KV row flips and moves the 8 queries of its window (tokens 77..84) by up
      // to 2e-4. 1e-3 still separates that from a QAT bug: leaving the round trips out altogether moves the
      // output by the amount printed below (required to be > 3e-3).
      EXPECT_LE(e, 1e-3) << "ratio " << ratio;
      double skipped = rel_err(got_noqat, ref);
      std::printf("[ info ] Flash heads, ratio %d: engine without QAT vs reference with QAT = %.3g\n", ratio,
                  skipped);
      EXPECT_GT(skipped, 3e-3) << "ratio " << ratio;
    }
  }
}

// Quantized projections: the same weights stored as Q8_0 vs the F32 copy of exactly their dequantized values,
// so the outputs differ only by the Q8_0 rounding of the matmul inputs. Catches wrong row/group strides of
// block-quantized matrices (e.g. the per-group slices of output_a), which give O(1) relative errors.
TEST(AttentionForwardQuant, Q8_0WeightsMatchTheirDequantizedF32) {
  for (int ratio : {0, 4, 8}) {
    AttentionShape s = tiny_shape(ratio);
    s.d_model = 64;  // every matrix input width a multiple of the Q8_0 block (32)
    s.q_rank = 32;
    s.o_rank = 32;
    s.idx_topk = 1000;  // no top-k pruning: a near-tie flip would not be a stride bug
    TinyWeights tw(s);
    AttentionWeights q8 = tw.w;
    std::vector<std::vector<uint8_t>> qstore;
    auto requant = [&](WeightView& f32, WeightView& q) {
      const int64_t rows = f32.ne[1], cols = f32.ne[0];
      float* data = const_cast<float*>(f32.f32());
      qstore.emplace_back(size_t(rows * row_bytes(QType::Q8_0, cols)));
      quantize_rows(QType::Q8_0, data, qstore.back().data(), rows, cols);
      for (int64_t r = 0; r < rows; ++r)  // the F32 copy becomes exactly the dequantized weights
        dequantize_row(QType::Q8_0, qstore.back().data() + r * row_bytes(QType::Q8_0, cols), data + r * cols, cols);
      q.type = QType::Q8_0;
      q.data = qstore.back().data();
      q.n_bytes = qstore.back().size();
    };
    qstore.reserve(16);
    requant(tw.w.q_a, q8.q_a);
    requant(tw.w.q_b, q8.q_b);
    requant(tw.w.kv, q8.kv);
    requant(tw.w.output_a, q8.output_a);
    requant(tw.w.output_b, q8.output_b);
    if (s.has_compressor()) {
      requant(tw.w.compressor.kv, q8.compressor.kv);
      requant(tw.w.compressor.gate, q8.compressor.gate);
    }
    if (s.has_indexer()) {
      requant(tw.w.indexer.q_b, q8.indexer.q_b);
      requant(tw.w.indexer.proj, q8.indexer.proj);
    }
    const int T = 30;
    auto x = random_input(T, s.d_model, 21u);
    auto f = run_chunks(s, tw.w, x, T, {}, false);
    auto q = run_chunks(s, q8, x, T, {}, false);
    // Q8_0 rounds each activation to 8 bits per 32-block (relative step <= 1/127); through ~6 chained
    // projections (~0.45% RMS each for Gaussian inputs) the max output error is ~1% (measured 1.2-1.3%); a
    // stride bug moves it by O(100%).
    double e = rel_err(q, f);
    std::printf("[ info ] attention ratio %d: Q8_0 vs dequantized F32 max|d|/max|ref| = %.3g\n", ratio, e);
    EXPECT_LE(e, 3e-2) << "ratio " << ratio;
  }
}

TEST(AttentionForwardErrors, BadInputsThrowPreciseErrors) {
  AttentionShape s = tiny_shape(4);
  TinyWeights tw(s);
  AttentionState st(s);
  auto x = random_input(2, s.d_model, 1u);
  std::vector<float> out(size_t(2) * s.d_model);
  int64_t bad_pos[2] = {1, 2};  // the session is at position 0
  EXPECT_THROW(attention_forward(tw.w, st, x.data(), bad_pos, 2, out.data(), {}), Error);
  AttentionWeights broken = tw.w;
  broken.kv.ne[1] = 63;
  broken.kv.name = "blk.2.attn_kv.weight";
  int64_t pos[2] = {0, 1};
  try {
    attention_forward(broken, st, x.data(), pos, 2, out.data(), {});
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("blk.2.attn_kv.weight"), std::string::npos) << e.what();
  }
  // Truncated state stream: error names the field.
  std::stringstream ss;
  st.save(ss);
  std::string bytes = ss.str();
  std::stringstream cut(bytes.substr(0, bytes.size() / 2));
  AttentionState other(s);
  try {
    other.load(cut);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("truncated"), std::string::npos) << e.what();
  }
  // A state of another layer kind is rejected by its header.
  AttentionState hca(tiny_shape(8));
  std::stringstream s2(bytes);
  EXPECT_THROW(hca.load(s2), Error);
}

}  // namespace
}  // namespace dsv4
