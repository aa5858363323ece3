// Streaming compressor (model-spec §6.3, §6.9) against a direct, non-streaming computation written plainly here:
// every complete window is pooled from the full token sequence at once (the batched "prefill" form of §6.8,
// with the 2m-slot overlap tensor for m == 4), in double precision.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <sstream>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu/cpu_backend.h"
#include "model/attention_qat.h"
#include "model/compressor.h"
#include "model/rope.h"
#include "quant/quant.h"

namespace dsv4 {
namespace {

// The compressor runs as the backend's compressor_step op; these tests drive it on the CPU backend.
using CompressorQat = AttnQat;

WeightView f32_view(const std::vector<float>& v) {
  WeightView w;
  w.type = QType::F32;
  w.data = v.data();
  w.ne[0] = int64_t(v.size());
  w.n_dims = 1;
  w.n_bytes = v.size() * sizeof(float);
  w.name = "test";
  return w;
}

// Runs compressor_step for tokens [t0, t1) of v/z (rows of `width` floats) and keeps n_rows in step.
void step(CompressorState& st, const std::vector<float>& v, const std::vector<float>& z, const WeightView& ape,
          const WeightView* norm, const RopeFreqs* rope, CompressorQat qat, int t0, int t1) {
  st.reserve(t1 / st.ratio);
  CompressorParams p;
  p.ape = &ape;
  p.norm = norm;
  p.eps = 1e-6f;
  p.rope = rope;
  p.qat = qat;
  const size_t w = size_t(st.width());
  st.be->compressor_step(p, st.buffers(), v.data() + size_t(t0) * w, z.data() + size_t(t0) * w, t1 - t0, t0);
  st.n_rows = t1 / st.ratio;
}

struct Stream {
  int m, dim, width;
  int n_tokens;
  std::vector<float> v, z, ape, norm;  // v, z: [n_tokens, width]; ape: [m, width]; norm: [dim]
};

Stream make_stream(int m, int dim, int n_tokens, unsigned seed) {
  Stream s{m, dim, (m == 4 ? 2 : 1) * dim, n_tokens, {}, {}, {}, {}};
  std::mt19937 rng(seed);
  std::normal_distribution<float> g(0.f, 1.f);
  auto fill = [&](std::vector<float>& a, size_t n, float scale, float offset) {
    a.resize(n);
    for (auto& x : a) x = offset + scale * g(rng);
  };
  fill(s.v, size_t(n_tokens) * s.width, 1.f, 0.f);
  fill(s.z, size_t(n_tokens) * s.width, 2.f, 0.f);
  fill(s.ape, size_t(m) * s.width, 1.f, 0.f);
  fill(s.norm, size_t(dim), 0.2f, 1.f);
  return s;
}

// Direct computation of row w: pool, weighted RMSNorm, RoPE at w*m, optional QAT. Double precision until the
// final float rounding; RoPE angles in double as well.
std::vector<float> direct_row(const Stream& s, int w, const RopeFreqs& rope, CompressorQat qat) {
  const bool ov = (s.m == 4);
  std::vector<double> u(static_cast<size_t>(s.dim));
  for (int c = 0; c < s.dim; ++c) {
    std::vector<std::pair<double, double>> slots;  // (value, gate)
    if (ov && w > 0)
      for (int i = 0; i < s.m; ++i) {
        int t = (w - 1) * s.m + i;  // previous window's A half
        slots.push_back({s.v[size_t(t) * s.width + c], double(s.z[size_t(t) * s.width + c]) + s.ape[size_t(i) * s.width + c]});
      }
    for (int i = 0; i < s.m; ++i) {
      int t = w * s.m + i, off = ov ? s.dim : 0;  // own window's B half (or the whole row)
      slots.push_back({s.v[size_t(t) * s.width + off + c],
                       double(s.z[size_t(t) * s.width + off + c]) + s.ape[size_t(i) * s.width + off + c]});
    }
    double zmax = -1e300;
    for (auto& sl : slots) zmax = std::max(zmax, sl.second);
    double den = 0, num = 0;
    for (auto& sl : slots) den += std::exp(sl.second - zmax);
    for (auto& sl : slots) num += std::exp(sl.second - zmax) / den * sl.first;
    u[size_t(c)] = num;
  }
  double ss = 0;
  for (double x : u) ss += x * x;
  double r = 1.0 / std::sqrt(ss / s.dim + 1e-6);
  std::vector<float> out(static_cast<size_t>(s.dim));
  for (int c = 0; c < s.dim; ++c) out[size_t(c)] = float(u[size_t(c)] * r * s.norm[size_t(c)]);
  int nr = rope.n_rot, off = s.dim - nr;
  for (int j = 0; j < nr / 2; ++j) {
    double a = double(w) * s.m * rope.omega[size_t(j)];
    double x0 = out[size_t(off + 2 * j)], x1 = out[size_t(off + 2 * j + 1)];
    out[size_t(off + 2 * j)] = float(x0 * std::cos(a) - x1 * std::sin(a));
    out[size_t(off + 2 * j + 1)] = float(x0 * std::sin(a) + x1 * std::cos(a));
  }
  if (qat == CompressorQat::Fp8) qat_fp8_blocks(out.data(), s.dim - nr, 64);
  if (qat == CompressorQat::Fp4Indexer) qat_fp4_indexer_row(out.data(), s.dim);
  return out;
}

// Feeds tokens [t0, t1) in one op call (the compressor consumes them one at a time inside, so chunking is
// irrelevant; SaveLoadRoundTripMidWindow and the attention chunking tests check that).
void feed(const Stream& s, CompressorState& st, const RopeFreqs& rope, CompressorQat qat, int t0, int t1) {
  WeightView ape = f32_view(s.ape), norm = f32_view(s.norm);
  step(st, s.v, s.z, ape, &norm, &rope, qat, t0, t1);
}

void check_against_direct(int m, int dim, int n_tokens, CompressorQat qat) {
  Stream s = make_stream(m, dim, n_tokens, 1234u + unsigned(m));
  RopeFreqs rope = rope_freqs_yarn(160000.0, 16, RopeYarn{16.0, 65536.0, 32.0, 1.0});
  CompressorState st;
  st.init(m, dim, 1 << 20);
  feed(s, st, rope, qat, 0, n_tokens);
  ASSERT_EQ(st.n_rows, n_tokens / m);
  const std::vector<float> rows = st.download_rows();
  int n_values = 0, n_off_grid_neighbour = 0;
  for (int w = 0; w < st.n_rows; ++w) {
    std::vector<float> ref = direct_row(s, w, rope, qat);
    for (int c = 0; c < dim; ++c) {
      // Without QAT: fp32 pooling/norm vs double, values O(1): 2e-5 absolute. With QAT both sides round the
      // same (fp32 vs double, ~1e-6 apart) pre-QAT value onto the FP8/FP4 grid; they agree exactly unless that
      // value sits within ~1e-6 of a rounding midpoint, where they may land on neighbouring grid points (one
      // step: 2^-3 relative for e4m3, up to 1/3 for e2m1). Allow that for at most 1% of the values.
      float got = rows[size_t(w) * dim + c], want = ref[size_t(c)];
      ++n_values;
      if (qat == CompressorQat::None) {
        EXPECT_NEAR(got, want, 2e-5f) << "m=" << m << " row " << w << " ch " << c;
      } else if (std::fabs(got - want) > 1e-6f * std::fabs(want) + 1e-7f) {
        ++n_off_grid_neighbour;
        EXPECT_NEAR(got, want, 0.34f * std::fabs(want) + 1e-6f) << "m=" << m << " row " << w << " ch " << c;
      }
    }
  }
  EXPECT_LE(n_off_grid_neighbour * 100, n_values) << "too many QAT values off the reference grid point";
}

TEST(AttentionCompressor, OverlapRatio4MatchesDirect) { check_against_direct(4, 64, 37, CompressorQat::None); }
TEST(AttentionCompressor, NonOverlapRatio8MatchesDirect) { check_against_direct(8, 64, 45, CompressorQat::None); }
TEST(AttentionCompressor, Ratio16WithFp8MatchesDirect) { check_against_direct(16, 128, 70, CompressorQat::Fp8); }
TEST(AttentionCompressor, IndexerFp4MatchesDirect) { check_against_direct(4, 32, 30, CompressorQat::Fp4Indexer); }

TEST(AttentionCompressor, FirstCsaRowPoolsOnlyItsOwnWindow) {
  // §6.10: row 0 of a CSA compressor pools the B halves of tokens 0..3 only; with equal gates that is the
  // plain mean of the B halves (A halves of tokens 0..3 must have no influence on row 0). No norm weight, no
  // rope, no QAT: the row is that mean RMS-normalized, so channel c must be proportional to (c + 1).
  const int m = 4, d = 16;
  CompressorState st;
  st.init(m, d, 64);
  std::vector<float> v(size_t(4) * 2 * d), z(size_t(4) * 2 * d, 0.f), ape(size_t(m) * 2 * d, 0.f);
  for (int t = 0; t < 4; ++t)
    for (int c = 0; c < d; ++c) {
      v[size_t(t) * 2 * d + c] = 1000.f * float(d - c);          // A half: would dominate if it leaked in
      v[size_t(t) * 2 * d + d + c] = float(t + 1) * float(c + 1);  // B half: mean over t is 2.5 (c + 1)
    }
  WeightView ape_w = f32_view(ape);
  for (int t = 0; t < 3; ++t) step(st, v, z, ape_w, nullptr, nullptr, CompressorQat::None, t, t + 1);
  EXPECT_EQ(st.n_rows, 0);  // the window is still open
  step(st, v, z, ape_w, nullptr, nullptr, CompressorQat::None, 3, 4);
  ASSERT_EQ(st.n_rows, 1);
  const std::vector<float> row = st.download_rows();
  double ss = 0;
  for (int c = 0; c < d; ++c) ss += 2.5 * (c + 1) * 2.5 * (c + 1);
  const double r = 1.0 / std::sqrt(ss / d + 1e-6);
  // fp32 pooling and norm of O(1) values vs double: 1e-5 relative; a leaked A half would be off by O(1).
  for (int c = 0; c < d; ++c) EXPECT_NEAR(row[size_t(c)], 2.5 * (c + 1) * r, 1e-5 * 2.5 * (c + 1) * r + 1e-6);
}

TEST(AttentionCompressor, SaveLoadRoundTripMidWindow) {
  Stream s = make_stream(4, 32, 23, 99u);
  RopeFreqs rope = rope_freqs_plain(10000.0, 16);
  CompressorState a, b;
  a.init(4, 32, 256);
  b.init(4, 32, 256);
  feed(s, a, rope, CompressorQat::None, 0, 14);  // stops mid-window (slot 1 of window 3)
  std::stringstream ss;
  a.save(ss);
  b.load(ss, "test");
  feed(s, a, rope, CompressorQat::None, 14, 23);
  feed(s, b, rope, CompressorQat::None, 14, 23);
  ASSERT_EQ(a.n_rows, b.n_rows);
  ASSERT_EQ(a.download_rows(), b.download_rows());  // bitwise
}

}  // namespace
}  // namespace dsv4
