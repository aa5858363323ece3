// Dense single-token GEMV, variant 5 (contract and rationale in gemv_dense_tma.h).
//
// Per warp: rows [r_begin, r_end) of the launch (slots' rows concatenated), in stages of stage_rows rows; a ring of
// n_stages stage buffers in shared memory, each with its mbarrier. Lane 0 issues a stage as ONE bulk copy
// (cp.async.bulk: the copy engine moves the bytes, no registers, no per-lane loads) that completes on the stage's
// barrier; the warp waits on the barrier's phase, computes the stage's rows from shared memory, and lane 0 refills
// the buffer with the stage n_stages ahead. The first n_stages copies go out before the PDL wait.
#include "backend/cuda/gemv_dense_tma.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "backend/cuda/common.cuh"
#include "backend/cuda/cuda_util.h"
#include "backend/cuda/pdl.cuh"
#include "common/error.h"

namespace dsv4::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int64_t kStageTarget = 4352;   // bytes per stage at most where a row is shorter (4 q_b rows, 1 q_a row)
constexpr int64_t kWarpRing = 17408;     // bytes of stages per warp (x 8 warps: 136 KiB in flight per SM)
constexpr int kMaxStages = 8;
constexpr int kMaxActRows = 4;           // activation rows one CTA may need (slots it spans)
constexpr int kMaxCols = 8192;

// ---- PTX wrappers: mbarrier and the 1-D bulk copy (sm_90) -----------------------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint64_t* bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(bar)) : "memory");
}
// Makes the initialized barriers visible to the async proxy (the copy engine completes transactions on them).
__device__ __forceinline__ void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }
// The one arrival of this phase, announcing `bytes` of transactions the copy will complete.
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n"
      "}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}
// Global -> this CTA's shared memory, `bytes` (a multiple of 16, both addresses 16-byte aligned), completing on bar.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   smem_addr(dst)),
               "l"(src), "r"(bytes), "r"(smem_addr(bar))
               : "memory");
}
// Orders this thread's (and, after __syncwarp, its warp's) generic shared-memory reads before a later bulk copy's
// writes into the same buffer (the copy engine is the async proxy).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

struct TmaArgs {
  const uint8_t* w = nullptr;
  const uint8_t* xq = nullptr;
  float* y = nullptr;
  int64_t rows = 0, cols = 0, row_bytes = 0, act_row_bytes = 0, total_rows = 0;
  int act_slot_div = 1;
  int stage_rows = 1, n_stages = 2;
  int64_t stage_bytes = 0;
  int act_rows_max = 1;
};

// Byte offsets of the dynamic shared memory: barriers, activation rows, then the warps' rings.
struct SmemLayout {
  int64_t act = 0, ring = 0, total = 0;
};
__host__ __device__ inline SmemLayout smem_layout(const TmaArgs& a) {
  SmemLayout l;
  l.act = (int64_t(kWarps) * kMaxStages * 8 + 127) / 128 * 128;
  l.ring = l.act + (int64_t(a.act_rows_max) * a.act_row_bytes + 127) / 128 * 128;
  l.total = l.ring + int64_t(kWarps) * a.n_stages * a.stage_bytes;
  return l;
}

// Rows [begin, end) of warp gw of W warps: balanced, contiguous.
__host__ __device__ inline int64_t warp_row(int64_t gw, int64_t W, int64_t total) { return gw * total / W; }

// K: units (16 quants) per lane per row = cols / 512.
template <int K>
__global__ void __launch_bounds__(kThreads, 1) gemv_tma_kernel(TmaArgs a) {
  extern __shared__ __align__(128) uint8_t smem[];
  pdl_trigger();
  const int warp = int(threadIdx.x >> 5), lane = int(threadIdx.x & 31);
  const SmemLayout L = smem_layout(a);
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem) + warp * kMaxStages;
  uint8_t* ring = smem + L.ring + int64_t(warp) * a.n_stages * a.stage_bytes;
  const int64_t W = int64_t(gridDim.x) * kWarps, gw = int64_t(blockIdx.x) * kWarps + warp;
  const int64_t r_begin = warp_row(gw, W, a.total_rows), r_end = warp_row(gw + 1, W, a.total_rows);
  const int n_st = int((r_end - r_begin + a.stage_rows - 1) / a.stage_rows);
  auto issue = [&](int st) {  // lane 0 only
    const int buf = st % a.n_stages;
    const int64_t r0 = r_begin + int64_t(st) * a.stage_rows;
    const uint32_t bytes = uint32_t(std::min<int64_t>(a.stage_rows, r_end - r0) * a.row_bytes);
    mbar_expect_tx(&bars[buf], bytes);
    bulk_copy(ring + int64_t(buf) * a.stage_bytes, a.w + r0 * a.row_bytes, bytes, &bars[buf]);
  };
  if (lane == 0) {
    for (int s = 0; s < a.n_stages; ++s) mbar_init(&bars[s]);
    mbar_init_fence();
    for (int st = 0; st < std::min(n_st, a.n_stages); ++st) issue(st);  // weights: before the wait
  }
  __syncwarp();
  pdl_wait();
  // The activation rows of the slots this CTA's rows belong to, into shared memory (16-byte copies).
  const int64_t c_begin = warp_row(int64_t(blockIdx.x) * kWarps, W, a.total_rows);
  const int64_t c_end = warp_row(int64_t(blockIdx.x + 1) * kWarps, W, a.total_rows);
  const int64_t a_lo = c_end > c_begin ? (c_begin / a.rows) / a.act_slot_div : 0;
  const int64_t a_hi = c_end > c_begin ? ((c_end - 1) / a.rows) / a.act_slot_div : -1;
  uint8_t* act = smem + L.act;
  {
    const int64_t n16 = (a_hi - a_lo + 1) * a.act_row_bytes / 16;
    const int4* src = reinterpret_cast<const int4*>(a.xq + a_lo * a.act_row_bytes);
    int4* dst = reinterpret_cast<int4*>(act);
    for (int64_t i = threadIdx.x; i < n16; i += kThreads) dst[i] = src[i];
  }
  __syncthreads();
  for (int st = 0; st < n_st; ++st) {
    const int buf = st % a.n_stages;
    mbar_wait(&bars[buf], uint32_t(st / a.n_stages) & 1u);
    const int64_t r0 = r_begin + int64_t(st) * a.stage_rows;
    const int nr = int(std::min<int64_t>(a.stage_rows, r_end - r0));
    const uint8_t* stage = ring + int64_t(buf) * a.stage_bytes;
    for (int rr = 0; rr < nr; ++rr) {
      const int64_t g = r0 + rr;
      const uint8_t* arow = act + ((g / a.rows) / a.act_slot_div - a_lo) * a.act_row_bytes;
      const uint8_t* wrow = stage + int64_t(rr) * a.row_bytes;
      // Variant 2's UnitSplit::dot on unit u = lane + 32 k, added in k order (gemv_dense_v2.cu).
      float acc = 0.0f;
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int u = lane + 32 * k;
        const int4 q = reinterpret_cast<const int4*>(wrow)[u];
        const unsigned short d = reinterpret_cast<const unsigned short*>(wrow + a.cols)[u >> 1];
        const int4 x = reinterpret_cast<const int4*>(arow)[u];
        const float da = reinterpret_cast<const float*>(arow + a.cols)[u >> 1];
        int s = __dp4a(q.x, x.x, 0);
        s = __dp4a(q.y, x.y, s);
        s = __dp4a(q.z, x.z, s);
        s = __dp4a(q.w, x.w, s);
        acc += __half2float(__ushort_as_half(d)) * da * float(s);
      }
      acc = warp_sum(acc);
      if (lane == 0) a.y[g] = acc;
    }
    __syncwarp();  // every lane is done with the buffer
    if (lane == 0 && st + a.n_stages < n_st) {
      fence_proxy_async();
      issue(st + a.n_stages);
    }
  }
}

const char* unsupported_reason(const GemvParams& p) {
  if (p.wtype != QType::Q8_0 || p.layout != GemvLayout::Q8Split) return "weights (Q8_0 in the split layout only)";
  if (p.cols != 1024 && p.cols != 2048 && p.cols != 4096 && p.cols != kMaxCols) return "cols (1024, 2048, 4096 or 8192)";
  if (p.rows <= 0) return "rows";
  if (p.n_tokens != 1) return "n_tokens (one token)";
  if (p.expert_ids) return "device expert ids";
  if (p.w2 || p.y2) return "paired launch";
  if (p.xf) return "float activations";
  if (p.n_slots < 1 || p.n_slots > 65535 || p.act_slot_div < 1) return "slots";
  if (!p.w || !p.xq || !p.y) return "null pointer";
  const int64_t rb = q8_split_row_bytes(p.cols);
  if (p.n_slots > 1 && p.expert_stride != p.rows * rb) return "slot layout (the slots' matrices must be contiguous)";
  if ((reinterpret_cast<uintptr_t>(p.w) | reinterpret_cast<uintptr_t>(p.xq)) % 16) return "alignment";
  return nullptr;
}

template <int K>
void launch(const TmaArgs& a, int grid, size_t smem, cudaStream_t stream) {
  static const bool attr_set = [] {
    check(cudaFuncSetAttribute(gemv_tma_kernel<K>, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024),
          "gemv_tma_kernel: shared memory attribute");
    return true;
  }();
  (void)attr_set;
  launch_pdl("gemv_tma_kernel", gemv_tma_kernel<K>, dim3(unsigned(grid)), dim3(kThreads), smem, stream, a);
}

}  // namespace

bool gemv_tma_supported(const GemvParams& p) { return unsupported_reason(p) == nullptr; }

void gemv_tma_cuda(const GemvParams& p, cudaStream_t stream) {
  if (const char* why = unsupported_reason(p))
    fail("gemv_tma_cuda: unsupported launch: %s (%s, layout %d, %lld x %lld, T=%d, slots=%d)", why,
         qtype_name(p.wtype).c_str(), int(p.layout), (long long)p.rows, (long long)p.cols, p.n_tokens, p.n_slots);
  TmaArgs a;
  a.w = static_cast<const uint8_t*>(p.w), a.xq = static_cast<const uint8_t*>(p.xq), a.y = p.y;
  a.rows = p.rows, a.cols = p.cols, a.row_bytes = q8_split_row_bytes(p.cols), a.act_row_bytes = p.cols + p.cols / 8;
  a.total_rows = int64_t(p.n_slots) * p.rows, a.act_slot_div = p.act_slot_div;
  a.stage_rows = int(std::max<int64_t>(1, kStageTarget / a.row_bytes));
  a.stage_bytes = a.stage_rows * a.row_bytes;
  a.n_stages = int(std::clamp<int64_t>(kWarpRing / a.stage_bytes, 2, kMaxStages));
  const int grid = int(std::min<int64_t>(sm_count(), (a.total_rows + kWarps - 1) / kWarps));
  // The most activation rows one CTA needs (the kernel's own ranges: the slots of its first and last row).
  a.act_rows_max = 1;
  const int64_t W = int64_t(grid) * kWarps;
  for (int c = 0; c < grid; ++c) {
    const int64_t b = warp_row(int64_t(c) * kWarps, W, a.total_rows), e = warp_row(int64_t(c + 1) * kWarps, W, a.total_rows);
    if (e > b)
      a.act_rows_max = std::max<int>(a.act_rows_max,
                                     int(((e - 1) / p.rows) / p.act_slot_div - (b / p.rows) / p.act_slot_div + 1));
  }
  if (a.act_rows_max > kMaxActRows) fail("gemv_tma_cuda: one CTA would need %d activation rows", a.act_rows_max);
  const size_t smem = size_t(smem_layout(a).total);
  switch (p.cols / 512) {
    case 2: return launch<2>(a, grid, smem, stream);
    case 4: return launch<4>(a, grid, smem, stream);
    case 8: return launch<8>(a, grid, smem, stream);
    case 16: return launch<16>(a, grid, smem, stream);
    default: fail("gemv_tma_cuda: cols %lld (1024, 2048, 4096 or 8192)", (long long)p.cols);
  }
}

}  // namespace dsv4::cuda
