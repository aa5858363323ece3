// CUDA implementation of the op table on device memory (see cuda_backend.h): memory, weights, GEMV helpers,
// embed and the factory. The class is in cuda_backend_impl.h; op groups live in cuda_backend_{hc,moe,attn}.cpp.
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_backend_impl.h"
#include "backend/cuda/gemv_dense_v2.h"

#include <cstdlib>
#include <cstring>

namespace dsv4 {
namespace cuda_impl {

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
// in the same launch. Prefill sizes (use_gemm) go to the GEMMs: with gemm, the FP16 tensor-core ones; without
// (the HC mixes and the router, whose outputs choose Sinkhorn weights and experts), the exact FP32 GEMM for
// F16/F32 weights, equal to the GEMV's f32 product up to summation order, so prefill decides as decode does.
// DSV4_CUDA_GEMM=0 keeps both kinds on the GEMVs.
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
  const bool exact = !gemm && cuda::gemm_exact_supports(w.type) && layout == GemvLayout::Ggml &&
                     T >= cuda::gemm_exact_min_tokens();
  if ((gemm || exact) && use_gemm(w.type, layout, T, cols)) {  // prefill: weights read once per tile of tokens
    cuda::GemmParams gp;
    gp.wtype = w.type, gp.layout = layout, gp.w = weight(w) + off, gp.rows = rows, gp.cols = cols, gp.x = x;
    gp.n_tokens = T, gp.y = y, gp.exact = exact;
    cuda::gemm_cuda(gp, workspace(cuda::gemm_workspace_bytes(gp)), stream_);
    if (w2) {
      gp.w = weight(*w2) + off, gp.y = y2;
      cuda::gemm_cuda(gp, workspace(cuda::gemm_workspace_bytes(gp)), stream_);
    }
    return;
  }
  cuda::GemvParams g;
  g.wtype = w.type, g.layout = layout, g.rows = rows, g.cols = cols, g.n_tokens = T, g.y = y;
  g.w = weight(w) + off;
  if (w2) g.w2 = weight(*w2) + off, g.y2 = y2;
  // Dense variant 2 where it applies (one token, unpaired; gemv_dense_v2.h): the default, with PDL
  // (DSV4_CUDA_GEMV_KERNEL=0: the streaming kernels).
  const int k = T == 1 && !w2 ? cuda::gemv_dense_kernel_env() : 0;
  // Split-layout input nobody has quantized (e.g. o_b's, written by o_a): variant 2 quantizes the float row
  // inside the launch (GemvParams::xf; same bytes, same products), saving the quantize launch and its kernel
  // boundary on the decode critical path. DSV4_CUDA_GEMV_XF=0: the separate quantize launch (A/B).
  if (k != 0 && layout == GemvLayout::Q8Split && cuda::gemv_xf_env() != cuda::kGemvXfOff &&
      !cached_activations(w.type, layout, x, T, cols)) {
    g.xf = x, g.kernel = k;
    if (cuda::gemv_v2_supported(g)) return cuda::gemv_cuda(g, stream_);
    g.xf = nullptr, g.kernel = 0;
  }
  g.xq = activations(w.type, layout, x, T, cols, cacheable);
  if (k != 0) {
    g.kernel = k;
    if (!cuda::gemv_v2_supported(g)) g.kernel = 0;
  }
  cuda::gemv_cuda(g, stream_);
}

// One token: the matrices in one variant-2 launch when they share type, layout and width (gemv_v2_multi_cuda;
// e.g. attn_q_a + attn_kv, a compressor's kv + gate), else one matmul each. Same products as matmul up to the
// fp32 order of a row's parts (tests/ops/gemv_v2_test.cpp: MatmulMulti).
void CudaBackend::matmul_multi(std::initializer_list<MatmulOut> outs, const float* x, int T) {
  const WeightView& w0 = *outs.begin()->w;
  for (const MatmulOut& o : outs) leave_side_unless_safe(o.w->type);
  if (cuda::timing_skip_weight(w0.name, T)) return;
  const int kernel = cuda::gemv_dense_kernel_env();
  bool one_launch = T == 1 && outs.size() >= 2 && kernel != 0 && cuda::gemv_supports(w0.type);
  std::vector<cuda::GemvV2Part> parts;
  for (const MatmulOut& o : outs) {
    const WeightView& w = *o.w;
    one_launch = one_launch && w.type == w0.type && w.ne[0] == w0.ne[0] && (w.n_dims < 3 || w.ne[2] == 1) &&
                 layout_for(w) == layout_for(w0);
    if (one_launch) parts.push_back({weight(w), o.y, w.ne[1]});
  }
  if (one_launch) {
    Scope sc(*prof_, prof_->enabled() ? matmul_name("matmul_multi", w0) : std::string(), T);
    cuda::GemvParams g;
    g.wtype = w0.type, g.layout = layout_for(w0), g.cols = w0.ne[0], g.n_tokens = 1;
    g.kernel = kernel;
    // As in dmatmul: an unquantized split-layout input is quantized inside the launch (DSV4_CUDA_GEMV_XF=0: not).
    // When the float launch does not fit (gemv_v2_multi_cuda launches nothing), the matrices go one by one below.
    if (g.layout == GemvLayout::Q8Split && cuda::gemv_xf_env() != cuda::kGemvXfOff &&
        !cached_activations(w0.type, g.layout, x, 1, w0.ne[0]))
      g.xf = x;
    else
      g.xq = activations(w0.type, g.layout, x, 1, w0.ne[0], /*cacheable=*/true);
    if (cuda::gemv_v2_multi_cuda(g, parts, stream_)) {
      for (const MatmulOut& o : outs) wrote(o.y, size_t(o.w->ne[1]) * sizeof(float));
      return;
    }
  }
  for (const MatmulOut& o : outs) matmul(*o.w, -1, x, T, o.y);
}

// Side line (Backend::begin_side): one token only (prefill products use GEMM workspaces shared by both lines).
// DSV4_CUDA_SIDE=0: everything in order (A/B).
void CudaBackend::begin_side(int T) {
  static const bool enabled = [] {
    const char* e = std::getenv("DSV4_CUDA_SIDE");
    return !(e && std::strcmp(e, "0") == 0);
  }();
  if (!enabled || T != 1 || on_side_ || cpu_attention_) return;
  attn_side_.fork(stream_);  // again while open: the side line's new ops also follow the main line's since then
  main_stream_ = stream_;
  stream_ = attn_side_.side();
  on_side_ = side_open_ = true;
}

void CudaBackend::end_side() {
  if (!on_side_) return;
  stream_ = main_stream_;
  on_side_ = false;
}

void CudaBackend::join_side() {
  end_side();
  if (!side_open_) return;
  attn_side_.join(stream_);
  side_open_ = false;
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

}  // namespace cuda_impl


std::unique_ptr<Backend> make_cuda_backend() { return std::make_unique<cuda_impl::CudaBackend>(); }

bool cuda_backend_available() { return cuda::device_available(); }

}  // namespace dsv4
