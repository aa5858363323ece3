// Recorded op segments of the CUDA backend (Backend::run_segment): a run of ops whose launches depend only on a
// key is captured once from the backend's stream as a CUDA graph and then replayed with one cudaGraphLaunch.
// The forward uses it for the position-free parts of a decode step (forward.cpp): a token costs one graph
// launch per layer plus the few position-dependent ops instead of ~56 kernel launches per layer.
//
// Life of a segment (one entry per segment id, the key's first word):
//   1. eager: the first run after anything moved (a new key for the id, or device_malloc_count() changed since
//      the last eager run) calls the ops directly, so first-use work (weight mirroring, hash-table checks,
//      scratch growth) happens outside a capture;
//   2. capture: the next run records the ops (relaxed capture mode: the ops' own host bookkeeping is allowed) and
//      launches the instantiated graph; nothing of the ops ran on the device during the capture;
//   3. replay: later runs with the same key and allocation count launch the graph.
// A capture that fails (an op that synchronizes, reads memory on the host, or throws; cudaStreamEndCapture or
// instantiation errors) is discarded, the ops run eagerly instead, and that segment id stays eager from then on
// (logged once per backend). A capture during which a buffer was allocated is discarded too, and retried later.
// DSV4_CUDA_GRAPH_STATS=1 prints the counters (SegmentGraphStats) to stderr when the backend is destroyed.
//
// Host state of the backend (the activation-quantization cache) is reset through `reset_host` before every
// segment (eager, capture and replay alike: a recording must not depend on what ran before it) and after a
// replay (the replay rewrote memory the host did not see being written).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <functional>
#include <map>
#include <vector>

namespace dsv4::cuda {

struct SegmentGraphStats {
  long long eager = 0;      // runs that called the ops directly (first runs, after invalidation, failed ids)
  long long captured = 0;   // successful captures (each also launched its graph once)
  long long replayed = 0;   // launches of a graph recorded earlier
  long long failed = 0;     // captures that failed (their ids stay eager)
  long long discarded = 0;  // captures dropped because a buffer was allocated during them (retried later)
  long long invalidated = 0;// recorded graphs dropped because their key or the allocation count changed
  long long nodes = 0;      // nodes (kernels, copies, memsets) of the graphs held now: what their launches replace
};

class SegmentGraphs {
 public:
  explicit SegmentGraphs(cudaStream_t stream) : stream_(stream) {}
  ~SegmentGraphs();
  SegmentGraphs(const SegmentGraphs&) = delete;
  SegmentGraphs& operator=(const SegmentGraphs&) = delete;

  // Runs the segment named by key (key[0] is its id; the whole key must match for a replay).
  void run(const std::vector<uint64_t>& key, const std::function<void()>& ops, const std::function<void()>& reset_host);
  SegmentGraphStats stats() const;
  size_t n_graphs() const;  // graphs currently held

 private:
  struct Entry {
    std::vector<uint64_t> key;
    cudaGraphExec_t exec = nullptr;
    size_t nodes = 0;           // node count of the recorded graph
    uint64_t exec_allocs = 0;   // device_malloc_count() when exec was recorded
    uint64_t eager_allocs = 0;  // device_malloc_count() after the last eager run of this key
    bool eager_done = false;
    bool failed = false;
  };
  void drop(Entry& e);
  bool capture(Entry& e, const std::function<void()>& ops, uint64_t allocs);

  cudaStream_t stream_;
  std::map<uint64_t, Entry> entries_;
  SegmentGraphStats stats_;
  bool logged_ = false;
};

}  // namespace dsv4::cuda

namespace dsv4 {
class Backend;
// The segment counters of a CUDA backend (all zero for any other backend, or before its first segment).
cuda::SegmentGraphStats cuda_segment_graph_stats(const Backend& be);
}  // namespace dsv4
