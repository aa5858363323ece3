// Host-side CUDA helpers shared by the CUDA backend, its parity tests (tests/ops) and the workbenches
// (dev/cuda): error checking that throws dsv4::Error, device presence, and a typed RAII device array.
//
// Plain C++ (compiled by g++ or nvcc): only the CUDA runtime API header, no device code, so .cpp tests can
// include it.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace dsv4::cuda {

// Throws dsv4::Error "<what>: <cuda error name>: <description>" when err != cudaSuccess.
void check(cudaError_t err, const char* what);
// After a kernel launch: checks the launch error (not the kernel's completion).
void check_launch(const char* kernel);

// cudaMalloc of `bytes` (> 0) that throws dsv4::Error naming the size. On out-of-memory it first hands the free
// blocks of the device's default stream-ordered pool back to the driver and tries once more: the CUDA backend
// keeps freed cudaMallocAsync blocks in that pool (release threshold UINT64_MAX), which plain cudaMalloc cannot
// use.
void* device_malloc(size_t bytes);
// How many device_malloc calls have succeeded in this process. The CUDA backend's decode graphs (graph.h) bake
// the addresses of its internal buffers (DeviceArrays) into recorded launches; a changed count means some
// buffer may have moved, so every recorded graph is dropped before it could read freed memory.
uint64_t device_malloc_count();

// True when a CUDA device is present and usable (driver + runtime agree). Never throws.
bool device_available();
// "NVIDIA H100 80GB HBM3, 132 SMs, 79.2 GiB, cc 9.0" of the current device.
std::string device_description();
// Streaming multiprocessors of the device current at the first call (cached: one device per process), for
// launches that size their grid in whole waves.
int sm_count();
// Programmatic dependent launches on (pdl.cuh; DSV4_CUDA_PDL=0: off). Read once per process.
bool pdl_enabled();
// Stream priority of the backend's main stream: the device's greatest, so that when a side stream's kernels (the
// MoE shared expert, the attention side line: off the critical path) and the main stream's both have CTAs
// waiting, the block scheduler starts the main stream's first; side streams keep the default (lowest). Graphs
// keep it: captured kernel nodes copy their stream's priority and are instantiated with
// cudaGraphInstantiateFlagUseNodePriority. DSV4_CUDA_PRIORITY=0: every stream at the default (A/B); =2: the
// attention side line (compressor / indexer projections, joined before the attention core) at the main stream's
// priority too, only the MoE shared expert below. Read once.
bool stream_priority_enabled();
int main_stream_priority();
int attention_side_priority();

// Owning device allocation of n elements of T (cudaMalloc). Move-only.
template <typename T>
class DeviceArray {
 public:
  DeviceArray() = default;
  explicit DeviceArray(size_t n) : n_(n) {
    if (n > 0) p_ = static_cast<T*>(device_malloc(n * sizeof(T)));
  }
  explicit DeviceArray(std::span<const T> host) : DeviceArray(host.size()) { upload(host); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  DeviceArray(DeviceArray&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  DeviceArray& operator=(DeviceArray&& o) noexcept {
    if (this != &o) {
      reset();
      p_ = std::exchange(o.p_, nullptr);
      n_ = std::exchange(o.n_, 0);
    }
    return *this;
  }
  ~DeviceArray() { reset(); }

  T* get() const { return p_; }
  size_t size() const { return n_; }
  size_t bytes() const { return n_ * sizeof(T); }

  void upload(std::span<const T> host) {
    if (host.size() != n_) check(cudaErrorInvalidValue, "DeviceArray::upload: size mismatch");
    if (n_) check(cudaMemcpy(p_, host.data(), bytes(), cudaMemcpyHostToDevice), "cudaMemcpy H2D");
  }
  std::vector<T> download() const {
    std::vector<T> h(n_);
    if (n_) check(cudaMemcpy(h.data(), p_, bytes(), cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
    return h;
  }
  // Fills every byte with `byte` (tests poison outputs with 0xFF = NaN floats before a launch).
  void fill_bytes(int byte) {
    if (n_) check(cudaMemset(p_, byte, bytes()), "cudaMemset");
  }
  void reset() {
    if (p_) cudaFree(p_);
    p_ = nullptr;
    n_ = 0;
  }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

}  // namespace dsv4::cuda
