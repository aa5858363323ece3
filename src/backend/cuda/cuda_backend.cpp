// CUDA implementation of the op table on device memory (see cuda_backend.h).
#include "backend/cuda/cuda_backend.h"

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "backend/cuda/attention_ops.h"
#include "backend/cuda/cuda_util.h"
#include "backend/cuda/device_ops.h"
#include "backend/cuda/gemm.h"
#include "backend/cuda/gemv.h"
#include "backend/cuda/hc.h"
#include "backend/cuda/moe.h"
#include "backend/cuda/norm_rope.h"
#include "backend/cuda/profile.h"
#include "common/error.h"
#include "quant/quant.h"

namespace dsv4 {
namespace {

using cuda::DeviceArray;
using cuda::GemvLayout;
using Scope = cuda::OpProfiler::Scope;

// Grouped projections run as one MoE-mode launch (the groups as "experts") up to this many tokens: that launch
// reads the weight once per token, so larger batches use one dense launch per group (weights read once per 8).
constexpr int kGroupedMoeMaxTokens = 2;
// Slots of one MoE-mode launch: gemv_cuda allows 65535 CTA rows, a paired launch uses two per slot.
constexpr int kMaxSlotsPerLaunch = 32767;

class CudaBackend final : public Backend {
 public:
  CudaBackend() {
    if (!cuda::device_available()) fail("cuda backend: no CUDA device present");
    cuda::check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cuda backend: cudaStreamCreate");
    // Stream-ordered allocations come from the device's default pool; keeping freed blocks in the pool (instead
    // of returning them to the driver at every synchronization) makes session and scratch churn cheap.
    int dev = 0;
    cudaMemPool_t pool;
    if (cudaGetDevice(&dev) == cudaSuccess && cudaDeviceGetDefaultMemPool(&pool, dev) == cudaSuccess) {
      uint64_t keep = UINT64_MAX;
      cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep);
    }
    cudaGetLastError();
    prof_ = std::make_unique<cuda::OpProfiler>(stream_);
  }
  ~CudaBackend() override {
    prof_.reset();  // prints the profile (it synchronizes on its events)
    cudaStreamSynchronize(stream_);
    cudaStreamDestroy(stream_);
  }
  const char* name() const override { return "cuda"; }

  // ---- memory: stream-ordered device allocations; every transfer on the backend's stream -------------------
  void* mem_alloc(size_t bytes) override {
    void* p = nullptr;
    if (cudaMallocAsync(&p, std::max<size_t>(bytes, 1), stream_) != cudaSuccess) {
      cudaGetLastError();
      fail("cuda backend: out of device memory allocating %zu bytes", bytes);
    }
    return p;
  }
  void mem_free(void* p) noexcept override {
    if (!p) return;
    forget_all_activations();  // the block may come back from the pool under a cached activation's address
    cudaFreeAsync(p, stream_);
  }
  // Pageable host memory (std::vector, the mmap) is staged by the driver before cudaMemcpyAsync returns, so the
  // caller may reuse `src` at once; the copy itself is ordered with the ops.
  void upload(void* dst, const void* src, size_t bytes) override {
    wrote(dst, bytes);
    if (bytes) cuda::check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_), "cuda backend: upload");
  }
  void download(void* dst, const void* src, size_t bytes) override {
    if (!bytes) return;
    cuda::check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_), "cuda backend: download");
    cuda::check(cudaStreamSynchronize(stream_), "cuda backend: download (a preceding op failed)");
  }
  void copy(void* dst, const void* src, size_t bytes) override {
    wrote(dst, bytes);
    if (bytes) cuda::check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_), "cuda backend: copy");
  }
  void fill(float* dst, float value, size_t n) override {
    wrote(dst, n * sizeof(float));
    cuda::fill_f32_cuda(dst, value, n, stream_);
  }
  bool host_memory() const override { return false; }

  // ---- general ops -----------------------------------------------------------------------------------------
  void embed(const WeightView& e, const int32_t* tokens, int T, int n, float* X) override;
  void rms_norm(const float* x, const WeightView* w, int T, int64_t dim, float eps, float* y) override {
    Scope sc(*prof_, "rms_norm", T);
    cuda::RmsNormParams p;
    p.x = x, p.y = y, p.rows = T, p.n = int(dim), p.eps = eps;
    p.w = (w && w->present()) ? f32_weight(*w) : nullptr;
    cuda::rms_norm_cuda(p, stream_);
    wrote(y, size_t(T) * dim * sizeof(float));
  }
  void matmul(const WeightView& w, int expert, const float* x, int T, float* y) override {
    Scope sc(*prof_, prof_->enabled() ? matmul_name("matmul", w) : std::string(), T);
    dmatmul(w, expert, x, T, y, nullptr, nullptr, /*cacheable=*/true);
    wrote(y, size_t(T) * w.ne[1] * sizeof(float));
  }
  void hc_pre(const HcWeights& w, const HcParams& p, const float* X, int T, float* a, float* post,
              float* comb) override;
  void hc_post(const HcParams& p, const float* y, const float* post, const float* comb, int T, float* X) override {
    Scope sc(*prof_, "hc_post", T);
    check_hc(p);
    cuda::hc_post_cuda(X, y, post, comb, T, p.d, stream_);
    wrote(X, size_t(T) * 4 * p.d * sizeof(float));
  }
  void hc_head(const HcHeadWeights& w, const HcParams& p, const float* X, int T, float* h) override;
  void moe_route(const MoeWeights& w, const MoeParams& p, const float* x, const int32_t* tokens, int T,
                 int32_t* ids, float* weights) override;
  void moe_ffn(const MoeWeights& w, const MoeParams& p, const float* x, const int32_t* ids, const float* weights,
               int T, float* y) override;

  // ---- attention ops ---------------------------------------------------------------------------------------
  void matmul_grouped(const WeightView& w, int groups, const float* x, int T, float* y) override;
  void head_prep(float* x, int T, int H, int dim, const HeadPrep& p) override;
  void compressor_step(const CompressorParams& p, const CompressorBuffers& s, const float* v, const float* z, int T,
                       int64_t p0) override;
  void indexer_topk(const IndexerParams& p, const float* qI, const float* wI, const float* keys, int T, int64_t p0,
                    int32_t* sel) override;
  void sink_attention(const SinkAttnParams& p, const float* q, const float* kv_new, const float* ring,
                      const float* comp, const int32_t* sel, int T, int64_t p0, float* out) override;
  void window_store(float* ring, int W, int dim, const float* kv, int T, int64_t p0) override;

 private:
  // ---- internal scratch ------------------------------------------------------------------------------------
  // Slot i: a grow-only device buffer (ops use fixed slot numbers; nothing is live across ops), so a steady
  // decode step allocates nothing.
  float* buffer(int slot, size_t n_floats) {
    if (scratch_.size() <= size_t(slot)) scratch_.resize(size_t(slot) + 1);
    auto& b = scratch_[size_t(slot)];
    if (b.size() < n_floats) {
      // Free before allocating: the peak is the new size, not old + new (GiBs at long contexts and big passes);
      // the contents are not carried over either way.
      const size_t n = std::max(n_floats, b.size() * 3 / 2);
      b.reset();
      b = DeviceArray<float>(n);
    }
    return b.get();
  }
  template <typename T>
  std::vector<T> to_host(const T* dev, size_t n) {
    std::vector<T> h(n);
    download(h.data(), dev, n * sizeof(T));
    return h;
  }

  // ---- weights ---------------------------------------------------------------------------------------------
  // Device layout per weight: the policy lives in gemv.h (preferred_layout / repack_weight_cuda).
  static GemvLayout layout_for(const WeightView& w) { return cuda::preferred_layout(w.type, w.ne[0], w.n_dims >= 3); }
  static int64_t device_row_bytes(const WeightView& w) {
    return cuda::layout_row_bytes(w.type, layout_for(w), w.ne[0]);
  }
  // Device copy of a weight in `layout`, mirrored on first use and cached by host address (+ size, type and
  // layout as a guard): WeightView data must stay valid and unchanged for the backend's lifetime (the mmap).
  const uint8_t* mirror(const WeightView& w, GemvLayout layout) {
    if (!w.present()) fail("cuda backend: tensor '%s' is not bound", w.name);
    const WeightKey key{w.data, w.n_bytes, uint32_t(w.type), uint32_t(layout)};
    auto it = weights_.find(key);
    if (it != weights_.end()) return it->second.get();
    prof_->discard_open();  // this call times the upload, not the op
    DeviceArray<uint8_t> d(w.n_bytes);
    cuda::check(cudaMemcpyAsync(d.get(), w.data, w.n_bytes, cudaMemcpyHostToDevice, stream_), w.name);
    if (layout != GemvLayout::Ggml) {
      const int64_t n_rows = w.ne[1] * (w.n_dims >= 3 ? w.ne[2] : 1);
      DeviceArray<uint8_t> packed(size_t(n_rows * cuda::layout_row_bytes(w.type, layout, w.ne[0])));
      cuda::repack_weight_cuda(w.type, layout, d.get(), n_rows, w.ne[0], packed.get(), stream_);
      d = std::move(packed);  // cudaFree of the file-layout copy waits for the repack
    }
    return weights_.emplace(key, std::move(d)).first->second.get();
  }
  const uint8_t* weight(const WeightView& w) { return mirror(w, layout_for(w)); }
  const float* f32_weight(const WeightView& w) {
    if (w.type != QType::F32) fail("cuda backend: tensor '%s' must be F32 here, is %s", w.name, qtype_name(w.type).c_str());
    // Mirror ne-product floats, not w.n_bytes: the binding's F32 copies of F16 vectors (e.g. compressor ape in
    // the q8_0/q2/q4 mixes) keep the file tensor's byte count, half the floats, and the rest would be garbage.
    WeightView full = w;
    full.n_bytes = size_t(w.ne[0] * w.ne[1] * w.ne[2] * w.ne[3]) * sizeof(float);
    return reinterpret_cast<const float*>(mirror(full, GemvLayout::Ggml));
  }
  const int32_t* hash_table(const WeightView& t, int n_experts, int k);
  const int32_t* group_ids(int groups, int64_t n);
  // The fused HC control (hc.h hc_mix_cuda) for one-token passes with an F16 fn of the expected shape. Only T == 1:
  // its workspace holds per-token tickets that every launch leaves at zero, but the ticket region's size depends
  // on T, so launches of different T must not share one buffer; decode is where the launches count.
  static bool hc_mix_applies(const WeightView& fn, int n_mix, int64_t K, int T) {
    return T == 1 && fn.type == QType::F16 && fn.ne[0] == K && fn.ne[1] == n_mix && K % 2 == 0;
  }
  void* hc_mix_workspace(int64_t K) {
    const size_t bytes = cuda::hc_mix_workspace_bytes(1, K);
    if (hc_ws_.size() < bytes) {
      hc_ws_ = DeviceArray<uint8_t>(bytes);
      cuda::check(cudaMemsetAsync(hc_ws_.get(), 0, bytes, stream_), "cuda backend: hc_mix workspace");
    }
    return hc_ws_.get();
  }
  static void check_hc(const HcParams& p) {
    if (p.n != cuda::kHcStreams) fail("cuda backend: HC kernels are built for %d streams, model has %d", cuda::kHcStreams, p.n);
  }

  // ---- activations -----------------------------------------------------------------------------------------
  // Quantized activations of `x` ([n_rows, cols]) for weights of type wtype in `layout`. F16/F32 weights read
  // the floats themselves (no copy). A cacheable input (an op argument, i.e. forward memory) is quantized once
  // for consecutive matmuls reading it in the same format (q_a, kv, compressor kv/gate and indexer proj all
  // read the attention input): the entry stays valid until anything writes memory overlapping x (wrote()), or
  // any block is freed. Internal scratch inputs are never cached (they are rewritten inside ops).
  const void* activations(QType wtype, GemvLayout layout, const float* x, int64_t n_rows, int64_t cols, bool cacheable) {
    if (activation_type(wtype) == QType::F32 && layout == GemvLayout::Ggml) return x;
    ActEntry& e = act_[act_kind(wtype, layout)];
    if (cacheable && e.x == x && e.rows == n_rows && e.cols == cols) return e.buf.get();
    const size_t bytes = size_t(n_rows) * size_t(cuda::gpu_activation_bytes(wtype, cols, layout));
    if (e.buf.size() < bytes) {
      const size_t n = std::max(bytes, e.buf.size() * 3 / 2);
      e.buf.reset();  // free first (see buffer())
      e.buf = DeviceArray<uint8_t>(n);
    }
    cuda::quantize_activations_cuda(wtype, x, n_rows, cols, e.buf.get(), stream_, layout);
    e.x = cacheable ? x : nullptr, e.rows = n_rows, e.cols = cols;
    return e.buf.get();
  }
  static int act_kind(QType wtype, GemvLayout layout) {
    if (layout == GemvLayout::Q8Split) return 1;
    return activation_type(wtype) == QType::Q8_0 ? 0 : 2;
  }
  // Invalidates cached activations whose input overlaps [p, p + bytes).
  void wrote(const void* p, size_t bytes) {
    const auto* b = static_cast<const uint8_t*>(p);
    for (ActEntry& e : act_) {
      if (!e.x) continue;
      const auto* xb = reinterpret_cast<const uint8_t*>(e.x);
      if (b < xb + size_t(e.rows * e.cols) * sizeof(float) && xb < b + bytes) e.x = nullptr;
    }
  }
  void forget_all_activations() noexcept {
    for (ActEntry& e : act_) e.x = nullptr;
  }

  // Prefill GEMMs (gemm.h) for T >= gemm_min_tokens on the types/layouts they take; DSV4_CUDA_GEMM=0 keeps every
  // product on the GEMV kernels (A/B checks: the GEMMs round activations to FP16, the GEMVs to Q8 like the CPU).
  bool use_gemm(QType wtype, GemvLayout layout, int T, int64_t cols) const {
    return gemm_enabled_ && T >= cuda::gemm_min_tokens(wtype) && cuda::gemm_supports(wtype, layout) && cols % 64 == 0;
  }
  void* workspace(size_t bytes) {
    if (bytes == 0) return nullptr;
    if (gemm_ws_.size() < bytes) {
      const size_t n = std::max(bytes, gemm_ws_.size() * 3 / 2);
      gemm_ws_.reset();  // free first (see buffer())
      gemm_ws_ = DeviceArray<uint8_t>(n);
    }
    return gemm_ws_.get();
  }
  // Types the fused MoE launches (moe_gate_up_swiglu_cuda, moe_down_sum_cuda) take: the routed-expert types of
  // the ds4 mixes; other stacks (F16/F32 test models, Q8_0) use the unfused launches.
  static bool fused_moe_type(QType t) { return t == QType::Q2_K || t == QType::Q4_K || t == QType::IQ2_XXS; }
  // Routed experts of T tokens on the grouped GEMM (gemm.h): every stack of a type and layout it takes (not F32).
  bool moe_gemm(const MoeWeights& w, int T) const {
    // Below the measured crossover (~80 tokens on the H200, gemm.h) the expert GEMVs are faster.
    if (T < cuda::moe_gemm_min_tokens(w.gate_exps.type)) return false;
    for (const WeightView* st : {&w.gate_exps, &w.up_exps, &w.down_exps})
      if (st->type == QType::F32 || !use_gemm(st->type, layout_for(*st), T, st->ne[0])) return false;
    return true;
  }
  void moe_routed(const MoeWeights& w, const MoeParams& p, const float* x, const int32_t* ids, const float* weights,
                  int T, bool fused_down);
  cuda::GemvParams expert_launch(const WeightView& w, const WeightView* w2, const int32_t* ids, int n_slots,
                                 int act_div, const void* xq, float* y) {
    cuda::GemvParams g;
    g.wtype = w.type, g.layout = layout_for(w), g.w = weight(w), g.rows = w.ne[1], g.cols = w.ne[0];
    g.expert_stride = w.ne[1] * device_row_bytes(w);
    g.expert_ids = ids, g.n_slots = n_slots, g.act_slot_div = act_div, g.xq = xq, g.y = y;
    if (w2) g.w2 = weight(*w2);
    return g;
  }

  // ---- GEMV helpers (device pointers) ----------------------------------------------------------------------
  // gemm: prefill sizes may use the FP16 tensor-core GEMM; the small control projections (HC mix, router) pass
  // false and stay on the GEMVs so their fp32/Q8 inputs, and the decisions taken from them (Sinkhorn weights,
  // expert choice), are the same in prefill and decode.
  void dmatmul(const WeightView& w, int expert, const float* x, int T, float* y, const WeightView* w2 = nullptr,
               float* y2 = nullptr, bool cacheable = false, bool gemm = true);
  void dmatmul_experts(const WeightView& w, const int32_t* ids, int n_slots, int act_div, const float* x, float* y,
                       const WeightView* w2 = nullptr, float* y2 = nullptr);
  void matmul_on_host(const WeightView& w, int expert, const float* x, int T, float* y);
  std::string matmul_name(const char* op, const WeightView& w) const {
    return strfmt("%s %s %s", op, qtype_name(w.type).c_str(), cuda::tensor_class(w.name).c_str());
  }

  struct ActEntry {
    const float* x = nullptr;  // cached input (null: nothing cached)
    int64_t rows = 0, cols = 0;
    DeviceArray<uint8_t> buf;
  };
  using WeightKey = std::tuple<const void*, size_t, uint32_t, uint32_t>;

  cudaStream_t stream_ = nullptr;
  std::unique_ptr<cuda::OpProfiler> prof_;
  std::map<WeightKey, DeviceArray<uint8_t>> weights_;
  std::map<const void*, DeviceArray<int32_t>> hash_tables_;
  std::map<int, DeviceArray<int32_t>> group_ids_;
  std::vector<DeviceArray<float>> scratch_;
  std::array<ActEntry, 3> act_;
  DeviceArray<uint8_t> gemm_ws_;
  DeviceArray<uint8_t> hc_ws_;  // hc_mix_cuda workspace (T == 1 launches only)
  DeviceArray<float> dummy_;  // a valid device address for row pointers of empty row sets
  std::unique_ptr<Backend> host_ = make_cpu_backend();  // BF16 matmuls and DSV4_CUDA_ATTENTION=cpu
  // DSV4_CUDA_ATTENTION=cpu: the attention ops run the CPU implementation on staged copies (A/B checks of the
  // attention kernels; slow, synchronous).
  const bool cpu_attention_ = [] {
    const char* e = std::getenv("DSV4_CUDA_ATTENTION");
    return e && std::strcmp(e, "cpu") == 0;
  }();
  const bool gemm_enabled_ = [] {
    const char* e = std::getenv("DSV4_CUDA_GEMM");
    return !(e && std::strcmp(e, "0") == 0);
  }();
};

// ---- weights ----------------------------------------------------------------------------------------------

// tid2eid [k, vocab] int32 (row per token): validated once on the host when mirrored (every entry an expert id),
// so the device gather needs no checks.
const int32_t* CudaBackend::hash_table(const WeightView& t, int n_experts, int k) {
  auto it = hash_tables_.find(t.data);
  if (it != hash_tables_.end()) return it->second.get();
  if (!t.present()) fail("cuda backend: tensor '%s' is not bound", t.name);
  prof_->discard_open();
  if (t.type != QType::I32 || t.ne[0] != k || size_t(t.ne[0] * t.ne[1]) * sizeof(int32_t) > t.n_bytes)
    fail("moe_route: tensor '%s' must be I32 [%d, vocab], is %s [%lld, %lld]", t.name, k, qtype_name(t.type).c_str(),
         (long long)t.ne[0], (long long)t.ne[1]);
  const auto* h = static_cast<const int32_t*>(t.data);
  const int64_t n = t.ne[0] * t.ne[1];
  for (int64_t i = 0; i < n; ++i)
    if (h[i] < 0 || h[i] >= n_experts)
      fail("moe_route: tensor '%s' maps token %lld to expert %d, outside [0, %d)", t.name, (long long)(i / k), h[i],
           n_experts);
  DeviceArray<int32_t> d(static_cast<size_t>(n));
  cuda::check(cudaMemcpyAsync(d.get(), h, size_t(n) * sizeof(int32_t), cudaMemcpyHostToDevice, stream_), t.name);
  return hash_tables_.emplace(t.data, std::move(d)).first->second.get();
}

// Expert ids 0..G-1 repeated, at least n of them (grow-only per G).
const int32_t* CudaBackend::group_ids(int groups, int64_t n) {
  DeviceArray<int32_t>& a = group_ids_[groups];
  if (int64_t(a.size()) < n) {
    a = DeviceArray<int32_t>(size_t(std::max<int64_t>(n, 64 * groups)));
    cuda::ramp_mod_cuda(a.get(), int64_t(a.size()), groups, stream_);
  }
  return a.get();
}

// ---- GEMV helpers -----------------------------------------------------------------------------------------

// BF16 & co (no GPU kernel; no tensor of the q2/q4 mixes): the CPU kernel on downloaded activations.
void CudaBackend::matmul_on_host(const WeightView& w, int expert, const float* x, int T, float* y) {
  const int64_t cols = w.ne[0], rows = w.ne[1];
  const std::vector<float> hx = to_host(x, size_t(T) * cols);
  std::vector<float> hy(size_t(T) * rows);
  const uint8_t* base = static_cast<const uint8_t*>(w.data) +
                        (expert < 0 ? 0 : size_t(expert) * size_t(rows) * size_t(row_bytes(w.type, cols)));
  dsv4::matmul(w.type, base, rows, cols, hx.data(), T, hy.data());
  upload(y, hy.data(), hy.size() * sizeof(float));
}

// y[t] = W x[t] for T tokens. w2/y2 (optional): a second matrix of the same type and shape over the same input,
// in the same launch.
void CudaBackend::dmatmul(const WeightView& w, int expert, const float* x, int T, float* y, const WeightView* w2,
                          float* y2, bool cacheable, bool gemm) {
  if (w2 && (w2->type != w.type || w2->ne[0] != w.ne[0] || w2->ne[1] != w.ne[1] || !cuda::gemv_supports(w.type))) {
    dmatmul(w, expert, x, T, y, nullptr, nullptr, cacheable, gemm);  // not pairable: two launches
    dmatmul(*w2, expert, x, T, y2, nullptr, nullptr, cacheable, gemm);
    return;
  }
  if (T <= 0) return;
  const int64_t cols = w.ne[0], rows = w.ne[1];
  if (expert >= 0 && (w.n_dims < 3 || expert >= w.ne[2])) fail("matmul: tensor '%s' has no expert %d", w.name, expert);
  if (!cuda::gemv_supports(w.type)) return matmul_on_host(w, expert, x, T, y);
  const GemvLayout layout = layout_for(w);
  const size_t off = expert < 0 ? 0 : size_t(expert) * size_t(rows) * size_t(device_row_bytes(w));
  if (gemm && use_gemm(w.type, layout, T, cols)) {  // prefill: tensor cores, weights read once per tile of tokens
    cuda::GemmParams gp;
    gp.wtype = w.type, gp.layout = layout, gp.w = weight(w) + off, gp.rows = rows, gp.cols = cols, gp.x = x;
    gp.n_tokens = T, gp.y = y;
    cuda::gemm_cuda(gp, workspace(cuda::gemm_workspace_bytes(gp)), stream_);
    if (w2) {
      gp.w = weight(*w2) + off, gp.y = y2;
      cuda::gemm_cuda(gp, workspace(cuda::gemm_workspace_bytes(gp)), stream_);
    }
    return;
  }
  cuda::GemvParams g;
  g.wtype = w.type, g.layout = layout, g.rows = rows, g.cols = cols, g.n_tokens = T, g.y = y;
  g.xq = activations(w.type, layout, x, T, cols, cacheable);
  g.w = weight(w) + off;
  if (w2) g.w2 = weight(*w2) + off, g.y2 = y2;
  cuda::gemv_cuda(g, stream_);
}

// Expert GEMV over slots: slot s uses expert ids[s] and activation row s / act_div; launches of at most
// kMaxSlotsPerLaunch slots (a multiple of act_div, so a token's slots never straddle two launches).
void CudaBackend::dmatmul_experts(const WeightView& w, const int32_t* ids, int n_slots, int act_div, const float* x,
                                  float* y, const WeightView* w2, float* y2) {
  if (w2 && (w2->type != w.type || w2->ne[0] != w.ne[0] || w2->ne[1] != w.ne[1] || w2->ne[2] != w.ne[2])) {
    dmatmul_experts(w, ids, n_slots, act_div, x, y);
    dmatmul_experts(*w2, ids, n_slots, act_div, x, y2);
    return;
  }
  const int64_t cols = w.ne[0], rows = w.ne[1];
  if (!cuda::gemv_supports(w.type) || w.n_dims < 3)
    fail("cuda backend: expert tensor '%s' (%s) is not supported", w.name, qtype_name(w.type).c_str());
  if (w2 && !cuda::gemv_supports(w2->type)) fail("cuda backend: expert tensor '%s' is not supported", w2->name);
  const GemvLayout layout = layout_for(w);
  const int64_t act_bytes = cuda::gpu_activation_bytes(w.type, cols, layout);
  const auto* xq = static_cast<const uint8_t*>(activations(w.type, layout, x, n_slots / act_div, cols, false));
  const int chunk = kMaxSlotsPerLaunch - kMaxSlotsPerLaunch % act_div;
  for (int s0 = 0; s0 < n_slots; s0 += chunk) {
    cuda::GemvParams g;
    g.wtype = w.type, g.layout = layout, g.w = weight(w), g.rows = rows, g.cols = cols;
    g.expert_stride = rows * device_row_bytes(w);
    g.expert_ids = ids + s0, g.n_slots = std::min(chunk, n_slots - s0), g.act_slot_div = act_div;
    g.xq = xq + int64_t(s0 / act_div) * act_bytes, g.y = y + int64_t(s0) * rows;
    if (w2) g.w2 = weight(*w2), g.y2 = y2 + int64_t(s0) * rows;
    cuda::gemv_cuda(g, stream_);
  }
}

// ---- general ops ------------------------------------------------------------------------------------------

void CudaBackend::embed(const WeightView& e, const int32_t* tokens, int T, int n, float* X) {
  Scope sc(*prof_, "embed", T);
  const int64_t D = e.ne[0], V = e.ne[1];
  wrote(X, size_t(T) * n * D * sizeof(float));
  if (cuda::embed_supports(e.type)) {
    cuda::embed_rows_cuda(e.type, mirror(e, GemvLayout::Ggml), V, D, tokens, T, n, X, stream_);
    return;
  }
  // Other encodings: decode on the host (never on the fast path: the q2/q4/f16 mixes store Q8_0/F16).
  const std::vector<int32_t> tok = to_host(tokens, size_t(T));
  const int64_t rb = row_bytes(e.type, D);
  std::vector<float> h(size_t(T) * n * D);
  for (int t = 0; t < T; ++t) {
    if (tok[size_t(t)] < 0 || tok[size_t(t)] >= V)
      fail("embed: token id %d at batch row %d outside tensor '%s' ([0, %lld))", tok[size_t(t)], t, e.name, (long long)V);
    float* x = h.data() + int64_t(t) * n * D;
    dequantize_row(e.type, static_cast<const uint8_t*>(e.data) + size_t(tok[size_t(t)]) * size_t(rb), x, D);
    for (int s = 1; s < n; ++s) std::memcpy(x + s * D, x, size_t(D) * sizeof(float));
  }
  upload(X, h.data(), h.size() * sizeof(float));
}

void CudaBackend::hc_pre(const HcWeights& w, const HcParams& p, const float* X, int T, float* a, float* post,
                         float* comb) {
  Scope sc(*prof_, "hc_pre", T);
  check_hc(p);
  const int64_t nd = int64_t(p.n) * p.d;
  float* mix = buffer(0, size_t(T) * cuda::kHcMix);
  float* rs = buffer(1, size_t(T));
  float* pre = buffer(2, size_t(T) * 4);
  const float *base = f32_weight(w.base), *scale = f32_weight(w.scale);
  if (hc_mix_applies(w.fn, cuda::kHcMix, nd, T)) {  // decode: projection + RMS + Sinkhorn in one launch
    cuda::HcMixParams hp;
    hp.fn = weight(w.fn), hp.n_mix = cuda::kHcMix, hp.X = X, hp.K = nd, hp.n_tokens = 1, hp.norm_eps = p.norm_eps;
    hp.base = base, hp.scale = scale, hp.iters = p.sinkhorn_iters, hp.eps = p.hc_eps;
    hp.pre = pre, hp.post = post, hp.comb = comb, hp.workspace = hc_mix_workspace(nd);
    cuda::hc_mix_cuda(hp, stream_);
    cuda::hc_collapse_cuda(X, pre, T, p.d, a, stream_);
    wrote(a, size_t(T) * p.d * sizeof(float));
    wrote(post, size_t(T) * 4 * sizeof(float));
    wrote(comb, size_t(T) * 16 * sizeof(float));
    return;
  }
  dmatmul(w.fn, -1, X, T, mix, nullptr, nullptr, false, /*gemm=*/false);
  cuda::rms_scale_cuda(X, T, nd, p.norm_eps, rs, stream_);
  cuda::HcSinkhornParams sp;
  sp.mix = mix, sp.mix_scale = rs, sp.base = base, sp.scale = scale;
  sp.pre = pre, sp.post = post, sp.comb = comb, sp.n_tokens = T, sp.iters = p.sinkhorn_iters, sp.eps = p.hc_eps;
  cuda::hc_split_sinkhorn_cuda(sp, stream_);
  cuda::hc_collapse_cuda(X, pre, T, p.d, a, stream_);
  wrote(a, size_t(T) * p.d * sizeof(float));
  wrote(post, size_t(T) * 4 * sizeof(float));
  wrote(comb, size_t(T) * 16 * sizeof(float));
}

void CudaBackend::hc_head(const HcHeadWeights& w, const HcParams& p, const float* X, int T, float* h) {
  Scope sc(*prof_, "hc_head", T);
  check_hc(p);
  const int64_t nd = int64_t(p.n) * p.d;
  float* mix = buffer(0, size_t(T) * 4);
  float* rs = buffer(1, size_t(T));
  float* hw = buffer(2, size_t(T) * 4);
  if (hc_mix_applies(w.fn, 4, nd, T)) {  // decode: projection + RMS + head weights in one launch
    cuda::HcMixParams hp;
    hp.fn = weight(w.fn), hp.n_mix = 4, hp.X = X, hp.K = nd, hp.n_tokens = 1, hp.norm_eps = p.norm_eps;
    hp.base = f32_weight(w.base), hp.scale = f32_weight(w.scale), hp.eps = p.hc_eps, hp.w = hw;
    hp.workspace = hc_mix_workspace(nd);
    cuda::hc_mix_cuda(hp, stream_);
  } else {
    dmatmul(w.fn, -1, X, T, mix, nullptr, nullptr, false, /*gemm=*/false);
    cuda::rms_scale_cuda(X, T, nd, p.norm_eps, rs, stream_);
    cuda::hc_head_weights_cuda(mix, rs, f32_weight(w.base), f32_weight(w.scale), T, p.hc_eps, hw, stream_);
  }
  cuda::hc_collapse_cuda(X, hw, T, p.d, h, stream_);
  wrote(h, size_t(T) * p.d * sizeof(float));
}

void CudaBackend::moe_route(const MoeWeights& w, const MoeParams& p, const float* x, const int32_t* tokens, int T,
                            int32_t* ids, float* weights) {
  Scope sc(*prof_, p.hash ? "moe_route (hash)" : "moe_route", T);
  const int E = p.n_experts, k = p.n_used;
  float* z = buffer(0, size_t(T) * E);
  dmatmul(w.gate_inp, -1, x, T, z, nullptr, nullptr, false, /*gemm=*/false);
  if (p.hash) cuda::gather_hash_ids_cuda(hash_table(w.tid2eid, E, k), w.tid2eid.ne[1], k, tokens, T, ids, stream_);
  const float* bias = w.exp_probs_b.present() ? f32_weight(w.exp_probs_b) : nullptr;
  cuda::moe_route_cuda(z, bias, T, E, k, p.weights_scale, p.hash, ids, weights, stream_);
  wrote(ids, size_t(T) * k * sizeof(int32_t));
  wrote(weights, size_t(T) * k * sizeof(float));
}

// Routed experts for T tokens (slots s = t*k + j). Writes g = SwiGLU(gate, up) * route weight [n_slots, F] (scratch
// 0) and, unless fused_down, the per-slot down outputs ye [n_slots, D] (scratch 2) for moe_sum. Prefill: the
// grouped-by-expert tensor-core GEMM (gemm.h). Decode: fused gate+up+SwiGLU in one staged launch where it applies
// (gemv.h), else paired gate/up GEMV + swiglu, then down as one MoE-mode launch.
void CudaBackend::moe_routed(const MoeWeights& w, const MoeParams& p, const float* x, const int32_t* ids,
                             const float* weights, int T, bool fused_down) {
  const int k = p.n_used, n_slots = T * k;
  const int64_t D = p.d, F = p.ff;
  float* ye = fused_down ? nullptr : buffer(2, size_t(n_slots) * D);
  const GemvLayout lg = layout_for(w.gate_exps);
  if (!fused_down && moe_gemm(w, T)) {
    cuda::MoeGemmParams mp;
    const WeightView* st[3] = {&w.gate_exps, &w.up_exps, &w.down_exps};
    cuda::ExpertStack* es[3] = {&mp.gate, &mp.up, &mp.down};
    for (int i = 0; i < 3; ++i)
      es[i]->type = st[i]->type, es[i]->layout = layout_for(*st[i]), es[i]->base = weight(*st[i]),
      es[i]->expert_stride = st[i]->ne[1] * device_row_bytes(*st[i]);
    mp.d = D, mp.ff = F, mp.n_experts = p.n_experts, mp.k = k, mp.ids = ids, mp.weights = weights, mp.x = x;
    mp.n_tokens = T, mp.swiglu_clamp = p.swiglu_clamp, mp.y_slots = ye;
    cuda::moe_gemm_cuda(mp, workspace(cuda::moe_gemm_workspace_bytes(mp)), stream_);
    return;
  }
  // The GEMV path's SwiGLU output (the GEMM above keeps its own in the workspace: allocating g before it cost
  // n_slots x F floats for nothing, 400 MB at a pass of 8192 tokens).
  float* g = buffer(0, size_t(n_slots) * F);
  const bool pair = w.up_exps.type == w.gate_exps.type && w.up_exps.ne[0] == D && w.up_exps.ne[1] == F;
  cuda::GemvParams gu = expert_launch(w.gate_exps, pair ? &w.up_exps : nullptr, ids, n_slots, k, nullptr, g);
  if (pair && n_slots <= kMaxSlotsPerLaunch && fused_moe_type(w.gate_exps.type)) {
    gu.xq = activations(w.gate_exps.type, lg, x, T, D, false);
    gu.y2 = g;  // unused by the fused launch (h goes to y), but a paired launch must name one
    cuda::moe_gate_up_swiglu_cuda(gu, weights, p.swiglu_clamp, stream_);
  } else {
    float* u = buffer(1, size_t(n_slots) * F);
    dmatmul_experts(w.gate_exps, ids, n_slots, k, x, g, &w.up_exps, u);  // gate + up: one launch when pairable
    cuda::swiglu_cuda(g, u, weights, n_slots, F, p.swiglu_clamp, g, stream_);
  }
  if (!fused_down) dmatmul_experts(w.down_exps, ids, n_slots, 1, g, ye);
}

// Expert ids come from moe_route on the device and are not checked here (the CPU oracle validates them).
// y = shared expert, then += the routed outputs summed in selection order (the CPU's order): either the fused
// down-projection + slot sum launch (GEMV sizes, routed-expert types), or per-slot outputs and moe_sum.
void CudaBackend::moe_ffn(const MoeWeights& w, const MoeParams& p, const float* x, const int32_t* ids,
                          const float* weights, int T, float* y) {
  Scope sc(*prof_, "moe_ffn", T);
  const int k = p.n_used, n_slots = T * k;
  const int64_t D = p.d, F = p.ff;
  cuda::GemvParams down = expert_launch(w.down_exps, nullptr, ids, n_slots, 1, nullptr, y);
  const bool fused_down = n_slots <= kMaxSlotsPerLaunch && k <= 8 && fused_moe_type(w.down_exps.type) &&
                          !moe_gemm(w, T) &&
                          cuda::gemv_staged_supported(down);
  {
    Scope part(*prof_, "moe_ffn.routed", T);
    moe_routed(w, p, x, ids, weights, T, fused_down);
  }
  {
    Scope part(*prof_, "moe_ffn.shared", T);
    // Unfused: the fused gate+up+SwiGLU launch takes only the routed-expert types (not the shared Q8_0).
    float* gs = buffer(3, size_t(T) * F);
    float* us = buffer(4, size_t(T) * F);
    dmatmul(w.gate_shexp, -1, x, T, gs, &w.up_shexp, us);
    cuda::swiglu_cuda(gs, us, nullptr, T, F, p.swiglu_clamp, gs, stream_);
    dmatmul(w.down_shexp, -1, gs, T, y);
  }
  if (fused_down) {
    Scope part(*prof_, "moe_ffn.routed_down", T);
    down.xq = activations(w.down_exps.type, layout_for(w.down_exps), buffer(0, size_t(n_slots) * F), n_slots, F, false);
    cuda::moe_down_sum_cuda(down, k, stream_);
  } else {
    cuda::moe_sum_cuda(buffer(2, size_t(n_slots) * D), T, k, D, y, stream_);
  }
  wrote(y, size_t(T) * D * sizeof(float));
}

// ---- attention ops ----------------------------------------------------------------------------------------

// Group g: input columns [g*gin, (g+1)*gin) of x through weight rows [g*ro, (g+1)*ro). Few tokens: one MoE-mode
// launch whose "experts" are the groups (x viewed as [T*G, gin] rows, slot t*G + g -> expert g, output rows
// [T*G, ro] == [T, G*ro]). More tokens: per group a dense launch on gathered rows (weights read once per 8).
void CudaBackend::matmul_grouped(const WeightView& w, int G, const float* x, int T, float* y) {
  Scope sc(*prof_, prof_->enabled() ? matmul_name("matmul_grouped", w) : std::string(), T);
  const int64_t gin = w.ne[0], ro = G > 0 ? w.ne[1] / G : 0;
  if (w.n_dims != 2 || G <= 0 || w.ne[1] % G != 0)
    fail("matmul_grouped: tensor '%s' ([%lld, %lld]) cannot be split into %d groups", w.name, (long long)w.ne[0],
         (long long)w.ne[1], G);
  wrote(y, size_t(T) * G * ro * sizeof(float));
  if (T <= 0) return;
  if (cpu_attention_ || !cuda::gemv_supports(w.type)) {
    const std::vector<float> hx = to_host(x, size_t(T) * G * gin);
    std::vector<float> hy(size_t(T) * G * ro);
    host_->matmul_grouped(w, G, hx.data(), T, hy.data());
    upload(y, hy.data(), hy.size() * sizeof(float));
    return;
  }
  const GemvLayout layout = layout_for(w);
  const uint8_t* dw = weight(w);
  const int64_t drb = device_row_bytes(w);
  if (T <= kGroupedMoeMaxTokens) {
    cuda::GemvParams g;
    g.wtype = w.type, g.layout = layout, g.w = dw, g.rows = ro, g.cols = gin, g.expert_stride = ro * drb;
    g.expert_ids = group_ids(G, int64_t(T) * G), g.n_slots = T * G, g.act_slot_div = 1, g.y = y;
    g.xq = activations(w.type, layout, x, int64_t(T) * G, gin, true);
    cuda::gemv_cuda(g, stream_);
    return;
  }
  float* xg = buffer(0, size_t(T) * gin);
  float* yg = buffer(1, size_t(T) * ro);
  for (int gi = 0; gi < G; ++gi) {
    cuda::check(cudaMemcpy2DAsync(xg, gin * sizeof(float), x + gi * gin, G * gin * sizeof(float), gin * sizeof(float),
                                  T, cudaMemcpyDeviceToDevice, stream_), "matmul_grouped gather");
    const uint8_t* wg = dw + size_t(gi) * size_t(ro) * size_t(drb);
    if (use_gemm(w.type, layout, T, gin)) {
      cuda::GemmParams gp;
      gp.wtype = w.type, gp.layout = layout, gp.w = wg, gp.rows = ro, gp.cols = gin, gp.x = xg, gp.n_tokens = T;
      gp.y = yg;
      cuda::gemm_cuda(gp, workspace(cuda::gemm_workspace_bytes(gp)), stream_);
    } else {
      cuda::GemvParams g;
      g.wtype = w.type, g.layout = layout, g.w = wg, g.rows = ro, g.cols = gin;
      g.n_tokens = T, g.y = yg, g.xq = activations(w.type, layout, xg, T, gin, false);
      cuda::gemv_cuda(g, stream_);
    }
    cuda::check(cudaMemcpy2DAsync(y + gi * ro, G * ro * sizeof(float), yg, ro * sizeof(float), ro * sizeof(float), T,
                                  cudaMemcpyDeviceToDevice, stream_), "matmul_grouped scatter");
  }
}

void CudaBackend::head_prep(float* x, int T, int H, int dim, const HeadPrep& p) {
  Scope sc(*prof_, "head_prep", T);
  const size_t n = size_t(T) * H * dim;
  wrote(x, n * sizeof(float));
  if (cpu_attention_) {
    std::vector<float> h = to_host(x, n);
    host_->head_prep(h.data(), T, H, dim, p);
    return upload(x, h.data(), n * sizeof(float));
  }
  const float* nw = (p.norm && p.norm_w && p.norm_w->present()) ? f32_weight(*p.norm_w) : nullptr;
  cuda::head_prep_device(x, T, H, dim, p, nw, stream_);
}

void CudaBackend::compressor_step(const CompressorParams& p, const CompressorBuffers& s, const float* v,
                                  const float* z, int T, int64_t p0) {
  Scope sc(*prof_, "compressor_step", T);
  if (T <= 0) return;
  const int cw = s.width();
  const size_t n_cur = size_t(s.ratio) * cw, n_prev = s.overlap ? size_t(s.ratio) * s.dim : 0;
  const size_t n_rows = size_t((p0 + T) / s.ratio) * s.dim;
  wrote(s.cur_v, n_cur * 4), wrote(s.cur_z, n_cur * 4), wrote(s.rows, n_rows * 4);
  if (n_prev) wrote(s.prev_v, n_prev * 4), wrote(s.prev_z, n_prev * 4);
  if (cpu_attention_) {
    // Staged copies of the whole state (rows up to this call's last window), the CPU op, then back.
    std::vector<float> cv = to_host(s.cur_v, n_cur), cz = to_host(s.cur_z, n_cur), rows = to_host(s.rows, n_rows);
    std::vector<float> pv = n_prev ? to_host(s.prev_v, n_prev) : std::vector<float>();
    std::vector<float> pz = n_prev ? to_host(s.prev_z, n_prev) : std::vector<float>();
    const std::vector<float> hv = to_host(v, size_t(T) * cw), hz = to_host(z, size_t(T) * cw);
    CompressorBuffers h = s;
    h.cur_v = cv.data(), h.cur_z = cz.data(), h.rows = rows.data();
    h.prev_v = n_prev ? pv.data() : nullptr, h.prev_z = n_prev ? pz.data() : nullptr;
    host_->compressor_step(p, h, hv.data(), hz.data(), T, p0);
    upload(s.cur_v, cv.data(), n_cur * 4), upload(s.cur_z, cz.data(), n_cur * 4), upload(s.rows, rows.data(), n_rows * 4);
    if (n_prev) upload(s.prev_v, pv.data(), n_prev * 4), upload(s.prev_z, pz.data(), n_prev * 4);
    return;
  }
  const float* nw = (p.norm && p.norm->present()) ? f32_weight(*p.norm) : nullptr;
  cuda::compressor_step_device(p, s, f32_weight(*p.ape), nw, v, z, T, p0, stream_);
}

void CudaBackend::indexer_topk(const IndexerParams& p, const float* qI, const float* wI, const float* keys, int T,
                               int64_t p0, int32_t* sel) {
  Scope sc(*prof_, "indexer_topk", T);
  if (T <= 0) return;
  wrote(sel, size_t(T) * p.top_k * sizeof(int32_t));
  if (cpu_attention_) {
    const size_t n_keys = size_t(std::max<int64_t>((p0 + T) / p.ratio, 0));
    const std::vector<float> hq = to_host(qI, size_t(T) * p.heads * p.dim), hw = to_host(wI, size_t(T) * p.heads);
    const std::vector<float> hk = to_host(keys, n_keys * p.dim);
    std::vector<int32_t> hs(size_t(T) * p.top_k, 0);
    host_->indexer_topk(p, hq.data(), hw.data(), hk.data(), T, p0, hs.data());
    return upload(sel, hs.data(), hs.size() * sizeof(int32_t));
  }
  float* scr = buffer(0, size_t(std::max<int64_t>(1, cuda::indexer_topk_scratch_floats(p, T, p0))));
  cuda::indexer_topk_device(p, qI, wI, keys, T, p0, sel, scr, stream_);
}

void CudaBackend::sink_attention(const SinkAttnParams& p, const float* q, const float* kv_new, const float* ring,
                                 const float* comp, const int32_t* sel, int T, int64_t p0, float* out) {
  Scope sc(*prof_, "sink_attention", T);
  if (T <= 0) return;
  const size_t nq = size_t(T) * p.heads * p.dim;
  wrote(out, nq * sizeof(float));
  if (cpu_attention_) {
    const size_t n_comp = p.comp != CompRows::None ? size_t((p0 + T) / p.ratio) : 0;
    const std::vector<float> hq = to_host(q, nq), hn = to_host(kv_new, size_t(T) * p.dim);
    const std::vector<float> hr = p0 > 0 ? to_host(ring, size_t(p.window) * p.dim) : std::vector<float>(1);
    const std::vector<float> hc = n_comp ? to_host(comp, n_comp * p.dim) : std::vector<float>(1);
    const std::vector<int32_t> hs =
        p.comp == CompRows::Selected ? to_host(sel, size_t(T) * p.top_k) : std::vector<int32_t>(1);
    std::vector<float> ho(nq);
    host_->sink_attention(p, hq.data(), hn.data(), hr.data(), hc.data(), hs.data(), T, p0, ho.data());
    return upload(out, ho.data(), nq * sizeof(float));
  }
  // The kernels validate row pointers of the row sets they may visit; a state with no compressed rows yet may
  // pass null (its rows buffer is still empty): any valid address stands in, no row of it is read.
  if (!dummy_.get()) dummy_ = DeviceArray<float>(64);
  if (p.comp != CompRows::None && !comp) comp = dummy_.get();
  if (!ring) ring = dummy_.get();
  float* scr = buffer(0, size_t(std::max<int64_t>(1, cuda::sink_attention_scratch_floats(p, T, p0))));
  cuda::sink_attention_device(p, f32_weight(*p.sinks), q, kv_new, ring, comp, sel, T, p0, out, scr, stream_);
}

// Ring slot (p0 + t) mod W = kv[t] for the last n = min(T, W) tokens: their slots are consecutive modulo W, so at
// most two contiguous device copies.
void CudaBackend::window_store(float* ring, int W, int dim, const float* kv, int T, int64_t p0) {
  Scope sc(*prof_, "window_store", T);
  if (T <= 0 || W <= 0) return;
  wrote(ring, size_t(W) * dim * sizeof(float));
  const int n = std::min(T, W);
  const int t0 = T - n;
  const int slot0 = int((p0 + t0) % W);
  const int first = std::min(n, W - slot0);
  const size_t row = size_t(dim) * sizeof(float);
  cuda::check(cudaMemcpyAsync(ring + int64_t(slot0) * dim, kv + int64_t(t0) * dim, size_t(first) * row,
                              cudaMemcpyDeviceToDevice, stream_), "window_store");
  if (first < n)
    cuda::check(cudaMemcpyAsync(ring, kv + int64_t(t0 + first) * dim, size_t(n - first) * row, cudaMemcpyDeviceToDevice,
                                stream_), "window_store (wrap)");
}

}  // namespace

std::unique_ptr<Backend> make_cuda_backend() { return std::make_unique<CudaBackend>(); }

bool cuda_backend_available() { return cuda::device_available(); }

}  // namespace dsv4
