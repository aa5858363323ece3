// Parity of the small CUDA ops (rms_norm, RoPE, HC Sinkhorn/collapse/post, top-k, softmax) with their CPU twins
// (ops_reference.h) on random inputs at Flash widths. Each test states its tolerance and why.
#include "backend/cuda/device_ops.h"
#include "backend/cuda/gemv.h"
#include "common/argmax.h"
#include "backend/cuda/hc.h"
#include "backend/cuda/norm_rope.h"
#include "backend/cuda/select.h"
#include "ops_common.h"
#include "ops_reference.h"

namespace dsv4 {
namespace {

using cuda::DeviceArray;
using test::upload;

// fp32 tree sum vs double sum of 512-16384 squares: relative error of the scale ~ sqrt(n) * 2^-24 < 1e-5;
// outputs are O(1), so 2e-5 absolute (per element, relative to max(|ref|, 1)) bounds it with margin.
TEST(CudaSmallOps, RmsNormWeightedAndUnweighted) {
  DSV4_REQUIRE_CUDA();
  struct Case { int64_t rows; int n; bool weighted; };
  for (const Case c : {Case{7, 4096, true}, Case{64, 512, false}, Case{3, 1024, true}, Case{2, 16384, false},
                       Case{5, 128, true}}) {
    const auto x = test::random_normal(size_t(c.rows * c.n), 11 + c.n, 2.0f);
    const auto w = test::random_normal(size_t(c.n), 12 + c.n);
    std::vector<float> ref(x.size());
    test::rms_norm_ref(x.data(), c.weighted ? w.data() : nullptr, c.rows, c.n, 1e-6f, ref.data());
    auto d_x = upload(x), d_w = upload(w);
    DeviceArray<float> d_y(x.size());
    d_y.fill_bytes(0xFF);
    cuda::RmsNormParams p;
    p.x = d_x.get(), p.w = c.weighted ? d_w.get() : nullptr, p.y = d_y.get(), p.rows = c.rows, p.n = c.n;
    cuda::rms_norm_cuda(p, nullptr);
    const auto y = d_y.download();
    std::vector<double> refd(ref.begin(), ref.end());
    EXPECT_LE(test::max_rel_err(y, refd, 1.0), 2e-5) << "rows=" << c.rows << " n=" << c.n;
    // Every launch shape (threads per row, register or strided kernel) stays within the bound: they differ only
    // in the fp32 summation order of the sum of squares.
    for (const auto& [threads, strided] : {std::pair{256, true}, std::pair{256, false}, std::pair{1024, false},
                                          std::pair{32, true}}) {
      cuda::RmsNormParams q = p;
      q.threads = threads, q.strided = strided;
      d_y.fill_bytes(0xFF);
      cuda::rms_norm_cuda(q, nullptr);
      EXPECT_LE(test::max_rel_err(d_y.download(), refd, 1.0), 2e-5)
          << "rows=" << c.rows << " n=" << c.n << " threads=" << threads << " strided=" << strided;
    }
    // In place (x aliases y) gives the same values.
    p.y = d_x.get();
    cuda::rms_norm_cuda(p, nullptr);
    EXPECT_EQ(d_x.download(), y);
  }
}

// rms_norm's optional Q8 output must equal the split-layout quantization of its own float output byte for byte
// (the backend hands it to the projections in place of a quantize launch), for both kernels and in place.
TEST(CudaSmallOps, RmsNormQ8OutputEqualsQuantizer) {
  DSV4_REQUIRE_CUDA();
  struct Case { int64_t rows; int n; bool weighted; bool strided; };
  for (const Case c : {Case{1, 4096, true, false}, Case{3, 4096, true, true}, Case{2, 1024, false, false},
                       Case{1, 16384, true, false}, Case{8, 512, true, false}}) {
    auto x = test::random_normal(size_t(c.rows * c.n), 21 + c.n, 2.0f);
    for (int i = 0; i < 32; ++i) x[size_t(i)] = 0.0f;  // an all-zero block: scale 0, quants 0
    const auto w = test::random_normal(size_t(c.n), 22 + c.n);
    auto d_x = upload(x), d_w = upload(w);
    const size_t qbytes = size_t(c.rows) * size_t(cuda::gpu_activation_bytes(QType::Q8_0, c.n, cuda::GemvLayout::Q8Split));
    DeviceArray<uint8_t> d_q(qbytes), d_ref(qbytes);
    d_q.fill_bytes(0xAB);
    cuda::RmsNormParams p;
    p.x = d_x.get(), p.w = c.weighted ? d_w.get() : nullptr, p.y = d_x.get(), p.rows = c.rows, p.n = c.n;
    p.q8 = d_q.get(), p.strided = c.strided;
    cuda::rms_norm_cuda(p, nullptr);  // in place, as the backend calls it
    cuda::quantize_activations_cuda(QType::Q8_0, d_x.get(), c.rows, c.n, d_ref.get(), nullptr,
                                    cuda::GemvLayout::Q8Split);
    EXPECT_EQ(d_q.download(), d_ref.download()) << "rows=" << c.rows << " n=" << c.n << " strided=" << c.strided;
  }
  cuda::RmsNormParams bad;
  DeviceArray<float> d(64);
  DeviceArray<uint8_t> q(128);
  bad.x = d.get(), bad.y = d.get(), bad.rows = 1, bad.n = 48, bad.q8 = q.get();
  EXPECT_THROW(cuda::rms_norm_cuda(bad, nullptr), Error);  // n % 32 != 0 with a Q8 output
  bad.q8 = nullptr, bad.threads = 48;
  EXPECT_THROW(cuda::rms_norm_cuda(bad, nullptr), Error);  // threads not a multiple of 32
}

// argmax_usable_cuda (Backend::argmax of the CUDA backend) against the host rule argmax_usable (exact: an index):
// vocabulary-sized and odd lengths, ties (the lowest index wins, +0 and -0 equal), NaN and -inf never chosen, all
// unusable (-1), a +inf, negatives, and a misaligned start (the scalar path).
TEST(CudaSmallOps, ArgmaxMatchesHostRule) {
  DSV4_REQUIRE_CUDA();
  DeviceArray<uint64_t> d_key(1);
  auto check = [&](const std::vector<float>& x, int64_t off, const char* what) {
    auto d_x = upload(x);
    const int64_t n = int64_t(x.size()) - off;
    cuda::argmax_usable_cuda(d_x.get() + off, n, d_key.get(), nullptr);
    EXPECT_EQ(cuda::argmax_index_of_key(d_key.download()[0]), argmax_usable(x.data() + off, n)) << what << " n=" << n;
  };
  for (const int64_t n : {int64_t(129280), int64_t(96), int64_t(1), int64_t(4099)}) {
    auto x = test::random_normal(size_t(n), 41 + n, 3.0f);
    check(x, 0, "random");
    if (n > 8) check(x, 1, "misaligned");
    if (n > 4000) {
      x[4000] = 50.0f, x[3000] = 50.0f, x[2999] = NAN, x[10] = -INFINITY;
      check(x, 0, "tie at 3000 and 4000");
      x[5] = INFINITY;
      check(x, 0, "+inf");
    }
  }
  check(std::vector<float>(1000, -INFINITY), 0, "all -inf");
  check(std::vector<float>(33, NAN), 0, "all NaN");
  std::vector<float> ties(5000, 1.0f);
  check(ties, 0, "all equal");
  check(ties, 3, "all equal, misaligned");
  std::vector<float> zeros(3000, -1.0f);
  zeros[2500] = 0.0f, zeros[700] = -0.0f;  // equal to the host rule: the lower index (the -0) wins
  check(zeros, 0, "+0 and -0 tie");
  std::vector<float> neg(4097, -3.0f);
  neg[4096] = -2.5f;  // negative values order the other way in their bits; the scalar tail holds the best
  check(neg, 0, "negatives, best in the tail");
}

// The YaRN table against the spec's published reference values (model-spec §1.3 and §3.2: correction range
// (15, 25), omega_15 = 0.0036355, omega_16 = 0.0022656, omega_25 = 5.37e-6, omega_31 = 5.68e-7; 4-5 digits).
TEST(CudaSmallOps, YarnTableMatchesSpecValues) {
  const auto om = test::rope_omega_ref(160000.0, 64, 16.0, 65536.0, 32.0, 1.0);
  EXPECT_NEAR(om[0], 1.0, 1e-12);
  EXPECT_NEAR(om[15], 0.0036355, 5e-7);
  EXPECT_NEAR(om[16], 0.0022656, 5e-7);
  EXPECT_NEAR(om[25] / 5.37e-6, 1.0, 2e-3);
  EXPECT_NEAR(om[31] / 5.68e-7, 1.0, 2e-3);
}

// Angles and cos/sin in double, rounded to float once, and the complex product unfused on both sides: the only
// possible difference is a 1-ulp double cos/sin landing on a float rounding boundary, so the bound is 1 float
// ulp of the largest |x| (~6 for N(0,1)): 1e-6. Position 1,000,003 exercises large angles (~1e6 rad).
TEST(CudaSmallOps, RopePartialInterleavedYarnAndInverse) {
  DSV4_REQUIRE_CUDA();
  struct Case { int n_heads, head_dim; double theta, yarn; bool inverse; };
  for (const Case c : {Case{64, 512, 160000.0, 16.0, false}, Case{64, 512, 10000.0, 1.0, false},
                       Case{1, 512, 160000.0, 16.0, true}, Case{64, 128, 160000.0, 16.0, false}}) {
    const std::vector<int64_t> pos = {0, 1, 7, 127, 4096, 65535, 1000003};
    const int64_t T = int64_t(pos.size());
    const auto x = test::random_normal(size_t(T * c.n_heads * c.head_dim), 21 + c.head_dim);
    const auto om = test::rope_omega_ref(c.theta, 64, c.yarn, 65536.0, 32.0, 1.0);
    auto ref = x;
    test::rope_ref(ref.data(), pos.data(), T, c.n_heads, c.head_dim, 64, om, c.inverse);
    auto d_x = upload(x);
    auto d_pos = upload(pos);
    cuda::RopeParams p;
    p.x = d_x.get(), p.positions = d_pos.get(), p.n_tokens = T, p.n_heads = c.n_heads, p.head_dim = c.head_dim;
    p.n_rot = 64, p.inverse = c.inverse;
    for (int j = 0; j < 32; ++j) p.omega[j] = om[size_t(j)];
    cuda::rope_cuda(p, nullptr);
    const auto y = d_x.download();
    EXPECT_LE(test::max_abs_err(y, ref), 1e-6) << "heads=" << c.n_heads << " dim=" << c.head_dim;
    // The first head_dim - 64 dims are untouched, bit for bit.
    for (int64_t r = 0; r < T * c.n_heads; ++r)
      for (int i = 0; i < c.head_dim - 64; ++i)
        ASSERT_EQ(y[size_t(r * c.head_dim + i)], x[size_t(r * c.head_dim + i)]);
  }
}

// Same loop order on both sides; differences come from expf ulps and FMA contraction in the kernel's
// "mix * scale + base" (about 1e-7 relative each), which 20 Sinkhorn rounds do not amplify beyond ~1e-6:
// 1e-5 absolute on values in (0, 2]. Independently of the twin, the columns of comb must sum to 1 (the last
// step normalizes columns; eps = 1e-6 shifts the sum by < 1e-5).
TEST(CudaSmallOps, HcSinkhorn) {
  DSV4_REQUIRE_CUDA();
  const int64_t T = 37;
  const auto mix = test::random_normal(size_t(T * 24), 31, 2.0f);
  const auto base = test::random_normal(24, 32, 0.5f);
  const std::vector<float> scale = {0.7f, 1.3f, 2.0f};
  std::vector<float> pre(size_t(T * 4)), post(size_t(T * 4)), comb(size_t(T * 16));
  for (int64_t t = 0; t < T; ++t)
    test::hc_sinkhorn_ref(&mix[size_t(t * 24)], base.data(), scale.data(), 20, 1e-6f, &pre[size_t(t * 4)],
                          &post[size_t(t * 4)], &comb[size_t(t * 16)]);
  auto d_mix = upload(mix), d_base = upload(base), d_scale = upload(scale);
  DeviceArray<float> d_pre(pre.size()), d_post(post.size()), d_comb(comb.size());
  d_comb.fill_bytes(0xFF);
  cuda::HcSinkhornParams p;
  p.mix = d_mix.get(), p.base = d_base.get(), p.scale = d_scale.get(), p.pre = d_pre.get(), p.post = d_post.get();
  p.comb = d_comb.get(), p.n_tokens = T;
  cuda::hc_split_sinkhorn_cuda(p, nullptr);
  const auto g_comb = d_comb.download();
  EXPECT_LE(test::max_abs_err(d_pre.download(), pre), 1e-5);
  EXPECT_LE(test::max_abs_err(d_post.download(), post), 1e-5);
  EXPECT_LE(test::max_abs_err(g_comb, comb), 1e-5);
  for (int64_t t = 0; t < T; ++t)
    for (int o = 0; o < 4; ++o) {
      double s = 0;
      for (int i = 0; i < 4; ++i) s += g_comb[size_t(t * 16 + i * 4 + o)];
      EXPECT_NEAR(s, 1.0, 1e-5) << "token " << t << " column " << o;
    }
}

// a = sum_i pre_i X_i and X'_o = post_o y + sum_i C[i][o] X_i: 4-5 fp32 products per value, so 1e-5 relative
// to max(|ref|, 1) covers FMA contraction differences.
TEST(CudaSmallOps, HcCollapseAndPost) {
  DSV4_REQUIRE_CUDA();
  const int64_t T = 3, D = 4096;
  const auto X = test::random_normal(size_t(T * 4 * D), 41);
  const auto y = test::random_normal(size_t(T * D), 42);
  const auto pre = test::random_normal(size_t(T * 4), 43);
  const auto post = test::random_normal(size_t(T * 4), 44);
  const auto comb = test::random_normal(size_t(T * 16), 45);
  std::vector<double> a_ref(size_t(T * D)), x_ref(X.size());
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < D; ++k) {
      double a = 0;
      for (int i = 0; i < 4; ++i) a += double(pre[size_t(t * 4 + i)]) * X[size_t((t * 4 + i) * D + k)];
      a_ref[size_t(t * D + k)] = a;
      for (int o = 0; o < 4; ++o) {
        double v = double(post[size_t(t * 4 + o)]) * y[size_t(t * D + k)];
        for (int i = 0; i < 4; ++i) v += double(comb[size_t(t * 16 + i * 4 + o)]) * X[size_t((t * 4 + i) * D + k)];
        x_ref[size_t((t * 4 + o) * D + k)] = v;
      }
    }
  auto d_X = upload(X), d_y = upload(y), d_pre = upload(pre), d_post = upload(post), d_comb = upload(comb);
  DeviceArray<float> d_a(size_t(T * D));
  d_a.fill_bytes(0xFF);
  cuda::hc_collapse_cuda(d_X.get(), d_pre.get(), T, D, d_a.get(), nullptr);
  cuda::hc_post_cuda(d_X.get(), d_y.get(), d_post.get(), d_comb.get(), T, D, nullptr);
  EXPECT_LE(test::max_rel_err(d_a.download(), a_ref, 1.0), 1e-5);
  EXPECT_LE(test::max_rel_err(d_X.download(), x_ref, 1.0), 1e-5);
}

// Top-k is exact: integer keys under a total order, so GPU and CPU must return identical index lists.
void check_topk(int64_t rows, int64_t n, int k, uint64_t seed, bool coarse) {
  auto s = test::random_normal(size_t(rows * n), seed);
  if (coarse)  // many exact ties (and both signed zeros) to exercise the index tie-break
    for (auto& v : s) v = std::round(v * 2.0f) / 2.0f;
  auto d_s = upload(s);
  DeviceArray<int32_t> d_idx(size_t(rows * k));
  DeviceArray<float> d_val(size_t(rows * k));
  d_idx.fill_bytes(0xFF);
  cuda::TopkParams p;
  p.scores = d_s.get(), p.rows = rows, p.n = n, p.k = k, p.indices = d_idx.get(), p.values = d_val.get();
  cuda::topk_cuda(p, nullptr);
  const auto idx = d_idx.download();
  const auto val = d_val.download();
  for (int64_t r = 0; r < rows; ++r) {
    const auto ref = test::topk_ref(&s[size_t(r * n)], n, k);
    for (int j = 0; j < k; ++j) {
      ASSERT_EQ(idx[size_t(r * k + j)], ref[size_t(j)]) << "n=" << n << " k=" << k << " row " << r << " rank " << j;
      ASSERT_EQ(val[size_t(r * k + j)], s[size_t(r * n + ref[size_t(j)])]);
    }
  }
}

TEST(CudaSmallOps, TopkRouting) {
  DSV4_REQUIRE_CUDA();
  check_topk(5, 256, 6, 51, false);  // MoE routing: 6 of 256 experts
  check_topk(5, 256, 6, 52, true);
  check_topk(2, 8192, 32, 53, true);
  check_topk(1, 6, 6, 54, false);  // k == n
}

TEST(CudaSmallOps, TopkIndexerRadix) {
  DSV4_REQUIRE_CUDA();
  check_topk(2, 65536, 512, 61, false);  // indexer: top-512 of C/4 keys at 256k context
  check_topk(2, 65536, 512, 62, true);   // heavy ties at the threshold
  check_topk(1, 262144, 512, 63, false);  // 1M context
  check_topk(3, 600, 512, 64, true);
  check_topk(1, 4096, 2048, 65, false);  // largest k
  check_topk(1, 40000, 33, 66, true);    // small k but large n takes the radix path
}

// exp in fp32 vs double: ~1e-7 relative per term; 1e-5 relative (floor 1e-6 for tiny probabilities, judged
// absolutely) leaves margin for the fp32 sum over up to 16384 terms.
TEST(CudaSmallOps, Softmax) {
  DSV4_REQUIRE_CUDA();
  for (int64_t n : {64, 640, 16384}) {
    const int64_t rows = 9;
    const auto x = test::random_normal(size_t(rows * n), 71 + n, 3.0f);
    std::vector<double> ref(x.size());
    test::softmax_ref(x.data(), rows, n, 0.0441941738f, ref.data());
    auto d_x = upload(x);
    DeviceArray<float> d_y(x.size());
    d_y.fill_bytes(0xFF);
    cuda::softmax_cuda(d_x.get(), d_y.get(), rows, n, 0.0441941738f, nullptr);
    EXPECT_LE(test::max_rel_err(d_y.download(), ref, 1e-6), 1e-5) << "n=" << n;
  }
}

TEST(CudaSmallOps, RejectsBadArguments) {
  DSV4_REQUIRE_CUDA();
  cuda::TopkParams p;
  p.rows = 1, p.n = 10, p.k = 11;
  EXPECT_THROW(cuda::topk_cuda(p, nullptr), Error);
  cuda::RopeParams r;
  r.n_rot = 63, r.head_dim = 512;
  EXPECT_THROW(cuda::rope_cuda(r, nullptr), Error);
}

// Fused HC control (hc_mix_cuda) against a double reference of the whole chain: mix = fn . X in double over the
// F16 weights, rs = 1/sqrt(mean(X^2) + eps) in double, then the CPU twin of the Sinkhorn split / head weights on
// float(mix * rs). Tolerances: mix is a 16384-term fp32 sum (chunked, then chunk partials in order): error ~1e-6
// of the O(5) values, so 1e-5 relative to max(|ref|, rms); rs 1e-6 relative. The control outputs see an argument
// error of ~1e-5 after the scale (<= 2); sigmoid (slope <= 1/4), softmax and the contracting Sinkhorn rounds keep
// it below that, so 1e-4 absolute on values in (0, 2] leaves 10x margin. The unfused GPU sequence (F16 GEMV,
// rms_scale, split) is held to the same bound, and two launches must agree bit for bit (fixed reduction order;
// the ticket counters return to zero).
void hc_mix_case(int n_mix, int64_t T, int64_t K, uint64_t seed) {
  const std::string what = "hc_mix n_mix=" + std::to_string(n_mix) + " T=" + std::to_string(T);
  const auto fn = test::random_weights(QType::F16, n_mix, K, seed);
  const auto X = test::random_normal(size_t(T * K), seed + 1);
  const auto base = test::random_normal(size_t(n_mix), seed + 2, 0.5f);
  const std::vector<float> scale = {0.7f, 1.3f, 2.0f};
  std::vector<float> fnf(size_t(n_mix * K));
  dequantize_row(QType::F16, fn.data(), fnf.data(), n_mix * K);
  std::vector<double> mix_ref(static_cast<size_t>(T * n_mix)), rs_ref(static_cast<size_t>(T));
  std::vector<float> pre(size_t(T * 4)), post(size_t(T * 4)), comb(size_t(T * 16)), w(size_t(T * 4));
  for (int64_t t = 0; t < T; ++t) {
    double ss = 0;
    for (int64_t c = 0; c < K; ++c) ss += double(X[size_t(t * K + c)]) * X[size_t(t * K + c)];
    rs_ref[size_t(t)] = 1.0 / std::sqrt(ss / double(K) + 1e-6);
    std::vector<float> m(static_cast<size_t>(n_mix));
    for (int j = 0; j < n_mix; ++j) {
      double s = 0;
      for (int64_t c = 0; c < K; ++c) s += double(fnf[size_t(j * K + c)]) * X[size_t(t * K + c)];
      mix_ref[size_t(t * n_mix + j)] = s;
      m[size_t(j)] = float(s * rs_ref[size_t(t)]);
    }
    if (n_mix == 24)
      test::hc_sinkhorn_ref(m.data(), base.data(), scale.data(), 20, 1e-6f, &pre[size_t(t * 4)], &post[size_t(t * 4)],
                            &comb[size_t(t * 16)]);
    else
      for (int i = 0; i < 4; ++i)
        w[size_t(t * 4 + i)] = 1.0f / (1.0f + std::exp(-(m[size_t(i)] * scale[0] + base[size_t(i)]))) + 1e-6f;
  }
  DeviceArray<uint8_t> d_fn{std::span<const uint8_t>(fn)};
  auto d_X = upload(X), d_base = upload(base), d_scale = upload(scale);
  DeviceArray<float> d_pre(pre.size()), d_post(post.size()), d_comb(comb.size()), d_w(w.size());
  DeviceArray<float> d_mix(mix_ref.size()), d_rs(static_cast<size_t>(T));
  DeviceArray<uint8_t> ws(cuda::hc_mix_workspace_bytes(T, K));
  ws.fill_bytes(0);
  d_comb.fill_bytes(0xFF), d_w.fill_bytes(0xFF);
  cuda::HcMixParams p;
  p.fn = d_fn.get(), p.n_mix = n_mix, p.X = d_X.get(), p.K = K, p.n_tokens = T, p.base = d_base.get();
  p.scale = d_scale.get(), p.pre = d_pre.get(), p.post = d_post.get(), p.comb = d_comb.get(), p.w = d_w.get();
  p.mix_out = d_mix.get(), p.rs_out = d_rs.get(), p.workspace = ws.get();
  cuda::hc_mix_cuda(p, nullptr);
  cuda::check(cudaDeviceSynchronize(), what.c_str());
  const auto mix1 = d_mix.download(), rs1 = d_rs.download();
  const auto out1 = n_mix == 24 ? d_comb.download() : d_w.download();
  // Second launch with the fused collapse: the control outputs are unchanged, and `a` equals hc_collapse_cuda on
  // this launch's weights bit for bit (the same expression in stream order).
  DeviceArray<float> d_a(size_t(T * K / 4)), d_a_ref(size_t(T * K / 4));
  d_a.fill_bytes(0xFF);
  p.a = d_a.get();
  cuda::hc_mix_cuda(p, nullptr);
  cuda::check(cudaDeviceSynchronize(), what.c_str());
  EXPECT_EQ(mix1, d_mix.download()) << what << ": second launch differs";
  EXPECT_EQ(out1, n_mix == 24 ? d_comb.download() : d_w.download()) << what << ": second launch differs";
  cuda::hc_collapse_cuda(d_X.get(), n_mix == 24 ? d_pre.get() : d_w.get(), T, K / 4, d_a_ref.get(), nullptr);
  EXPECT_EQ(d_a.download(), d_a_ref.download()) << what << ": fused collapse differs from hc_collapse_cuda";
  const auto wsb = ws.download();
  for (int64_t i = 0; i < T * 4; ++i) EXPECT_EQ(wsb[size_t(i)], 0) << what << ": ticket byte " << i << " not reset";

  double ms = 0;
  for (double v : mix_ref) ms += v * v;
  EXPECT_LE(test::max_rel_err(mix1, mix_ref, std::sqrt(ms / double(mix_ref.size()))), 1e-5) << what;
  EXPECT_LE(test::max_rel_err(rs1, rs_ref, 0.0), 1e-6) << what;
  if (n_mix == 24) {
    EXPECT_LE(test::max_abs_err(d_pre.download(), pre), 1e-4) << what;
    EXPECT_LE(test::max_abs_err(d_post.download(), post), 1e-4) << what;
    EXPECT_LE(test::max_abs_err(out1, comb), 1e-4) << what;
  } else {
    EXPECT_LE(test::max_abs_err(out1, w), 1e-4) << what;
  }
}

TEST(CudaSmallOps, HcMixFusedPreAndHead) {
  DSV4_REQUIRE_CUDA();
  hc_mix_case(24, 3, 16384, 41);  // Flash: n = 4 streams x d = 4096
  hc_mix_case(4, 2, 16384, 42);
  hc_mix_case(24, 5, 1000, 43);   // K not a multiple of the 256-column chunk
}

TEST(CudaSmallOps, HcMixRejectsBadArguments) {
  DSV4_REQUIRE_CUDA();
  cuda::HcMixParams p;
  p.n_mix = 7, p.K = 16;
  EXPECT_THROW(cuda::hc_mix_cuda(p, nullptr), Error);
  p.n_mix = 24, p.K = 15;
  EXPECT_THROW(cuda::hc_mix_cuda(p, nullptr), Error);
  p.K = 16;  // null pointers
  EXPECT_THROW(cuda::hc_mix_cuda(p, nullptr), Error);
  DeviceArray<float> d(64);
  DeviceArray<uint8_t> ws(4096);
  float* f = d.get();
  p.fn = d.get(), p.X = f, p.base = f, p.scale = f, p.pre = f, p.post = f, p.comb = f, p.workspace = ws.get();
  p.K = 18, p.a = f;  // a fused collapse needs K = 4 x d
  EXPECT_THROW(cuda::hc_mix_cuda(p, nullptr), Error);
}

}  // namespace
}  // namespace dsv4
