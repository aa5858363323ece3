// CudaBackend: MoE router and experts (moe_route, moe_ffn).
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "backend/cuda/cuda_backend_impl.h"
#include "backend/cuda/gemv_dense_v2.h"
#include "backend/cuda/gemv_moe_v2.h"
#include "backend/cuda/timing_skip.h"

namespace dsv4::cuda_impl {

namespace {

// DSV4_CUDA_MOE_FUSED=0: the decode MoE runs its unfused launches (router GEMV + route kernel; shared expert as
// paired GEMV + swiglu + down on the main stream), for A/B checks. Read per call so a test can switch it.
bool moe_fused_decode() {
  const char* e = std::getenv("DSV4_CUDA_MOE_FUSED");
  return !(e && std::strcmp(e, "0") == 0);
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// DSV4_CUDA_MOE_DOWN_XF=1: the routed down+sum launch quantizes its float input itself (GemvParams::xf) instead of
// reading a separately quantized copy. Opt-in: one decode MoE layer measured 15.16 us with the separate quantize
// launch vs 19.65 us quantizing in the launch (H200, wb_gemv WB_MOE_ONLY=1, tree fad8a06).
bool moe_down_in_launch_quant() {
  const char* e = std::getenv("DSV4_CUDA_MOE_DOWN_XF");
  return e && std::strcmp(e, "1") == 0;
}

}  // namespace

void CudaBackend::moe_route(const MoeWeights& w, const MoeParams& p, const float* x, const int32_t* tokens, int T,
                            int32_t* ids, float* weights) {
  Scope sc(*prof_, p.hash ? "moe_route (hash)" : "moe_route", T);
  if (cuda::timing_skip("moe_route", T)) return;
  const int E = p.n_experts, k = p.n_used;
  const float* bias = w.exp_probs_b.present() ? f32_weight(w.exp_probs_b) : nullptr;
  if (p.hash) cuda::gather_hash_ids_cuda(hash_table(w.tid2eid, E, k), w.tid2eid.ne[1], k, tokens, T, ids, stream_);
  const WeightView& r = w.gate_inp;
  if (T == 1 && moe_fused_decode() && r.ne[1] == E && r.n_dims == 2 && aligned16(x) &&
      cuda::moe_route_fused_supported(r.type, r.ne[0], E, k)) {
    // Decode: router projection + routing in one launch (moe.h).
    const size_t ws = cuda::moe_route_fused_workspace_bytes(E);
    if (route_ws_.size() < ws) {
      route_ws_.reset();
      route_ws_ = DeviceArray<uint8_t>(ws);
      cuda::check(cudaMemsetAsync(route_ws_.get(), 0, ws, stream_), "cuda backend: moe_route workspace");
    }
    cuda::MoeRouteFusedParams rp;
    rp.wtype = r.type, rp.w = weight(r), rp.d = r.ne[0], rp.n_experts = E, rp.k = k, rp.x = x, rp.bias = bias;
    rp.scale = p.weights_scale, rp.hash = p.hash, rp.ids = ids, rp.weights = weights, rp.workspace = route_ws_.get();
    // The routed experts' Q8_K input comes out of the same launch, recorded in the activation cache for
    // moe_ffn's gate/up launch (same x): one quantize launch fewer.
    const QType gt = w.gate_exps.type;
    ActEntry* pending = nullptr;
    if (w.gate_exps.present() && activation_type(gt) == QType::Q8_K && layout_for(w.gate_exps) == GemvLayout::Ggml &&
        r.ne[0] == p.d && p.d % 256 == 0) {
      pending = &act_slot(act_kind(gt, GemvLayout::Ggml), size_t(cuda::gpu_activation_bytes(gt, p.d)));
      rp.xq8k = pending->buf.get();
    }
    cuda::moe_route_fused_cuda(rp, stream_);
    if (pending) pending->x = x, pending->rows = 1, pending->cols = p.d;
  } else {
    float* z = buffer(0, size_t(T) * E);
    dmatmul(r, -1, x, T, z, nullptr, nullptr, false, /*gemm=*/false);
    cuda::moe_route_cuda(z, bias, T, E, k, p.weights_scale, p.hash, ids, weights, stream_);
  }
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
    // Variant 2 (gemv_moe_v2.h) where it takes the launch unless DSV4_CUDA_MOE_KERNEL=0 (the streaming kernel).
    if (cuda::moe_kernel_env() != 0 && cuda::moe_v2_supported(gu, 2))
      gu.kernel = cuda::kMoeKernelV2;
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
// Decode (one token, fused routed launches, a Q8_0 shared expert): the shared expert runs on a side stream while
// the routed gate/up run on the main one (both are latency-bound reads of 18-33 MB that leave the memory pipe
// half idle alone), as gate+up+SwiGLU in one launch, quantize, down; the routed down+sum joins after it.
void CudaBackend::moe_ffn(const MoeWeights& w, const MoeParams& p, const float* x, const int32_t* ids,
                          const float* weights, int T, float* y) {
  Scope sc(*prof_, "moe_ffn", T);
  const int k = p.n_used, n_slots = T * k;
  const int64_t D = p.d, F = p.ff;
  cuda::GemvParams down = expert_launch(w.down_exps, nullptr, ids, n_slots, 1, nullptr, y);
  const bool fused_down = n_slots <= kMaxSlotsPerLaunch && k <= 8 && fused_moe_type(w.down_exps.type) &&
                          !moe_gemm(w, T) &&
                          cuda::gemv_staged_supported(down);
  const WeightView &sg = w.gate_shexp, &su = w.up_shexp, &sd = w.down_shexp;
  const bool side = T == 1 && fused_down && moe_fused_decode() && sg.type == QType::Q8_0 && su.type == sg.type &&
                    layout_for(su) == layout_for(sg) && sg.ne[0] == D && sg.ne[1] == F && su.ne[0] == D &&
                    su.ne[1] == F && cuda::gemv_supports(sd.type) && sd.ne[0] == F && sd.ne[1] == D;
  if (side) {
    // Everything that allocates or looks up (weights, scratch, the input's activations: usually the ffn norm's
    // own split-layout output) happens before the fork; the side stream only launches.
    cuda::GemvParams gu;
    gu.wtype = sg.type, gu.layout = layout_for(sg), gu.w = weight(sg), gu.w2 = weight(su), gu.rows = F, gu.cols = D;
    gu.xq = activations(sg.type, gu.layout, x, 1, D, /*cacheable=*/true);
    gu.y = buffer(3, size_t(F));
    cuda::GemvParams dn;
    dn.wtype = sd.type, dn.layout = layout_for(sd), dn.w = weight(sd), dn.rows = D, dn.cols = F, dn.y = y;
    const int64_t hq_bytes = cuda::gpu_activation_bytes(sd.type, F, dn.layout);
    dn.xq = buffer(4, size_t(hq_bytes + 3) / 4);
    // The shared down projection as matmul's one-token default: dense variant 2 with PDL where it applies
    // (gemv_dense_v2.h; DSV4_CUDA_GEMV_KERNEL=0: the streaming kernel). With the routed gate+up now faster, this
    // side-stream chain (gate+up+SwiGLU, quantize, down: ~21 us of ncu time at a813325) is the longer branch
    // before the join; the streaming kernel read this 8.9 MB matrix at 1.1 TB/s (ncu, H200).
    if (const int kd = cuda::gemv_dense_kernel_env(); kd != 0) {
      dn.kernel = kd;
      if (!cuda::gemv_v2_supported(dn)) dn.kernel = 0;
    }
    // The down projection's input h quantized inside its launch (variant 2's float mode, as dmatmul does for
    // o_b): one launch fewer on the side chain, which the join waits for. DSV4_CUDA_GEMV_XF=0: the quantize launch.
    cuda::GemvParams dn_xf = dn;
    dn_xf.xq = nullptr, dn_xf.xf = gu.y;
    const bool down_xf = dn.kernel != 0 && dn.layout == GemvLayout::Q8Split &&
                         cuda::gemv_xf_env() != cuda::kGemvXfOff && cuda::gemv_v2_supported(dn_xf);
    moe_side_.fork(stream_);
    cudaStream_t s2 = moe_side_.side();
    if (!cuda::timing_skip("moe_ffn.shared", T)) {
      cuda::moe_gate_up_swiglu_cuda(gu, nullptr, p.swiglu_clamp, s2);
      if (down_xf) {
        cuda::gemv_cuda(dn_xf, s2);
      } else {
        cuda::quantize_activations_cuda(sd.type, gu.y, 1, F, const_cast<void*>(dn.xq), s2, dn.layout);
        cuda::gemv_cuda(dn, s2);
      }
    }
    if (!cuda::timing_skip("moe_ffn.routed", T)) {
      Scope part(*prof_, "moe_ffn.routed", T);
      moe_routed(w, p, x, ids, weights, T, /*fused_down=*/true);
    }
    moe_side_.join(stream_);
  } else {
    {
      Scope part(*prof_, "moe_ffn.routed", T);
      moe_routed(w, p, x, ids, weights, T, fused_down);
    }
    Scope part(*prof_, "moe_ffn.shared", T);
    // Unfused: paired gate/up GEMV, swiglu, down.
    float* gs = buffer(3, size_t(T) * F);
    float* us = buffer(4, size_t(T) * F);
    dmatmul(sg, -1, x, T, gs, &su, us);
    cuda::swiglu_cuda(gs, us, nullptr, T, F, p.swiglu_clamp, gs, stream_);
    dmatmul(sd, -1, gs, T, y);
  }
  if (fused_down && !cuda::timing_skip("moe_ffn.routed_down", T)) {
    Scope part(*prof_, "moe_ffn.routed_down", T);
    float* h = buffer(0, size_t(n_slots) * F);
    if (moe_fused_decode() && moe_down_in_launch_quant()) down.xf = h;  // quantized inside the launch (GemvParams::xf)
    else down.xq = activations(w.down_exps.type, layout_for(w.down_exps), h, n_slots, F, false);
    // Variant 2 (gemv_moe_v2.h; quantized input only; its own Q2_K kernel for Flash's down) where it takes the
    // launch: the default (DSV4_CUDA_MOE_KERNEL unset or 5); the staged kernel otherwise or with =auto / =0.
    if (cuda::moe_kernel_env() == cuda::kMoeKernelV2 && cuda::moe_v2_supported(down, k))
      down.kernel = cuda::kMoeKernelV2;
    cuda::moe_down_sum_cuda(down, k, stream_);
  } else if (!fused_down) {
    cuda::moe_sum_cuda(buffer(2, size_t(n_slots) * D), T, k, D, y, stream_);
  }
  wrote(y, size_t(T) * D * sizeof(float));
}

}  // namespace dsv4::cuda_impl
