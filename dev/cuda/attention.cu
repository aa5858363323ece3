// Workbench: attention-sublayer kernels at DeepSeek-V4-Flash decode shapes, against the bytes-moved roofline.
//
//   wb_attention [--csv FILE] [--quick]
//
// Decode cases are bytes-bound (GB/s against the read roofline); prefill cases (names *_prefill_T<T>) are one
// pass of T tokens ending at context ctx, timed eagerly (median of 5): attention rows give GFLOP/s (4 H dh per
// query-row pair), the other prefill rows' rate column is nominal bytes moved.

// Measures the card's streaming-read bandwidth first (16-byte loads over 1 GiB), then times each case as a CUDA
// graph of 32 launches (the decode-step setting: no launch gaps) and eagerly. Every case rotates over enough
// per-layer copies of its KV / key buffers (>= 256 MiB, <= 128 copies) that L2 never serves the previous
// launch's rows, as in a real decode where 43 layers' KV passes between two uses of a layer. Bytes counted: KV or
// key rows read once + queries + outputs (+ split partials written and read back for split attention).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "backend/cuda/attention.h"
#include "backend/cuda/attention_rows.h"
#include "backend/cuda/compressor.h"
#include "backend/cuda/cuda_util.h"
#include "backend/cuda/indexer.h"
#include "common/error.h"
#include "wb_common.cuh"

using namespace dsv4;
using namespace dsv4::cuda;

namespace {

constexpr int H = 64, DH = 512, W = 128, K = 512, HI = 64, DI = 128;

__global__ void fill_kernel(float* p, size_t n, uint32_t seed) {
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t x = uint32_t(i) * 0x9E3779B9u ^ seed;
    x ^= x >> 16, x *= 0x7FEB352Du, x ^= x >> 15, x *= 0x846CA68Bu, x ^= x >> 16;
    p[i] = float(int(x & 0xFFFF) - 32768) * (1.0f / 16384.0f);  // uniform in [-2, 2)
  }
}
void fill(float* p, size_t n, uint32_t seed) {
  fill_kernel<<<1024, 256>>>(p, n, seed);
  check_launch("fill_kernel");
}

// Puts the first dh - 64 dims of each row on a 4-significant-bit grid (the FP8 e4m3 mantissa), as the model's
// QAT'd KV rows; the 64 rotary dims keep full precision.
__global__ void fp8_grid_kernel(float* p, size_t n, int dh) {
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    if (int(i % dh) >= dh - 64) continue;
    int e;
    const float m = frexpf(p[i], &e);
    p[i] = ldexpf(rintf(m * 16.0f) / 16.0f, e);
  }
}
void fp8_grid(float* p, size_t n, int dh) {
  fp8_grid_kernel<<<1024, 256>>>(p, n, dh);
  check_launch("fp8_grid_kernel");
}

double read_bandwidth_gbs() {
  const size_t bytes = size_t(1) << 30;
  DeviceArray<uint4> buf(bytes / 16);
  DeviceArray<unsigned> sink(1);
  buf.fill_bytes(1);
  const float ms = mean_ms([&] { read_kernel<<<132 * 8, 512>>>(buf.get(), bytes / 16, sink.get()); }, 10);
  return double(bytes) / (ms * 1e-3) / 1e9;
}

// Times `launch(copy)` for copies 0..n_copies-1 in turn: eager per launch, and as a graph of 32 launches.
struct Timing {
  double us_graph, us_eager;
};
Timing time_case(int n_copies, const std::function<void(int, cudaStream_t)>& launch) {
  cudaStream_t s;
  check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "stream");
  int next = 0;
  const float eager = mean_ms([&] { launch(next++ % n_copies, s); }, 64, s);
  cudaGraph_t g;
  cudaGraphExec_t ge;
  check(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), "begin capture");
  for (int i = 0; i < 32; ++i) launch(i % n_copies, s);
  check(cudaStreamEndCapture(s, &g), "end capture");
  check(cudaGraphInstantiate(&ge, g, 0), "instantiate");
  const float graph = mean_ms([&] { check(cudaGraphLaunch(ge, s), "graph launch"); }, 20, s);
  check(cudaStreamSynchronize(s), "sync");
  cudaGraphExecDestroy(ge), cudaGraphDestroy(g), cudaStreamDestroy(s);
  return {graph * 1e3 / 32, eager * 1e3};
}

int copies_for(size_t bytes_per_copy) {
  return int(std::clamp<size_t>((size_t(256) << 20) / std::max<size_t>(bytes_per_copy, 1) + 1, 2, 128));
}

struct Row {
  std::string name;
  int64_t ctx;
  double bytes, us_graph, us_eager;
};

// Decode attention of one token at context ctx: CSA (window + 512 selected of ctx/4) or HCA (window + ctx/128).
// rps: rows per split (0 = the library's choice). Bytes are the compulsory ones (rows, q, out); the split
// partials (written and read back through L2) are not counted.
Row attention_case(int64_t ctx, int ratio, int rps = 0) {
  const int64_t n_comp = ctx / ratio;
  const size_t comp_f = size_t(n_comp) * DH, ring_f = size_t(W) * DH;
  const int n = copies_for((comp_f + ring_f) * 4);
  DeviceArray<float> comp(comp_f * n), ring(ring_f * n), q(size_t(H) * DH), kv(DH), out(size_t(H) * DH), sinks(H);
  fill(comp.get(), comp.size(), 1), fill(ring.get(), ring.size(), 2), fill(q.get(), q.size(), 3);
  fill(kv.get(), kv.size(), 4), fill(sinks.get(), sinks.size(), 5);
  std::vector<int32_t> sel(K);
  std::mt19937 rng(7);
  std::vector<int32_t> all(static_cast<size_t>(n_comp));
  for (int64_t i = 0; i < n_comp; ++i) all[size_t(i)] = int32_t(i);
  std::shuffle(all.begin(), all.end(), rng);
  const int n_sel = int(std::min<int64_t>(K, n_comp));
  std::sort(all.begin(), all.begin() + n_sel);
  std::copy_n(all.begin(), n_sel, sel.begin());
  DeviceArray<int32_t> d_sel{std::span<const int32_t>(sel)};
  SinkAttnLaunch L;
  L.q = q.get(), L.out = out.get(), L.sinks = sinks.get(), L.T = 1, L.H = H, L.dh = DH, L.pos0 = ctx - 1;
  L.window = W, L.kv_new = kv.get(), L.ring = ring.get(), L.comp = comp.get(), L.ratio = ratio;
  if (ratio == 4) L.comp_idx = d_sel.get(), L.top_k = K;
  L.rows_per_split = rps;
  const int64_t scratch_f = sink_attention_scratch_floats(L);
  DeviceArray<float> scratch(size_t(std::max<int64_t>(scratch_f, 1)));
  const Timing t = time_case(n, [&](int c, cudaStream_t s) {
    SinkAttnLaunch l = L;
    l.ring = ring.get() + c * ring_f, l.comp = comp.get() + c * comp_f;
    sink_attention_cuda(l, scratch.get(), s);
  });
  const int64_t rows = std::min<int64_t>(W, ctx) + (ratio == 4 ? n_sel : n_comp);
  const double bytes = double(rows) * DH * 4 + 2.0 * H * DH * 4;
  std::string name = ratio == 4 ? "attn_csa_decode" : "attn_hca_decode";
  if (rps) name += "_rps" + std::to_string(rps);
  return {name, ctx, bytes, t.us_graph, t.us_eager};
}

// Indexer decode at context ctx: scores over ctx/4 keys, top-512, ascending sort.
Row indexer_case(int64_t ctx, IndexerImpl impl = IndexerImpl::Auto) {
  const int64_t n_keys = ctx / 4;
  const size_t key_f = size_t(n_keys) * DI;
  const int n = copies_for(key_f * 4);
  DeviceArray<float> keys(key_f * n), q(size_t(HI) * DI), w(HI);
  fill(keys.get(), keys.size(), 11), fill(q.get(), q.size(), 12), fill(w.get(), w.size(), 13);
  DeviceArray<int32_t> sel(K);
  IndexerLaunch L;
  L.q = q.get(), L.w = w.get(), L.weight_scale = 1.0f / std::sqrt(float(HI * DI)), L.T = 1, L.HI = HI, L.dI = DI;
  L.pos0 = ctx - 1, L.ratio = 4, L.k = K, L.sel = sel.get(), L.impl = impl;
  DeviceArray<float> scratch(size_t(std::max<int64_t>(1, indexer_scratch_floats(L))));
  const Timing t = time_case(n, [&](int c, cudaStream_t s) {
    IndexerLaunch l = L;
    l.keys = keys.get() + c * key_f;
    indexer_select_cuda(l, scratch.get(), s);
  });
  const double bytes = double(key_f) * 4 + HI * DI * 4;  // keys + queries (scores round-trip L2, not counted)
  return {impl == IndexerImpl::TensorCore ? "indexer_decode_tc" : "indexer_decode", ctx, bytes, t.us_graph, t.us_eager};
}

// One decode token through the main ratio-4 compressor (dC 512, overlap, FP8) at a position that closes a window.
Row compressor_case() {
  const int m = 4, d = 512, cw = 2 * d;
  DeviceArray<float> v(cw), z(cw), ape(size_t(m) * cw), cv(size_t(m) * cw), cz(size_t(m) * cw), pv(size_t(m) * d),
      pz(size_t(m) * d), rows(size_t(4096) * d), norm(d);
  for (auto* a : {&v, &z, &ape, &cv, &cz, &pv, &pz, &norm}) fill(a->get(), a->size(), 21);
  CompressorStepParams p;
  p.ratio = m, p.dim = d, p.overlap = true, p.T = 1, p.v = v.get(), p.z = z.get(), p.ape = ape.get();
  p.cur_v = cv.get(), p.cur_z = cz.get(), p.prev_v = pv.get(), p.prev_z = pz.get(), p.rows = rows.get();
  p.max_rows = 4096, p.norm_w = norm.get(), p.n_rot = 64, p.qat = RowQat::Fp8;
  for (int j = 0; j < 32; ++j) p.omega[j] = std::pow(160000.0, -2.0 * j / 64);
  const Timing t = time_case(1, [&](int, cudaStream_t s) {
    CompressorStepParams q = p;
    q.pos0 = 8191;
    compressor_step_cuda(q, s);
  });
  return {"compressor_step_decode", 8192, double(cw) * 4 * 8, t.us_graph, t.us_eager};
}

// ---- prefill (per-layer op times of one T-token pass ending at context ctx): eager, median of 5 ----------
double time_prefill_us(const std::function<void()>& f) {
  f();
  check(cudaDeviceSynchronize(), "warmup");
  std::vector<float> ms;
  for (int i = 0; i < 5; ++i) ms.push_back(mean_ms(f, 1));
  std::sort(ms.begin(), ms.end());
  return ms[2] * 1e3;
}

const char* impl_name(SinkAttnImpl i) { return i == SinkAttnImpl::TensorCore ? "tc" : "fp32"; }

// Sink attention of T tokens at pos0 (CSA: window + 512 selected of the visible rows, HCA: window + all), with
// the kernel `impl`, KV rows on the FP8 grid in their non-rotary dims (qat_rows, the model's rows) or not. Returns GFLOP/s-style rows (flop = 4 * H * dh * rows summed over tokens). `out_copy`
// receives the output for the cross-check between the two kernels.
Row prefill_attention(int64_t pos0, int T, int ratio, SinkAttnImpl impl, std::vector<float>* out_copy,
                      bool qat_rows = true) {
  const int64_t n_comp = (pos0 + T) / ratio;
  DeviceArray<float> comp(size_t(std::max<int64_t>(n_comp, 1)) * DH), ring(size_t(W) * DH), q(size_t(T) * H * DH),
      kv(size_t(T) * DH), out(size_t(T) * H * DH), sinks(H);
  fill(comp.get(), comp.size(), 31), fill(ring.get(), ring.size(), 32), fill(q.get(), q.size(), 33);
  fill(kv.get(), kv.size(), 34), fill(sinks.get(), sinks.size(), 35);
  if (qat_rows) fp8_grid(comp.get(), comp.size(), DH), fp8_grid(ring.get(), ring.size(), DH), fp8_grid(kv.get(), kv.size(), DH);
  std::vector<int32_t> sel(size_t(T) * K, 0);
  int64_t rows = 0;
  for (int t = 0; t < T; ++t) {
    const int64_t vis = (pos0 + t + 1) / ratio, n = ratio == 4 ? std::min<int64_t>(vis, K) : vis;
    if (ratio == 4)  // an ascending spread over the visible rows (the indexer's contract: ascending, distinct)
      for (int64_t i = 0; i < n; ++i) sel[size_t(t) * K + i] = int32_t(i * vis / n);
    rows += std::min<int64_t>(W, pos0 + t + 1) + n;
  }
  DeviceArray<int32_t> d_sel{std::span<const int32_t>(sel)};
  SinkAttnLaunch L;
  L.q = q.get(), L.out = out.get(), L.sinks = sinks.get(), L.T = T, L.H = H, L.dh = DH, L.pos0 = pos0;
  L.window = W, L.kv_new = kv.get(), L.ring = ring.get(), L.comp = comp.get(), L.ratio = ratio;
  if (ratio == 4) L.comp_idx = d_sel.get(), L.top_k = K;
  L.impl = impl;
  DeviceArray<float> scratch(size_t(std::max<int64_t>(1, sink_attention_scratch_floats(L))));
  const double us = time_prefill_us([&] { sink_attention_cuda(L, scratch.get(), nullptr); });
  if (out_copy) *out_copy = out.download();
  const std::string name = std::string(ratio == 4 ? "attn_csa" : "attn_hca") + "_prefill_T" + std::to_string(T) +
                           "_" + impl_name(impl) + (qat_rows ? "" : "_rawkv");
  return {name, pos0 + T, 4.0 * H * DH * double(rows), us, us};
}

// Both kernels on the same inputs; prints their largest output difference (a sanity check, the parity tests
// compare each with the CPU).
void prefill_attention_pair(int64_t pos0, int T, int ratio, std::vector<Row>& rows) {
  std::vector<float> a, b;
  rows.push_back(prefill_attention(pos0, T, ratio, SinkAttnImpl::CudaCore, &a));
  rows.push_back(prefill_attention(pos0, T, ratio, SinkAttnImpl::TensorCore, &b));
  if (T >= 1024 && pos0 > 0) rows.push_back(prefill_attention(pos0, T, ratio, SinkAttnImpl::TensorCore, nullptr, false));
  double d = 0, m = 0;
  for (size_t i = 0; i < a.size(); ++i) d = std::max(d, double(std::fabs(a[i] - b[i]))), m = std::max(m, double(std::fabs(a[i])));
  std::printf("  check T=%d ctx=%lld ratio=%d: max |tc - fp32| = %.3g (max |out| %.3g)\n", T, (long long)(pos0 + T),
              ratio, d, m);
}

// Indexer of T tokens ending at ctx: scores alone and the whole selection (scores + top-512 + sort).
void prefill_indexer(int64_t pos0, int T, std::vector<Row>& rows) {
  const int64_t n_keys = (pos0 + T) / 4;
  DeviceArray<float> keys(size_t(n_keys) * DI), q(size_t(T) * HI * DI), w(size_t(T) * HI);
  fill(keys.get(), keys.size(), 41), fill(q.get(), q.size(), 42), fill(w.get(), w.size(), 43);
  DeviceArray<int32_t> sel(size_t(T) * K);
  IndexerLaunch L;
  L.q = q.get(), L.w = w.get(), L.weight_scale = 1.0f / std::sqrt(float(HI * DI)), L.T = T, L.HI = HI, L.dI = DI;
  L.pos0 = pos0, L.ratio = 4, L.k = K, L.sel = sel.get(), L.keys = keys.get();
  DeviceArray<float> scratch(size_t(std::max<int64_t>(1, indexer_scratch_floats(L)))), scores(size_t(T) * n_keys);
  double flop = 0;
  for (int t = 0; t < T; ++t) flop += 2.0 * HI * DI * double((pos0 + t + 1) / 4);
  IndexerLaunch Lc = L;
  Lc.impl = IndexerImpl::CudaCore;
  const double us_fp32 = time_prefill_us([&] { indexer_scores_cuda(Lc, scores.get(), n_keys, nullptr); });
  std::vector<float> a = scores.download();
  IndexerLaunch Lt = L;
  Lt.impl = IndexerImpl::TensorCore;
  const double us_tc = time_prefill_us([&] { indexer_scores_cuda(Lt, scores.get(), n_keys, nullptr); });
  std::vector<float> b = scores.download();
  double d = 0, m = 0;
  for (size_t i = 0; i < a.size(); ++i)
    if (std::isfinite(a[i])) d = std::max(d, double(std::fabs(a[i] - b[i]))), m = std::max(m, double(std::fabs(a[i])));
  std::printf("  check indexer T=%d ctx=%lld: max |tc - fp32| = %.3g (max |score| %.3g)\n", T, (long long)(pos0 + T), d, m);
  const double us_all = time_prefill_us([&] { indexer_select_cuda(L, scratch.get(), nullptr); });
  rows.push_back({"indexer_scores_prefill_T" + std::to_string(T) + "_fp32", pos0 + T, flop, us_fp32, us_fp32});
  rows.push_back({"indexer_scores_prefill_T" + std::to_string(T) + "_tc", pos0 + T, flop, us_tc, us_tc});
  rows.push_back({"indexer_select_prefill_T" + std::to_string(T), pos0 + T, flop, us_all, us_all});
}

// Compressor pass of T tokens at pos0: main CSA (m 4, 512, overlap, FP8), HCA (m 128, 512, FP8), indexer
// (m 4, 128, overlap, Hadamard + FP4). "flop" column: bytes of the pass's inputs (v, z) and rows written.
void prefill_compressor(int64_t pos0, int T, std::vector<Row>& rows) {
  struct Cfg { const char* name; int m, d; bool ov; RowQat qat; };
  for (const Cfg& c : {Cfg{"compressor_csa", 4, 512, true, RowQat::Fp8}, Cfg{"compressor_hca", 128, 512, false, RowQat::Fp8},
                       Cfg{"compressor_idx", 4, 128, true, RowQat::Fp4Hadamard}}) {
    const int cw = c.ov ? 2 * c.d : c.d;
    const int64_t max_rows = (pos0 + T) / c.m;
    DeviceArray<float> v(size_t(T) * cw), z(size_t(T) * cw), ape(size_t(c.m) * cw), cv(size_t(c.m) * cw),
        cz(size_t(c.m) * cw), pv(size_t(c.m) * c.d), pz(size_t(c.m) * c.d), out_rows(size_t(max_rows) * c.d),
        norm(c.d);
    for (auto* a : {&v, &z, &ape, &cv, &cz, &pv, &pz, &norm}) fill(a->get(), a->size(), 51);
    CompressorStepParams p;
    p.ratio = c.m, p.dim = c.d, p.overlap = c.ov, p.T = T, p.pos0 = pos0, p.v = v.get(), p.z = z.get();
    p.ape = ape.get(), p.cur_v = cv.get(), p.cur_z = cz.get(), p.prev_v = pv.get(), p.prev_z = pz.get();
    p.rows = out_rows.get(), p.max_rows = max_rows, p.norm_w = norm.get(), p.n_rot = 64, p.qat = c.qat;
    for (int j = 0; j < 32; ++j) p.omega[j] = std::pow(160000.0, -2.0 * j / 64);
    const double us = time_prefill_us([&] { compressor_step_cuda(p, nullptr); });
    const double bytes = 2.0 * T * cw * 4 + double(T / c.m) * c.d * 4;
    rows.push_back({std::string(c.name) + "_prefill_T" + std::to_string(T), pos0 + T, bytes, us, us});
  }
}

// Row finishing of a pass: q heads (T x 64 rows of 512: unweighted norm + RoPE), the KV rows (T rows: norm, RoPE,
// FP8) and the indexer queries (T x 64 rows of 128: RoPE + Hadamard/FP4).
void prefill_rows(int64_t pos0, int T, std::vector<Row>& rows) {
  struct Cfg { const char* name; int per_pos, d; RowNorm norm; RowQat qat; };
  for (const Cfg& c : {Cfg{"rows_q_heads", H, DH, RowNorm::Unweighted, RowQat::None},
                       Cfg{"rows_kv_fp8", 1, DH, RowNorm::Weighted, RowQat::Fp8},
                       Cfg{"rows_idx_q_fp4", HI, DI, RowNorm::None, RowQat::Fp4Hadamard}}) {
    DeviceArray<float> x(size_t(T) * c.per_pos * c.d), w(c.d);
    fill(x.get(), x.size(), 61), fill(w.get(), w.size(), 62);
    RowFinishParams f;
    f.x = x.get(), f.n_rows = int64_t(T) * c.per_pos, f.d = c.d, f.norm = c.norm, f.norm_w = w.get();
    f.n_rot = 64, f.pos0 = pos0, f.rows_per_pos = c.per_pos, f.qat = c.qat;
    for (int j = 0; j < 32; ++j) f.omega[j] = std::pow(160000.0, -2.0 * j / 64);
    // In place: every repetition re-finishes already finished rows (same cost, values stay finite).
    const double us = time_prefill_us([&] { row_finish_cuda(f, nullptr); });
    rows.push_back({std::string(c.name) + "_prefill_T" + std::to_string(T), pos0 + T, 8.0 * x.size(), us, us});
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string csv_path;
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--csv") && i + 1 < argc) csv_path = argv[++i];
    else if (!std::strcmp(argv[i], "--quick")) quick = true;
  }
  try {
    if (!device_available()) {
      std::printf("no CUDA device\n");
      return 0;
    }
    const std::string card = device_description();
    const double bw = read_bandwidth_gbs();
    std::printf("%s\nstreaming read: %.0f GB/s\n\n", card.c_str(), bw);
    std::vector<Row> rows;
    for (int64_t ctx : {2048, 8192, 65536}) {
      rows.push_back(attention_case(ctx, 4));
      rows.push_back(attention_case(ctx, 128));
      rows.push_back(indexer_case(ctx));
      if (ctx > 2048) rows.push_back(indexer_case(ctx, IndexerImpl::TensorCore));
    }
    for (int rps : {64, 128, 320, 640}) rows.push_back(attention_case(65536, 4, rps));  // split-size sweep
    rows.push_back(compressor_case());
    // Prefill: passes of 256 and 1024 tokens ending at 1k..8k; the small-T sweep finds the kernels' crossover.
    std::vector<std::pair<int64_t, int>> passes = {{0, 256}, {3840, 256}, {7936, 256}, {0, 1024}, {3072, 1024},
                                                   {7168, 1024}};
    if (quick) passes = {{0, 256}, {7936, 256}, {0, 1024}, {7168, 1024}};
    for (auto [pos0, T] : passes) {
      prefill_attention_pair(pos0, T, 4, rows);
      prefill_attention_pair(pos0, T, 128, rows);
      prefill_indexer(pos0, T, rows);
    }
    for (int T : {1, 4, 16, 64}) prefill_attention_pair(8192 - T, T, 4, rows);
    prefill_compressor(7168, 1024, rows);
    prefill_rows(7168, 1024, rows);
    FILE* csv = csv_path.empty() ? nullptr : std::fopen(csv_path.c_str(), "w");
    if (csv) std::fprintf(csv, "card,case,ctx,bytes_or_flop,us_graph,us_eager,gbs_or_gflops,pct_read_bw\n");
    std::printf("%-26s %7s %12s %10s %10s %12s %8s\n", "case", "ctx", "bytes/flop", "us_graph", "us_eager",
                "GB/s|GFLOP/s", "%read");
    for (const Row& r : rows) {
      const bool flops = (r.name.find("attn_") == 0 || r.name.find("indexer_") == 0) &&
                         r.name.find("prefill") != std::string::npos;
      const double rate = r.bytes / (r.us_graph * 1e-6) / 1e9;
      const double pct = flops ? 0.0 : 100.0 * rate / bw;
      std::printf("%-26s %7lld %12.0f %10.2f %10.2f %12.1f %7.1f%%\n", r.name.c_str(), (long long)r.ctx, r.bytes,
                  r.us_graph, r.us_eager, rate, pct);
      if (csv)
        std::fprintf(csv, "\"%s\",%s,%lld,%.0f,%.3f,%.3f,%.1f,%.2f\n", card.c_str(), r.name.c_str(),
                     (long long)r.ctx, r.bytes, r.us_graph, r.us_eager, rate, pct);
    }
    if (csv) std::fclose(csv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "wb_attention: %s\n", e.what());
    return 1;
  }
  return 0;
}
