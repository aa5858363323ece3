#include "backend/cpu/cpu_backend.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>
#include <vector>

#include "backend/cpu/attention_cpu.h"
#include "backend/cpu/cpu_ops.h"
#include "common/error.h"
#include "common/thread_pool.h"
#include "quant/quant.h"

namespace dsv4 {

namespace {

// Sum of squares in double: sequential, so reproducible, and accurate enough that the fp32 result does not
// depend on the reduction length's rounding drift.
float rms_scale(const float* x, int64_t n, float eps) {
  double ss = 0.0;
  for (int64_t i = 0; i < n; ++i) ss += double(x[i]) * double(x[i]);
  return float(1.0 / std::sqrt(ss / double(n) + double(eps)));
}

const uint8_t* matrix_base(const WeightView& w, int expert) {
  const uint8_t* base = static_cast<const uint8_t*>(w.data);
  if (expert < 0) return base;
  if (w.n_dims < 3 || expert >= w.ne[2]) fail("matmul: tensor '%s' has no expert %d", w.name, expert);
  return base + size_t(expert) * size_t(w.ne[1]) * size_t(row_bytes(w.type, w.ne[0]));
}

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(ThreadPool* pool) : pool_(pool ? *pool : default_thread_pool()) {}
  const char* name() const override { return "cpu"; }

  // Backend memory is host memory: 64-byte aligned blocks (cache lines, AVX-512 loads).
  void* mem_alloc(size_t bytes) override { return ::operator new(bytes, std::align_val_t(64)); }
  void mem_free(void* p) noexcept override { ::operator delete(p, std::align_val_t(64)); }
  void upload(void* dst, const void* src, size_t bytes) override { copy(dst, src, bytes); }
  void download(void* dst, const void* src, size_t bytes) override { copy(dst, src, bytes); }
  void copy(void* dst, const void* src, size_t bytes) override {
    if (bytes) std::memmove(dst, src, bytes);
  }
  void fill(float* dst, float value, size_t n) override { std::fill(dst, dst + n, value); }
  bool host_memory() const override { return true; }

  void embed(const WeightView& e, const int32_t* tokens, int T, int n, float* X) override {
    const int64_t D = e.ne[0], V = e.ne[1];
    const int64_t rb = row_bytes(e.type, D);
    for (int t = 0; t < T; ++t)
      if (tokens[t] < 0 || tokens[t] >= V) fail("embed: token id %d at batch row %d outside [0, %lld)", tokens[t], t, (long long)V);
    pool_.parallel_for(T, [&](int64_t b, int64_t end) {
      for (int64_t t = b; t < end; ++t) {
        float* x = X + t * n * D;
        dequantize_row(e.type, static_cast<const uint8_t*>(e.data) + size_t(tokens[t]) * size_t(rb), x, D);
        for (int s = 1; s < n; ++s) std::memcpy(x + s * D, x, size_t(D) * sizeof(float));
      }
    });
  }

  void rms_norm(const float* x, const WeightView* w, int T, int64_t dim, float eps, float* y) override {
    const float* wf = (w && w->present()) ? w->f32() : nullptr;
    pool_.parallel_for(T, [&](int64_t b, int64_t end) {
      for (int64_t t = b; t < end; ++t) {
        const float* xr = x + t * dim;
        float* yr = y + t * dim;
        float s = rms_scale(xr, dim, eps);
        for (int64_t i = 0; i < dim; ++i) yr[i] = wf ? xr[i] * s * wf[i] : xr[i] * s;
      }
    });
  }

  void matmul(const WeightView& w, int expert, const float* x, int T, float* y) override {
    const int64_t cols = w.ne[0], rows = w.ne[1];
    const uint8_t* W = matrix_base(w, expert);
    const int64_t rb = row_bytes(w.type, cols);
    const int64_t ab = activation_bytes(w.type, cols);
    xq_.resize(size_t(ab) * size_t(T));
    uint8_t* xq = xq_.data();
    pool_.parallel_for(T, [&](int64_t b, int64_t end) {
      for (int64_t t = b; t < end; ++t) quantize_activation(w.type, x + t * cols, xq + t * ab, cols);
    });
    // Each y[t][r] is one vec_dot, so any partition gives the same bits. Split over rows when there are
    // enough of them (weight rows then stream once through the cache for all tokens), else over tokens.
    const bool by_rows = rows >= 4 * int64_t(pool_.n_threads()) || T == 1;
    pool_.parallel_for(by_rows ? rows : T, [&](int64_t b, int64_t end) {
      if (by_rows) {
        for (int64_t r = b; r < end; ++r)
          for (int64_t t = 0; t < T; ++t) y[t * rows + r] = vec_dot(w.type, W + r * rb, xq + t * ab, cols);
      } else {
        for (int64_t t = b; t < end; ++t)
          for (int64_t r = 0; r < rows; ++r) y[t * rows + r] = vec_dot(w.type, W + r * rb, xq + t * ab, cols);
      }
    });
  }

  void hc_pre(const HcWeights& w, const HcParams& p, const float* X, int T, float* a, float* post,
              float* comb) override {
    const int n = p.n, mixw = (2 + n) * n;
    const int64_t D = p.d;
    std::vector<float> mix(size_t(T) * mixw);
    matmul(w.fn, -1, X, T, mix.data());
    pool_.parallel_for(T, [&](int64_t b, int64_t end) {
      std::vector<float> pre(static_cast<size_t>(n)), m(static_cast<size_t>(mixw));
      for (int64_t t = b; t < end; ++t) {
        const float* x = X + t * n * D;
        float rs = rms_scale(x, n * D, p.norm_eps);
        for (int j = 0; j < mixw; ++j) m[size_t(j)] = mix[size_t(t * mixw + j)] * rs;
        cpu::hc_split(m.data(), w.base.f32(), w.scale.f32(), n, p.sinkhorn_iters, p.hc_eps, pre.data(),
                      post + t * n, comb + t * n * n);
        float* at = a + t * D;
        for (int64_t d = 0; d < D; ++d) {
          float s = 0.f;
          for (int i = 0; i < n; ++i) s += pre[size_t(i)] * x[i * D + d];
          at[d] = s;
        }
      }
    });
  }

  void hc_post(const HcParams& p, const float* y, const float* post, const float* comb, int T, float* X) override {
    const int n = p.n;
    const int64_t D = p.d;
    pool_.parallel_for(T, [&](int64_t b, int64_t end) {
      std::vector<float> xi(static_cast<size_t>(n));
      for (int64_t t = b; t < end; ++t) {
        float* x = X + t * n * D;
        const float* C = comb + t * n * n;
        const float* po = post + t * n;
        for (int64_t d = 0; d < D; ++d) {
          for (int i = 0; i < n; ++i) xi[size_t(i)] = x[i * D + d];
          for (int o = 0; o < n; ++o) {
            float s = po[o] * y[t * D + d];
            for (int i = 0; i < n; ++i) s += C[i * n + o] * xi[size_t(i)];
            x[o * D + d] = s;
          }
        }
      }
    });
  }

  void hc_head(const HcHeadWeights& w, const HcParams& p, const float* X, int T, float* h) override {
    const int n = p.n;
    const int64_t D = p.d;
    std::vector<float> mix(size_t(T) * n);
    matmul(w.fn, -1, X, T, mix.data());
    pool_.parallel_for(T, [&](int64_t b, int64_t end) {
      std::vector<float> wt(static_cast<size_t>(n));
      for (int64_t t = b; t < end; ++t) {
        const float* x = X + t * n * D;
        float rs = rms_scale(x, n * D, p.norm_eps);
        for (int i = 0; i < n; ++i)
          wt[size_t(i)] = cpu::sigmoid(mix[size_t(t * n + i)] * rs * w.scale.f32()[0] + w.base.f32()[i]) + p.hc_eps;
        for (int64_t d = 0; d < D; ++d) {
          float s = 0.f;
          for (int i = 0; i < n; ++i) s += wt[size_t(i)] * x[i * D + d];
          h[t * D + d] = s;
        }
      }
    });
  }

  void moe_route(const MoeWeights& w, const MoeParams& p, const float* x, const int32_t* tokens, int T,
                 int32_t* ids, float* weights) override;
  void moe_ffn(const MoeWeights& w, const MoeParams& p, const float* x, const int32_t* ids, const float* weights,
               int T, float* y) override;

  void matmul_grouped(const WeightView& w, int groups, const float* x, int T, float* y) override;
  void head_prep(float* x, int T, int H, int dim, const HeadPrep& p) override {
    cpu::head_prep(pool_, x, T, H, dim, p);
  }
  void compressor_step(const CompressorParams& p, const CompressorBuffers& s, const float* v, const float* z, int T,
                       int64_t p0) override {
    cpu::compressor_step(p, s, v, z, T, p0);
  }
  void indexer_topk(const IndexerParams& p, const float* qI, const float* wI, const float* keys, int T, int64_t p0,
                    int32_t* sel) override {
    cpu::indexer_topk(pool_, p, qI, wI, keys, T, p0, sel);
  }
  void sink_attention(const SinkAttnParams& p, const float* q, const float* kv_new, const float* ring,
                      const float* comp, const int32_t* sel, int T, int64_t p0, float* out) override {
    cpu::sink_attention(pool_, p, q, kv_new, ring, comp, sel, T, p0, out);
  }
  void window_store(float* ring, int W, int dim, const float* kv, int T, int64_t p0) override {
    cpu::window_store(ring, W, dim, kv, T, p0);
  }

 private:
  ThreadPool& pool_;
  std::vector<uint8_t> xq_;  // quantized activations scratch
};

void CpuBackend::moe_route(const MoeWeights& w, const MoeParams& p, const float* x, const int32_t* tokens, int T,
                           int32_t* ids, float* weights) {
  const int E = p.n_experts, k = p.n_used;
  std::vector<float> z(size_t(T) * E);
  matmul(w.gate_inp, -1, x, T, z.data());
  const float* bias = w.exp_probs_b.present() ? w.exp_probs_b.f32() : nullptr;
  if (p.hash) {
    const int64_t V = w.tid2eid.ne[1];
    const int32_t* table = static_cast<const int32_t*>(w.tid2eid.data);
    for (int t = 0; t < T; ++t) {
      if (tokens[t] < 0 || tokens[t] >= V)
        fail("moe_route: token id %d outside tensor '%s' ([0, %lld))", tokens[t], w.tid2eid.name, (long long)V);
      for (int j = 0; j < k; ++j) {
        int32_t e = table[int64_t(tokens[t]) * k + j];
        if (e < 0 || e >= E)
          fail("moe_route: tensor '%s' maps token %d to expert %d, outside [0, %d)", w.tid2eid.name, tokens[t], e, E);
      }
    }
  }
  pool_.parallel_for(T, [&](int64_t b, int64_t end) {
    std::vector<float> s(static_cast<size_t>(E));
    for (int64_t t = b; t < end; ++t) {
      for (int e = 0; e < E; ++e) s[size_t(e)] = cpu::sqrt_softplus(z[size_t(t * E + e)]);
      if (p.hash) {
        const int32_t* row = static_cast<const int32_t*>(w.tid2eid.data) + int64_t(tokens[t]) * k;
        std::memcpy(ids + t * k, row, size_t(k) * sizeof(int32_t));
        cpu::route_weights(s.data(), ids + t * k, k, p.weights_scale, weights + t * k);
      } else {
        cpu::route_topk(s.data(), bias, E, k, p.weights_scale, ids + t * k, weights + t * k);
      }
    }
  });
}

void CpuBackend::moe_ffn(const MoeWeights& w, const MoeParams& p, const float* x, const int32_t* ids,
                         const float* weights, int T, float* y) {
  const int E = p.n_experts, k = p.n_used;
  const int64_t D = p.d, F = p.ff;
  // Group the batch by expert so each expert's weights are read once per call; every (token, slot) output is
  // kept separately and summed per token in slot order afterwards, so the result is independent of grouping.
  std::vector<std::vector<int>> users(static_cast<size_t>(E));  // entries t*k + j
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < k; ++j) users[size_t(ids[t * k + j])].push_back(t * k + j);
  std::vector<float> ye(size_t(T) * k * D);
  std::vector<float> xs, g, u, h, out;
  for (int e = 0; e < E; ++e) {
    const auto& us = users[size_t(e)];
    if (us.empty()) continue;
    const int n = int(us.size());
    xs.resize(size_t(n) * D);
    g.resize(size_t(n) * F);
    u.resize(size_t(n) * F);
    out.resize(size_t(n) * D);
    for (int i = 0; i < n; ++i)
      std::memcpy(&xs[size_t(i) * D], x + int64_t(us[size_t(i)] / k) * D, size_t(D) * sizeof(float));
    matmul(w.gate_exps, e, xs.data(), n, g.data());
    matmul(w.up_exps, e, xs.data(), n, u.data());
    for (int i = 0; i < n; ++i) {
      float wt = weights[us[size_t(i)]];  // routing weight applied before the down projection (spec §7.4)
      for (int64_t f = 0; f < F; ++f) {
        size_t q = size_t(i) * F + size_t(f);
        g[q] = cpu::swiglu_clamped(g[q], u[q], p.swiglu_clamp) * wt;
      }
    }
    matmul(w.down_exps, e, g.data(), n, out.data());
    for (int i = 0; i < n; ++i)
      std::memcpy(&ye[size_t(us[size_t(i)]) * D], &out[size_t(i) * D], size_t(D) * sizeof(float));
  }
  // Shared expert over the whole batch.
  g.resize(size_t(T) * F);
  u.resize(size_t(T) * F);
  matmul(w.gate_shexp, -1, x, T, g.data());
  matmul(w.up_shexp, -1, x, T, u.data());
  for (size_t q = 0; q < size_t(T) * F; ++q) g[q] = cpu::swiglu_clamped(g[q], u[q], p.swiglu_clamp);
  matmul(w.down_shexp, -1, g.data(), T, y);
  pool_.parallel_for(T, [&](int64_t b, int64_t end) {
    for (int64_t t = b; t < end; ++t)
      for (int64_t d = 0; d < D; ++d) {
        float s = 0.f;
        for (int j = 0; j < k; ++j) s += ye[size_t((t * k + j) * D + d)];
        y[t * D + d] += s;
      }
  });
}

void CpuBackend::matmul_grouped(const WeightView& w, int G, const float* x, int T, float* y) {
  const int64_t gin = w.ne[0], ro = w.ne[1] / G;
  if (w.n_dims != 2 || G <= 0 || w.ne[1] % G != 0)
    fail("matmul_grouped: tensor '%s' ([%lld, %lld]) cannot be split into %d groups", w.name, (long long)w.ne[0],
         (long long)w.ne[1], G);
  const int64_t rb = row_bytes(w.type, gin);
  std::vector<float> xin(size_t(T) * gin), yg(size_t(T) * ro);
  for (int g = 0; g < G; ++g) {
    for (int t = 0; t < T; ++t)
      std::copy_n(x + (size_t(t) * G + g) * gin, gin, xin.data() + size_t(t) * gin);
    WeightView v = w;  // rows [g*ro, (g+1)*ro): a view on the same bytes
    v.data = static_cast<const uint8_t*>(w.data) + size_t(g) * size_t(ro) * size_t(rb);
    v.ne[1] = ro;
    v.n_bytes = size_t(ro) * size_t(rb);
    matmul(v, -1, xin.data(), T, yg.data());
    for (int t = 0; t < T; ++t) std::copy_n(yg.data() + size_t(t) * ro, ro, y + (size_t(t) * G + g) * ro);
  }
}

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(ThreadPool* pool) { return std::make_unique<CpuBackend>(pool); }

Backend& host_backend() {
  static CpuBackend be(nullptr);  // function-local static: constructed on first use, thread-safe
  return be;
}

}  // namespace dsv4
