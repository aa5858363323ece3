// The whole forward on the CUDA backend, with activations and session state in DEVICE memory, against the CPU
// backend on the synthetic tiny model (`dsv4 synth --shape tiny --mix f16`: Flash's layer kinds at toy widths,
// sliding / CSA with indexer / HCA (m = 128) / CSA, one hash layer, the real 129280-token vocabulary). 140 tokens
// so that the ring wraps (W = 32), the indexer really selects (16 of up to 35 rows) and the HCA layer emits its
// first row (position 127). Covered: prefill, token-by-token decode, chunked prefill, a batch of two sessions,
// save/load through download/upload (and across backends), clone.
//
// Tolerances (worst logits row, rel-L2; state buffers, rel-L2 each, non-finite entries identical):
//  * QAT off, GEMMs off (DSV4_CUDA_GEMM=0): 1e-4. The f16 mix never quantizes activations (F16 weights read fp32
//    inputs), so the backends differ by fp32 summation order only (~1e-7 per op, ~5e-7 per attention row,
//    docs/cuda.md) and the f16 tiny model does not amplify that (TinyModelConditioning: < 1e-6).
//  * QAT on: 5e-3. Our explanation (not isolated op by op): the indexer scores FP4-rounded queries and keys
//    (model-spec §3.4), few distinct products, so scores tie exactly or to an ulp and a 1-ulp difference between
//    the two backends' sums can swap which of two rows is selected; the FP8 rounding of KV and compressed rows
//    then turns later 1e-7 differences into whole grid steps on some elements. Measured on an H200 (tree 9360137): worst row 6.4e-4, compressed rows
//    of layer 3 9.3e-4, argmax 140/140 (QAT on was the only case of that run); CUDA decode/chunks vs CUDA whole
//    prefill 2.5e-7. The QAT-off case was not yet run on a GPU: its bound is the expectation above.
//  * GEMMs on (prefill passes of >= 16 tokens on the tensor cores, gemm.h): activations rounded to FP16 (unit
//    roundoff 4.9e-4) where the CPU keeps fp32, so ~3e-4 relative per projection. Differences of that size can
//    flip a near-tie in the router's top-2 of 8 experts for some token and layer, which changes that row (and
//    later rows through the state) by far more, so this case is checked statistically: the MEDIAN row within
//    2e-2 and argmax agreement on >= 90% of rows, no state value comparison (sizes only). A wrong GEMM (rows,
//    slots, tiles) breaks every prefill row and fails both. Not yet measured on a GPU.
// A wrong op, a stale ring slot, a lost state row or a wrong position moves rows by far more (>= 1e-1 typically).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <sstream>
#include <string>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "backend/cuda/cuda_backend.h"
#include "convert/synth.h"
#include "model/forward.h"
#include "model/model.h"
#include "ops_common.h"

namespace dsv4 {
namespace {

struct Case {
  bool qat, gemm;
  double tol;
  const char* what;
  bool statistical = false;  // median row and argmax agreement instead of the worst row (see the top)
};
constexpr Case kExact{false, false, 1e-4, "qat off, gemm off"};
constexpr Case kQat{true, false, 5e-3, "qat on, gemm off"};
constexpr Case kGemm{false, true, 2e-2, "qat off, gemm on", true};

// A CUDA backend with the prefill GEMMs on or off (the backend reads DSV4_CUDA_GEMM when it is made).
std::unique_ptr<Backend> cuda_backend(bool gemm) {
  if (!gemm) setenv("DSV4_CUDA_GEMM", "0", 1);
  auto be = make_cuda_backend();
  unsetenv("DSV4_CUDA_GEMM");
  return be;
}
constexpr int kN = 140, kPrefill = 100, kDecode = 10;  // then one chunk of kN - kPrefill - kDecode tokens

class CudaDeviceForward : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!cuda::device_available()) return;
    path_ = (std::filesystem::temp_directory_path() / ("dsv4-devfwd-" + std::to_string(::getpid()) + ".gguf")).string();
    SynthOptions o;
    o.shape = "tiny", o.mix = Mix::F16, o.out_path = path_;
    synth_model(o);
    model_ = Model::load(path_).release();
  }
  static void TearDownTestSuite() {
    delete model_;
    model_ = nullptr;
    if (!path_.empty()) std::remove(path_.c_str());
  }
  static std::string path_;
  static Model* model_;
};
std::string CudaDeviceForward::path_;
Model* CudaDeviceForward::model_ = nullptr;

std::vector<int32_t> tokens(int n) {
  std::vector<int32_t> t;
  for (int i = 0; i < n; ++i) t.push_back(int32_t((int64_t(i) * 7919 + 13) % 129000));
  return t;
}

// Prefill of kPrefill tokens (all rows), kDecode single-token decodes, then the rest as one chunk (all rows).
std::vector<float> run(const Model& m, Backend& be, SequenceState& st, const std::vector<int32_t>& t,
                       const ForwardOptions& o) {
  const size_t V = size_t(m.config().n_vocab);
  std::vector<float> all(size_t(kPrefill) * V), one(V);
  model_forward(m, be, st, t.data(), kPrefill, all.data(), true, o);
  for (int i = kPrefill; i < kPrefill + kDecode; ++i) {
    model_forward(m, be, st, t.data() + i, 1, one.data(), false, o);
    all.insert(all.end(), one.begin(), one.end());
  }
  const int rest = kN - kPrefill - kDecode;
  std::vector<float> last(size_t(rest) * V);
  model_forward(m, be, st, t.data() + kPrefill + kDecode, rest, last.data(), true, o);
  all.insert(all.end(), last.begin(), last.end());
  return all;
}

// Per-row rel-L2 of logits rows [row0, row0 + n) of `got` against the same rows of `ref` (ref_row0 offset).
std::vector<double> row_errors(const std::vector<float>& got, size_t got_row0, const std::vector<float>& ref,
                               size_t ref_row0, size_t n, size_t V) {
  std::vector<double> e;
  for (size_t r = 0; r < n; ++r)
    e.push_back(test::rel_l2(std::span<const float>(got.data() + (got_row0 + r) * V, V),
                             std::span<const float>(ref.data() + (ref_row0 + r) * V, V)));
  return e;
}
double worst_row(const std::vector<float>& got, size_t got_row0, const std::vector<float>& ref, size_t ref_row0,
                 size_t n, size_t V) {
  const auto e = row_errors(got, got_row0, ref, ref_row0, n, V);
  return *std::max_element(e.begin(), e.end());
}
double median_row(const std::vector<float>& got, const std::vector<float>& ref, size_t n, size_t V) {
  auto e = row_errors(got, 0, ref, 0, n, V);
  std::nth_element(e.begin(), e.begin() + e.size() / 2, e.end());
  return e[e.size() / 2];
}

std::vector<float> host_copy(const DeviceBuffer& b, size_t n_floats) {
  std::vector<float> v(n_floats);
  if (n_floats) b.backend()->download(v.data(), b.data(), n_floats * sizeof(float));
  return v;
}

// Buffer comparison: non-finite entries identical, the finite ones within rel-L2 tol. Returns the rel-L2.
double compare_buffer(const DeviceBuffer& a, const DeviceBuffer& b, size_t n, double tol, const std::string& what) {
  const auto x = host_copy(a, n), y = host_copy(b, n);
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) {
    if (!std::isfinite(x[i]) || !std::isfinite(y[i])) {
      EXPECT_EQ(std::memcmp(&x[i], &y[i], 4), 0) << what << " element " << i << ": " << x[i] << " vs " << y[i];
      continue;
    }
    num += (double(x[i]) - y[i]) * (double(x[i]) - y[i]);
    den += double(y[i]) * y[i];
  }
  const double e = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  EXPECT_LE(e, tol) << what;
  return e;
}

void compare_compressor(const CompressorState& g, const CompressorState& c, double tol, const std::string& what,
                        double& worst) {
  ASSERT_EQ(g.n_rows, c.n_rows) << what;
  const size_t cur = size_t(g.ratio) * g.width(), prev = g.overlap ? size_t(g.ratio) * g.dim : 0;
  worst = std::max(worst, compare_buffer(g.cur_v, c.cur_v, cur, tol, what + " cur_v"));
  worst = std::max(worst, compare_buffer(g.cur_z, c.cur_z, cur, tol, what + " cur_z"));
  if (prev) {
    worst = std::max(worst, compare_buffer(g.prev_v, c.prev_v, prev, tol, what + " prev_v"));
    worst = std::max(worst, compare_buffer(g.prev_z, c.prev_z, prev, tol, what + " prev_z"));
  }
  worst = std::max(worst, compare_buffer(g.rows, c.rows, size_t(g.n_rows) * g.dim, tol, what + " rows"));
}

double compare_states(const SequenceState& g, const SequenceState& c, double tol) {
  EXPECT_EQ(g.n_past, c.n_past);
  double worst = 0;
  for (size_t l = 0; l < g.layers.size(); ++l) {
    const AttentionState &a = g.layers[l], &b = c.layers[l];
    const std::string what = "layer " + std::to_string(l);
    EXPECT_EQ(a.n_past, b.n_past) << what;
    EXPECT_EQ(a.window.bytes(), b.window.bytes()) << what;
    worst = std::max(worst, compare_buffer(a.window, b.window, b.window.bytes() / 4, tol, what + " window"));
    if (a.shape.has_compressor()) compare_compressor(a.comp, b.comp, tol, what + " comp", worst);
    if (a.shape.has_indexer()) compare_compressor(a.idx_comp, b.idx_comp, tol, what + " indexer", worst);
  }
  return worst;
}

std::string saved(const SequenceState& st) {
  std::stringstream ss;
  st.save(ss);
  return ss.str();
}

void prefill_decode_chunks(const Model& m, const Case& k) {
  const size_t V = size_t(m.config().n_vocab);
  auto cpu = make_cpu_backend();
  auto gpu = cuda_backend(k.gemm);
  ASSERT_FALSE(gpu->host_memory());
  const auto t = tokens(kN);
  SequenceState sc, sg;
  sc.init(m.config(), 256, cpu.get());
  sg.init(m.config(), 256, gpu.get());
  ForwardOptions oc;
  oc.qat_sim = k.qat;
  const auto lc = run(m, *cpu, sc, t, oc);
  ForwardScratch scratch;  // reused across calls, as the engine does
  ForwardOptions o = oc;
  o.scratch = &scratch;
  const auto lg = run(m, *gpu, sg, t, o);
  ASSERT_EQ(lg.size(), lc.size());
  const double e_pre = worst_row(lg, 0, lc, 0, kPrefill, V);
  const double e_dec = worst_row(lg, kPrefill, lc, kPrefill, kDecode, V);
  const double e_chunk = worst_row(lg, kPrefill + kDecode, lc, kPrefill + kDecode, kN - kPrefill - kDecode, V);
  int agree = 0;
  for (size_t r = 0; r < size_t(kN); ++r)
    agree += test::argmax(std::span<const float>(lg.data() + r * V, V)) ==
             test::argmax(std::span<const float>(lc.data() + r * V, V));
  const double e_med = median_row(lg, lc, kN, V);
  std::printf("[%s] cuda vs cpu logits, worst row rel-L2: prefill %.2e decode %.2e chunk %.2e; median row %.2e; "
              "argmax agree %d/%d\n", k.what, e_pre, e_dec, e_chunk, e_med, agree, kN);
  if (k.statistical) {
    EXPECT_LE(e_med, k.tol) << k.what;
    EXPECT_GE(agree, kN * 9 / 10) << k.what;
  } else {
    EXPECT_LE(e_pre, k.tol) << k.what;
    EXPECT_LE(e_dec, k.tol) << k.what;
    EXPECT_LE(e_chunk, k.tol) << k.what;
    const double es = compare_states(sg, sc, k.tol);
    std::printf("[%s] state buffers, worst rel-L2 %.2e\n", k.what, es);
  }
  EXPECT_EQ(saved(sg).size(), saved(sc).size());  // same byte layout

  // Decode/chunks == whole prefill on the device: one 140-token prefill of a fresh session gives the same rows.
  SequenceState one;
  one.init(m.config(), 256, gpu.get());
  std::vector<float> lp(size_t(kN) * V);
  model_forward(m, *gpu, one, t.data(), kN, lp.data(), true, o);
  const double e_same = k.statistical ? median_row(lg, lp, kN, V) : worst_row(lg, 0, lp, 0, kN, V);
  std::printf("[%s] cuda decode/chunks vs cuda whole prefill: %s row rel-L2 %.2e\n", k.what,
              k.statistical ? "median" : "worst", e_same);
  EXPECT_LE(e_same, k.tol) << k.what;
}

TEST_F(CudaDeviceForward, PrefillDecodeChunksMatchCpuExact) {
  DSV4_REQUIRE_CUDA();
  prefill_decode_chunks(*model_, kExact);
}
TEST_F(CudaDeviceForward, PrefillDecodeChunksMatchCpuQat) {
  DSV4_REQUIRE_CUDA();
  prefill_decode_chunks(*model_, kQat);
}
TEST_F(CudaDeviceForward, PrefillDecodeChunksMatchCpuGemm) {
  DSV4_REQUIRE_CUDA();
  prefill_decode_chunks(*model_, kGemm);
}

// QAT off and the GEMMs off, so every comparison can be tight (kExact).
TEST_F(CudaDeviceForward, SaveLoadCloneAndBatch) {
  DSV4_REQUIRE_CUDA();
  const Model& m = *model_;
  const ModelConfig& c = m.config();
  const size_t V = size_t(c.n_vocab);
  auto cpu = make_cpu_backend();
  auto gpu = cuda_backend(false);
  const double kTol = kExact.tol;
  ForwardOptions o;
  o.qat_sim = false;
  const auto t = tokens(kN);
  const int cut = 83, rest = kN - cut;
  SequenceState ref, part, restored;
  ref.init(c, 256, gpu.get());
  part.init(c, 256, gpu.get());
  restored.init(c, 256, gpu.get());
  std::vector<float> lr(size_t(kN) * V), lp(size_t(rest) * V);
  model_forward(m, *gpu, ref, t.data(), kN, lr.data(), true, o);
  model_forward(m, *gpu, part, t.data(), cut, nullptr, false, o);
  std::stringstream ss;
  part.save(ss);
  const std::string bytes = ss.str();
  restored.load(ss);          // upload into device memory
  SequenceState fork = part;  // clone: device-side copy
  EXPECT_EQ(saved(restored), bytes);
  EXPECT_EQ(saved(fork), bytes);
  model_forward(m, *gpu, restored, t.data() + cut, rest, lp.data(), true, o);
  EXPECT_LE(worst_row(lp, 0, lr, size_t(cut), size_t(rest), V), kTol);

  // Two sessions in one batch (the fork and the original continue with the same tokens): the two rows are the
  // same computation (bitwise) and match the single-session rows.
  BatchSlice sl[2] = {{&part, rest}, {&fork, rest}};
  std::vector<int32_t> both(t.begin() + cut, t.end());
  both.insert(both.end(), t.begin() + cut, t.end());
  std::vector<float> lb(size_t(2) * V);
  model_forward_batch(m, *gpu, sl, both.data(), lb.data(), false, o);
  EXPECT_EQ(std::memcmp(lb.data(), lb.data() + V, V * sizeof(float)), 0);
  EXPECT_LE(worst_row(lb, 0, lr, size_t(kN - 1), 1, V), kTol);

  // Across backends: the device state saved and loaded into a CPU session continues like the CPU's own.
  SequenceState on_cpu, cpu_ref;
  on_cpu.init(c, 256, cpu.get());
  cpu_ref.init(c, 256, cpu.get());
  std::stringstream s2(bytes);
  on_cpu.load(s2);
  std::vector<float> lx(size_t(rest) * V), lcr(size_t(kN) * V);
  model_forward(m, *cpu, on_cpu, t.data() + cut, rest, lx.data(), true, o);
  model_forward(m, *cpu, cpu_ref, t.data(), kN, lcr.data(), true, o);
  EXPECT_LE(worst_row(lx, 0, lcr, size_t(cut), size_t(rest), V), kTol);
}

}  // namespace
}  // namespace dsv4
