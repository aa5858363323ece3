// The backend op table: the fixed set of DeepSeek-V4 ops the forward pass (src/model/forward.cpp) is written
// against, once, for every backend. The CPU backend (src/backend/cpu) is the oracle: plain, fp32-accumulating,
// multi-threaded over output rows with a static partition, so every output value is produced by one thread in
// one fixed summation order. That makes each token row's result independent of how many tokens are in the
// batch and of the thread count: chunked prefill == whole prefill bitwise, and decode == prefill bitwise.
//
// Ops are deliberately coarse (HC control with Sinkhorn in one op, routing in one op, the whole routed+shared
// expert FFN in one op) so a GPU backend can fuse each into a few kernels and keep routing decisions on the
// device. Activations are row-major [T, ...] fp32 arrays in backend memory (see MEMORY
// below). A batch row t is one token; rows may belong to different sessions, so nothing here keeps
// per-sequence state: positions and KV live in the caller's session state.
//
// Shapes use T = tokens in the batch, D = d_model, n = hc_mult, E = experts, k = experts per token.
//
// MEMORY. Every float* / int32_t* argument of an op is BACKEND MEMORY: a pointer obtained from alloc() (or an
// offset into such a block; pointer arithmetic on it is allowed, dereferencing it on the host is not, except
// for the CPU backend, whose memory is plain host memory). Activations, per-session attention state and
// routing decisions all live there; the host moves data only with upload() / download() / copy() / fill().
// Weights are WeightViews (host mmap); a device backend mirrors them itself (on first use).
//
// WHAT THE HOST KNOWS. The forward never reads backend memory inside a token: everything that positions and
// loop bounds depend on (positions p0 + t, window extents, compressed-row counts (p + 1) / m, top-k counts
// min(K, (p + 1) / m)) is a function of the session's token count, passed as plain integers. Data-dependent
// results (top-k indices, expert ids) are produced and consumed in backend memory. Logits come back with one
// download at the end of the pass. So a device backend can run a whole decode step asynchronously and capture
// it as a graph.
//
// ATTENTION (model-spec §6) is expressed by the ops head_prep, compressor_step, indexer_topk, sink_attention,
// window_store and matmul_grouped below, plus matmul; src/model/attention.cpp is the op sequence. Those ops
// work on ONE session's tokens: T consecutive tokens at positions p0 .. p0+T-1.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <utility>
#include <vector>

#include "common/argmax.h"
#include "model/rope.h"     // RopeFreqs: plain data (the functions are in the CPU backend library)
#include "model/weights.h"  // WeightView & weight structs: header-only plain data, no link dependency

namespace dsv4 {

// Hyper-connection hyperparameters (model-spec §4).
struct HcParams {
  int n = 4;                // streams
  int64_t d = 0;            // D
  int sinkhorn_iters = 20;
  float hc_eps = 1e-6f;
  float norm_eps = 1e-6f;   // eps of the unweighted RMS over the flattened n*D vector
};

// MoE hyperparameters of one layer (model-spec §7).
struct MoeParams {
  int n_experts = 0;        // E
  int n_used = 0;           // k
  int64_t d = 0;            // D
  int64_t ff = 0;           // F
  float weights_scale = 1.5f;  // routed_scaling_factor
  float swiglu_clamp = 10.f;
  bool hash = false;        // route by tid2eid instead of top-k
};

// QAT round trips of attention rows (model-spec §3.4).
enum class AttnQat {
  None,
  Fp8,         // FP8 e4m3 with power-of-two block scales (blocks of 64) on the first dim - n_rot dims
  Fp4Indexer,  // orthonormal Walsh-Hadamard over all dims, then FP4 e2m1 with power-of-two blocks of 32
};

// head_prep: what to do to every head row, in this order: RMSNorm, RoPE, QAT.
struct HeadPrep {
  bool norm = false;              // RMSNorm with an fp32 sequential sum of squares: x * rsqrt(mean(x^2) + eps)
  const WeightView* norm_w = nullptr;  // F32 [dim] weight of that norm (null: unweighted)
  float eps = 1e-6f;
  const RopeFreqs* rope = nullptr;     // null: no rotation; else rotate the last rope->n_rot dims (interleaved
                                       // pairs) by angle pos * omega_j, pos = pos0 + t (double angle, float
                                       // cos/sin: rope_cos_sin in model/rope.h)
  int64_t pos0 = 0;
  bool inverse = false;           // rotate by the negated angle (output de-rotation, model-spec §6.6)
  AttnQat qat = AttnQat::None;
};

// State buffers of one streaming compressor (model-spec §6.3, layout in model/compressor.h), backend memory.
struct CompressorBuffers {
  int ratio = 0;          // m
  int dim = 0;            // dC
  bool overlap = false;   // m == 4: width 2*dC, the A halves of a window feed the next row
  float* cur_v = nullptr; // [m, width]
  float* cur_z = nullptr; // [m, width] (ape already added)
  float* prev_v = nullptr;// [m, dC] (overlap only)
  float* prev_z = nullptr;// [m, dC] (overlap only)
  float* rows = nullptr;  // [capacity, dC] emitted rows; the caller guarantees capacity >= (p0 + T) / m
  int width() const { return overlap ? 2 * dim : dim; }
};

// Per-row finishing of a compressor's emitted rows.
struct CompressorParams {
  const WeightView* ape = nullptr;   // F32 [m, width]: added to the gate of the token in slot p mod m
  const WeightView* norm = nullptr;  // F32 [dC]: RMSNorm weight of emitted rows
  float eps = 1e-6f;
  const RopeFreqs* rope = nullptr;   // rotation of an emitted row w at position w * m
  AttnQat qat = AttnQat::None;       // Fp8 (main compressor) or Fp4Indexer (indexer compressor)
};

// One job of Backend::compressor_step_pair: compressor_step(*p, s, v, z, T, p0).
struct CompressorJob {
  const CompressorParams* p = nullptr;
  CompressorBuffers s;
  const float* v = nullptr;
  const float* z = nullptr;
};

// Lightning-indexer selection (model-spec §6.4).
struct IndexerParams {
  int heads = 0;          // HI
  int dim = 0;            // dI
  int ratio = 4;          // m: a query at p sees indexer keys [0, (p + 1) / m)
  int top_k = 0;          // K
  float weight_scale = 1; // the head weights are multiplied by this (1/sqrt(dI*HI)) before scoring
};

// One joint softmax over window rows, compressed rows and a per-head sink (model-spec §6.5).
enum class CompRows { None, All, Selected };
struct SinkAttnParams {
  int heads = 0, dim = 0;       // H, dh (K = V rows of dh floats)
  int window = 0;               // W: a query at p sees window positions [max(0, p - W + 1), p]
  int ratio = 0;                // m (All / Selected): compressed rows visible at p: (p + 1) / m
  CompRows comp = CompRows::None;
  int top_k = 0;                // K (Selected): sel row t holds min(K, (p + 1) / m) ascending row indices
  const WeightView* sinks = nullptr;  // F32 [H] sink logits
  float scale = 1.f;            // logit scale 1/sqrt(dh)
  // Decode fusions (one launch instead of three on a device backend; results as the separate ops give them):
  //   out_rope      then de-rotate every output row as head_prep with {rope = out_rope, pos0 = p0,
  //                 inverse = true} would (the output de-rotation of model-spec §6.6)
  //   store_window  then window_store(ring, W, dim, kv_new, T, p0): the ring argument is written, so it must be
  //                 the session's writable ring buffer (non-null)
  const RopeFreqs* out_rope = nullptr;
  bool store_window = false;
  // q8_groups > 0: out is next read by matmul_grouped with that many groups (Q8_0 weights), i.e. as T * q8_groups
  // rows of heads * dim / q8_groups columns; a device backend may quantize those rows for it in the attention
  // launch (saves the projection's quantize launch). out is unchanged; the CPU backend ignores it.
  int q8_groups = 0;
};

// One job of Backend::head_prep_batch: head_prep(x, T, H, dim, p).
struct HeadPrepJob {
  float* x = nullptr;
  int H = 0, dim = 0;
  HeadPrep p;
};

class Backend;

// RAII handle of a block of backend memory. Copying allocates a new block on the same backend and copies the
// bytes backend-side (session clone); moving transfers ownership. Empty handles have data() == nullptr.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(Backend* be, size_t bytes);
  ~DeviceBuffer() { release(); }
  DeviceBuffer(const DeviceBuffer& o);
  DeviceBuffer& operator=(const DeviceBuffer& o);
  DeviceBuffer(DeviceBuffer&& o) noexcept { swap(o); }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    DeviceBuffer t(std::move(o));
    swap(t);
    return *this;
  }
  void swap(DeviceBuffer& o) noexcept {
    std::swap(be_, o.be_);
    std::swap(p_, o.p_);
    std::swap(bytes_, o.bytes_);
  }

  void* data() const { return p_; }
  float* f32() const { return static_cast<float*>(p_); }
  int32_t* i32() const { return static_cast<int32_t*>(p_); }
  size_t bytes() const { return bytes_; }
  Backend* backend() const { return be_; }

 private:
  void release() noexcept;
  Backend* be_ = nullptr;
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;

  // ---- memory ------------------------------------------------------------------------------------------
  // A block of `bytes` bytes (contents undefined), aligned for any element type; throws dsv4::Error when out of
  // memory. Prefer alloc(), which returns an owning DeviceBuffer.
  virtual void* mem_alloc(size_t bytes) = 0;
  virtual void mem_free(void* p) noexcept = 0;
  // Host <-> backend and backend <-> backend copies of `bytes` bytes. download() returns when the bytes are on
  // the host (it waits for the ops issued before it); the others may be asynchronous, ordered with the ops.
  virtual void upload(void* dst, const void* host_src, size_t bytes) = 0;
  virtual void download(void* host_dst, const void* src, size_t bytes) = 0;
  virtual void copy(void* dst, const void* src, size_t bytes) = 0;
  // dst[i] = value for i < n.
  virtual void fill(float* dst, float value, size_t n) = 0;
  // Index of the largest of x[0..n) that is neither NaN nor -inf (the lowest index among equal ones; -1 when none
  // is): argmax_usable (common/argmax.h), the sampler's greedy rule. x is backend memory; returns once known (a
  // device backend waits for the ops before it). This default downloads x; a device backend reduces where x lives
  // and copies back only the index (greedy decoding then moves one id per token, not n_vocab floats).
  virtual int64_t argmax(const float* x, int64_t n);
  DeviceBuffer alloc(size_t bytes) { return DeviceBuffer(this, bytes); }
  // True when backend memory is ordinary host memory (the host may read and write it directly, and two such
  // backends may share buffers). The forward uses it only to skip copies, never for correctness.
  virtual bool host_memory() const { return false; }
  // Device backends copy each weight into their memory on first use; the observer (when set) hears every such
  // copy (file bytes, tensor name) so a load can report progress. Host-memory backends never call it.
  using UploadObserver = std::function<void(size_t bytes, const char* tensor)>;
  virtual void set_upload_observer(UploadObserver) {}

  // ---- recorded segments ---------------------------------------------------------------------------------
  // Runs `ops` (a run of op calls on this backend). A device backend may record them the first times and from
  // then on replay the recording in one submission (CUDA graphs: the decode step's position-free runs, see
  // forward.cpp). So the caller promises: what the ops launch depends only on `key` (it names the run and
  // every backend address and size the ops use; equal keys = identical op calls); no op reads backend memory on
  // the host, allocates or frees it; the ops need not run on the host at all (no host-side effects). Host-memory
  // backends just call ops().
  virtual void run_segment(const std::vector<uint64_t>& key, const std::function<void()>& ops) { ops(); }

  // ---- ops ---------------------------------------------------------------------------------------------

  // X[t][s][:] = embedding row of tokens[t] for every stream s < n.       X: [T, n, D], tokens: [T]
  // (token ids are validated by the caller on the host before upload).
  virtual void embed(const WeightView& tok_embd, const int32_t* tokens, int T, int n, float* X) = 0;

  // y[t] = x[t] * rsqrt(mean(x[t]^2) + eps) * w  (w may be null: unweighted).  x, y: [T, dim] (may alias)
  virtual void rms_norm(const float* x, const WeightView* w, int T, int64_t dim, float eps, float* y) = 0;

  // y[t][r] = sum_c W[r][c] * x[t][c] with W 2-D, or expert `expert` of a 3-D stack (expert = -1 for 2-D).
  // x: [T, W.cols()], y: [T, W.rows()]. The weight's quant type decides the activation format.
  virtual void matmul(const WeightView& w, int expert, const float* x, int T, float* y) = 0;
  // Several 2-D weights over the same input (every W_i has x's width): y_i = W_i x[t], the products matmul()
  // computes for each, which is what this default does; a device backend may run the set in one launch.
  struct MatmulOut {
    const WeightView* w = nullptr;
    float* y = nullptr;
  };
  virtual void matmul_multi(std::initializer_list<MatmulOut> outs, const float* x, int T) {
    for (const MatmulOut& o : outs) matmul(*o.w, -1, x, T, o.y);
  }
  // A side line of independent products: ops issued between begin_side(T) and end_side() may run concurrently
  // with the ops issued after end_side() up to join_side(); after join_side() everything is ordered again. The
  // caller guarantees the two lines touch disjoint memory and puts only matmul / matmul_multi (of T tokens) on the
  // side line. begin_side again before join_side appends to the side line, after everything issued so far.
  // Values never change; the default runs everything in order (no-ops).
  virtual void begin_side(int T) { (void)T; }
  virtual void end_side() {}
  virtual void join_side() {}

  // HC control + Sinkhorn + stream mix (model-spec §4 steps 1-8).
  //   X: [T, n, D] residual streams; a: [T, D] sublayer input sum_i pre[i] X[i];
  //   post: [T, n]; comb: [T, n, n] row = input stream i, column = output stream o.
  virtual void hc_pre(const HcWeights& w, const HcParams& p, const float* X, int T, float* a, float* post,
                      float* comb) = 0;
  // hc_pre, then rms_norm(a, norm, T, p.d, norm_eps, a) (the sublayer's attn_norm / ffn_norm): what this default
  // does; a device backend may do both in one launch, with the same results.
  virtual void hc_pre_norm(const HcWeights& w, const HcParams& p, const float* X, int T, const WeightView* norm,
                           float norm_eps, float* a, float* post, float* comb) {
    hc_pre(w, p, X, T, a, post, comb);
    rms_norm(a, norm, T, p.d, norm_eps, a);
  }
  // hc_post(p, y, post, comb, T, X), then hc_pre_norm(w, p, X, T, norm, norm_eps, a, post, comb): the end of one
  // sublayer and the start of the next in one call (post / comb are read, then overwritten with the new ones).
  // What this default does; a device backend may do it in one launch, with the same results.
  virtual void hc_post_pre_norm(const HcParams& p, const float* y, float* X, const HcWeights& w, int T,
                                const WeightView* norm, float norm_eps, float* a, float* post, float* comb) {
    hc_post(p, y, post, comb, T, X);
    hc_pre_norm(w, p, X, T, norm, norm_eps, a, post, comb);
  }
  // X[t][o] = post[t][o] * y[t] + sum_i comb[t][i][o] * X[t][i]  (in place).   y: [T, D]
  virtual void hc_post(const HcParams& p, const float* y, const float* post, const float* comb, int T,
                       float* X) = 0;
  // Final HC head: h[t] = sum_i w_i X[t][i] with w = sigmoid(fn.x * rsqrt(..) * scale + base) + hc_eps.
  //   X: [T, n, D], h: [T, D]
  virtual void hc_head(const HcHeadWeights& w, const HcParams& p, const float* X, int T, float* h) = 0;

  // MoE routing (model-spec §7 steps 1-3): expert ids [T, k] and routing weights [T, k] (already normalized
  // over the k unbiased scores and multiplied by weights_scale). x: [T, D] ffn_norm-ed input; tokens: [T] in
  // backend memory (hash layers look their tid2eid row up inside the op).
  virtual void moe_route(const MoeWeights& w, const MoeParams& p, const float* x, const int32_t* tokens, int T,
                         int32_t* expert_ids, float* expert_weights) = 0;
  // Routed experts (weight applied before the down projection) + shared expert, clamped SwiGLU.
  //   x: [T, D] -> y: [T, D]; experts accumulated in selection order, then the shared expert.
  virtual void moe_ffn(const MoeWeights& w, const MoeParams& p, const float* x, const int32_t* expert_ids,
                       const float* expert_weights, int T, float* y) = 0;

  // ---- attention (one session's T consecutive tokens at positions p0 .. p0+T-1) ------------------------
  // Grouped low-rank projection: input group g (columns [g*gin, (g+1)*gin) of x) goes through output rows
  // [g*ro, (g+1)*ro) of the 2-D weight w (w.cols() == gin, w.rows() == G*ro):
  //   y[t][g*ro + r] = sum_c W[g*ro + r][c] * x[t][g*gin + c].        x: [T, G*gin], y: [T, G*ro]
  // Each output value is the same dot product matmul() computes for that weight row.
  virtual void matmul_grouped(const WeightView& w, int groups, const float* x, int T, float* y) = 0;

  // In place on x: [T, H, dim]: for every token t and head h, RMSNorm, RoPE at position p.pos0 + t, QAT, as
  // selected in p (see HeadPrep). Used for q (norm + rope), kv (weighted norm + rope + Fp8), indexer q (rope +
  // Fp4Indexer) and the output de-rotation (inverse rope).
  virtual void head_prep(float* x, int T, int H, int dim, const HeadPrep& p) = 0;
  // The jobs' head_preps (disjoint buffers) on the same T tokens, with the results of separate calls, which is
  // what this default does; a device backend runs them in one launch (decode: q, kv and the indexer query).
  virtual void head_prep_batch(const HeadPrepJob* jobs, int n, int T) {
    for (int i = 0; i < n; ++i) head_prep(jobs[i].x, T, jobs[i].H, jobs[i].dim, jobs[i].p);
  }

  // Streaming compressor (model-spec §6.3): feeds tokens p0 .. p0+T-1 with projections v, z: [T, width] (z
  // without ape) into the state buffers s. Token p writes slot p mod m of cur_v / cur_z (z + ape[p mod m]);
  // when p = (w+1)m - 1 it closes window w: per channel a softmax over the gates of the window's slots (overlap:
  // prev slots 0..m-1 then cur B-halves 0..m-1; else cur 0..m-1) pools the values into one dC row, which is
  // RMSNorm-ed (p.norm), rotated at position w*m and QAT-rounded (p.qat), then written to s.rows[w]; with
  // overlap the closed window's A halves become prev. Rows are emitted in position order.
  virtual void compressor_step(const CompressorParams& p, const CompressorBuffers& s, const float* v,
                               const float* z, int T, int64_t p0) = 0;
  // Two independent compressors (disjoint state: a CSA layer's main and indexer compressors) fed the same tokens,
  // with the results of two compressor_step calls, which is what this default does; a device backend runs a
  // decode step of both in one launch.
  virtual void compressor_step_pair(const CompressorJob& a, const CompressorJob& b, int T, int64_t p0) {
    compressor_step(*a.p, a.s, a.v, a.z, T, p0);
    compressor_step(*b.p, b.s, b.v, b.z, T, p0);
  }

  // Top-k compressed rows per query (model-spec §6.4). qI: [T, HI, dI] (roped, QAT-rounded), wI: [T, HI] raw
  // head weights, keys: [n, dI] indexer rows with n >= (p0 + T) / m. For token t at p = p0 + t with
  // n_vis = (p + 1) / m: score(i) = sum_h (wI[t][h] * weight_scale) * ReLU(qI[t][h] . keys[i]) for i < n_vis;
  // sel[t][0 .. min(K, n_vis)) = the K best rows (ties to the lower row) in ascending row order (all rows when
  // n_vis <= K). sel: [T, K]; entries past the count are unspecified.
  virtual void indexer_topk(const IndexerParams& p, const float* qI, const float* wI, const float* keys, int T,
                            int64_t p0, int32_t* sel) = 0;

  // Sink attention (model-spec §6.5) of every (token t, head h): query q[t][h] (dh floats) over the rows
  //   window: positions [max(0, p - W + 1), p], p = p0 + t: positions >= p0 are rows of kv_new [T, dh], earlier
  //           ones are ring slots pos mod W (ring [W, dh], not yet updated with this call's tokens);
  //   then compressed rows of comp [n, dh]: All: rows 0 .. (p + 1)/m - 1; Selected: rows sel[t][0..min(K,
  //   (p + 1)/m)) in that order; None: none.
  // out[t][h] = sum_r e_r row_r / (exp(sink_h - M) + sum_r e_r), e_r = exp(scale * q.row_r - M), M the max over
  // the sink and all logits. Window rows are visited in position order, then compressed rows.   out: [T, H, dh]
  virtual void sink_attention(const SinkAttnParams& p, const float* q, const float* kv_new, const float* ring,
                              const float* comp, const int32_t* sel, int T, int64_t p0, float* out) = 0;

  // Window ring update: ring slot (p0 + t) mod W = kv[t] for the last min(T, W) tokens.  ring: [W, dim]
  virtual void window_store(float* ring, int W, int dim, const float* kv, int T, int64_t p0) = 0;
};

// Grows b to at least `bytes` on `be`; contents are not kept. The old block is released before the new one is
// allocated, so a grow-only scratch never holds both (that would double the peak at large passes).
inline void grow_discarding(Backend& be, DeviceBuffer& b, size_t bytes) {
  if (b.bytes() >= bytes) return;
  b = DeviceBuffer();
  b = be.alloc(bytes);
}

inline DeviceBuffer::DeviceBuffer(Backend* be, size_t bytes) : be_(be), bytes_(bytes) {
  p_ = bytes ? be->mem_alloc(bytes) : nullptr;
}
inline DeviceBuffer::DeviceBuffer(const DeviceBuffer& o) : be_(o.be_), bytes_(o.bytes_) {
  p_ = (be_ && bytes_) ? be_->mem_alloc(bytes_) : nullptr;
  if (p_) be_->copy(p_, o.p_, bytes_);
}
inline DeviceBuffer& DeviceBuffer::operator=(const DeviceBuffer& o) {
  if (this != &o) {
    DeviceBuffer t(o);
    swap(t);
  }
  return *this;
}
inline void DeviceBuffer::release() noexcept {
  if (be_ && p_) be_->mem_free(p_);
  p_ = nullptr;
}

inline int64_t Backend::argmax(const float* x, int64_t n) {
  if (n <= 0) return -1;
  if (host_memory()) return argmax_usable(x, n);
  std::vector<float> h(static_cast<size_t>(n));
  download(h.data(), x, size_t(n) * sizeof(float));
  return argmax_usable(h.data(), n);
}

}  // namespace dsv4
