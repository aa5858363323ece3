// MoE routing on the GPU (moe.h: moe_route_cuda for T tokens, moe_route_fused_cuda for one decode token) against
// the CPU backend's own scoring and selection (cpu::sqrt_softplus, cpu::route_topk, cpu::route_weights), with inputs
// built to contain EXACT ties of the biased scores: the selection must follow the CPU's rule (value desc, lower
// expert id first), also when the k-th and (k+1)-th scores tie, when tied experts sit in one lane's strided set or
// in different lanes of the selecting warp, when E is not a multiple of 32 and at the limits (E = 1024, k = 32;
// k = E). Ties come from equal logits (and equal biases): expert e takes the logit (and bias) of its group g(e), a
// random map, so tied values are bit-identical on both sides whatever the fp32 rounding of softplus.
// Distinct values only need the order the CPU sees: a token is compared only where every gap between DIFFERENT
// values among its k+1 best biased scores exceeds 1e-4 (GPU expf/log1pf differ from the CPU's by a few ulp of
// ~1; random groups sit that close in well under 1% of tokens), and each case requires most tokens to be compared.
// Weights (~1/k * scale): 1e-6 absolute, as CudaMoeRoute.FusedDecodeRouter.
// The fused router: duplicated router rows give bit-identical logits (each row is dotted in the same order), checked
// directly, then ids vs the CPU on double logits, and ids/weights bit for bit vs moe_route_cuda on the launch's own
// logits (one selection code for both launches).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <string>

#include <cuda_runtime.h>

#include "backend/cpu/cpu_ops.h"
#include "backend/cuda/gemv.h"
#include "backend/cuda/moe.h"
#include "ops_common.h"
#include "quant/quant.h"

namespace dsv4 {
namespace {

using cuda::DeviceArray;

// A random expert -> group map with every group used (so each group has E / G members, +-1).
std::vector<int> random_groups(int n_experts, int n_groups, uint64_t seed) {
  std::vector<int> g(static_cast<size_t>(n_experts));
  for (int e = 0; e < n_experts; ++e) g[size_t(e)] = e % n_groups;
  std::shuffle(g.begin(), g.end(), std::mt19937_64(seed));
  return g;
}

// CPU biased scores of one token.
std::vector<float> biased(const std::vector<float>& s, const std::vector<float>& bias) {
  std::vector<float> v(s);
  if (!bias.empty())
    for (size_t e = 0; e < v.size(); ++e) v[e] = s[e] + bias[e];
  return v;
}

// Smallest gap between different values among the k+1 best (ties, gap 0, are what the test is about and allowed).
float distinct_gap(std::vector<float> v, int k) {
  std::sort(v.begin(), v.end(), std::greater<float>());
  float g = INFINITY;
  for (int j = 0; j < k && j + 1 < int(v.size()); ++j)
    if (v[size_t(j)] != v[size_t(j + 1)]) g = std::min(g, v[size_t(j)] - v[size_t(j + 1)]);
  return g;
}

// Number of exact ties among the k+1 best (the test must actually contain some).
int ties_in_top(std::vector<float> v, int k) {
  std::sort(v.begin(), v.end(), std::greater<float>());
  int n = 0;
  for (int j = 0; j < k && j + 1 < int(v.size()); ++j) n += v[size_t(j)] == v[size_t(j + 1)];
  return n;
}

struct RouteCase {
  int e, k, groups;
  bool with_bias;
  int tokens;
};

// moe_route_cuda on grouped logits vs cpu::route_topk token by token.
void check_grouped_route(const RouteCase& rc, uint64_t seed) {
  const std::string what = "E=" + std::to_string(rc.e) + " k=" + std::to_string(rc.k) + " groups=" +
                           std::to_string(rc.groups) + " bias=" + std::to_string(rc.with_bias);
  const int E = rc.e, k = rc.k, T = rc.tokens;
  const float scale = 2.5f;
  const auto grp = random_groups(E, rc.groups, seed);
  const auto zg = test::random_normal(size_t(T) * rc.groups, seed + 1, 1.5f);
  const auto bg = test::random_normal(size_t(rc.groups), seed + 2, 0.1f);
  std::vector<float> z(size_t(T) * E), bias;
  for (int t = 0; t < T; ++t)
    for (int e = 0; e < E; ++e) z[size_t(t) * E + e] = zg[size_t(t) * rc.groups + grp[size_t(e)]];
  if (rc.with_bias) {
    for (int e = 0; e < E; ++e) bias.push_back(bg[size_t(grp[size_t(e)])]);
  }
  auto d_z = test::upload(z);
  DeviceArray<float> d_bias, d_w(size_t(T) * k);
  if (rc.with_bias) d_bias = test::upload(bias);
  DeviceArray<int32_t> d_ids(size_t(T) * k);
  d_ids.fill_bytes(0xFF);
  d_w.fill_bytes(0xFF);
  cuda::moe_route_cuda(d_z.get(), rc.with_bias ? d_bias.get() : nullptr, T, E, k, scale, false, d_ids.get(), d_w.get(),
                       nullptr);
  const auto ids = d_ids.download();
  const auto w = d_w.download();
  int compared = 0, ties = 0;
  for (int t = 0; t < T; ++t) {
    std::vector<float> s(static_cast<size_t>(E));
    for (int e = 0; e < E; ++e) s[size_t(e)] = cpu::sqrt_softplus(z[size_t(t) * E + e]);
    const auto v = biased(s, bias);
    if (distinct_gap(v, k) <= 1e-4f) continue;
    ++compared;
    ties += ties_in_top(v, k);
    std::vector<int32_t> ref_ids(static_cast<size_t>(k));
    std::vector<float> ref_w(static_cast<size_t>(k));
    cpu::route_topk(s.data(), rc.with_bias ? bias.data() : nullptr, E, k, scale, ref_ids.data(), ref_w.data());
    const std::vector<int32_t> got(ids.begin() + t * k, ids.begin() + (t + 1) * k);
    const std::vector<float> got_w(w.begin() + t * k, w.begin() + (t + 1) * k);
    EXPECT_EQ(got, ref_ids) << what << " token " << t;
    EXPECT_LE(test::max_abs_err(got_w, ref_w), 1e-6) << what << " token " << t;
  }
  EXPECT_GE(compared, T * 3 / 4) << what << ": too few tokens without near-ties";
  if (rc.groups < E && k < E) {  // every group has >= 2 experts: the top value is always tied
    EXPECT_GT(ties, 0) << what << ": no exact tie among the top k+1";
  }
}

TEST(CudaMoeRoute, TiesFollowTheCpuOrder) {
  DSV4_REQUIRE_CUDA();
  const RouteCase cases[] = {
      {256, 6, 64, true, 64},    // Flash: ~4 experts per value, tied experts in one lane and across lanes
      {256, 6, 50, false, 64},   // no bias
      {256, 6, 1, false, 4},     // all tied: ids 0..5
      {40, 4, 10, true, 32},     // E not a multiple of 32
      {1024, 32, 200, true, 16},  // the limits
      {6, 6, 2, true, 8},        // k = E: every expert, in (value, id) order
      {1, 1, 1, false, 2},
      {385, 8, 97, true, 16},
  };
  uint64_t seed = 9100;
  for (const auto& rc : cases) check_grouped_route(rc, seed += 10);
}

// Distinct random logits, Flash shape, many tokens (one warp each).
TEST(CudaMoeRoute, FlashShapeManyTokens) {
  DSV4_REQUIRE_CUDA();
  check_grouped_route({256, 6, 256, true, 200}, 9300);
}

// NaN logits never win (the CPU's strict '>' never prefers a NaN it meets after a number; ids 0..k-1 stay numbers
// here, so the CPU's first candidate of every pick is a number and both pick the k best numbers).
TEST(CudaMoeRoute, NanLogitsAreNotPicked) {
  DSV4_REQUIRE_CUDA();
  const int E = 256, k = 6;
  auto z = test::random_normal(size_t(E), 9400, 1.5f);
  const auto bias = test::random_normal(size_t(E), 9401, 0.1f);
  for (int e = 8; e < E; e += 5) z[size_t(e)] = NAN;
  auto d_z = test::upload(z), d_bias = test::upload(bias);
  DeviceArray<int32_t> d_ids{size_t(k)};
  DeviceArray<float> d_w{size_t(k)};
  cuda::moe_route_cuda(d_z.get(), d_bias.get(), 1, E, k, 1.0f, false, d_ids.get(), d_w.get(), nullptr);
  std::vector<float> s(static_cast<size_t>(E));
  for (int e = 0; e < E; ++e) s[size_t(e)] = cpu::sqrt_softplus(z[size_t(e)]);
  std::vector<int32_t> ref_ids(static_cast<size_t>(k));
  std::vector<float> ref_w(static_cast<size_t>(k));
  cpu::route_topk(s.data(), bias.data(), E, k, 1.0f, ref_ids.data(), ref_w.data());
  for (int32_t id : ref_ids) ASSERT_FALSE(std::isnan(z[size_t(id)]));  // the premise
  EXPECT_EQ(d_ids.download(), ref_ids);
  EXPECT_LE(test::max_abs_err(d_w.download(), ref_w), 1e-6);
}

// Hash layers, several tokens: ids are an input and stay as they are; weights from those experts' scores.
TEST(CudaMoeRoute, HashIdsManyTokens) {
  DSV4_REQUIRE_CUDA();
  const int E = 256, k = 6, T = 7;
  const auto z = test::random_normal(size_t(T) * E, 9500, 1.5f);
  std::vector<int32_t> hid(size_t(T) * k);
  std::mt19937_64 rng(9501);
  for (auto& id : hid) id = int32_t(rng() % E);
  auto d_z = test::upload(z);
  auto d_ids = test::upload(hid);
  DeviceArray<float> d_w(size_t(T) * k);
  cuda::moe_route_cuda(d_z.get(), nullptr, T, E, k, 1.5f, true, d_ids.get(), d_w.get(), nullptr);
  EXPECT_EQ(d_ids.download(), hid);
  const auto w = d_w.download();
  for (int t = 0; t < T; ++t) {
    std::vector<float> s(static_cast<size_t>(E)), ref(static_cast<size_t>(k));
    for (int e = 0; e < E; ++e) s[size_t(e)] = cpu::sqrt_softplus(z[size_t(t) * E + e]);
    cpu::route_weights(s.data(), &hid[size_t(t) * k], k, 1.5f, ref.data());
    const std::vector<float> got(w.begin() + t * k, w.begin() + (t + 1) * k);
    EXPECT_LE(test::max_abs_err(got, ref), 1e-6) << "token " << t;
  }
}

// ---- fused decode router ------------------------------------------------------------------------------------------
struct FusedCase {
  QType type;
  int64_t d;
  int e, k, groups;
  bool with_bias;
};

// Router rows (F16 or F32) where expert e's row is group g(e)'s row, biases likewise.
struct FusedRouter {
  FusedCase c;
  std::vector<int> grp;
  std::vector<uint8_t> w;
  std::vector<float> bias;
};

FusedRouter fused_router(const FusedCase& c, uint64_t seed) {
  FusedRouter r{c, random_groups(c.e, c.groups, seed), {}, {}};
  const auto f = test::random_normal(size_t(c.d) * c.groups, seed + 1, 0.03f);
  const size_t es = c.type == QType::F16 ? 2 : 4;
  r.w.resize(size_t(c.d) * c.e * es);
  for (int e = 0; e < c.e; ++e)
    for (int64_t i = 0; i < c.d; ++i) {
      const float v = f[size_t(r.grp[size_t(e)]) * size_t(c.d) + size_t(i)];
      uint8_t* p = &r.w[(size_t(e) * size_t(c.d) + size_t(i)) * es];
      if (c.type == QType::F16) test::put_f16(p, v);
      else std::memcpy(p, &v, 4);
    }
  if (c.with_bias) {
    const auto bg = test::random_normal(size_t(c.groups), seed + 2, 0.1f);
    for (int e = 0; e < c.e; ++e) r.bias.push_back(bg[size_t(r.grp[size_t(e)])]);
  }
  return r;
}

std::vector<double> double_logits(const FusedRouter& r, const std::vector<float>& x) {
  const int64_t rb = row_bytes(r.c.type, r.c.d);
  std::vector<float> row(static_cast<size_t>(r.c.d));
  std::vector<double> z(static_cast<size_t>(r.c.e));
  for (int e = 0; e < r.c.e; ++e) {
    dequantize_row(r.c.type, &r.w[size_t(e * rb)], row.data(), r.c.d);
    double s = 0;
    for (int64_t i = 0; i < r.c.d; ++i) s += double(row[size_t(i)]) * double(x[size_t(i)]);
    z[size_t(e)] = s;
  }
  return z;
}

void check_fused(const FusedCase& c, uint64_t seed) {
  const std::string what = qtype_name(c.type) + " D=" + std::to_string(c.d) + " E=" + std::to_string(c.e) +
                           " k=" + std::to_string(c.k) + " groups=" + std::to_string(c.groups);
  const FusedRouter r = fused_router(c, seed);
  const float scale = 1.5f;
  // The first input whose distinct top-(k+1) biased scores are > 1e-4 apart (see the file comment).
  std::vector<float> x;
  std::vector<double> zd;
  std::vector<float> s(static_cast<size_t>(c.e));
  for (uint64_t xs = seed + 3;; ++xs) {
    x = test::random_normal(size_t(c.d), xs);
    zd = double_logits(r, x);
    for (int e = 0; e < c.e; ++e) s[size_t(e)] = cpu::sqrt_softplus(float(zd[size_t(e)]));
    if (distinct_gap(biased(s, r.bias), c.k) > 1e-4f) break;
  }
  if (c.groups < c.e && c.k < c.e) {  // every group has >= 3 experts: the top value is always tied
    EXPECT_GT(ties_in_top(biased(s, r.bias), c.k), 0) << what << ": no tie";
  }
  std::vector<int32_t> ref_ids(static_cast<size_t>(c.k));
  std::vector<float> ref_w(static_cast<size_t>(c.k));
  cpu::route_topk(s.data(), r.bias.empty() ? nullptr : r.bias.data(), c.e, c.k, scale, ref_ids.data(), ref_w.data());

  DeviceArray<uint8_t> d_w{std::span<const uint8_t>(r.w)}, ws(cuda::moe_route_fused_workspace_bytes(c.e));
  DeviceArray<uint8_t> xq(c.d % 256 == 0 ? size_t(cuda::gpu_activation_bytes(QType::Q2_K, c.d)) : 0);
  auto d_x = test::upload(x);
  DeviceArray<float> d_bias, d_wts(size_t(c.k));
  if (c.with_bias) d_bias = test::upload(r.bias);
  DeviceArray<int32_t> d_ids(size_t(c.k));
  ws.fill_bytes(0);
  cuda::MoeRouteFusedParams p;
  p.wtype = c.type, p.w = d_w.get(), p.d = c.d, p.n_experts = c.e, p.k = c.k, p.x = d_x.get();
  p.bias = c.with_bias ? d_bias.get() : nullptr, p.scale = scale, p.ids = d_ids.get(), p.weights = d_wts.get();
  p.workspace = ws.get(), p.xq8k = xq.size() ? xq.get() : nullptr;
  for (int rep = 0; rep < 2; ++rep) {  // twice on one workspace: the ticket is left ready
    d_ids.fill_bytes(0xFF);
    d_wts.fill_bytes(0xFF);
    cuda::moe_route_fused_cuda(p, nullptr);
    const auto ids = d_ids.download();
    const auto w = d_wts.download();
    EXPECT_EQ(ids, ref_ids) << what << " launch " << rep;
    EXPECT_LE(test::max_abs_err(w, ref_w), 1e-6) << what << " launch " << rep;
    // The launch's logits: near the double ones, and bit-identical within a group (the ties reach the selection).
    std::vector<float> zg(static_cast<size_t>(c.e));
    cuda::check(cudaMemcpy(zg.data(), ws.get(), zg.size() * 4, cudaMemcpyDeviceToHost), "z");
    EXPECT_LE(test::rel_l2(zg, zd), 1e-5) << what;
    std::vector<int> first(static_cast<size_t>(c.groups), -1);
    for (int e = 0; e < c.e; ++e) {
      int& f = first[size_t(r.grp[size_t(e)])];
      if (f < 0) {
        f = e;
      } else {
        ASSERT_EQ(0, std::memcmp(&zg[size_t(e)], &zg[size_t(f)], 4)) << what << " experts " << f << ", " << e;
      }
    }
    // moe_route_cuda on those logits: the same ids and weights, bit for bit.
    auto dz = test::upload(zg);
    DeviceArray<int32_t> ids2(size_t(c.k));
    DeviceArray<float> w2(size_t(c.k));
    cuda::moe_route_cuda(dz.get(), p.bias, 1, c.e, c.k, scale, false, ids2.get(), w2.get(), nullptr);
    EXPECT_EQ(ids2.download(), ids) << what << " vs moe_route_cuda";
    const auto wu = w2.download();
    EXPECT_EQ(0, std::memcmp(wu.data(), w.data(), w.size() * 4)) << what << " vs moe_route_cuda";
    if (p.xq8k) {  // the routed experts' Q8_K input: the quantizer's bytes
      DeviceArray<uint8_t> ref_q(xq.size());
      cuda::quantize_activations_cuda(QType::Q2_K, d_x.get(), 1, c.d, ref_q.get(), nullptr);
      EXPECT_EQ(xq.download(), ref_q.download()) << what << " Q8_K x";
    }
  }
}

TEST(CudaMoeRoute, FusedDecodeRouterTies) {
  DSV4_REQUIRE_CUDA();
  check_fused({QType::F16, 4096, 256, 6, 64, true}, 9600);   // Flash widths, ~4 experts per value
  check_fused({QType::F16, 4096, 256, 6, 40, false}, 9610);  // no bias
  check_fused({QType::F16, 4096, 255, 6, 60, true}, 9620);   // odd E: the last CTA has one row
  check_fused({QType::F32, 512, 40, 4, 12, true}, 9630);     // F32, E not a multiple of 32
  check_fused({QType::F16, 256, 1024, 32, 300, true}, 9640);  // the limits
  check_fused({QType::F16, 8192, 64, 6, 20, true}, 9650);    // rows wider than the chunks held in registers
  check_fused({QType::F32, 4352, 33, 5, 11, false}, 9660);   // F32 past the held chunks, E = 33
}

// DSV4_CUDA_ROUTE_KERNEL=0 (the kernel before session 9, kept for A/B) against the default: the same logits (each
// row dotted in the same order: thread t adds chunks t, t + 256, ..., warps added in order), ids and weights, bit for
// bit, at Flash widths with ties, for a router wider than the default's held chunks, and for a hash layer.
void expect_legacy_agrees(const FusedCase& c, bool hash, uint64_t seed) {
  const std::string what = qtype_name(c.type) + " D=" + std::to_string(c.d) + " E=" + std::to_string(c.e) +
                           (hash ? " hash" : "");
  const FusedRouter r = fused_router(c, seed);
  const auto x = test::random_normal(size_t(c.d), seed + 5);
  std::vector<int32_t> hid(static_cast<size_t>(c.k));
  for (int j = 0; j < c.k; ++j) hid[size_t(j)] = int32_t((j * 37 + 5) % c.e);
  DeviceArray<uint8_t> d_w{std::span<const uint8_t>(r.w)};
  auto d_x = test::upload(x);
  DeviceArray<float> d_bias;
  if (c.with_bias) d_bias = test::upload(r.bias);
  struct Out {
    std::vector<float> z, w;
    std::vector<int32_t> ids;
    std::vector<uint8_t> xq;
  };
  auto run = [&](const char* knob) {
    if (knob) setenv("DSV4_CUDA_ROUTE_KERNEL", knob, 1);
    else unsetenv("DSV4_CUDA_ROUTE_KERNEL");
    DeviceArray<uint8_t> ws(cuda::moe_route_fused_workspace_bytes(c.e));
    DeviceArray<uint8_t> xq(size_t(cuda::gpu_activation_bytes(QType::Q2_K, c.d)));
    DeviceArray<float> wts(size_t(c.k));
    auto ids = test::upload(hid);
    ws.fill_bytes(0);
    cuda::MoeRouteFusedParams p;
    p.wtype = c.type, p.w = d_w.get(), p.d = c.d, p.n_experts = c.e, p.k = c.k, p.x = d_x.get();
    p.bias = c.with_bias ? d_bias.get() : nullptr, p.scale = 1.5f, p.hash = hash, p.ids = ids.get();
    p.weights = wts.get(), p.workspace = ws.get(), p.xq8k = xq.get();
    cuda::moe_route_fused_cuda(p, nullptr);
    Out o{std::vector<float>(static_cast<size_t>(c.e)), wts.download(), ids.download(), xq.download()};
    cuda::check(cudaMemcpy(o.z.data(), ws.get(), o.z.size() * 4, cudaMemcpyDeviceToHost), "z");
    return o;
  };
  const Out legacy = run("0"), def = run(nullptr);
  EXPECT_EQ(0, std::memcmp(legacy.z.data(), def.z.data(), def.z.size() * 4)) << what << " logits";
  EXPECT_EQ(legacy.ids, def.ids) << what;
  EXPECT_EQ(0, std::memcmp(legacy.w.data(), def.w.data(), def.w.size() * 4)) << what << " weights";
  EXPECT_EQ(legacy.xq, def.xq) << what << " Q8_K x";
  if (hash) {
    EXPECT_EQ(def.ids, hid) << what;
  }
}

TEST(CudaMoeRoute, LegacyFusedKernelAgrees) {
  DSV4_REQUIRE_CUDA();
  expect_legacy_agrees({QType::F16, 4096, 256, 6, 64, true}, false, 9700);
  expect_legacy_agrees({QType::F16, 4096, 256, 6, 256, true}, true, 9710);
  expect_legacy_agrees({QType::F16, 8192, 63, 6, 21, false}, false, 9720);
  expect_legacy_agrees({QType::F32, 4096, 40, 4, 40, true}, false, 9730);
}

}  // namespace
}  // namespace dsv4
