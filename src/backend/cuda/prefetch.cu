// L2 prefetch kernels (contract: prefetch.h).
#include "backend/cuda/prefetch.h"

#include <algorithm>

#include "backend/cuda/cuda_util.h"

namespace dsv4::cuda {
namespace {

// One bulk prefetch request per chunk: the TMA unit splits it into L2 line fills; 16 KiB keeps a 36 MB matrix at
// ~2300 requests spread over kCtas SMs' TMA units.
constexpr uint32_t kChunk = 16 * 1024;
constexpr int kThreads = 128;
constexpr int kCtas = 16;

__device__ __forceinline__ void prefetch_range(const char* p, uint64_t bytes, uint64_t first, uint64_t step) {
  for (uint64_t off = first * kChunk; off < bytes; off += step * kChunk) {
    const uint32_t n = uint32_t(bytes - off < kChunk ? bytes - off : kChunk);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p + off), "r"(n) : "memory");
#else
    for (uint32_t i = 0; i < n; i += 128) asm volatile("prefetch.global.L2 [%0];" ::"l"(p + off + i));
#endif
  }
}

// p and bytes are multiples of 16 (the bulk prefetch's alignment rule).
__global__ void l2_prefetch_kernel(const char* p, uint64_t bytes) {
  const uint64_t tid = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  prefetch_range(p, bytes, tid, uint64_t(gridDim.x) * blockDim.x);
}

// grid (kCtas, n_ids): blockIdx.y = slot.
__global__ void l2_prefetch_experts_kernel(const char* base, int64_t stride, uint64_t bytes, const int32_t* ids,
                                           int n_experts) {
  const int32_t e = ids[blockIdx.y];
  if (e < 0 || e >= n_experts) return;
  const uint64_t tid = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  prefetch_range(base + int64_t(e) * stride, bytes, tid, uint64_t(gridDim.x) * blockDim.x);
}

// The 16-byte aligned interior [*lo, *lo + *n) of [p, p + bytes).
void interior(const void* p, size_t bytes, const char** lo, uint64_t* n) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p), b = a + bytes;
  const uintptr_t a16 = (a + 15) & ~uintptr_t(15), b16 = b & ~uintptr_t(15);
  *lo = reinterpret_cast<const char*>(a16);
  *n = b16 > a16 ? uint64_t(b16 - a16) : 0;
}

}  // namespace

void l2_prefetch_cuda(const void* p, size_t bytes, cudaStream_t stream) {
  const char* lo = nullptr;
  uint64_t n = 0;
  interior(p, bytes, &lo, &n);
  if (n == 0) return;
  const unsigned ctas = unsigned(std::min<uint64_t>(kCtas, (n / kChunk + kThreads) / kThreads));
  l2_prefetch_kernel<<<std::max(1u, ctas), kThreads, 0, stream>>>(lo, n);
  check(cudaGetLastError(), "l2_prefetch_kernel launch");
}

void l2_prefetch_experts_cuda(const void* base, int64_t stride, int64_t bytes, const int32_t* ids, int n_ids,
                              int n_experts, cudaStream_t stream) {
  if (n_ids <= 0 || bytes <= 0) return;
  // Every slice starts at base + e * stride: aligned alike when base and stride are multiples of 16 (device
  // weights are; anything else is skipped rather than rounded per slice).
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0 || stride % 16 != 0) return;
  const uint64_t n = uint64_t(bytes) & ~uint64_t(15);
  if (n == 0) return;
  const unsigned ctas = unsigned(std::min<uint64_t>(4, (n / kChunk + kThreads) / kThreads));
  l2_prefetch_experts_kernel<<<dim3(std::max(1u, ctas), unsigned(n_ids)), kThreads, 0, stream>>>(
      static_cast<const char*>(base), stride, n, ids, n_experts);
  check(cudaGetLastError(), "l2_prefetch_experts_kernel launch");
}

}  // namespace dsv4::cuda
