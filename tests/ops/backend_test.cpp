// The CUDA op table (make_cuda_backend) against the CPU oracle (make_cpu_backend), op by op, on random weights
// of the q2 mix types (experts IQ2_XXS gate/up + Q2_K down, Q8_0 shared expert, F16 router and HC control) at
// D = 4096, HC n = 4, 6 of 32 experts, and 1..3 tokens. Arguments go through each backend's own memory API
// (alloc/upload/download): CUDA backend memory is device memory. Also: the device embedding gather, the hash
// routing lookup, window_store, fill/copy, and the activation cache's invalidation (a matmul after its input was
// rewritten must see the new values).
//
// Tolerances: both backends quantize activations identically and form the same integer block dots, so matmul
// outputs differ by fp32 summation order only (rel-L2 <= 1e-5, as in gemv_test). Composite ops add a few fp32
// roundings per value (RMS accumulated in double on the CPU, float on the GPU: ~1e-7 relative; expf/log1pf ulps):
// 2e-5 for hc_pre/hc_head/moe_ffn outputs, 1e-6 absolute on routing weights (values ~0.25). Expert ids must be
// identical (random logits have no near-ties at the 1e-6 level).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

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

using test::get;
using test::put;

struct Backends {
  std::unique_ptr<Backend> cpu = make_cpu_backend();
  std::unique_ptr<Backend> gpu = make_cuda_backend();
};

constexpr int64_t D = 4096;

// y = W x on a backend, through its memory.
std::vector<float> run_matmul(Backend& be, const WeightView& w, int expert, const std::vector<float>& x, int T) {
  auto bx = put(be, x);
  DeviceBuffer by = be.alloc(size_t(T) * w.ne[1] * sizeof(float));
  be.matmul(w, expert, bx.f32(), T, by.f32());
  return get<float>(be, by, size_t(T) * w.ne[1]);
}

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
    expect_close(run_matmul(*b.gpu, w.view, -1, x, T), run_matmul(*b.cpu, w.view, -1, x, T), 1e-5,
                 qtype_name(t).c_str());
  }
  const Tensor stack = make_tensor(QType::IQ2_XXS, D, 256, 4, 13, 0.05f, "stack");
  const auto x = test::random_normal(size_t(2 * D), 14);
  expect_close(run_matmul(*b.gpu, stack.view, 3, x, 2), run_matmul(*b.cpu, stack.view, 3, x, 2), 1e-5,
               "IQ2_XXS expert 3");

  const Tensor nw = make_tensor(QType::F32, D, 1, 1, 15, 1.0f, "norm");
  const auto xn = test::random_normal(size_t(T * D), 16, 3.0f);
  auto norm = [&](Backend& be) {
    auto bx = put(be, xn);
    be.rms_norm(bx.f32(), &nw.view, T, D, 1e-6f, bx.f32());  // in place, as the forward does
    return get<float>(be, bx, xn.size());
  };
  expect_close(norm(*b.gpu), norm(*b.cpu), 1e-6, "rms_norm");
}

// The activation cache: a Q8_0 matmul's quantized input is reused by the next matmul on the same pointer only
// while nothing wrote that memory. Every kind of write in between must be seen (upload, an op writing in place,
// a copy, a fill), and a freed-and-reallocated block at the same address must not hit a stale entry.
TEST(CudaBackend, ActivationCacheSeesEveryWrite) {
  DSV4_REQUIRE_CUDA();
  Backends b;
  const int T = 2;
  const Tensor w = make_tensor(QType::Q8_0, D, 256, 1, 51, 0.05f, "attn_q_a");
  const Tensor w2 = make_tensor(QType::Q8_0, D, 128, 1, 52, 0.05f, "attn_kv");
  const Tensor nw = make_tensor(QType::F32, D, 1, 1, 53, 1.0f, "norm");
  const auto x1 = test::random_normal(size_t(T * D), 54), x2 = test::random_normal(size_t(T * D), 55);
  Backend& g = *b.gpu;
  auto y = [&](const DeviceBuffer& bx, const Tensor& t) {
    DeviceBuffer by = g.alloc(size_t(T) * t.view.ne[1] * 4);
    g.matmul(t.view, -1, bx.f32(), T, by.f32());
    return get<float>(g, by, size_t(T) * t.view.ne[1]);
  };
  auto ref = [&](const std::vector<float>& x, const Tensor& t) { return run_matmul(*b.cpu, t.view, -1, x, T); };
  DeviceBuffer bx = put(g, x1);
  expect_close(y(bx, w), ref(x1, w), 1e-5, "first");
  expect_close(y(bx, w2), ref(x1, w2), 1e-5, "same input, second matrix (cache hit)");
  g.upload(bx.data(), x2.data(), x2.size() * 4);
  expect_close(y(bx, w), ref(x2, w), 1e-5, "after upload");
  g.rms_norm(bx.f32(), &nw.view, T, D, 1e-6f, bx.f32());
  const auto xn = get<float>(g, bx, x2.size());
  expect_close(y(bx, w2), ref(xn, w2), 1e-5, "after an in-place op");
  DeviceBuffer other = put(g, x1);
  g.copy(bx.data(), other.data(), x1.size() * 4);
  expect_close(y(bx, w), ref(x1, w), 1e-5, "after copy");
  g.fill(bx.f32() + D, 0.25f, size_t(D));  // second row only
  std::vector<float> xf = x1;
  std::fill(xf.begin() + D, xf.end(), 0.25f);
  expect_close(y(bx, w), ref(xf, w), 1e-5, "after fill");
  // Free and allocate the same size: the pool is likely to hand the block back at the same address.
  y(bx, w);
  bx = DeviceBuffer();
  DeviceBuffer again = put(g, x2);
  expect_close(y(again, w), ref(x2, w), 1e-5, "after free + alloc");
}

// head_prep's q_a norm (one normed, unrotated head) writes the split-layout Q8 rows q_b reads instead of a
// quantize launch. Those rows equal the quantizer's bit for bit, so a projection of the produced input must equal,
// bit for bit, the same projection of a copy (a buffer nothing produced for: quantized by the quantize kernel).
// The decode order q_a(a), q_b(qr), kv(a) keeps both inputs cached (two entries per format), and cached rows are
// the quantizer's too, so kv is compared the same way; every result must also match the CPU (rel-L2 1e-5).
TEST(CudaBackend, ProducedActivationsEqualQuantizedOnes) {
  DSV4_REQUIRE_CUDA();
  Backends b;
  Backend& g = *b.gpu;
  const int64_t R = 1024;  // q_rank
  const Tensor wqa = make_tensor(QType::Q8_0, D, R, 1, 61, 0.05f, "attn_q_a");
  const Tensor wkv = make_tensor(QType::Q8_0, D, 512, 1, 62, 0.05f, "attn_kv");
  const Tensor wqb = make_tensor(QType::Q8_0, R, 2048, 1, 63, 0.05f, "attn_q_b");
  const Tensor nw = make_tensor(QType::F32, D, 1, 1, 64, 1.0f, "attn_norm");
  const Tensor qn = make_tensor(QType::F32, R, 1, 1, 65, 1.0f, "q_a_norm");
  for (const int T : {1, 3}) {
    const auto x = test::random_normal(size_t(T * D), 66 + T, 2.0f);
    auto mm = [&](const Tensor& t, const DeviceBuffer& bx) {
      DeviceBuffer by = g.alloc(size_t(T) * t.view.ne[1] * 4);
      g.matmul(t.view, -1, bx.f32(), T, by.f32());
      return get<float>(g, by, size_t(T) * t.view.ne[1]);
    };
    auto copy_of = [&](const DeviceBuffer& src, size_t n) {
      DeviceBuffer c = g.alloc(n * 4);
      g.copy(c.data(), src.data(), n * 4);
      return c;
    };
    DeviceBuffer a = put(g, x);
    g.rms_norm(a.f32(), &nw.view, T, D, 1e-6f, a.f32());
    const auto an = get<float>(g, a, size_t(T * D));
    const auto qa = mm(wqa, a);
    DeviceBuffer qr = put(g, qa);
    HeadPrep hp;
    hp.norm = true, hp.norm_w = &qn.view, hp.eps = 1e-6f;
    g.head_prep(qr.f32(), T, 1, int(R), hp);
    const auto qrn = get<float>(g, qr, size_t(T * R));
    const auto qb = mm(wqb, qr);
    const auto kv = mm(wkv, a);
    const std::string what = "T=" + std::to_string(T);
    EXPECT_EQ(qa, mm(wqa, copy_of(a, size_t(T * D)))) << what << ": q_a of the rms_norm output";
    EXPECT_EQ(kv, mm(wkv, copy_of(a, size_t(T * D)))) << what << ": kv of the rms_norm output";
    EXPECT_EQ(qb, mm(wqb, copy_of(qr, size_t(T * R)))) << what << ": q_b of the q_a norm output";
    expect_close(qa, run_matmul(*b.cpu, wqa.view, -1, an, T), 1e-5, "q_a vs cpu");
    expect_close(kv, run_matmul(*b.cpu, wkv.view, -1, an, T), 1e-5, "kv vs cpu");
    expect_close(qb, run_matmul(*b.cpu, wqb.view, -1, qrn, T), 1e-5, "q_b vs cpu");
    // A rewrite of the produced input is seen (the entry is dropped, not reused).
    g.fill(a.f32(), 0.5f, size_t(T * D));
    expect_close(mm(wkv, a), run_matmul(*b.cpu, wkv.view, -1, std::vector<float>(size_t(T * D), 0.5f), T), 1e-5,
                 "kv after fill");
  }
}

// T = 2: F16 GEMV of fn, rms_scale, Sinkhorn / head weights, collapse. T = 1 (decode): the fused HC control
// (hc_mix_cuda: K-split projection + RMS + Sinkhorn / head weights in one launch), whose chunked sum order differs
// more from the CPU's sequential one: its own test bounds the control outputs at 1e-4 absolute against a double
// reference (values in (0, 2]); rel-L2 1e-4 here.
void hyper_connections(int T, double tol) {
  Backends b;
  const int n = 4;
  HcParams p;
  p.n = n, p.d = D;
  HcWeights w;
  const Tensor fn = make_tensor(QType::F16, n * D, 24, 1, 21, 0.02f, "hc_fn");
  const Tensor base = make_tensor(QType::F32, 24, 1, 1, 22, 0.5f, "hc_base");
  const Tensor scale = make_tensor(QType::F32, 3, 1, 1, 23, 1.0f, "hc_scale");
  w.fn = fn.view, w.base = base.view, w.scale = scale.view;
  const auto X = test::random_normal(size_t(T * n * D), 24);
  struct Pre { std::vector<float> a, post, comb; };
  auto pre = [&](Backend& be) {
    auto bX = put(be, X);
    DeviceBuffer a = be.alloc(size_t(T) * D * 4), po = be.alloc(size_t(T) * n * 4), co = be.alloc(size_t(T) * n * n * 4);
    be.hc_pre(w, p, bX.f32(), T, a.f32(), po.f32(), co.f32());
    return Pre{get<float>(be, a, size_t(T) * D), get<float>(be, po, size_t(T) * n), get<float>(be, co, size_t(T) * n * n)};
  };
  const Pre c = pre(*b.cpu), g = pre(*b.gpu);
  expect_close(g.a, c.a, tol, "hc_pre a");
  expect_close(g.post, c.post, tol, "hc_pre post");
  expect_close(g.comb, c.comb, tol, "hc_pre comb");

  const auto y = test::random_normal(size_t(T * D), 25);
  auto post = [&](Backend& be) {
    auto bX = put(be, X), by = put(be, y), bp = put(be, c.post), bc = put(be, c.comb);
    be.hc_post(p, by.f32(), bp.f32(), bc.f32(), T, bX.f32());
    return get<float>(be, bX, X.size());
  };
  expect_close(post(*b.gpu), post(*b.cpu), 1e-6, "hc_post");

  HcHeadWeights hw;
  const Tensor hfn = make_tensor(QType::F16, n * D, 4, 1, 26, 0.02f, "head_fn");
  const Tensor hbase = make_tensor(QType::F32, 4, 1, 1, 27, 0.5f, "head_base");
  const Tensor hscale = make_tensor(QType::F32, 1, 1, 1, 28, 1.0f, "head_scale");
  hw.fn = hfn.view, hw.base = hbase.view, hw.scale = hscale.view;
  auto head = [&](Backend& be) {
    auto bX = put(be, X);
    DeviceBuffer h = be.alloc(size_t(T) * D * 4);
    be.hc_head(hw, p, bX.f32(), T, h.f32());
    return get<float>(be, h, size_t(T) * D);
  };
  expect_close(head(*b.gpu), head(*b.cpu), tol, "hc_head");
}

TEST(CudaBackend, HyperConnections) {
  DSV4_REQUIRE_CUDA();
  hyper_connections(2, 2e-5);
  hyper_connections(1, 1e-4);
}

struct MoeCase {
  MoeParams p;
  MoeWeights w;
  std::vector<Tensor> keep;
};

MoeCase moe_case(int E, int k, int64_t F) {
  MoeCase m;
  m.p.n_experts = E, m.p.n_used = k, m.p.d = D, m.p.ff = F;
  m.keep.push_back(make_tensor(QType::F16, D, E, 1, 31, 0.03f, "blk.3.ffn_gate_inp.weight"));
  m.keep.push_back(make_tensor(QType::F32, E, 1, 1, 32, 0.1f, "exp_probs_b"));
  m.keep.push_back(make_tensor(QType::IQ2_XXS, D, F, E, 33, 0.03f, "gate_exps"));
  m.keep.push_back(make_tensor(QType::IQ2_XXS, D, F, E, 34, 0.03f, "up_exps"));
  m.keep.push_back(make_tensor(QType::Q2_K, F, D, E, 35, 0.03f, "down_exps"));
  m.keep.push_back(make_tensor(QType::Q8_0, D, F, 1, 36, 0.03f, "gate_shexp"));
  m.keep.push_back(make_tensor(QType::Q8_0, D, F, 1, 37, 0.03f, "up_shexp"));
  m.keep.push_back(make_tensor(QType::Q8_0, F, D, 1, 38, 0.03f, "down_shexp"));
  auto& t = m.keep;
  m.w.gate_inp = t[0].view, m.w.exp_probs_b = t[1].view, m.w.gate_exps = t[2].view, m.w.up_exps = t[3].view;
  m.w.down_exps = t[4].view, m.w.gate_shexp = t[5].view, m.w.up_shexp = t[6].view, m.w.down_shexp = t[7].view;
  return m;
}

struct Route {
  std::vector<int32_t> ids;
  std::vector<float> wts;
};
Route run_route(Backend& be, const MoeCase& m, const std::vector<float>& x, const std::vector<int32_t>& tok) {
  const int T = int(tok.size()), k = m.p.n_used;
  auto bx = put(be, x), bt = put(be, tok);
  DeviceBuffer ids = be.alloc(size_t(T) * k * 4), wts = be.alloc(size_t(T) * k * 4);
  be.moe_route(m.w, m.p, bx.f32(), bt.i32(), T, ids.i32(), wts.f32());
  return {get<int32_t>(be, ids, size_t(T) * k), get<float>(be, wts, size_t(T) * k)};
}

TEST(CudaBackend, MoeRouteAndFfn) {
  DSV4_REQUIRE_CUDA();
  Backends b;
  const int T = 3, k = 6;
  const MoeCase m = moe_case(32, k, 2048);
  const auto x = test::random_normal(size_t(T * D), 39);
  const std::vector<int32_t> tokens = {5, 6, 7};
  const Route c = run_route(*b.cpu, m, x, tokens), g = run_route(*b.gpu, m, x, tokens);
  EXPECT_EQ(g.ids, c.ids);
  EXPECT_LE(test::max_abs_err(g.wts, c.wts), 1e-6);

  auto ffn = [&](Backend& be) {
    auto bx = put(be, x), bi = put(be, c.ids), bw = put(be, c.wts);
    DeviceBuffer y = be.alloc(size_t(T) * D * 4);
    be.moe_ffn(m.w, m.p, bx.f32(), bi.i32(), bw.f32(), T, y.f32());
    return get<float>(be, y, size_t(T) * D);
  };
  expect_close(ffn(*b.gpu), ffn(*b.cpu), 2e-5, "moe_ffn");
  // One token: the fused decode launches (gate+up+SwiGLU, down+slot sum).
  auto ffn1 = [&](Backend& be) {
    const std::vector<float> x1(x.begin(), x.begin() + D);
    const std::vector<int32_t> i1(c.ids.begin(), c.ids.begin() + k);
    const std::vector<float> w1(c.wts.begin(), c.wts.begin() + k);
    auto bx = put(be, x1), bi = put(be, i1), bw = put(be, w1);
    DeviceBuffer y = be.alloc(size_t(D) * 4);
    be.moe_ffn(m.w, m.p, bx.f32(), bi.i32(), bw.f32(), 1, y.f32());
    return get<float>(be, y, size_t(D));
  };
  expect_close(ffn1(*b.gpu), ffn1(*b.cpu), 2e-5, "moe_ffn, one token");
}

// Prefill sizes (T >= gemm_min_tokens): dense matmuls and the routed experts run on the tensor-core GEMMs, which
// round activations to FP16 where the CPU rounds them to 8 bits (Q8_0 / Q8_K: relative steps up to 1/254 of a
// block's max), so the two differ by the CPU's rounding (H200: 5.3e-3 for the Q8_0 matmul, 1.0e-2 for the whole
// moe_ffn with Q8_K-rounded expert inputs): bound 3e-2. A wrong row, expert or slot order gives O(1). With
// DSV4_CUDA_GEMM=0 the same sizes run on the GEMVs: the matmul matches at 2e-5 (fp32 order only); the moe_ffn
// measured 8.8e-5 (H200, 144 slots; 3 tokens: < 2e-5), which we attribute to Q8_K code flips of the down
// projection's input (the SwiGLU output, ~1e-7 apart, re-quantized to 8 bits: elements on a rounding boundary move
// one code, more slots give more of them): bound 5e-4.
// Coverage note (review, session 7): since 28e0411 the routed experts stay on the GEMVs below
// moe_gemm_min_tokens (96), so at T = 24 only the shared expert and the Q8_0 matmul reach the GEMMs here, and
// the 1.0e-2 above was measured before that change. The backend's routed-GEMM branch is exercised by
// CudaDeviceForward's GEMM case (F16 experts, 100-token prefill) and the kernel by CudaGemm.MoeQ2Mix; a T >= 96
// case with these expert types (IQ2_XXS / Q2_K) is still to be added and run on a GPU.
TEST(CudaBackend, PrefillSizesOnGemmAndGemv) {
  DSV4_REQUIRE_CUDA();
  const int T = 24, k = 6;
  const MoeCase m = moe_case(32, k, 2048);
  const Tensor q = make_tensor(QType::Q8_0, D, 512, 1, 71, 0.05f, "attn_q_a");
  const auto x = test::random_normal(size_t(T) * D, 72);
  std::vector<int32_t> tokens(static_cast<size_t>(T));
  for (int t = 0; t < T; ++t) tokens[size_t(t)] = t;
  auto cpu = make_cpu_backend();
  const Route r = run_route(*cpu, m, x, tokens);
  auto ffn = [&](Backend& be) {
    auto bx = put(be, x), bi = put(be, r.ids), bw = put(be, r.wts);
    DeviceBuffer y = be.alloc(size_t(T) * D * 4);
    be.moe_ffn(m.w, m.p, bx.f32(), bi.i32(), bw.f32(), T, y.f32());
    return get<float>(be, y, size_t(T) * D);
  };
  const auto yc = ffn(*cpu), mc = run_matmul(*cpu, q.view, -1, x, T);
  for (bool gemm : {true, false}) {
    if (!gemm) setenv("DSV4_CUDA_GEMM", "0", 1);
    auto gpu = make_cuda_backend();
    unsetenv("DSV4_CUDA_GEMM");
    const double e_ffn = test::rel_l2(ffn(*gpu), yc), e_mm = test::rel_l2(run_matmul(*gpu, q.view, -1, x, T), mc);
    std::printf("T=%d %s: moe_ffn rel-L2 %.2e, Q8_0 matmul rel-L2 %.2e\n", T, gemm ? "GEMM" : "GEMV", e_ffn, e_mm);
    EXPECT_LE(e_ffn, gemm ? 3e-2 : 5e-4) << (gemm ? "GEMM" : "GEMV");
    EXPECT_LE(e_mm, gemm ? 3e-2 : 2e-5) << (gemm ? "GEMM" : "GEMV");
  }
}

// Hash layers: expert ids are the token's tid2eid row, looked up on the device from device token ids; the
// weights come from the router scores of those experts. A table entry outside [0, E) is refused, naming it.
TEST(CudaBackend, HashRouteOnDevice) {
  DSV4_REQUIRE_CUDA();
  Backends b;
  const int T = 4, k = 6, E = 32, V = 50;
  MoeCase m = moe_case(E, k, 256);
  m.p.hash = true;
  std::vector<int32_t> table(size_t(V) * k);
  for (size_t i = 0; i < table.size(); ++i) table[i] = int32_t((i * 7 + i / k) % E);
  WeightView tv;
  tv.type = QType::I32, tv.data = table.data(), tv.n_bytes = table.size() * 4, tv.name = "blk.0.ffn_gate_tid2eid.weight";
  tv.ne[0] = k, tv.ne[1] = V, tv.n_dims = 2;
  m.w.tid2eid = tv;
  const auto x = test::random_normal(size_t(T * D), 40);
  const std::vector<int32_t> tokens = {49, 0, 17, 17};
  const Route c = run_route(*b.cpu, m, x, tokens), g = run_route(*b.gpu, m, x, tokens);
  EXPECT_EQ(g.ids, c.ids);
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < k; ++j) EXPECT_EQ(g.ids[size_t(t * k + j)], table[size_t(tokens[size_t(t)] * k + j)]);
  EXPECT_LE(test::max_abs_err(g.wts, c.wts), 1e-6);

  std::vector<int32_t> bad = table;
  bad[size_t(17 * k + 2)] = E;  // expert E does not exist
  m.w.tid2eid.data = bad.data();
  auto fresh = make_cuda_backend();  // the table is mirrored (and validated) once per backend
  try {
    run_route(*fresh, m, x, tokens);
    ADD_FAILURE() << "a tid2eid entry outside [0, E) was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("ffn_gate_tid2eid"), std::string::npos) << e.what();
  }
}

// The embedding gather on the device equals dequantize_row (bitwise) for every supported encoding, broadcast
// to the n streams; ids come from device memory.
TEST(CudaBackend, EmbedOnDevice) {
  DSV4_REQUIRE_CUDA();
  Backends b;
  const std::vector<int32_t> tokens = {0, 63, 17, 17};
  const int T = int(tokens.size()), n = 4;
  for (QType t : {QType::F16, QType::Q8_0, QType::F32, QType::Q4_K}) {  // Q4_K: the host-decoding fallback
    const Tensor e = make_tensor(t, D, 64, 1, 41, 1.0f, "token_embd");
    auto run = [&](Backend& be) {
      auto bt = put(be, tokens);
      DeviceBuffer X = be.alloc(size_t(T) * n * D * 4);
      be.embed(e.view, bt.i32(), T, n, X.f32());
      return get<float>(be, X, size_t(T) * n * D);
    };
    const auto xc = run(*b.cpu), xg = run(*b.gpu);
    EXPECT_EQ(0, std::memcmp(xc.data(), xg.data(), xc.size() * 4)) << qtype_name(t);
    std::vector<float> row(static_cast<size_t>(D));
    dequantize_row(t, e.bytes.data() + size_t(63) * size_t(row_bytes(t, D)), row.data(), D);
    EXPECT_EQ(0, std::memcmp(row.data(), xg.data() + size_t(1 * n + 3) * D, size_t(D) * 4)) << qtype_name(t);
  }
}

// window_store: ring slot (p0 + t) mod W = kv[t] for the last min(T, W) tokens (wrapping, longer than the ring).
TEST(CudaBackend, WindowStoreFillCopy) {
  DSV4_REQUIRE_CUDA();
  Backends b;
  const int W = 8, dim = 64;
  struct Case { int T; int64_t p0; };
  for (const Case c : {Case{1, 0}, Case{3, 6}, Case{5, 13}, Case{8, 3}, Case{19, 21}}) {
    const auto kv = test::random_normal(size_t(c.T) * dim, uint64_t(c.T + c.p0));
    auto run = [&](Backend& be) {
      DeviceBuffer ring = be.alloc(size_t(W) * dim * 4);
      be.fill(ring.f32(), -1.5f, size_t(W) * dim);
      auto bkv = put(be, kv);
      be.window_store(ring.f32(), W, dim, bkv.f32(), c.T, c.p0);
      DeviceBuffer dup = be.alloc(size_t(W) * dim * 4);
      be.copy(dup.data(), ring.data(), size_t(W) * dim * 4);
      return get<float>(be, dup, size_t(W) * dim);
    };
    EXPECT_EQ(run(*b.gpu), run(*b.cpu)) << "T=" << c.T << " p0=" << c.p0;
  }
}

// matmul_grouped: one MoE-mode launch for 1-2 tokens, per-group dense launches beyond; same values either way.
TEST(CudaBackend, MatmulGroupedAllPaths) {
  DSV4_REQUIRE_CUDA();
  Backends b;
  constexpr int G = 4, ro = 256, gin = 512;
  for (QType t : {QType::Q8_0, QType::F16}) {
    const Tensor w = make_tensor(t, gin, int64_t(G) * ro, 1, 61, 0.05f, "attn_output_a");
    for (int T : {1, 2, 5}) {
      const auto x = test::random_normal(size_t(T) * G * gin, uint64_t(62 + T));
      auto run = [&](Backend& be) {
        auto bx = put(be, x);
        DeviceBuffer y = be.alloc(size_t(T) * G * ro * 4);
        be.matmul_grouped(w.view, G, bx.f32(), T, y.f32());
        return get<float>(be, y, size_t(T) * G * ro);
      };
      // Identical activation quantization and integer block dots; fp32 summation order only (as gemv_test).
      expect_close(run(*b.gpu), run(*b.cpu), 1e-5, (qtype_name(t) + " T=" + std::to_string(T)).c_str());
    }
  }
}

}  // namespace
}  // namespace dsv4
