// Lightning-indexer kernels (see indexer.h).
#include "backend/cuda/indexer.h"

#include <algorithm>

#include "backend/cuda/common.cuh"
#include "backend/cuda/cuda_util.h"
#include "backend/cuda/select.h"
#include "common/error.h"

namespace dsv4::cuda {
namespace {

constexpr int kKeys = 32;          // keys per tile = lanes
constexpr int kGroups = 8;         // warps; warp g handles heads g, g+8, ...
constexpr int kThreads = kGroups * 32;
constexpr int kMaxIdxDim = 128;
constexpr int kMaxQFloats = 64 * 128;  // HI * dI held in shared memory

// grid (tile CTAs, T); each CTA loops over key tiles with stride gridDim.x.
__global__ void __launch_bounds__(kThreads) indexer_score_kernel(IndexerLaunch p, float* scores, int64_t n_cols) {
  extern __shared__ float smem[];  // q [HI*dI] | keys transposed [dI][33] | part [8][32] | w [HI]
  float* qs = smem;
  float* kT = qs + p.HI * p.dI;
  float(*part)[kKeys] = reinterpret_cast<float(*)[kKeys]>(kT + p.dI * (kKeys + 1));
  float* ws = kT + p.dI * (kKeys + 1) + kGroups * kKeys;
  const int t = blockIdx.y, lane = threadIdx.x & 31, g = threadIdx.x >> 5;
  const int HI = p.HI, dI = p.dI;
  const int64_t n_vis = (p.pos0 + t + 1) / p.ratio;
  for (int i = threadIdx.x; i < HI * dI; i += kThreads) qs[i] = p.q[int64_t(t) * HI * dI + i];
  for (int i = threadIdx.x; i < HI; i += kThreads) ws[i] = p.w[int64_t(t) * HI + i] * p.weight_scale;
  const int64_t n_tiles = (n_cols + kKeys - 1) / kKeys;
  for (int64_t tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
    const int64_t k0 = tile * kKeys;
    __syncthreads();  // q staged / previous tile consumed
    for (int i = threadIdx.x; i < kKeys * dI; i += kThreads) {
      const int kk = i / dI, d = i % dI;
      kT[d * (kKeys + 1) + kk] = k0 + kk < n_vis ? p.keys[(k0 + kk) * dI + d] : 0.0f;
    }
    __syncthreads();
    float acc = 0.0f;
    for (int h = g; h < HI; h += kGroups) {
      const float* qh = qs + h * dI;
      float dot = 0.0f;
      for (int d = 0; d < dI; ++d) dot += qh[d] * kT[d * (kKeys + 1) + lane];
      acc += ws[h] * fmaxf(dot, 0.0f);
    }
    part[g][lane] = acc;
    __syncthreads();
    if (g == 0 && k0 + lane < n_cols) {
      float s = 0.0f;
      for (int j = 0; j < kGroups; ++j) s += part[j][lane];
      scores[int64_t(t) * n_cols + k0 + lane] = k0 + lane < n_vis ? s : -INFINITY;
    }
  }
}

// One block per token: the top-k winners (value order) -> ascending row order, or all rows when they fit.
__global__ void indexer_finish_kernel(IndexerLaunch p, const int32_t* top, int k_top) {
  const int t = blockIdx.x;
  const int64_t n_vis = (p.pos0 + t + 1) / p.ratio;
  int32_t* sel = p.sel + int64_t(t) * p.k;
  if (n_vis <= p.k) {
    for (int i = threadIdx.x; i < n_vis; i += blockDim.x) sel[i] = i;
  } else {
    const int32_t* tt = top + int64_t(t) * k_top;
    for (int i = threadIdx.x; i < k_top; i += blockDim.x) {
      const int32_t v = tt[i];
      int rank = 0;
      for (int j = 0; j < k_top; ++j) rank += tt[j] < v;
      sel[rank] = v;
    }
  }
  if (threadIdx.x == 0 && p.count) p.count[t] = int32_t(n_vis < p.k ? n_vis : p.k);
}

size_t smem_bytes(int HI, int dI) {
  return sizeof(float) * (size_t(HI) * dI + size_t(dI) * (kKeys + 1) + kGroups * kKeys + HI);
}

void validate(const IndexerLaunch& p) {
  if (p.T < 0 || p.HI <= 0 || p.dI <= 0 || p.dI > kMaxIdxDim || p.HI > 64 || p.HI * p.dI > kMaxQFloats)
    fail("indexer_cuda: bad shape T=%d HI=%d dI=%d (HI <= 64, dI <= %d, HI*dI <= %d)", p.T, p.HI, p.dI,
         kMaxIdxDim, kMaxQFloats);
  if (p.ratio <= 0 || p.k <= 0 || p.k > kTopkMax)
    fail("indexer_cuda: ratio %d / k %d out of range (k <= %d)", p.ratio, p.k, kTopkMax);
}

}  // namespace

void indexer_scores_cuda(const IndexerLaunch& p, float* scores, int64_t n_cols, cudaStream_t stream) {
  validate(p);
  if (p.T == 0 || n_cols <= 0) return;
  const int64_t n_tiles = (n_cols + kKeys - 1) / kKeys;
  // ~4 waves of CTAs in total; each CTA stages the token's queries once and loops over its tiles.
  const int64_t per_token = std::max<int64_t>(1, std::min<int64_t>(n_tiles, 528 / std::max(1, p.T)));
  dim3 grid(unsigned(per_token), unsigned(p.T));
  static const bool attr_set = [] {  // opt-in above 48 KiB of dynamic shared memory, once per process
    check(cudaFuncSetAttribute(indexer_score_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               int(smem_bytes(64, kMaxIdxDim))),
          "cudaFuncSetAttribute(indexer_score_kernel)");
    return true;
  }();
  (void)attr_set;
  indexer_score_kernel<<<grid, kThreads, smem_bytes(p.HI, p.dI), stream>>>(p, scores, n_cols);
  check_launch("indexer_score_kernel");
}

int64_t indexer_scratch_floats(const IndexerLaunch& p) {
  validate(p);
  const int64_t n = indexer_max_visible(p);
  if (n <= p.k) return 0;
  return int64_t(p.T) * (n + p.k);
}

void indexer_select_cuda(const IndexerLaunch& p, float* scratch, cudaStream_t stream) {
  validate(p);
  if (p.T == 0) return;
  const int64_t n = indexer_max_visible(p);
  const int32_t* top = nullptr;
  int k_top = 0;
  if (n > p.k) {
    if (!scratch) fail("indexer_select_cuda: %lld visible rows > k=%d need scratch", (long long)n, p.k);
    float* scores = scratch;
    auto* idx = reinterpret_cast<int32_t*>(scratch + int64_t(p.T) * n);
    indexer_scores_cuda(p, scores, n, stream);
    TopkParams tp;
    tp.scores = scores;
    tp.rows = p.T;
    tp.n = n;
    tp.k = p.k;
    tp.indices = idx;
    topk_cuda(tp, stream);
    top = idx;
    k_top = p.k;
  }
  indexer_finish_kernel<<<unsigned(p.T), 256, 0, stream>>>(p, top, k_top);
  check_launch("indexer_finish_kernel");
}

}  // namespace dsv4::cuda
