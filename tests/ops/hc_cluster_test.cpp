// The cluster variant of the fused HC control (hc_mix_cuda with kernel = kHcMixCluster, hc.h) against the
// ticket kernel and the CPU twin, at Flash width (4 streams x 4096, Sinkhorn 20 iterations) and at odd shapes; the
// wide variant (kHcMixWide, opt-in with DSV4_CUDA_HC_KERNEL=wide) against the CPU twin at the end of the file.
//
// Tolerance: none against the ticket kernel. The cluster kernel forms the same per-thread products, the same warp
// sums (the tree of warp_sum, reached with fewer shuffles), the same 4-warp chunk partials and the same
// chunk-ordered total, then runs the same Sinkhorn function, so mix, rs, pre/post/comb (or w) must be equal BIT FOR
// BIT, and the fused collapse `a` must equal hc_collapse_cuda on those weights bit for bit (memcmp, so -0 vs +0 or
// a NaN would also fail). Against the CPU twin (double projection and RMS, test::hc_sinkhorn_ref) the bounds of
// small_ops_test.cpp hc_mix_case apply: 1e-4 absolute on pre/post/comb/w (values in (0, 2]; see there), and `a`
// vs a double collapse of the kernel's own weights 4e-6 relative to max(|ref|, 1) (four fp32 FMAs whose partial
// sums reach |8| at most for N(0,1) streams: <= 4 x 0.5 ulp(8) = 1.9e-6 absolute, doubled for margin).
// The fused hc_post is held to hc_post_cuda bit for bit (hc_post_cuda itself is checked against its CPU twin in
// small_ops_test.cpp HcCollapseAndPost).
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/gemv.h"
#include "backend/cuda/hc.h"
#include "backend/cuda/norm_rope.h"
#include "ops_common.h"
#include "ops_reference.h"

namespace dsv4 {
namespace {

using cuda::DeviceArray;
using test::upload;

// Bitwise equality of two float vectors; reports the first differing index.
::testing::AssertionResult same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return ::testing::AssertionFailure() << "sizes " << a.size() << " vs " << b.size();
  for (size_t i = 0; i < a.size(); ++i) {
    uint32_t x, y;
    std::memcpy(&x, &a[i], 4);
    std::memcpy(&y, &b[i], 4);
    if (x != y) return ::testing::AssertionFailure() << "index " << i << ": " << a[i] << " vs " << b[i];
  }
  return ::testing::AssertionSuccess();
}

struct Outputs {
  std::vector<float> mix, rs, pre, post, comb, w, a;
};

struct Case {
  int n_mix;
  int64_t T, K;
  uint64_t seed;
};

// One launch of hc_mix_cuda with the given kernel (and the fused collapse when `fused`); the ticket kernel's
// collapse is hc_collapse_cuda, the separate launch the backend issues.
Outputs run_mix(const Case& c, int kernel, bool fused, const DeviceArray<uint8_t>& fn, const DeviceArray<float>& X,
                const DeviceArray<float>& base, const DeviceArray<float>& scale) {
  const int64_t T = c.T, d = c.K / 4;
  DeviceArray<float> pre(size_t(T * 4)), post(size_t(T * 4)), comb(size_t(T * 16)), w(size_t(T * 4));
  DeviceArray<float> mix(size_t(T * c.n_mix)), rs{size_t(T)}, a(size_t(T * d));
  for (auto* b : {&pre, &post, &comb, &w, &mix, &rs, &a}) b->fill_bytes(0xFF);  // NaN: unwritten values fail
  DeviceArray<uint8_t> ws(cuda::hc_mix_workspace_bytes(T, c.K));
  ws.fill_bytes(0);
  cuda::HcMixParams p;
  p.fn = fn.get(), p.n_mix = c.n_mix, p.X = X.get(), p.K = c.K, p.n_tokens = T, p.base = base.get();
  p.scale = scale.get(), p.pre = pre.get(), p.post = post.get(), p.comb = comb.get(), p.w = w.get();
  p.mix_out = mix.get(), p.rs_out = rs.get(), p.kernel = kernel;
  p.workspace = kernel == cuda::kHcMixTicket ? ws.get() : nullptr;  // the cluster kernel needs none
  if (fused) p.a = a.get();
  cuda::hc_mix_cuda(p, nullptr);
  if (!fused) cuda::hc_collapse_cuda(X.get(), c.n_mix == 24 ? pre.get() : w.get(), T, d, a.get(), nullptr);
  cuda::check(cudaDeviceSynchronize(), "hc_cluster_test: run_mix");
  Outputs o{mix.download(), rs.download(), {}, {}, {}, {}, a.download()};
  if (c.n_mix == 24) o.pre = pre.download(), o.post = post.download(), o.comb = comb.download();
  else o.w = w.download();
  return o;
}

// One case's hc_mix inputs on the host (F16 fn [n_mix, K], X [T, K], base, scale; seeds seed .. seed + 2) and on
// the device, for run_mix.
struct MixInputs {
  std::vector<uint8_t> fn;
  std::vector<float> X, base, scale;
  DeviceArray<uint8_t> d_fn;
  DeviceArray<float> d_X, d_base, d_scale;

  explicit MixInputs(const Case& c)
      : fn(test::random_weights(QType::F16, c.n_mix, c.K, c.seed)),
        X(test::random_normal(size_t(c.T * c.K), c.seed + 1)),
        base(test::random_normal(size_t(c.n_mix), c.seed + 2, 0.5f)),
        scale{0.7f, 1.3f, 2.0f},
        d_fn{std::span<const uint8_t>(fn)},
        d_X(upload(X)),
        d_base(upload(base)),
        d_scale(upload(scale)) {}
};

// Captures `launches` hc_mix_cuda(p) on a fresh stream into a graph, replays it 3 times and waits for it.
void replay_captured(const cuda::HcMixParams& p, int launches) {
  cudaStream_t s;
  cuda::check(cudaStreamCreate(&s), "stream");
  cuda::check(cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed), "capture");
  for (int l = 0; l < launches; ++l) cuda::hc_mix_cuda(p, s);
  cudaGraph_t graph;
  cuda::check(cudaStreamEndCapture(s, &graph), "capture end");
  cudaGraphExec_t exec;
  cuda::check(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
  for (int r = 0; r < 3; ++r) cuda::check(cudaGraphLaunch(exec, s), "graph launch");
  cuda::check(cudaStreamSynchronize(s), "sync");
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(s);
}

void cluster_case(const Case& c) {
  const std::string what = "n_mix=" + std::to_string(c.n_mix) + " T=" + std::to_string(c.T) +
                           " K=" + std::to_string(c.K);
  ASSERT_TRUE(cuda::hc_mix_cluster_fits(c.n_mix, c.K)) << what << ": the cluster shape is not placeable here, "
                                                       << "so the comparison would test the ticket kernel twice";
  const MixInputs in(c);
  const Outputs ref = run_mix(c, cuda::kHcMixTicket, false, in.d_fn, in.d_X, in.d_base, in.d_scale);
  for (const bool fused : {true, false}) {
    const Outputs got = run_mix(c, cuda::kHcMixCluster, fused, in.d_fn, in.d_X, in.d_base, in.d_scale);
    const std::string w2 = what + (fused ? " fused collapse" : " separate collapse");
    EXPECT_TRUE(same_bits(got.mix, ref.mix)) << w2 << ": mix";
    EXPECT_TRUE(same_bits(got.rs, ref.rs)) << w2 << ": rs";
    EXPECT_TRUE(same_bits(got.pre, ref.pre)) << w2 << ": pre";
    EXPECT_TRUE(same_bits(got.post, ref.post)) << w2 << ": post";
    EXPECT_TRUE(same_bits(got.comb, ref.comb)) << w2 << ": comb";
    EXPECT_TRUE(same_bits(got.w, ref.w)) << w2 << ": w";
    EXPECT_TRUE(same_bits(got.a, ref.a)) << w2 << ": a";
  }
  // A second cluster launch (no workspace state to reset) repeats itself.
  const Outputs again = run_mix(c, cuda::kHcMixCluster, true, in.d_fn, in.d_X, in.d_base, in.d_scale);
  EXPECT_TRUE(same_bits(again.comb, ref.comb)) << what << ": second launch";
  EXPECT_TRUE(same_bits(again.a, ref.a)) << what << ": second launch";

  // The CPU twin, independently of the ticket kernel.
  std::vector<float> fnf(size_t(c.n_mix * c.K));
  dequantize_row(QType::F16, in.fn.data(), fnf.data(), c.n_mix * c.K);
  const int64_t d = c.K / 4;
  std::vector<float> wts(4);
  for (int64_t t = 0; t < c.T; ++t) {
    const float* x = &in.X[size_t(t * c.K)];
    double ss = 0;
    for (int64_t k = 0; k < c.K; ++k) ss += double(x[k]) * x[k];
    const double rs = 1.0 / std::sqrt(ss / double(c.K) + 1e-6);
    std::vector<float> m(static_cast<size_t>(c.n_mix));
    for (int j = 0; j < c.n_mix; ++j) {
      double s = 0;
      for (int64_t k = 0; k < c.K; ++k) s += double(fnf[size_t(j * c.K + k)]) * x[k];
      m[size_t(j)] = float(s * rs);
    }
    if (c.n_mix == 24) {
      std::vector<float> pre(4), post(4), comb(16);
      test::hc_sinkhorn_ref(m.data(), in.base.data(), in.scale.data(), 20, 1e-6f, pre.data(), post.data(),
                            comb.data());
      const std::vector<float> gp(ref.pre.begin() + t * 4, ref.pre.begin() + t * 4 + 4);
      const std::vector<float> go(ref.post.begin() + t * 4, ref.post.begin() + t * 4 + 4);
      const std::vector<float> gc(ref.comb.begin() + t * 16, ref.comb.begin() + t * 16 + 16);
      EXPECT_LE(test::max_abs_err(gp, pre), 1e-4) << what << " t=" << t << ": pre vs CPU twin";
      EXPECT_LE(test::max_abs_err(go, post), 1e-4) << what << " t=" << t << ": post vs CPU twin";
      EXPECT_LE(test::max_abs_err(gc, comb), 1e-4) << what << " t=" << t << ": comb vs CPU twin";
      wts = gp;
    } else {
      std::vector<float> w(4);
      for (int i = 0; i < 4; ++i)
        w[size_t(i)] = 1.0f / (1.0f + std::exp(-(m[size_t(i)] * in.scale[0] + in.base[size_t(i)]))) + 1e-6f;
      wts.assign(ref.w.begin() + t * 4, ref.w.begin() + t * 4 + 4);
      EXPECT_LE(test::max_abs_err(wts, w), 1e-4) << what << " t=" << t << ": w vs CPU twin";
    }
    std::vector<double> a_ref(static_cast<size_t>(d));
    for (int64_t k = 0; k < d; ++k)
      for (int i = 0; i < 4; ++i) a_ref[size_t(k)] += double(wts[size_t(i)]) * x[i * d + k];
    const std::vector<float> ga(ref.a.begin() + t * d, ref.a.begin() + (t + 1) * d);
    EXPECT_LE(test::max_rel_err(ga, a_ref, 1.0), 4e-6) << what << " t=" << t << ": collapse vs double";
  }
}

TEST(CudaHcCluster, BitIdenticalToTicketKernelAtFlashWidth) {
  DSV4_REQUIRE_CUDA();
  cluster_case({24, 1, 16384, 51});  // decode hc_pre: 16 CTAs x 4 chunks
  cluster_case({4, 1, 16384, 52});   // decode hc_head
  cluster_case({24, 3, 16384, 53});  // several tokens: one cluster each
  cluster_case({4, 2, 16384, 54});
}

TEST(CudaHcCluster, BitIdenticalToTicketKernelAtOddShapes) {
  DSV4_REQUIRE_CUDA();
  cluster_case({24, 2, 1000, 55});   // 4 chunks, the last partial: a cluster of 4 CTAs of one chunk
  cluster_case({24, 1, 4352, 56});   // 17 chunks: 16 CTAs x 2 chunks, 15 of the 32 chunk slots empty
  cluster_case({4, 1, 12288, 57});   // 48 chunks: 16 x 3 (384 threads per CTA)
  cluster_case({24, 1, 8, 58});      // one chunk, mostly idle lanes
}

// The fused hc_post (HcMixParams::post_y/post_w/post_comb): X updated in place must equal hc_post_cuda's X bit for
// bit, and every control output the ticket kernel's on that X, bit for bit. `alias` hands the kernel the same
// post/comb buffers for input and output, as the model's hc_post -> hc_pre pair would.
// With `norm` both runs also normalize `a` (HcMixParams::a_norm; the reference: rms_norm_cuda after the ticket
// kernel), which in the fused run happens in the same launch after a DSMEM exchange of the collapsed values.
void post_case(int n_mix, int64_t T, int64_t K, bool alias, uint64_t seed, bool norm = false) {
  const std::string what = "fused hc_post n_mix=" + std::to_string(n_mix) + " T=" + std::to_string(T) +
                           " K=" + std::to_string(K) + (alias ? " aliased" : "") + (norm ? " norm" : "");
  const int64_t d = K / 4;
  const bool fits = K % 1024 == 0 && d <= 4096;
  EXPECT_EQ(cuda::hc_mix_cluster_post_fits(n_mix, K), fits) << what;
  const auto fn = test::random_weights(QType::F16, n_mix, K, seed);
  const auto X = test::random_normal(size_t(T * K), seed + 1), y = test::random_normal(size_t(T * d), seed + 2);
  const auto base = test::random_normal(size_t(n_mix), seed + 3, 0.5f);
  const auto pw = test::random_normal(size_t(T * 4), seed + 4, 0.5f);
  auto pc = test::random_normal(size_t(T * 16), seed + 5, 0.2f);
  for (auto& v : pc) v = std::fabs(v);
  const std::vector<float> scale = {0.7f, 1.3f, 2.0f};
  const auto nw = test::random_normal(size_t(d), seed + 6, 0.3f);
  DeviceArray<uint8_t> d_fn{std::span<const uint8_t>(fn)};
  auto d_base = upload(base), d_scale = upload(scale), d_y = upload(y), d_nw = upload(nw);
  auto run = [&](bool fused) {
    auto d_X = upload(X), d_pw = upload(pw), d_pc = upload(pc);
    DeviceArray<float> pre(size_t(T * 4)), post(size_t(T * 4)), comb(size_t(T * 16)), w(size_t(T * 4));
    DeviceArray<float> mix(size_t(T * n_mix)), rs{size_t(T)}, a(size_t(T * d));
    for (auto* b : {&pre, &post, &comb, &w, &mix, &rs, &a}) b->fill_bytes(0xFF);
    DeviceArray<uint8_t> ws(cuda::hc_mix_workspace_bytes(T, K));
    ws.fill_bytes(0);
    cuda::HcMixParams p;
    p.fn = d_fn.get(), p.n_mix = n_mix, p.X = d_X.get(), p.K = K, p.n_tokens = T, p.base = d_base.get();
    p.scale = d_scale.get(), p.pre = pre.get(), p.post = alias ? d_pw.get() : post.get();
    p.comb = alias ? d_pc.get() : comb.get(), p.w = w.get(), p.mix_out = mix.get(), p.rs_out = rs.get();
    p.workspace = ws.get(), p.a = a.get();
    if (fused) {
      p.kernel = cuda::kHcMixCluster, p.post_y = d_y.get(), p.post_w = d_pw.get(), p.post_comb = d_pc.get();
    } else {
      cuda::hc_post_cuda(d_X.get(), d_y.get(), d_pw.get(), d_pc.get(), T, d, nullptr);
    }
    if (norm && fused) p.a_norm = true, p.a_norm_w = d_nw.get(), p.a_norm_eps = 1e-6f;
    cuda::hc_mix_cuda(p, nullptr);
    if (norm && !fused) {
      cuda::RmsNormParams rp;
      rp.x = a.get(), rp.y = a.get(), rp.w = d_nw.get(), rp.rows = T, rp.n = int(d), rp.eps = 1e-6f;
      cuda::rms_norm_cuda(rp, nullptr);
    }
    cuda::check(cudaDeviceSynchronize(), what.c_str());
    std::vector<std::vector<float>> o = {d_X.download(), mix.download(), rs.download(), a.download()};
    if (n_mix == 24) {
      o.push_back(pre.download());
      o.push_back(alias ? d_pw.download() : post.download());
      o.push_back(alias ? d_pc.download() : comb.download());
    } else {
      o.push_back(w.download());
    }
    return o;
  };
  const auto ref = run(false), got = run(true);
  const char* names[] = {"X", "mix", "rs", "a", "pre / w", "post", "comb"};
  for (size_t i = 0; i < ref.size(); ++i) EXPECT_TRUE(same_bits(got[i], ref[i])) << what << ": " << names[i];
}

TEST(CudaHcCluster, FusedHcPostBitIdentical) {
  DSV4_REQUIRE_CUDA();
  post_case(24, 1, 16384, false, 81);  // Flash decode: 16 CTAs, each 256 dims of all 4 streams
  post_case(24, 1, 16384, true, 82);   // post/comb in and out the same buffers
  post_case(4, 2, 16384, false, 83);
  post_case(24, 3, 4096, true, 84);    // d = 1024: a cluster of 4
  post_case(24, 1, 1536, false, 85);   // d = 384: not a multiple of 256, hc_post_cuda + ticket kernel instead
  post_case(4, 1, 32768, false, 86);   // d = 8192: wider than one cluster, the same fallback
}

TEST(CudaHcCluster, FusedHcPostWithNormBitIdentical) {
  DSV4_REQUIRE_CUDA();
  ASSERT_TRUE(cuda::hc_mix_cluster_post_fits(24, 16384));
  post_case(24, 1, 16384, true, 87, true);   // the backend's hc_post_pre_norm at Flash width
  post_case(24, 2, 8192, false, 88, true);   // d = 2048: 8 CTAs
  post_case(4, 1, 16384, false, 89, true);
  post_case(24, 1, 1536, true, 90, true);    // not placeable as one: hc_post_cuda, ticket kernel, rms_norm_cuda
}

// The decode graphs capture the backend's launches (relaxed capture mode): a cluster launch (with the occupancy
// query already cached by an eager launch, as the backend's first, uncaptured run of a step does) must capture and
// replay to the same bits as the eager ticket sequence.
TEST(CudaHcCluster, CapturedInGraphReplaysBitIdentical) {
  DSV4_REQUIRE_CUDA();
  const Case c{24, 1, 16384, 91};
  ASSERT_TRUE(cuda::hc_mix_cluster_fits(c.n_mix, c.K));
  const MixInputs in(c);
  const Outputs ref = run_mix(c, cuda::kHcMixTicket, false, in.d_fn, in.d_X, in.d_base, in.d_scale);
  DeviceArray<float> pre(4), post(4), comb(16), a(size_t(c.K / 4));
  for (auto* b : {&pre, &post, &comb, &a}) b->fill_bytes(0xFF);
  cuda::HcMixParams p;
  p.fn = in.d_fn.get(), p.n_mix = 24, p.X = in.d_X.get(), p.K = c.K, p.n_tokens = 1, p.base = in.d_base.get();
  p.scale = in.d_scale.get(), p.pre = pre.get(), p.post = post.get(), p.comb = comb.get(), p.a = a.get();
  p.kernel = cuda::kHcMixCluster;
  replay_captured(p, 1);
  EXPECT_TRUE(same_bits(pre.download(), ref.pre)) << "graph replay: pre";
  EXPECT_TRUE(same_bits(post.download(), ref.post)) << "graph replay: post";
  EXPECT_TRUE(same_bits(comb.download(), ref.comb)) << "graph replay: comb";
  EXPECT_TRUE(same_bits(a.download(), ref.a)) << "graph replay: a";
}

// Through the op table: DSV4_CUDA_HC_KERNEL=cluster and =ticket give the same decode hc_pre / hc_head output bits.
TEST(CudaHcCluster, BackendKnobKeepsDecodeOutputs) {
  DSV4_REQUIRE_CUDA();
  const int n = 4;
  const int64_t D = 4096;
  HcParams p;
  p.n = n, p.d = D;
  auto f16 = [](int64_t cols, int64_t rows, uint64_t seed, std::vector<uint8_t>& bytes, const char* name) {
    const auto f = test::random_normal(size_t(cols * rows), seed, 0.02f);
    bytes.resize(f.size() * 2);
    for (size_t i = 0; i < f.size(); ++i) test::put_f16(&bytes[2 * i], f[i]);
    WeightView v;
    v.type = QType::F16, v.data = bytes.data(), v.n_bytes = bytes.size(), v.name = name;
    v.ne[0] = cols, v.ne[1] = rows, v.n_dims = 2;
    return v;
  };
  auto f32 = [](const std::vector<float>& f, const char* name) {
    WeightView v;
    v.type = QType::F32, v.data = f.data(), v.n_bytes = f.size() * 4, v.name = name;
    v.ne[0] = int64_t(f.size()), v.ne[1] = 1, v.n_dims = 2;
    return v;
  };
  std::vector<uint8_t> fn_bytes, hfn_bytes;
  const auto base = test::random_normal(24, 62, 0.5f), scale = test::random_normal(3, 63, 1.0f);
  const auto hbase = test::random_normal(4, 64, 0.5f), hscale = test::random_normal(1, 65, 1.0f);
  HcWeights w;
  w.fn = f16(n * D, 24, 61, fn_bytes, "blk.0.hc_attn_fn.weight"), w.base = f32(base, "hc_base");
  w.scale = f32(scale, "hc_scale");
  HcHeadWeights hw;
  hw.fn = f16(n * D, 4, 66, hfn_bytes, "output_hc_fn.weight"), hw.base = f32(hbase, "head_base");
  hw.scale = f32(hscale, "head_scale");
  const auto X = test::random_normal(size_t(n * D), 67);
  auto run = [&](bool cluster) {  // (the wide kernel, opt-in, sums in another order: CudaHcWide tests it)
    setenv("DSV4_CUDA_HC_KERNEL", cluster ? "cluster" : "ticket", 1);
    auto be = make_cuda_backend();
    DeviceBuffer bX = be->alloc(X.size() * 4), a = be->alloc(size_t(D) * 4), po = be->alloc(size_t(n) * 4);
    DeviceBuffer co = be->alloc(size_t(n * n) * 4), h = be->alloc(size_t(D) * 4);
    be->upload(bX.data(), X.data(), X.size() * 4);
    be->hc_pre(w, p, bX.f32(), 1, a.f32(), po.f32(), co.f32());
    be->hc_head(hw, p, bX.f32(), 1, h.f32());
    std::vector<std::vector<float>> out = {std::vector<float>(size_t(D)), std::vector<float>(size_t(n)),
                                           std::vector<float>(size_t(n * n)), std::vector<float>(size_t(D))};
    be->download(out[0].data(), a.data(), size_t(D) * 4);
    be->download(out[1].data(), po.data(), size_t(n) * 4);
    be->download(out[2].data(), co.data(), size_t(n * n) * 4);
    be->download(out[3].data(), h.data(), size_t(D) * 4);
    unsetenv("DSV4_CUDA_HC_KERNEL");
    return out;
  };
  ASSERT_TRUE(cuda::hc_mix_cluster_fits(24, n * D) && cuda::hc_mix_cluster_fits(4, n * D));
  const auto ref = run(false), got = run(true);
  const char* names[] = {"hc_pre a", "hc_pre post", "hc_pre comb", "hc_head h"};
  for (size_t i = 0; i < ref.size(); ++i) EXPECT_TRUE(same_bits(got[i], ref[i])) << names[i];
}

// The norm inside the launch (HcMixParams::a_norm): `a` must equal the backend's two-launch sequence (ticket
// kernel, hc_collapse_cuda, rms_norm_cuda in place with its default thread count) BIT FOR BIT: the kernel repeats
// rms_norm_reg_kernel<4>'s operations in its order (per-thread sums of squares over dims j + (d/4) m, warp sums,
// the zero-padded warp sum of the warp sums, rsqrtf, then * scale, * w), so there is no tolerance. The control
// outputs must stay the ticket kernel's. Independently, `a` vs a double RMS norm of the kernel's own collapsed row:
// 1e-5 relative to max(|ref|, 1) (an fp32 sum of <= 4096 squares on a tree, ~12 roundings deep, rsqrtf within
// 2 ulp, two products: ~1e-6, with margin).
void norm_case(int n_mix, int64_t T, int64_t K, bool weighted, int kernel, uint64_t seed) {
  const int64_t d = K / 4;
  const std::string what = "norm n_mix=" + std::to_string(n_mix) + " T=" + std::to_string(T) + " K=" +
                           std::to_string(K) + (weighted ? " weighted" : "") + " kernel=" + std::to_string(kernel);
  const auto fn = test::random_weights(QType::F16, n_mix, K, seed);
  const auto X = test::random_normal(size_t(T * K), seed + 1);
  const auto base = test::random_normal(size_t(n_mix), seed + 2, 0.5f);
  const auto nw = test::random_normal(size_t(d), seed + 3, 0.3f);
  const std::vector<float> scale = {0.7f, 1.3f, 2.0f};
  const float eps = 1e-6f;
  DeviceArray<uint8_t> d_fn{std::span<const uint8_t>(fn)};
  auto d_X = upload(X), d_base = upload(base), d_scale = upload(scale), d_nw = upload(nw);
  const Case c{n_mix, T, K, seed};
  const Outputs ref_raw = run_mix(c, cuda::kHcMixTicket, false, d_fn, d_X, d_base, d_scale);
  // The two-launch reference: the collapse above, then rms_norm_cuda as the backend's rms_norm calls it.
  auto d_a = upload(ref_raw.a);
  cuda::RmsNormParams rp;
  rp.x = d_a.get(), rp.y = d_a.get(), rp.w = weighted ? d_nw.get() : nullptr, rp.rows = T, rp.n = int(d), rp.eps = eps;
  cuda::rms_norm_cuda(rp, nullptr);
  const std::vector<float> ref_a = d_a.download();
  // The fused launch.
  DeviceArray<float> pre(size_t(T * 4)), post(size_t(T * 4)), comb(size_t(T * 16)), w(size_t(T * 4));
  DeviceArray<float> a(size_t(T * d));
  for (auto* b : {&pre, &post, &comb, &w, &a}) b->fill_bytes(0xFF);
  DeviceArray<uint8_t> ws(cuda::hc_mix_workspace_bytes(T, K));
  ws.fill_bytes(0);
  cuda::HcMixParams p;
  p.fn = d_fn.get(), p.n_mix = n_mix, p.X = d_X.get(), p.K = K, p.n_tokens = T, p.base = d_base.get();
  p.scale = d_scale.get(), p.pre = pre.get(), p.post = post.get(), p.comb = comb.get(), p.w = w.get();
  p.kernel = kernel, p.workspace = ws.get(), p.a = a.get();
  p.a_norm = true, p.a_norm_w = weighted ? d_nw.get() : nullptr, p.a_norm_eps = eps;
  cuda::hc_mix_cuda(p, nullptr);
  cuda::check(cudaDeviceSynchronize(), what.c_str());
  EXPECT_TRUE(same_bits(a.download(), ref_a)) << what << ": normed a vs collapse + rms_norm_cuda";
  if (n_mix == 24) {
    EXPECT_TRUE(same_bits(pre.download(), ref_raw.pre)) << what << ": pre";
    EXPECT_TRUE(same_bits(post.download(), ref_raw.post)) << what << ": post";
    EXPECT_TRUE(same_bits(comb.download(), ref_raw.comb)) << what << ": comb";
  } else {
    EXPECT_TRUE(same_bits(w.download(), ref_raw.w)) << what << ": w";
  }
  const std::vector<float> got = a.download();
  for (int64_t t = 0; t < T; ++t) {
    double ss = 0;
    for (int64_t k = 0; k < d; ++k) ss += double(ref_raw.a[size_t(t * d + k)]) * ref_raw.a[size_t(t * d + k)];
    const double r = 1.0 / std::sqrt(ss / double(d) + double(eps));
    std::vector<double> y(static_cast<size_t>(d));
    for (int64_t k = 0; k < d; ++k) y[size_t(k)] = ref_raw.a[size_t(t * d + k)] * r * (weighted ? nw[size_t(k)] : 1.0);
    const std::vector<float> g(got.begin() + t * d, got.begin() + (t + 1) * d);
    EXPECT_LE(test::max_rel_err(g, y, 1.0), 1e-5) << what << " t=" << t << ": vs double RMS norm";
  }
}

TEST(CudaHcCluster, FusedNormBitIdenticalToCollapsePlusRmsNorm) {
  DSV4_REQUIRE_CUDA();
  ASSERT_TRUE(cuda::hc_mix_cluster_norm_fits(24, 16384)) << "Flash width must take the in-kernel norm";
  ASSERT_TRUE(cuda::hc_mix_cluster_norm_fits(4, 16384));
  ASSERT_TRUE(cuda::hc_mix_cluster_norm_fits(24, 8192));
  norm_case(24, 1, 16384, true, cuda::kHcMixCluster, 101);   // decode hc_pre + attn_norm: 16 CTAs x 2 rms warps
  norm_case(24, 1, 16384, false, cuda::kHcMixCluster, 102);  // unweighted
  norm_case(4, 1, 16384, true, cuda::kHcMixCluster, 103);    // hc_head + output_norm
  norm_case(24, 3, 16384, true, cuda::kHcMixCluster, 104);   // several tokens: one cluster each
  norm_case(24, 2, 8192, true, cuda::kHcMixCluster, 105);    // d = 2048: 1 rms warp per CTA
}

TEST(CudaHcCluster, NormFallbacksBitIdentical) {
  DSV4_REQUIRE_CUDA();
  EXPECT_FALSE(cuda::hc_mix_cluster_norm_fits(24, 4096));  // d = 1024: 8 rms warps over 16 CTAs
  norm_case(24, 1, 4096, true, cuda::kHcMixCluster, 111);   // cluster kernel, then rms_norm_cuda
  norm_case(24, 1, 16384, true, cuda::kHcMixTicket, 112);   // ticket kernel (fused collapse), then rms_norm_cuda
  norm_case(4, 2, 1000, true, cuda::kHcMixCluster, 113);    // d = 250 (not a multiple of 128)
}

// The Flash-width (n 4, d 4096) inputs of one decode HC sublayer for the backend tests: F16 fn [24, n d], base,
// scale, the norm weight, X, the previous sublayer's y / post / comb (comb non-negative, as the Sinkhorn leaves it).
// Seeds seed .. seed + 7. The WeightViews point into the vectors: built in place, never copied.
struct BackendHcInputs {
  static constexpr int n = 4;
  static constexpr int64_t D = 4096, K = n * D;
  HcParams p;
  std::vector<uint8_t> fn_bytes;
  std::vector<float> base, scale, norm, X, y, post0, comb0;
  HcWeights w;
  WeightView nw;

  BackendHcInputs(uint64_t seed, const char* fn_name, const char* norm_name) {
    p.n = n, p.d = D;
    const auto f = test::random_normal(size_t(K * 24), seed, 0.02f);
    fn_bytes.resize(f.size() * 2);
    for (size_t i = 0; i < f.size(); ++i) test::put_f16(&fn_bytes[2 * i], f[i]);
    base = test::random_normal(24, seed + 1, 0.5f), scale = test::random_normal(3, seed + 2, 1.0f);
    norm = test::random_normal(size_t(D), seed + 3, 0.3f);
    w.fn.type = QType::F16, w.fn.data = fn_bytes.data(), w.fn.n_bytes = fn_bytes.size(), w.fn.name = fn_name;
    w.fn.ne[0] = K, w.fn.ne[1] = 24, w.fn.n_dims = 2;
    w.base = f32(base, "hc_base"), w.scale = f32(scale, "hc_scale");
    nw = f32(norm, norm_name);
    X = test::random_normal(size_t(K), seed + 4), y = test::random_normal(size_t(D), seed + 5);
    post0 = test::random_normal(size_t(n), seed + 6, 0.5f);
    comb0 = test::random_normal(size_t(n * n), seed + 7, 0.2f);
    for (auto& v : comb0) v = std::fabs(v);
  }
  BackendHcInputs(const BackendHcInputs&) = delete;
  BackendHcInputs& operator=(const BackendHcInputs&) = delete;

  static WeightView f32(const std::vector<float>& v, const char* name) {
    WeightView wv;
    wv.type = QType::F32, wv.data = v.data(), wv.n_bytes = v.size() * 4, wv.name = name;
    wv.ne[0] = int64_t(v.size()), wv.ne[1] = 1, wv.n_dims = 2;
    return wv;
  }

  // A fresh CUDA backend with X, y, post, comb uploaded; ops(be, X, a, post, comb, y) runs the HC ops under test;
  // returns a, post, comb, X as they are afterwards.
  template <class Ops>
  std::vector<std::vector<float>> run(Ops&& ops) const {
    auto be = make_cuda_backend();
    DeviceBuffer bX = be->alloc(X.size() * 4), a = be->alloc(size_t(D) * 4), po = be->alloc(size_t(n) * 4);
    DeviceBuffer co = be->alloc(size_t(n * n) * 4), by = be->alloc(size_t(D) * 4);
    be->upload(bX.data(), X.data(), X.size() * 4);
    be->upload(by.data(), y.data(), y.size() * 4);
    be->upload(po.data(), post0.data(), post0.size() * 4);
    be->upload(co.data(), comb0.data(), comb0.size() * 4);
    ops(*be, bX.f32(), a.f32(), po.f32(), co.f32(), static_cast<const float*>(by.f32()));
    std::vector<std::vector<float>> out = {std::vector<float>(size_t(D)), std::vector<float>(size_t(n)),
                                           std::vector<float>(size_t(n * n)), std::vector<float>(X.size())};
    be->download(out[0].data(), a.data(), size_t(D) * 4);
    be->download(out[1].data(), po.data(), size_t(n) * 4);
    be->download(out[2].data(), co.data(), size_t(n * n) * 4);
    be->download(out[3].data(), bX.data(), X.size() * 4);
    return out;
  }
};

// Through the op table, with DSV4_CUDA_HC_KERNEL=cluster: hc_pre_norm (default: the in-launch norm) and
// hc_post_pre_norm (default: hc_post in the same launch too) equal hc_post, hc_pre, rms_norm bit for bit, and so do
// DSV4_CUDA_HC_NORM=0, DSV4_CUDA_HC_POST=0 and DSV4_CUDA_HC_KERNEL=ticket (the separate launches).
TEST(CudaHcCluster, BackendHcPreNormEqualsHcPreThenRmsNorm) {
  DSV4_REQUIRE_CUDA();
  const BackendHcInputs in(121, "hc_attn_fn", "attn_norm.weight");
  const int64_t D = in.D;
  const HcParams& p = in.p;
  const HcWeights& w = in.w;
  const WeightView& nw = in.nw;
  // op 0: hc_post, hc_pre, rms_norm (the reference); 1: hc_post, hc_pre_norm; 2: hc_post_pre_norm.
  // The cluster kernel's bits throughout (the opt-in wide kernel sums in another order: CudaHcWide.Backend*).
  auto run = [&](int op, const char* env, const char* value) {
    setenv("DSV4_CUDA_HC_KERNEL", "cluster", 1);
    if (env) setenv(env, value, 1);
    auto out = in.run([&](Backend& be, float* X, float* a, float* po, float* co, const float* y) {
      if (op == 2) {
        be.hc_post_pre_norm(p, y, X, w, 1, &nw, 1e-6f, a, po, co);
      } else {
        be.hc_post(p, y, po, co, 1, X);
        if (op == 1) {
          be.hc_pre_norm(w, p, X, 1, &nw, 1e-6f, a, po, co);
        } else {
          be.hc_pre(w, p, X, 1, a, po, co);
          be.rms_norm(a, &nw, 1, D, 1e-6f, a);
        }
      }
    });
    if (env) unsetenv(env);
    unsetenv("DSV4_CUDA_HC_KERNEL");
    return out;
  };
  const auto ref = run(0, nullptr, nullptr);
  const char* names[] = {"a (normed)", "post", "comb", "X"};
  const std::vector<std::pair<const char*, const char*>> variants = {{nullptr, nullptr},
                                                                     {"DSV4_CUDA_HC_NORM", "0"},
                                                                     {"DSV4_CUDA_HC_POST", "0"},
                                                                     {"DSV4_CUDA_HC_KERNEL", "ticket"}};
  for (int op : {1, 2})
    for (const auto& [env, value] : variants) {
      const auto got = run(op, env, value);
      for (size_t i = 0; i < ref.size(); ++i)
        EXPECT_TRUE(same_bits(got[i], ref[i])) << "op " << op << ": " << names[i] << " with "
                                               << (env ? env : "defaults");
    }
}

// The split kernel with its Sinkhorn as a side launch (default) and inside the HC launch
// (DSV4_CUDA_HC_SIDE_SINKHORN=0): the same function on the same values, so a, post, comb and X are the same bits
// (tolerance 0), for hc_pre_norm and hc_post_pre_norm; two launches in a row also check that the second one
// waits for the first one's side Sinkhorn (its hc_post reads post / comb).
TEST(CudaHcSplit, SideSinkhornBitIdentical) {
  DSV4_REQUIRE_CUDA();
  const BackendHcInputs in(131, "hc_attn_fn", "attn_norm.weight");
  const HcParams& p = in.p;
  const HcWeights& w = in.w;
  const WeightView& nw = in.nw;
  auto run = [&](int op, const char* side) {
    setenv("DSV4_CUDA_HC_KERNEL", "split", 1);
    setenv("DSV4_CUDA_HC_SIDE_SINKHORN", side, 1);
    auto out = in.run([&](Backend& be, float* X, float* a, float* po, float* co, const float* y) {
      if (op == 1) {
        be.hc_pre_norm(w, p, X, 1, &nw, 1e-6f, a, po, co);
      } else {
        be.hc_post_pre_norm(p, y, X, w, 1, &nw, 1e-6f, a, po, co);
        be.hc_post_pre_norm(p, y, X, w, 1, &nw, 1e-6f, a, po, co);
      }
    });
    unsetenv("DSV4_CUDA_HC_SIDE_SINKHORN");
    unsetenv("DSV4_CUDA_HC_KERNEL");
    return out;
  };
  const char* names[] = {"a (normed)", "post", "comb", "X"};
  for (int op : {1, 2}) {
    const auto in_launch = run(op, "0"), side = run(op, "1");
    for (size_t i = 0; i < in_launch.size(); ++i)
      EXPECT_TRUE(same_bits(side[i], in_launch[i])) << "op " << op << ": " << names[i];
  }
}

// Shapes outside the cluster kernel: no GPU needed for the shape checks (they answer before any device query).
TEST(CudaHcCluster, FitsRejectsShapesOutsideTheKernel) {
  EXPECT_FALSE(cuda::hc_mix_cluster_fits(7, 16384));       // neither hc_pre nor hc_head
  EXPECT_FALSE(cuda::hc_mix_cluster_fits(24, 15));         // odd K
  EXPECT_FALSE(cuda::hc_mix_cluster_fits(24, 0));
  EXPECT_FALSE(cuda::hc_mix_cluster_fits(24, 16384 + 2));  // 65 chunks > 16 CTAs x 4
  EXPECT_FALSE(cuda::hc_mix_cluster_fits(4, 28672));       // a wider model: the ticket kernel's case
  EXPECT_FALSE(cuda::hc_mix_cluster_post_fits(24, 1536));   // d = 384: not whole 256-dim slices
  EXPECT_FALSE(cuda::hc_mix_cluster_post_fits(24, 32768));  // d = 8192: more than 16 CTAs
  EXPECT_FALSE(cuda::hc_mix_cluster_post_fits(5, 16384));
  EXPECT_FALSE(cuda::hc_mix_cluster_norm_fits(24, 16384 + 4));  // d = 4097: not rms_norm's 4-per-thread layout
  EXPECT_FALSE(cuda::hc_mix_cluster_norm_fits(24, 32768));      // d = 8192: rms_norm would use 8 per thread
  EXPECT_FALSE(cuda::hc_mix_cluster_norm_fits(24, 6));          // K % 4 != 0
}

TEST(CudaHcCluster, RejectsBadArgumentsAndFallsBack) {
  DSV4_REQUIRE_CUDA();
  const int64_t K = 16384 + 256;  // 65 chunks: too wide for the cluster kernel
  const auto fn = test::random_weights(QType::F16, 24, K, 71);
  const auto X = test::random_normal(size_t(K), 72);
  const auto base = test::random_normal(24, 73, 0.5f);
  const std::vector<float> scale = {0.7f, 1.3f, 2.0f};
  DeviceArray<uint8_t> d_fn{std::span<const uint8_t>(fn)};
  auto d_X = upload(X), d_base = upload(base), d_scale = upload(scale);
  DeviceArray<float> out(64), a(size_t(K / 4));
  cuda::HcMixParams p;
  p.fn = d_fn.get(), p.n_mix = 24, p.X = d_X.get(), p.K = K, p.n_tokens = 1, p.base = d_base.get();
  p.scale = d_scale.get(), p.pre = out.get(), p.post = out.get() + 4, p.comb = out.get() + 8;
  out.fill_bytes(0xFF), a.fill_bytes(0xFF);  // both launches below start from the same bytes
  p.kernel = 7;
  EXPECT_THROW(cuda::hc_mix_cuda(p, nullptr), Error);  // unknown kernel
  p.kernel = cuda::kHcMixCluster;
  EXPECT_THROW(cuda::hc_mix_cuda(p, nullptr), Error);  // falls back to the ticket kernel, which needs a workspace
  // With a workspace the fallback runs and equals the ticket kernel's launch bit for bit.
  DeviceArray<uint8_t> ws(cuda::hc_mix_workspace_bytes(1, K));
  ws.fill_bytes(0);
  p.workspace = ws.get(), p.a = a.get();
  cuda::hc_mix_cuda(p, nullptr);
  const auto got = out.download(), got_a = a.download();
  p.kernel = cuda::kHcMixTicket;
  out.fill_bytes(0xFF), a.fill_bytes(0xFF);
  cuda::hc_mix_cuda(p, nullptr);
  EXPECT_TRUE(same_bits(got, out.download()));
  EXPECT_TRUE(same_bits(got_a, a.download()));
  p.K = 18, p.kernel = cuda::kHcMixCluster;  // a fused collapse needs K = 4 x d
  EXPECT_THROW(cuda::hc_mix_cuda(p, nullptr), Error);
  p.K = 16384, p.a = nullptr, p.post_y = d_X.get();  // a fused hc_post needs all three inputs
  EXPECT_THROW(cuda::hc_mix_cuda(p, nullptr), Error);
  p.post_w = out.get(), p.post_comb = out.get(), p.kernel = cuda::kHcMixTicket;  // ... and the cluster kernel
  EXPECT_THROW(cuda::hc_mix_cuda(p, nullptr), Error);
  p.post_y = p.post_w = p.post_comb = nullptr, p.kernel = cuda::kHcMixCluster, p.a_norm = true;  // needs `a`
  EXPECT_THROW(cuda::hc_mix_cuda(p, nullptr), Error);
}


// ---- the wide kernel (kHcMixWide, hc.h): opt-in (DSV4_CUDA_HC_KERNEL=wide) for hc_pre / hc_pre_norm / hc_post_pre_norm
// It sums mix, the RMS sum of squares and the norm's sum of squares in another fp32 order than the ticket / cluster
// kernels, so it is held to a double CPU twin with tolerances, and to itself bit for bit (repeat launches reuse
// the workspace's barrier state; a graph replays the eager bits):
//   X (fused hc_post): BIT FOR BIT with hc_post_cuda (the same post_value expression per element).
//   mix: 1e-5 relative to max(|ref|, 1): sums of K products of N(0, 0.05) F16 weights and N(0, 1) values (|mix|
//     ~ 0.05 sqrt(K) <= 8 for K <= 28672) on a tree of depth ~ 5 (lanes) + 2 (warps) + log2(G) + 2; ~14 levels of
//     0.5 ulp(8) = 7e-6 absolute at worst, typically far less.
//   rs: 2e-6 relative (a sum of positive squares: ~14 levels of 2^-24 relative, then rsqrtf's 2 ulp).
//   pre / post / comb: 1e-4 absolute, the bound of the cluster / ticket tests (small_ops_test.cpp hc_mix_case).
//   a: vs a double collapse of the kernel's own weights on the kernel's X: 4e-6 relative to max(|ref|, 1) (as
//     cluster_case); with the norm, vs a double RMS norm of that: 1e-5 (as norm_case).
struct WideCase {
  int64_t K;
  bool post, alias, norm, weighted;
  uint64_t seed;
  int launches = 1;  // back-to-back launches before the download (no hc_post: X is unchanged, so is every output)
};

void wide_case(const WideCase& c) {
  const int64_t K = c.K, d = K / 4;
  const std::string what = "wide K=" + std::to_string(K) + (c.post ? " post" : "") + (c.alias ? " aliased" : "") +
                           (c.norm ? (c.weighted ? " norm(w)" : " norm") : "") + " x" + std::to_string(c.launches);
  ASSERT_TRUE(cuda::hc_mix_wide_fits(24, K)) << what;
  const auto fn = test::random_weights(QType::F16, 24, K, c.seed);
  const auto X = test::random_normal(size_t(K), c.seed + 1), y = test::random_normal(size_t(d), c.seed + 2);
  const auto base = test::random_normal(24, c.seed + 3, 0.5f);
  const auto pw = test::random_normal(4, c.seed + 4, 0.5f);
  auto pc = test::random_normal(16, c.seed + 5, 0.2f);
  for (auto& v : pc) v = std::fabs(v);
  const auto nw = test::random_normal(size_t(d), c.seed + 6, 0.3f);
  const std::vector<float> scale = {0.7f, 1.3f, 2.0f};
  const float eps = 1e-6f;
  DeviceArray<uint8_t> d_fn{std::span<const uint8_t>(fn)};
  auto d_base = upload(base), d_scale = upload(scale), d_y = upload(y), d_nw = upload(nw);
  DeviceArray<uint8_t> ws(cuda::hc_mix_workspace_bytes(1, K));  // shared by every run below, zeroed once
  ws.fill_bytes(0);
  // The split kernel (kHcMixSplit) where the shape fits: every output the wide kernel's bits, and its Q8 view of a
  // (a_q8) quantize_activations_cuda's bytes on that a.
  const bool split = cuda::hc_mix_split_fits(24, K);
  const int64_t q8_bytes = cuda::gpu_activation_bytes(QType::Q8_0, d, cuda::GemvLayout::Q8Split);
  DeviceArray<uint8_t> a_q8(size_t(split ? q8_bytes : 1));
  auto run = [&](int kernel = cuda::kHcMixWide) {
    auto d_X = upload(X), d_pw = upload(pw), d_pc = upload(pc);
    DeviceArray<float> pre(4), post(4), comb(16), mix(24), rs(1), a{size_t(d)};
    for (auto* b : {&pre, &post, &comb, &mix, &rs, &a}) b->fill_bytes(0xFF);  // NaN: unwritten values fail
    cuda::HcMixParams p;
    p.fn = d_fn.get(), p.n_mix = 24, p.X = d_X.get(), p.K = K, p.n_tokens = 1, p.base = d_base.get();
    p.scale = d_scale.get(), p.pre = pre.get(), p.post = c.alias ? d_pw.get() : post.get();
    p.comb = c.alias ? d_pc.get() : comb.get(), p.mix_out = mix.get(), p.rs_out = rs.get();
    p.kernel = kernel, p.workspace = ws.get(), p.a = a.get();
    if (kernel == cuda::kHcMixSplit) a_q8.fill_bytes(0xA5), p.a_q8 = a_q8.get();
    if (c.post) p.post_y = d_y.get(), p.post_w = d_pw.get(), p.post_comb = d_pc.get();
    if (c.norm) p.a_norm = true, p.a_norm_w = c.weighted ? d_nw.get() : nullptr, p.a_norm_eps = eps;
    for (int l = 0; l < c.launches; ++l) cuda::hc_mix_cuda(p, nullptr);
    cuda::check(cudaDeviceSynchronize(), what.c_str());
    return std::vector<std::vector<float>>{d_X.download(), mix.download(), rs.download(), a.download(),
                                           pre.download(), c.alias ? d_pw.download() : post.download(),
                                           c.alias ? d_pc.download() : comb.download()};
  };
  const auto got = run();
  const char* names[] = {"X", "mix", "rs", "a", "pre", "post", "comb"};
  for (int rep = 0; rep < 3; ++rep) {  // deterministic, and the barrier state left by a launch serves the next
    const auto again = run();
    for (size_t i = 0; i < got.size(); ++i) EXPECT_TRUE(same_bits(again[i], got[i])) << what << ": repeat " << names[i];
  }
  // X: hc_post_cuda's bits (or untouched).
  std::vector<float> x_ref = X;
  if (c.post) {
    auto d_X = upload(X), d_pw = upload(pw), d_pc = upload(pc);
    cuda::hc_post_cuda(d_X.get(), d_y.get(), d_pw.get(), d_pc.get(), 1, d, nullptr);
    x_ref = d_X.download();
  }
  EXPECT_TRUE(same_bits(got[0], x_ref)) << what << ": X";
  // The CPU twin on that X.
  std::vector<float> fnf(size_t(24 * K));
  dequantize_row(QType::F16, fn.data(), fnf.data(), 24 * K);
  const std::vector<float>& x = got[0];
  double ss = 0;
  for (int64_t k = 0; k < K; ++k) ss += double(x[size_t(k)]) * x[size_t(k)];
  const double rs = 1.0 / std::sqrt(ss / double(K) + 1e-6);
  std::vector<double> mix_ref(24);
  std::vector<float> m(24);
  for (int j = 0; j < 24; ++j) {
    double s = 0;
    for (int64_t k = 0; k < K; ++k) s += double(fnf[size_t(j * K + k)]) * x[size_t(k)];
    mix_ref[size_t(j)] = s, m[size_t(j)] = float(s * rs);
  }
  EXPECT_LE(test::max_rel_err(got[1], mix_ref, 1.0), 1e-5) << what << ": mix vs double";
  EXPECT_LE(test::max_rel_err(got[2], std::vector<double>{rs}, 1e-30), 2e-6) << what << ": rs vs double";
  std::vector<float> pre(4), post(4), comb(16);
  test::hc_sinkhorn_ref(m.data(), base.data(), scale.data(), 20, eps, pre.data(), post.data(), comb.data());
  EXPECT_LE(test::max_abs_err(got[4], pre), 1e-4) << what << ": pre vs CPU twin";
  EXPECT_LE(test::max_abs_err(got[5], post), 1e-4) << what << ": post vs CPU twin";
  EXPECT_LE(test::max_abs_err(got[6], comb), 1e-4) << what << ": comb vs CPU twin";
  std::vector<double> a_ref(static_cast<size_t>(d));
  for (int64_t k = 0; k < d; ++k)
    for (int i = 0; i < 4; ++i) a_ref[size_t(k)] += double(got[4][size_t(i)]) * x[size_t(i * d + k)];
  if (c.norm) {
    double sa = 0;
    for (const double v : a_ref) sa += v * v;
    const double r = 1.0 / std::sqrt(sa / double(d) + double(eps));
    for (int64_t k = 0; k < d; ++k) a_ref[size_t(k)] *= r * (c.weighted ? nw[size_t(k)] : 1.0);
  }
  EXPECT_LE(test::max_rel_err(got[3], a_ref, 1.0), c.norm ? 1e-5 : 4e-6) << what << ": a vs double";
  if (!split) return;
  for (int rep = 0; rep < 2; ++rep) {  // twice: the workspace left by a split launch serves the next
    const auto sp = run(cuda::kHcMixSplit);
    for (size_t i = 0; i < got.size(); ++i)
      EXPECT_TRUE(same_bits(sp[i], got[i])) << what << ": split kernel vs wide kernel: " << names[i];
    auto d_a = upload(sp[3]);
    DeviceArray<uint8_t> q8_ref{size_t(q8_bytes)};
    cuda::quantize_activations_cuda(QType::Q8_0, d_a.get(), 1, d, q8_ref.get(), nullptr, cuda::GemvLayout::Q8Split);
    EXPECT_EQ(a_q8.download(), q8_ref.download()) << what << ": split kernel's a_q8 vs quantize_activations_cuda";
  }
}

TEST(CudaHcWide, MatchesCpuTwinAtFlashWidth) {
  DSV4_REQUIRE_CUDA();
  wide_case({16384, false, false, false, false, 201});     // decode hc_pre: 128 CTAs
  wide_case({16384, false, false, false, false, 202, 8});  // 8 launches back to back on one workspace
  wide_case({16384, false, false, true, true, 203, 5});    // hc_pre_norm (two barriers per launch)
  wide_case({16384, true, true, true, true, 204});         // hc_post_pre_norm as the backend runs it (aliased)
  wide_case({16384, true, false, true, false, 205});       // unaliased, unweighted norm
  wide_case({16384, true, false, false, false, 206});      // fused hc_post without the norm
}

TEST(CudaHcWide, MatchesCpuTwinAtOtherWidths) {
  DSV4_REQUIRE_CUDA();
  wide_case({128, true, true, true, true, 211});           // d = 32: one CTA (the barrier of one)
  wide_case({4096, true, false, true, true, 212, 1});      // d = 1024: 32 CTAs
  wide_case({16384 + 128, false, false, true, true, 213, 3});  // 129 CTAs: one thread sums 2 partial rows
  wide_case({28672, true, true, true, true, 214});         // d = 7168: 224 CTAs (> 132 SMs: 2 per SM resident)
}

TEST(CudaHcWide, FitsRejectsShapesOutsideTheKernel) {  // shape checks answer before any device query
  EXPECT_FALSE(cuda::hc_mix_wide_fits(4, 16384));      // hc_head: the cluster kernel's
  EXPECT_FALSE(cuda::hc_mix_wide_fits(24, 16384 + 64)); // d % 32 != 0
  EXPECT_FALSE(cuda::hc_mix_wide_fits(24, 0));
  EXPECT_FALSE(cuda::hc_mix_wide_fits(24, 4 * 32 * 1025));  // more than 1024 CTAs
}

TEST(CudaHcSplit, FitsRejectsShapesOutsideTheKernel) {  // shape checks answer before any device query
  EXPECT_FALSE(cuda::hc_mix_split_fits(4, 16384));         // hc_head: the cluster kernel's
  EXPECT_FALSE(cuda::hc_mix_split_fits(24, 16384 + 128));  // d % 256 != 0
  EXPECT_FALSE(cuda::hc_mix_split_fits(24, 28672));        // d = 7168: a 28-CTA tail cluster (more than 16)
  EXPECT_FALSE(cuda::hc_mix_split_fits(24, 0));
}

// The split kernel with a_q8 outside its shape is an error, not a silent skip of the quantized output.
TEST(CudaHcSplit, RejectsQ8OutputWithoutTheSplitKernel) {
  DSV4_REQUIRE_CUDA();
  cuda::HcMixParams p;
  DeviceArray<uint8_t> q8(64);
  p.K = 16384, p.n_tokens = 1, p.kernel = cuda::kHcMixCluster, p.a_q8 = q8.get();
  EXPECT_THROW(cuda::hc_mix_cuda(p, nullptr), Error);
}

// Shapes the wide kernel does not take run the cluster kernel's path: the same bits as kernel = kHcMixCluster.
TEST(CudaHcWide, OtherShapesTakeTheClusterPath) {
  DSV4_REQUIRE_CUDA();
  for (const Case& c : {Case{24, 2, 16384, 221}, Case{4, 1, 16384, 222}}) {  // several tokens; hc_head
    const MixInputs in(c);
    const Outputs ref = run_mix(c, cuda::kHcMixCluster, true, in.d_fn, in.d_X, in.d_base, in.d_scale);
    const Outputs got = run_mix(c, cuda::kHcMixWide, true, in.d_fn, in.d_X, in.d_base, in.d_scale);
    for (const auto& [g, r] : {std::pair{&got.pre, &ref.pre}, {&got.post, &ref.post}, {&got.comb, &ref.comb},
                               {&got.w, &ref.w}, {&got.a, &ref.a}, {&got.mix, &ref.mix}})
      EXPECT_TRUE(same_bits(*g, *r)) << "n_mix=" << c.n_mix << " T=" << c.T;
  }
}

// The decode graphs capture the backend's launches: a captured wide launch (PDL attribute on) replays to the eager
// launch's bits, several replays in a row on one workspace.
TEST(CudaHcWide, CapturedInGraphReplaysBitIdentical) {
  DSV4_REQUIRE_CUDA();
  const int64_t K = 16384, d = K / 4;
  ASSERT_TRUE(cuda::hc_mix_wide_fits(24, K));
  const auto fn = test::random_weights(QType::F16, 24, K, 231);
  const auto X = test::random_normal(size_t(K), 232), nw = test::random_normal(size_t(d), 233, 0.3f);
  const auto base = test::random_normal(24, 234, 0.5f);
  const std::vector<float> scale = {0.7f, 1.3f, 2.0f};
  DeviceArray<uint8_t> d_fn{std::span<const uint8_t>(fn)};
  auto d_X = upload(X), d_base = upload(base), d_scale = upload(scale), d_nw = upload(nw);
  DeviceArray<uint8_t> ws(cuda::hc_mix_workspace_bytes(1, K));
  ws.fill_bytes(0);
  DeviceArray<float> pre(4), post(4), comb(16), a{size_t(d)};
  cuda::HcMixParams p;
  p.fn = d_fn.get(), p.n_mix = 24, p.X = d_X.get(), p.K = K, p.n_tokens = 1, p.base = d_base.get();
  p.scale = d_scale.get(), p.pre = pre.get(), p.post = post.get(), p.comb = comb.get(), p.a = a.get();
  p.kernel = cuda::kHcMixWide, p.workspace = ws.get(), p.a_norm = true, p.a_norm_w = d_nw.get();
  cuda::hc_mix_cuda(p, nullptr);
  cuda::check(cudaDeviceSynchronize(), "eager");
  const std::vector<std::vector<float>> ref = {pre.download(), post.download(), comb.download(), a.download()};
  for (auto* b : {&pre, &post, &comb, &a}) b->fill_bytes(0xFF);
  replay_captured(p, 2);  // two dependent launches in the graph: a programmatic edge between them
  const std::vector<std::vector<float>> got = {pre.download(), post.download(), comb.download(), a.download()};
  const char* names[] = {"pre", "post", "comb", "a"};
  for (size_t i = 0; i < ref.size(); ++i) EXPECT_TRUE(same_bits(got[i], ref[i])) << "graph replay: " << names[i];
  // The split kernel (two launches, the tail a cluster launch with the PDL attribute) captured and replayed gives
  // the same bits too (the wide kernel's, see wide_case).
  ASSERT_TRUE(cuda::hc_mix_split_fits(24, K));
  for (auto* b : {&pre, &post, &comb, &a}) b->fill_bytes(0xFF);
  p.kernel = cuda::kHcMixSplit;
  replay_captured(p, 2);
  const std::vector<std::vector<float>> sp = {pre.download(), post.download(), comb.download(), a.download()};
  for (size_t i = 0; i < ref.size(); ++i) EXPECT_TRUE(same_bits(sp[i], ref[i])) << "split graph replay: " << names[i];
}

// Through the op table at Flash width: with DSV4_CUDA_HC_KERNEL=wide, hc_pre / hc_pre_norm / hc_post_pre_norm are the
// wide kernel's launch (bit for bit with hc_mix_cuda(kHcMixWide) on the same inputs), and they agree with the cluster kernel
// (DSV4_CUDA_HC_KERNEL=cluster) to the wide kernel's tolerances above: X bit for bit, post / comb 1e-4 absolute,
// `a` 1e-5 relative to max(|a|, 1) (both within ~4e-6 / 1e-5 of the double twin).
TEST(CudaHcWide, BackendWideKnobIsTheWideKernel) {
  DSV4_REQUIRE_CUDA();
  const BackendHcInputs in(241, "hc_ffn_fn", "ffn_norm.weight");
  const int64_t D = in.D, K = in.K;
  ASSERT_TRUE(cuda::hc_mix_wide_fits(24, K));
  const HcParams& p = in.p;
  const HcWeights& w = in.w;
  const WeightView& nw = in.nw;
  const std::vector<uint8_t>& fn_bytes = in.fn_bytes;
  const auto &X = in.X, &y = in.y, &post0 = in.post0, &comb0 = in.comb0;
  const auto &base = in.base, &scale = in.scale, &norm = in.norm;
  // op 0: hc_pre; 1: hc_pre_norm; 2: hc_post_pre_norm. Outputs a, post, comb, X.
  auto backend_run = [&](int op, const char* kernel) {
    if (kernel) setenv("DSV4_CUDA_HC_KERNEL", kernel, 1);
    auto out = in.run([&](Backend& be, float* bX, float* a, float* po, float* co, const float* by) {
      if (op == 0) be.hc_pre(w, p, bX, 1, a, po, co);
      if (op == 1) be.hc_pre_norm(w, p, bX, 1, &nw, 1e-6f, a, po, co);
      if (op == 2) be.hc_post_pre_norm(p, by, bX, w, 1, &nw, 1e-6f, a, po, co);
    });
    if (kernel) unsetenv("DSV4_CUDA_HC_KERNEL");
    return out;
  };
  auto direct_run = [&](int op) {  // the same launch through hc_mix_cuda
    DeviceArray<uint8_t> d_fn{std::span<const uint8_t>(fn_bytes)};
    auto d_X = upload(X), d_y = upload(y), d_po = upload(post0), d_co = upload(comb0), d_base = upload(base);
    auto d_scale = upload(scale), d_nw = upload(norm);
    DeviceArray<float> pre(4), a{size_t(D)};
    DeviceArray<uint8_t> ws(cuda::hc_mix_workspace_bytes(1, K));
    ws.fill_bytes(0);
    cuda::HcMixParams hp;
    hp.fn = d_fn.get(), hp.n_mix = 24, hp.X = d_X.get(), hp.K = K, hp.n_tokens = 1, hp.norm_eps = p.norm_eps;
    hp.base = d_base.get(), hp.scale = d_scale.get(), hp.iters = p.sinkhorn_iters, hp.eps = p.hc_eps;
    hp.pre = pre.get(), hp.post = d_po.get(), hp.comb = d_co.get(), hp.workspace = ws.get();
    hp.kernel = cuda::kHcMixWide, hp.a = a.get();
    if (op == 2) hp.post_y = d_y.get(), hp.post_w = d_po.get(), hp.post_comb = d_co.get();
    if (op >= 1) hp.a_norm = true, hp.a_norm_w = d_nw.get(), hp.a_norm_eps = 1e-6f;
    cuda::hc_mix_cuda(hp, nullptr);
    cuda::check(cudaDeviceSynchronize(), "direct wide launch");
    return std::vector<std::vector<float>>{a.download(), d_po.download(), d_co.download(), d_X.download()};
  };
  const char* names[] = {"a", "post", "comb", "X"};
  for (int op : {0, 1, 2}) {
    // DSV4_CUDA_HC_KERNEL=wide runs the wide kernel; the default (unset) and =split the split kernels, whose bits
    // are the wide kernel's (with the norm, the default also writes the Q8 view of a: CudaHcSplit.Backend*).
    const auto got = backend_run(op, "wide"), direct = direct_run(op), cl = backend_run(op, "cluster");
    const auto dflt = backend_run(op, nullptr), sp = backend_run(op, "split");
    for (size_t i = 0; i < got.size(); ++i) {
      EXPECT_TRUE(same_bits(got[i], direct[i])) << "op " << op << ": wide knob vs hc_mix_cuda(wide): " << names[i];
      EXPECT_TRUE(same_bits(dflt[i], got[i])) << "op " << op << ": default (split) vs the wide kernel: " << names[i];
      EXPECT_TRUE(same_bits(sp[i], got[i])) << "op " << op << ": split knob vs the wide kernel: " << names[i];
    }
    std::vector<double> a_cl(cl[0].begin(), cl[0].end());
    EXPECT_LE(test::max_rel_err(got[0], a_cl, 1.0), 1e-5) << "op " << op << ": a vs the cluster kernel";
    EXPECT_LE(test::max_abs_err(got[1], cl[1]), 1e-4) << "op " << op << ": post vs the cluster kernel";
    EXPECT_LE(test::max_abs_err(got[2], cl[2]), 1e-4) << "op " << op << ": comb vs the cluster kernel";
    EXPECT_TRUE(same_bits(got[3], cl[3])) << "op " << op << ": X vs the cluster kernel";
  }
}

// Through the op table: the split kernel's Q8 view of a (published as the activation cache entry of a) gives the
// projection that reads a the same bits as quantizing a in its own launch (DSV4_CUDA_HC_Q8=0), for hc_pre_norm and
// hc_post_pre_norm followed by a Q8_0 matmul (as attn_q_a after the attention HC).
TEST(CudaHcSplit, BackendQ8ViewFeedsTheProjection) {
  DSV4_REQUIRE_CUDA();
  const BackendHcInputs in(251, "hc_attn_fn", "attn_norm.weight");
  const int64_t D = in.D, rows = 1024;
  if (!cuda::hc_mix_split_fits(24, in.K)) GTEST_SKIP() << "the split kernel's tail cluster cannot be placed here";
  const auto wq = test::random_weights(QType::Q8_0, rows, D, 252);
  WeightView qa;
  qa.type = QType::Q8_0, qa.data = wq.data(), qa.n_bytes = wq.size(), qa.name = "blk.0.attn_q_a.weight";
  qa.ne[0] = D, qa.ne[1] = rows, qa.n_dims = 2;
  auto run = [&](int op, bool q8) {
    if (!q8) setenv("DSV4_CUDA_HC_Q8", "0", 1);
    std::vector<float> y(static_cast<size_t>(rows));
    auto out = in.run([&](Backend& be, float* X, float* a, float* po, float* co, const float* by) {
      if (op == 1) be.hc_pre_norm(in.w, in.p, X, 1, &in.nw, 1e-6f, a, po, co);
      else be.hc_post_pre_norm(in.p, by, X, in.w, 1, &in.nw, 1e-6f, a, po, co);
      DeviceBuffer q = be.alloc(size_t(rows) * 4);
      be.matmul(qa, -1, a, 1, q.f32());
      be.download(y.data(), q.data(), size_t(rows) * 4);
    });
    unsetenv("DSV4_CUDA_HC_Q8");
    out.push_back(y);
    return out;
  };
  for (int op : {1, 2}) {
    const auto with = run(op, true), without = run(op, false);
    for (size_t i = 0; i < with.size(); ++i)
      EXPECT_TRUE(same_bits(with[i], without[i])) << "op " << op << ": output " << i << " (4: the projection)";
  }
}

}  // namespace
}  // namespace dsv4
