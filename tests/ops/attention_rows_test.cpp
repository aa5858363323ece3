// Parity of the CUDA attention-row kernels with their CPU twins at Flash widths: QAT round trips (bitwise),
// row finishing (norm + RoPE + QAT), the streaming compressor (main ratio 4 with overlap, HCA ratio 128, the
// indexer's 128-dim compressor) and the lightning indexer (64 heads x 128 dims, top-k 512, contexts 1k..64k).
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <limits>
#include <set>
#include <tuple>

#include "backend/cpu/attention_cpu.h"
#include "backend/cuda/attention_rows.h"
#include "backend/cuda/compressor.h"
#include "backend/cuda/gemv.h"
#include "backend/cuda/indexer.h"
#include "model/attention_qat.h"
#include "model/compressor.h"
#include "model/indexer.h"
#include "model/rope.h"
#include "ops_common.h"

namespace dsv4 {
namespace {

using cuda::DeviceArray;
using test::upload;

// Rows with a wide dynamic range (1e-6 .. 1e3) so the FP8 subnormal step, every exponent and the 448 clamp of
// the block scale all occur, plus exact grid midpoints to exercise ties-to-even.
std::vector<float> wide_rows(size_t n, uint64_t seed) {
  auto v = test::random_normal(n, seed);
  std::mt19937_64 rng(seed + 100);
  std::uniform_real_distribution<float> e(-6.0f, 3.0f);
  for (size_t i = 0; i < n; ++i) v[i] *= std::pow(10.0f, e(rng));
  for (size_t i = 0; i < n; i += 97) v[i] = 1.0625f;  // midpoint of e4m3 neighbours 1.0 and 1.125
  for (size_t i = 5; i < n; i += 89) v[i] = 0.75f;    // e2m1 tie candidate after scaling
  return v;
}

// QAT alone (no norm, no RoPE): the device performs the CPU's operations in the same order, so bitwise.
TEST(CudaAttentionRows, QatBitwise) {
  DSV4_REQUIRE_CUDA();
  for (auto [d, qat] : {std::pair{512, cuda::RowQat::Fp8}, std::pair{128, cuda::RowQat::Fp4Hadamard},
                        std::pair{448, cuda::RowQat::Fp8}}) {
    const int rows = 257;
    auto x = wide_rows(size_t(rows) * d, uint64_t(d));
    std::vector<float> ref = x;
    for (int r = 0; r < rows; ++r) {
      if (qat == cuda::RowQat::Fp8) qat_fp8_blocks(ref.data() + int64_t(r) * d, d, 64);
      else qat_fp4_indexer_row(ref.data() + int64_t(r) * d, d);
    }
    auto d_x = upload(x);
    cuda::RowFinishParams p;
    p.x = d_x.get(), p.n_rows = rows, p.d = d, p.qat = qat;
    cuda::row_finish_cuda(p, nullptr);
    const auto y = d_x.download();
    size_t diff = 0;
    for (size_t i = 0; i < y.size(); ++i) diff += std::memcmp(&y[i], &ref[i], 4) != 0;
    EXPECT_EQ(diff, 0u) << "d=" << d << " qat=" << int(qat);
  }
}

// Counts elements off by more than `rel` and checks each such element is exactly one grid step of its QAT
// format away (a norm's tree sum moved a value across a rounding boundary): at most 1% may do so.
void expect_close_or_one_step(const std::vector<float>& y, const std::vector<float>& ref, double rel,
                              const char* what) {
  size_t steps = 0, bad = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    const double d = std::fabs(double(y[i]) - ref[i]);
    if (!std::isfinite(y[i])) { ++bad; continue; }
    if (d <= rel * std::max(std::fabs(double(ref[i])), 1e-3)) continue;
    // One e4m3 step is 2^-3 of the value's binade; one e2m1 step (after scaling) at most 1/3 of the value; in
    // the FP8 subnormal range a step is 2^-9 of the block scale (<= 2^-9 * 8 for these O(1) rows).
    const double big = std::max(std::fabs(double(ref[i])), std::fabs(double(y[i])));
    if (d <= 0.34 * big || d <= 0x1p-6) ++steps; else ++bad;
  }
  EXPECT_EQ(bad, 0u) << what;
  EXPECT_LE(double(steps), 0.01 * double(y.size())) << what;
}

// Weighted norm + YaRN RoPE + FP8 (the main KV row) and RoPE + FP4 (indexer queries, 64 heads per position).
TEST(CudaAttentionRows, NormRopeQatRows) {
  DSV4_REQUIRE_CUDA();
  const RopeFreqs rf = rope_freqs_yarn(160000.0, 64, RopeYarn{16.0, 65536.0, 32.0, 1.0});
  // KV rows: 33 tokens at positions 70000.. (large angles), dh 512.
  {
    const int T = 33, d = 512;
    auto x = test::random_normal(size_t(T) * d, 7, 3.0f);
    auto w = test::random_normal(d, 8);
    std::vector<float> ref = x, cs(64);
    for (int t = 0; t < T; ++t) {
      float* r = ref.data() + int64_t(t) * d;
      rms_norm_inplace(r, d, w.data(), 1e-6f);
      rope_cos_sin(rf, 70000 + t, cs.data());
      rope_rotate(r, d, 64, cs.data());
      qat_fp8_blocks(r, d - 64, 64);
    }
    auto d_x = upload(x), d_w = upload(w);
    cuda::RowFinishParams p;
    p.x = d_x.get(), p.n_rows = T, p.d = d, p.norm = cuda::RowNorm::Weighted, p.norm_w = d_w.get();
    p.n_rot = 64, p.pos0 = 70000, p.qat = cuda::RowQat::Fp8;
    std::copy(rf.omega.begin(), rf.omega.end(), p.omega);
    cuda::row_finish_cuda(p, nullptr);
    // 1e-5: the norm scale differs by a few ulp (tree vs sequential sum of 512 squares), RoPE factors are equal.
    expect_close_or_one_step(d_x.download(), ref, 1e-5, "kv rows");
  }
  // Query heads (the warp-per-row kernel's main case): unweighted norm + RoPE, 64 rows per position; and the
  // inverse rotation alone (the attention output's de-rotation).
  for (const bool inverse : {false, true}) {
    const int T = 6, H = 64, d = 512;
    auto x = test::random_normal(size_t(T) * H * d, inverse ? 11 : 10, 2.0f);
    std::vector<float> ref = x, cs(64);
    for (int t = 0; t < T; ++t) {
      rope_cos_sin(rf, 65530 + t, cs.data());
      for (int h = 0; h < H; ++h) {
        float* r = ref.data() + (int64_t(t) * H + h) * d;
        if (!inverse) rms_norm_inplace(r, d, nullptr, 1e-6f);
        rope_rotate(r, d, 64, cs.data(), inverse);
      }
    }
    auto d_x = upload(x);
    cuda::RowFinishParams p;
    p.x = d_x.get(), p.n_rows = int64_t(T) * H, p.d = d, p.n_rot = 64, p.pos0 = 65530, p.rows_per_pos = H;
    p.norm = inverse ? cuda::RowNorm::None : cuda::RowNorm::Unweighted, p.inverse = inverse;
    std::copy(rf.omega.begin(), rf.omega.end(), p.omega);
    cuda::row_finish_cuda(p, nullptr);
    const auto y = d_x.download();
    // Norm: the scale differs by a few ulp (another summation order): 1e-5 relative to the row scale (~1) bounds
    // it. Rotation alone: the CPU's factors and products, so equal.
    if (inverse) {
      EXPECT_EQ(test::max_abs_err(y, ref), 0.0) << "inverse rope";
    } else {
      EXPECT_LE(test::max_abs_err(y, ref), 1e-5) << "q heads";
    }
  }
  {
    const int T = 5, HI = 64, d = 128;
    auto x = test::random_normal(size_t(T) * HI * d, 9);
    std::vector<float> ref = x, cs(64);
    for (int t = 0; t < T; ++t) {
      rope_cos_sin(rf, 12345 + t, cs.data());
      for (int h = 0; h < HI; ++h) {
        float* r = ref.data() + (int64_t(t) * HI + h) * d;
        rope_rotate(r, d, 64, cs.data());
        qat_fp4_indexer_row(r, d);
      }
    }
    auto d_x = upload(x);
    cuda::RowFinishParams p;
    p.x = d_x.get(), p.n_rows = int64_t(T) * HI, p.d = d, p.n_rot = 64, p.pos0 = 12345, p.rows_per_pos = HI;
    p.qat = cuda::RowQat::Fp4Hadamard;
    std::copy(rf.omega.begin(), rf.omega.end(), p.omega);
    cuda::row_finish_cuda(p, nullptr);
    // No norm: RoPE factors and products are the CPU's, Hadamard and FP4 bitwise: must be equal.
    const auto y = d_x.download();
    EXPECT_EQ(test::max_abs_err(y, ref), 0.0) << "indexer q rows";
  }
}

// CPU compressor reference written from model-spec §6.3 (token by token, the CompressorState layout).
struct RefCompressor {
  int m, d;
  bool overlap;
  std::vector<float> cur_v, cur_z, prev_v, prev_z, rows;
  RefCompressor(int m_, int d_) : m(m_), d(d_), overlap(m_ == 4) {
    const float ninf = -std::numeric_limits<float>::infinity();
    cur_v.assign(size_t(m) * width(), 0.0f), cur_z.assign(size_t(m) * width(), ninf);
    prev_v.assign(overlap ? size_t(m) * d : 0, 0.0f), prev_z.assign(overlap ? size_t(m) * d : 0, ninf);
  }
  int width() const { return overlap ? 2 * d : d; }
  void push(int64_t p, const float* v, const float* z, const float* ape, const float* norm, const RopeFreqs& rf,
            cuda::RowQat qat) {
    const int r = int(p % m), cw = width(), boff = overlap ? d : 0;
    for (int i = 0; i < cw; ++i) cur_v[size_t(r) * cw + i] = v[i], cur_z[size_t(r) * cw + i] = z[i] + ape[r * cw + i];
    if (r != m - 1) return;
    std::vector<float> u(static_cast<size_t>(d)), cs(64);
    for (int c = 0; c < d; ++c) {
      float zmax = -INFINITY, num = 0, den = 0;
      if (overlap)
        for (int i = 0; i < m; ++i) zmax = std::max(zmax, prev_z[size_t(i) * d + c]);
      for (int i = 0; i < m; ++i) zmax = std::max(zmax, cur_z[size_t(i) * cw + boff + c]);
      if (overlap)
        for (int i = 0; i < m; ++i) {
          const float e = std::exp(prev_z[size_t(i) * d + c] - zmax);
          num += e * prev_v[size_t(i) * d + c], den += e;
        }
      for (int i = 0; i < m; ++i) {
        const float e = std::exp(cur_z[size_t(i) * cw + boff + c] - zmax);
        num += e * cur_v[size_t(i) * cw + boff + c], den += e;
      }
      u[size_t(c)] = num / den;
    }
    if (overlap)
      for (int i = 0; i < m; ++i)
        for (int c = 0; c < d; ++c)
          prev_v[size_t(i) * d + c] = cur_v[size_t(i) * cw + c], prev_z[size_t(i) * d + c] = cur_z[size_t(i) * cw + c];
    rms_norm_inplace(u.data(), d, norm, 1e-6f);
    rope_cos_sin(rf, int64_t(rows.size() / size_t(d)) * m, cs.data());
    rope_rotate(u.data(), d, 64, cs.data());
    if (qat == cuda::RowQat::Fp8) qat_fp8_blocks(u.data(), d - 64, 64);
    if (qat == cuda::RowQat::Fp4Hadamard) qat_fp4_indexer_row(u.data(), d);
    rows.insert(rows.end(), u.begin(), u.end());
  }
};

void compressor_case(int m, int d, cuda::RowQat qat, const std::vector<int>& chunks) {
  const RopeFreqs rf = rope_freqs_yarn(160000.0, 64, RopeYarn{16.0, 65536.0, 32.0, 1.0});
  RefCompressor ref(m, d);
  const int cw = ref.width();
  int64_t total = 0;
  for (int c : chunks) total += c;
  const auto v = test::random_normal(size_t(total) * cw, uint64_t(m * 1000 + d));
  const auto z = test::random_normal(size_t(total) * cw, uint64_t(m * 1000 + d + 1), 2.0f);
  const auto ape = test::random_normal(size_t(m) * cw, uint64_t(m + d), 0.5f);
  const auto norm = test::random_normal(size_t(d), uint64_t(d + 3));
  for (int64_t p = 0; p < total; ++p)
    ref.push(p, v.data() + p * cw, z.data() + p * cw, ape.data(), norm.data(), rf, qat);

  const int64_t max_rows = total / m + 1;
  auto d_cv = upload(std::vector<float>(size_t(m) * cw, 0.0f));
  auto d_cz = upload(std::vector<float>(size_t(m) * cw, -INFINITY));
  auto d_pv = upload(std::vector<float>(size_t(m) * d, 0.0f));
  auto d_pz = upload(std::vector<float>(size_t(m) * d, -INFINITY));
  DeviceArray<float> d_rows(size_t(max_rows) * d);
  d_rows.fill_bytes(0xFF);
  auto d_v = upload(v), d_z = upload(z), d_ape = upload(ape), d_norm = upload(norm);
  cuda::CompressorStepParams p;
  p.ratio = m, p.dim = d, p.overlap = ref.overlap, p.ape = d_ape.get(), p.cur_v = d_cv.get(), p.cur_z = d_cz.get();
  p.prev_v = d_pv.get(), p.prev_z = d_pz.get(), p.rows = d_rows.get(), p.max_rows = max_rows;
  p.norm_w = d_norm.get(), p.n_rot = 64, p.qat = qat;
  std::copy(rf.omega.begin(), rf.omega.end(), p.omega);
  int64_t pos = 0;
  for (int c : chunks) {
    p.pos0 = pos, p.T = c, p.v = d_v.get() + pos * cw, p.z = d_z.get() + pos * cw;
    EXPECT_EQ(cuda::compressor_step_cuda(p, nullptr), cuda::compressor_rows_emitted(pos, c, m));
    pos += c;
  }
  const int64_t n_rows = total / m;
  ASSERT_EQ(int64_t(ref.rows.size()), n_rows * d);
  auto rows = d_rows.download();
  rows.resize(size_t(n_rows) * d);
  const std::string what = "m=" + std::to_string(m) + " d=" + std::to_string(d);
  // Pooling: expf vs std::exp (<= 2 ulp) over 4-8 slots and a tree-summed norm: ~1e-6 relative; 2e-5 bound,
  // plus FP8/FP4 boundary moves of one grid step (expect_close_or_one_step).
  if (qat == cuda::RowQat::None) EXPECT_LE(test::rel_l2(rows, ref.rows), 2e-5) << what;
  else expect_close_or_one_step(rows, ref.rows, 2e-5, what.c_str());
  // The open-window and prev buffers are copies (z + ape is the same single float add): bitwise.
  EXPECT_EQ(d_cv.download(), ref.cur_v) << what;
  EXPECT_EQ(d_cz.download(), ref.cur_z) << what;
  if (ref.overlap) {
    EXPECT_EQ(d_pv.download(), ref.prev_v) << what;
    EXPECT_EQ(d_pz.download(), ref.prev_z) << what;
  }
}

// The optional Q8 output (the q_a norm: weighted norm of 1024-wide rows, no RoPE; and a rotated 512-wide case)
// must equal the split-layout quantization of the finished rows byte for byte: the backend hands it to the q_b
// projection in place of a quantize launch. Rows must be whole 32-value blocks (else dsv4::Error).
TEST(CudaAttentionRows, Q8OutputEqualsQuantizer) {
  DSV4_REQUIRE_CUDA();
  const RopeFreqs rf = rope_freqs_yarn(160000.0, 64, RopeYarn{16.0, 65536.0, 32.0, 1.0});
  for (const auto& [rows, d, rope] : {std::tuple{1, 1024, false}, std::tuple{5, 1024, false}, std::tuple{3, 512, true}}) {
    auto x = test::random_normal(size_t(rows) * d, 31 + d, 2.0f);
    const auto w = test::random_normal(size_t(d), 32 + d);
    auto d_x = upload(x), d_w = upload(w);
    const size_t qbytes = size_t(rows) * size_t(cuda::gpu_activation_bytes(QType::Q8_0, d, cuda::GemvLayout::Q8Split));
    DeviceArray<uint8_t> d_q(qbytes), d_ref(qbytes);
    d_q.fill_bytes(0xAB);
    cuda::RowFinishParams p;
    p.x = d_x.get(), p.n_rows = rows, p.d = d, p.norm = cuda::RowNorm::Weighted, p.norm_w = d_w.get(), p.q8 = d_q.get();
    if (rope) {
      p.n_rot = 64, p.pos0 = 4242;
      std::copy(rf.omega.begin(), rf.omega.end(), p.omega);
    }
    cuda::row_finish_cuda(p, nullptr);
    cuda::quantize_activations_cuda(QType::Q8_0, d_x.get(), rows, d, d_ref.get(), nullptr, cuda::GemvLayout::Q8Split);
    EXPECT_EQ(d_q.download(), d_ref.download()) << "rows=" << rows << " d=" << d << " rope=" << rope;
  }
  DeviceArray<float> d(64);
  DeviceArray<uint8_t> q(128);
  cuda::RowFinishParams bad;
  bad.x = d.get(), bad.n_rows = 1, bad.d = 48, bad.q8 = q.get();
  EXPECT_THROW(cuda::row_finish_cuda(bad, nullptr), Error);
}

TEST(CudaAttentionRows, CompressorStreamsLikeTheCpu) {
  DSV4_REQUIRE_CUDA();
  // Chunks of 1 (decode), odd sizes straddling windows, and a long prefill chunk.
  const std::vector<int> chunks = {1, 2, 1, 7, 300, 1, 1, 1, 1, 5, 129, 3};
  compressor_case(4, 512, cuda::RowQat::None, chunks);
  compressor_case(4, 512, cuda::RowQat::Fp8, chunks);
  compressor_case(4, 128, cuda::RowQat::Fp4Hadamard, chunks);
  compressor_case(128, 512, cuda::RowQat::Fp8, {1, 200, 127, 1, 55, 300, 1});
}

TEST(CudaAttentionRows, CompressorRejectsOverflow) {
  DSV4_REQUIRE_CUDA();
  cuda::CompressorStepParams p;
  p.ratio = 4, p.dim = 128, p.overlap = true, p.pos0 = 8, p.T = 4, p.max_rows = 2;
  EXPECT_THROW(cuda::compressor_step_cuda(p, nullptr), Error);
}

// Indexer: scores vs cpu::indexer_score, then the selection vs indexer_top_k on the CPU scores.
// impl: the scores kernel; HI < 64 exercises the tensor-core kernel's head padding; tie_rows > 0 makes every
// key row i with i % 3 != 0 a copy of row 1 (thousands of exactly equal scores: the k-th place falls inside a
// tie unless row 0's class wins, and the selection must then take the lowest rows, exactly as the CPU).
void indexer_case(int64_t pos0, int T, cuda::IndexerImpl impl = cuda::IndexerImpl::Auto, int HI = 64,
                  bool ties = false) {
  constexpr int dI = 128, K = 512;
  const int64_t n_keys = (pos0 + T) / 4;
  const auto q = test::random_normal(size_t(T) * HI * dI, uint64_t(pos0 + 1));
  const auto w = test::random_normal(size_t(T) * HI, uint64_t(pos0 + 2));
  auto keys = test::random_normal(size_t(std::max<int64_t>(n_keys, 1)) * dI, uint64_t(pos0 + 3));
  if (ties)
    for (int64_t i = 2; i < n_keys; ++i)
      if (i % 3 != 0) std::copy_n(keys.begin() + dI, dI, keys.begin() + i * dI);
  const float wscale = float(1.0 / std::sqrt(double(dI) * HI));
  auto d_q = upload(q), d_w = upload(w), d_k = upload(keys);
  DeviceArray<int32_t> d_sel{size_t(T) * K}, d_cnt{size_t(T)};
  cuda::IndexerLaunch L;
  L.q = d_q.get(), L.w = d_w.get(), L.weight_scale = wscale, L.keys = d_k.get(), L.T = T, L.HI = HI, L.dI = dI;
  L.pos0 = pos0, L.ratio = 4, L.k = K, L.sel = d_sel.get(), L.count = d_cnt.get(), L.impl = impl;
  DeviceArray<float> scratch(size_t(std::max<int64_t>(1, cuda::indexer_scratch_floats(L))));
  DeviceArray<float> d_scores(size_t(T) * std::max<int64_t>(n_keys, 1));
  cuda::indexer_scores_cuda(L, d_scores.get(), n_keys, nullptr);
  cuda::indexer_select_cuda(L, scratch.get(), nullptr);
  const auto scores = d_scores.download();
  const auto sel = d_sel.download();
  const auto cnt = d_cnt.download();
  for (int t = 0; t < T; ++t) {
    const int64_t vis = (pos0 + t + 1) / 4;
    std::vector<float> wt(w.begin() + int64_t(t) * HI, w.begin() + int64_t(t + 1) * HI);
    for (auto& x : wt) x *= wscale;
    std::vector<float> ref(static_cast<size_t>(vis));
    double worst = 0, mag = 0;
    for (int64_t i = 0; i < vis; ++i) {
      ref[size_t(i)] = cpu::indexer_score(q.data() + int64_t(t) * HI * dI, wt.data(), keys.data() + i * dI, HI, dI);
      worst = std::max(worst, std::fabs(double(scores[size_t(t * n_keys + i)]) - ref[size_t(i)]));
      mag = std::max(mag, std::fabs(double(ref[size_t(i)])));
    }
    // Scores sum 64 weighted ReLU(128-term dots): fp32 with another order, ~1e-6 of the largest term; 1e-5 of
    // the largest score bounds it.
    EXPECT_LE(worst, 1e-5 * std::max(mag, 1.0)) << "pos0=" << pos0 << " t=" << t;
    for (int64_t i = vis; i < n_keys; ++i) EXPECT_EQ(scores[size_t(t * n_keys + i)], -INFINITY);
    std::vector<int32_t> want(K);
    const int n = indexer_top_k(ref.data(), vis, K, want.data());
    ASSERT_EQ(cnt[size_t(t)], n);
    // The selection must be ascending; a row may differ from the CPU's only where the two score orders swap
    // near-equal scores at the k-th place: such rows score within the score tolerance of the CPU's k-th best.
    std::set<int32_t> cpu_set(want.begin(), want.begin() + n);
    float kth = INFINITY;
    for (int i = 0; i < n; ++i) kth = std::min(kth, ref[size_t(want[size_t(i)])]);
    int swapped = 0;
    for (int i = 0; i < n; ++i) {
      const int32_t r = sel[size_t(t) * K + i];
      if (i > 0) {
        EXPECT_LT(sel[size_t(t) * K + i - 1], r);
      }
      if (!cpu_set.count(r)) {
        ++swapped;
        EXPECT_GE(ref[size_t(r)], kth - 2e-5 * std::max(mag, 1.0)) << "row " << r;
      }
    }
    EXPECT_LE(swapped, 2) << "pos0=" << pos0 << " t=" << t;
    if (ties) {  // the tie class {1} u {i >= 2, i % 3 != 0}: the selected members are its lowest rows
      std::vector<int32_t> members, chosen;
      for (int64_t i = 1; i < vis; ++i)
        if (i == 1 || i % 3 != 0) members.push_back(int32_t(i));
      for (int i = 0; i < n; ++i) {
        const int32_t r = sel[size_t(t) * K + i];
        if (r == 1 || (r >= 2 && r % 3 != 0)) chosen.push_back(r);
      }
      ASSERT_LE(chosen.size(), members.size());
      EXPECT_TRUE(std::equal(chosen.begin(), chosen.end(), members.begin())) << "tie rows not the lowest";
      std::printf("  ties pos0=%lld t=%d: %zu of %zu tied rows selected\n", (long long)pos0, t, chosen.size(),
                  members.size());
    }
  }
}

TEST(CudaAttentionRows, IndexerDecodeContexts) {
  DSV4_REQUIRE_CUDA();
  // 2052 .. 4096: the fused decode launch (513 .. 1024 visible rows); 4100: just past it (two launches).
  for (int64_t ctx : {1024, 2048, 2052, 2096, 4096, 4100, 8192, 65536}) indexer_case(ctx - 1, 1);
}

TEST(CudaAttentionRows, IndexerPrefill) {
  DSV4_REQUIRE_CUDA();
  indexer_case(0, 40);       // rows appear one per 4 tokens, all fit in k
  indexer_case(2030, 40);    // crosses the point where visible rows exceed k = 512
  indexer_case(8000, 16);
}

// Token chunks (IndexerLaunch::max_score_floats bounds the scores of one launch; the default bound only bites
// at long contexts with big passes): the same selection and counts as one launch, entry for entry, since each
// token's scores and selection depend on its own inputs only; the scratch formula shrinks to one chunk.
// 40 tokens from position 2030: the last 19 see more than k = 512 rows (real selections), the first ones all
// rows; chunks of 7 tokens put boundaries in both regimes and leave a short last chunk.
TEST(CudaAttentionRows, IndexerChunkedEqualsOneLaunch) {
  DSV4_REQUIRE_CUDA();
  constexpr int dI = 128, HI = 64, K = 512, T = 40;
  constexpr int64_t pos0 = 2030, n_keys = (pos0 + T) / 4;
  const auto q = test::random_normal(size_t(T) * HI * dI, 91);
  const auto w = test::random_normal(size_t(T) * HI, 92);
  const auto keys = test::random_normal(size_t(n_keys) * dI, 93);
  auto d_q = upload(q), d_w = upload(w), d_k = upload(keys);
  cuda::IndexerLaunch L;
  L.q = d_q.get(), L.w = d_w.get(), L.weight_scale = float(1.0 / std::sqrt(double(dI) * HI)), L.keys = d_k.get();
  L.T = T, L.HI = HI, L.dI = dI, L.pos0 = pos0, L.ratio = 4, L.k = K;
  EXPECT_EQ(cuda::indexer_scratch_floats(L), int64_t(T) * n_keys);
  struct Out {
    std::vector<int32_t> sel, cnt;
  };
  auto run = [&](int64_t bound) {
    cuda::IndexerLaunch c = L;
    c.max_score_floats = bound;
    c.fused = false;  // the fused launch takes these shapes whole (no chunks): test the two-launch chunking
    EXPECT_FALSE(cuda::indexer_fused_applies(c));
    DeviceArray<int32_t> d_sel{size_t(T) * K}, d_cnt{size_t(T)};
    d_sel.fill_bytes(0xFF), d_cnt.fill_bytes(0xFF);
    c.sel = d_sel.get(), c.count = d_cnt.get();
    DeviceArray<float> scratch(size_t(std::max<int64_t>(1, cuda::indexer_scratch_floats(c))));
    cuda::indexer_select_cuda(c, scratch.get(), nullptr);
    return Out{d_sel.download(), d_cnt.download()};
  };
  const Out one = run(0), chunked = run(7 * n_keys);
  cuda::IndexerLaunch c7 = L;
  c7.max_score_floats = 7 * n_keys;
  EXPECT_EQ(cuda::indexer_scratch_floats(c7), 7 * n_keys);
  ASSERT_EQ(chunked.cnt, one.cnt);
  for (int t = 0; t < T; ++t) {
    const int64_t vis = (pos0 + t + 1) / 4;
    ASSERT_EQ(one.cnt[size_t(t)], int32_t(std::min<int64_t>(vis, K))) << "t=" << t;
    for (int i = 0; i < one.cnt[size_t(t)]; ++i)
      ASSERT_EQ(chunked.sel[size_t(t) * K + i], one.sel[size_t(t) * K + i]) << "t=" << t << " i=" << i;
  }
}

// Both score kernels forced on prefill and decode shapes, head padding, and exact ties in the selection.
TEST(CudaAttentionRows, IndexerKernelsAndTies) {
  DSV4_REQUIRE_CUDA();
  constexpr auto kCore = cuda::IndexerImpl::CudaCore, kTc = cuda::IndexerImpl::TensorCore;
  indexer_case(2030, 40, kCore);
  indexer_case(8000, 16, kCore);
  indexer_case(65535, 1, kCore);
  indexer_case(8191, 1, kTc);
  indexer_case(65535, 1, kTc);
  indexer_case(3000, 24, kTc, 24);
  indexer_case(8191, 1, kCore, 64, true);
  indexer_case(8188, 4, kTc, 64, true);
  indexer_case(139999, 1);  // 35000 visible rows: past the selection's shared-memory key cache (32768)
  indexer_case(4087, 4, cuda::IndexerImpl::Auto, 64, true);  // ties in the fused launch (1022 rows each)
}

// The fused decode launch against the two launches it replaces (IndexerLaunch::fused = false): its CTAs score with
// the same tensor-core tile code and CTA 0 selects by the same rule, so selections and counts must be equal
// entry for entry (the CPU comparison of indexer_case allows swaps at the k-th place; this does not). Decode at
// 2k (the benchmark's 513 .. 524 rows), the largest fused width (1024 rows: 8 CTAs x 2 tiles), a partial last
// tile, head padding (HI 24), a prefill pass whose first tokens see <= k rows, and a tie class straddling k.
TEST(CudaAttentionRows, IndexerFusedEqualsTwoLaunches) {
  DSV4_REQUIRE_CUDA();
  constexpr int dI = 128, K = 512;
  struct Case {
    int64_t pos0;
    int T, HI;
    bool ties;
  };
  for (const Case c : {Case{2051, 1, 64, false}, Case{2095, 1, 64, false}, Case{4095, 1, 64, false},
                       Case{3001, 1, 64, false}, Case{3000, 24, 24, false}, Case{2030, 40, 64, false},
                       Case{4087, 4, 64, true}, Case{2300, 1, 64, true}}) {
    const int64_t n_keys = (c.pos0 + c.T) / 4;
    const auto q = test::random_normal(size_t(c.T) * c.HI * dI, uint64_t(c.pos0 + 11));
    const auto w = test::random_normal(size_t(c.T) * c.HI, uint64_t(c.pos0 + 12));
    auto keys = test::random_normal(size_t(n_keys) * dI, uint64_t(c.pos0 + 13));
    if (c.ties)  // rows i % 3 != 0 copy row 1, as indexer_case
      for (int64_t i = 2; i < n_keys; ++i)
        if (i % 3 != 0) std::copy_n(keys.begin() + dI, dI, keys.begin() + i * dI);
    auto d_q = upload(q), d_w = upload(w), d_k = upload(keys);
    cuda::IndexerLaunch L;
    L.q = d_q.get(), L.w = d_w.get(), L.weight_scale = float(1.0 / std::sqrt(double(dI) * c.HI));
    L.keys = d_k.get(), L.T = c.T, L.HI = c.HI, L.dI = dI, L.pos0 = c.pos0, L.ratio = 4, L.k = K;
    auto run = [&](bool fused) {
      cuda::IndexerLaunch r = L;
      r.fused = fused;
      EXPECT_EQ(cuda::indexer_fused_applies(r), fused) << "pos0=" << c.pos0;
      DeviceArray<int32_t> d_sel{size_t(c.T) * K}, d_cnt{size_t(c.T)};
      d_sel.fill_bytes(0xFF), d_cnt.fill_bytes(0xFF);
      r.sel = d_sel.get(), r.count = d_cnt.get();
      DeviceArray<float> scratch(size_t(std::max<int64_t>(1, cuda::indexer_scratch_floats(r))));
      cuda::indexer_select_cuda(r, scratch.get(), nullptr);
      return std::make_pair(d_sel.download(), d_cnt.download());
    };
    const auto fused = run(true), two = run(false);
    ASSERT_EQ(fused.second, two.second) << "pos0=" << c.pos0;
    for (int t = 0; t < c.T; ++t) {
      const int64_t vis = (c.pos0 + t + 1) / 4;
      ASSERT_EQ(fused.second[size_t(t)], int32_t(std::min<int64_t>(vis, K))) << "t=" << t;
      for (int i = 0; i < fused.second[size_t(t)]; ++i)
        ASSERT_EQ(fused.first[size_t(t) * K + i], two.first[size_t(t) * K + i])
            << "pos0=" << c.pos0 << " t=" << t << " i=" << i;
    }
  }
}

// Where the fused launch applies: shapes only (no device needed).
TEST(AttentionRows, IndexerFusedShapes) {
  cuda::IndexerLaunch L;
  L.T = 1, L.HI = 64, L.dI = 128, L.ratio = 4, L.k = 512;
  auto at = [&](int64_t pos0, int T = 1) {
    cuda::IndexerLaunch c = L;
    c.pos0 = pos0, c.T = T;
    return cuda::indexer_fused_applies(c);
  };
  // visible rows of the last token: (pos0 + T) / 4
  EXPECT_FALSE(at(2046));  // 511: all fit in k, one selection launch and no scores
  EXPECT_FALSE(at(2047));  // 512 = k
  EXPECT_TRUE(at(2051));   // 513
  EXPECT_TRUE(at(4098));   // 1024 = kIndexerFusedMaxRows
  EXPECT_FALSE(at(4099));  // 1025
  EXPECT_TRUE(at(2030, 40));
  EXPECT_FALSE(at(4090, 10));  // the last token sees 1025 rows
  cuda::IndexerLaunch c = L;
  c.pos0 = 2100;
  c.impl = cuda::IndexerImpl::CudaCore;
  EXPECT_FALSE(cuda::indexer_fused_applies(c));
  c.impl = cuda::IndexerImpl::TensorCore;
  EXPECT_TRUE(cuda::indexer_fused_applies(c));
  c.dI = 64;
  EXPECT_FALSE(cuda::indexer_fused_applies(c));
  c.dI = 128, c.HI = 24;
  EXPECT_TRUE(cuda::indexer_fused_applies(c));
  c.fused = false;
  EXPECT_FALSE(cuda::indexer_fused_applies(c));
}

}  // namespace
}  // namespace dsv4
