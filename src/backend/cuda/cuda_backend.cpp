// CUDA implementation of the op table (see cuda_backend.h for the host-pointer contract).
#include "backend/cuda/cuda_backend.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <tuple>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "backend/cuda/attention_ops.h"
#include "backend/cuda/cuda_util.h"
#include "backend/cuda/gemv.h"
#include "backend/cuda/hc.h"
#include "backend/cuda/moe.h"
#include "backend/cuda/norm_rope.h"
#include "common/error.h"
#include "quant/quant.h"

namespace dsv4 {
namespace {

using cuda::DeviceArray;

class CudaBackend final : public Backend {
 public:
  CudaBackend() {
    if (!cuda::device_available()) fail("cuda backend: no CUDA device present");
  }
  const char* name() const override { return "cuda"; }

  // ---- bridge (see cuda_backend.h): backend memory is host memory for now, so every op stages its host
  // arguments on the device around the kernels. The attention ops run the kernels of attention_ops.h (window_store
  // is a host row copy); once memory is device memory they are called on the buffers directly.
  void* mem_alloc(size_t bytes) override { return host_->mem_alloc(bytes); }
  void mem_free(void* p) noexcept override { host_->mem_free(p); }
  void upload(void* dst, const void* src, size_t bytes) override { host_->upload(dst, src, bytes); }
  void download(void* dst, const void* src, size_t bytes) override { host_->download(dst, src, bytes); }
  void copy(void* dst, const void* src, size_t bytes) override { host_->copy(dst, src, bytes); }
  void fill(float* dst, float value, size_t n) override { host_->fill(dst, value, n); }
  bool host_memory() const override { return true; }
  void matmul_grouped(const WeightView& w, int groups, const float* x, int T, float* y) override;
  void head_prep(float* x, int T, int H, int dim, const HeadPrep& p) override;
  void compressor_step(const CompressorParams& p, const CompressorBuffers& s, const float* v, const float* z, int T,
                       int64_t p0) override;
  void indexer_topk(const IndexerParams& p, const float* qI, const float* wI, const float* keys, int T, int64_t p0,
                    int32_t* sel) override;
  void sink_attention(const SinkAttnParams& p, const float* q, const float* kv_new, const float* ring,
                      const float* comp, const int32_t* sel, int T, int64_t p0, float* out) override;
  void window_store(float* ring, int W, int dim, const float* kv, int T, int64_t p0) override {
    host_->window_store(ring, W, dim, kv, T, p0);
  }

  void embed(const WeightView& e, const int32_t* tokens, int T, int n, float* X) override {
    const int64_t D = e.ne[0], V = e.ne[1];
    const int64_t rb = row_bytes(e.type, D);
    for (int t = 0; t < T; ++t) {
      if (tokens[t] < 0 || tokens[t] >= V)
        fail("embed: token id %d at batch row %d outside [0, %lld)", tokens[t], t, (long long)V);
      float* x = X + int64_t(t) * n * D;
      dequantize_row(e.type, static_cast<const uint8_t*>(e.data) + size_t(tokens[t]) * size_t(rb), x, D);
      for (int s = 1; s < n; ++s) std::memcpy(x + s * D, x, size_t(D) * sizeof(float));
    }
  }

  void rms_norm(const float* x, const WeightView* w, int T, int64_t dim, float eps, float* y) override {
    float* d_x = upload(0, x, size_t(T) * dim);
    cuda::RmsNormParams p;
    p.x = d_x, p.y = d_x, p.rows = T, p.n = int(dim), p.eps = eps;
    p.w = (w && w->present()) ? f32_weight(*w) : nullptr;
    cuda::rms_norm_cuda(p, nullptr);
    download(y, d_x, size_t(T) * dim);
  }

  void matmul(const WeightView& w, int expert, const float* x, int T, float* y) override {
    float* d_x = upload(0, x, size_t(T) * w.ne[0]);
    float* d_y = buffer(1, size_t(T) * w.ne[1]);
    dmatmul(w, expert, d_x, T, d_y);
    download(y, d_y, size_t(T) * w.ne[1]);
  }

  void hc_pre(const HcWeights& w, const HcParams& p, const float* X, int T, float* a, float* post,
              float* comb) override {
    check_hc(p);
    const int64_t nd = int64_t(p.n) * p.d;
    float* d_X = upload(0, X, size_t(T) * nd);
    float* d_mix = buffer(1, size_t(T) * cuda::kHcMix);
    float* d_rs = buffer(2, size_t(T));
    float* d_pre = buffer(3, size_t(T) * 4);
    float* d_post = buffer(4, size_t(T) * 4);
    float* d_comb = buffer(5, size_t(T) * 16);
    float* d_a = buffer(6, size_t(T) * p.d);
    dmatmul(w.fn, -1, d_X, T, d_mix);
    cuda::rms_scale_cuda(d_X, T, nd, p.norm_eps, d_rs, nullptr);
    cuda::HcSinkhornParams sp;
    sp.mix = d_mix, sp.mix_scale = d_rs, sp.base = f32_weight(w.base), sp.scale = f32_weight(w.scale);
    sp.pre = d_pre, sp.post = d_post, sp.comb = d_comb, sp.n_tokens = T, sp.iters = p.sinkhorn_iters;
    sp.eps = p.hc_eps;
    cuda::hc_split_sinkhorn_cuda(sp, nullptr);
    cuda::hc_collapse_cuda(d_X, d_pre, T, p.d, d_a, nullptr);
    download(a, d_a, size_t(T) * p.d);
    download(post, d_post, size_t(T) * 4);
    download(comb, d_comb, size_t(T) * 16);
  }

  void hc_post(const HcParams& p, const float* y, const float* post, const float* comb, int T, float* X) override {
    check_hc(p);
    float* d_X = upload(0, X, size_t(T) * 4 * p.d);
    float* d_y = upload(1, y, size_t(T) * p.d);
    float* d_post = upload(2, post, size_t(T) * 4);
    float* d_comb = upload(3, comb, size_t(T) * 16);
    cuda::hc_post_cuda(d_X, d_y, d_post, d_comb, T, p.d, nullptr);
    download(X, d_X, size_t(T) * 4 * p.d);
  }

  void hc_head(const HcHeadWeights& w, const HcParams& p, const float* X, int T, float* h) override {
    check_hc(p);
    const int64_t nd = int64_t(p.n) * p.d;
    float* d_X = upload(0, X, size_t(T) * nd);
    float* d_mix = buffer(1, size_t(T) * 4);
    float* d_rs = buffer(2, size_t(T));
    float* d_w = buffer(3, size_t(T) * 4);
    float* d_h = buffer(4, size_t(T) * p.d);
    dmatmul(w.fn, -1, d_X, T, d_mix);
    cuda::rms_scale_cuda(d_X, T, nd, p.norm_eps, d_rs, nullptr);
    cuda::hc_head_weights_cuda(d_mix, d_rs, f32_weight(w.base), f32_weight(w.scale), T, p.hc_eps, d_w, nullptr);
    cuda::hc_collapse_cuda(d_X, d_w, T, p.d, d_h, nullptr);
    download(h, d_h, size_t(T) * p.d);
  }

  void moe_route(const MoeWeights& w, const MoeParams& p, const float* x, const int32_t* tokens, int T,
                 int32_t* ids, float* weights) override;
  void moe_ffn(const MoeWeights& w, const MoeParams& p, const float* x, const int32_t* ids, const float* weights,
               int T, float* y) override;

 private:
  // ---- memory ----------------------------------------------------------------------------------------------
  // Scratch slot i: a device buffer grown on demand (ops use fixed slot numbers; nothing is live across ops).
  float* buffer(int slot, size_t n_floats) {
    if (scratch_.size() <= size_t(slot)) scratch_.resize(size_t(slot) + 1);
    auto& b = scratch_[size_t(slot)];
    if (b.size() < n_floats) b = DeviceArray<float>(n_floats);
    return b.get();
  }
  float* upload(int slot, const float* host, size_t n) {
    float* d = buffer(slot, n);
    cuda::check(cudaMemcpy(d, host, n * sizeof(float), cudaMemcpyHostToDevice), "cuda backend: upload");
    return d;
  }
  template <typename T>
  void download(T* host, const T* dev, size_t n) {
    cuda::check(cudaMemcpy(host, dev, n * sizeof(T), cudaMemcpyDeviceToHost), "cuda backend: download");
  }
  // Device layout per weight: the policy lives in gemv.h (preferred_layout / repack_weight_cuda).
  static cuda::GemvLayout layout_for(const WeightView& w) {
    return cuda::preferred_layout(w.type, w.ne[0], w.n_dims >= 3);
  }
  const uint8_t* weight(const WeightView& w) {
    if (!w.present()) fail("cuda backend: tensor '%s' is not bound", w.name);
    const WeightKey key{w.data, w.n_bytes, uint32_t(w.type)};
    auto it = weights_.find(key);
    if (it == weights_.end()) {
      DeviceArray<uint8_t> d(w.n_bytes);
      cuda::check(cudaMemcpy(d.get(), w.data, w.n_bytes, cudaMemcpyHostToDevice), w.name);
      const cuda::GemvLayout layout = layout_for(w);
      if (layout != cuda::GemvLayout::Ggml) {
        const int64_t n_rows = w.ne[1] * (w.n_dims >= 3 ? w.ne[2] : 1);
        DeviceArray<uint8_t> packed(size_t(n_rows * cuda::layout_row_bytes(w.type, layout, w.ne[0])));
        cuda::repack_weight_cuda(w.type, layout, d.get(), n_rows, w.ne[0], packed.get(), nullptr);
        d = std::move(packed);
      }
      it = weights_.emplace(key, std::move(d)).first;
    }
    return it->second.get();
  }
  static int64_t device_row_bytes(const WeightView& w) {
    return cuda::layout_row_bytes(w.type, layout_for(w), w.ne[0]);
  }
  const float* f32_weight(const WeightView& w) {
    if (w.type != QType::F32) fail("cuda backend: tensor '%s' must be F32 here, is %s", w.name, qtype_name(w.type).c_str());
    // Mirror ne-product floats, not w.n_bytes: the binding's F32 copies of F16 vectors (e.g. compressor ape in
    // the q8_0/q2/q4 mixes) keep the file tensor's byte count, half the floats, and the rest would be garbage.
    WeightView full = w;
    full.n_bytes = size_t(w.ne[0] * w.ne[1] * w.ne[2] * w.ne[3]) * sizeof(float);
    return reinterpret_cast<const float*>(weight(full));
  }
  static void check_hc(const HcParams& p) {
    if (p.n != cuda::kHcStreams) fail("cuda backend: HC kernels are built for %d streams, model has %d", cuda::kHcStreams, p.n);
  }

  // ---- device-pointer helpers ------------------------------------------------------------------------------
  // y[t] = W x[t] for T tokens, x and y on the device.
  // w2/d_y2 (optional): a second matrix of the same type and shape over the same input, in the same launch.
  void dmatmul(const WeightView& w, int expert, const float* d_x, int T, float* d_y, const WeightView* w2 = nullptr,
               float* d_y2 = nullptr) {
    if (w2 && (w2->type != w.type || w2->ne[0] != w.ne[0] || w2->ne[1] != w.ne[1] || !cuda::gemv_supports(w.type))) {
      dmatmul(w, expert, d_x, T, d_y);  // not pairable: two launches
      dmatmul(*w2, expert, d_x, T, d_y2);
      return;
    }
    const int64_t cols = w.ne[0], rows = w.ne[1];
    if (expert >= 0 && (w.n_dims < 3 || expert >= w.ne[2])) fail("matmul: tensor '%s' has no expert %d", w.name, expert);
    if (!cuda::gemv_supports(w.type)) {  // BF16 & co: the CPU kernel on downloaded activations
      std::vector<float> hx(size_t(T) * cols), hy(size_t(T) * rows);
      download(hx.data(), d_x, hx.size());
      const uint8_t* base = static_cast<const uint8_t*>(w.data) +
                            (expert < 0 ? 0 : size_t(expert) * size_t(rows) * size_t(row_bytes(w.type, cols)));
      dsv4::matmul(w.type, base, rows, cols, hx.data(), T, hy.data());
      cuda::check(cudaMemcpy(d_y, hy.data(), hy.size() * sizeof(float), cudaMemcpyHostToDevice), "upload");
      return;
    }
    const cuda::GemvLayout layout = layout_for(w);
    uint8_t* d_xq = act_buffer(size_t(T) * size_t(cuda::gpu_activation_bytes(w.type, cols, layout)));
    cuda::quantize_activations_cuda(w.type, d_x, T, cols, d_xq, nullptr, layout);
    cuda::GemvParams g;
    g.wtype = w.type, g.layout = layout, g.rows = rows, g.cols = cols, g.xq = d_xq, g.n_tokens = T, g.y = d_y;
    g.w = weight(w) + (expert < 0 ? 0 : size_t(expert) * size_t(rows) * size_t(device_row_bytes(w)));
    if (w2) {
      g.w2 = weight(*w2) + (expert < 0 ? 0 : size_t(expert) * size_t(rows) * size_t(device_row_bytes(*w2)));
      g.y2 = d_y2;
    }
    cuda::gemv_cuda(g, nullptr);
  }
  // Expert GEMV over slots: slot s = t*k + j uses expert d_ids[s] and activation row s / act_div.
  void dmatmul_experts(const WeightView& w, const int32_t* d_ids, int n_slots, int act_div, const float* d_x,
                       float* d_y, const WeightView* w2 = nullptr, float* d_y2 = nullptr) {
    if (w2 && (w2->type != w.type || w2->ne[0] != w.ne[0] || w2->ne[1] != w.ne[1] || w2->ne[2] != w.ne[2])) {
      dmatmul_experts(w, d_ids, n_slots, act_div, d_x, d_y);
      dmatmul_experts(*w2, d_ids, n_slots, act_div, d_x, d_y2);
      return;
    }
    const int64_t cols = w.ne[0], rows = w.ne[1];
    if (!cuda::gemv_supports(w.type) || w.n_dims < 3)
      fail("cuda backend: expert tensor '%s' (%s) is not supported", w.name, qtype_name(w.type).c_str());
    const int n_act = n_slots / act_div;
    const cuda::GemvLayout layout = layout_for(w);
    uint8_t* d_xq = act_buffer(size_t(n_act) * size_t(cuda::gpu_activation_bytes(w.type, cols, layout)));
    cuda::quantize_activations_cuda(w.type, d_x, n_act, cols, d_xq, nullptr, layout);
    cuda::GemvParams g;
    g.wtype = w.type, g.layout = layout, g.w = weight(w), g.rows = rows, g.cols = cols;
    g.expert_stride = rows * device_row_bytes(w);
    g.expert_ids = d_ids, g.n_slots = n_slots, g.act_slot_div = act_div, g.xq = d_xq, g.y = d_y;
    if (w2) g.w2 = weight(*w2), g.y2 = d_y2;
    cuda::gemv_cuda(g, nullptr);
  }
  uint8_t* act_buffer(size_t bytes) {
    if (xq_.size() < bytes) xq_ = DeviceArray<uint8_t>(bytes);
    return xq_.get();
  }

  // Device copies by host address (+ size and type as a guard): WeightView data must stay valid and unchanged
  // for the backend's lifetime, which the engine's mmap guarantees.
  using WeightKey = std::tuple<const void*, size_t, uint32_t>;
  std::map<WeightKey, DeviceArray<uint8_t>> weights_;
  std::vector<DeviceArray<float>> scratch_;
  DeviceArray<uint8_t> xq_;
  DeviceArray<int32_t> ids_;
  std::unique_ptr<Backend> host_ = make_cpu_backend();  // the bridge's memory and attention ops
  // DSV4_CUDA_ATTENTION=cpu: the attention ops run the CPU implementation (A/B checks of the attention kernels).
  const bool cpu_attention_ = [] {
    const char* e = std::getenv("DSV4_CUDA_ATTENTION");
    return e && std::strcmp(e, "cpu") == 0;
  }();
};

// ---- attention ops (bridge: host arguments staged in scratch slots around the attention_ops.h kernels) -------

void CudaBackend::head_prep(float* x, int T, int H, int dim, const HeadPrep& p) {
  if (cpu_attention_) return host_->head_prep(x, T, H, dim, p);
  const size_t n = size_t(T) * H * dim;
  float* d_x = upload(0, x, n);
  const float* nw = (p.norm && p.norm_w && p.norm_w->present()) ? f32_weight(*p.norm_w) : nullptr;
  cuda::head_prep_device(d_x, T, H, dim, p, nw, nullptr);
  download(x, d_x, n);
}

void CudaBackend::compressor_step(const CompressorParams& p, const CompressorBuffers& s, const float* v,
                                  const float* z, int T, int64_t p0) {
  if (cpu_attention_) return host_->compressor_step(p, s, v, z, T, p0);
  if (T <= 0) return;
  const int cw = s.width();
  const size_t n_cur = size_t(s.ratio) * cw, n_prev = s.overlap ? size_t(s.ratio) * s.dim : 0;
  const int64_t w0 = p0 / s.ratio, n_emit = (p0 + T) / s.ratio - w0;
  CompressorBuffers d = s;
  d.cur_v = upload(0, s.cur_v, n_cur);
  d.cur_z = upload(1, s.cur_z, n_cur);
  d.prev_v = n_prev ? upload(2, s.prev_v, n_prev) : nullptr;
  d.prev_z = n_prev ? upload(3, s.prev_z, n_prev) : nullptr;
  const float* d_v = upload(4, v, size_t(T) * cw);
  const float* d_z = upload(5, z, size_t(T) * cw);
  float* d_rows = buffer(6, size_t(std::max<int64_t>(n_emit, 1)) * s.dim);
  // The kernels address rows by window index and touch only windows [w0, w0 + n_emit): staging just those,
  // the device base is shifted so that row w0 lands at the start of the scratch slot.
  d.rows = d_rows - w0 * s.dim;
  const float* nw = (p.norm && p.norm->present()) ? f32_weight(*p.norm) : nullptr;
  cuda::compressor_step_device(p, d, f32_weight(*p.ape), nw, d_v, d_z, T, p0, nullptr);
  download(s.cur_v, d.cur_v, n_cur);
  download(s.cur_z, d.cur_z, n_cur);
  if (n_prev) download(s.prev_v, d.prev_v, n_prev), download(s.prev_z, d.prev_z, n_prev);
  if (n_emit > 0) download(s.rows + w0 * s.dim, d_rows, size_t(n_emit) * s.dim);
}

void CudaBackend::indexer_topk(const IndexerParams& p, const float* qI, const float* wI, const float* keys, int T,
                               int64_t p0, int32_t* sel) {
  if (cpu_attention_) return host_->indexer_topk(p, qI, wI, keys, T, p0, sel);
  if (T <= 0) return;
  const int64_t n_keys = (p0 + T) / p.ratio;
  const float* d_q = upload(0, qI, size_t(T) * p.heads * p.dim);
  const float* d_w = upload(1, wI, size_t(T) * p.heads);
  const float* d_k = upload(2, keys, size_t(std::max<int64_t>(n_keys, 0)) * p.dim);
  auto* d_sel = reinterpret_cast<int32_t*>(buffer(3, size_t(T) * p.top_k));
  float* d_scr = buffer(4, size_t(std::max<int64_t>(1, cuda::indexer_topk_scratch_floats(p, T, p0))));
  cuda::indexer_topk_device(p, d_q, d_w, d_k, T, p0, d_sel, d_scr, nullptr);
  download(sel, d_sel, size_t(T) * p.top_k);
}

void CudaBackend::sink_attention(const SinkAttnParams& p, const float* q, const float* kv_new, const float* ring,
                                 const float* comp, const int32_t* sel, int T, int64_t p0, float* out) {
  if (cpu_attention_) return host_->sink_attention(p, q, kv_new, ring, comp, sel, T, p0, out);
  if (T <= 0) return;
  const size_t nq = size_t(T) * p.heads * p.dim;
  const int64_t n_comp = p.comp != CompRows::None ? (p0 + T) / p.ratio : 0;
  const float* d_q = upload(0, q, nq);
  const float* d_new = upload(1, kv_new, size_t(T) * p.dim);
  const float* d_ring = p0 > 0 ? upload(2, ring, size_t(p.window) * p.dim) : nullptr;
  const float* d_comp = n_comp > 0 ? upload(3, comp, size_t(n_comp) * p.dim) : buffer(3, 1);
  int32_t* d_sel = nullptr;
  if (p.comp == CompRows::Selected) {
    d_sel = reinterpret_cast<int32_t*>(buffer(4, size_t(T) * p.top_k));
    cuda::check(cudaMemcpy(d_sel, sel, size_t(T) * p.top_k * sizeof(int32_t), cudaMemcpyHostToDevice), "upload sel");
  }
  float* d_out = buffer(5, nq);
  float* d_scr = buffer(6, size_t(std::max<int64_t>(1, cuda::sink_attention_scratch_floats(p, T, p0))));
  cuda::sink_attention_device(p, f32_weight(*p.sinks), d_q, d_new, d_ring, d_comp, d_sel, T, p0, d_out, d_scr,
                              nullptr);
  download(out, d_out, nq);
}

// Group g: input columns [g*gin, (g+1)*gin) of x through weight rows [g*ro, (g+1)*ro), as G sub-matrix GEMVs
// (each sub-matrix is mirrored once, keyed by its own address).
void CudaBackend::matmul_grouped(const WeightView& w, int G, const float* x, int T, float* y) {
  if (cpu_attention_) return host_->matmul_grouped(w, G, x, T, y);
  const int64_t gin = w.ne[0], ro = G > 0 ? w.ne[1] / G : 0;
  if (w.n_dims != 2 || G <= 0 || w.ne[1] % G != 0)
    fail("matmul_grouped: tensor '%s' ([%lld, %lld]) cannot be split into %d groups", w.name, (long long)w.ne[0],
         (long long)w.ne[1], G);
  const int64_t rb = row_bytes(w.type, gin);
  const float* d_x = upload(0, x, size_t(T) * G * gin);
  float* d_xg = buffer(1, size_t(T) * gin);
  float* d_yg = buffer(2, size_t(T) * ro);
  float* d_y = buffer(3, size_t(T) * G * ro);
  for (int g = 0; g < G; ++g) {
    WeightView sub = w;
    sub.data = static_cast<const uint8_t*>(w.data) + size_t(g) * size_t(ro) * size_t(rb);
    sub.ne[1] = ro;
    sub.n_bytes = size_t(ro) * size_t(rb);
    cuda::check(cudaMemcpy2D(d_xg, gin * sizeof(float), d_x + g * gin, G * gin * sizeof(float), gin * sizeof(float),
                             T, cudaMemcpyDeviceToDevice), "matmul_grouped gather");
    dmatmul(sub, -1, d_xg, T, d_yg);
    cuda::check(cudaMemcpy2D(d_y + g * ro, G * ro * sizeof(float), d_yg, ro * sizeof(float), ro * sizeof(float), T,
                             cudaMemcpyDeviceToDevice), "matmul_grouped scatter");
  }
  download(y, d_y, size_t(T) * G * ro);
}

void CudaBackend::moe_route(const MoeWeights& w, const MoeParams& p, const float* x, const int32_t* tokens, int T,
                            int32_t* ids, float* weights) {
  const int E = p.n_experts, k = p.n_used;
  float* d_x = upload(0, x, size_t(T) * p.d);
  float* d_z = buffer(1, size_t(T) * E);
  float* d_w = buffer(2, size_t(T) * k);
  if (ids_.size() < size_t(T) * k) ids_ = DeviceArray<int32_t>(size_t(T) * k);
  dmatmul(w.gate_inp, -1, d_x, T, d_z);
  if (p.hash) {  // the table lives with the weights on the host: gather and validate there, as the CPU does
    const int64_t V = w.tid2eid.ne[1];
    const int32_t* table = static_cast<const int32_t*>(w.tid2eid.data);
    for (int t = 0; t < T; ++t) {
      if (tokens[t] < 0 || tokens[t] >= V)
        fail("moe_route: token id %d outside tensor '%s' ([0, %lld))", tokens[t], w.tid2eid.name, (long long)V);
      for (int j = 0; j < k; ++j) {
        const int32_t e = table[int64_t(tokens[t]) * k + j];
        if (e < 0 || e >= E)
          fail("moe_route: tensor '%s' maps token %d to expert %d, outside [0, %d)", w.tid2eid.name, tokens[t], e, E);
        ids[t * k + j] = e;
      }
    }
    cuda::check(cudaMemcpy(ids_.get(), ids, size_t(T) * k * sizeof(int32_t), cudaMemcpyHostToDevice), "upload ids");
  }
  const float* bias = w.exp_probs_b.present() ? f32_weight(w.exp_probs_b) : nullptr;
  cuda::moe_route_cuda(d_z, bias, T, E, k, p.weights_scale, p.hash, ids_.get(), d_w, nullptr);
  if (!p.hash) download(ids, ids_.get(), size_t(T) * k);
  download(weights, d_w, size_t(T) * k);
}

void CudaBackend::moe_ffn(const MoeWeights& w, const MoeParams& p, const float* x, const int32_t* ids,
                          const float* weights, int T, float* y) {
  const int k = p.n_used;
  const int64_t D = p.d, F = p.ff;
  const int n_slots = T * k;
  if (n_slots > 65535) fail("cuda backend: moe_ffn of %d tokens x %d experts exceeds one launch", T, k);
  for (int s = 0; s < n_slots; ++s)
    if (ids[s] < 0 || ids[s] >= p.n_experts) fail("moe_ffn: expert id %d outside [0, %d)", ids[s], p.n_experts);
  float* d_x = upload(0, x, size_t(T) * D);
  float* d_rw = upload(1, weights, size_t(n_slots));
  if (ids_.size() < size_t(n_slots)) ids_ = DeviceArray<int32_t>(size_t(n_slots));
  cuda::check(cudaMemcpy(ids_.get(), ids, size_t(n_slots) * sizeof(int32_t), cudaMemcpyHostToDevice), "upload ids");
  float* d_g = buffer(2, size_t(n_slots) * F);
  float* d_u = buffer(3, size_t(n_slots) * F);
  float* d_ye = buffer(4, size_t(n_slots) * D);
  float* d_y = buffer(5, size_t(T) * D);
  // Routed: gate/up share the token's input (act row = slot / k), down has one input per slot.
  dmatmul_experts(w.gate_exps, ids_.get(), n_slots, k, d_x, d_g, &w.up_exps, d_u);  // gate + up: one launch
  cuda::swiglu_cuda(d_g, d_u, d_rw, n_slots, F, p.swiglu_clamp, d_g, nullptr);
  dmatmul_experts(w.down_exps, ids_.get(), n_slots, 1, d_g, d_ye);
  // Shared expert, then the routed outputs added in selection order (the CPU's order).
  dmatmul(w.gate_shexp, -1, d_x, T, d_g, &w.up_shexp, d_u);
  cuda::swiglu_cuda(d_g, d_u, nullptr, T, F, p.swiglu_clamp, d_g, nullptr);
  dmatmul(w.down_shexp, -1, d_g, T, d_y);
  cuda::moe_sum_cuda(d_ye, T, k, D, d_y, nullptr);
  download(y, d_y, size_t(T) * D);
}

}  // namespace

std::unique_ptr<Backend> make_cuda_backend() { return std::make_unique<CudaBackend>(); }

}  // namespace dsv4
