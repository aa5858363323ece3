// CudaBackend: attention ops (grouped projection, head prep, compressor, indexer, sink attention, window).
#include "backend/cuda/cuda_backend_impl.h"
#include "backend/cuda/attention.h"
#include "backend/cuda/attention_rows.h"
#include "backend/cuda/gemv_dense_v2.h"
#include "backend/cuda/timing_skip.h"

namespace dsv4::cuda_impl {

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
  if (T <= 0 || cuda::timing_skip_weight(w.name, T)) return;
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
    // One token: dense variant 2 (the default; DSV4_CUDA_GEMV_KERNEL=0: off) in its grouped form (group s at
    // w + s * expert_stride: the same rows the id table 0..G-1 selects, without reading ids on the device).
    if (const int k = cuda::gemv_dense_kernel_env(); k != 0 && T == 1) {
      cuda::GemvParams v = g;
      v.expert_ids = nullptr, v.kernel = k;
      if (cuda::gemv_v2_supported(v)) g = v;
    }
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
  if (cuda::timing_skip("head_prep", T)) return;
  if (cpu_attention_) {
    std::vector<float> h = to_host(x, n);
    host_->head_prep(h.data(), T, H, dim, p);
    return upload(x, h.data(), n * sizeof(float));
  }
  const float* nw = (p.norm && p.norm_w && p.norm_w->present()) ? f32_weight(*p.norm_w) : nullptr;
  // A normed, unrotated single-head row (the q_a norm) is the q_b projection's input: quantized in the same launch.
  const bool feeds_matmul = H == 1 && p.norm && !p.rope && p.qat == AttnQat::None;
  void* q8 = feeds_matmul ? split_out(T, dim) : nullptr;
  cuda::head_prep_device(x, T, H, dim, p, nw, stream_, q8);
  if (q8) publish_split(x, T, dim);
}

// One launch for all jobs (decode: q, kv and the indexer query of a layer); each row as head_prep makes it.
void CudaBackend::head_prep_batch(const HeadPrepJob* jobs, int n, int T) {
  if (n <= 0 || T <= 0 || cuda::timing_skip("head_prep_batch", T)) return;
  if (cpu_attention_ || n > cuda::kRowMaxJobs) return Backend::head_prep_batch(jobs, n, T);
  Scope sc(*prof_, "head_prep_batch", T);
  const float* nw[cuda::kRowMaxJobs] = {};
  for (int j = 0; j < n; ++j) {
    const HeadPrep& p = jobs[j].p;
    wrote(jobs[j].x, size_t(T) * jobs[j].H * jobs[j].dim * sizeof(float));
    nw[j] = (p.norm && p.norm_w && p.norm_w->present()) ? f32_weight(*p.norm_w) : nullptr;
  }
  cuda::head_prep_batch_device(jobs, nw, n, T, stream_);
}

void CudaBackend::compressor_step(const CompressorParams& p, const CompressorBuffers& s, const float* v,
                                  const float* z, int T, int64_t p0) {
  Scope sc(*prof_, "compressor_step", T);
  if (T <= 0 || cuda::timing_skip("compressor_step", T)) return;
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

// A decode step of both compressors of a CSA layer in one launch; the state bookkeeping of compressor_step.
void CudaBackend::compressor_step_pair(const CompressorJob& a, const CompressorJob& b, int T, int64_t p0) {
  if (cpu_attention_ || T != 1) return Backend::compressor_step_pair(a, b, T, p0);
  Scope sc(*prof_, "compressor_step_pair", T);
  if (cuda::timing_skip("compressor_step_pair", T)) return;
  for (const CompressorJob* j : {&a, &b}) {
    const CompressorBuffers& s = j->s;
    const int cw = s.width();
    wrote(s.cur_v, size_t(s.ratio) * cw * 4), wrote(s.cur_z, size_t(s.ratio) * cw * 4);
    wrote(s.rows, size_t((p0 + T) / s.ratio) * s.dim * 4);
    if (s.overlap) wrote(s.prev_v, size_t(s.ratio) * s.dim * 4), wrote(s.prev_z, size_t(s.ratio) * s.dim * 4);
  }
  auto norm = [&](const CompressorParams& p) {
    return (p.norm && p.norm->present()) ? f32_weight(*p.norm) : static_cast<const float*>(nullptr);
  };
  cuda::compressor_step_pair_device(a, f32_weight(*a.p->ape), norm(*a.p), b, f32_weight(*b.p->ape), norm(*b.p), T, p0,
                                    stream_);
}

void CudaBackend::indexer_topk(const IndexerParams& p, const float* qI, const float* wI, const float* keys, int T,
                               int64_t p0, int32_t* sel) {
  Scope sc(*prof_, "indexer_topk", T);
  if (cuda::timing_skip("indexer_topk", T)) return;
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
  if (T <= 0 || cuda::timing_skip("sink_attention", T)) return;
  const size_t nq = size_t(T) * p.heads * p.dim;
  wrote(out, nq * sizeof(float));
  if (p.store_window) {
    if (!ring) fail("sink_attention: store_window needs the ring buffer");
    wrote(ring, size_t(p.window) * p.dim * sizeof(float));
  }
  if (cpu_attention_) {
    SinkAttnParams hp = p;
    hp.store_window = false;  // the host op sees a staged copy of the ring: the store is done here, after it
    const size_t n_comp = p.comp != CompRows::None ? size_t((p0 + T) / p.ratio) : 0;
    const std::vector<float> hq = to_host(q, nq), hn = to_host(kv_new, size_t(T) * p.dim);
    const std::vector<float> hr = p0 > 0 ? to_host(ring, size_t(p.window) * p.dim) : std::vector<float>(1);
    const std::vector<float> hc = n_comp ? to_host(comp, n_comp * p.dim) : std::vector<float>(1);
    const std::vector<int32_t> hs =
        p.comp == CompRows::Selected ? to_host(sel, size_t(T) * p.top_k) : std::vector<int32_t>(1);
    std::vector<float> ho(nq);
    host_->sink_attention(hp, hq.data(), hn.data(), hr.data(), hc.data(), hs.data(), T, p0, ho.data());
    upload(out, ho.data(), nq * sizeof(float));
    if (p.store_window) cuda::window_store_cuda(const_cast<float*>(ring), p.window, p.dim, kv_new, T, p0, stream_);
    return;
  }
  // The kernels validate row pointers of the row sets they may visit; a state with no compressed rows yet may
  // pass null (its rows buffer is still empty): any valid address stands in, no row of it is read.
  if (!dummy_.get()) dummy_ = DeviceArray<float>(64);
  if (p.comp != CompRows::None && !comp) comp = dummy_.get();
  if (!ring) ring = dummy_.get();
  float* scr = buffer(0, size_t(std::max<int64_t>(1, cuda::sink_attention_scratch_floats(p, T, p0))));
  // Decode: out also as the Q8 rows matmul_grouped (o_a) reads, written by the split combine kernel: one quantize
  // launch fewer on the critical path per layer. Published after the launch (attn_q8_out: kept for the next
  // recorded segment, which opens with that projection).
  void* q8 = nullptr;
  int64_t q8_rows = 0, q8_cols = 0;
  if (p.q8_groups > 0 && p.dim % 32 == 0 && (int64_t(p.heads) * p.dim) % p.q8_groups == 0) {
    q8_rows = int64_t(T) * p.q8_groups, q8_cols = int64_t(p.heads) * p.dim / p.q8_groups;
    q8 = attn_q8_out(q8_rows, q8_cols);
  }
  cuda::sink_attention_device(p, f32_weight(*p.sinks), q, kv_new, ring, comp, sel, T, p0, out, scr, stream_, q8,
                              q8_cols);
  if (q8) publish_attn_q8(out, q8_rows, q8_cols);
}

// Ring slot (p0 + t) mod W = kv[t] for the last min(T, W) tokens (window_store_cuda: at most two device copies).
void CudaBackend::window_store(float* ring, int W, int dim, const float* kv, int T, int64_t p0) {
  Scope sc(*prof_, "window_store", T);
  if (T <= 0 || W <= 0) return;
  wrote(ring, size_t(W) * dim * sizeof(float));
  cuda::window_store_cuda(ring, W, dim, kv, T, p0, stream_);
}

}  // namespace dsv4::cuda_impl
