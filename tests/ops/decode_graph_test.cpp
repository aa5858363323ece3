// Recorded decode segments (Backend::run_segment, src/backend/cuda/graph.h, forward.cpp).
//
// Mechanism (no model): a segment runs eagerly once, is captured the second time, replayed afterwards; any
// device_malloc invalidates it; a capture that cannot work (an op synchronizes) falls back to running the ops.
// Each run's effect is checked on the device memory, and the counters say which path ran.
//
// Forward (the tiny synthetic model, f16 and q2 mixes): a session decoded token by token on a CUDA backend with
// graphs (default) and on one with DSV4_CUDA_GRAPH=0 gives BITWISE equal logits and session state. Tolerance 0
// because both run the same kernels on the same inputs in the same order; a replay reads its inputs from the
// addresses baked in at capture, so a stale graph (moved scratch, a missed op) shows up as a difference. The
// q2 mix covers the Q8_0 activation quantization (the backend's activation cache is reset around segments) and
// the fused routed-expert launches; f16 the plain GEMVs. A prefill of many tokens in the middle regrows the
// forward scratch and the backend's buffers: the graphs must be invalidated, re-captured and still agree.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <sstream>
#include <string>
#include <vector>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/graph.h"
#include "convert/synth.h"
#include "model/forward.h"
#include "model/model.h"
#include "ops_common.h"

namespace dsv4 {
namespace {

std::unique_ptr<Backend> cuda_backend(bool graphs) {
  if (!graphs) setenv("DSV4_CUDA_GRAPH", "0", 1);
  auto be = make_cuda_backend();
  unsetenv("DSV4_CUDA_GRAPH");
  return be;
}

TEST(CudaDecodeGraphSegments, ReplayRunsTheRecordedOpsAndAllocationInvalidates) {
  DSV4_REQUIRE_CUDA();
  auto be = cuda_backend(true);
  const size_t n = 4096;
  DeviceBuffer src = be->alloc(n * sizeof(float)), dst = be->alloc(n * sizeof(float));
  const std::vector<float> zeros(n, 0.f);
  const std::vector<uint64_t> key{3, uint64_t(reinterpret_cast<uintptr_t>(src.data())),
                                  uint64_t(reinterpret_cast<uintptr_t>(dst.data()))};
  auto run = [&] {
    be->upload(dst.data(), zeros.data(), n * sizeof(float));  // outside the segment: the segment must rewrite it
    be->run_segment(key, [&] {
      be->fill(src.f32(), 2.5f, n);
      be->copy(dst.data(), src.data(), n * sizeof(float));
    });
    const auto h = test::get<float>(*be, dst, n);
    for (size_t i = 0; i < n; ++i) ASSERT_EQ(h[i], 2.5f) << "element " << i;
  };
  for (int i = 0; i < 5; ++i) run();
  auto s = cuda_segment_graph_stats(*be);
  EXPECT_EQ(s.eager, 1);
  EXPECT_EQ(s.captured, 1);
  EXPECT_EQ(s.replayed, 3);
  EXPECT_EQ(s.failed, 0);
  { cuda::DeviceArray<float> moved(16); }  // any device_malloc may have moved a backend buffer
  for (int i = 0; i < 3; ++i) run();      // eager again, capture again, replay
  s = cuda_segment_graph_stats(*be);
  EXPECT_EQ(s.invalidated, 1);
  EXPECT_EQ(s.eager, 2);
  EXPECT_EQ(s.captured, 2);
  EXPECT_EQ(s.replayed, 4);
}

TEST(CudaDecodeGraphSegments, FailedCaptureRunsEagerly) {
  DSV4_REQUIRE_CUDA();
  auto be = cuda_backend(true);
  const size_t n = 256;
  DeviceBuffer b = be->alloc(n * sizeof(float));
  for (int i = 1; i <= 3; ++i) {
    std::vector<float> h(n, 0.f);
    // download synchronizes the stream: illegal inside a capture, so the second run's capture fails.
    be->run_segment({9}, [&] {
      be->fill(b.f32(), float(i), n);
      be->download(h.data(), b.data(), n * sizeof(float));
    });
    for (size_t j = 0; j < n; ++j) ASSERT_EQ(h[j], float(i)) << "run " << i << " element " << j;
  }
  const auto s = cuda_segment_graph_stats(*be);
  EXPECT_EQ(s.failed, 1);
  EXPECT_EQ(s.captured, 0);
  EXPECT_EQ(s.replayed, 0);
  EXPECT_EQ(s.eager, 3);
  // The backend is still usable (the failed capture left no error behind).
  be->fill(b.f32(), 7.f, n);
  EXPECT_EQ(test::get<float>(*be, b, n)[n - 1], 7.f);
}

std::string saved(const SequenceState& st) {
  std::stringstream ss;
  st.save(ss);
  return ss.str();
}

std::vector<int32_t> tokens(int n) {
  std::vector<int32_t> t;
  for (int i = 0; i < n; ++i) t.push_back(int32_t((int64_t(i) * 7919 + 13) % 129000));
  return t;
}

// Logits of: a prefill of `pre` tokens (last row), `dec1` single-token decodes, then (big > 0) a prefill of
// `big` tokens in one pass (last row) and `dec2` more decodes. Scratch reused across calls, as the engine does.
std::vector<float> session(const Model& m, Backend& be, SequenceState& st, int pre, int dec1, int big, int dec2,
                           cuda::SegmentGraphStats* before_big) {
  const size_t V = size_t(m.config().n_vocab);
  const auto t = tokens(pre + dec1 + big + dec2);
  ForwardScratch scratch;
  ForwardOptions o;
  o.scratch = &scratch;
  o.max_tokens_per_pass = 512;
  std::vector<float> out, one(V);
  auto keep = [&] { out.insert(out.end(), one.begin(), one.end()); };
  int p = 0;
  model_forward(m, be, st, t.data(), pre, one.data(), false, o), p += pre, keep();
  for (int i = 0; i < dec1; ++i) model_forward(m, be, st, t.data() + p, 1, one.data(), false, o), ++p, keep();
  if (before_big) *before_big = cuda_segment_graph_stats(be);
  if (big > 0) model_forward(m, be, st, t.data() + p, big, one.data(), false, o), p += big, keep();
  for (int i = 0; i < dec2; ++i) model_forward(m, be, st, t.data() + p, 1, one.data(), false, o), ++p, keep();
  return out;
}

class CudaDecodeGraph : public ::testing::TestWithParam<Mix> {
 protected:
  void SetUp() override {
    if (!cuda::device_available()) GTEST_SKIP() << "no CUDA device present";
    path_ = (std::filesystem::temp_directory_path() /
             ("dsv4-graph-" + std::to_string(::getpid()) + "-" + mix_name(GetParam()) + ".gguf")).string();
    SynthOptions so;
    so.shape = "tiny", so.mix = GetParam(), so.out_path = path_;
    synth_model(so);
    model_ = Model::load(path_);
  }
  void TearDown() override {
    model_.reset();
    if (!path_.empty()) std::remove(path_.c_str());
  }
  // Runs the same session on a graph backend and on DSV4_CUDA_GRAPH=0; expects bitwise equal logits and state.
  void compare(int pre, int dec1, int big, int dec2, int64_t ctx) {
    const Model& m = *model_;
    const size_t V = size_t(m.config().n_vocab);
    auto on = cuda_backend(true), off = cuda_backend(false);
    SequenceState s_on, s_off;
    s_on.init(m.config(), ctx, on.get());
    s_off.init(m.config(), ctx, off.get());
    cuda::SegmentGraphStats mid;
    const auto l_on = session(m, *on, s_on, pre, dec1, big, dec2, &mid);
    const auto l_off = session(m, *off, s_off, pre, dec1, big, dec2, nullptr);
    ASSERT_EQ(l_on.size(), l_off.size());
    for (size_t r = 0; r < l_on.size() / V; ++r)
      ASSERT_EQ(std::memcmp(l_on.data() + r * V, l_off.data() + r * V, V * sizeof(float)), 0)
          << mix_name(GetParam()) << ": logits row " << r << " differ between graphs on and off";
    EXPECT_TRUE(saved(s_on) == saved(s_off)) << "session state differs between graphs on and off";
    const auto s = cuda_segment_graph_stats(*on), z = cuda_segment_graph_stats(*off);
    const long long segs = m.config().n_layers + 1;
    std::printf("[%s] segments: eager %lld captured %lld replayed %lld failed %lld discarded %lld invalidated %lld "
                "(%lld per token, %lld graph nodes held)\n", mix_name(GetParam()), s.eager, s.captured, s.replayed,
                s.failed, s.discarded, s.invalidated, segs, s.nodes);
    EXPECT_EQ(s.failed, 0);
    EXPECT_EQ(z.eager + z.captured + z.replayed, 0);  // DSV4_CUDA_GRAPH=0 records nothing
    // Each segment converges within a few tokens (eager after every allocation, then one capture); a buffer
    // that grows during the decode (attention scratch at longer contexts) costs a few more.
    EXPECT_GE(s.replayed, (dec1 + dec2) / 2 * segs);
    if (big > 0) {  // the big prefill regrew buffers: every graph was dropped and recorded again, then replayed
      EXPECT_GE(s.invalidated - mid.invalidated, segs);
      EXPECT_GE(s.captured - mid.captured, segs);
      EXPECT_GE(s.replayed - mid.replayed, dec2 / 2 * segs);
    }
  }
  std::string path_;
  std::unique_ptr<Model> model_;
};

// 60 + 72 positions: the ring (W = 32) wraps, the HCA layer (m = 128) emits its first row at position 127, the
// indexer selects 16 of up to 33 rows.
TEST_P(CudaDecodeGraph, DecodeBitwiseEqualGraphsOnAndOff) { compare(60, 72, 0, 0, 256); }

// 16 + 12 decodes, a 300-token prefill (scratch and backend buffers grow), 20 more decodes.
TEST_P(CudaDecodeGraph, RegrowthInvalidatesAndRecaptures) { compare(16, 12, 300, 20, 512); }

INSTANTIATE_TEST_SUITE_P(Mixes, CudaDecodeGraph, ::testing::Values(Mix::F16, Mix::Q2),
                         [](const auto& info) { return std::string(mix_name(info.param)); });

}  // namespace
}  // namespace dsv4
