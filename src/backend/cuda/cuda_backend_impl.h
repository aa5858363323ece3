// Private to the CUDA backend: the CudaBackend class (the op table on device memory, cuda_backend.h) shared by
// its method files: cuda_backend.cpp (memory, weights, GEMV helpers, embed), cuda_backend_hc.cpp (HC control),
// cuda_backend_moe.cpp (router, experts), cuda_backend_attn.cpp (attention ops). One class, several files, so
// the op groups can change independently.
#pragma once


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
#include "backend/cuda/graph.h"
#include "backend/cuda/hc.h"
#include "backend/cuda/moe.h"
#include "backend/cuda/norm_rope.h"
#include "backend/cuda/profile.h"
#include "backend/cuda/timing_skip.h"
#include "common/error.h"
#include "quant/quant.h"


namespace dsv4::cuda_impl {

using cuda::DeviceArray;
using cuda::GemvLayout;
using Scope = cuda::OpProfiler::Scope;

// Grouped projections run as one MoE-mode launch (the groups as "experts") up to this many tokens: that launch
// reads the weight once per token, so larger batches use one dense launch per group (weights read once per 8).
inline constexpr int kGroupedMoeMaxTokens = 2;
// Slots of one MoE-mode launch: gemv_cuda allows 65535 CTA rows, a paired launch uses two per slot.
inline constexpr int kMaxSlotsPerLaunch = 32767;

class CudaBackend final : public Backend {
 public:
  CudaBackend() {
    if (!cuda::device_available()) fail("cuda backend: no CUDA device present");
    // The greatest priority (cuda_util.h main_stream_priority): side-stream CTAs yield to the critical path's.
    cuda::check(cudaStreamCreateWithPriority(&stream_, cudaStreamNonBlocking, cuda::main_stream_priority()),
                "cuda backend: cudaStreamCreate");
    attn_side_.set_priority(cuda::attention_side_priority());
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
    graphs_.reset();
    cudaStreamSynchronize(stream_);
    if (argmax_host_) cudaFreeHost(argmax_host_);
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
    attn_q8_.x = nullptr;      // the carried entry too (forget_all_activations keeps it through one reset)
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
    join_sinkhorn();
    cuda::check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_), "cuda backend: download");
    cuda::check(cudaStreamSynchronize(stream_), "cuda backend: download (a preceding op failed)");
  }
  void copy(void* dst, const void* src, size_t bytes) override {
    join_sinkhorn();
    wrote(dst, bytes);
    if (bytes) cuda::check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_), "cuda backend: copy");
  }
  void fill(float* dst, float value, size_t n) override {
    wrote(dst, n * sizeof(float));
    cuda::fill_f32_cuda(dst, value, n, stream_);
  }
  bool host_memory() const override { return false; }
  // Reduced on the device; only the index comes back (through a pinned word: no staging of pageable memory).
  int64_t argmax(const float* x, int64_t n) override {
    if (n <= 0) return -1;
    if (!argmax_out_.get()) argmax_out_ = DeviceArray<uint64_t>(1);
    if (!argmax_host_)
      cuda::check(cudaMallocHost(reinterpret_cast<void**>(&argmax_host_), sizeof(uint64_t)),
                  "cuda backend: argmax (pinned word)");
    cuda::argmax_usable_cuda(x, n, argmax_out_.get(), stream_);
    cuda::check(cudaMemcpyAsync(argmax_host_, argmax_out_.get(), sizeof(uint64_t), cudaMemcpyDeviceToHost, stream_),
                "cuda backend: argmax (copy)");
    cuda::check(cudaStreamSynchronize(stream_), "cuda backend: argmax (a preceding op failed)");
    return cuda::argmax_index_of_key(*argmax_host_);
  }

  // ---- general ops -----------------------------------------------------------------------------------------
  void embed(const WeightView& e, const int32_t* tokens, int T, int n, float* X) override;
  void rms_norm(const float* x, const WeightView* w, int T, int64_t dim, float eps, float* y) override {
    Scope sc(*prof_, "rms_norm", T);
    cuda::RmsNormParams p;
    p.x = x, p.y = y, p.rows = T, p.n = int(dim), p.eps = eps;
    p.w = (w && w->present()) ? f32_weight(*w) : nullptr;
    // No Q8 output here (rms_norm_cuda can write one): one CTA quantizing a 4096-wide row cost 3.0 us more than
    // the norm (H200 graph, wb_small at dc6bea6: 5.06 vs 2.03 us), a quantize launch 1.7 us. Its consumers (q_a,
    // kv, shared expert) share one quantization through the activation cache instead.
    cuda::rms_norm_cuda(p, stream_);
    wrote(y, size_t(T) * dim * sizeof(float));
  }
  void matmul(const WeightView& w, int expert, const float* x, int T, float* y) override {
    leave_side_unless_safe(w.type);
    Scope sc(*prof_, prof_->enabled() ? matmul_name("matmul", w) : std::string(), T);
    if (!cuda::timing_skip_weight(w.name, T)) dmatmul(w, expert, x, T, y, nullptr, nullptr, /*cacheable=*/true);
    wrote(y, size_t(T) * w.ne[1] * sizeof(float));
  }
  void matmul_multi(std::initializer_list<MatmulOut> outs, const float* x, int T) override;
  void begin_side(int T) override;
  void end_side() override;
  void join_side() override;
  void hc_pre(const HcWeights& w, const HcParams& p, const float* X, int T, float* a, float* post,
              float* comb) override;
  void hc_pre_norm(const HcWeights& w, const HcParams& p, const float* X, int T, const WeightView* norm,
                   float norm_eps, float* a, float* post, float* comb) override;
  void hc_post_pre_norm(const HcParams& p, const float* y, float* X, const HcWeights& w, int T,
                        const WeightView* norm, float norm_eps, float* a, float* post, float* comb) override;
  void hc_post(const HcParams& p, const float* y, const float* post, const float* comb, int T, float* X) override {
    join_sinkhorn();  // post / comb of the previous HC launch (launch_hc_norm's side Sinkhorn)
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
  void head_prep_batch(const HeadPrepJob* jobs, int n, int T) override;
  void compressor_step(const CompressorParams& p, const CompressorBuffers& s, const float* v, const float* z, int T,
                       int64_t p0) override;
  void compressor_step_pair(const CompressorJob& a, const CompressorJob& b, int T, int64_t p0) override;
  void indexer_topk(const IndexerParams& p, const float* qI, const float* wI, const float* keys, int T, int64_t p0,
                    int32_t* sel) override;
  void sink_attention(const SinkAttnParams& p, const float* q, const float* kv_new, const float* ring,
                      const float* comp, const int32_t* sel, int T, int64_t p0, float* out) override;
  void window_store(float* ring, int W, int dim, const float* kv, int T, int64_t p0) override;

  // ---- recorded segments (graph.cpp) -----------------------------------------------------------------------
  void run_segment(const std::vector<uint64_t>& key, const std::function<void()>& ops) override;
  cuda::SegmentGraphStats graph_stats() const { return graphs_ ? graphs_->stats() : cuda::SegmentGraphStats{}; }

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
    DeviceArray<uint8_t> d;
    try {
      d = DeviceArray<uint8_t>(w.n_bytes);
    } catch (const Error& e) {  // name the tensor and how far the upload got (e.g. a q2 file on an 80 GB card)
      fail("cuda backend: tensor '%s' (%.2f GB) does not fit in device memory after %.2f GB of weights: %s", w.name,
           double(w.n_bytes) / 1e9, double(uploaded_bytes_) / 1e9, e.what());
    }
    cuda::check(cudaMemcpyAsync(d.get(), w.data, w.n_bytes, cudaMemcpyHostToDevice, stream_), w.name);
    if (layout != GemvLayout::Ggml) {
      const int64_t n_rows = w.ne[1] * (w.n_dims >= 3 ? w.ne[2] : 1);
      DeviceArray<uint8_t> packed(size_t(n_rows * cuda::layout_row_bytes(w.type, layout, w.ne[0])));
      cuda::repack_weight_cuda(w.type, layout, d.get(), n_rows, w.ne[0], packed.get(), stream_);
      d = std::move(packed);  // cudaFree of the file-layout copy waits for the repack
    }
    uploaded_bytes_ += w.n_bytes;
    if (upload_observer_) upload_observer_(w.n_bytes, w.name);
    return weights_.emplace(key, std::move(d)).first->second.get();
  }
  void set_upload_observer(UploadObserver f) override { upload_observer_ = std::move(f); }
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
  struct ActEntry {
    const float* x = nullptr;  // cached input (null: nothing cached)
    int64_t rows = 0, cols = 0;
    uint64_t used = 0;         // act_clock_ at the last fill or hit
    DeviceArray<uint8_t> buf;
  };
  static constexpr int kActSlots = 2;             // entries per activation format
  static constexpr int kSplitProduceMaxRows = 8;  // producers quantize up to this many rows (GEMV sizes)
  // Quantized activations of `x` ([n_rows, cols]) for weights of type wtype in `layout`. F16/F32 weights read
  // the floats themselves (no copy). Each format keeps kActSlots recent entries (least recently used replaced):
  // a decode layer alternates inputs (attention input a -> q_a, then qr -> q_b, then a again -> kv), and one entry
  // per format re-quantized a for kv. A cacheable input (an op argument, i.e. forward memory) is recorded after
  // quantization; an entry stays valid until anything writes memory overlapping its x (wrote()) or any block is
  // freed. Internal scratch inputs are never recorded (they are rewritten inside ops without wrote()); a lookup
  // may still hit for any caller: entries only name live forward memory, which no scratch buffer can alias.
  // Producers (the q_a norm, head_prep) write split-layout entries themselves (split_out / publish_split).
  const void* activations(QType wtype, GemvLayout layout, const float* x, int64_t n_rows, int64_t cols, bool cacheable) {
    if (activation_type(wtype) == QType::F32 && layout == GemvLayout::Ggml) return x;
    const int kind = act_kind(wtype, layout);
    if (kind == act_kind(QType::Q8_0, GemvLayout::Q8Split) && attn_q8_.x && attn_q8_.x == x &&
        attn_q8_.rows == n_rows && attn_q8_.cols == cols)
      return attn_q8_.buf.get();
    for (int j = 0; j < kActSlots; ++j) {
      ActEntry& h = act_[size_t(kind * kActSlots + j)];
      if (h.x && h.x == x && h.rows == n_rows && h.cols == cols) {
        h.used = ++act_clock_;
        return h.buf.get();
      }
    }
    ActEntry& e = act_slot(kind, size_t(n_rows) * size_t(cuda::gpu_activation_bytes(wtype, cols, layout)));
    cuda::quantize_activations_cuda(wtype, x, n_rows, cols, e.buf.get(), stream_, layout);
    e.x = cacheable ? x : nullptr, e.rows = n_rows, e.cols = cols;
    return e.buf.get();
  }
  // The least recently used entry of `kind`, emptied, with room for `bytes`.
  ActEntry& act_slot(int kind, size_t bytes) {
    ActEntry* e = &act_[size_t(kind * kActSlots)];
    for (int j = 1; j < kActSlots; ++j)
      if (act_[size_t(kind * kActSlots + j)].used < e->used) e = &act_[size_t(kind * kActSlots + j)];
    e->x = nullptr, e->used = ++act_clock_;
    if (e->buf.size() < bytes) {
      const size_t n = std::max(bytes, e->buf.size() * 3 / 2);
      e->buf.reset();  // free first (see buffer())
      e->buf = DeviceArray<uint8_t>(n);
    }
    return *e;
  }
  // Lookup-only twin of activations() (the same entries, attn_q8_ included): the cached quantized rows of x, or
  // null (nothing launched, nothing touched). dmatmul / matmul_multi use it to pick the GEMV that quantizes a
  // missing split-layout row itself.
  const void* cached_activations(QType wtype, GemvLayout layout, const float* x, int64_t n_rows, int64_t cols) const {
    const int kind = act_kind(wtype, layout);
    if (kind == act_kind(QType::Q8_0, GemvLayout::Q8Split) && attn_q8_.x && attn_q8_.x == x &&
        attn_q8_.rows == n_rows && attn_q8_.cols == cols)
      return attn_q8_.buf.get();
    for (int j = 0; j < kActSlots; ++j) {
      const ActEntry& h = act_[size_t(kind * kActSlots + j)];
      if (h.x && h.x == x && h.rows == n_rows && h.cols == cols) return h.buf.get();
    }
    return nullptr;
  }
  // Producer side: an op about to write y ([rows, cols] floats of forward memory) that is likely a Q8_0
  // projection's input gets a split-layout buffer to quantize into in the same launch (null: not worth it: prefill
  // sizes, where the projections run on the FP16 GEMMs, or widths the split layout does not take). After the
  // launch, publish_split records the entry (the op has already called wrote(y)).
  void* split_out(int64_t rows, int64_t cols) {
    if (rows > kSplitProduceMaxRows || !cuda::q8_split_supported(cols)) return nullptr;
    split_pending_ = &act_slot(act_kind(QType::Q8_0, GemvLayout::Q8Split),
                               size_t(rows) * size_t(cuda::gpu_activation_bytes(QType::Q8_0, cols, GemvLayout::Q8Split)));
    return split_pending_->buf.get();
  }
  void publish_split(const float* y, int64_t rows, int64_t cols) {
    if (!split_pending_) return;
    split_pending_->x = y, split_pending_->rows = rows, split_pending_->cols = cols;
    split_pending_ = nullptr;
  }
  // The attention output's Q8 rows (sink_attention with q8_groups; the o_a projection's input). Not an LRU slot:
  // sink_attention runs between recorded segments (forward.cpp: the attention core) while its consumer,
  // matmul_grouped, opens the next segment, so the entry has to outlive that segment's host reset (see
  // forget_all_activations) and its buffer must be the same every token (a replayed graph reads a fixed
  // address; an LRU slot's choice depends on what ran before). Grows only (a DeviceArray: recordings are
  // invalidated when it moves). Null when not worth it (prefill sizes, widths the split layout does not take) or
  // unless DSV4_CUDA_ATTN_Q8=1.
  void* attn_q8_out(int64_t rows, int64_t cols) {
    attn_q8_.x = nullptr;
    if (!attn_q8_enabled_ || rows > kSplitProduceMaxRows || !cuda::q8_split_supported(cols)) return nullptr;
    const size_t bytes = size_t(rows) * size_t(cuda::gpu_activation_bytes(QType::Q8_0, cols, GemvLayout::Q8Split));
    if (attn_q8_.buf.size() < bytes) {
      attn_q8_.buf.reset();
      attn_q8_.buf = DeviceArray<uint8_t>(bytes);
    }
    return attn_q8_.buf.get();
  }
  // After the launch that wrote y (the op has already called wrote(y)): the entry survives the next host reset.
  void publish_attn_q8(const float* y, int64_t rows, int64_t cols) {
    attn_q8_.x = y, attn_q8_.rows = rows, attn_q8_.cols = cols;
    attn_q8_resets_left_ = 1;
  }
  static int act_kind(QType wtype, GemvLayout layout) {
    if (layout == GemvLayout::Q8Split) return 1;
    return activation_type(wtype) == QType::Q8_0 ? 0 : 2;
  }
  // Invalidates cached activations whose input overlaps [p, p + bytes).
  void wrote(const void* p, size_t bytes) {
    const auto* b = static_cast<const uint8_t*>(p);
    auto check = [&](ActEntry& e) {
      if (!e.x) return;
      const auto* xb = reinterpret_cast<const uint8_t*>(e.x);
      if (b < xb + size_t(e.rows * e.cols) * sizeof(float) && xb < b + bytes) e.x = nullptr;
    };
    for (ActEntry& e : act_) check(e);
    check(attn_q8_);
  }
  // Also resets the replacement order, so the buffers a recorded segment uses do not depend on what ran before.
  // The attention output's entry (attn_q8_out) is kept through the first reset after its publication: the reset
  // at the start of the segment that consumes it (SegmentGraphs::run; graph.h). That segment's recording then
  // depends on the entry, which is sound because in a recorded decode pass every segment after the first follows
  // its layer's attention core, which publishes the entry every token or never (fixed shapes, knob read once):
  // eager, capture and replay see the same state. Any later reset (after a replay or a failed capture) drops it.
  void forget_all_activations() noexcept {
    for (ActEntry& e : act_) e.x = nullptr, e.used = 0;
    if (attn_q8_resets_left_ > 0) --attn_q8_resets_left_;
    else attn_q8_.x = nullptr;
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
  // false so their products stay fp32 like the GEMV's (the exact FP32 GEMM at prefill sizes, gemm.h), and the
  // decisions taken from them (Sinkhorn weights, expert choice) are the same in prefill and decode.
  void dmatmul(const WeightView& w, int expert, const float* x, int T, float* y, const WeightView* w2 = nullptr,
               float* y2 = nullptr, bool cacheable = false, bool gemm = true);
  void dmatmul_experts(const WeightView& w, const int32_t* ids, int n_slots, int act_div, const float* x, float* y,
                       const WeightView* w2 = nullptr, float* y2 = nullptr);
  void matmul_on_host(const WeightView& w, int expert, const float* x, int T, float* y);
  std::string matmul_name(const char* op, const WeightView& w) const {
    return strfmt("%s %s %s", op, qtype_name(w.type).c_str(), cuda::tensor_class(w.name).c_str());
  }

  using WeightKey = std::tuple<const void*, size_t, uint32_t, uint32_t>;

  cudaStream_t stream_ = nullptr;
  std::unique_ptr<cuda::OpProfiler> prof_;
  std::map<WeightKey, DeviceArray<uint8_t>> weights_;
  size_t uploaded_bytes_ = 0;         // file bytes of the weights mirrored so far
  UploadObserver upload_observer_;
  std::map<const void*, DeviceArray<int32_t>> hash_tables_;
  std::map<int, DeviceArray<int32_t>> group_ids_;
  std::vector<DeviceArray<float>> scratch_;
  std::array<ActEntry, 3 * kActSlots> act_;  // [format][slot], format = act_kind()
  uint64_t act_clock_ = 0;
  ActEntry* split_pending_ = nullptr;  // split_out's entry until publish_split
  ActEntry attn_q8_;                   // attn_q8_out's entry (x null: nothing published)
  int attn_q8_resets_left_ = 0;        // host resets the published entry still survives
  // DSV4_CUDA_ATTN_Q8=1: sink_attention writes o_a's Q8 rows (read per backend). Off by default: measured no faster
  // end to end on the H200 (session 10, Flash q2 decode at 2k, three calls: 128.2 vs 132.1, 139.4 vs 139.3, 140.6
  // vs 142.2 t/s on vs off; dev/cuda/results/h200_s10_README.txt): the combine kernel's Q8 epilogue costs about
  // what the quantize launch it replaces did.
  const bool attn_q8_enabled_ = [] {
    const char* e = std::getenv("DSV4_CUDA_ATTN_Q8");
    return e && std::strcmp(e, "1") == 0;
  }();
  DeviceArray<uint8_t> gemm_ws_;
  DeviceArray<uint8_t> hc_ws_;  // hc_mix_cuda workspace (T == 1 launches only)
  DeviceArray<uint8_t> route_ws_;  // moe_route_fused_cuda workspace (z + ticket; zeroed at allocation)
  cuda::SideStream moe_side_;      // moe_ffn: the shared expert overlaps the routed experts (decode)
  // begin_side / end_side / join_side (decode only): while on_side_, stream_ is the side stream and main_stream_
  // the backend's own; side_open_ until join_side. Only F16/F32 GEMVs (no activation quantization, no scratch)
  // run there: any other matmul issued on the side line first leaves it (side_safe).
  cuda::SideStream attn_side_;
  cudaStream_t main_stream_ = nullptr;
  bool on_side_ = false, side_open_ = false;
  bool side_safe(QType t) const { return t == QType::F16 || t == QType::F32; }
  // A product of weight type t issued on the side line that would share the activation cache / scratch with the
  // main line leaves the side line first (and joins it): it then runs in order.
  // cuda_backend_hc.cpp: the shared tail of hc_pre_norm and hc_post_pre_norm's decode launch.
  void launch_hc_norm(cuda::HcMixParams& hp, const HcParams& p, int T, const WeightView* norm, float norm_eps);
  cuda::HcMixParams hc_norm_params(const HcWeights& w, const HcParams& p, const float* X, int kernel, float* a,
                                   float* post, float* comb);
  void leave_side_unless_safe(QType t) {
    if (on_side_ && !side_safe(t)) end_side(), join_side();
  }
  DeviceArray<float> dummy_;  // a valid device address for row pointers of empty row sets
  // launch_hc_norm's side Sinkhorn (HcMixParams::skip_sinkhorn). DSV4_CUDA_HC_SIDE_SINKHORN=0: in the HC launch
  // (A/B; the same bits either way). Read per backend.
  const bool hc_side_sinkhorn_ = [] {
    const char* e = std::getenv("DSV4_CUDA_HC_SIDE_SINKHORN");
    return !(e && std::strcmp(e, "0") == 0);
  }();
  cuda::SideStream hc_sinkhorn_side_;
  DeviceArray<float> hc_side_buf_;  // the launch's mix and rs for the side Sinkhorn
  bool sinkhorn_join_pending_ = false;
 public:
  // post / comb of the last HC launch are complete on the main stream from here on (no-op when none is pending).
  void join_sinkhorn() {
    if (!sinkhorn_join_pending_) return;
    hc_sinkhorn_side_.join(stream_);
    sinkhorn_join_pending_ = false;
  }
 private:
  DeviceArray<uint64_t> argmax_out_;  // argmax(): the key on the device, then in pinned host memory
  uint64_t* argmax_host_ = nullptr;
  // Decode graphs (graph.h). They bake in the addresses of the buffers above: every such buffer must be a
  // DeviceArray (device_malloc), whose allocation count invalidates the recordings when anything grows.
  std::unique_ptr<cuda::SegmentGraphs> graphs_;
  const bool graphs_enabled_ = [] {  // DSV4_CUDA_GRAPH=0: every op launched one by one
    const char* e = std::getenv("DSV4_CUDA_GRAPH");
    return !(e && std::strcmp(e, "0") == 0);
  }();
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

}  // namespace dsv4::cuda_impl
