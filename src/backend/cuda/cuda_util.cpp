// Host-side CUDA helpers (see cuda_util.h).
#include "backend/cuda/cuda_util.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "common/error.h"

namespace dsv4::cuda {

void check(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return;
  // A failed call (e.g. cudaMalloc out of memory) also leaves its error as the runtime's last error; reported
  // here, it must not resurface in the next check_launch and be blamed on an unrelated kernel after a caller
  // caught this exception (sticky errors stay: cudaGetLastError cannot clear those).
  cudaGetLastError();
  fail("%s: %s: %s", what, cudaGetErrorName(err), cudaGetErrorString(err));
}

void check_launch(const char* kernel) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    fail("launch of %s failed: %s: %s", kernel, cudaGetErrorName(err), cudaGetErrorString(err));
}

namespace {
std::atomic<uint64_t> g_malloc_count{0};
}  // namespace

uint64_t device_malloc_count() { return g_malloc_count.load(std::memory_order_relaxed); }

void* device_malloc(size_t bytes) {
  void* p = nullptr;
  cudaError_t err = cudaMalloc(&p, bytes);
  if (err == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    // Freed stream-ordered blocks count as outstanding until the host has observed their frees, hence the
    // synchronize before the trim. Only the failure path pays for either.
    int dev = 0;
    cudaMemPool_t pool;
    if (cudaDeviceSynchronize() == cudaSuccess && cudaGetDevice(&dev) == cudaSuccess &&
        cudaDeviceGetDefaultMemPool(&pool, dev) == cudaSuccess)
      cudaMemPoolTrimTo(pool, 0);
    cudaGetLastError();
    err = cudaMalloc(&p, bytes);
  }
  if (err != cudaSuccess) {
    cudaGetLastError();
    fail("cudaMalloc of %zu bytes: %s: %s", bytes, cudaGetErrorName(err), cudaGetErrorString(err));
  }
  g_malloc_count.fetch_add(1, std::memory_order_relaxed);
  return p;
}

bool device_available() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error so later probes start clean
    return false;
  }
  return n > 0;
}

std::string device_description() {
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  cudaDeviceProp p{};
  check(cudaGetDeviceProperties(&p, dev), "cudaGetDeviceProperties");
  return strfmt("%s, %d SMs, %.1f GiB, cc %d.%d, L2 %d MiB", p.name, p.multiProcessorCount,
                double(p.totalGlobalMem) / double(1ull << 30), p.major, p.minor, p.l2CacheSize >> 20);
}

int sm_count() {
  static const int n = [] {
    int dev = 0, v = 0;
    check(cudaGetDevice(&dev), "cudaGetDevice");
    check(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev), "SM count");
    return v;
  }();
  return n;
}

namespace {
int priority_mode() {  // DSV4_CUDA_PRIORITY: 0 off, 1 (default) main high, 2 main and attention side high
  static const int mode = [] {
    const char* e = std::getenv("DSV4_CUDA_PRIORITY");
    if (!e || !*e) return 1;
    return std::strcmp(e, "0") == 0 ? 0 : std::strcmp(e, "2") == 0 ? 2 : 1;
  }();
  return mode;
}
}  // namespace

bool stream_priority_enabled() { return priority_mode() != 0; }

int attention_side_priority() { return priority_mode() == 2 ? main_stream_priority() : 0; }

int main_stream_priority() {
  if (!stream_priority_enabled()) return 0;
  int least = 0, greatest = 0;
  check(cudaDeviceGetStreamPriorityRange(&least, &greatest), "cudaDeviceGetStreamPriorityRange");
  return greatest;
}

bool pdl_enabled() {  // pdl.cuh
  static const bool on = [] {
    const char* e = std::getenv("DSV4_CUDA_PDL");
    return !(e && std::strcmp(e, "0") == 0);
  }();
  return on;
}

}  // namespace dsv4::cuda
