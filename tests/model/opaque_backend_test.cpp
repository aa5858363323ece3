// The forward on a backend whose memory the host cannot dereference (opaque_backend.h): it must run, never touch
// activations or state on the host (a stray read would segfault), and give bitwise the CPU backend's logits and
// state bytes, through prefill, decode, chunking, multi-session batches, save/load, clone and the debug tap.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <sstream>
#include <string>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "common/error.h"
#include "model/forward.h"
#include "model/model.h"
#include "opaque_backend.h"
#include "tiny_model.h"

namespace dsv4 {
namespace {

class OpaqueForward : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    path_ = (std::filesystem::temp_directory_path() / ("dsv4_opaque_" + std::to_string(::getpid()) + ".gguf")).string();
    test::write_tiny_model(path_, test::tiny_config(), {});
  }
  static void TearDownTestSuite() { std::remove(path_.c_str()); }
  static std::string path_;
};
std::string OpaqueForward::path_;

std::vector<int32_t> tokens(int n) {
  test::Rng r(11);
  std::vector<int32_t> t;
  for (int i = 0; i < n; ++i) t.push_back(int32_t(r.next() % 96));
  return t;
}

// Prefill of 21 tokens (all rows), then 6 single-token decodes, then a 9-token chunk: all logits rows.
std::vector<float> run(const Model& m, Backend& be, SequenceState& st, const std::vector<int32_t>& t,
                       ForwardOptions o = {}) {
  const int V = m.config().n_vocab;
  std::vector<float> all(size_t(21) * V), one(static_cast<size_t>(V));
  model_forward(m, be, st, t.data(), 21, all.data(), true, o);
  for (int i = 21; i < 27; ++i) {
    model_forward(m, be, st, t.data() + i, 1, one.data(), false, o);
    all.insert(all.end(), one.begin(), one.end());
  }
  std::vector<float> last(size_t(9) * V);
  model_forward(m, be, st, t.data() + 27, 9, last.data(), true, o);
  all.insert(all.end(), last.begin(), last.end());
  return all;
}

std::string saved(const SequenceState& st) {
  std::stringstream ss;
  st.save(ss);
  return ss.str();
}

void expect_bitwise(const std::vector<float>& a, const std::vector<float>& b) {
  ASSERT_EQ(a.size(), b.size());
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0);
}

TEST_F(OpaqueForward, LogitsAndStateBitwiseEqualCpu) {
  auto m = Model::load(path_);
  auto cpu = make_cpu_backend();
  test::OpaqueBackend opq;
  const auto t = tokens(36);
  SequenceState a, b;
  a.init(m->config(), 64, cpu.get());
  b.init(m->config(), 64, &opq);
  auto la = run(*m, *cpu, a, t);
  ForwardScratch scratch;  // reused across calls, as the engine does
  ForwardOptions o;
  o.scratch = &scratch;
  auto lb = run(*m, opq, b, t, o);
  expect_bitwise(la, lb);
  EXPECT_EQ(saved(a), saved(b));  // save() downloads the opaque state: byte-identical streams
}

// ForwardOptions::device_logits: the single-row logits stay in backend memory (no download; a host pointer would
// fault on this backend's addresses) and equal the downloaded ones bitwise; Backend::argmax's default (download,
// then the host rule) picks argmax_usable of them.
TEST_F(OpaqueForward, DeviceLogitsStayInBackendMemory) {
  auto m = Model::load(path_);
  test::OpaqueBackend opq;
  const auto t = tokens(30);
  const int V = m->config().n_vocab;
  SequenceState a, b;
  a.init(m->config(), 64, &opq);
  b.init(m->config(), 64, &opq);
  ForwardScratch scratch;
  ForwardOptions o;
  o.scratch = &scratch;
  DeviceBuffer dev = opq.alloc(size_t(V) * sizeof(float));
  std::vector<float> host(static_cast<size_t>(V)), got(static_cast<size_t>(V));
  for (int T : {21, 1, 1, 7}) {
    const int at = int(a.n_past);
    model_forward(*m, opq, a, t.data() + at, T, host.data(), false, o);
    ForwardOptions od = o;
    od.device_logits = dev.f32();
    model_forward(*m, opq, b, t.data() + at, T, nullptr, false, od);
    opq.download(got.data(), dev.data(), got.size() * sizeof(float));
    expect_bitwise(host, got);
    EXPECT_EQ(opq.argmax(dev.f32(), V), argmax_usable(host.data(), V)) << "T=" << T;
  }
  ForwardOptions both = o;
  both.device_logits = dev.f32();
  EXPECT_THROW(model_forward(*m, opq, b, t.data(), 1, host.data(), false, both), Error);  // one destination
}

TEST_F(OpaqueForward, SaveLoadCloneAndBatchOnOpaqueMemory) {
  auto m = Model::load(path_);
  test::OpaqueBackend opq;
  const auto t = tokens(36);
  const ModelConfig& c = m->config();
  const int V = c.n_vocab;
  SequenceState ref, part, restored;
  ref.init(c, 64, &opq);
  part.init(c, 64, &opq);
  restored.init(c, 64, &opq);
  std::vector<float> lr(size_t(36) * V), lp(size_t(13) * V);
  model_forward(*m, opq, ref, t.data(), 36, lr.data(), true, {});
  model_forward(*m, opq, part, t.data(), 23, nullptr, false, {});
  std::stringstream ss;
  part.save(ss);
  restored.load(ss);          // upload into opaque memory
  SequenceState fork = part;  // clone: backend-side copy
  model_forward(*m, opq, restored, t.data() + 23, 13, lp.data(), true, {});
  expect_bitwise(std::vector<float>(lr.begin() + 23 * V, lr.end()), lp);
  // Two sessions in one batch (the fork and the original continue with the same tokens).
  BatchSlice sl[2] = {{&part, 13}, {&fork, 13}};
  std::vector<int32_t> both(t.begin() + 23, t.end());
  both.insert(both.end(), t.begin() + 23, t.end());
  std::vector<float> lb(size_t(2) * V);
  model_forward_batch(*m, opq, sl, both.data(), lb.data(), false, {});
  for (int s = 0; s < 2; ++s)
    EXPECT_EQ(std::memcmp(lb.data() + size_t(s) * V, lr.data() + size_t(35) * V, size_t(V) * sizeof(float)), 0);
  EXPECT_EQ(saved(part), saved(restored));
}

TEST_F(OpaqueForward, TapGetsHostCopiesAndMixedBackendsAreRejected) {
  auto m = Model::load(path_);
  test::OpaqueBackend opq;
  auto cpu = make_cpu_backend();
  const auto t = tokens(5);
  SequenceState st, host_st;
  st.init(m->config(), 16, &opq);
  host_st.init(m->config(), 16);  // host_backend() memory
  ForwardOptions o;
  double sum = 0;
  int calls = 0;
  o.tap = [&](const char*, int, const float* p, int rows, int64_t width) {
    for (int64_t i = 0; i < rows * width; ++i) sum += p[i];  // host-readable: would segfault otherwise
    ++calls;
  };
  std::vector<float> logits(size_t(m->config().n_vocab));
  model_forward(*m, opq, st, t.data(), 5, logits.data(), false, o);
  EXPECT_EQ(calls, 1 + 4 * 5 + 1);  // embed, 4 layers x 5 taps, head_in
  EXPECT_TRUE(std::isfinite(sum));
  // A state in host memory cannot run on the opaque backend, nor an opaque state on the CPU.
  EXPECT_THROW(model_forward(*m, opq, host_st, t.data(), 5, logits.data(), false, {}), Error);
  EXPECT_THROW(model_forward(*m, *cpu, st, t.data(), 1, logits.data(), false, {}), Error);
  EXPECT_EQ(host_st.n_past, 0);
}

}  // namespace
}  // namespace dsv4
