// Workbench: prefill GEMM timings (src/backend/cuda/gemm.h) at DeepSeek-V4-Flash shapes.
//
//   wb_gemm [--csv FILE] [--quick] [--only control|moe]
//
// 1. Dense Q8_0 (split layout, as the backend stores attention/shared-expert matrices) and F16 matrices for
//    T tokens: the batched GEMV (activation quantization + gemv_cuda, 8 tokens per weight read), our MMA kernel
//    and dequantize + cuBLAS; TFLOP/s and effective GB/s (weight bytes / time). Gives the crossover.
// 2. Routed experts of one layer (256 experts, k = 6, q2 mix: IQ2_XXS gate/up, Q2_K down; d 4096, ff 2048) at
//    random top-k routing: moe_gemm_cuda vs the GEMV path the backend runs today (paired gate/up MoE GEMV over
//    T*k slots, SwiGLU, down), for the MoE crossover.
// 3. The matmuls of one forward pass of Flash q2 (43 layers; every layer modelled with the ratio-4 tensor set,
//    the larger one) for T = 256/1024/2048 tokens: the prefill t/s the matmuls alone allow (the HC mixes and the
//    router on the exact FP32 path, as the backend runs them).
// 4. The control projections (HC mix 16384 -> 24, router 4096 -> 256; F16): the F16 GEMV (ceil(T/8) launches, the
//    backend's path before the exact GEMM) vs the exact FP32 GEMM (gemm.h GemmParams::exact). --only control runs
//    just this section; --only moe just section 2 at prefill sizes (T = 256, 1024, 2048), with the double-buffered
//    MMA kernel (mma-db) beside the default one.
// Weights are random bytes with sane scale fields; dense weights rotate over copies totalling >= 256 MiB so L2
// never serves a weight from the previous repetition. Times: mean over repetitions after one warm-up.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "backend/cuda/cuda_util.h"
#include "backend/cuda/gemm.h"
#include "backend/cuda/gemv.h"
#include "backend/cuda/moe.h"
#include "common/error.h"
#include "quant/quant.h"
#include "wb_common.cuh"
#include "wb_weights.cuh"

using namespace dsv4;
using namespace dsv4::cuda;

namespace {

__global__ void normal_fill_kernel(float* x, size_t n, uint32_t seed) {
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t v = (uint32_t(i) ^ seed) * 2654435761u;
    v ^= v >> 15, v *= 0x2c1b3c6du, v ^= v >> 12;
    x[i] = (float(v & 0xFFFF) / 65536.0f - 0.5f) * 3.4f;  // uniform, variance ~1
  }
}

// A dense matrix rotated over copies (>= 256 MiB in all).
struct DenseW {
  QType t;
  GemvLayout layout;
  int64_t rows, cols, bytes;
  int copies;
  DeviceArray<uint8_t> mem;
  const uint8_t* copy(int i) const { return mem.get() + size_t(i % copies) * size_t(bytes); }
};
DenseW make_dense(QType t, int64_t rows, int64_t cols) {
  DenseW w{t, preferred_layout(t, cols, false), rows, cols, 0, 0, {}};
  w.bytes = rows * layout_row_bytes(t, w.layout, cols);
  w.copies = int(std::max<int64_t>(1, ((int64_t(256) << 20) + w.bytes - 1) / w.bytes));
  w.mem = DeviceArray<uint8_t>(size_t(w.bytes) * size_t(w.copies));
  random_device_weights(t, w.mem.get(), w.mem.bytes(), uint32_t(rows * 7 + cols));  // values only: layout is bytes
  return w;
}

struct Scratch {
  DeviceArray<float> x, y, y2;
  DeviceArray<uint8_t> ws, xq;
};

enum class Path { Gemv, Mma, Cublas };
const char* path_name(Path p) { return p == Path::Gemv ? "gemv" : p == Path::Mma ? "mma" : "cublas"; }

// Time of y = W x for T tokens by one path; rotates weight copies per repetition.
float time_dense(const DenseW& w, int T, Path path, Scratch& s, int reps) {
  int rep = 0;
  if (path == Path::Gemv) {
    return mean_ms([&] {
      quantize_activations_cuda(w.t, s.x.get(), T, w.cols, s.xq.get(), nullptr, w.layout);
      GemvParams g;
      g.wtype = w.t, g.layout = w.layout, g.w = w.copy(rep++), g.rows = w.rows, g.cols = w.cols;
      g.xq = s.xq.get(), g.n_tokens = T, g.y = s.y.get();
      gemv_cuda(g, nullptr);
    }, reps);
  }
  GemmParams p;
  p.wtype = w.t, p.layout = w.layout, p.rows = w.rows, p.cols = w.cols, p.x = s.x.get(), p.n_tokens = T;
  p.y = s.y.get(), p.impl = path == Path::Mma ? GemmImpl::Mma : GemmImpl::Cublas;
  return mean_ms([&] {
    p.w = w.copy(rep++);
    gemm_cuda(p, s.ws.get(), nullptr);
  }, reps);
}

// Control projection y = W x (F16 W, f32 x): the F16 GEMV (gemv_cuda splits T into launches of 8 tokens; the
// activations are the floats themselves) or the exact FP32 GEMM (F16 widened + SGEMM).
float time_control(const DenseW& w, int T, bool exact, Scratch& s, int reps) {
  int rep = 0;
  if (!exact) {
    return mean_ms([&] {
      GemvParams g;
      g.wtype = w.t, g.w = w.copy(rep++), g.rows = w.rows, g.cols = w.cols, g.xq = s.x.get(), g.n_tokens = T;
      g.y = s.y.get();
      gemv_cuda(g, nullptr);
    }, reps);
  }
  GemmParams p;
  p.wtype = w.t, p.rows = w.rows, p.cols = w.cols, p.x = s.x.get(), p.n_tokens = T, p.y = s.y.get(), p.exact = true;
  return mean_ms([&] {
    p.w = w.copy(rep++);
    gemm_cuda(p, s.ws.get(), nullptr);
  }, reps);
}

// One layer of routed experts, q2 mix.
struct MoeLayer {
  DeviceArray<uint8_t> gate, up, down;
  int64_t d = 4096, ff = 2048;
  int E = 256, k = 6;
  int64_t gu_stride, down_stride;
};
MoeLayer make_moe() {
  MoeLayer m;
  m.gu_stride = m.ff * row_bytes(QType::IQ2_XXS, m.d);
  m.down_stride = m.d * row_bytes(QType::Q2_K, m.ff);
  m.gate = DeviceArray<uint8_t>(size_t(m.gu_stride * m.E));
  m.up = DeviceArray<uint8_t>(size_t(m.gu_stride * m.E));
  m.down = DeviceArray<uint8_t>(size_t(m.down_stride * m.E));
  random_device_weights(QType::IQ2_XXS, m.gate.get(), m.gate.bytes(), 1);
  random_device_weights(QType::IQ2_XXS, m.up.get(), m.up.bytes(), 2);
  random_device_weights(QType::Q2_K, m.down.get(), m.down.bytes(), 3);
  return m;
}

// Random top-k ids (k distinct experts per token, uniform), 8 different sets so repetitions differ.
std::vector<int32_t> random_ids(int T, int k, int E, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> ids(size_t(T) * k);
  std::vector<int32_t> perm(static_cast<size_t>(E));
  for (int t = 0; t < T; ++t) {
    for (int e = 0; e < E; ++e) perm[size_t(e)] = e;
    for (int j = 0; j < k; ++j) std::swap(perm[size_t(j)], perm[size_t(j) + rng() % size_t(E - j)]);
    for (int j = 0; j < k; ++j) ids[size_t(t * k + j)] = perm[size_t(j)];
  }
  return ids;
}

// db: the double-buffered MMA kernel (MoeGemmParams::mma_double_buffer).
float time_moe(const MoeLayer& m, int T, bool gemv, Scratch& s, int reps, bool db = false) {
  constexpr int kSets = 8;
  std::vector<int32_t> all;
  for (int i = 0; i < kSets; ++i) {
    const auto ids = random_ids(T, m.k, m.E, uint64_t(T * 131 + i));
    all.insert(all.end(), ids.begin(), ids.end());
  }
  DeviceArray<int32_t> d_ids{std::span<const int32_t>(all)};
  const int S = T * m.k;
  std::vector<float> wts(size_t(S), 1.0f / float(m.k));
  DeviceArray<float> d_w{std::span<const float>(wts)};
  int rep = 0;
  if (gemv) {
    // The backend's current path (cuda_backend.cpp moe_ffn): paired gate/up MoE GEMV, SwiGLU, down GEMV.
    DeviceArray<float> g(size_t(S) * m.ff), u(size_t(S) * m.ff);
    const int64_t act_gu = gpu_activation_bytes(QType::IQ2_XXS, m.d), act_dn = gpu_activation_bytes(QType::Q2_K, m.ff);
    DeviceArray<uint8_t> xq(size_t(std::max<int64_t>(int64_t(T) * act_gu, int64_t(S) * act_dn)));
    return mean_ms([&] {
      const int32_t* ids = d_ids.get() + size_t(rep++ % kSets) * S;
      quantize_activations_cuda(QType::IQ2_XXS, s.x.get(), T, m.d, xq.get(), nullptr);
      GemvParams p;
      p.wtype = QType::IQ2_XXS, p.w = m.gate.get(), p.w2 = m.up.get(), p.rows = m.ff, p.cols = m.d;
      p.expert_stride = m.gu_stride, p.expert_ids = ids, p.n_slots = S, p.act_slot_div = m.k, p.xq = xq.get();
      p.y = g.get(), p.y2 = u.get();
      gemv_cuda(p, nullptr);
      swiglu_cuda(g.get(), u.get(), d_w.get(), S, m.ff, 10.0f, g.get(), nullptr);
      quantize_activations_cuda(QType::Q2_K, g.get(), S, m.ff, xq.get(), nullptr);
      GemvParams q;
      q.wtype = QType::Q2_K, q.w = m.down.get(), q.rows = m.d, q.cols = m.ff, q.expert_stride = m.down_stride;
      q.expert_ids = ids, q.n_slots = S, q.act_slot_div = 1, q.xq = xq.get(), q.y = s.y.get();
      gemv_cuda(q, nullptr);
    }, reps);
  }
  MoeGemmParams p;
  p.gate = {QType::IQ2_XXS, GemvLayout::Ggml, m.gate.get(), m.gu_stride};
  p.up = {QType::IQ2_XXS, GemvLayout::Ggml, m.up.get(), m.gu_stride};
  p.down = {QType::Q2_K, GemvLayout::Ggml, m.down.get(), m.down_stride};
  p.d = m.d, p.ff = m.ff, p.n_experts = m.E, p.k = m.k, p.weights = d_w.get(), p.x = s.x.get(), p.n_tokens = T;
  p.swiglu_clamp = 10.0f, p.y_slots = s.y.get(), p.ids = d_ids.get(), p.mma_double_buffer = db;
  DeviceArray<uint8_t> ws(moe_gemm_workspace_bytes(p));
  return mean_ms([&] {
    p.ids = d_ids.get() + size_t(rep++ % kSets) * S;
    moe_gemm_cuda(p, ws.get(), nullptr);
  }, reps);
}

// Section 4: the control projections, GEMV vs exact GEMM.
void control_section(Scratch& s, int reps, FILE* csv) {
  std::printf("\n== control projections (F16): GEMV (8 tokens per launch) vs exact FP32 GEMM, us per matmul ==\n");
  struct Ctl {
    const char* name;
    int64_t rows, cols;
  };
  for (const Ctl& c : {Ctl{"hc mix 16384->24", 24, 16384}, Ctl{"router 4096->256", 256, 4096}}) {
    const DenseW w = make_dense(QType::F16, c.rows, c.cols);
    for (int T : {16, 64, 256, 1024, 2048}) {
      const float gemv_ms = time_control(w, T, false, s, reps), exact_ms = time_control(w, T, true, s, reps);
      std::printf("%-20s T=%5d | gemv %9.1fus | exact %8.1fus (%.1fx)\n", c.name, T, gemv_ms * 1e3, exact_ms * 1e3,
                  gemv_ms / exact_ms);
      if (csv)
        std::fprintf(csv, "control,%s,F16,%d,gemv,%.2f,,\ncontrol,%s,F16,%d,exact,%.2f,,\n", c.name, T, gemv_ms * 1e3,
                     c.name, T, exact_ms * 1e3);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string csv_path;
  bool quick = false;
  std::string only;  // "", "control" or "moe"
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--csv") && i + 1 < argc) csv_path = argv[++i];
    else if (!std::strcmp(argv[i], "--quick")) quick = true;
    else if (!std::strcmp(argv[i], "--only") && i + 1 < argc &&
             (!std::strcmp(argv[i + 1], "control") || !std::strcmp(argv[i + 1], "moe")))
      only = argv[++i];
    else {
      std::fprintf(stderr, "wb_gemm: unknown argument '%s' (wb_gemm [--csv FILE] [--quick] [--only control|moe])\n",
                   argv[i]);
      return 2;
    }
  }
  try {
    cudaDeviceProp prop{};
    if (!wb_open_device("wb_gemm", prop)) return 0;
    FILE* csv = csv_path.empty() ? nullptr : std::fopen(csv_path.c_str(), "w");
    if (csv) std::fprintf(csv, "section,case,type,T,path,us,tflops,gbps\n");
    const int max_T = 2048;
    Scratch s;
    s.x = DeviceArray<float>(size_t(max_T) * 6 * 4096);
    normal_fill_kernel<<<1024, 256>>>(s.x.get(), s.x.size(), 7);
    s.y = DeviceArray<float>(size_t(max_T) * 6 * 4096 * 2);
    s.xq = DeviceArray<uint8_t>(size_t(max_T) * 6 * 4096 * 2);
    s.ws = DeviceArray<uint8_t>(size_t(256) << 20);
    const int reps = quick ? 5 : 20;

    // ---- 4. control projections (first: --only control stops after it) ----
    if (only != "moe") control_section(s, reps, csv);
    if (only == "control") {
      if (csv) std::fclose(csv);
      return 0;
    }

    // ---- 1. dense crossover ----
    struct Shape {
      const char* name;
      QType t;
      int64_t rows, cols;
    };
    const std::vector<Shape> dense = {
        {"attn_q_a 4096->1024", QType::Q8_0, 1024, 4096},  {"attn_q_b 1024->32768", QType::Q8_0, 32768, 1024},
        {"attn_out_b 8192->4096", QType::Q8_0, 4096, 8192}, {"shexp gate 4096->2048", QType::Q8_0, 2048, 4096},
        {"compressor 4096->1024", QType::F16, 1024, 4096},
    };
    const std::vector<int> Ts = quick ? std::vector<int>{8, 16, 32, 64, 256, 1024, 2048}
                                      : std::vector<int>{8, 16, 24, 32, 48, 64, 128, 256, 512, 1024, 2048};
    if (only.empty()) std::printf("\n== dense: us per matmul (TFLOP/s, weight GB/s) ==\n");
    for (const auto& sh : only.empty() ? dense : std::vector<Shape>{}) {
      const DenseW w = make_dense(sh.t, sh.rows, sh.cols);
      for (int T : Ts) {
        std::printf("%-24s %-5s T=%5d", sh.name, qtype_name(sh.t).c_str(), T);
        for (Path path : {Path::Gemv, Path::Mma, Path::Cublas}) {
          if (path == Path::Gemv && T > 256) {
            std::printf(" | %6s %9s", path_name(path), "-");
            continue;
          }
          const float ms = time_dense(w, T, path, s, reps);
          const double tf = 2.0 * double(sh.rows) * double(sh.cols) * T / (ms * 1e-3) / 1e12;
          const double gb = double(w.bytes) / (ms * 1e-3) / 1e9;
          std::printf(" | %6s %7.1fus %5.1fTF %5.0fGB/s", path_name(path), ms * 1e3, tf, gb);
          if (csv) std::fprintf(csv, "dense,%s,%s,%d,%s,%.2f,%.2f,%.0f\n", sh.name, qtype_name(sh.t).c_str(), T,
                                path_name(path), ms * 1e3, tf, gb);
        }
        std::printf("\n");
      }
    }

    // ---- 2. routed experts ----
    std::printf("\n== routed experts, one layer, q2 mix (IQ2_XXS gate/up, Q2_K down), 256 experts, k=6 ==\n");
    const MoeLayer moe = make_moe();
    const double moe_bytes = double(moe.gate.bytes() + moe.up.bytes() + moe.down.bytes());
    const std::vector<int> moe_Ts = only == "moe" ? std::vector<int>{256, 1024, 2048}
                                    : quick       ? std::vector<int>{1, 8, 16, 32, 64, 256, 1024, 2048}
                                                  : std::vector<int>{1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048};
    for (int T : moe_Ts) {
      std::printf("moe T=%5d", T);
      for (bool gemv : {true, false}) {
        if (gemv && T > 64) {
          std::printf(" | %6s %9s", "gemv", "-");
          continue;
        }
        const float ms = time_moe(moe, T, gemv, s, quick ? 3 : 10);
        const double tf = 2.0 * 3.0 * double(moe.d) * double(moe.ff) * T * moe.k / (ms * 1e-3) / 1e12;
        std::printf(" | %6s %8.1fus %5.1fTF %5.0fGB/s(all experts)", gemv ? "gemv" : "mma", ms * 1e3, tf,
                    moe_bytes / (ms * 1e-3) / 1e9);
        if (csv) std::fprintf(csv, "moe,q2 layer,IQ2_XXS/Q2_K,%d,%s,%.2f,%.2f,%.0f\n", T, gemv ? "gemv" : "mma",
                              ms * 1e3, tf, moe_bytes / (ms * 1e-3) / 1e9);
      }
      if (only == "moe") {  // A/B: the double-buffered MMA kernel (bit-identical results)
        const float ms = time_moe(moe, T, false, s, quick ? 3 : 10, true);
        std::printf(" | %6s %8.1fus", "mma-db", ms * 1e3);
        if (csv) std::fprintf(csv, "moe,q2 layer,IQ2_XXS/Q2_K,%d,mma-db,%.2f,,\n", T, ms * 1e3);
      }
      std::printf("\n");
    }

    if (only == "moe") {
      if (csv) std::fclose(csv);
      return 0;
    }

    // ---- 3. one forward pass of Flash q2: all matmuls ----
    std::printf("\n== all matmuls of one pass, Flash q2 (43 layers x ratio-4 tensor set), best dense path ==\n");
    struct PassMat {
      const char* name;
      QType t;
      int64_t rows, cols;
      int count;  // per layer
      bool exact = false;  // control projection: the exact FP32 path
    };
    const std::vector<PassMat> mats = {
        {"attn_q_a", QType::Q8_0, 1024, 4096, 1},     {"attn_q_b", QType::Q8_0, 32768, 1024, 1},
        {"attn_kv", QType::Q8_0, 512, 4096, 1},       {"attn_out_a group", QType::Q8_0, 1024, 4096, 8},
        {"attn_out_b", QType::Q8_0, 4096, 8192, 1},   {"shexp gate/up", QType::Q8_0, 2048, 4096, 2},
        {"shexp down", QType::Q8_0, 4096, 2048, 1},   {"compressor kv+gate", QType::F16, 2048, 4096, 1},
        {"indexer q_b", QType::F16, 8192, 1024, 1},   {"indexer proj", QType::F16, 64, 4096, 1},
        {"indexer comp kv+gate", QType::F16, 512, 4096, 1}, {"router", QType::F16, 256, 4096, 1, true},
        {"hc mixers", QType::F16, 24, 16384, 2, true},
    };
    for (int T : {256, 1024, 2048}) {
      double layer_ms = 0;
      for (const auto& m : mats) {
        const DenseW w = make_dense(m.t, m.rows, m.cols);
        float best = 1e30f;
        if (m.exact) best = time_control(w, T, true, s, reps);
        else
          for (Path path : {Path::Mma, Path::Cublas}) best = std::min(best, time_dense(w, T, path, s, reps));
        layer_ms += double(best) * m.count;
      }
      const double moe_ms = time_moe(moe, T, false, s, quick ? 3 : 10);
      const double pass_ms = 43.0 * (layer_ms + moe_ms);
      std::printf("T=%5d: dense %.3f ms/layer + routed %.3f ms/layer -> %.1f ms per pass -> %.0f t/s (matmuls only)\n",
                  T, layer_ms, moe_ms, pass_ms, T / (pass_ms * 1e-3));
      if (csv) std::fprintf(csv, "pass,flash q2 43 layers,mix,%d,best,%.2f,,\n", T, pass_ms * 1e3);
    }
    if (csv) std::fclose(csv);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "wb_gemm: %s\n", e.what());
    return 1;
  }
}
