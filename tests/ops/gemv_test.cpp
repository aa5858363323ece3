// Parity of the CUDA quantized GEMV (src/backend/cuda/gemv.h) with the CPU reference of src/quant, at Flash
// widths, for dense, batched (several tokens) and MoE (selected experts, ids on the device) launches.
//
// Reference: activations quantized on the CPU with quantize_activation() (the same format the GPU produces, bit
// for bit: checked by ActivationQuantization below), both operands dequantized with dequantize_row(), and the dot
// product taken in double. The GPU forms each block's integer dot exactly and differs only by fp32 scaling and
// summation order, so the tolerance is a few hundred fp32 ulps of the result: rel-L2 <= 1e-5 over the output
// vector, and every output within 1e-4 of the reference relative to max(|ref|, rms(ref)) (so near-zero outputs,
// which are cancellations of large terms, are judged against the typical output size).
// Weights are random valid blocks (random bytes with sane f16 scales), which exercises every grid index, sign
// code and scale nibble rather than only what a quantizer would emit.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "backend/cuda/gemv.h"
#include "backend/cuda/moe.h"
#include "ops_common.h"
#include "quant/quant.h"

namespace dsv4 {
namespace {

using cuda::DeviceArray;

// Activations as the kernels see them: quantized (bytes) and that quantization dequantized (floats).
struct PreparedActivations {
  std::vector<uint8_t> q;
  std::vector<float> deq;
};
PreparedActivations prepare(QType wt, const std::vector<float>& x, int64_t n_rows, int64_t cols) {
  PreparedActivations a;
  const int64_t ab = activation_bytes(wt, cols);
  a.q.resize(size_t(n_rows * ab));
  a.deq.resize(size_t(n_rows * cols));
  for (int64_t r = 0; r < n_rows; ++r) {
    quantize_activation(wt, &x[size_t(r * cols)], &a.q[size_t(r * ab)], cols);
    dequantize_row(activation_type(wt), &a.q[size_t(r * ab)], &a.deq[size_t(r * cols)], cols);
  }
  return a;
}

// y = W_row . x in double over dequantized operands.
double ref_dot(QType t, const uint8_t* wrow, const float* xdeq, int64_t cols, std::vector<float>& scratch) {
  scratch.resize(size_t(cols));
  dequantize_row(t, wrow, scratch.data(), cols);
  double s = 0;
  for (int64_t i = 0; i < cols; ++i) s += double(scratch[size_t(i)]) * double(xdeq[i]);
  return s;
}

void expect_close(const std::vector<float>& got, const std::vector<double>& ref, const std::string& what) {
  double ms = 0;
  for (double v : ref) ms += v * v;
  const double rms = std::sqrt(ms / double(ref.size()));
  const double e_l2 = test::rel_l2(got, ref);
  const double e_max = test::max_rel_err(got, ref, rms);
  EXPECT_LE(e_l2, 1e-5) << what;
  EXPECT_LE(e_max, 1e-4) << what;
}

// Kernel selection and tuning knobs copied into the launch (kernel, tile_rows, iq2_rep, row_group, cta_warps).
struct Knobs {
  int kernel = 0, tile_rows = 0, iq2_rep = 0, row_group = 0, cta_warps = 0;
  std::string name() const {
    return " [kernel=" + std::to_string(kernel) + " tile=" + std::to_string(tile_rows) + " rep=" +
           std::to_string(iq2_rep) + " R=" + std::to_string(row_group) + " W=" + std::to_string(cta_warps) + "]";
  }
};
void apply(const Knobs& k, cuda::GemvParams& p) {
  p.kernel = k.kernel, p.tile_rows = k.tile_rows, p.iq2_rep = k.iq2_rep, p.row_group = k.row_group;
  p.cta_warps = k.cta_warps;
}

void run_dense(QType t, int64_t rows, int64_t cols, int n_tokens, uint64_t seed,
               cuda::GemvLayout layout = cuda::GemvLayout::Ggml, const Knobs& knobs = {}) {
  const bool split = layout == cuda::GemvLayout::Q8Split;
  const std::string what = qtype_name(t) + (split ? " split " : " ") + std::to_string(rows) + "x" +
                           std::to_string(cols) + " T=" + std::to_string(n_tokens) + knobs.name();
  const auto w = test::random_weights(t, rows, cols, seed);
  const auto x = test::random_normal(size_t(n_tokens * cols), seed + 1);
  const auto act = prepare(t, x, n_tokens, cols);

  DeviceArray<uint8_t> d_w{std::span<const uint8_t>(w)};
  if (split) {  // repack on the device, as the backend does at upload
    DeviceArray<uint8_t> d_split(size_t(rows * cuda::q8_split_row_bytes(cols)));
    cuda::q8_0_split_cuda(d_w.get(), rows, cols, d_split.get(), nullptr);
    d_w = std::move(d_split);
  }
  DeviceArray<float> d_x{std::span<const float>(x)};
  DeviceArray<uint8_t> d_xq(size_t(n_tokens * cuda::gpu_activation_bytes(t, cols, layout)));
  DeviceArray<float> d_y(size_t(n_tokens * rows));
  d_y.fill_bytes(0xFF);  // NaN poison: every output must be written
  cuda::quantize_activations_cuda(t, d_x.get(), n_tokens, cols, d_xq.get(), nullptr, layout);
  cuda::GemvParams p;
  p.wtype = t, p.w = d_w.get(), p.rows = rows, p.cols = cols, p.xq = d_xq.get(), p.n_tokens = n_tokens;
  p.layout = layout;
  p.y = d_y.get();
  apply(knobs, p);
  cuda::gemv_cuda(p, nullptr);
  cuda::check(cudaDeviceSynchronize(), what.c_str());
  const auto y = d_y.download();

  const int64_t rb = row_bytes(t, cols);
  std::vector<double> ref(size_t(n_tokens * rows));
  std::vector<float> cpu_dot(size_t(n_tokens * rows));
  std::vector<float> scratch;
  for (int tok = 0; tok < n_tokens; ++tok)
    for (int64_t r = 0; r < rows; ++r) {
      const uint8_t* wr = &w[size_t(r * rb)];
      ref[size_t(tok * rows + r)] = ref_dot(t, wr, &act.deq[size_t(tok * cols)], cols, scratch);
      cpu_dot[size_t(tok * rows + r)] =
          vec_dot(t, wr, &act.q[size_t(tok * activation_bytes(t, cols))], cols);
    }
  expect_close(y, ref, what + " vs dequantize+double dot");
  // The CPU backend's own kernel (vec_dot) must agree with the same reference to the same tolerance, so GPU
  // and CPU backends agree with each other within twice it.
  expect_close(cpu_dot, ref, what + " (CPU vec_dot) vs dequantize+double dot");
}

TEST(CudaGemv, Q8_0_AttentionWidths) {
  DSV4_REQUIRE_CUDA();
  run_dense(QType::Q8_0, 1024, 4096, 1, 101);   // wq_a: 4096 -> 1024
  run_dense(QType::Q8_0, 32768, 1024, 1, 102);  // wq_b: 1024 -> 64 x 512
  run_dense(QType::Q8_0, 4096, 8192, 1, 103);   // wo_b: 8 x 1024 -> 4096
}

// Q8_0 repacked into the split layout at upload: same values, same tolerance.
TEST(CudaGemv, Q8_0_SplitLayout) {
  DSV4_REQUIRE_CUDA();
  const auto split = cuda::GemvLayout::Q8Split;
  run_dense(QType::Q8_0, 1024, 4096, 1, 111, split);
  run_dense(QType::Q8_0, 32768, 1024, 1, 112, split);
  run_dense(QType::Q8_0, 4096, 8192, 3, 113, split);
  run_dense(QType::Q8_0, 512, 4096, 13, 114, split);
  cuda::GemvParams p;  // the split layout needs cols % 256 == 0
  p.wtype = QType::Q8_0, p.rows = 4, p.cols = 96, p.layout = split;
  EXPECT_THROW(cuda::gemv_cuda(p, nullptr), Error);
}

TEST(CudaGemv, Q2_K_Q4_K_IQ2_XXS_ExpertWidths) {
  DSV4_REQUIRE_CUDA();
  run_dense(QType::Q2_K, 4096, 2048, 1, 201);     // expert down: 2048 -> 4096
  run_dense(QType::Q4_K, 2048, 4096, 1, 202);     // q4 mix gate/up: 4096 -> 2048
  run_dense(QType::Q4_K, 4096, 2048, 1, 203);     // q4 mix down
  run_dense(QType::IQ2_XXS, 2048, 4096, 1, 204);  // q2 mix gate/up
}

TEST(CudaGemv, F16_HcAndCompressorWidths) {
  DSV4_REQUIRE_CUDA();
  run_dense(QType::F16, 24, 16384, 1, 301);   // HC control: 4 x 4096 -> 24
  run_dense(QType::F16, 1024, 4096, 1, 302);  // compressor kv+gate (ratio 4): 4096 -> 2 x 512
}

TEST(CudaGemv, BatchedTokens) {
  DSV4_REQUIRE_CUDA();
  run_dense(QType::Q8_0, 1024, 4096, 3, 401);
  run_dense(QType::Q2_K, 4096, 2048, 8, 402);
  run_dense(QType::Q4_K, 2048, 4096, 5, 403);
  run_dense(QType::IQ2_XXS, 2048, 4096, 2, 404);
  run_dense(QType::F16, 24, 16384, 4, 405);
  run_dense(QType::Q8_0, 512, 4096, 13, 406);  // > 8 tokens: split into launches of 8 + 5
}

// MoE: n_slots experts of a 256-expert stack in one launch, expert ids read from device memory.
void run_moe(QType t, int64_t rows, int64_t cols, int n_experts, const std::vector<int32_t>& ids,
             int act_slot_div, uint64_t seed, bool paired = false, const Knobs& knobs = {}) {
  const int n_slots = int(ids.size());
  const int n_act = n_slots / act_slot_div;
  const std::string what = "MoE " + qtype_name(t) + " " + std::to_string(rows) + "x" + std::to_string(cols) +
                           " x" + std::to_string(n_experts) + " slots=" + std::to_string(n_slots) + knobs.name();
  const auto w = test::random_weights(t, rows, cols, seed, n_experts);
  const auto w2 = paired ? test::random_weights(t, rows, cols, seed + 7, n_experts) : std::vector<uint8_t>{};
  const auto x = test::random_normal(size_t(n_act * cols), seed + 1);
  const auto act = prepare(t, x, n_act, cols);
  const int64_t rb = row_bytes(t, cols);

  DeviceArray<uint8_t> d_w{std::span<const uint8_t>(w)};
  DeviceArray<float> d_x{std::span<const float>(x)};
  DeviceArray<uint8_t> d_xq(size_t(n_act * cuda::gpu_activation_bytes(t, cols)));
  DeviceArray<int32_t> d_ids{std::span<const int32_t>(ids)};
  DeviceArray<float> d_y(size_t(n_slots * rows));
  d_y.fill_bytes(0xFF);
  DeviceArray<uint8_t> d_w2{std::span<const uint8_t>(w2)};
  DeviceArray<float> d_y2(paired ? size_t(n_slots * rows) : 0);
  d_y2.fill_bytes(0xFF);
  cuda::quantize_activations_cuda(t, d_x.get(), n_act, cols, d_xq.get(), nullptr);
  cuda::GemvParams p;
  p.wtype = t, p.w = d_w.get(), p.rows = rows, p.cols = cols, p.expert_stride = rows * rb;
  p.expert_ids = d_ids.get(), p.n_slots = n_slots, p.act_slot_div = act_slot_div, p.xq = d_xq.get();
  p.y = d_y.get();
  if (paired) p.w2 = d_w2.get(), p.y2 = d_y2.get();
  apply(knobs, p);
  cuda::gemv_cuda(p, nullptr);
  cuda::check(cudaDeviceSynchronize(), what.c_str());

  std::vector<float> scratch;
  for (int m = 0; m < (paired ? 2 : 1); ++m) {
    const auto& wm = m == 0 ? w : w2;
    const auto y = (m == 0 ? d_y : d_y2).download();
    std::vector<double> ref(size_t(n_slots * rows));
    for (int s = 0; s < n_slots; ++s)
      for (int64_t r = 0; r < rows; ++r) {
        const uint8_t* wr = &wm[size_t((int64_t(ids[size_t(s)]) * rows + r) * rb)];
        ref[size_t(s * rows + r)] = ref_dot(t, wr, &act.deq[size_t((s / act_slot_div) * cols)], cols, scratch);
      }
    expect_close(y, ref, what + (m ? " (w2)" : ""));
  }
}

TEST(CudaGemv, MoeGateUpSharedInput) {
  DSV4_REQUIRE_CUDA();
  // Two tokens, six experts each (ids include the first and last expert); gate/up share the token's input.
  run_moe(QType::IQ2_XXS, 2048, 4096, 256, {0, 17, 255, 128, 3, 77, 5, 255, 0, 200, 31, 64}, 6, 501);
}

// Gate and up of the same experts in one launch (grid.y covers w's slots, then w2's).
TEST(CudaGemv, MoePairedGateUp) {
  DSV4_REQUIRE_CUDA();
  run_moe(QType::IQ2_XXS, 2048, 4096, 64, {63, 2, 17, 40, 0, 9}, 6, 511, true);
  run_moe(QType::Q4_K, 512, 4096, 8, {7, 1, 0, 3, 5, 2, 6, 4, 1, 0, 2, 3}, 6, 512, true);
}

TEST(CudaGemv, MoeDownPerSlotInput) {
  DSV4_REQUIRE_CUDA();
  run_moe(QType::Q2_K, 4096, 2048, 256, {255, 1, 100, 42, 0, 199}, 1, 502);
  run_moe(QType::Q4_K, 4096, 2048, 32, {31, 1, 7, 9, 0, 16}, 1, 503);
}

// The GPU activation quantizers must reproduce quantize_activation() bit for bit (else GPU and CPU dot kernels
// see different operands). Includes an all-zero block (d = 0), a block of one huge value, and ties. The GPU's
// Q8_K blocks are padded (304 bytes: d, 12 pad bytes, qs, bsums); they are unpacked to the CPU's 292-byte layout
// before the byte comparison.
TEST(CudaGemv, ActivationQuantizationBitExact) {
  DSV4_REQUIRE_CUDA();
  const int64_t cols = 4096, n_rows = 3;
  auto x = test::random_normal(size_t(n_rows * cols), 601, 3.0f);
  for (int i = 0; i < 256; ++i) x[size_t(i)] = 0.0f;                         // zero Q8_K block
  for (int i = 256; i < 512; ++i) x[size_t(i)] = i == 300 ? 1e6f : 1e-3f;    // extreme dynamic range
  for (int i = 512; i < 768; ++i) x[size_t(i)] = float(i % 5 - 2) * 0.5f;   // exact multiples: halfway cases
  for (QType wt : {QType::Q8_0, QType::Q2_K}) {
    const int64_t ab = activation_bytes(wt, cols);
    std::vector<uint8_t> cpu(size_t(n_rows * ab));
    for (int64_t r = 0; r < n_rows; ++r) quantize_activation(wt, &x[size_t(r * cols)], &cpu[size_t(r * ab)], cols);
    DeviceArray<float> d_x{std::span<const float>(x)};
    DeviceArray<uint8_t> d_q(size_t(n_rows * cuda::gpu_activation_bytes(wt, cols)));
    d_q.fill_bytes(0xAB);
    cuda::quantize_activations_cuda(wt, d_x.get(), n_rows, cols, d_q.get(), nullptr);
    auto gpu = d_q.download();
    if (activation_type(wt) == QType::Q8_K) {
      ASSERT_EQ(gpu.size() / 304, cpu.size() / sizeof(block_q8_K));
      std::vector<uint8_t> unpacked(cpu.size());
      for (size_t b = 0; b < gpu.size() / 304; ++b) {
        std::memcpy(&unpacked[b * 292], &gpu[b * 304], 4);                // d
        std::memcpy(&unpacked[b * 292 + 4], &gpu[b * 304 + 16], 256);     // qs
        std::memcpy(&unpacked[b * 292 + 260], &gpu[b * 304 + 272], 32);   // bsums
      }
      gpu = unpacked;
    }
    size_t first = cpu.size();
    for (size_t i = 0; i < cpu.size(); ++i)
      if (cpu[i] != gpu[i]) {
        first = i;
        break;
      }
    EXPECT_EQ(first, cpu.size()) << qtype_name(activation_type(wt)) << ": first differing byte at offset "
                                 << first;
  }
}

TEST(CudaGemv, RejectsBadShapes) {
  DSV4_REQUIRE_CUDA();
  cuda::GemvParams p;
  p.wtype = QType::Q4_K, p.rows = 16, p.cols = 100;  // 100 is not a multiple of 256
  EXPECT_THROW(cuda::gemv_cuda(p, nullptr), Error);
  p.wtype = QType::BF16, p.cols = 256;
  EXPECT_THROW(cuda::gemv_cuda(p, nullptr), Error);
}

// The staged kernel (cp.async tiles in shared memory) against the same references and tolerances: every weight type
// and layout, MoE and dense, partial last tiles (rows not a multiple of the tile), 2 and 4 rows per warp, the
// IQ2_XXS selector table with 1, 4 and 32 copies, and the register-streaming kernel forced for comparison.
TEST(CudaGemv, StagedKernelDense) {
  DSV4_REQUIRE_CUDA();
  const Knobs staged{2}, tiles{2, 12, 4, 4, 4};  // tile 12 rounds up to 16 with R = 4: partial tiles below
  run_dense(QType::Q8_0, 1024, 4096, 1, 601, cuda::GemvLayout::Ggml, staged);
  run_dense(QType::Q8_0, 4096, 8192, 1, 602, cuda::GemvLayout::Q8Split, staged);
  run_dense(QType::Q8_0, 1000, 4096, 1, 603, cuda::GemvLayout::Q8Split, tiles);
  run_dense(QType::F16, 1024, 4096, 1, 604, cuda::GemvLayout::Ggml, staged);
  run_dense(QType::F16, 1000, 4096, 1, 605, cuda::GemvLayout::Ggml, tiles);
  run_dense(QType::Q2_K, 4100, 2048, 1, 606, cuda::GemvLayout::Ggml, tiles);
  run_dense(QType::Q4_K, 2048, 4096, 1, 607, cuda::GemvLayout::Ggml, staged);
  run_dense(QType::IQ2_XXS, 2050, 4096, 1, 608, cuda::GemvLayout::Ggml, tiles);
}

TEST(CudaGemv, StagedKernelMoe) {
  DSV4_REQUIRE_CUDA();
  const std::vector<int32_t> ids = {0, 17, 255, 128, 3, 77, 5, 255, 0, 200, 31, 64};
  for (int rep : {1, 4, 32}) run_moe(QType::IQ2_XXS, 2048, 4096, 256, ids, 6, 611, false, Knobs{2, 0, rep});
  run_moe(QType::IQ2_XXS, 2048, 4096, 64, {63, 2, 17, 40, 0, 9}, 6, 612, true, Knobs{2, 8, 32, 4});
  run_moe(QType::Q2_K, 4096, 2048, 256, {255, 1, 100, 42, 0, 199}, 1, 613, false, Knobs{2, 0, 0, 4});
  run_moe(QType::Q4_K, 4096, 2048, 32, {31, 1, 7, 9, 0, 16}, 1, 614, false, Knobs{2, 24});
  run_moe(QType::Q4_K, 512, 4096, 8, {7, 1, 0, 3, 5, 2, 6, 4, 1, 0, 2, 3}, 6, 615, true, Knobs{2});
  // The register-streaming kernel, forced (the policy sends Q2_K expert stacks to the staged one), and with the
  // selector table for IQ2_XXS (iq2_rep >= 2) instead of the default uint2 grid.
  run_moe(QType::IQ2_XXS, 2048, 4096, 256, ids, 6, 616, true, Knobs{1});
  run_moe(QType::IQ2_XXS, 2048, 4096, 256, ids, 6, 618, true, Knobs{1, 0, 8});
  run_dense(QType::IQ2_XXS, 2048, 4096, 3, 619, cuda::GemvLayout::Ggml, Knobs{1, 0, 8});
  run_moe(QType::Q2_K, 4096, 2048, 256, {255, 1, 100, 42, 0, 199}, 1, 617, false, Knobs{1});
}

// Fused MoE decode pieces. Reference: g, u (and the down dots) in double over the CPU-quantized activations as
// above, SwiGLU and sums in double. Tolerance: each dot is within the GEMV tolerance (rel-L2 1e-5); SwiGLU
// multiplies two such values (silu's slope is <= 1.1), so relative errors add: rel-L2 <= 2e-5, max 2e-4 of the
// rms. The down+sum adds k = 6 dots whose errors are independent, so its relative error stays at the GEMV level
// (1e-5). Both fused kernels must also equal the unfused staged GEMV + swiglu_cuda / moe_sum_cuda bit for bit:
// the per-row dots are the same code, and the epilogues repeat the unfused kernels' operations.
double silu_swiglu_ref(double g, double u, double clamp) {
  const double gc = std::min(g, clamp), uc = std::max(std::min(u, clamp), -clamp);
  return gc / (1.0 + std::exp(-gc)) * uc;
}

std::vector<double> moe_dots(QType t, const std::vector<uint8_t>& w, int64_t rows, int64_t cols,
                             const std::vector<int32_t>& ids, const std::vector<float>& act_deq, int act_slot_div) {
  std::vector<double> ref(ids.size() * size_t(rows));
  std::vector<float> scratch;
  const int64_t rb = row_bytes(t, cols);
  for (size_t s = 0; s < ids.size(); ++s)
    for (int64_t r = 0; r < rows; ++r)
      ref[s * size_t(rows) + size_t(r)] = ref_dot(t, &w[size_t((int64_t(ids[s]) * rows + r) * rb)],
                                                  &act_deq[(s / size_t(act_slot_div)) * size_t(cols)], cols, scratch);
  return ref;
}

void run_gate_up_swiglu(QType t, int64_t rows, int64_t cols, int n_experts, const std::vector<int32_t>& ids, int k,
                        float clamp, uint64_t seed, const Knobs& knobs = {}) {
  const int n_slots = int(ids.size()), n_act = n_slots / k;
  const std::string what = "gate+up+swiglu " + qtype_name(t) + " slots=" + std::to_string(n_slots) + knobs.name();
  const auto wg = test::random_weights(t, rows, cols, seed, n_experts);
  const auto wu = test::random_weights(t, rows, cols, seed + 1, n_experts);
  const auto x = test::random_normal(size_t(n_act) * size_t(cols), seed + 2);
  const auto rw = test::random_normal(size_t(n_slots), seed + 3, 0.3f);
  const auto act = prepare(t, x, n_act, cols);
  const int64_t rb = row_bytes(t, cols);
  DeviceArray<uint8_t> d_wg{std::span<const uint8_t>(wg)}, d_wu{std::span<const uint8_t>(wu)};
  DeviceArray<float> d_x{std::span<const float>(x)}, d_rw{std::span<const float>(rw)};
  DeviceArray<uint8_t> d_xq(size_t(n_act * cuda::gpu_activation_bytes(t, cols)));
  DeviceArray<int32_t> d_ids{std::span<const int32_t>(ids)};
  DeviceArray<float> d_h(size_t(n_slots) * size_t(rows)), d_g(d_h.size()), d_u(d_h.size());
  d_h.fill_bytes(0xFF);
  cuda::quantize_activations_cuda(t, d_x.get(), n_act, cols, d_xq.get(), nullptr);
  cuda::GemvParams p;
  p.wtype = t, p.w = d_wg.get(), p.w2 = d_wu.get(), p.rows = rows, p.cols = cols, p.expert_stride = rows * rb;
  p.expert_ids = d_ids.get(), p.n_slots = n_slots, p.act_slot_div = k, p.xq = d_xq.get(), p.y = d_h.get();
  apply(knobs, p);
  if (knobs.kernel == 2) {
    ASSERT_TRUE(cuda::gemv_staged_supported(p)) << what;
  }
  cuda::moe_gate_up_swiglu_cuda(p, d_rw.get(), clamp, nullptr);
  // Unfused: staged paired GEMV, then swiglu_cuda.
  cuda::GemvParams q = p;
  q.kernel = 2, q.y = d_g.get(), q.y2 = d_u.get();
  cuda::gemv_cuda(q, nullptr);
  cuda::swiglu_cuda(d_g.get(), d_u.get(), d_rw.get(), n_slots, rows, clamp, d_g.get(), nullptr);
  cuda::check(cudaDeviceSynchronize(), what.c_str());
  const auto h = d_h.download(), h_unfused = d_g.download();
  const auto g = moe_dots(t, wg, rows, cols, ids, act.deq, k), u = moe_dots(t, wu, rows, cols, ids, act.deq, k);
  std::vector<double> ref(h.size());
  for (size_t i = 0; i < ref.size(); ++i) ref[i] = silu_swiglu_ref(g[i], u[i], clamp) * rw[i / size_t(rows)];
  double ms = 0;
  for (double v : ref) ms += v * v;
  EXPECT_LE(test::rel_l2(h, ref), 2e-5) << what;
  EXPECT_LE(test::max_rel_err(h, ref, std::sqrt(ms / double(ref.size()))), 2e-4) << what;
  // The staged variant repeats the unfused staged sequence exactly; the streaming one splits rows across warps
  // by its own launch shape, so it is held to the tolerance only.
  // (both within 2e-5 of the reference: 4e-5 apart at most).
  if (knobs.kernel == 2) {
    EXPECT_EQ(0, std::memcmp(h.data(), h_unfused.data(), h.size() * sizeof(float))) << what << " vs unfused";
  } else {
    EXPECT_LE(test::rel_l2(h, std::span<const float>(h_unfused)), 4e-5) << what << " vs unfused";
  }
}

TEST(CudaMoeFused, GateUpSwiglu) {
  DSV4_REQUIRE_CUDA();
  // Flash: 6 experts per token of 256, 4096 -> 2048, clamp 10. The random dots are O(1-10), so both clamps (10 and
  // 0.5) clip some g and u: both branches of the clamp are exercised.
  // Streaming (default) and staged variants; the selector table in the streaming kernel once (iq2_rep = 8).
  for (const Knobs& k : {Knobs{}, Knobs{2}}) {
    run_gate_up_swiglu(QType::IQ2_XXS, 2048, 4096, 256, {0, 17, 255, 128, 3, 77}, 6, 10.0f, 701, k);
    run_gate_up_swiglu(QType::Q4_K, 1000, 4096, 16, {15, 3, 0, 7, 8, 1}, 6, 0.5f, 703, k);
    run_gate_up_swiglu(QType::Q2_K, 512, 2048, 8, {1, 7}, 2, 10.0f, 704, k);
  }
  run_gate_up_swiglu(QType::IQ2_XXS, 2048, 4096, 64, {5, 63, 2, 17, 40, 0, 9, 1, 2, 3, 4, 5}, 6, 0.5f, 702,
                     Knobs{2, 8, 8, 4});
  run_gate_up_swiglu(QType::IQ2_XXS, 2048, 4096, 64, {5, 63, 2, 17, 40, 0, 9, 1, 2, 3, 4, 5}, 6, 0.5f, 705,
                     Knobs{1, 0, 8});
}

void run_down_sum(QType t, int64_t rows, int64_t cols, int n_experts, const std::vector<int32_t>& ids, int k,
                  uint64_t seed, const Knobs& knobs = {}) {
  const int n_slots = int(ids.size()), n_tok = n_slots / k;
  const std::string what = "down+sum " + qtype_name(t) + " slots=" + std::to_string(n_slots) + knobs.name();
  const auto w = test::random_weights(t, rows, cols, seed, n_experts);
  const auto x = test::random_normal(size_t(n_slots) * size_t(cols), seed + 1);
  const auto y0 = test::random_normal(size_t(n_tok) * size_t(rows), seed + 2);  // the shared expert's output
  const auto act = prepare(t, x, n_slots, cols);
  const int64_t rb = row_bytes(t, cols);
  DeviceArray<uint8_t> d_w{std::span<const uint8_t>(w)};
  DeviceArray<float> d_x{std::span<const float>(x)}, d_y{std::span<const float>(y0)}, d_y2{std::span<const float>(y0)};
  DeviceArray<uint8_t> d_xq(size_t(n_slots * cuda::gpu_activation_bytes(t, cols)));
  DeviceArray<int32_t> d_ids{std::span<const int32_t>(ids)};
  DeviceArray<float> d_ye(size_t(n_slots) * size_t(rows));
  cuda::quantize_activations_cuda(t, d_x.get(), n_slots, cols, d_xq.get(), nullptr);
  cuda::GemvParams p;
  p.wtype = t, p.w = d_w.get(), p.rows = rows, p.cols = cols, p.expert_stride = rows * rb;
  p.expert_ids = d_ids.get(), p.n_slots = n_slots, p.act_slot_div = 1, p.xq = d_xq.get(), p.y = d_y.get();
  apply(knobs, p);
  cuda::moe_down_sum_cuda(p, k, nullptr);
  cuda::GemvParams q = p;
  q.kernel = 2, q.y = d_ye.get();
  cuda::gemv_cuda(q, nullptr);
  cuda::moe_sum_cuda(d_ye.get(), n_tok, k, rows, d_y2.get(), nullptr);
  cuda::check(cudaDeviceSynchronize(), what.c_str());
  const auto y = d_y.download(), y_unfused = d_y2.download();
  const auto dots = moe_dots(t, w, rows, cols, ids, act.deq, 1);
  std::vector<double> ref(y.size());
  for (int tk = 0; tk < n_tok; ++tk)
    for (int64_t r = 0; r < rows; ++r) {
      double s = 0;
      for (int j = 0; j < k; ++j) s += dots[size_t((tk * k + j) * rows + r)];
      ref[size_t(tk * rows + r)] = double(y0[size_t(tk * rows + r)]) + s;
    }
  expect_close(y, ref, what);
  EXPECT_EQ(0, std::memcmp(y.data(), y_unfused.data(), y.size() * sizeof(float))) << what << " vs unfused";
}

TEST(CudaMoeFused, DownSum) {
  DSV4_REQUIRE_CUDA();
  run_down_sum(QType::Q2_K, 4096, 2048, 256, {255, 1, 100, 42, 0, 199}, 6, 711);
  run_down_sum(QType::Q2_K, 4100, 2048, 16, {3, 1, 10, 4, 0, 15, 2, 2, 9, 8, 7, 6}, 6, 712, Knobs{0, 4, 0, 4});
  run_down_sum(QType::Q4_K, 4096, 2048, 32, {31, 1, 7, 9, 0, 16}, 6, 713);
  run_down_sum(QType::IQ2_XXS, 1024, 4096, 8, {7, 0, 3}, 3, 714);
}

TEST(CudaMoeFused, RejectsBadLaunches) {
  DSV4_REQUIRE_CUDA();
  cuda::GemvParams p;
  p.wtype = QType::Q2_K, p.rows = 16, p.cols = 256, p.n_slots = 6;
  EXPECT_THROW(cuda::moe_gate_up_swiglu_cuda(p, nullptr, 1.0f, nullptr), Error);  // no w2
  EXPECT_THROW(cuda::moe_down_sum_cuda(p, 4, nullptr), Error);                     // 4 does not divide 6
  EXPECT_THROW(cuda::moe_down_sum_cuda(p, 0, nullptr), Error);
  p.wtype = QType::Q8_0, p.cols = 32;  // 34-byte rows: not 16-byte multiples, the staged kernel cannot copy them
  EXPECT_FALSE(cuda::gemv_staged_supported(p));
  EXPECT_THROW(cuda::moe_down_sum_cuda(p, 1, nullptr), Error);
  p.kernel = 2;
  EXPECT_THROW(cuda::gemv_cuda(p, nullptr), Error);
  p.wtype = QType::Q2_K, p.cols = 256, p.kernel = 0, p.iq2_rep = 3;
  EXPECT_THROW(cuda::gemv_cuda(p, nullptr), Error);
}

}  // namespace
}  // namespace dsv4
