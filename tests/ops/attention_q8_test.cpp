// The Q8 output of the sink attention: SinkAttnLaunch::q8 (src/backend/cuda/attention.h) and
// SinkAttnParams::q8_groups on the CUDA backend, which hands those rows to matmul_grouped (the o_a projection)
// instead of a separate quantize launch.
//
// Kernel level, at Flash widths (64 heads x 512, window 128, de-rotation of the last 64 dims, Q8 rows of 4096 =
// 8 heads): for every kernel path that writes the final output (the split combine kernel, which writes the rows
// in its epilogue: the decode case; one split, the last-CTA combine and the tensor-core kernel, each followed by
// a quantize launch) the Q8 bytes must equal BIT FOR BIT what quantize_activations_cuda(Q8_0, out, Q8Split)
// makes of the output, and the output must be bitwise the output of the same launch without Q8 rows. The reference quantizer is the one the projection
// used before (gemv.cu), not the code under test.
//
// Backend level: sink_attention (with the decode fusions and q8_groups = 8) followed by matmul_grouped gives the
// same output and the same projection bitwise with the fused rows on (DSV4_CUDA_ATTN_Q8=1) and off (the default).
// That the projection really reads the attention's rows is shown by zeroing the attention output behind the
// backend's back (a raw cudaMemset, which the activation cache cannot see) before the projection: with the rows
// the projection is unchanged, without them it becomes zero. Also through a recorded segment (eager, captured and
// replayed runs, as the decode's attention core and the next layer segment): the rows must survive the segment's
// host reset and a replay must read this token's rows.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "backend/cuda/attention.h"
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/gemv.h"
#include "backend/cuda/graph.h"
#include "model/rope.h"
#include "ops_common.h"

namespace dsv4 {
namespace {

using cuda::DeviceArray;
using test::upload;

constexpr int kDh = 512, kW = 128, kK = 512;

const RopeFreqs& yarn() {
  static const RopeFreqs f = rope_freqs_yarn(160000.0, 64, RopeYarn{16.0, 65536.0, 32.0, 1.0});
  return f;
}

// Sets an environment variable for a scope (the previous value, or its absence, restored after).
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) had_ = true, old_ = old;
    if (value) setenv(name, value, 1);
    else unsetenv(name);
  }
  ~ScopedEnv() {
    if (had_) setenv(name_, old_.c_str(), 1);
    else unsetenv(name_);
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  const char* name_;
  bool had_ = false;
  std::string old_;
};

// The kernel that writes the final output (and so the Q8 rows).
enum class Path { OneSplit, CombineKernel, LastCta, TensorCore };

struct Case {
  const char* name;
  int64_t pos0;
  int T;
  int ratio;              // 0 sliding only, 4 CSA (selected rows), 128 HCA (all rows)
  Path path;              // expected
  int H = 64;
  int64_t q8_cols = 4096;
  int rows_per_split = 0;
  cuda::SinkAttnImpl impl = cuda::SinkAttnImpl::Auto;
  float q_sigma = 1.0f;   // 4: a peaked softmax
};

// Selected rows: min(K, visible) distinct rows spread over the token's visible ones, ascending.
std::vector<int32_t> selection(int64_t pos0, int T) {
  std::vector<int32_t> sel(size_t(T) * kK, 0);
  for (int t = 0; t < T; ++t) {
    const int64_t vis = (pos0 + t + 1) / 4, n = std::min<int64_t>(kK, vis);
    for (int64_t i = 0; i < n; ++i) sel[size_t(t) * kK + size_t(i)] = int32_t(i * vis / n);
  }
  return sel;
}

Path path_of(const cuda::SinkAttnLaunch& L) {
  const bool tc = L.impl == cuda::SinkAttnImpl::TensorCore ||
                  (L.impl == cuda::SinkAttnImpl::Auto && L.dh == 512 && L.T >= cuda::kAttnTcMinTokens);
  if (tc) return Path::TensorCore;
  if (cuda::sink_attention_uses_split_ticket(L)) return Path::LastCta;
  return cuda::sink_attention_scratch_floats(L) == 0 ? Path::OneSplit : Path::CombineKernel;
}

void run_kernel_case(const Case& c) {
  SCOPED_TRACE(c.name);
  const int H = c.H, T = c.T;
  const int64_t n_comp = c.ratio > 0 ? (c.pos0 + T) / c.ratio : 0;
  const uint64_t seed = uint64_t(c.pos0 * 13 + T * 5 + c.ratio + H);
  const auto q = test::random_normal(size_t(T) * H * kDh, seed + 1, c.q_sigma);
  const auto kv_new = test::random_normal(size_t(T) * kDh, seed + 2);
  const auto ring = test::random_normal(size_t(kW) * kDh, seed + 3);
  const auto comp = test::random_normal(size_t(std::max<int64_t>(n_comp, 1)) * kDh, seed + 4);
  const auto sinks = test::random_normal(size_t(H), seed + 5, 2.0f);
  const auto sel = selection(c.pos0, T);
  auto d_q = upload(q), d_new = upload(kv_new), d_ring = upload(ring), d_comp = upload(comp), d_s = upload(sinks);
  auto d_sel = upload(sel);

  cuda::SinkAttnLaunch L;
  L.q = d_q.get(), L.sinks = d_s.get(), L.T = T, L.H = H, L.dh = kDh, L.pos0 = c.pos0, L.window = kW;
  L.kv_new = d_new.get(), L.ring = d_ring.get();
  if (c.ratio > 0) L.comp = d_comp.get(), L.ratio = c.ratio;
  if (c.ratio == 4) L.comp_idx = d_sel.get(), L.top_k = kK;
  L.rows_per_split = c.rows_per_split, L.impl = c.impl;
  L.n_rot = yarn().n_rot;
  std::copy_n(yarn().omega.begin(), L.n_rot / 2, L.omega);
  ASSERT_EQ(path_of(L), c.path) << "the case does not take the kernel path it is meant to cover";

  const size_t n_out = size_t(T) * H * kDh;
  const int64_t rows = int64_t(n_out) / c.q8_cols;
  const size_t q8_bytes = size_t(rows) * size_t(cuda::gpu_activation_bytes(QType::Q8_0, c.q8_cols, cuda::GemvLayout::Q8Split));
  DeviceArray<float> d_scratch(size_t(std::max<int64_t>(1, cuda::sink_attention_scratch_floats(L))));
  auto run = [&](void* q8) {
    DeviceArray<float> out(n_out);
    out.fill_bytes(0xFF);  // NaN poison: an unwritten element fails the comparisons
    cuda::SinkAttnLaunch P = L;
    P.out = out.get(), P.q8 = q8, P.q8_cols = q8 ? c.q8_cols : 0;
    cuda::sink_attention_cuda(P, d_scratch.get(), nullptr);
    return out;
  };
  DeviceArray<uint8_t> d_q8(q8_bytes), d_ref(q8_bytes);
  d_q8.fill_bytes(0xAB), d_ref.fill_bytes(0xCD);  // different poisons: an unwritten byte cannot match
  const auto plain = run(nullptr).download();
  DeviceArray<float> fused = run(d_q8.get());
  cuda::quantize_activations_cuda(QType::Q8_0, fused.get(), rows, c.q8_cols, d_ref.get(), nullptr,
                                  cuda::GemvLayout::Q8Split);
  const auto out = fused.download();
  const auto got = d_q8.download(), ref = d_ref.download();

  ASSERT_EQ(out.size(), plain.size());
  EXPECT_EQ(std::memcmp(out.data(), plain.data(), out.size() * sizeof(float)), 0) << "output changed by the Q8 rows";
  EXPECT_TRUE(std::all_of(out.begin(), out.end(), [](float v) { return std::isfinite(v); }));
  ASSERT_EQ(got.size(), ref.size());
  size_t first_diff = got.size();
  for (size_t i = 0; i < got.size() && first_diff == got.size(); ++i)
    if (got[i] != ref[i]) first_diff = i;
  const size_t row_bytes = q8_bytes / size_t(rows);
  EXPECT_EQ(first_diff, got.size()) << "Q8 bytes differ from quantize_activations_cuda, first at row "
                                    << first_diff / row_bytes << " byte " << first_diff % row_bytes;
  // Non-trivial data: most quants are non-zero (an all-zero output would quantize to zeros on both sides).
  size_t nonzero = 0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < c.q8_cols; ++i) nonzero += got[size_t(r) * row_bytes + size_t(i)] != 0;
  EXPECT_GT(nonzero, size_t(rows * c.q8_cols) / 2);
}

TEST(CudaAttentionQ8, KernelRowsEqualQuantizeLaunch) {
  DSV4_REQUIRE_CUDA();
  ScopedEnv no_ticket("DSV4_CUDA_ATTN_TICKET", nullptr);  // the paths below assume the default combine kernel
  constexpr auto kCore = cuda::SinkAttnImpl::CudaCore;
  constexpr auto kTc = cuda::SinkAttnImpl::TensorCore;
  const Case cases[] = {
      {"csa decode 2k: 20 splits + combine kernel", 2047, 1, 4, Path::CombineKernel},
      {"hca decode 2k: 5 splits + combine kernel", 2047, 1, 128, Path::CombineKernel},
      {"sliding decode: 2 splits + combine kernel", 50, 1, 0, Path::CombineKernel},
      {"csa decode 8k, peaked softmax", 8191, 1, 4, Path::CombineKernel, 64, 4096, 0, cuda::SinkAttnImpl::Auto, 4.0f},
      {"first tokens: one split, quantize launch after", 5, 1, 4, Path::OneSplit},
      {"csa decode 8k, one 1024-row split", 8191, 1, 4, Path::OneSplit, 64, 4096, 1024, kCore},
      {"hca decode 2k, rows of 4 heads (2048 cols)", 2047, 1, 128, Path::CombineKernel, 64, 2048},
      {"hca decode 2k, rows of 16 heads (8192 cols)", 2047, 1, 128, Path::CombineKernel, 64, 8192},
      {"2 tokens: 16 rows", 3000, 2, 4, Path::CombineKernel},
      {"20 heads (a partial group), rows of 5 heads", 2047, 1, 128, Path::CombineKernel, 20, 2560},
      {"20 heads, one split", 20, 1, 128, Path::OneSplit, 20, 2560},
      {"tensor cores: prefill chunk, quantize launch after", 4000, 40, 4, Path::TensorCore},
      {"tensor cores forced on decode", 2047, 1, 4, Path::TensorCore, 64, 4096, 0, kTc},
  };
  for (const Case& c : cases) run_kernel_case(c);
}

// The last-CTA combine (opt-in: DSV4_CUDA_ATTN_TICKET=1, read per launch) writes the rows in its own epilogue.
TEST(CudaAttentionQ8, KernelRowsEqualQuantizeLaunchLastCtaCombine) {
  DSV4_REQUIRE_CUDA();
  ScopedEnv ticket("DSV4_CUDA_ATTN_TICKET", "1");
  const Case cases[] = {
      {"hca decode 2k: 5 splits, last-CTA combine", 2047, 1, 128, Path::LastCta},
      {"sliding decode: 2 splits, last-CTA combine", 50, 1, 0, Path::LastCta},
      {"csa 2k, 96-row splits (7), 20 heads", 2047, 1, 4, Path::LastCta, 20, 2560, 96, cuda::SinkAttnImpl::CudaCore},
  };
  for (const Case& c : cases) run_kernel_case(c);
}

TEST(CudaAttentionQ8, RejectsRowsThatDoNotFit) {
  cuda::SinkAttnLaunch L;
  L.T = 1, L.H = 64, L.dh = 512, L.window = 128, L.kv_new = reinterpret_cast<const float*>(16);
  L.q8 = reinterpret_cast<void*>(16), L.q8_cols = 4096;
  EXPECT_NO_THROW(cuda::sink_attention_scratch_floats(L));
  L.q8_cols = 4000;  // not a multiple of 256 (the split layout)
  EXPECT_THROW(cuda::sink_attention_scratch_floats(L), Error);
  L.q8_cols = 256 * 3;  // does not divide 64 x 512
  EXPECT_THROW(cuda::sink_attention_scratch_floats(L), Error);
  L.q8_cols = 4096, L.dh = 400, L.H = 256;  // 256 x 400 = 25 rows, but a 32-value block would straddle heads
  EXPECT_THROW(cuda::sink_attention_scratch_floats(L), Error);
}

// ---- backend level ------------------------------------------------------------------------------------------

WeightView f32_view(const std::vector<float>& v, int64_t ne0, const char* name) {
  WeightView w;
  w.type = QType::F32, w.data = v.data(), w.n_bytes = v.size() * sizeof(float), w.name = name;
  w.ne[0] = ne0, w.ne[1] = 1, w.n_dims = 1;
  return w;
}

constexpr int kH = 64, kG = 8, kRo = 1024, kGin = kH * kDh / kG;  // Flash o_a: 8 groups of 8 heads x 512

struct BackendCase {
  CompRows comp;
  int64_t p0;
  const char* what;
};

// One backend's decode step inputs and buffers, allocated once: no block is freed between the attention and the
// projection (a free drops every cached activation).
struct Step {
  Step(Backend& backend, const BackendCase& bc, const std::vector<uint8_t>& wbytes) : be(backend), c(bc) {
    w.type = QType::Q8_0, w.data = wbytes.data(), w.n_bytes = wbytes.size(), w.name = "attn_output_a";
    w.ne[0] = kGin, w.ne[1] = int64_t(kG) * kRo, w.n_dims = 2;
    const int64_t n_comp = c.comp == CompRows::None ? 1 : std::max<int64_t>(1, (c.p0 + 8) / 4);
    ring = test::put(be, test::random_normal(size_t(kW) * kDh, 31));
    comp = test::put(be, test::random_normal(size_t(n_comp) * kDh, 32));
    sel = test::put(be, selection(c.p0 + 4, 1));  // valid for every position used below (rows < visible)
    q = be.alloc(size_t(kH) * kDh * 4), kv = be.alloc(size_t(kDh) * 4);
    out = be.alloc(size_t(kH) * kDh * 4), y = be.alloc(size_t(kG) * kRo * 4);
    ap.heads = kH, ap.dim = kDh, ap.window = kW, ap.ratio = 4, ap.comp = c.comp, ap.top_k = kK;
    ap.sinks = &sinks_v, ap.scale = float(1.0 / std::sqrt(double(kDh)));
    ap.out_rope = &yarn(), ap.store_window = true, ap.q8_groups = kG;  // as the model's fused decode sets them
  }
  // The attention of token `i` (new q and kv rows per token) at position p0 + i.
  void attention(int i) {
    const auto hq = test::random_normal(size_t(kH) * kDh, 100 + uint64_t(i), 1.5f);
    const auto hkv = test::random_normal(size_t(kDh), 200 + uint64_t(i));
    be.upload(q.data(), hq.data(), hq.size() * 4);
    be.upload(kv.data(), hkv.data(), hkv.size() * 4);
    be.sink_attention(ap, q.f32(), kv.f32(), ring.f32(), comp.f32(), sel.i32(), 1, c.p0 + i, out.f32());
  }
  void project() { be.matmul_grouped(w, kG, out.f32(), 1, y.f32()); }
  // Zeroes the attention output without the backend seeing a write (its activation cache keeps its entries).
  void zero_out_unseen() {
    cuda::check(cudaDeviceSynchronize(), "sync");
    cuda::check(cudaMemset(out.data(), 0, size_t(kH) * kDh * 4), "memset");
    cuda::check(cudaDeviceSynchronize(), "sync");
  }
  std::vector<float> get_out() { return test::get<float>(be, out, size_t(kH) * kDh); }
  std::vector<float> get_y() { return test::get<float>(be, y, size_t(kG) * kRo); }

  Backend& be;
  BackendCase c;
  WeightView w;
  std::vector<float> sinks = test::random_normal(kH, 33);
  WeightView sinks_v = f32_view(sinks, kH, "attn_sinks");
  SinkAttnParams ap;
  DeviceBuffer ring, comp, sel, q, kv, out, y;
};

std::unique_ptr<Backend> backend_with_q8(bool on) {
  ScopedEnv knob("DSV4_CUDA_ATTN_Q8", on ? "1" : "0");  // read when the backend is made
  return make_cuda_backend();
}

const BackendCase kBackendCases[] = {
    {CompRows::Selected, 2047, "CSA decode 2k (combine kernel)"},
    // p0 = 2040: 638-639 rows over the 6 tokens of RowsCarriedIntoRecordedSegment, i.e. the same 20 splits, so
    // the sink attention's scratch does not grow (a growth invalidates the recording: one capture more)
    {CompRows::All, 2040, "HCA row set at 2k (combine kernel)"},
    {CompRows::None, 3, "sliding, first tokens (one split)"},
};

TEST(CudaAttentionQ8, BackendProjectionSameWithAndWithoutKnob) {
  DSV4_REQUIRE_CUDA();
  const auto wbytes = test::random_weights(QType::Q8_0, int64_t(kG) * kRo, kGin, 9);
  auto on = backend_with_q8(true), off = backend_with_q8(false);
  for (const BackendCase& c : kBackendCases) {
    SCOPED_TRACE(c.what);
    Step a(*on, c, wbytes), b(*off, c, wbytes);
    for (int i = 0; i < 3; ++i) {
      a.attention(i), b.attention(i);
      a.project(), b.project();
      const auto ya = a.get_y(), yb = b.get_y();
      EXPECT_EQ(a.get_out(), b.get_out()) << "attention output, token " << i;
      EXPECT_EQ(std::memcmp(ya.data(), yb.data(), ya.size() * sizeof(float)), 0) << "projection, token " << i;
      EXPECT_TRUE(std::any_of(ya.begin(), ya.end(), [](float v) { return v != 0.0f; }));
    }
    // The projection reads the attention's rows (on) or quantizes the output itself (off): the output zeroed
    // unseen after the attention leaves the first projection unchanged and makes the second zero. (Token 3 runs
    // twice on the off backend: its ring store rewrites slot p0 + 3 with the same row, which token 3 never reads.)
    const int i = 3;
    b.attention(i), b.project();
    const auto ref = b.get_y();
    a.attention(i), a.zero_out_unseen(), a.project();
    EXPECT_EQ(a.get_y(), ref) << "knob on: the projection did not read the attention's Q8 rows";
    b.attention(i), b.zero_out_unseen(), b.project();
    const auto yz = b.get_y();
    EXPECT_TRUE(std::all_of(yz.begin(), yz.end(), [](float v) { return v == 0.0f; }))
        << "knob off: the projection should have quantized the (zeroed) output";
  }
}

// The decode's shape: the attention core between recorded segments, the projection opening the next segment.
// Token 0 runs the segment eagerly, token 1 captures it, later tokens replay it; every token's attention output is
// zeroed unseen before the segment, so only this token's Q8 rows can give the reference projection.
TEST(CudaAttentionQ8, RowsCarriedIntoRecordedSegment) {
  DSV4_REQUIRE_CUDA();
  const auto wbytes = test::random_weights(QType::Q8_0, int64_t(kG) * kRo, kGin, 10);
  for (const BackendCase& c : kBackendCases) {
    SCOPED_TRACE(c.what);
    auto on = backend_with_q8(true), off = backend_with_q8(false);
    Step a(*on, c, wbytes), b(*off, c, wbytes);
    const std::vector<uint64_t> key{7, uint64_t(reinterpret_cast<uintptr_t>(a.out.data())),
                                    uint64_t(reinterpret_cast<uintptr_t>(a.y.data()))};
    constexpr int kTokens = 6;
    for (int i = 0; i < kTokens; ++i) {
      b.attention(i), b.project();
      a.attention(i);
      EXPECT_EQ(a.get_out(), b.get_out()) << "attention output, token " << i;
      a.zero_out_unseen();
      on->run_segment(key, [&] { a.project(); });
      const auto ya = a.get_y(), yb = b.get_y();
      EXPECT_EQ(std::memcmp(ya.data(), yb.data(), ya.size() * sizeof(float)), 0) << "projection, token " << i;
    }
    const auto s = cuda_segment_graph_stats(*on);
    EXPECT_EQ(s.failed, 0);
    EXPECT_GE(s.captured, 1);
    EXPECT_GE(s.replayed, kTokens - 3);  // eager, capture, then replays (one more eager run if a buffer grew)
  }
}

}  // namespace
}  // namespace dsv4
