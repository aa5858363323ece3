// Workbench: dense single-token GEMV variant 2 (src/backend/cuda/gemv_dense_v2.h) beside the default kernels, at
// Flash's dense decode shapes, in one process so every number comes from the same card.
//
//   wb_gemv_v2 [--csv FILE] [--quick]      (--quick is accepted for gpu-check.sh and changes nothing: the whole
//                                          run, output head included, is a few seconds of GPU time)
//
// Columns (us per GEMV, graph replay, median of 20; weights rotated over >= 256 MiB of copies so L2 never serves a
// weight twice in a row; random valid blocks, Q8_0 repacked to the split layout as the backend does):
//   default    gemv_cuda with kernel 0 (what the decode runs today)
//   v2         kernel 3: one wave of CTAs, every load of a warp's item issued up front
//   v2+pdl     kernel 4: v2 launched with programmatic dependent launch (overlaps the previous GEMV's tail)
//   q+default / q+v2pdl   each GEMV preceded by its activation quantizer (an ordinary kernel, as in the decode,
//              where a norm or quantizer produces the input): PDL with a producer that does not trigger early
// "layer" rows run the five dense GEMVs of one decode layer (q_a, kv, q_b, o_a grouped, o_b) in sequence, rotated
// over enough layers' worth of weights: the per-layer dense GEMV time of each kernel choice.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "backend/cuda/cuda_util.h"
#include "backend/cuda/gemv.h"
#include "backend/cuda/gemv_dense_v2.h"
#include "common/error.h"
#include "quant/quant.h"
#include "wb_common.cuh"
#include "wb_weights.cuh"

using namespace dsv4;
using namespace dsv4::cuda;

namespace {

// One dense decode matrix: groups x (rows x cols) (groups > 1: attn_output_a's grouped launch), `copies` copies of
// its device weights, its float input and the quantized input.
struct Mat {
  std::string name;
  QType type;
  int64_t rows, cols;
  int groups = 1;
  GemvLayout layout = GemvLayout::Ggml;
  int64_t dev_bytes = 0;  // one copy, device layout
  int copies = 1;
  DeviceArray<uint8_t> w;
  DeviceArray<float> x;
  DeviceArray<uint8_t> xq;
  DeviceArray<float> y;
  DeviceArray<int32_t> ids;  // 0..groups-1: the default path's MoE-mode launch

  Mat(std::string n, QType t, int64_t r, int64_t c, int g, int64_t min_total, cudaStream_t s)
      : name(std::move(n)), type(t), rows(r), cols(c), groups(g) {
    layout = preferred_layout(t, c, false);
    const int64_t file_bytes = row_bytes(t, c) * r * g;
    dev_bytes = layout_row_bytes(t, layout, c) * r * g;
    copies = int(std::clamp<int64_t>(min_total / dev_bytes + 1, 1, 64));
    DeviceArray<uint8_t> file(size_t(file_bytes * copies));
    random_device_weights(t, file.get(), file.size(), 1234u);
    check(cudaDeviceSynchronize(), "weights");
    w = DeviceArray<uint8_t>(size_t(dev_bytes * copies));
    repack_weight_cuda(t, layout, file.get(), r * g * copies, c, w.get(), s);
    std::vector<float> hx(static_cast<size_t>(g * c));
    std::mt19937 rng(7);
    std::normal_distribution<float> nd;
    for (auto& v : hx) v = nd(rng);
    x = DeviceArray<float>(std::span<const float>(hx));
    xq = DeviceArray<uint8_t>(size_t(g * gpu_activation_bytes(t, c, layout)));
    quantize_activations_cuda(t, x.get(), g, c, xq.get(), s, layout);
    y = DeviceArray<float>(size_t(g * r));
    std::vector<int32_t> hid(static_cast<size_t>(g), 0);
    for (int i = 0; i < g; ++i) hid[size_t(i)] = i;
    ids = DeviceArray<int32_t>(std::span<const int32_t>(hid));
    check(cudaStreamSynchronize(s), "setup");
  }

  // The launch of copy i with kernel k (0: the backend's default form; 3/4: variant 2), optionally preceded by the
  // activation quantizer.
  void launch(int i, int k, bool quantize, cudaStream_t s) const {
    if (quantize) quantize_activations_cuda(type, x.get(), groups, cols, const_cast<uint8_t*>(xq.get()), s, layout);
    GemvParams p;
    p.wtype = type, p.layout = layout, p.w = w.get() + int64_t(i % copies) * dev_bytes, p.rows = rows, p.cols = cols;
    p.xq = xq.get(), p.y = const_cast<float*>(y.get()), p.n_slots = groups;
    p.expert_stride = dev_bytes / groups;
    if (groups > 1 && k == 0) p.expert_ids = ids.get();  // today's grouped form: MoE mode over ids 0..G-1
    p.kernel = k;
    gemv_cuda(p, s);
  }
};

struct Timing {
  bool ok = false;
  double us = 0;
};

Timing time_seq(cudaStream_t s, int n, const std::function<void(int)>& one) {
  Timing t;
  try {
    t.us = graph_median_ms(s, [&] {
      for (int i = 0; i < n; ++i) one(i);
    }) * 1e3 / n;
    t.ok = true;
  } catch (const Error& e) {
    std::fprintf(stderr, "  (failed: %s)\n", e.what());
    cudaGetLastError();
  }
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  std::string csv_path;
  for (int i = 1; i < argc; ++i)
    if (!std::strcmp(argv[i], "--csv") && i + 1 < argc) csv_path = argv[++i];
  try {
    cudaDeviceProp prop{};
    if (!wb_open_device("wb_gemv_v2", prop)) return 0;
    const std::string card = prop.name;
    cudaStream_t s;
    check(cudaStreamCreate(&s), "stream");
    double read_bw = 0;
    {
      const size_t big = size_t(2) << 30;
      DeviceArray<uint8_t> buf(big);
      random_device_weights(QType::F16, buf.get(), big, 1u);
      DeviceArray<unsigned> sink(1);
      const float ms = median_ms(s, [&] {
        read_kernel<<<prop.multiProcessorCount * 8, 512, 0, s>>>(reinterpret_cast<const uint4*>(buf.get()), big / 16,
                                                                  sink.get());
      }, 10);
      read_bw = double(big) / (ms * 1e-3) / 1e9;
    }
    std::printf("streaming read 2 GiB: %.0f GB/s\n\n", read_bw);

    constexpr int64_t kMinTotal = 256ll << 20;
    std::vector<Mat> mats;
    mats.emplace_back("attn_q_a 4096->1024", QType::Q8_0, 1024, 4096, 1, kMinTotal, s);
    mats.emplace_back("attn_kv 4096->512", QType::Q8_0, 512, 4096, 1, kMinTotal, s);
    mats.emplace_back("attn_q_b 1024->32768", QType::Q8_0, 32768, 1024, 1, kMinTotal, s);
    mats.emplace_back("attn_out_a 8x(4096->1024)", QType::Q8_0, 1024, 4096, 8, kMinTotal, s);
    mats.emplace_back("attn_out_b 8192->4096", QType::Q8_0, 4096, 8192, 1, kMinTotal, s);
    mats.emplace_back("compressor F16 4096->1024", QType::F16, 1024, 4096, 1, kMinTotal, s);
    mats.emplace_back("F16 4096->256", QType::F16, 256, 4096, 1, kMinTotal, s);
    mats.emplace_back("output 4096->129280", QType::Q8_0, 129280, 4096, 1, kMinTotal, s);

    FILE* csv = csv_path.empty() ? nullptr : std::fopen(csv_path.c_str(), "w");
    if (csv) std::fprintf(csv, "card,case,mbytes,us_default,us_v2,us_v2pdl,us_q_default,us_q_v2pdl\n");
    std::printf("%-28s %8s | %9s %6s | %9s %6s | %9s %6s | %10s %10s\n", "case (us per GEMV, graph)", "MB",
                "default", "%read", "v2", "%read", "v2+pdl", "%read", "q+default", "q+v2pdl");
    const auto pct = [&](const Timing& t, double mb) { return t.ok ? 100.0 * mb * 1e6 / (t.us * 1e-6) / 1e9 / read_bw : -1.0; };
    for (const Mat& m : mats) {
      const double mb = double(m.dev_bytes) / 1e6;
      const int n = std::max(m.copies, 8);
      const Timing d = time_seq(s, n, [&](int i) { m.launch(i, 0, false, s); });
      const Timing v = time_seq(s, n, [&](int i) { m.launch(i, kGemvKernelV2, false, s); });
      const Timing vp = time_seq(s, n, [&](int i) { m.launch(i, kGemvKernelV2Pdl, false, s); });
      const Timing qd = time_seq(s, n, [&](int i) { m.launch(i, 0, true, s); });
      const Timing qv = time_seq(s, n, [&](int i) { m.launch(i, kGemvKernelV2Pdl, true, s); });
      std::printf("%-28s %8.2f | %9.2f %5.1f%% | %9.2f %5.1f%% | %9.2f %5.1f%% | %10.2f %10.2f\n", m.name.c_str(), mb,
                  d.us, pct(d, mb), v.us, pct(v, mb), vp.us, pct(vp, mb), qd.us, qv.us);
      std::fflush(stdout);
      if (csv)
        std::fprintf(csv, "%s,%s,%.3f,%.3f,%.3f,%.3f,%.3f,%.3f\n", card.c_str(), m.name.c_str(), mb, d.ok ? d.us : -1,
                     v.ok ? v.us : -1, vp.ok ? vp.us : -1, qd.ok ? qd.us : -1, qv.ok ? qv.us : -1);
    }

    // One layer's five dense attention GEMVs in sequence (mats 0..4), rotated over the copies.
    std::printf("\nlayer sequence q_a, kv, q_b, o_a, o_b (us per layer, graph of 16 layers):\n");
    for (const int k : {0, kGemvKernelV2, kGemvKernelV2Pdl}) {
      const Timing t = time_seq(s, 16, [&](int i) {
        for (int j = 0; j < 5; ++j) mats[size_t(j)].launch(i, k, false, s);
      });
      std::printf("  kernel %d: %8.2f us\n", k, t.us);
      if (csv) std::fprintf(csv, "%s,layer kernel=%d,0,%.3f,-1,-1,-1,-1\n", card.c_str(), k, t.ok ? t.us : -1);
    }
    if (csv) std::fclose(csv);
    cudaStreamDestroy(s);
  } catch (const Error& e) {
    std::fprintf(stderr, "wb_gemv_v2: %s\n", e.what());
    return 1;
  }
  return 0;
}
