// Parity of the CUDA sink attention (src/backend/cuda/attention.h) with its CPU twin cpu::sink_attention_head
// at Flash widths: 64 heads, head dim 512, window 128, compressed rows selected (CSA, top-k 512) or all (HCA),
// contexts 1k..64k, decode (split-K + combine) and prefill (one split, fused sink), forced split counts too.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>

#include "backend/cpu/attention_cpu.h"
#include "backend/cuda/attention.h"
#include "model/attention_qat.h"
#include "ops_common.h"

namespace dsv4 {
namespace {

using cuda::DeviceArray;
using test::upload;

struct Case {
  const char* name;
  int64_t pos0;
  int T;
  int ratio;      // 0 sliding only, 4 CSA (selected rows), 128 HCA (all rows)
  int rows_per_split = 0;
  cuda::SinkAttnImpl impl = cuda::SinkAttnImpl::Auto;
  int H = 64;
  float q_sigma = 1.0f;  // 4: logits with std ~4, a peaked softmax (probabilities spanning many binades)
  bool qat_kv = false;   // KV rows on the FP8 grid in their first 448 dims, as the model stores them
  bool ticket = true;    // SinkAttnLaunch::split_ticket (false: the separate combine kernel)
};

// The model's KV rows: FP8 QAT round trip (blocks of 64) on the non-rotary dims 0..447.
void qat_rows(std::vector<float>& rows, int dh) {
  for (size_t r = 0; r + size_t(dh) <= rows.size(); r += size_t(dh)) qat_fp8_blocks(rows.data() + r, dh - 64);
}

// Runs one case on both sides. Inputs are N(0,1) like normalized q/kv rows; scale 1/sqrt(512) makes logits
// O(1). Selected rows: a random ascending subset of min(K, visible) rows per token (the indexer's contract).
// Returns the device output.
std::vector<float> run_case(const Case& c) {
  constexpr int dh = 512, W = 128, K = 512;
  const int H = c.H;
  const int64_t p_end = c.pos0 + c.T;
  const int64_t n_comp = c.ratio > 0 ? p_end / c.ratio : 0;
  const uint64_t seed = uint64_t(c.pos0 * 31 + c.T * 7 + c.ratio);
  const auto q = test::random_normal(size_t(c.T) * H * dh, seed + 1, c.q_sigma);
  auto kv_new = test::random_normal(size_t(c.T) * dh, seed + 2);
  auto ring = test::random_normal(size_t(W) * dh, seed + 3);
  auto comp = test::random_normal(size_t(std::max<int64_t>(n_comp, 1)) * dh, seed + 4);
  if (c.qat_kv) qat_rows(kv_new, dh), qat_rows(ring, dh), qat_rows(comp, dh);
  const auto sinks = test::random_normal(H, seed + 5, 2.0f);
  std::vector<int32_t> sel(size_t(c.T) * K, 0);
  std::mt19937_64 rng(seed + 6);
  if (c.ratio == 4) {
    for (int t = 0; t < c.T; ++t) {
      const int64_t vis = (c.pos0 + t + 1) / 4;
      std::vector<int32_t> all(static_cast<size_t>(vis));
      std::iota(all.begin(), all.end(), 0);
      std::shuffle(all.begin(), all.end(), rng);
      const int n = int(std::min<int64_t>(vis, K));
      std::sort(all.begin(), all.begin() + n);
      std::copy_n(all.begin(), n, sel.begin() + int64_t(t) * K);
    }
  }

  // CPU: a linear window buffer of positions p0 - min(W-1, p0) .. p_end - 1 built from ring + kv_new.
  const int64_t n_prev = std::min<int64_t>(W - 1, c.pos0), first = c.pos0 - n_prev;
  std::vector<float> win(size_t(n_prev + c.T) * dh);
  for (int64_t i = 0; i < n_prev; ++i)
    std::copy_n(ring.data() + ((first + i) % W) * dh, dh, win.data() + i * dh);
  std::copy(kv_new.begin(), kv_new.end(), win.begin() + n_prev * dh);
  const float scale = float(1.0 / std::sqrt(double(dh)));
  std::vector<float> ref(q.size()), scratch(size_t(W + std::max<int64_t>(n_comp, K)));
  for (int t = 0; t < c.T; ++t) {
    const int64_t p = c.pos0 + t, lo = std::max<int64_t>(0, p - W + 1);
    cpu::SinkAttnRows rows;
    rows.window = win.data() + (lo - first) * dh;
    rows.n_window = p - lo + 1;
    if (c.ratio == 4) {
      rows.comp = comp.data(), rows.comp_idx = sel.data() + int64_t(t) * K;
      rows.n_comp = std::min<int64_t>(K, (p + 1) / 4);
    } else if (c.ratio > 0) {
      rows.comp = comp.data(), rows.n_comp = (p + 1) / c.ratio;
    }
    for (int h = 0; h < H; ++h)
      cpu::sink_attention_head(q.data() + (int64_t(t) * H + h) * dh, dh, rows, sinks[size_t(h)], scale,
                               scratch.data(), ref.data() + (int64_t(t) * H + h) * dh);
  }

  auto d_q = upload(q), d_new = upload(kv_new), d_ring = upload(ring), d_comp = upload(comp), d_s = upload(sinks);
  auto d_sel = upload(sel);
  DeviceArray<float> d_out(q.size());
  d_out.fill_bytes(0xFF);  // NaN poison: an unwritten output fails the comparison
  cuda::SinkAttnLaunch L;
  L.q = d_q.get(), L.out = d_out.get(), L.sinks = d_s.get(), L.T = c.T, L.H = H, L.dh = dh, L.pos0 = c.pos0;
  L.window = W, L.kv_new = d_new.get(), L.ring = d_ring.get();
  if (c.ratio > 0) L.comp = d_comp.get(), L.ratio = c.ratio;
  if (c.ratio == 4) L.comp_idx = d_sel.get(), L.top_k = K;
  L.rows_per_split = c.rows_per_split;
  L.impl = c.impl;
  L.split_ticket = c.ticket;
  DeviceArray<float> d_scratch(size_t(cuda::sink_attention_scratch_floats(L)));
  cuda::sink_attention_cuda(L, d_scratch.get(), nullptr);
  const auto out = d_out.download();
  // Tolerance: logits are 512-term fp32 dots (warp tree vs the CPU's 16-lane order: ~1e-6 relative), the
  // softmax is rescaled per tile / split instead of one max, and outputs are convex combinations of O(1) rows.
  // Each of those is a few ulp; 2e-5 relative L2 and 5e-5 max abs (values |x| <= ~4) leave ~10x margin while a
  // wrong row, a missed sink or a dropped split moves results by > 1e-2. The tensor-core kernel is held to the
  // same bounds: its hi/lo fp16 split products lose ~2^-22 relative per term (below fp32 accumulation noise),
  // and plain fp16 operands (~5e-4 relative per term) would fail them.
  const double rel = test::rel_l2(out, ref), mx = test::max_abs_err(out, ref);
  std::printf("  %-44s impl %d: rel-L2 %.3g, max abs %.3g\n", c.name, int(c.impl), rel, mx);
  EXPECT_LE(rel, 2e-5) << c.name;
  EXPECT_LE(mx, 5e-5) << c.name;
  return out;
}

// A case's launch shape for the path queries (sink_attention_uses_*): any non-null row pointers, no device data.
cuda::SinkAttnLaunch shape_launch(const Case& c) {
  cuda::SinkAttnLaunch L;
  L.T = c.T, L.H = c.H, L.dh = 512, L.pos0 = c.pos0, L.window = 128, L.impl = c.impl;
  L.kv_new = L.ring = reinterpret_cast<const float*>(16);
  if (c.ratio > 0) L.comp = L.kv_new, L.ratio = c.ratio;
  if (c.ratio == 4) L.comp_idx = reinterpret_cast<const int32_t*>(16), L.top_k = 512;
  L.rows_per_split = c.rows_per_split;
  return L;
}

TEST(CudaAttention, SinkDecodeCsaContexts) {
  DSV4_REQUIRE_CUDA();
  for (int64_t ctx : {1024, 8192, 65536}) run_case({"csa decode", ctx - 1, 1, 4});
}

TEST(CudaAttention, SinkDecodeHcaAndSliding) {
  DSV4_REQUIRE_CUDA();
  run_case({"hca decode 2k", 2047, 1, 128});
  run_case({"hca decode 64k", 65535, 1, 128});
  run_case({"sliding decode, window not full", 50, 1, 0});
  run_case({"first token (only the sink and itself)", 0, 1, 4});
}

TEST(CudaAttention, SinkPrefill) {
  DSV4_REQUIRE_CUDA();
  run_case({"csa prefill from 0", 0, 300, 4});
  run_case({"csa prefill chunk at 4000", 4000, 64, 4});
  run_case({"hca prefill chunk at 8000", 8000, 40, 128});
  run_case({"sliding prefill", 100, 37, 0});
}

TEST(CudaAttention, SinkForcedSplits) {
  DSV4_REQUIRE_CUDA();
  constexpr auto kCore = cuda::SinkAttnImpl::CudaCore;  // splits exist on the CUDA-core path only
  run_case({"prefill with 64-row splits", 4000, 16, 4, 64, kCore});
  run_case({"decode with one 1024-row split", 8191, 1, 4, 1024, kCore});
  run_case({"prefill, splits past early tokens' rows", 10, 40, 128, 32, kCore});
}

// The fp32 CUDA-core kernel on prefill shapes (Auto sends T >= kAttnTcMinTokens to tensor cores).
TEST(CudaAttention, SinkPrefillCudaCore) {
  DSV4_REQUIRE_CUDA();
  constexpr auto kCore = cuda::SinkAttnImpl::CudaCore;
  run_case({"fp32 csa prefill from 0", 0, 300, 4, 0, kCore});
  run_case({"fp32 hca prefill chunk at 8000", 8000, 40, 128, 0, kCore});
  run_case({"fp32 sliding prefill", 100, 37, 0, 0, kCore});
}

// The tensor-core kernel forced on: prefill chunks, decode (one token, many tiles), head counts that are not
// one full group of 64 (padding, a second partial group), a peaked softmax, the first tokens of a sequence.
TEST(CudaAttention, SinkTensorCore) {
  DSV4_REQUIRE_CUDA();
  constexpr auto kTc = cuda::SinkAttnImpl::TensorCore;
  run_case({"tc csa prefill from 0", 0, 300, 4, 0, kTc});
  run_case({"tc csa prefill chunk at 4000", 4000, 64, 4, 0, kTc});
  run_case({"tc csa prefill chunk at 65000", 65000, 24, 4, 0, kTc});
  run_case({"tc hca prefill chunk at 8000", 8000, 40, 128, 0, kTc});
  run_case({"tc sliding prefill", 100, 37, 0, 0, kTc});
  run_case({"tc decode csa 8k", 8191, 1, 4, 0, kTc});
  run_case({"tc first token (the sink and itself)", 0, 1, 4, 0, kTc});
  run_case({"tc decode hca 64k", 65535, 1, 128, 0, kTc});
  run_case({"tc 80 heads (a partial second group)", 500, 20, 4, 0, kTc, 80});
  run_case({"tc 8 heads", 130, 17, 128, 0, kTc, 8});
  run_case({"tc peaked softmax (logit std ~4)", 3000, 32, 4, 0, kTc, 64, 4.0f});
  // FP8-grid rows: the kernel skips the hi*lo products of the chunks whose lo parts are all zero.
  run_case({"tc qat rows, csa chunk at 4000", 4000, 48, 4, 0, kTc, 64, 1.0f, true});
  run_case({"tc qat rows, hca chunk at 8000", 8000, 40, 128, 0, kTc, 64, 1.0f, true});
  run_case({"tc qat rows, peaked, sliding", 100, 37, 0, 0, kTc, 64, 4.0f, true});
  run_case({"fp32 qat rows, csa decode 8k", 8191, 1, 4, 0, cuda::SinkAttnImpl::CudaCore, 64, 1.0f, true});
}

// Splits combined by the last CTA of each head group (the default for 2..8 splits) against the separate combine
// kernel: the combine performs the kernel's float operations in the same order, so the outputs must be bitwise
// equal (both are also held to the CPU bounds by run_case). Cases run back to back, so each relies on the
// previous launch having reset the arrival counters (a stale counter leaves heads unwritten: NaN poison).
// Flash decode at 2k (HCA 144 rows in 5 splits, sliding 51 rows in 2), CSA with 96-row splits (7), 8 and 20
// heads (a partial group), a prefill chunk with 128-row splits, a peaked softmax on FP8-grid rows; then shapes
// that keep the combine kernel (CSA at 2k: 20 splits; the first token: one split).
TEST(CudaAttention, SinkSplitTicketEqualsCombineKernel) {
  DSV4_REQUIRE_CUDA();
  // The ticket path is opt-in (DSV4_CUDA_ATTN_TICKET=1, read per launch); restored at the end of the test.
  struct TicketOn {
    TicketOn() { setenv("DSV4_CUDA_ATTN_TICKET", "1", 1); }
    ~TicketOn() { unsetenv("DSV4_CUDA_ATTN_TICKET"); }
  } ticket_on;
  constexpr auto kCore = cuda::SinkAttnImpl::CudaCore;
  auto ticket_taken = [](const Case& c) { return cuda::sink_attention_uses_split_ticket(shape_launch(c)); };
  const Case with[] = {Case{"hca decode 2k", 2047, 1, 128},
                       Case{"sliding decode", 50, 1, 0},
                       Case{"hca decode 2k, again", 2050, 1, 128},
                       Case{"csa decode 2k, 96-row splits", 2047, 1, 4, 96, kCore},
                       Case{"20 heads (a partial group), 96-row splits", 3000, 1, 4, 96, kCore, 20},
                       Case{"8 heads, 32-row splits", 700, 1, 128, 32, kCore, 8},
                       Case{"prefill, 128-row splits", 4000, 16, 4, 128, kCore},
                       Case{"peaked qat rows, csa 8k, 96-row splits", 8191, 1, 4, 96, kCore, 64, 4.0f, true}};
  const Case without[] = {Case{"csa decode 2k", 2047, 1, 4}, Case{"first token", 0, 1, 4}};
  for (const Case& c : with) EXPECT_TRUE(ticket_taken(c)) << c.name;
  for (const Case& c : without) EXPECT_FALSE(ticket_taken(c)) << c.name;
  for (const Case& base : with) {
    Case c = base;
    c.ticket = true;
    const auto fused = run_case(c);
    c.ticket = false;
    const auto two = run_case(c);
    ASSERT_EQ(fused.size(), two.size());
    EXPECT_EQ(std::memcmp(fused.data(), two.data(), fused.size() * sizeof(float)), 0) << c.name;
  }
  for (const Case& c : without) run_case(c);
}

TEST(CudaAttention, SinkRejectsBadShapes) {
  cuda::SinkAttnLaunch L;
  L.T = 1, L.H = 64, L.dh = 520, L.window = 128;
  EXPECT_THROW(cuda::sink_attention_scratch_floats(L), Error);  // dh > 512
  L.dh = 512;
  EXPECT_THROW(cuda::sink_attention_scratch_floats(L), Error);  // no kv_new rows
  L.kv_new = reinterpret_cast<const float*>(16), L.rows_per_split = 48;
  EXPECT_THROW(cuda::sink_attention_scratch_floats(L), Error);  // split not a multiple of 32
  L.rows_per_split = 0, L.dh = 256, L.impl = cuda::SinkAttnImpl::TensorCore;
  EXPECT_THROW(cuda::sink_attention_scratch_floats(L), Error);  // tensor cores need dh == 512
  L.dh = 512, L.impl = static_cast<cuda::SinkAttnImpl>(7);
  EXPECT_THROW(cuda::sink_attention_scratch_floats(L), Error);  // unknown kernel
}

}  // namespace
}  // namespace dsv4
