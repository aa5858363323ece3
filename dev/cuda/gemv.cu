// Workbench: GEMV kernel timings at DeepSeek-V4-Flash shapes, in GB/s and % of the card's bandwidth.
//
//   wb_gemv [--csv FILE] [--quick]          (environment WB_NO_SWEEP=1: no staged-knob sweep)
//
// Single-token cases run on both GEMV kernels (kernel=1 register streaming, kernel=2 staged cp.async tiles), with a
// sweep of the staged knobs on the MoE cases; the fused MoE decode pieces are timed against their unfused sequences,
// and the fused routed ones also on variant 2 (gemv_moe_v2.h: "[v2: ...]" on the case line, "V2" / "variant 2" rows
// in the MoE layer table; WB_MOE_ONLY=1 keeps all of them).
//
// Measures the card first (a plain 16-byte streaming-read kernel over 2 GiB, and a 1 GiB device-to-device copy
// counting read + write bytes), then times every case two ways: eager launches (what a non-graph decode pays,
// launch overhead included) and a CUDA graph of the same launches (the decode-step target). Weight bytes are
// rotated over enough copies (>= 256 MiB in total) that L2 (50-60 MB) never serves a weight twice in a row; MoE
// cases rotate over 40 different expert-id sets of one 256-expert stack. Inputs are random bytes with sane f16
// scale fields (never zeros: zero data can run faster than real data).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include <cuda_fp16.h>

#include "backend/cuda/common.cuh"
#include "backend/cuda/cuda_util.h"
#include "backend/cuda/gemv.h"
#include "backend/cuda/gemv_dense_v2.h"
#include "backend/cuda/gemv_moe_v2.h"
#include "backend/cuda/hc.h"
#include "backend/cuda/moe.h"
#include "backend/cuda/norm_rope.h"
#include "common/error.h"
#include "quant/quant.h"
#include "wb_common.cuh"
#include "wb_weights.cuh"

using namespace dsv4;
using namespace dsv4::cuda;

namespace {

// ---- prototype: Q8_0 repacked at upload into contiguous int8 quants + separate f16 scales ("Q8R") ----------------
// Not used by the engine yet: it measures what the 34-byte block layout costs (2-byte-aligned payload forces u16
// loads). A lane takes 16 consecutive values per step: one 16-byte weight load, one 16-byte activation load.
template <int U>
__global__ void __launch_bounds__(128) q8r_gemv_kernel(const int8_t* q, const __half* d, const int8_t* aq,
                                                       const float* ad, int64_t rows, int64_t cols, float* y) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * 4 + warp;
  if (row >= rows) return;
  const int8_t* wr = q + row * cols;
  const __half* dr = d + row * (cols / 32);
  float acc = 0.0f;
  for (int64_t i0 = int64_t(lane) * 16; i0 < cols; i0 += 512 * U) {
    int4 w[U], a[U];
    float s[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t i = i0 + int64_t(u) * 512;
      if (i < cols) {
        w[u] = *reinterpret_cast<const int4*>(wr + i);
        a[u] = *reinterpret_cast<const int4*>(aq + i);
        s[u] = __half2float(dr[i / 32]) * ad[i / 32];
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t i = i0 + int64_t(u) * 512;
      if (i < cols) {
        int v = __dp4a(w[u].x, a[u].x, 0);
        v = __dp4a(w[u].y, a[u].y, v);
        v = __dp4a(w[u].z, a[u].z, v);
        v = __dp4a(w[u].w, a[u].w, v);
        acc += s[u] * float(v);
      }
    }
  }
  acc = warp_sum(acc);
  if (lane == 0) y[row] = acc;
}

struct Case {
  std::string name;
  QType type;
  int64_t rows, cols;
  int n_experts = 0;  // > 0: MoE stack
  int n_slots = 1;
  int n_tokens = 1;
  bool split = false;  // Q8_0 repacked to GemvLayout::Q8Split
  bool pair = false;   // two matrices (gate + up) in one launch
  // MoE decode sequences: 1 = moe_gate_up_swiglu_cuda (fused), 2 = paired GEMV + swiglu_cuda (unfused),
  // 3 = moe_down_sum_cuda (fused), 4 = down GEMV + moe_sum_cuda (unfused). Down (3, 4): one input per slot.
  int fused = 0;
};

// Kernel choice and knobs passed to GemvParams (0 = default).
struct Knobs {
  int kernel = 0, unroll = 0, row_group = 0, cta_warps = 0, tile_rows = 0, iq2_rep = 0;
};

struct Result {
  double us_graph, us_eager, gbs, pct_read, pct_spec;
};

Result run_case(const Case& c, cudaStream_t s, double read_bw, double spec_bw, const Knobs& kn = {}) {
  const int64_t rb = row_bytes(c.type, c.cols);
  const bool moe = c.n_experts > 0;
  const int64_t mat_bytes = rb * c.rows;
  const int64_t stack_bytes = moe ? mat_bytes * c.n_experts : mat_bytes;
  const int copies = moe ? 1 : int(std::clamp<int64_t>((256ll << 20) / std::max<int64_t>(stack_bytes, 1) + 1, 1, 64));
  DeviceArray<uint8_t> w(size_t(stack_bytes * copies));
  random_device_weights(c.type, w.get(), w.size(), 1234u);
  const GemvLayout layout = c.split ? GemvLayout::Q8Split : GemvLayout::Ggml;
  int64_t dev_stack_bytes = stack_bytes, dev_mat_bytes = mat_bytes;
  if (c.split) {
    dev_mat_bytes = c.rows * q8_split_row_bytes(c.cols);
    dev_stack_bytes = moe ? dev_mat_bytes * c.n_experts : dev_mat_bytes;
    DeviceArray<uint8_t> ws(size_t(dev_stack_bytes * copies));
    q8_0_split_cuda(w.get(), c.rows * (moe ? c.n_experts : 1) * copies, c.cols, ws.get(), s);
    w = std::move(ws);
  }
  // Paired launches read a second weight set of the same size (rotated like the first), so nothing is read twice.
  DeviceArray<uint8_t> w2(c.pair ? size_t(dev_stack_bytes * (moe ? 1 : copies)) : 0);
  if (c.pair) random_device_weights(c.type, w2.get(), w2.size(), 4321u);
  if (c.pair && c.split) fail("wb_gemv: paired split cases are not set up");
  const bool down = c.fused == 3 || c.fused == 4;
  const int n_act = moe ? (down ? c.n_slots : 1) : c.n_tokens;
  std::vector<float> hx(size_t(n_act * c.cols));
  std::mt19937 rng(7);
  std::normal_distribution<float> nd;
  for (auto& v : hx) v = nd(rng);
  DeviceArray<float> x{std::span<const float>(hx)};
  DeviceArray<uint8_t> xq(size_t(n_act * gpu_activation_bytes(c.type, c.cols, layout)));
  quantize_activations_cuda(c.type, x.get(), n_act, c.cols, xq.get(), s, layout);
  DeviceArray<float> y(size_t(c.n_slots * c.n_tokens * c.rows)), y2(size_t(c.n_slots * c.n_tokens * c.rows));
  constexpr int kIdSets = 40;
  std::vector<int32_t> hid;
  for (int k = 0; k < kIdSets; ++k)
    for (int j = 0; j < c.n_slots; ++j) hid.push_back(int32_t((k * c.n_slots + j) * 37 % std::max(c.n_experts, 1)));
  DeviceArray<int32_t> ids{std::span<const int32_t>(hid)};
  const std::vector<float> hrw(size_t(c.n_slots), 0.25f);
  DeviceArray<float> rw{std::span<const float>(hrw)};

  const int n_launch = moe ? kIdSets : copies;
  auto body = [&]() {
    for (int i = 0; i < n_launch; ++i) {
      GemvParams p;
      p.wtype = c.type, p.rows = c.rows, p.cols = c.cols, p.xq = xq.get(), p.n_tokens = c.n_tokens, p.y = y.get();
      p.unroll = kn.unroll, p.row_group = kn.row_group, p.cta_warps = kn.cta_warps, p.layout = layout;
      p.kernel = kn.kernel, p.tile_rows = kn.tile_rows, p.iq2_rep = kn.iq2_rep;
      if (c.pair) p.w2 = w2.get() + (moe ? 0 : i * dev_stack_bytes), p.y2 = y2.get();
      p.w = w.get() + (moe ? 0 : i * dev_stack_bytes);
      if (moe) {
        p.expert_stride = dev_mat_bytes, p.expert_ids = ids.get() + i * c.n_slots, p.n_slots = c.n_slots;
        p.act_slot_div = down ? 1 : c.n_slots;
      }
      switch (c.fused) {
        case 1: moe_gate_up_swiglu_cuda(p, rw.get() + 0, 10.0f, s); break;
        case 2:
          gemv_cuda(p, s);
          swiglu_cuda(y.get(), y2.get(), rw.get(), c.n_slots, c.rows, 10.0f, y.get(), s);
          break;
        case 3: p.y = y2.get(), moe_down_sum_cuda(p, c.n_slots, s); break;
        case 4:
          gemv_cuda(p, s);
          moe_sum_cuda(y.get(), 1, c.n_slots, c.rows, y2.get(), s);
          break;
        default: gemv_cuda(p, s);
      }
    }
  };
  const float eager_ms = median_ms(s, body, 20);
  const float graph_ms = graph_median_ms(s, body);

  // Bytes a perfect kernel must move: weights, activations, outputs (fused kernels write less; counted the same
  // so GB/s compares sequences doing the same work).
  const double bytes = (double(mat_bytes) * c.n_slots + double(y.bytes())) * (c.pair ? 2 : 1) + double(xq.bytes());
  Result r;
  r.us_graph = graph_ms * 1e3 / n_launch;
  r.us_eager = eager_ms * 1e3 / n_launch;
  r.gbs = bytes / (r.us_graph * 1e-6) / 1e9;
  r.pct_read = 100.0 * r.gbs / read_bw;
  r.pct_spec = 100.0 * r.gbs / spec_bw;
  return r;
}

// Times the Q8R prototype on a rows x cols matrix (weights rotated over >= 256 MiB of copies, like run_case).
template <int U>
double run_q8r(int64_t rows, int64_t cols, cudaStream_t s) {
  const int64_t qbytes = rows * cols, dbytes = rows * (cols / 32) * 2;
  const int copies = int(std::clamp<int64_t>((256ll << 20) / (qbytes + dbytes) + 1, 1, 64));
  DeviceArray<uint8_t> q{size_t(qbytes * copies)}, d{size_t(dbytes * copies)}, aq{size_t(cols)};
  DeviceArray<float> ad{size_t(cols / 32)}, y{size_t(rows)};
  fill_random_kernel<<<1024, 256, 0, s>>>(reinterpret_cast<uint32_t*>(q.get()), q.size() / 4, 5u);
  fill_random_kernel<<<1024, 256, 0, s>>>(reinterpret_cast<uint32_t*>(aq.get()), aq.size() / 4, 6u);
  check(cudaMemsetAsync(d.get(), 0x11, d.size(), s), "memset");  // f16 0x1111: a small positive scale
  check(cudaMemsetAsync(ad.get(), 0x3c, ad.bytes(), s), "memset");
  auto body = [&]() {
    for (int i = 0; i < copies; ++i)
      q8r_gemv_kernel<U><<<unsigned((rows + 3) / 4), 128, 0, s>>>(
          reinterpret_cast<const int8_t*>(q.get()) + i * qbytes, reinterpret_cast<const __half*>(d.get() + i * dbytes),
          reinterpret_cast<const int8_t*>(aq.get()), ad.get(), rows, cols, y.get());
  };
  const float ms = graph_median_ms(s, body);
  return ms * 1e3 / copies;
}

// Fused HC control (hc_mix_cuda: K-split F16 projection + RMS scale + Sinkhorn split or head weights) for one
// token, fn rotated over 64 copies like run_case. Returns graph-timed us per launch.
// unfused = true: the sequence it replaces (F16 GEMV of fn, rms_scale_cuda, hc_split_sinkhorn_cuda or
// hc_head_weights_cuda: 3 launches; the backend also copies the activations for the F16 GEMV: not counted).
double run_hc_mix(int n_mix, int64_t K, cudaStream_t s, bool unfused = false) {
  constexpr int kCopies = 64;
  const int64_t fn_bytes = int64_t(n_mix) * K * 2;
  DeviceArray<uint8_t> fn(size_t(fn_bytes * kCopies));
  random_device_weights(QType::F16, fn.get(), fn.size(), 99u);
  std::vector<float> hx(static_cast<size_t>(K)), hbase(24, 0.1f), hscale = {0.5f, 0.5f, 0.5f};
  std::mt19937 rng(3);
  std::normal_distribution<float> nd;
  for (auto& v : hx) v = nd(rng);
  DeviceArray<float> x{std::span<const float>(hx)}, base{std::span<const float>(hbase)},
      scale{std::span<const float>(hscale)}, out(64), mix(64), rs(4);
  DeviceArray<uint8_t> ws(hc_mix_workspace_bytes(1, K));
  ws.fill_bytes(0);
  auto body = [&]() {
    for (int i = 0; i < kCopies; ++i) {
      HcMixParams p;
      p.fn = fn.get() + i * fn_bytes, p.n_mix = n_mix, p.X = x.get(), p.K = K, p.n_tokens = 1, p.base = base.get();
      p.scale = scale.get(), p.pre = out.get(), p.post = out.get() + 4, p.comb = out.get() + 8, p.w = out.get();
      p.workspace = ws.get();
      if (!unfused) {
        hc_mix_cuda(p, s);
        continue;
      }
      GemvParams g;
      g.wtype = QType::F16, g.w = p.fn, g.rows = n_mix, g.cols = K, g.xq = x.get(), g.y = mix.get();
      gemv_cuda(g, s);
      rms_scale_cuda(x.get(), 1, K, 1e-6f, rs.get(), s);
      if (n_mix == 24) {
        HcSinkhornParams sp;
        sp.mix = mix.get(), sp.mix_scale = rs.get(), sp.base = base.get(), sp.scale = scale.get();
        sp.pre = p.pre, sp.post = p.post, sp.comb = p.comb, sp.n_tokens = 1;
        hc_split_sinkhorn_cuda(sp, s);
      } else {
        hc_head_weights_cuda(mix.get(), rs.get(), base.get(), scale.get(), 1, 1e-6f, p.w, s);
      }
    }
  };
  const float ms = graph_median_ms(s, body);
  return ms * 1e3 / kCopies;
}

// ---- one decode layer's MoE (router, routed experts, shared expert, down + sum) ---------------------------------
// The launches CudaBackend::moe_route + moe_ffn issue for one token (cuda_backend_moe.cpp), made here from the
// same cuda:: calls, at Flash shapes: F16 router 256 x 4096, 6 of 256 IQ2_XXS gate/up + Q2_K down experts
// (4096 -> 2048 -> 4096), Q8_0 shared expert in the split layout. kLayers layers of router and shared weights are
// rotated (one routed stack, but each layer's random router picks its own experts), so L2 serves nothing twice.
// Modes: 0 = the unfused sequence (router GEMV + moe_route_cuda; quantize x; shared expert as paired GEMV +
// swiglu_cuda; quantize h; down+sum), 1 = fused launches on one stream (moe_route_fused_cuda also writes the routed
// experts' Q8_K x; shared gate+up+SwiGLU in one launch; down+sum quantizes h in-kernel, GemvParams::xf), 2 = 1
// with the shared expert on a side stream (the backend's decode path). parts: which pieces run (timing them apart).
enum : unsigned { kPartRoute = 1, kPartRouted = 2, kPartShared = 4, kPartDown = 8, kPartAll = 15 };

struct MoeLayerBench {
  static constexpr int kLayers = 16, kE = 256, kK = 6;
  static constexpr int64_t kD = 4096, kF = 2048;
  int64_t router_bytes = kE * kD * 2, sh_gu_bytes = kF * q8_split_row_bytes(kD), sh_d_bytes = kD * q8_split_row_bytes(kF);
  int64_t gu_rb = row_bytes(QType::IQ2_XXS, kD), dn_rb = row_bytes(QType::Q2_K, kF);
  DeviceArray<uint8_t> router, gate, up, down, sh_gate, sh_up, sh_down, route_ws, xq8k, xqs, hq, hsq;
  DeviceArray<float> x, bias, z, wts, h, hs, gs, us, y;
  DeviceArray<int32_t> ids;
  SideStream side;
  int rgu_unroll = 0, rgu_warps = 0;  // routed gate+up knobs (0: the defaults)
  // Routed gate+up and down+sum kernel (GemvParams::kernel; kMoeKernelV2 = variant 2, gemv_moe_v2.h), and whether
  // down+sum reads a separately quantized h (the engine's default since 23d8426; variant 2 always does).
  int moe_kernel = 0;
  int moe_kernel_down = -1;    // down+sum kernel when it differs from gate+up's (-1: moe_kernel)
  int shared_down_kernel = 0;  // shared down projection: 0 streaming, kGemvKernelV2Pdl dense variant 2 (gemv_dense_v2.h)
  bool down_quant_h = false;

  explicit MoeLayerBench(cudaStream_t s)
      : router(size_t(router_bytes * kLayers)), gate(size_t(kE * kF * gu_rb)), up(gate.size()),
        down(size_t(kE * kD * dn_rb)), sh_gate(size_t(sh_gu_bytes * kLayers)), sh_up(sh_gate.size()),
        sh_down(size_t(sh_d_bytes * kLayers)), route_ws(moe_route_fused_workspace_bytes(kE)),
        xq8k(size_t(gpu_activation_bytes(QType::IQ2_XXS, kD))),
        xqs(size_t(gpu_activation_bytes(QType::Q8_0, kD, GemvLayout::Q8Split))),
        hq(size_t(kK * gpu_activation_bytes(QType::Q2_K, kF))),
        hsq(size_t(gpu_activation_bytes(QType::Q8_0, kF, GemvLayout::Q8Split))), x(kD), bias(kE), z(kE), wts(kK), h(kK * kF), hs(kF),
        gs(kF), us(kF), y(kD), ids(kK) {
    random_device_weights(QType::F16, router.get(), router.size(), 11u);
    random_device_weights(QType::IQ2_XXS, gate.get(), gate.size(), 12u);
    random_device_weights(QType::IQ2_XXS, up.get(), up.size(), 13u);
    random_device_weights(QType::Q2_K, down.get(), down.size(), 14u);
    // Shared expert: valid Q8_0 blocks repacked to the split layout, as the backend does at upload.
    for (auto [dst, rows, cols, seed] : {std::tuple{&sh_gate, kF, kD, 15u}, {&sh_up, kF, kD, 16u}, {&sh_down, kD, kF, 17u}}) {
      DeviceArray<uint8_t> blocks(size_t(rows * kLayers * row_bytes(QType::Q8_0, cols)));
      random_device_weights(QType::Q8_0, blocks.get(), blocks.size(), seed);
      q8_0_split_cuda(blocks.get(), rows * kLayers, cols, dst->get(), s);
      check(cudaStreamSynchronize(s), "split");
    }
    std::vector<float> hx(static_cast<size_t>(kD)), hb(static_cast<size_t>(kE));
    std::mt19937 rng(5);
    std::normal_distribution<float> nd;
    for (auto& v : hx) v = nd(rng);
    for (auto& v : hb) v = 0.01f * nd(rng);
    x.upload(hx);
    bias.upload(hb);
    ids.upload(std::vector<int32_t>{1, 50, 99, 140, 200, 255});
    route_ws.fill_bytes(0);
    side.side();  // create the stream before any capture
  }

  void layer(int l, int mode, unsigned parts, cudaStream_t s) {
    if (parts & kPartRoute) {
      const uint8_t* rw = router.get() + l * router_bytes;
      if (mode == 0) {
        GemvParams g;
        g.wtype = QType::F16, g.w = rw, g.rows = kE, g.cols = kD, g.xq = x.get(), g.y = z.get();
        gemv_cuda(g, s);
        moe_route_cuda(z.get(), bias.get(), 1, kE, kK, 1.5f, false, ids.get(), wts.get(), s);
      } else {
        MoeRouteFusedParams rp;
        rp.wtype = QType::F16, rp.w = rw, rp.d = kD, rp.n_experts = kE, rp.k = kK, rp.x = x.get(), rp.bias = bias.get();
        rp.scale = 1.5f, rp.ids = ids.get(), rp.weights = wts.get(), rp.workspace = route_ws.get();
        rp.xq8k = xq8k.get();
        moe_route_fused_cuda(rp, s);
      }
    }
    GemvParams rgu, sgu, sdn, rdn;
    rgu.wtype = QType::IQ2_XXS, rgu.w = gate.get(), rgu.w2 = up.get(), rgu.rows = kF, rgu.cols = kD;
    rgu.expert_stride = kF * gu_rb, rgu.expert_ids = ids.get(), rgu.n_slots = kK, rgu.act_slot_div = kK;
    rgu.xq = xq8k.get(), rgu.y = h.get(), rgu.unroll = rgu_unroll, rgu.cta_warps = rgu_warps, rgu.kernel = moe_kernel;
    sgu.wtype = QType::Q8_0, sgu.layout = GemvLayout::Q8Split, sgu.w = sh_gate.get() + l * sh_gu_bytes;
    sgu.w2 = sh_up.get() + l * sh_gu_bytes, sgu.rows = kF, sgu.cols = kD, sgu.xq = xqs.get();
    sdn.wtype = QType::Q8_0, sdn.layout = GemvLayout::Q8Split, sdn.w = sh_down.get() + l * sh_d_bytes;
    sdn.rows = kD, sdn.cols = kF, sdn.xq = hsq.get(), sdn.y = y.get();
    rdn.wtype = QType::Q2_K, rdn.w = down.get(), rdn.rows = kD, rdn.cols = kF, rdn.expert_stride = kD * dn_rb;
    rdn.expert_ids = ids.get(), rdn.n_slots = kK, rdn.act_slot_div = 1, rdn.xq = hq.get(), rdn.y = y.get();
    rdn.kernel = moe_kernel_down >= 0 ? moe_kernel_down : moe_kernel;
    sdn.kernel = shared_down_kernel;
    const auto routed = [&](cudaStream_t st) {
      if (!(parts & kPartRouted)) return;
      // The fused router writes x's Q8_K rows (modes 1, 2); timed without it, the routed part quantizes x itself.
      if (mode == 0 || !(parts & kPartRoute)) quantize_activations_cuda(QType::IQ2_XXS, x.get(), 1, kD, xq8k.get(), st);
      moe_gate_up_swiglu_cuda(rgu, wts.get(), 10.0f, st);
    };
    const auto shared = [&](cudaStream_t st) {
      if (!(parts & kPartShared)) return;
      quantize_activations_cuda(QType::Q8_0, x.get(), 1, kD, xqs.get(), st, GemvLayout::Q8Split);
      if (mode == 0) {
        sgu.y = gs.get(), sgu.y2 = us.get();
        gemv_cuda(sgu, st);
        swiglu_cuda(gs.get(), us.get(), nullptr, 1, kF, 10.0f, gs.get(), st);
        quantize_activations_cuda(QType::Q8_0, gs.get(), 1, kF, hsq.get(), st, GemvLayout::Q8Split);
      } else {
        sgu.y = hs.get();
        moe_gate_up_swiglu_cuda(sgu, nullptr, 10.0f, st);
        quantize_activations_cuda(QType::Q8_0, hs.get(), 1, kF, hsq.get(), st, GemvLayout::Q8Split);
      }
      gemv_cuda(sdn, st);
    };
    if (mode == 2) {
      side.fork(s);
      shared(side.side());
      routed(s);
      side.join(s);
    } else {
      routed(s);
      shared(s);
    }
    if (parts & kPartDown) {
      if (mode == 0 || down_quant_h || rdn.kernel != 0)
        quantize_activations_cuda(QType::Q2_K, h.get(), kK, kF, hq.get(), s);
      else rdn.xf = h.get();  // quantized in the launch
      moe_down_sum_cuda(rdn, kK, s);
    }
  }

  // Graph-timed and eager us per layer (median of reps over kLayers layers).
  std::pair<double, double> time(int mode, unsigned parts, cudaStream_t s) {
    auto body = [&] {
      for (int l = 0; l < kLayers; ++l) layer(l, mode, parts, s);
    };
    const float eager_ms = median_ms(s, body, 20);
    const float graph_ms = graph_median_ms(s, body, cudaStreamCaptureModeRelaxed);
    return {graph_ms * 1e3 / kLayers, eager_ms * 1e3 / kLayers};
  }
  // Weight bytes one layer must read: router, 6 experts' gate/up/down rows, the shared expert.
  double bytes() const {
    return double(router_bytes) + kK * double(2 * kF * gu_rb + kD * dn_rb) + double(2 * sh_gu_bytes + sh_d_bytes);
  }
};

void run_moe_layer(cudaStream_t s, double read_bw, FILE* csv, const std::string& card) {
  MoeLayerBench m(s);
  std::printf("\nMoE decode layer, 1 token (F16 router 256x4096; 6/256 IQ2_XXS gate+up, Q2_K down; Q8_0 split shared "
              "expert; %d layers rotated; %.1f MB of weights per layer), us per layer, graph (eager):\n",
              MoeLayerBench::kLayers, m.bytes() / 1e6);
  struct Row {
    const char* name;
    int mode;
    unsigned parts;
    int unroll = 0, warps = 0;
    int kernel = 0;  // routed gate+up and down+sum: 0 default, kMoeKernelV2 variant 2 (h quantized apart)
    bool quant_h = false;  // down+sum on a separately quantized h (mode 1, 2)
    int kernel_down = -1;  // down+sum kernel if not `kernel`
    int sh_down = 0;       // shared down projection kernel (0 streaming, kGemvKernelV2Pdl)
  };
  const Row rows[] = {
      {"OLD  whole layer (11 launches)", 0, kPartAll},
      {"NEW  whole layer; one stream (7 launches)", 1, kPartAll},
      {"NEW  whole layer; shared on side stream (7): engine", 2, kPartAll},
      {"NEW  side stream; routed gate+up unroll 2", 2, kPartAll, 2, 0},
      {"NEW  side stream; routed gate+up 8-warp CTAs", 2, kPartAll, 0, 8},
      {"NEW  side stream; down on quantized h (engine default)", 2, kPartAll, 0, 0, 0, true},
      {"V2   side stream; routed gate+up, down+sum variant 2", 2, kPartAll, 0, 0, kMoeKernelV2},
      // The engine's decode MoE as of session 9 (cuda_backend_moe.cpp): variant 2 gate+up, staged down+sum on a
      // quantized h, the shared down projection on dense variant 2 with PDL.
      {"S9   engine: v2 gate+up, staged down, shared down dense v2", 2, kPartAll, 0, 0, kMoeKernelV2, true, 0,
       kGemvKernelV2Pdl},
      {"  route: OLD router GEMV + moe_route (2)", 0, kPartRoute},
      {"  route: NEW moe_route_fused + Q8_K x (1)", 1, kPartRoute},
      {"  shared: OLD quant; pair GEMV; swiglu; quant; down (5)", 0, kPartShared},
      {"  shared: NEW quant; gate+up+SwiGLU; quant; down (4)", 1, kPartShared},
      {"  shared: NEW, down on dense variant 2 + PDL (4)", 1, kPartShared, 0, 0, 0, false, -1, kGemvKernelV2Pdl},
      {"  routed gate+up: quant x + fused (2)", 1, kPartRouted},
      {"  routed gate+up: quant x + fused unroll 2 (2)", 1, kPartRouted, 2, 0},
      {"  routed gate+up: quant x + fused 8-warp CTAs (2)", 1, kPartRouted, 0, 8},
      {"  routed gate+up: quant x + variant 2 (2)", 1, kPartRouted, 0, 0, kMoeKernelV2},
      {"  routed down+sum: OLD quant h + fused (2)", 0, kPartDown},
      {"  routed down+sum: NEW h quantized in-kernel (1)", 1, kPartDown},
      {"  routed down+sum: quant h + variant 2 (2)", 1, kPartDown, 0, 0, kMoeKernelV2},
  };
  for (const Row& r : rows) {
    m.rgu_unroll = r.unroll, m.rgu_warps = r.warps, m.moe_kernel = r.kernel, m.down_quant_h = r.quant_h;
    m.moe_kernel_down = r.kernel_down, m.shared_down_kernel = r.sh_down;
    const auto [g, e] = m.time(r.mode, r.parts, s);
    const double pct = r.parts == kPartAll ? 100.0 * m.bytes() / (g * 1e-6) / 1e9 / read_bw : -1.0;
    std::printf("  %-56s %8.2f (%8.2f)", r.name, g, e);
    if (pct >= 0) std::printf("   %5.1f%% of read bandwidth", pct);
    std::printf("\n");
    if (csv) std::fprintf(csv, "%s,moe_layer %s,mixed,0,0,6,1,%d,-1,-1,%.3f,%.3f,-1,%.2f,0,0,0,0,%.3f,%.2f\n",
                          card.c_str(), r.name, r.mode, g, e, pct, g, pct);
  }
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  std::string csv_path;
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--csv") && i + 1 < argc) csv_path = argv[++i];
    else if (!std::strcmp(argv[i], "--quick")) quick = true;
  }
  // WB_NO_SWEEP=1 (environment, so scripts/gpu-check.sh needs no new flag): skip the staged-knob sweep.
  const bool no_sweep = std::getenv("WB_NO_SWEEP") && std::strcmp(std::getenv("WB_NO_SWEEP"), "1") == 0;
  try {
    cudaDeviceProp prop{};
    if (!wb_open_device("wb_gemv", prop)) return 0;
    const std::string card = prop.name;
    // Datasheet bandwidth by card (SXM parts): H200 4.8 TB/s, H100 3.35 TB/s.
    const double spec_bw = card.find("H200") != std::string::npos ? 4.8e12 / 1e9 : 3.35e12 / 1e9;
    cudaStream_t s;
    check(cudaStreamCreate(&s), "stream");

    const size_t big = size_t(2) << 30;
    DeviceArray<uint8_t> buf(big), buf2(big / 2);
    fill_random_kernel<<<1024, 256, 0, s>>>(reinterpret_cast<uint32_t*>(buf.get()), big / 4, 1u);
    DeviceArray<unsigned> sink(1);
    const float read_ms = median_ms(s, [&] {
      read_kernel<<<prop.multiProcessorCount * 8, 512, 0, s>>>(reinterpret_cast<const uint4*>(buf.get()), big / 16, sink.get());
    }, 10);
    const double read_bw = double(big) / (read_ms * 1e-3) / 1e9;
    const float copy_ms = median_ms(s, [&] {
      check(cudaMemcpyAsync(buf2.get(), buf.get(), big / 2, cudaMemcpyDeviceToDevice, s), "copy");
    }, 10);
    const double copy_bw = double(big) / (copy_ms * 1e-3) / 1e9;  // read + write
    buf.reset();
    buf2.reset();
    std::printf("streaming read 2 GiB: %.0f GB/s   d2d copy 1 GiB (r+w): %.0f GB/s   datasheet: %.0f GB/s\n\n",
                read_bw, copy_bw, spec_bw);

    // WB_MOE_ONLY=1: only the MoE cases and the per-layer MoE sequence (a short device call).
    const bool moe_only = std::getenv("WB_MOE_ONLY") && std::strcmp(std::getenv("WB_MOE_ONLY"), "1") == 0;
    std::vector<Case> cases = {
        {"attn_q_a 4096->1024", QType::Q8_0, 1024, 4096},
        {"attn_q_b 1024->32768", QType::Q8_0, 32768, 1024},
        {"attn_out_b 8192->4096", QType::Q8_0, 4096, 8192},
        {"shexp_gate 4096->2048", QType::Q8_0, 2048, 4096},
        {"split attn_q_a 4096->1024", QType::Q8_0, 1024, 4096, 0, 1, 1, true},
        {"split attn_q_b 1024->32768", QType::Q8_0, 32768, 1024, 0, 1, 1, true},
        {"split attn_out_b 8192->4096", QType::Q8_0, 4096, 8192, 0, 1, 1, true},
        {"split shexp_gate 4096->2048", QType::Q8_0, 2048, 4096, 0, 1, 1, true},
        {"split dense 4096->4096 T=8", QType::Q8_0, 4096, 4096, 0, 1, 8, true},
        {"compressor 4096->1024", QType::F16, 1024, 4096},
        {"hc_fn 16384->24", QType::F16, 24, 16384},
        {"moe_gate 6x(4096->2048)/256", QType::IQ2_XXS, 2048, 4096, 256, 6},
        {"moe_down 6x(2048->4096)/256", QType::Q2_K, 4096, 2048, 256, 6},
        {"moe_gate+up pair 6x/256", QType::IQ2_XXS, 2048, 4096, 256, 6, 1, false, true},
        {"shexp gate+up pair 4096->2048", QType::Q8_0, 2048, 4096, 0, 1, 1, false, true},
        {"moe_gate_q4 6x(4096->2048)/256", QType::Q4_K, 2048, 4096, 256, 6},
        {"dense 4096->4096 T=1", QType::Q8_0, 4096, 4096, 0, 1, 1},
        {"dense 4096->4096 T=2", QType::Q8_0, 4096, 4096, 0, 1, 2},
        {"dense 4096->4096 T=4", QType::Q8_0, 4096, 4096, 0, 1, 4},
        {"dense 4096->4096 T=8", QType::Q8_0, 4096, 4096, 0, 1, 8},
        {"iq2 4096->2048 T=1", QType::IQ2_XXS, 2048, 4096, 0, 1, 1},
        {"iq2 4096->2048 T=8", QType::IQ2_XXS, 2048, 4096, 0, 1, 8},
        {"q2k 2048->4096 T=8", QType::Q2_K, 4096, 2048, 0, 1, 8},
    };
    if (!quick) {
      cases.push_back({"output 4096->129280", QType::Q8_0, 129280, 4096});
      cases.push_back({"split output 4096->129280", QType::Q8_0, 129280, 4096, 0, 1, 1, true});
    }

    cases.push_back({"moe gate+up+swiglu FUSED 6x/256", QType::IQ2_XXS, 2048, 4096, 256, 6, 1, false, true, 1});
    cases.push_back({"moe gate+up pair, swiglu 6x/256", QType::IQ2_XXS, 2048, 4096, 256, 6, 1, false, true, 2});
    cases.push_back({"moe down+sum FUSED 6x/256", QType::Q2_K, 4096, 2048, 256, 6, 1, false, false, 3});
    cases.push_back({"moe down, moe_sum 6x/256", QType::Q2_K, 4096, 2048, 256, 6, 1, false, false, 4});
    cases.push_back({"q4 gate+up+swiglu FUSED 6x/256", QType::Q4_K, 2048, 4096, 256, 6, 1, false, true, 1});
    cases.push_back({"q4 down+sum FUSED 6x/256", QType::Q4_K, 4096, 2048, 256, 6, 1, false, false, 3});
    cases.push_back({"q4 down, moe_sum 6x/256", QType::Q4_K, 4096, 2048, 256, 6, 1, false, false, 4});

    // Every single-token case runs on both kernels: kernel=1 (register streaming, the old path) and kernel=2
    // (staged: cp.async tiles). Unsupported combinations print "-".
    FILE* csv = csv_path.empty() ? nullptr : std::fopen(csv_path.c_str(), "w");
    if (csv)
      std::fprintf(csv, "card,case,type,rows,cols,slots,tokens,fused,us_stream,pct_stream,us_staged,us_staged_eager,"
                        "gbs_staged,pct_staged,best_tile,best_r,best_w,best_rep,best_us,best_pct\n");
    std::printf("%-34s %-8s %11s %7s %11s %11s %7s   %s\n", "case", "type", "stream us", "%read", "staged us",
                "(eager)", "%read", "staged sweep best (tile R W rep)");
    const auto try_case = [&](const Case& c, const Knobs& k, Result* out) {
      try {
        *out = run_case(c, s, read_bw, spec_bw, k);
        return true;
      } catch (const dsv4::Error&) {
        return false;
      }
    };
    if (moe_only) std::erase_if(cases, [](const Case& c) { return c.n_experts == 0 && c.name.find("shexp") == std::string::npos; });
    for (const Case& c : cases) {
      Result r1{}, r2{};
      const bool fused_only = c.fused == 3;  // down+sum: staged only (gate+up+swiglu has both kernels)
      const bool ok1 = !fused_only && try_case(c, Knobs{1}, &r1);
      const bool ok2 = c.n_tokens == 1 && try_case(c, Knobs{2}, &r2);
      // Staged sweep for the MoE cases (the decode's biggest reads) and the dense single-token ones in full mode.
      Result best = r2;
      Knobs bk{2};
      if (ok2 && (c.n_experts > 0 || !quick) && !no_sweep)
        for (int tile : {0, 8, 16, 32})
          for (int rg : {2, 4})
            for (int cw : {4, 8})
              for (int rep : (c.type == QType::IQ2_XXS ? std::vector<int>{8, 32} : std::vector<int>{0})) {
                const Knobs k{2, 0, rg, cw, tile, rep};
                Result v;
                if (try_case(c, k, &v) && v.us_graph < best.us_graph) best = v, bk = k;
              }
      std::printf("%-34s %-8s", c.name.c_str(), qtype_name(c.type).c_str());
      if (ok1) std::printf(" %11.2f %6.1f%%", r1.us_graph, r1.pct_read);
      else std::printf(" %11s %7s", "-", "-");
      if (ok2) std::printf(" %11.2f %11.2f %6.1f%%", r2.us_graph, r2.us_eager, r2.pct_read);
      else std::printf(" %11s %11s %7s", "-", "-", "-");
      Result rg{};
      if (c.type == QType::IQ2_XXS && !fused_only && try_case(c, Knobs{1, 0, 0, 0, 0, 1}, &rg))
        std::printf("   [stream, uint2 grid table: %.2f us]", rg.us_graph);
      // Fused routed launches: variant 2 (gemv_moe_v2.h) beside the default (stream column for gate+up+SwiGLU,
      // staged column for down+sum).
      Result rv{};
      const bool okv = (c.fused == 1 || c.fused == 3) && c.n_experts > 0 && try_case(c, Knobs{kMoeKernelV2}, &rv);
      if (okv) std::printf("   [v2: %.2f us %.1f%%]", rv.us_graph, rv.pct_read);
      if (okv && csv)  // its own row, timings in the staged columns
        std::fprintf(csv, "%s,%s [v2],%s,%lld,%lld,%d,%d,%d,-1,-1,%.3f,%.3f,%.1f,%.2f,0,0,0,0,%.3f,%.2f\n",
                     card.c_str(), c.name.c_str(), qtype_name(c.type).c_str(), (long long)c.rows, (long long)c.cols,
                     c.n_slots, c.n_tokens, c.fused, rv.us_graph, rv.us_eager, rv.gbs, rv.pct_read, rv.us_graph,
                     rv.pct_read);
      if (ok2 && best.us_graph < r2.us_graph)
        std::printf("   %.2f us %.1f%% (%d %d %d %d)", best.us_graph, best.pct_read, bk.tile_rows, bk.row_group,
                    bk.cta_warps, bk.iq2_rep);
      std::printf("\n");
      std::fflush(stdout);
      if (csv)
        std::fprintf(csv, "%s,%s,%s,%lld,%lld,%d,%d,%d,%.3f,%.2f,%.3f,%.3f,%.1f,%.2f,%d,%d,%d,%d,%.3f,%.2f\n",
                     card.c_str(), c.name.c_str(), qtype_name(c.type).c_str(), (long long)c.rows, (long long)c.cols,
                     c.n_slots, c.n_tokens, c.fused, ok1 ? r1.us_graph : -1.0, ok1 ? r1.pct_read : -1.0,
                     ok2 ? r2.us_graph : -1.0, ok2 ? r2.us_eager : -1.0, ok2 ? r2.gbs : -1.0,
                     ok2 ? r2.pct_read : -1.0, bk.tile_rows, bk.row_group, bk.cta_warps, bk.iq2_rep,
                     ok2 ? best.us_graph : -1.0, ok2 ? best.pct_read : -1.0);
    }
    run_moe_layer(s, read_bw, csv, card);
    for (int n_mix : {24, 4}) {
      if (moe_only) break;
      const double us = run_hc_mix(n_mix, 16384, s);
      const double gbs = double(n_mix * 16384 * 2 + 16384 * 4) / (us * 1e-6) / 1e9;
      const double us_unfused = run_hc_mix(n_mix, 16384, s, true);
      std::printf("\nhc_mix FUSED (16384 -> %d F16 + rms + %s), one launch: %.2f us graph, %.0f GB/s %.1f%%;"
                  " unfused (GEMV + rms_scale + %s): %.2f us", n_mix, n_mix == 24 ? "sinkhorn" : "head weights", us,
                  gbs, 100.0 * gbs / read_bw, n_mix == 24 ? "split_sinkhorn" : "head_weights", us_unfused);
      if (csv) std::fprintf(csv, "%s,hc_mix fused n_mix=%d,F16,%d,16384,1,1,0,-1,-1,%.3f,-1,%.1f,%.2f,0,0,0,0,%.3f,%.2f\n",
                            card.c_str(), n_mix, n_mix, us, gbs, 100.0 * gbs / read_bw, us, 100.0 * gbs / read_bw);
    }
    std::printf("\n");
    if (!quick) {
      std::printf("\nprototype Q8R (Q8_0 repacked: int8 quants contiguous, f16 scales apart), graph-timed:\n");
      for (auto [rows, cols] : {std::pair<int64_t, int64_t>{1024, 4096}, {32768, 1024}, {4096, 8192}, {2048, 4096}}) {
        for (int u : {2, 4}) {
          const double us = u == 2 ? run_q8r<2>(rows, cols, s) : run_q8r<4>(rows, cols, s);
          const double gbs = double(rows * cols + rows * cols / 16 + cols) / (us * 1e-6) / 1e9;
          std::printf("  Q8R %6lld x %-6lld U=%d %8.2f us %6.0f GB/s %5.1f%%\n", (long long)rows, (long long)cols, u,
                      us, gbs, 100.0 * gbs / read_bw);
        }
      }
    }
    if (csv) std::fclose(csv);
    cudaStreamDestroy(s);
  } catch (const dsv4::Error& e) {
    std::fprintf(stderr, "wb_gemv: %s\n", e.what());
    return 1;
  }
  return 0;
}
