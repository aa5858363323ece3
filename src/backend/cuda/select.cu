// Top-k and softmax kernels (see select.h).
//
// Top-k order is total: (value desc, index asc). Floats are mapped to order-preserving uint32 keys (flip all
// bits of negatives, set the sign bit of non-negatives), so radix selection and the final sort work on
// integers and -0.0 < +0.0 (as a key; as floats they tie, and the CPU twin orders them the same way by key).
#include "backend/cuda/select.h"

#include <climits>

#include "backend/cuda/common.cuh"
#include "backend/cuda/cuda_util.h"
#include "common/error.h"

namespace dsv4::cuda {
namespace {

__device__ __forceinline__ uint32_t order_key(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// a ranks before b.
__device__ __forceinline__ bool key_before(uint32_t ka, int ia, uint32_t kb, int ib) {
  return ka > kb || (ka == kb && ia < ib);
}

// ---- small k: one warp per row, k rounds of warp argmax over a shared copy of the row -----------------------
constexpr int kWarpMaxN = 8192;
constexpr uint32_t kTaken = 0;  // below every real key (order_key(-inf) = 0x007FFFFF)

__global__ void topk_warp_kernel(TopkParams p) {
  extern __shared__ uint32_t row_keys[];  // [n]
  const int lane = threadIdx.x;
  const float* s = p.scores + int64_t(blockIdx.x) * p.stride;
  const int n = int(p.n);
  for (int i = lane; i < n; i += 32) row_keys[i] = order_key(s[i]);
  __syncwarp();
  for (int j = 0; j < p.k; ++j) {
    uint32_t best = kTaken;
    int bi = INT_MAX;
    for (int i = lane; i < n; i += 32) {
      const uint32_t v = row_keys[i];
      if (v != kTaken && key_before(v, i, best, bi)) best = v, bi = i;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const uint32_t ob = __shfl_xor_sync(kFullMask, best, o);
      const int oi = __shfl_xor_sync(kFullMask, bi, o);
      if (key_before(ob, oi, best, bi)) best = ob, bi = oi;
    }
    if (lane == 0) {
      const int64_t out = int64_t(blockIdx.x) * p.k + j;
      p.indices[out] = bi;
      if (p.values) p.values[out] = s[bi];
      row_keys[bi] = kTaken;
    }
    __syncwarp();
  }
}

// ---- general k: radix select of the threshold key, ordered compaction, bitonic sort of the winners ----------
constexpr int kRadixThreads = 1024;

__device__ void bitonic_sort_before(uint32_t* keys, int* idx, int n_pow2) {
  for (int size = 2; size <= n_pow2; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = threadIdx.x; t < n_pow2 / 2; t += blockDim.x) {
        const int i = 2 * t - (t & (stride - 1));
        const int j = i + stride;
        const bool up = (i & size) == 0;  // this sub-sequence ends "best first"
        const bool j_first = key_before(keys[j], idx[j], keys[i], idx[i]);
        if (j_first == up) {
          const uint32_t tk = keys[i];
          keys[i] = keys[j];
          keys[j] = tk;
          const int ti = idx[i];
          idx[i] = idx[j];
          idx[j] = ti;
        }
      }
      __syncthreads();
    }
  }
}

__global__ void __launch_bounds__(kRadixThreads) topk_radix_kernel(TopkParams p) {
  __shared__ unsigned hist[256];
  __shared__ uint32_t cand_key[kTopkMax];
  __shared__ int cand_idx[kTopkMax];
  __shared__ int warp_gt[32], warp_eq[32];
  __shared__ uint32_t s_prefix;
  __shared__ int s_remaining, s_base_gt, s_base_eq;
  const float* s = p.scores + int64_t(blockIdx.x) * p.stride;
  const int64_t n = p.n;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  if (tid == 0) s_prefix = 0, s_remaining = p.k, s_base_gt = 0, s_base_eq = 0;
  uint32_t mask = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = tid; b < 256; b += blockDim.x) hist[b] = 0;
    __syncthreads();
    const uint32_t prefix = s_prefix;
    for (int64_t i = tid; i < n; i += blockDim.x) {
      const uint32_t key = order_key(s[i]);
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (tid == 0) {
      int cum = 0;
      for (int b = 255; b >= 0; --b) {
        if (cum + int(hist[b]) >= s_remaining) {
          s_prefix = prefix | (uint32_t(b) << shift);
          s_remaining -= cum;
          break;
        }
        cum += int(hist[b]);
      }
    }
    mask |= 255u << shift;
    __syncthreads();
  }
  const uint32_t thr = s_prefix;
  const int need_eq = s_remaining;  // elements equal to thr to take, lowest indices first
  const int n_gt = p.k - need_eq;

  const unsigned lt_mask = (1u << lane) - 1u;
  for (int64_t start = 0; start < n; start += blockDim.x) {
    const int64_t i = start + tid;
    const uint32_t key = i < n ? order_key(s[i]) : 0u;
    const bool gt = i < n && key > thr, eq = i < n && key == thr;
    const unsigned bg = __ballot_sync(kFullMask, gt), be = __ballot_sync(kFullMask, eq);
    if (lane == 0) warp_gt[warp] = __popc(bg), warp_eq[warp] = __popc(be);
    __syncthreads();
    int off_gt = s_base_gt, off_eq = s_base_eq;
    for (int w = 0; w < warp; ++w) off_gt += warp_gt[w], off_eq += warp_eq[w];
    if (gt) {
      const int pos = off_gt + __popc(bg & lt_mask);
      cand_key[pos] = key, cand_idx[pos] = int(i);
    }
    if (eq) {
      const int r = off_eq + __popc(be & lt_mask);
      if (r < need_eq) cand_key[n_gt + r] = key, cand_idx[n_gt + r] = int(i);
    }
    __syncthreads();
    if (tid == 0) {
      for (int w = 0; w < int(blockDim.x >> 5); ++w) s_base_gt += warp_gt[w], s_base_eq += warp_eq[w];
    }
    __syncthreads();
  }

  int n_pow2 = 1;
  while (n_pow2 < p.k) n_pow2 <<= 1;
  for (int j = p.k + tid; j < n_pow2; j += blockDim.x) cand_key[j] = 0u, cand_idx[j] = INT_MAX;
  __syncthreads();
  bitonic_sort_before(cand_key, cand_idx, n_pow2);
  for (int j = tid; j < p.k; j += blockDim.x) {
    const int64_t out = int64_t(blockIdx.x) * p.k + j;
    p.indices[out] = cand_idx[j];
    if (p.values) p.values[out] = s[cand_idx[j]];
  }
}

// ---- softmax ------------------------------------------------------------------------------------------------
constexpr int kSoftmaxThreads = 256;

__global__ void softmax_kernel(const float* x, float* y, int64_t n, float scale) {
  __shared__ float scratch[32];
  const float* xr = x + int64_t(blockIdx.x) * n;
  float* yr = y + int64_t(blockIdx.x) * n;
  float m = -INFINITY;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, xr[i] * scale);
  m = block_max(m, scratch);
  float sum = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) sum += expf(xr[i] * scale - m);
  sum = block_sum(sum, scratch);
  const float inv = 1.0f / sum;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) yr[i] = expf(xr[i] * scale - m) * inv;
}

}  // namespace

void topk_cuda(const TopkParams& p_in, cudaStream_t stream) {
  TopkParams p = p_in;
  if (p.stride == 0) p.stride = p.n;
  if (p.k < 1 || p.k > kTopkMax || p.k > p.n || p.n > INT_MAX)
    fail("topk_cuda: need 1 <= k <= min(n, %d) and n < 2^31, got k=%d n=%lld", kTopkMax, p.k, (long long)p.n);
  if (p.rows <= 0) return;
  if (p.k <= 32 && p.n <= kWarpMaxN) {
    topk_warp_kernel<<<unsigned(p.rows), 32, size_t(p.n) * sizeof(uint32_t), stream>>>(p);
    check_launch("topk_warp_kernel");
  } else {
    topk_radix_kernel<<<unsigned(p.rows), kRadixThreads, 0, stream>>>(p);
    check_launch("topk_radix_kernel");
  }
}

void softmax_cuda(const float* x, float* y, int64_t rows, int64_t n, float scale, cudaStream_t stream) {
  if (rows <= 0 || n <= 0) return;
  softmax_kernel<<<unsigned(rows), kSoftmaxThreads, 0, stream>>>(x, y, n, scale);
  check_launch("softmax_kernel");
}

}  // namespace dsv4::cuda
