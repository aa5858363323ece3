// MoE routing, SwiGLU and expert-sum kernels (see moe.h).
#include "backend/cuda/moe.h"

#include <climits>

#include "backend/cuda/common.cuh"
#include "backend/cuda/cuda_util.h"
#include "common/error.h"

namespace dsv4::cuda {
namespace {

constexpr int kMaxExperts = 1024;
constexpr int kMaxUsed = 32;

// sqrt(softplus(z)) with the CPU's branches (z > 20: z; z < -20: e^z; else log1p(e^z)).
__device__ __forceinline__ float sqrt_softplus(float z) {
  const float sp = z > 20.0f ? z : (z < -20.0f ? expf(z) : log1pf(expf(z)));
  return sqrtf(sp);
}

// One warp per token; scores live in shared memory.
__global__ void moe_route_kernel(const float* z, const float* bias, int n_experts, int k, float scale, bool hash,
                                 int32_t* ids, float* weights) {
  __shared__ float s[kMaxExperts];
  __shared__ int chosen[kMaxUsed];
  const int64_t t = blockIdx.x;
  const int lane = threadIdx.x;
  for (int e = lane; e < n_experts; e += 32) s[e] = sqrt_softplus(z[t * n_experts + e]);
  __syncwarp();
  if (hash) {
    for (int j = lane; j < k; j += 32) chosen[j] = ids[t * k + j];
  } else {
    for (int j = 0; j < k; ++j) {
      float best_v = -INFINITY;
      int best = INT_MAX;
      for (int e = lane; e < n_experts; e += 32) {
        bool taken = false;
        for (int q = 0; q < j; ++q) taken |= chosen[q] == e;
        const float v = s[e] + (bias ? bias[e] : 0.0f);
        if (!taken && (best == INT_MAX || v > best_v || (v == best_v && e < best))) best_v = v, best = e;
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(kFullMask, best_v, o);
        const int oe = __shfl_xor_sync(kFullMask, best, o);
        if (oe != INT_MAX && (best == INT_MAX || ov > best_v || (ov == best_v && oe < best))) best_v = ov, best = oe;
      }
      if (lane == 0) chosen[j] = best;
      __syncwarp();
    }
  }
  __syncwarp();
  if (lane == 0) {
    float sum = 0.0f;
    for (int j = 0; j < k; ++j) sum += s[chosen[j]];
    for (int j = 0; j < k; ++j) {
      if (!hash) ids[t * k + j] = chosen[j];
      weights[t * k + j] = s[chosen[j]] / sum * scale;
    }
  }
}

__global__ void swiglu_kernel(const float* g, const float* u, const float* row_weight, int64_t rows, int64_t f,
                              float clamp, float* out) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * f) return;
  const float gc = fminf(g[idx], clamp);
  const float uc = fmaxf(fminf(u[idx], clamp), -clamp);
  const float h = __fmul_rn(gc / (1.0f + expf(-gc)), uc);  // silu(g) * u, rounded as the CPU
  out[idx] = row_weight ? __fmul_rn(h, row_weight[idx / f]) : h;
}

__global__ void moe_sum_kernel(const float* ye, int64_t n_tokens, int k, int64_t d, float* y) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n_tokens * d) return;
  const int64_t t = idx / d, c = idx % d;
  float s = 0.0f;
  for (int j = 0; j < k; ++j) s += ye[(t * k + j) * d + c];
  y[idx] += s;
}

constexpr int kThreads = 256;

}  // namespace

void moe_route_cuda(const float* z, const float* bias, int64_t n_tokens, int n_experts, int k, float scale,
                    bool hash, int32_t* ids, float* weights, cudaStream_t stream) {
  if (n_experts < 1 || n_experts > kMaxExperts || k < 1 || k > kMaxUsed || k > n_experts)
    fail("moe_route_cuda: need 1 <= k <= min(E, %d) and E <= %d, got E=%d k=%d", kMaxUsed, kMaxExperts, n_experts, k);
  if (n_tokens <= 0) return;
  moe_route_kernel<<<unsigned(n_tokens), 32, 0, stream>>>(z, bias, n_experts, k, scale, hash, ids, weights);
  check_launch("moe_route_kernel");
}

void swiglu_cuda(const float* g, const float* u, const float* row_weight, int64_t rows, int64_t f, float clamp,
                 float* out, cudaStream_t stream) {
  if (rows * f <= 0) return;
  swiglu_kernel<<<unsigned((rows * f + kThreads - 1) / kThreads), kThreads, 0, stream>>>(g, u, row_weight, rows, f,
                                                                                          clamp, out);
  check_launch("swiglu_kernel");
}

void moe_sum_cuda(const float* ye, int64_t n_tokens, int k, int64_t d, float* y, cudaStream_t stream) {
  if (n_tokens * d <= 0) return;
  moe_sum_kernel<<<unsigned((n_tokens * d + kThreads - 1) / kThreads), kThreads, 0, stream>>>(ye, n_tokens, k, d, y);
  check_launch("moe_sum_kernel");
}

}  // namespace dsv4::cuda
