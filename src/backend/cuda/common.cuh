// Device-side helpers for the CUDA kernels: warp/block reductions and small loads. Included only by .cu files.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dsv4::cuda {

inline constexpr unsigned kFullMask = 0xFFFFFFFFu;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, <= 1024). Every thread gets the result.
// `scratch` holds 32 floats of shared memory; the function synchronizes before returning, so it can be called
// again with the same scratch.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < n_warps ? scratch[lane] : 0.0f;
  v = warp_sum(v);
  __syncthreads();
  return v;
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  v = warp_max(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < n_warps ? scratch[lane] : -INFINITY;
  v = warp_max(v);
  __syncthreads();
  return v;
}

// 32-bit little-endian load from an address that is only 2-byte aligned (Q8_0 and IQ2_XXS blocks are 34 and
// 66 bytes, so their payload is 2-byte aligned at best).
__device__ __forceinline__ int load_i32_a2(const void* p) {
  const uint16_t* h = static_cast<const uint16_t*>(p);
  return int(uint32_t(h[0]) | (uint32_t(h[1]) << 16));
}

__device__ __forceinline__ int load_i32_a4(const void* p) { return *static_cast<const int*>(p); }

}  // namespace dsv4::cuda
