// Workbench: the small decode ops around the projections, before and after the session-8 fusions, one token.
//
//   wb_small [--csv FILE] [--quick]
//
// Each row times a launch sequence two ways: a CUDA graph of 64 repetitions (the decode-graph target: GPU time per
// sequence, launch gaps inside a graph included) and the same 64 sequences launched eagerly (what a decode without
// graphs pays: host launch cost included). "before" is the launch sequence the backend issued at 7e0e2fe, "after"
// the fused variant, on the same kernels' current code. The backend takes an "after" only where it measured faster
// in a graph (H200, dc6bea6): the rms_norm register kernel, the q_a norm's Q8 rows, the kv cache hit; the fused
// HC collapse and rms_norm's own Q8 rows measured slower and stay unused (hc.h, norm_rope.h).
//   hc_pre control     hc_mix (24) + hc_collapse               -> hc_mix with the collapse fused (one launch)
//   hc_head control    hc_mix (4) + hc_collapse                -> hc_mix with the collapse fused
//   hc_pre / hc_head   the same "before" -> the cluster kernel (hc.h kHcMixCluster, session 8 round 2, compiled
//                      but not run when written): with hc_collapse, and with the collapse spread over the cluster
//                      (DSV4_CUDA_HC_KERNEL=cluster in the backend). Outputs equal the default's bit for bit
//                      (tests/ops/hc_cluster_test.cpp), so the rows decide on time alone.
//   hc_post + hc_pre   hc_post + hc_mix + hc_collapse          -> the cluster kernel with hc_post fused as well
//                      (HcMixParams::post_y; not wired into the backend: the model calls them as two ops)
//   attn/ffn norm      rms_norm (256-thread strided kernel) + quantize of its output for the Q8_0 projections
//                      -> rms_norm (register kernel) writing the split-layout Q8 rows itself
//   q_a norm           row_finish (1024 wide) + quantize       -> row_finish writing the Q8 rows itself
//   q_a / kv / q_b     quantize + split-layout Q8_0 GEMV       -> GEMV on the produced rows (also kv: its input was
//                      re-quantized after q_b evicted the single cache entry; two entries per format now)
// HC weights (fn) rotate over 64 copies and GEMV weights over >= 256 MiB of copies, so L2 never serves a weight
// twice in a row; activations stay L2-resident, as in a decode step where the producer just wrote them.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "backend/cuda/attention_rows.h"
#include "backend/cuda/cuda_util.h"
#include "backend/cuda/gemv.h"
#include "backend/cuda/hc.h"
#include "backend/cuda/norm_rope.h"
#include "common/error.h"
#include "quant/quant.h"
#include "wb_common.cuh"
#include "wb_weights.cuh"

using namespace dsv4;
using namespace dsv4::cuda;

namespace {

constexpr int kReps = 64;  // sequences per timed graph / eager batch

struct Timing {
  double graph_us = 0, eager_us = 0;  // per sequence
};

// seq(i): the i-th repetition's launches on stream s.
Timing time_seq(cudaStream_t s, const std::function<void(int)>& seq) {
  auto body = [&] {
    for (int i = 0; i < kReps; ++i) seq(i);
  };
  Timing t;
  t.eager_us = median_ms(s, body, 20) * 1e3 / kReps;
  t.graph_us = graph_median_ms(s, body) * 1e3 / kReps;
  return t;
}

DeviceArray<float> random_floats(size_t n, uint32_t seed) {
  std::vector<float> h(n);
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  for (auto& v : h) v = nd(rng);
  return DeviceArray<float>{std::span<const float>(h)};
}

struct Row {
  std::string name;
  int launches_before, launches_after;
  Timing before, after;
  double bytes = 0;  // weight bytes per sequence (GEMV rows: GB/s of the after graph time)
};

void print_row(const Row& r, const std::string& card, FILE* csv) {
  std::printf("%-40s %3d -> %d   %9.2f %9.2f   %9.2f %9.2f", r.name.c_str(), r.launches_before, r.launches_after,
              r.before.graph_us, r.after.graph_us, r.before.eager_us, r.after.eager_us);
  if (r.bytes > 0) std::printf("   %6.0f GB/s", r.bytes / (r.after.graph_us * 1e-6) / 1e9);
  std::printf("\n");
  std::fflush(stdout);
  if (csv)
    std::fprintf(csv, "%s,%s,%d,%d,%.3f,%.3f,%.3f,%.3f,%.1f\n", card.c_str(), r.name.c_str(), r.launches_before,
                 r.launches_after, r.before.graph_us, r.after.graph_us, r.before.eager_us, r.after.eager_us,
                 r.bytes > 0 ? r.bytes / (r.after.graph_us * 1e-6) / 1e9 : 0.0);
}

// hc_pre (n_mix 24) or hc_head (4) control for one token of Flash width (K = 4 x 4096). "before" is always the
// backend's default (ticket kernel + hc_collapse_cuda); "after" is one of
enum class HcAfter {
  TicketFused,    // the ticket kernel with the collapse fused (one CTA walks X after the Sinkhorn; unused)
  Cluster,        // the cluster kernel (kHcMixCluster), the collapse a launch of its own
  ClusterFused,   // the cluster kernel with the collapse spread over its CTAs: DSV4_CUDA_HC_KERNEL=cluster
};
Row hc_row(int n_mix, HcAfter after, cudaStream_t s) {
  const int64_t K = 16384, d = K / 4;
  const int64_t fn_bytes = int64_t(n_mix) * K * 2;
  DeviceArray<uint8_t> fn(size_t(fn_bytes * kReps));
  random_device_weights(QType::F16, fn.get(), fn.size(), 99u);
  check(cudaDeviceSynchronize(), "weights");
  std::vector<float> hbase(24, 0.1f), hscale = {0.5f, 0.5f, 0.5f};
  DeviceArray<float> X = random_floats(size_t(K), 3), base{std::span<const float>(hbase)},
                     scale{std::span<const float>(hscale)}, out(64), a{size_t(d)};
  DeviceArray<uint8_t> ws(hc_mix_workspace_bytes(1, K));
  ws.fill_bytes(0);
  auto seq = [&](bool fused, int kernel) {
    return [&, fused, kernel](int i) {
      HcMixParams p;
      p.fn = fn.get() + i * fn_bytes, p.n_mix = n_mix, p.X = X.get(), p.K = K, p.n_tokens = 1, p.base = base.get();
      p.scale = scale.get(), p.pre = out.get(), p.post = out.get() + 4, p.comb = out.get() + 8, p.w = out.get();
      p.workspace = ws.get(), p.kernel = kernel;
      if (fused) p.a = a.get();
      hc_mix_cuda(p, s);
      if (!fused) hc_collapse_cuda(X.get(), out.get(), 1, d, a.get(), s);
    };
  };
  const bool fused = after != HcAfter::Cluster;
  const int kernel = after == HcAfter::TicketFused ? kHcMixTicket : kHcMixCluster;
  std::string name = n_mix == 24 ? "hc_pre control" : "hc_head control";
  name += after == HcAfter::TicketFused ? " (ticket+fused coll.)"
          : after == HcAfter::Cluster   ? " (cluster + collapse)"
                                        : " (cluster+fused coll.)";
  // The cluster kernel falls back to the ticket kernel where it cannot be placed: say so instead of timing that.
  if (kernel == kHcMixCluster && !hc_mix_cluster_fits(n_mix, K)) name += " FELL BACK";
  Row r{name, 2, fused ? 1 : 2, {}, {}};
  r.before = time_seq(s, seq(false, kHcMixTicket));
  r.after = time_seq(s, seq(fused, kernel));
  return r;
}

// The model's hc_post -> hc_pre pair (sublayer boundary): hc_post_cuda + hc_mix (ticket) + hc_collapse (3 launches)
// -> the cluster kernel with hc_post and the collapse fused (HcMixParams::post_y; 1 launch). X is updated in place
// every repetition in both sequences (post 0.5, comb 0.25: X stays bounded).
Row hc_post_row(int n_mix, cudaStream_t s) {
  const int64_t K = 16384, d = K / 4;
  const int64_t fn_bytes = int64_t(n_mix) * K * 2;
  DeviceArray<uint8_t> fn(size_t(fn_bytes * kReps));
  random_device_weights(QType::F16, fn.get(), fn.size(), 98u);
  check(cudaDeviceSynchronize(), "weights");
  std::vector<float> hbase(24, 0.1f), hscale = {0.5f, 0.5f, 0.5f}, hpost(4, 0.5f), hcomb(16, 0.25f);
  DeviceArray<float> X = random_floats(size_t(K), 4), y = random_floats(size_t(d), 5);
  DeviceArray<float> base{std::span<const float>(hbase)}, scale{std::span<const float>(hscale)};
  DeviceArray<float> pw{std::span<const float>(hpost)}, pc{std::span<const float>(hcomb)}, out(64), a{size_t(d)};
  DeviceArray<uint8_t> ws(hc_mix_workspace_bytes(1, K));
  ws.fill_bytes(0);
  auto seq = [&](bool fused) {
    return [&, fused](int i) {
      HcMixParams p;
      p.fn = fn.get() + i * fn_bytes, p.n_mix = n_mix, p.X = X.get(), p.K = K, p.n_tokens = 1, p.base = base.get();
      p.scale = scale.get(), p.pre = out.get(), p.post = out.get() + 4, p.comb = out.get() + 8, p.w = out.get();
      p.workspace = ws.get();
      if (fused) {
        p.kernel = kHcMixCluster, p.a = a.get(), p.post_y = y.get(), p.post_w = pw.get(), p.post_comb = pc.get();
        hc_mix_cuda(p, s);
        return;
      }
      hc_post_cuda(X.get(), y.get(), pw.get(), pc.get(), 1, d, s);
      hc_mix_cuda(p, s);
      hc_collapse_cuda(X.get(), out.get(), 1, d, a.get(), s);
    };
  };
  std::string name = n_mix == 24 ? "hc_post+hc_pre (cluster all fused)" : "hc_post+hc_head (cluster all fused)";
  if (!hc_mix_cluster_post_fits(n_mix, K)) name += " FELL BACK";
  Row r{name, 3, 1, {}, {}};
  r.before = time_seq(s, seq(false));
  r.after = time_seq(s, seq(true));
  return r;
}

// The backend's decode HC launches (session 9): the cluster kernel (DSV4_CUDA_HC_KERNEL=cluster) vs the wide kernel
// (kHcMixWide, the default: 128 CTAs and a grid barrier), both one launch with the collapse fused, `post` adding
// the previous sublayer's hc_post (hc_post_pre_norm) and `norm` the attn / ffn norm of `a` (hc_pre_norm).
Row hc_wide_row(bool post, bool norm, cudaStream_t s, int after_kernel = kHcMixWide) {
  const int64_t K = 16384, d = K / 4, fn_bytes = 24 * K * 2;
  DeviceArray<uint8_t> fn(size_t(fn_bytes * kReps));
  random_device_weights(QType::F16, fn.get(), fn.size(), 97u);
  check(cudaDeviceSynchronize(), "weights");
  std::vector<float> hbase(24, 0.1f), hscale = {0.5f, 0.5f, 0.5f}, hpost(4, 0.5f), hcomb(16, 0.25f);
  DeviceArray<float> X = random_floats(size_t(K), 7), y = random_floats(size_t(d), 8), nw = random_floats(size_t(d), 9);
  DeviceArray<float> base{std::span<const float>(hbase)}, scale{std::span<const float>(hscale)};
  DeviceArray<float> pw{std::span<const float>(hpost)}, pc{std::span<const float>(hcomb)}, out(64), a{size_t(d)};
  DeviceArray<uint8_t> ws(hc_mix_workspace_bytes(1, K));
  ws.fill_bytes(0);
  auto seq = [&](int kernel) {
    return [&, kernel](int i) {
      HcMixParams p;
      p.fn = fn.get() + i * fn_bytes, p.n_mix = 24, p.X = X.get(), p.K = K, p.n_tokens = 1, p.base = base.get();
      p.scale = scale.get(), p.pre = out.get(), p.post = out.get() + 4, p.comb = out.get() + 8;
      p.workspace = ws.get(), p.kernel = kernel, p.a = a.get();
      if (post) p.post_y = y.get(), p.post_w = pw.get(), p.post_comb = pc.get();  // X stays bounded (see above)
      if (norm) p.a_norm = true, p.a_norm_w = nw.get();
      hc_mix_cuda(p, s);
    };
  };
  const bool split = after_kernel == kHcMixSplit;
  std::string name = std::string(post ? "hc_post+" : "") + "hc_pre" + (norm ? "+norm" : "") +
                     (split ? " (cluster->split)" : " (cluster->wide)");
  if (!(split ? hc_mix_split_fits(24, K) : hc_mix_wide_fits(24, K))) name += " FELL BACK";
  Row r{name, 1, split ? 2 : 1, {}, {}};
  r.before = time_seq(s, seq(kHcMixCluster));
  r.after = time_seq(s, seq(after_kernel));
  return r;
}

// The attention / FFN input norm: 4096 wide, weighted, in place; its output feeds the Q8_0 projections.
Row norm_row(cudaStream_t s) {
  const int n = 4096;
  DeviceArray<float> x = random_floats(size_t(n), 5), w = random_floats(size_t(n), 6);
  DeviceArray<uint8_t> q(size_t(gpu_activation_bytes(QType::Q8_0, n, GemvLayout::Q8Split)));
  auto seq = [&](bool after) {
    return [&, after](int) {
      RmsNormParams p;
      p.x = x.get(), p.y = x.get(), p.w = w.get(), p.rows = 1, p.n = n;
      if (after) {
        p.q8 = q.get();
      } else {
        p.threads = 256, p.strided = true;
      }
      rms_norm_cuda(p, s);
      if (!after) quantize_activations_cuda(QType::Q8_0, x.get(), 1, n, q.get(), s, GemvLayout::Q8Split);
    };
  };
  Row r{"rms_norm 4096 + Q8 rows", 2, 1, {}, {}};
  r.before = time_seq(s, seq(false));
  r.after = time_seq(s, seq(true));
  return r;
}

// rms_norm alone: the earlier strided 256-thread kernel vs the register kernel (no Q8 output).
Row norm_only_row(cudaStream_t s) {
  const int n = 4096;
  DeviceArray<float> x = random_floats(size_t(n), 7), w = random_floats(size_t(n), 8);
  auto seq = [&](bool after) {
    return [&, after](int) {
      RmsNormParams p;
      p.x = x.get(), p.y = x.get(), p.w = w.get(), p.rows = 1, p.n = n;
      if (!after) p.threads = 256, p.strided = true;
      rms_norm_cuda(p, s);
    };
  };
  Row r{"rms_norm 4096 kernel alone", 1, 1, {}, {}};
  r.before = time_seq(s, seq(false));
  r.after = time_seq(s, seq(true));
  return r;
}

// The q_a norm (head_prep: weighted norm of the 1024-wide q_a output, no RoPE) and q_b's activations.
Row qa_norm_row(cudaStream_t s) {
  const int d = 1024;
  DeviceArray<float> x = random_floats(size_t(d), 9), w = random_floats(size_t(d), 10);
  DeviceArray<uint8_t> q(size_t(gpu_activation_bytes(QType::Q8_0, d, GemvLayout::Q8Split)));
  auto seq = [&](bool after) {
    return [&, after](int) {
      RowFinishParams f;
      f.x = x.get(), f.n_rows = 1, f.d = d, f.norm = RowNorm::Weighted, f.norm_w = w.get();
      if (after) f.q8 = q.get();
      row_finish_cuda(f, s);
      if (!after) quantize_activations_cuda(QType::Q8_0, x.get(), 1, d, q.get(), s, GemvLayout::Q8Split);
    };
  };
  Row r{"q_a norm 1024 + Q8 rows", 2, 1, {}, {}};
  r.before = time_seq(s, seq(false));
  r.after = time_seq(s, seq(true));
  return r;
}

// A split-layout Q8_0 projection of one token: quantize + GEMV (before) vs GEMV on produced rows (after).
Row gemv_row(const char* name, int64_t rows, int64_t cols, cudaStream_t s) {
  const int64_t mat = rows * q8_split_row_bytes(cols), file_mat = rows * row_bytes(QType::Q8_0, cols);
  const int copies = int(std::clamp<int64_t>((256ll << 20) / mat + 1, 1, kReps));
  DeviceArray<uint8_t> wf(size_t(file_mat * copies)), w(size_t(mat * copies));
  random_device_weights(QType::Q8_0, wf.get(), wf.size(), 77u);
  q8_0_split_cuda(wf.get(), rows * copies, cols, w.get(), nullptr);
  check(cudaDeviceSynchronize(), "weights");
  wf.reset();
  DeviceArray<float> x = random_floats(size_t(cols), 11), y{size_t(rows)};
  DeviceArray<uint8_t> q(size_t(gpu_activation_bytes(QType::Q8_0, cols, GemvLayout::Q8Split)));
  quantize_activations_cuda(QType::Q8_0, x.get(), 1, cols, q.get(), nullptr, GemvLayout::Q8Split);
  auto seq = [&](bool after) {
    return [&, after](int i) {
      if (!after) quantize_activations_cuda(QType::Q8_0, x.get(), 1, cols, q.get(), s, GemvLayout::Q8Split);
      GemvParams g;
      g.wtype = QType::Q8_0, g.layout = GemvLayout::Q8Split, g.w = w.get() + (i % copies) * mat, g.rows = rows;
      g.cols = cols, g.xq = q.get(), g.y = y.get();
      gemv_cuda(g, s);
    };
  };
  Row r{name, 2, 1, {}, {}};
  r.before = time_seq(s, seq(false));
  r.after = time_seq(s, seq(true));
  r.bytes = double(mat);
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  std::string csv_path;
  for (int i = 1; i < argc; ++i)
    if (!std::strcmp(argv[i], "--csv") && i + 1 < argc) csv_path = argv[++i];
  // --quick is accepted (scripts/gpu-check.sh passes it); every case here is already small.
  try {
    cudaDeviceProp prop{};
    if (!wb_open_device("wb_small", prop)) return 0;
    const std::string card = prop.name;
    cudaStream_t s;
    check(cudaStreamCreate(&s), "stream");
    FILE* csv = csv_path.empty() ? nullptr : std::fopen(csv_path.c_str(), "w");
    if (csv) std::fprintf(csv, "card,case,launches_before,launches_after,graph_us_before,graph_us_after,"
                               "eager_us_before,eager_us_after,gbs_after\n");
    std::printf("one token; us per sequence (graph of %d sequences / eager launches), median of 20\n", kReps);
    std::printf("%-40s %-9s %9s %9s   %9s %9s\n", "sequence", "launches", "graph bef", "graph aft", "eager bef",
                "eager aft");
    for (const HcAfter after : {HcAfter::TicketFused, HcAfter::Cluster, HcAfter::ClusterFused}) {
      print_row(hc_row(24, after, s), card, csv);
      print_row(hc_row(4, after, s), card, csv);
    }
    print_row(hc_post_row(24, s), card, csv);
    print_row(hc_post_row(4, s), card, csv);
    print_row(hc_wide_row(false, false, s), card, csv);  // hc_pre
    print_row(hc_wide_row(false, true, s), card, csv);   // hc_pre_norm
    print_row(hc_wide_row(true, true, s), card, csv);    // hc_post_pre_norm
    print_row(hc_wide_row(false, true, s, kHcMixSplit), card, csv);  // the split kernels (session 10 default)
    print_row(hc_wide_row(true, true, s, kHcMixSplit), card, csv);
    print_row(norm_only_row(s), card, csv);
    print_row(norm_row(s), card, csv);
    print_row(qa_norm_row(s), card, csv);
    print_row(gemv_row("q_a 4096->1024 (quant + GEMV)", 1024, 4096, s), card, csv);
    print_row(gemv_row("kv 4096->512 (quant + GEMV)", 512, 4096, s), card, csv);
    print_row(gemv_row("q_b 1024->32768 (quant + GEMV)", 32768, 1024, s), card, csv);
    print_row(gemv_row("shexp 4096->2048 (quant + GEMV)", 2048, 4096, s), card, csv);
    if (csv) std::fclose(csv);
    cudaStreamDestroy(s);
  } catch (const dsv4::Error& e) {
    std::fprintf(stderr, "wb_small: %s\n", e.what());
    return 1;
  }
  return 0;
}
