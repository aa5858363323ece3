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
#include <cstring>

#include "backend/cuda/gemv.h"
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

void run_dense(QType t, int64_t rows, int64_t cols, int n_tokens, uint64_t seed,
               cuda::GemvLayout layout = cuda::GemvLayout::Ggml) {
  const bool split = layout == cuda::GemvLayout::Q8Split;
  const std::string what = qtype_name(t) + (split ? " split " : " ") + std::to_string(rows) + "x" +
                           std::to_string(cols) + " T=" + std::to_string(n_tokens);
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
             int act_slot_div, uint64_t seed, bool paired = false) {
  const int n_slots = int(ids.size());
  const int n_act = n_slots / act_slot_div;
  const std::string what = "MoE " + qtype_name(t) + " " + std::to_string(rows) + "x" + std::to_string(cols) +
                           " x" + std::to_string(n_experts) + " slots=" + std::to_string(n_slots);
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

}  // namespace
}  // namespace dsv4
