// CudaBackend: hyper-connection control (hc_pre, hc_head).
#include <cstdlib>
#include <cstring>

#include "backend/cuda/cuda_backend_impl.h"
#include "backend/cuda/timing_skip.h"

namespace dsv4::cuda_impl {

namespace {

// The decode HC control kernel (hc.h) for hc_pre / hc_pre_norm / hc_post_pre_norm: by default the split kernels
// (kHcMixSplit: d / 32 CTAs for the fn product, then one small cluster for the collapse and norm, no grid barrier)
// where they fit, else the cluster kernel (one 16-CTA cluster, also hc_head's). DSV4_CUDA_HC_KERNEL=cluster: the
// cluster kernel (session 9's default); =wide: the wide kernel (d / 32 CTAs meeting at a grid barrier; measured slower
// end to end, H200, 3977003, Flash q2 decode at 2k: 116.3 t/s with wide vs 130.6 with cluster, same call); =ticket:
// the ticket kernel + separate collapse. Cluster and ticket give the same bits, split and wide the same bits; the
// two pairs differ in the fp32 summation order only (tests/ops/hc_cluster_test.cpp). Read per call so a test can
// switch it.
int hc_decode_kernel(int n_mix, int64_t K) {
  const char* e = std::getenv("DSV4_CUDA_HC_KERNEL");
  if (e && std::strcmp(e, "ticket") == 0) return cuda::kHcMixTicket;
  const bool wide = e && std::strcmp(e, "wide") == 0;
  if (wide && cuda::hc_mix_wide_fits(n_mix, K)) return cuda::kHcMixWide;
  const bool split = !e || !*e || std::strcmp(e, "split") == 0;
  if (split && cuda::hc_mix_split_fits(n_mix, K)) return cuda::kHcMixSplit;
  return cuda::hc_mix_cluster_fits(n_mix, K) ? cuda::kHcMixCluster : cuda::kHcMixTicket;
}

// DSV4_CUDA_HC_Q8=0: the split kernel does not write `a` in the Q8_0 split layout for the next projection (the
// projection quantizes it in its own launch, as before), for A/B. Read per call.
bool hc_q8_out() {
  const char* e = std::getenv("DSV4_CUDA_HC_Q8");
  return !(e && std::strcmp(e, "0") == 0);
}

// DSV4_CUDA_HC_NORM=0: hc_pre_norm as two launches (hc_pre, then rms_norm) instead of the norm inside the cluster
// launch, for A/B; the bits are the same either way (tests/ops/hc_cluster_test.cpp). Read per call.
bool hc_norm_fused() {
  const char* e = std::getenv("DSV4_CUDA_HC_NORM");
  return !(e && std::strcmp(e, "0") == 0);
}

// DSV4_CUDA_HC_POST=0: hc_post_pre_norm as hc_post + hc_pre_norm (two launches) instead of the previous sublayer's
// hc_post inside the cluster launch (HcMixParams::post_y), for A/B; the same bits either way. Read per call.
bool hc_post_fused() {
  const char* e = std::getenv("DSV4_CUDA_HC_POST");
  return !(e && std::strcmp(e, "0") == 0);
}

// The fields every decode (T == 1) hc_pre-family launch sets the same way (hc_pre, hc_pre_norm,
// hc_post_pre_norm): the 24-column projection of X, the Sinkhorn constants, the outputs and the workspace. The
// callers resolve the pointers first, in their own order (the weight mirrors and buffers allocate on first use).
cuda::HcMixParams hc_mix_decode_params(const HcParams& p, const void* fn, const float* base, const float* scale,
                                       const float* X, int64_t nd, float* pre, float* post, float* comb,
                                       void* workspace) {
  cuda::HcMixParams hp;
  hp.fn = fn, hp.n_mix = cuda::kHcMix, hp.X = X, hp.K = nd, hp.n_tokens = 1, hp.norm_eps = p.norm_eps;
  hp.base = base, hp.scale = scale, hp.iters = p.sinkhorn_iters, hp.eps = p.hc_eps;
  // DSV4_CUDA_SKIP=hc_sinkhorn (timing only, outputs wrong): one Sinkhorn round instead of p.sinkhorn_iters (the
  // kernels need >= 1) in the decode launches, to see whether the Sinkhorn warp is on the critical path (a launch
  // ends with its slowest warp).
  if (cuda::timing_skip("hc_sinkhorn", 1)) hp.iters = 1;
  hp.pre = pre, hp.post = post, hp.comb = comb, hp.workspace = workspace;
  return hp;
}

}  // namespace

// The decode control launch of hc_pre_norm / hc_post_pre_norm once hp holds the projection, the kernel and the
// outputs: the norm of `a` in the launch, with the split kernel also a's Q8 rows for the next projection (published
// to the activation cache after the launch); a, post and comb recorded as written.
// The decode parameters of hc_pre_norm / hc_post_pre_norm: the projection of X with kernel `kernel`, the outputs
// and the fused collapse into a (weights mirrored and buffers made in one order for both).
cuda::HcMixParams CudaBackend::hc_norm_params(const HcWeights& w, const HcParams& p, const float* X, int kernel,
                                              float* a, float* post, float* comb) {
  const int64_t nd = int64_t(p.n) * p.d;
  const uint8_t* fn = weight(w.fn);
  const float *base = f32_weight(w.base), *scale = f32_weight(w.scale);
  float* pre = buffer(2, 4);
  cuda::HcMixParams hp = hc_mix_decode_params(p, fn, base, scale, X, nd, pre, post, comb, hc_mix_workspace(nd));
  hp.kernel = kernel, hp.a = a;
  return hp;
}

void CudaBackend::launch_hc_norm(cuda::HcMixParams& hp, const HcParams& p, int T, const WeightView* norm,
                                 float norm_eps) {
  hp.a_norm = true, hp.a_norm_w = (norm && norm->present()) ? f32_weight(*norm) : nullptr, hp.a_norm_eps = norm_eps;
  if (hp.kernel == cuda::kHcMixSplit && hc_q8_out()) hp.a_q8 = split_out(T, p.d);  // the next projection's input
  // The Sinkhorn (post, comb) as its own launch on a side stream (HcMixParams::skip_sinkhorn), joined before
  // anything reads post / comb (join_sinkhorn: every HC op, download, copy, the end of a recorded segment).
  const bool side = hc_side_sinkhorn_ && hp.kernel == cuda::kHcMixSplit && T == 1 && hp.n_mix == cuda::kHcMix &&
                    cuda::hc_mix_split_fits(hp.n_mix, hp.K);
  if (side) {
    if (!hc_side_buf_.get()) hc_side_buf_ = DeviceArray<float>(32);  // mix [24] | rs [1] | pre (unused) [4]
    hp.mix_out = hc_side_buf_.get(), hp.rs_out = hc_side_buf_.get() + cuda::kHcMix, hp.skip_sinkhorn = true;
  }
  cuda::hc_mix_cuda(hp, stream_);
  if (side) {
    cuda::HcSinkhornParams sp;
    sp.mix = hp.mix_out, sp.mix_scale = hp.rs_out, sp.base = hp.base, sp.scale = hp.scale;
    sp.pre = hc_side_buf_.get() + cuda::kHcMix + 4, sp.post = hp.post, sp.comb = hp.comb;
    sp.n_tokens = 1, sp.iters = hp.iters, sp.eps = hp.eps;
    hc_sinkhorn_side_.fork(stream_);
    cuda::hc_split_sinkhorn_cuda(sp, hc_sinkhorn_side_.side());
    sinkhorn_join_pending_ = true;
  }
  wrote(hp.a, size_t(T) * p.d * sizeof(float));
  wrote(hp.post, size_t(T) * 4 * sizeof(float));
  wrote(hp.comb, size_t(T) * 16 * sizeof(float));
  if (hp.a_q8) publish_split(hp.a, T, p.d);
}

void CudaBackend::hc_pre(const HcWeights& w, const HcParams& p, const float* X, int T, float* a, float* post,
                         float* comb) {
  join_sinkhorn();  // post / comb of the previous HC launch (launch_hc_norm's side Sinkhorn)
  Scope sc(*prof_, "hc_pre", T);
  check_hc(p);
  const int64_t nd = int64_t(p.n) * p.d;
  float* mix = buffer(0, size_t(T) * cuda::kHcMix);
  float* rs = buffer(1, size_t(T));
  float* pre = buffer(2, size_t(T) * 4);
  const float *base = f32_weight(w.base), *scale = f32_weight(w.scale);
  if (hc_mix_applies(w.fn, cuda::kHcMix, nd, T)) {  // decode: projection + RMS + Sinkhorn in one launch
    // With the ticket kernel the collapse stays a launch of its own: its fused collapse (one CTA walking the 64 KiB
    // of X after the Sinkhorn) was slower in a graph (H200, wb_small at dc6bea6: 10.97 vs 8.98 us).
    const uint8_t* fn = weight(w.fn);
    cuda::HcMixParams hp = hc_mix_decode_params(p, fn, base, scale, X, nd, pre, post, comb, hc_mix_workspace(nd));
    const int kernel = hc_decode_kernel(cuda::kHcMix, nd);
    const bool cluster = kernel != cuda::kHcMixTicket;
    if (cluster) hp.kernel = kernel, hp.a = a;  // the collapse spread over the CTAs
    cuda::hc_mix_cuda(hp, stream_);
    if (!cluster) cuda::hc_collapse_cuda(X, pre, T, p.d, a, stream_);
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

// Decode: the norm of the collapsed row inside the cluster launch (HcMixParams::a_norm), bit-identical to
// hc_pre + rms_norm: one launch and one round trip of `a` fewer per sublayer (86 per decoded Flash token).
void CudaBackend::hc_pre_norm(const HcWeights& w, const HcParams& p, const float* X, int T, const WeightView* norm,
                              float norm_eps, float* a, float* post, float* comb) {
  join_sinkhorn();  // post / comb of the previous HC launch (launch_hc_norm's side Sinkhorn)
  check_hc(p);
  if (cuda::timing_skip("hc_pre_norm", T)) return;
  const int64_t nd = int64_t(p.n) * p.d;
  const int kernel = hc_decode_kernel(cuda::kHcMix, nd);
  if (!(hc_norm_fused() && hc_mix_applies(w.fn, cuda::kHcMix, nd, T) &&
        (kernel == cuda::kHcMixWide || kernel == cuda::kHcMixSplit ||
         (kernel == cuda::kHcMixCluster && cuda::hc_mix_cluster_norm_fits(cuda::kHcMix, nd))))) {
    hc_pre(w, p, X, T, a, post, comb);
    rms_norm(a, norm, T, p.d, norm_eps, a);
    return;
  }
  Scope sc(*prof_, "hc_pre_norm", T);
  cuda::HcMixParams hp = hc_norm_params(w, p, X, kernel, a, post, comb);
  launch_hc_norm(hp, p, T, norm, norm_eps);
}

// Decode: hc_post of the attention sublayer, hc_pre and ffn_norm of the MoE sublayer in one cluster launch (each
// CTA updates 256 dims of all 4 streams of X in place, then the control and the normed collapse run on the new X),
// bit-identical to hc_post + hc_pre_norm: one launch and one pass of X (256 KiB read + written) fewer per layer.
void CudaBackend::hc_post_pre_norm(const HcParams& p, const float* y, float* X, const HcWeights& w, int T,
                                   const WeightView* norm, float norm_eps, float* a, float* post, float* comb) {
  join_sinkhorn();  // post / comb of the previous HC launch (launch_hc_norm's side Sinkhorn)
  check_hc(p);
  if (cuda::timing_skip("hc_post_pre_norm", T)) return;
  const int64_t nd = int64_t(p.n) * p.d;
  const int kernel = hc_decode_kernel(cuda::kHcMix, nd);
  if (!(hc_post_fused() && hc_norm_fused() && hc_mix_applies(w.fn, cuda::kHcMix, nd, T) &&
        (kernel == cuda::kHcMixWide || kernel == cuda::kHcMixSplit ||
         (kernel == cuda::kHcMixCluster && cuda::hc_mix_cluster_post_fits(cuda::kHcMix, nd))))) {
    hc_post(p, y, post, comb, T, X);
    hc_pre_norm(w, p, X, T, norm, norm_eps, a, post, comb);
    return;
  }
  Scope sc(*prof_, "hc_post_pre_norm", T);
  cuda::HcMixParams hp = hc_norm_params(w, p, X, kernel, a, post, comb);
  hp.post_y = y, hp.post_w = post, hp.post_comb = comb;  // read by every CTA before rank 0 writes the new ones
  wrote(X, size_t(T) * nd * sizeof(float));
  launch_hc_norm(hp, p, T, norm, norm_eps);
}

void CudaBackend::hc_head(const HcHeadWeights& w, const HcParams& p, const float* X, int T, float* h) {
  join_sinkhorn();  // post / comb of the previous HC launch (launch_hc_norm's side Sinkhorn)
  Scope sc(*prof_, "hc_head", T);
  check_hc(p);
  const int64_t nd = int64_t(p.n) * p.d;
  float* mix = buffer(0, size_t(T) * 4);
  float* rs = buffer(1, size_t(T));
  float* hw = buffer(2, size_t(T) * 4);
  // Decode: projection + RMS + head weights (+ the collapse with the cluster kernel) in one launch; the ticket
  // kernel leaves the collapse apart (its fused collapse: 6.82 vs 4.98 us, see hc_pre).
  if (hc_mix_applies(w.fn, 4, nd, T)) {
    cuda::HcMixParams hp;
    hp.fn = weight(w.fn), hp.n_mix = 4, hp.X = X, hp.K = nd, hp.n_tokens = 1, hp.norm_eps = p.norm_eps;
    hp.base = f32_weight(w.base), hp.scale = f32_weight(w.scale), hp.eps = p.hc_eps, hp.w = hw;
    hp.workspace = hc_mix_workspace(nd);
    // Projection + head weights + collapse in one cluster launch (never the wide kernel: it is hc_pre only).
    if (hc_decode_kernel(4, nd) != cuda::kHcMixTicket) {
      hp.kernel = cuda::kHcMixCluster, hp.a = h;
      cuda::hc_mix_cuda(hp, stream_);
      wrote(h, size_t(T) * p.d * sizeof(float));
      return;
    }
    cuda::hc_mix_cuda(hp, stream_);
  } else {
    dmatmul(w.fn, -1, X, T, mix, nullptr, nullptr, false, /*gemm=*/false);
    cuda::rms_scale_cuda(X, T, nd, p.norm_eps, rs, stream_);
    cuda::hc_head_weights_cuda(mix, rs, f32_weight(w.base), f32_weight(w.scale), T, p.hc_eps, hw, stream_);
  }
  cuda::hc_collapse_cuda(X, hw, T, p.d, h, stream_);
  wrote(h, size_t(T) * p.d * sizeof(float));
}

}  // namespace dsv4::cuda_impl
