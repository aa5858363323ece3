// The attention ops of the CUDA op table (make_cuda_backend: head_prep, compressor_step, indexer_topk,
// sink_attention, matmul_grouped) against the CPU backend at Flash widths (64 heads x 512, rope 64, indexer
// 64 x 128, top-k 512, window 128, o_groups 8 x 1024), with QAT on. Arguments go through each backend's own
// memory API (alloc/upload/download), so the test holds whether backend memory is host or device memory.
// The compressor's ape view carries the byte count of an F16 file tensor, as the binding's F32 copies do: a
// backend that mirrors n_bytes instead of the element count fails here.
#include <algorithm>
#include <cstring>
#include <set>

#include "backend/cpu/cpu_backend.h"
#include "backend/cuda/cuda_backend.h"
#include "model/rope.h"
#include "ops_common.h"

namespace dsv4 {
namespace {

using test::get;
using test::put;

WeightView f32_view(const std::vector<float>& v, int64_t ne0, int64_t ne1, const char* name) {
  WeightView w;
  w.type = QType::F32, w.data = v.data(), w.n_bytes = v.size() * sizeof(float), w.name = name;
  w.ne[0] = ne0, w.ne[1] = ne1, w.n_dims = ne1 > 1 ? 2 : 1;
  return w;
}

// QAT outputs: an element may sit one FP8/FP4 grid step away where the two norms' different fp32 summation
// orders moved it across a rounding boundary; everything else agrees to 1e-5 relative (floor 1e-3). At most 1%
// of elements may take the step, none may differ by more than a step (<= 1/3 of the value, or 2^-6 absolute in
// the FP8 subnormal range).
void expect_qat_close(const std::vector<float>& y, const std::vector<float>& ref, const char* what) {
  size_t steps = 0, bad = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    const double d = std::fabs(double(y[i]) - ref[i]);
    if (!std::isfinite(y[i])) { ++bad; continue; }
    if (d <= 1e-5 * std::max(std::fabs(double(ref[i])), 1e-3)) continue;
    const double big = std::max(std::fabs(double(ref[i])), std::fabs(double(y[i])));
    if (d <= 0.34 * big || d <= 0x1p-6) ++steps; else ++bad;
  }
  EXPECT_EQ(bad, 0u) << what;
  EXPECT_LE(double(steps), 0.01 * double(y.size())) << what;
}

const RopeFreqs& yarn() {
  static const RopeFreqs f = rope_freqs_yarn(160000.0, 64, RopeYarn{16.0, 65536.0, 32.0, 1.0});
  return f;
}

TEST(CudaAttentionBackend, HeadPrepMatchesCpu) {
  DSV4_REQUIRE_CUDA();
  auto cpu = make_cpu_backend();
  auto gpu = make_cuda_backend();
  const auto kv_norm = test::random_normal(512, 3);
  const WeightView nw = f32_view(kv_norm, 512, 1, "kv_norm");
  struct Case { int H, dim; bool norm; const WeightView* w; AttnQat qat; bool inverse; const char* what; };
  for (const Case c : {Case{64, 512, true, nullptr, AttnQat::None, false, "q: norm + rope"},
                       Case{1, 512, true, &nw, AttnQat::Fp8, false, "kv: weighted norm + rope + fp8"},
                       Case{64, 128, false, nullptr, AttnQat::Fp4Indexer, false, "indexer q: rope + fp4"},
                       Case{64, 512, false, nullptr, AttnQat::None, true, "output: inverse rope"}}) {
    const int T = 3;
    const auto x = test::random_normal(size_t(T) * c.H * c.dim, uint64_t(c.H + c.dim), 2.0f);
    HeadPrep p;
    p.norm = c.norm, p.norm_w = c.w, p.rope = &yarn(), p.pos0 = 70001, p.inverse = c.inverse, p.qat = c.qat;
    auto bc = put(*cpu, x), bg = put(*gpu, x);
    cpu->head_prep(bc.f32(), T, c.H, c.dim, p);
    gpu->head_prep(bg.f32(), T, c.H, c.dim, p);
    expect_qat_close(get<float>(*gpu, bg, x.size()), get<float>(*cpu, bc, x.size()), c.what);
  }
}

TEST(CudaAttentionBackend, CompressorStepMatchesCpu) {
  DSV4_REQUIRE_CUDA();
  auto cpu = make_cpu_backend();
  auto gpu = make_cuda_backend();
  for (auto [m, d, qat] : {std::tuple{4, 512, AttnQat::Fp8}, std::tuple{4, 128, AttnQat::Fp4Indexer},
                           std::tuple{128, 512, AttnQat::Fp8}}) {
    const bool overlap = m == 4;
    const int cw = overlap ? 2 * d : d;
    const std::vector<int> chunks = m == 4 ? std::vector<int>{1, 6, 1, 1, 40, 3} : std::vector<int>{100, 1, 27, 1, 130};
    int total = 0;
    for (int c : chunks) total += c;
    const auto v = test::random_normal(size_t(total) * cw, uint64_t(m + d));
    const auto z = test::random_normal(size_t(total) * cw, uint64_t(m + d + 1), 2.0f);
    const auto ape = test::random_normal(size_t(m) * cw, uint64_t(m + d + 2), 0.5f);
    const auto norm = test::random_normal(size_t(d), uint64_t(m + d + 3));
    WeightView ape_v = f32_view(ape, cw, m, "compressor_ape");
    ape_v.n_bytes = ape.size() * 2;  // as bound from an F16 file tensor (binding keeps the file's byte count)
    const WeightView norm_v = f32_view(norm, d, 1, "compressor_norm");
    CompressorParams p;
    p.ape = &ape_v, p.norm = &norm_v, p.rope = &yarn(), p.qat = qat;
    const int64_t cap = total / m + 1;
    struct State { DeviceBuffer cv, cz, pv, pz, rows; CompressorBuffers b; };
    auto init = [&](Backend& be) {
      State s;
      s.cv = be.alloc(size_t(m) * cw * 4), s.cz = be.alloc(size_t(m) * cw * 4);
      s.pv = be.alloc(size_t(m) * d * 4), s.pz = be.alloc(size_t(m) * d * 4), s.rows = be.alloc(size_t(cap) * d * 4);
      be.fill(s.cv.f32(), 0.0f, size_t(m) * cw), be.fill(s.cz.f32(), -INFINITY, size_t(m) * cw);
      be.fill(s.pv.f32(), 0.0f, size_t(m) * d), be.fill(s.pz.f32(), -INFINITY, size_t(m) * d);
      be.fill(s.rows.f32(), 0.0f, size_t(cap) * d);
      s.b.ratio = m, s.b.dim = d, s.b.overlap = overlap, s.b.cur_v = s.cv.f32(), s.b.cur_z = s.cz.f32();
      s.b.prev_v = overlap ? s.pv.f32() : nullptr, s.b.prev_z = overlap ? s.pz.f32() : nullptr;
      s.b.rows = s.rows.f32();
      return s;
    };
    State sc = init(*cpu), sg = init(*gpu);
    auto vc = put(*cpu, v), zc = put(*cpu, z), vg = put(*gpu, v), zg = put(*gpu, z);
    int64_t p0 = 0;
    for (int c : chunks) {
      cpu->compressor_step(p, sc.b, vc.f32() + p0 * cw, zc.f32() + p0 * cw, c, p0);
      gpu->compressor_step(p, sg.b, vg.f32() + p0 * cw, zg.f32() + p0 * cw, c, p0);
      p0 += c;
    }
    const size_t n_rows = size_t(total / m) * d;
    const std::string what = "m=" + std::to_string(m) + " d=" + std::to_string(d);
    expect_qat_close(get<float>(*gpu, sg.rows, n_rows), get<float>(*cpu, sc.rows, n_rows), what.c_str());
    // Open-window buffers are copies and one float add: bitwise.
    EXPECT_EQ(get<float>(*gpu, sg.cz, size_t(m) * cw), get<float>(*cpu, sc.cz, size_t(m) * cw)) << what;
    EXPECT_EQ(get<float>(*gpu, sg.cv, size_t(m) * cw), get<float>(*cpu, sc.cv, size_t(m) * cw)) << what;
  }
}

TEST(CudaAttentionBackend, IndexerAndSinkAttentionMatchCpu) {
  DSV4_REQUIRE_CUDA();
  auto cpu = make_cpu_backend();
  auto gpu = make_cuda_backend();
  constexpr int T = 2, H = 64, dh = 512, W = 128, K = 512, HI = 64, dI = 128;
  const int64_t p0 = 8190, n_rows = (p0 + T) / 4;
  const auto qI = test::random_normal(size_t(T) * HI * dI, 1), wI = test::random_normal(size_t(T) * HI, 2);
  const auto keys = test::random_normal(size_t(n_rows) * dI, 3);
  IndexerParams ip;
  ip.heads = HI, ip.dim = dI, ip.ratio = 4, ip.top_k = K, ip.weight_scale = float(1.0 / std::sqrt(double(dI * HI)));
  auto run_idx = [&](Backend& be) {
    auto q = put(be, qI), w = put(be, wI), k = put(be, keys);
    DeviceBuffer sel = be.alloc(size_t(T) * K * 4);
    be.indexer_topk(ip, q.f32(), w.f32(), k.f32(), T, p0, sel.i32());
    return get<int32_t>(be, sel, size_t(T) * K);
  };
  const auto sel_c = run_idx(*cpu), sel_g = run_idx(*gpu);
  for (int t = 0; t < T; ++t) {
    // Near-equal scores may swap at the k-th place between the two summation orders: at most 2 of 512 rows.
    std::set<int32_t> a(sel_c.begin() + t * K, sel_c.begin() + (t + 1) * K);
    int missing = 0;
    for (int i = 0; i < K; ++i) missing += !a.count(sel_g[size_t(t * K + i)]);
    EXPECT_LE(missing, 2) << "token " << t;
    EXPECT_TRUE(std::is_sorted(sel_g.begin() + t * K, sel_g.begin() + (t + 1) * K)) << "token " << t;
  }

  const auto q = test::random_normal(size_t(T) * H * dh, 4), kv = test::random_normal(size_t(T) * dh, 5);
  const auto ring = test::random_normal(size_t(W) * dh, 6), comp = test::random_normal(size_t(n_rows) * dh, 7);
  const auto sinks = test::random_normal(H, 8);
  const WeightView sinks_v = f32_view(sinks, H, 1, "attn_sinks");
  SinkAttnParams ap;
  ap.heads = H, ap.dim = dh, ap.window = W, ap.ratio = 4, ap.comp = CompRows::Selected, ap.top_k = K;
  ap.sinks = &sinks_v, ap.scale = float(1.0 / std::sqrt(double(dh)));
  auto run_attn = [&](Backend& be) {
    auto bq = put(be, q), bkv = put(be, kv), br = put(be, ring), bc = put(be, comp), bs = put(be, sel_c);
    DeviceBuffer out = be.alloc(q.size() * 4);
    be.sink_attention(ap, bq.f32(), bkv.f32(), br.f32(), bc.f32(), bs.i32(), T, p0, out.f32());
    return get<float>(be, out, q.size());
  };
  // Same selection on both sides; fp32 reduction orders differ (see attention_sink_test): 2e-5 relative L2.
  EXPECT_LE(test::rel_l2(run_attn(*gpu), run_attn(*cpu)), 2e-5);
}

TEST(CudaAttentionBackend, MatmulGroupedMatchesCpu) {
  DSV4_REQUIRE_CUDA();
  auto cpu = make_cpu_backend();
  auto gpu = make_cuda_backend();
  constexpr int G = 8, ro = 1024, gin = 4096, T = 2;  // Flash wo_a: 8 groups of 8 heads x 512
  const auto wbytes = test::random_weights(QType::Q8_0, int64_t(G) * ro, gin, 9);
  WeightView w;
  w.type = QType::Q8_0, w.data = wbytes.data(), w.n_bytes = wbytes.size(), w.name = "attn_output_a";
  w.ne[0] = gin, w.ne[1] = int64_t(G) * ro, w.n_dims = 2;
  const auto x = test::random_normal(size_t(T) * G * gin, 10);
  auto run = [&](Backend& be) {
    auto bx = put(be, x);
    DeviceBuffer y = be.alloc(size_t(T) * G * ro * 4);
    be.matmul_grouped(w, G, bx.f32(), T, y.f32());
    return get<float>(be, y, size_t(T) * G * ro);
  };
  // Identical activation quantization and integer block dots on both sides; fp32 summation order only
  // (as gemv_test): 1e-5 relative L2.
  EXPECT_LE(test::rel_l2(run(*gpu), run(*cpu)), 1e-5);
}

}  // namespace
}  // namespace dsv4
