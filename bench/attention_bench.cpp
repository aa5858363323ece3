// Attention sublayer speed at DeepSeek-V4-Flash shape on the CPU: one decode token (and a short prefill chunk)
// of a sliding, a CSA (m=4, indexer active) and an HCA (m=128) layer at a given context, with ds4's q2/q4
// storage types (projections Q8_0; compressor and indexer matrices F16; vectors F32).
//
//   build/<dir>/attention_bench [context=4096] [threads=0: all]
//
// The context's state (window ring, compressed and indexer rows, compressor buffers) is filled with random
// rows instead of being prefilled, so a long context costs no set-up time; speed does not depend on the values.
// Matrices are tiled from a few quantized Gaussian rows (content does not change kernel speed).
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "common/thread_pool.h"
#include "model/attention.h"
#include "model/config.h"
#include "quant/quant.h"

using namespace dsv4;

namespace {

struct Store {
  std::vector<std::vector<uint8_t>> bytes;
  std::mt19937 rng{1};

  WeightView matrix(QType t, int64_t cols, int64_t rows, const char* name) {
    std::normal_distribution<float> nd(0.f, 1.f / std::sqrt(float(cols)));
    const int64_t rb = row_bytes(t, cols), seed_rows = 8;
    std::vector<float> f(static_cast<size_t>(cols));
    std::vector<uint8_t> seed(size_t(seed_rows * rb));
    for (int64_t r = 0; r < seed_rows; ++r) {
      for (auto& v : f) v = nd(rng);
      quantize_row(t, f.data(), seed.data() + r * rb, cols);
    }
    bytes.emplace_back(size_t(rows * rb));
    for (int64_t r = 0; r < rows; ++r)
      std::copy_n(seed.data() + (r % seed_rows) * rb, rb, bytes.back().data() + r * rb);
    WeightView w;
    w.type = t;
    w.data = bytes.back().data();
    w.ne[0] = cols;
    w.ne[1] = rows;
    w.n_dims = 2;
    w.n_bytes = bytes.back().size();
    w.name = name;
    return w;
  }
  WeightView vec(int64_t n, float offset, float scale, const char* name) {
    std::normal_distribution<float> nd(0.f, 1.f);
    bytes.emplace_back(size_t(n) * 4);
    float* p = reinterpret_cast<float*>(bytes.back().data());
    for (int64_t i = 0; i < n; ++i) p[i] = offset + scale * nd(rng);
    WeightView w;
    w.type = QType::F32;
    w.data = p;
    w.ne[0] = n;
    w.n_dims = 1;
    w.n_bytes = size_t(n) * 4;
    w.name = name;
    return w;
  }
};

AttentionWeights make_weights(Store& s, const AttentionShape& sh) {
  const int64_t D = sh.d_model, qd = int64_t(sh.n_heads) * sh.head_dim;
  AttentionWeights w;
  w.q_a = s.matrix(QType::Q8_0, D, sh.q_rank, "q_a");
  w.q_a_norm = s.vec(sh.q_rank, 1.f, 0.1f, "q_a_norm");
  w.q_b = s.matrix(QType::Q8_0, sh.q_rank, qd, "q_b");
  w.kv = s.matrix(QType::Q8_0, D, sh.head_dim, "kv");
  w.kv_norm = s.vec(sh.head_dim, 1.f, 0.1f, "kv_norm");
  w.sinks = s.vec(sh.n_heads, 0.f, 1.f, "sinks");
  w.output_a = s.matrix(QType::Q8_0, qd / sh.o_groups, int64_t(sh.o_groups) * sh.o_rank, "output_a");
  w.output_b = s.matrix(QType::Q8_0, int64_t(sh.o_groups) * sh.o_rank, D, "output_b");
  auto comp = [&](int width, int dim) {
    CompressorWeights c;
    c.kv = s.matrix(QType::F16, D, width, "comp_kv");
    c.gate = s.matrix(QType::F16, D, width, "comp_gate");
    c.ape = s.vec(int64_t(sh.ratio) * width, 0.f, 0.5f, "ape");
    c.norm = s.vec(dim, 1.f, 0.1f, "comp_norm");
    return c;
  };
  if (sh.has_compressor()) w.compressor = comp((sh.has_indexer() ? 2 : 1) * sh.head_dim, sh.head_dim);
  if (sh.has_indexer()) {
    w.indexer.q_b = s.matrix(QType::F16, sh.q_rank, int64_t(sh.idx_heads) * sh.idx_dim, "idx_q_b");
    w.indexer.proj = s.matrix(QType::F16, D, sh.idx_heads, "idx_proj");
    w.indexer.compressor = comp(2 * sh.idx_dim, sh.idx_dim);
  }
  return w;
}

// A state as if `ctx` tokens had been consumed (random rows), uploaded into the state's backend memory.
void fill_state(AttentionState& st, int64_t ctx, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.f, 1.f);
  auto randomize = [&](Backend* be, DeviceBuffer& b) {
    std::vector<float> h(b.bytes() / sizeof(float));
    for (auto& v : h) v = nd(rng);
    if (!h.empty()) be->upload(b.data(), h.data(), b.bytes());
  };
  randomize(st.be, st.window);
  auto fill = [&](CompressorState& c) {
    c.reserve(ctx / c.ratio);
    c.n_rows = ctx / c.ratio;
    for (DeviceBuffer* b : {&c.rows, &c.cur_v, &c.cur_z, &c.prev_v, &c.prev_z}) randomize(c.be, *b);
  };
  if (st.shape.has_compressor()) fill(st.comp);
  if (st.shape.has_indexer()) fill(st.idx_comp);
  st.n_past = ctx;
}

double time_call(const AttentionWeights& w, const AttentionState& base, int T, int reps, std::mt19937& rng) {
  const int D = base.shape.d_model;
  std::vector<float> x(size_t(T) * D), out(size_t(T) * D);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (auto& v : x) v = nd(rng);
  std::vector<int64_t> pos(static_cast<size_t>(T));
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    AttentionState st = base;
    for (int t = 0; t < T; ++t) pos[size_t(t)] = st.n_past + t;
    auto t0 = std::chrono::steady_clock::now();
    attention_forward(w, st, x.data(), pos.data(), T, out.data(), AttentionOptions{});
    auto t1 = std::chrono::steady_clock::now();
    best = std::min(best, std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t ctx = argc > 1 ? std::atoll(argv[1]) : 4096;
  const int threads = argc > 2 ? std::atoi(argv[2]) : 0;
  if (threads > 0) default_thread_pool().set_n_threads(threads);
  ModelConfig c = ModelConfig::flash();
  std::printf("DeepSeek-V4-Flash attention sublayer, CPU, %d threads, context %lld (best of 3)\n",
              default_thread_pool().n_threads(), (long long)ctx);
  std::printf("%-8s %12s %16s %16s\n", "layer", "weights MB", "decode ms/token", "prefill32 ms/tok");
  std::mt19937 rng(3);
  for (int layer : {0, 2, 3}) {  // sliding, CSA, HCA
    AttentionShape sh = attention_shape(c, layer, ctx + 64);
    Store s;
    AttentionWeights w = make_weights(s, sh);
    size_t mb = 0;
    for (auto& b : s.bytes) mb += b.size();
    AttentionState st(sh);
    fill_state(st, ctx, rng);
    double dec = time_call(w, st, 1, 3, rng);
    double pre = time_call(w, st, 32, 3, rng) / 32;
    const char* kind = sh.ratio == 0 ? "sliding" : (sh.ratio == 4 ? "CSA" : "HCA");
    std::printf("%-8s %12.1f %16.2f %16.2f\n", kind, double(mb) / 1e6, dec, pre);
  }
  return 0;
}
