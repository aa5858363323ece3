// The decode fusions of the attention core (src/model/attention.cpp): head_prep_batch (q, kv and indexer-query
// rows in one launch), sink_attention's out_rope (output de-rotation) and store_window (ring update), and the
// one-launch decode kernel of the CUDA compressor step.
// Each fused op must give exactly the bits of the separate ops it replaces on the same backend: the CPU backend
// (runs everywhere) and the CUDA backend (skips without a GPU), at Flash widths (64 heads x 512, rope 64, indexer
// 64 x 128, top-k 512, window 128) over the kernel paths: one split (few rows), split + combine (decode at 8k),
// several tokens (ring copies after the kernels) and the tensor-core prefill kernel (T >= 40).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <memory>
#include <tuple>
#include <utility>

#include "backend/cpu/cpu_backend.h"
#include "backend/cuda/compressor.h"
#include "backend/cuda/cuda_backend.h"
#include "model/rope.h"
#include "ops_common.h"

namespace dsv4 {
namespace {

using test::get;
using test::put;

WeightView f32_view(const std::vector<float>& v, int64_t ne0, const char* name) {
  WeightView w;
  w.type = QType::F32, w.data = v.data(), w.n_bytes = v.size() * sizeof(float), w.name = name;
  w.ne[0] = ne0, w.ne[1] = 1, w.n_dims = 1;
  return w;
}

const RopeFreqs& yarn() {
  static const RopeFreqs f = rope_freqs_yarn(160000.0, 64, RopeYarn{16.0, 65536.0, 32.0, 1.0});
  return f;
}

constexpr int kH = 64, kDh = 512, kW = 128, kK = 512, kHI = 64, kDI = 128;

// q / kv / indexer-query head_preps of T tokens at p0, as one head_prep_batch or as three head_prep calls.
void check_head_prep_batch(Backend& be, int T, int64_t p0) {
  const auto kv_norm = test::random_normal(kDh, 3);
  const WeightView nw = f32_view(kv_norm, kDh, "kv_norm");
  const auto q = test::random_normal(size_t(T) * kH * kDh, 11, 2.0f);
  const auto kv = test::random_normal(size_t(T) * kDh, 12, 2.0f);
  const auto qi = test::random_normal(size_t(T) * kHI * kDI, 13, 2.0f);
  auto run = [&](bool batched) {
    auto bq = put(be, q), bkv = put(be, kv), bqi = put(be, qi);
    HeadPrepJob jobs[3];
    jobs[0].x = bq.f32(), jobs[0].H = kH, jobs[0].dim = kDh;
    jobs[0].p.norm = true, jobs[0].p.rope = &yarn(), jobs[0].p.pos0 = p0;
    jobs[1].x = bkv.f32(), jobs[1].H = 1, jobs[1].dim = kDh;
    jobs[1].p = jobs[0].p, jobs[1].p.norm_w = &nw, jobs[1].p.qat = AttnQat::Fp8;
    jobs[2].x = bqi.f32(), jobs[2].H = kHI, jobs[2].dim = kDI;
    jobs[2].p.rope = &yarn(), jobs[2].p.pos0 = p0, jobs[2].p.qat = AttnQat::Fp4Indexer;
    if (batched) {
      be.head_prep_batch(jobs, 3, T);
    } else {
      for (const HeadPrepJob& j : jobs) be.head_prep(j.x, T, j.H, j.dim, j.p);
    }
    return std::tuple{get<float>(be, bq, q.size()), get<float>(be, bkv, kv.size()), get<float>(be, bqi, qi.size())};
  };
  const auto [q1, kv1, qi1] = run(true);
  const auto [q0, kv0, qi0] = run(false);
  EXPECT_EQ(q1, q0) << be.name() << " q, T=" << T;
  EXPECT_EQ(kv1, kv0) << be.name() << " kv, T=" << T;
  EXPECT_EQ(qi1, qi0) << be.name() << " indexer q, T=" << T;
  EXPECT_NE(q1, q) << "the rows were processed";
}

struct SinkCase {
  int T;
  int64_t p0;
  CompRows comp;
  const char* what;
};

// Sink attention with out_rope + store_window against sink_attention, window_store, inverse head_prep.
// Returns the fused output (for the cross-backend check).
std::vector<float> check_sink_fusions(Backend& be, const SinkCase& c) {
  const int T = c.T;
  const int64_t n_comp = (c.p0 + T) / 4;
  const auto q = test::random_normal(size_t(T) * kH * kDh, 21), kv = test::random_normal(size_t(T) * kDh, 22);
  const auto ring = test::random_normal(size_t(kW) * kDh, 23);
  const auto comp = test::random_normal(size_t(std::max<int64_t>(n_comp, 1)) * kDh, 24);
  const auto sinks = test::random_normal(kH, 25);
  const WeightView sinks_v = f32_view(sinks, kH, "attn_sinks");
  // Selected rows: min(K, n_vis) distinct visible rows spread over the token's n_vis, ascending.
  std::vector<int32_t> sel(size_t(T) * kK, 0);
  for (int t = 0; t < T; ++t) {
    const int64_t n_vis = (c.p0 + t + 1) / 4, count = std::min<int64_t>(kK, n_vis);
    for (int64_t i = 0; i < count; ++i) sel[size_t(t) * kK + size_t(i)] = int32_t(i * n_vis / count);
  }
  SinkAttnParams ap;
  ap.heads = kH, ap.dim = kDh, ap.window = kW, ap.ratio = 4, ap.comp = c.comp, ap.top_k = kK;
  ap.sinks = &sinks_v, ap.scale = float(1.0 / std::sqrt(double(kDh)));
  auto run = [&](bool fused) {
    auto bq = put(be, q), bkv = put(be, kv), br = put(be, ring), bc = put(be, comp), bs = put(be, sel);
    DeviceBuffer out = be.alloc(q.size() * 4);
    SinkAttnParams p = ap;
    if (fused) p.out_rope = &yarn(), p.store_window = true;
    be.sink_attention(p, bq.f32(), bkv.f32(), br.f32(), bc.f32(), bs.i32(), T, c.p0, out.f32());
    if (!fused) {
      be.window_store(br.f32(), kW, kDh, bkv.f32(), T, c.p0);
      HeadPrep op;
      op.rope = &yarn(), op.pos0 = c.p0, op.inverse = true;
      be.head_prep(out.f32(), T, kH, kDh, op);
    }
    return std::pair{get<float>(be, out, q.size()), get<float>(be, br, ring.size())};
  };
  const auto [o1, r1] = run(true);
  const auto [o0, r0] = run(false);
  EXPECT_EQ(o1, o0) << be.name() << " output: " << c.what;
  EXPECT_EQ(r1, r0) << be.name() << " ring: " << c.what;
  EXPECT_NE(r1, ring) << be.name() << " the ring took the new rows: " << c.what;
  return o1;
}

const SinkCase kSinkCases[] = {
    {1, 5, CompRows::Selected, "decode, 7 rows: one split, de-rotation in the attention kernel"},
    {1, 0, CompRows::All, "first token: ring slot 0"},
    {1, 8190, CompRows::Selected, "decode CSA 8k: splits + combine"},
    {1, 2047, CompRows::All, "decode, all 512 compressed rows (the HCA row set): splits + combine, ring slot 127"},
    {3, 254, CompRows::All, "3 tokens across the ring's end: copies after the kernels"},
    {48, 1000, CompRows::Selected, "prefill 48 tokens: tensor-core kernel"},
};

TEST(AttentionFused, CpuHeadPrepBatchEqualsSeparateOps) {
  auto cpu = make_cpu_backend();
  check_head_prep_batch(*cpu, 1, 8191);
  check_head_prep_batch(*cpu, 3, 70001);
}

TEST(AttentionFused, CpuSinkFusionsEqualSeparateOps) {
  auto cpu = make_cpu_backend();
  for (const SinkCase& c : kSinkCases) check_sink_fusions(*cpu, c);
}

TEST(CudaAttentionFused, HeadPrepBatchBitwise) {
  DSV4_REQUIRE_CUDA();
  auto gpu = make_cuda_backend();
  check_head_prep_batch(*gpu, 1, 8191);
  check_head_prep_batch(*gpu, 3, 70001);
}

TEST(CudaAttentionFused, SinkFusionsBitwiseAndMatchCpu) {
  DSV4_REQUIRE_CUDA();
  auto cpu = make_cpu_backend();
  auto gpu = make_cuda_backend();
  for (const SinkCase& c : kSinkCases) {
    const auto g = check_sink_fusions(*gpu, c), h = check_sink_fusions(*cpu, c);
    // fp32 reduction orders differ between the backends (attention_sink_test): 2e-5 relative L2.
    EXPECT_LE(test::rel_l2(g, h), 2e-5) << c.what;
  }
}

// T == 1 steps through the one-launch decode kernel and through the general path (pool, row_finish, update
// launches) from the same state: every buffer bitwise equal after every step (rows emitted or not).
void compressor_decode_case(int m, int d, cuda::RowQat qat, int n_tokens) {
  const bool overlap = m == 4;
  const int cw = overlap ? 2 * d : d;
  const RopeFreqs& rf = yarn();
  const auto v = test::random_normal(size_t(n_tokens) * cw, uint64_t(m * 100 + d));
  const auto z = test::random_normal(size_t(n_tokens) * cw, uint64_t(m * 100 + d + 1), 2.0f);
  const auto ape = test::random_normal(size_t(m) * cw, uint64_t(m + d + 2), 0.5f);
  const auto norm = test::random_normal(size_t(d), uint64_t(d + 3));
  const int64_t max_rows = n_tokens / m + 1;
  auto d_v = test::upload(v), d_z = test::upload(z), d_ape = test::upload(ape), d_norm = test::upload(norm);
  struct State {
    cuda::DeviceArray<float> cv, cz, pv, pz, rows;
  };
  auto make_state = [&] {
    State s{test::upload(std::vector<float>(size_t(m) * cw, 0.0f)),
            test::upload(std::vector<float>(size_t(m) * cw, -INFINITY)),
            test::upload(std::vector<float>(size_t(m) * d, 0.0f)),
            test::upload(std::vector<float>(size_t(m) * d, -INFINITY)),
            cuda::DeviceArray<float>(size_t(max_rows) * d)};
    s.rows.fill_bytes(0xFF);
    return s;
  };
  State a = make_state(), b = make_state();
  auto params = [&](State& s, int64_t pos, bool decode) {
    cuda::CompressorStepParams p;
    p.ratio = m, p.dim = d, p.overlap = overlap, p.ape = d_ape.get(), p.cur_v = s.cv.get(), p.cur_z = s.cz.get();
    p.prev_v = s.pv.get(), p.prev_z = s.pz.get(), p.rows = s.rows.get(), p.max_rows = max_rows;
    p.norm_w = d_norm.get(), p.n_rot = rf.n_rot, p.qat = qat, p.decode_kernel = decode;
    std::copy(rf.omega.begin(), rf.omega.end(), p.omega);
    p.pos0 = pos, p.T = 1, p.v = d_v.get() + pos * cw, p.z = d_z.get() + pos * cw;
    return p;
  };
  const std::string what = "m=" + std::to_string(m) + " d=" + std::to_string(d);
  for (int64_t pos = 0; pos < n_tokens; ++pos) {
    EXPECT_EQ(cuda::compressor_step_cuda(params(a, pos, true), nullptr), cuda::compressor_rows_emitted(pos, 1, m));
    cuda::compressor_step_cuda(params(b, pos, false), nullptr);
    ASSERT_EQ(a.cv.download(), b.cv.download()) << what << " cur_v after position " << pos;
    ASSERT_EQ(a.cz.download(), b.cz.download()) << what << " cur_z after position " << pos;
    ASSERT_EQ(a.pv.download(), b.pv.download()) << what << " prev_v after position " << pos;
    ASSERT_EQ(a.pz.download(), b.pz.download()) << what << " prev_z after position " << pos;
  }
  // Rows: compared bitwise as bit patterns (the unwritten tail is the same 0xFF NaN fill on both sides).
  const auto ra = a.rows.download(), rb = b.rows.download();
  ASSERT_EQ(ra.size(), rb.size());
  EXPECT_EQ(0, std::memcmp(ra.data(), rb.data(), ra.size() * sizeof(float))) << what << " rows";
  std::vector<float> fill(static_cast<size_t>(d));
  std::memset(fill.data(), 0xFF, fill.size() * sizeof(float));
  EXPECT_NE(0, std::memcmp(ra.data(), fill.data(), fill.size() * sizeof(float))) << what << " row 0 was written";
}

// A CSA layer's two compressors (main m=4 x 512 Fp8, indexer m=4 x 128 Fp4) through compressor_step_pair (one
// launch per decode step) and through two compressor_step calls on the CUDA backend: every state buffer bitwise
// equal after 13 single-token steps (3 rows emitted), and a 5-token pass (the general path) after them.
TEST(CudaAttentionFused, CompressorPairBitwise) {
  DSV4_REQUIRE_CUDA();
  auto gpu = make_cuda_backend();
  struct Comp {
    int d;
    AttnQat qat;
    std::vector<float> ape, norm;
    WeightView ape_v, norm_v;
    CompressorParams p;
  };
  auto make_comp = [&](int d, AttnQat qat, uint64_t seed) {
    auto c = std::make_unique<Comp>();
    c->d = d, c->qat = qat;
    c->ape = test::random_normal(size_t(4) * 2 * d, seed, 0.5f);
    c->norm = test::random_normal(size_t(d), seed + 1);
    c->ape_v = f32_view(c->ape, int64_t(c->ape.size()), "ape");
    c->norm_v = f32_view(c->norm, d, "norm");
    c->p.ape = &c->ape_v, c->p.norm = &c->norm_v, c->p.rope = &yarn(), c->p.qat = qat;
    return c;
  };
  const auto main_c = make_comp(512, AttnQat::Fp8, 31), idx_c = make_comp(128, AttnQat::Fp4Indexer, 33);
  constexpr int kTokens = 18, kRows = kTokens / 4 + 1;
  struct State {
    DeviceBuffer cv, cz, pv, pz, rows;
  };
  auto make_state = [&](int d) {
    const int cw = 2 * d;
    return State{put(*gpu, std::vector<float>(size_t(4) * cw, 0.0f)),
                 put(*gpu, std::vector<float>(size_t(4) * cw, -INFINITY)),
                 put(*gpu, std::vector<float>(size_t(4) * d, 0.0f)),
                 put(*gpu, std::vector<float>(size_t(4) * d, -INFINITY)),
                 put(*gpu, std::vector<float>(size_t(kRows) * d, 0.0f))};
  };
  auto buffers = [](State& st, int d) {
    CompressorBuffers s;
    s.ratio = 4, s.dim = d, s.overlap = true;
    s.cur_v = st.cv.f32(), s.cur_z = st.cz.f32(), s.prev_v = st.pv.f32(), s.prev_z = st.pz.f32();
    s.rows = st.rows.f32();
    return s;
  };
  const auto vm = test::random_normal(size_t(kTokens) * 1024, 41), zm = test::random_normal(size_t(kTokens) * 1024, 42, 2.0f);
  const auto vi = test::random_normal(size_t(kTokens) * 256, 43), zi = test::random_normal(size_t(kTokens) * 256, 44, 2.0f);
  auto bvm = put(*gpu, vm), bzm = put(*gpu, zm), bvi = put(*gpu, vi), bzi = put(*gpu, zi);
  State pm = make_state(512), pi = make_state(128), sm = make_state(512), si = make_state(128);
  auto step = [&](bool paired, int64_t pos, int T) {
    State& m = paired ? pm : sm;
    State& i = paired ? pi : si;
    CompressorJob a, b;
    a.p = &main_c->p, a.s = buffers(m, 512), a.v = bvm.f32() + pos * 1024, a.z = bzm.f32() + pos * 1024;
    b.p = &idx_c->p, b.s = buffers(i, 128), b.v = bvi.f32() + pos * 256, b.z = bzi.f32() + pos * 256;
    if (paired) {
      gpu->compressor_step_pair(a, b, T, pos);
    } else {
      gpu->compressor_step(*a.p, a.s, a.v, a.z, T, pos);
      gpu->compressor_step(*b.p, b.s, b.v, b.z, T, pos);
    }
  };
  auto expect_same = [&](const char* what) {
    for (auto [x, y, n] : {std::tuple{&pm, &sm, 512}, std::tuple{&pi, &si, 128}}) {
      EXPECT_EQ(get<float>(*gpu, x->cv, size_t(8) * n), get<float>(*gpu, y->cv, size_t(8) * n)) << what << " d=" << n;
      EXPECT_EQ(get<float>(*gpu, x->cz, size_t(8) * n), get<float>(*gpu, y->cz, size_t(8) * n)) << what << " d=" << n;
      EXPECT_EQ(get<float>(*gpu, x->pv, size_t(4) * n), get<float>(*gpu, y->pv, size_t(4) * n)) << what << " d=" << n;
      EXPECT_EQ(get<float>(*gpu, x->pz, size_t(4) * n), get<float>(*gpu, y->pz, size_t(4) * n)) << what << " d=" << n;
      const auto rx = get<float>(*gpu, x->rows, size_t(kRows) * n);
      EXPECT_EQ(rx, get<float>(*gpu, y->rows, size_t(kRows) * n)) << what << " d=" << n;
      EXPECT_NE(rx, std::vector<float>(rx.size(), 0.0f)) << what << " rows were emitted, d=" << n;
    }
  };
  for (int64_t pos = 0; pos < 13; ++pos) step(true, pos, 1), step(false, pos, 1);
  expect_same("13 decode steps");
  step(true, 13, 5), step(false, 13, 5);
  expect_same("then a 5-token pass");
}

TEST(CudaAttentionFused, CompressorDecodeKernelBitwise) {
  DSV4_REQUIRE_CUDA();
  compressor_decode_case(4, 512, cuda::RowQat::Fp8, 13);          // CSA main compressor (overlap)
  compressor_decode_case(4, 128, cuda::RowQat::Fp4Hadamard, 13);  // CSA indexer compressor
  compressor_decode_case(128, 512, cuda::RowQat::Fp8, 260);       // HCA: two windows closed
}

}  // namespace
}  // namespace dsv4
