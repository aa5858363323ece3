// Manifold-constrained hyper-connection pieces on the GPU (model-spec §4), for n = 4 streams.
//
// hc_pre on the GPU is: mix = F16 GEMV of fn over the flattened streams (gemv.h) times the RMS scale, then
// hc_split_sinkhorn_cuda (pre/post/comb), then hc_collapse_cuda (a = sum_i pre[i] X[i]). hc_post_cuda writes
// the new streams. All pointers are device pointers; the control vectors (base, scale) are read on the device
// so a decode step can be captured in a graph.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace dsv4::cuda {

inline constexpr int kHcStreams = 4;
inline constexpr int kHcMix = (2 + kHcStreams) * kHcStreams;  // 24

// Per token t (model-spec §4 steps 3-7), with mix[t] already scaled by rsqrt(mean(x^2) + eps):
//   pre[t][i]  = sigmoid(mix_pre[i] * scale[0] + base[i]) + eps
//   post[t][o] = 2 * sigmoid(mix_post[o] * scale[1] + base[4 + o])
//   comb[t][i][o] = Sinkhorn(mix_comb[4i + o] * scale[2] + base[8 + 4i + o]): row softmax, + eps, column
//   normalize, then (iters - 1) x (row normalize, column normalize), each normalizer a multiply by
//   1 / (sum + eps), as the CPU backend (src/backend/cpu/cpu_ops.cpp) does.
//   mix: [T, 24], base: [24], scale: [3], pre: [T, 4], post: [T, 4], comb: [T, 4, 4] (row i = input stream).
struct HcSinkhornParams {
  const float* mix = nullptr;
  const float* mix_scale = nullptr;  // [T] optional per-token factor on mix (the RMS scale of the streams)
  const float* base = nullptr;
  const float* scale = nullptr;
  float* pre = nullptr;
  float* post = nullptr;
  float* comb = nullptr;
  int64_t n_tokens = 0;
  int iters = 20;
  float eps = 1e-6f;
};
void hc_split_sinkhorn_cuda(const HcSinkhornParams& p, cudaStream_t stream);

// HC head weights (model-spec §4, final head): w[t][i] = sigmoid(mix[t][i] * mix_scale[t] * scale[0] + base[i])
// + eps.   mix: [T, 4] (fn . x), mix_scale: [T], base: [4], scale: [1], w: [T, 4]
void hc_head_weights_cuda(const float* mix, const float* mix_scale, const float* base, const float* scale,
                          int64_t n_tokens, float eps, float* w, cudaStream_t stream);

// HC control in one launch (decode: replaces the F16 GEMV of fn, its activation copy, rms_scale_cuda and
// hc_split_sinkhorn_cuda / hc_head_weights_cuda): per token t,
//   mix[t][j] = sum_c fn[j][c] * X[t][c]        (fn F16 [n_mix, K] in the file's row layout, X f32 [T, K])
//   rs[t]     = rsqrt(mean_c X[t][c]^2 + norm_eps)
//   n_mix == 24 (hc_pre):  pre/post/comb = hc_split_sinkhorn(mix[t] * rs[t])   (same operations as above)
//   n_mix == 4  (hc_head): w[t][i] = sigmoid(mix[t][i] * rs[t] * scale[0] + base[i]) + eps
// Why: fn is small (0.8 MB for 16384 -> 24) but long, and one CTA per row leaves 108 of 132 SMs idle, so the
// product is split over K across ceil(K / 256) CTAs per token; their partial sums meet in `workspace` and the
// last CTA of each token (an integer ticket, no float atomics) adds them in chunk order and finishes the token,
// so results are deterministic. `workspace` must be hc_mix_workspace_bytes(T, K) bytes, zero-filled once when
// allocated; every launch leaves it zeroed again (launches on one stream may share it).
struct HcMixParams {
  const void* fn = nullptr;
  int n_mix = kHcMix;  // 24 or 4
  const float* X = nullptr;
  int64_t K = 0;         // n * d (even)
  int64_t n_tokens = 0;
  float norm_eps = 1e-6f;
  const float* base = nullptr;
  const float* scale = nullptr;
  int iters = 20;        // hc_pre only
  float eps = 1e-6f;     // hc_eps
  float* pre = nullptr;  // hc_pre outputs: [T, 4], [T, 4], [T, 4, 4]
  float* post = nullptr;
  float* comb = nullptr;
  float* w = nullptr;    // hc_head output: [T, 4]
  // Optional: the collapse in the same launch (one launch fewer per hc_pre / hc_head): the finishing CTA of each
  // token writes a[t] = sum_i wts[t][i] X[t][i], wts = pre (n_mix 24) or w (n_mix 4), X viewed as [T, 4, K/4];
  // equal to hc_collapse_cuda(X, wts, T, K/4, a) bit for bit. a: [T, K/4] (K % 4 == 0). Measured slower than the
  // two launches in a CUDA graph at Flash width (H200, dev/cuda/small.cu at dc6bea6: hc_pre 10.97 vs 8.98 us,
  // hc_head 6.82 vs 4.98 us: one CTA walks 64 KiB of X after the Sinkhorn), so the backend does not use it.
  float* a = nullptr;
  float* mix_out = nullptr;  // optional: raw mix [T, n_mix] (tests, diagnostics)
  float* rs_out = nullptr;   // optional: rs [T]
  void* workspace = nullptr;  // the ticket and wide kernels'; unused by the cluster kernel
  int kernel = 0;             // kHcMixTicket (default), kHcMixCluster, kHcMixWide or kHcMixSplit
  // Optional, with kernel == kHcMixCluster: the previous sublayer's hc_post applied to X IN PLACE first (X is
  // written through), X[t][o] = post_w[t][o] * post_y[t] + sum_i post_comb[t][i][o] * X[t][i] (equal to
  // hc_post_cuda bit for bit), and the control computed on the new X: the model's hc_post -> hc_pre pair in one
  // launch (the backend's hc_post_pre_norm, with a_norm). Each CTA then
  // owns 256 dims of all 4 streams (chunk q * cs + rank), so it needs d = K / 4 a multiple of 256 and <= 4096
  // (hc_mix_cluster_post_fits); otherwise hc_mix_cuda runs hc_post_cuda and then the ticket kernel (same bits).
  // post_w / post_comb may alias post / comb (every CTA reads them before rank 0 writes the new ones).
  const float* post_y = nullptr;     // [T, d]
  const float* post_w = nullptr;     // [T, 4]
  const float* post_comb = nullptr;  // [T, 4, 4]
  // Optional, with `a`: a[t] RMS-normalized in place after the collapse, a = a * rsqrt(mean(a^2) + a_norm_eps) *
  // a_norm_w (null: unweighted), equal BIT FOR BIT to rms_norm_cuda on the collapsed rows (default thread count):
  // the model's hc_pre -> attn_norm / ffn_norm (and hc_head -> output_norm) pair. The cluster kernel does it in the
  // same launch when hc_mix_cluster_norm_fits (Flash: d = 4096, 16 CTAs x 2 of rms_norm's 32 warps; every CTA
  // reads the 32 warp sums from distributed shared memory, one more cluster barrier); otherwise hc_mix_cuda runs
  // rms_norm_cuda after the kernel. Why: one launch (~2 us of a graph node + the a round trip) less per sublayer.
  bool a_norm = false;
  const float* a_norm_w = nullptr;  // [d]
  float a_norm_eps = 1e-6f;
  // Optional, split kernel only (hc_mix_cuda fails otherwise): `a` (after the norm, if any) also in the Q8_0 split
  // activation layout of the dense GEMVs ([d int8][d / 32 f32 scales], gemv.h GemvLayout::Q8Split), bytes equal to
  // quantize_activations_cuda(Q8_0, a, 1, d, ..., Q8Split): the projection reading `a` needs no quantize launch.
  void* a_q8 = nullptr;
  // Optional, split kernel only (hc_mix_cuda fails otherwise; needs mix_out and rs_out): the tail leaves post and
  // comb unwritten, for an hc_split_sinkhorn_cuda launch over mix_out / rs_out on a side stream (the same function
  // on the same values: the same bits). The 20 Sinkhorn rounds then stop holding back the launch's completion, which
  // every later kernel waits for (H200: ~2.5 us per HC launch, 86 per decoded Flash token).
  bool skip_sinkhorn = false;
};
// kHcMixCluster (the backend's decode default; DSV4_CUDA_HC_KERNEL=ticket gives the ticket kernel back): the K-split
// partials of a token meet in distributed shared memory of one thread-block cluster instead of global memory,
// so the __threadfence + atomic ticket + L2 round trip of the partials leave the critical path, and with `a` set
// the collapse is spread over the cluster's CTAs (each one 1/cs of the dims, its X values loaded at kernel start)
// instead of one CTA walking 64 KiB after the Sinkhorn. Every CTA of the cluster reduces the partials and runs
// the 4x4 Sinkhorn itself (the same operations on the same values, so the same bits), which spares a second
// cluster barrier between the Sinkhorn and the collapse; rank 0 alone writes the control outputs. Same chunk
// partials (256 columns, 4 warp sums each, the warp sums on the tree of warp_sum) and the same chunk-ordered sum
// as the ticket kernel, so every output equals the ticket kernel's (and `a` equals hc_collapse_cuda) bit for bit.
// Shape: one cluster of cs = min(16, chunks) CTAs per token, ceil(chunks / cs) <= 4 chunks per CTA (128 threads
// per chunk), so K <= 16384 (Flash: 4 x 4096 = 16 CTAs of 512 threads). When the shape does not apply or cannot
// be placed on this device (hc_mix_cluster_fits false), hc_mix_cuda runs the ticket kernel (same results).
inline constexpr int kHcMixTicket = 0;
inline constexpr int kHcMixCluster = 1;
// kHcMixWide (opt-in for the backend's decode hc_pre / hc_pre_norm / hc_post_pre_norm with DSV4_CUDA_HC_KERNEL=wide:
// measured slower end to end than the cluster kernel, H200 3977003: 116.3 vs 130.6 t/s): one token, hc_pre (n_mix 24) with the fused collapse `a` (and optionally the
// fused hc_post and a_norm), K = 4 d with d % 32 == 0. d / 32 CTAs (128 at Flash width instead of the cluster's 16)
// each own 32 dims of all 4 streams: they read their 128 columns of fn (and X, updated in place by the fused
// hc_post) with all loads in flight at once, publish 25 partial sums to the workspace, meet at a grid barrier
// (every CTA resident: hc_mix_wide_fits checks the device can hold the grid), and every CTA then sums all partials
// in one fixed order, forms pre, and collapses its own dims (CTA 0 runs the Sinkhorn for post / comb meanwhile);
// a_norm adds a second barrier for the sum of squares of `a`. Deterministic (no float atomics: every launch gives
// the same bits), but the fp32 summation order of mix, rs and the norm differs from the ticket / cluster kernels,
// so results agree with them only to rounding
// (tests/ops/hc_cluster_test.cpp states the bounds). Needs `workspace` (hc_mix_workspace_bytes(1, K) or more,
// zeroed once, and one workspace serves one K: its grid-barrier count stays a multiple of the grid size between
// launches, hc.cu grid_barrier_one_thread). Where the shape does not apply (T > 1, no `a`,
// n_mix 4, other widths) hc_mix_cuda runs the cluster kernel's path instead.
inline constexpr int kHcMixWide = 2;
// kHcMixSplit (the backend's decode default for hc_pre / hc_pre_norm / hc_post_pre_norm where it fits; see
// cuda_backend_hc.cpp for the measurements): the wide kernel's work in two launches and no grid barrier. Launch 1:
// the wide kernel's first half on d / 32 CTAs (fused hc_post, the 128 columns of fn per CTA, partial sums to the
// workspace). Launch 2 (PDL: resident before launch 1 ends): one cluster of d / 256 CTAs; each CTA sums the partials
// in the wide kernel's order, forms pre, collapses its 256 dims and (a_norm) meets the others over distributed
// shared memory for the norm; rank 0 runs the Sinkhorn on an extra warp. Every output equals the wide kernel's bit
// for bit. Shape: one token, hc_pre with the fused collapse `a`, d % 256 == 0, d / 256 <= 16 (hc_mix_split_fits);
// elsewhere hc_mix_cuda runs the cluster kernel's path. Needs `workspace` like the wide kernel (no barrier count).
inline constexpr int kHcMixSplit = 3;
bool hc_mix_split_fits(int n_mix, int64_t K);
bool hc_mix_wide_fits(int n_mix, int64_t K);
bool hc_mix_cluster_fits(int n_mix, int64_t K);
bool hc_mix_cluster_post_fits(int n_mix, int64_t K);
// a_norm inside the cluster launch without a fused hc_post (with one, every hc_mix_cluster_post_fits shape takes it:
// the CTAs exchange their collapsed values over DSMEM first, one more cluster barrier).
bool hc_mix_cluster_norm_fits(int n_mix, int64_t K);
size_t hc_mix_workspace_bytes(int64_t n_tokens, int64_t K);
void hc_mix_cuda(const HcMixParams& p, cudaStream_t stream);

// a[t] = sum_i pre[t][i] * X[t][i].   X: [T, 4, D], pre: [T, 4], a: [T, D]
void hc_collapse_cuda(const float* X, const float* pre, int64_t n_tokens, int64_t d, float* a,
                      cudaStream_t stream);

// X[t][o] = post[t][o] * y[t] + sum_i comb[t][i][o] * X[t][i]  (in place).
//   X: [T, 4, D], y: [T, D], post: [T, 4], comb: [T, 4, 4]
void hc_post_cuda(float* X, const float* y, const float* post, const float* comb, int64_t n_tokens, int64_t d,
                  cudaStream_t stream);

}  // namespace dsv4::cuda
