// The timing harness the kernel workbenches (dev/cuda/*.cu) share: the streaming-read probe kernel, event timers
// (median of single runs, or mean over back-to-back runs), graph capture + replay timing, and the device check
// every workbench opens with. One copy here instead of one per workbench, so all of them time the same way.
// Included by one workbench .cu each (like wb_weights.cuh).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "backend/cuda/cuda_util.h"
#include "common/error.h"

namespace {

// 16-byte streaming reads of n uint4 (the card's read bandwidth); the xor result is stored only if it equals a
// constant, which keeps the loads alive without writing anything in practice.
__global__ void read_kernel(const uint4* p, size_t n, unsigned* sink) {
  uint32_t acc = 0;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const uint4 v = p[i];
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x12345678u) *sink = acc;  // keeps the loads alive
}

// Median ms of `reps` runs of body on stream s, each between its own pair of events (after one warm-up).
float median_ms(cudaStream_t s, const std::function<void()>& body, int reps) {
  using dsv4::cuda::check;
  cudaEvent_t e0, e1;
  check(cudaEventCreate(&e0), "event");
  check(cudaEventCreate(&e1), "event");
  body();  // warm-up
  check(cudaStreamSynchronize(s), "sync");
  std::vector<float> t;
  for (int r = 0; r < reps; ++r) {
    check(cudaEventRecord(e0, s), "record");
    body();
    check(cudaEventRecord(e1, s), "record");
    check(cudaEventSynchronize(e1), "sync");
    float ms = 0;
    check(cudaEventElapsedTime(&ms, e0, e1), "elapsed");
    t.push_back(ms);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];  // median
}

// Median ms (20 replays) of a CUDA graph captured from body's launches on s.
float graph_median_ms(cudaStream_t s, const std::function<void()>& body,
                      cudaStreamCaptureMode mode = cudaStreamCaptureModeGlobal) {
  using dsv4::cuda::check;
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  check(cudaStreamBeginCapture(s, mode), "capture");
  body();
  check(cudaStreamEndCapture(s, &graph), "capture end");
  check(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
  const float ms = median_ms(s, [&] { check(cudaGraphLaunch(exec, s), "graph launch"); }, 20);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  return ms;
}

// Mean ms of `reps` back-to-back runs of f between one pair of events (after one warm-up and a device sync).
// Events are recorded on the stream the work goes to (a non-blocking stream does not order with stream 0).
float mean_ms(const std::function<void()>& f, int reps, cudaStream_t s = nullptr) {
  using dsv4::cuda::check;
  cudaEvent_t a, b;
  check(cudaEventCreate(&a), "event"), check(cudaEventCreate(&b), "event");
  f();
  check(cudaDeviceSynchronize(), "warm-up");
  check(cudaEventRecord(a, s), "record");
  for (int i = 0; i < reps; ++i) f();
  check(cudaEventRecord(b, s), "record");
  check(cudaEventSynchronize(b), "sync");
  float ms = 0;
  check(cudaEventElapsedTime(&ms, a, b), "elapsed");
  cudaEventDestroy(a), cudaEventDestroy(b);
  return ms / float(reps);
}

// The opening of a workbench: false where no CUDA device is present (a note on stderr; the caller returns 0 so a
// GPU-less check run goes on), else the card's properties in prop and the "device:" line printed.
bool wb_open_device(const char* tool, cudaDeviceProp& prop) {
  if (!dsv4::cuda::device_available()) {
    std::fprintf(stderr, "%s: no CUDA device\n", tool);
    return false;
  }
  dsv4::cuda::check(cudaGetDeviceProperties(&prop, 0), "props");
  std::printf("device: %s\n", dsv4::cuda::device_description().c_str());
  return true;
}

}  // namespace
