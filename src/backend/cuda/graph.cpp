// Recorded op segments (graph.h) and the CUDA backend's run_segment.
#include "backend/cuda/graph.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

#include "backend/cuda/cuda_backend_impl.h"
#include "backend/cuda/cuda_util.h"

namespace dsv4::cuda {

SegmentGraphs::~SegmentGraphs() {
  const char* env = std::getenv("DSV4_CUDA_GRAPH_STATS");
  if (env && std::strcmp(env, "0") != 0) {
    const SegmentGraphStats s = stats();
    std::fprintf(stderr, "cuda graphs: %zu held (%lld nodes); runs: eager %lld, captured %lld, replayed %lld; failed %lld, "
                 "discarded %lld, invalidated %lld\n", n_graphs(), s.nodes, s.eager, s.captured, s.replayed, s.failed,
                 s.discarded, s.invalidated);
  }
  for (auto& [id, e] : entries_) drop(e);
}

SegmentGraphStats SegmentGraphs::stats() const {
  SegmentGraphStats s = stats_;
  for (const auto& [id, e] : entries_) s.nodes += e.exec ? (long long)e.nodes : 0;
  return s;
}

void SegmentGraphs::drop(Entry& e) {
  if (e.exec) cudaGraphExecDestroy(e.exec);
  e.exec = nullptr;
}

size_t SegmentGraphs::n_graphs() const {
  size_t n = 0;
  for (const auto& [id, e] : entries_) n += e.exec ? 1 : 0;
  return n;
}

// Records ops into e.exec. False (nothing recorded, nothing of the ops ran on the device) when the capture
// failed (e marked failed) or a buffer was allocated during it (retried at a later run).
bool SegmentGraphs::capture(Entry& e, const std::function<void()>& ops, uint64_t allocs) {
  auto give_up = [&](const std::string& why) {
    e.failed = true;
    ++stats_.failed;
    if (!logged_)
      std::fprintf(stderr, "cuda backend: segment %llu cannot be recorded as a CUDA graph (%s); it runs op by op "
                   "from now on (further failures are counted, not logged)\n", (unsigned long long)e.key[0],
                   why.c_str());
    logged_ = true;
    return false;
  };
  cudaGetLastError();
  cudaError_t err = cudaStreamBeginCapture(stream_, cudaStreamCaptureModeRelaxed);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return give_up(std::string("cudaStreamBeginCapture: ") + cudaGetErrorName(err));
  }
  std::string thrown;
  try {
    ops();
  } catch (const std::exception& ex) {
    thrown = ex.what();
    if (thrown.empty()) thrown = "an op threw";
  }
  cudaGraph_t graph = nullptr;
  err = cudaStreamEndCapture(stream_, &graph);  // always ends the capture, also after a throw
  cudaGetLastError();
  const bool moved = device_malloc_count() != allocs;
  if (!thrown.empty() || err != cudaSuccess || !graph || moved) {
    if (graph) cudaGraphDestroy(graph);
    if (moved) {  // a buffer grew inside the capture: not the ops' fault; run eagerly now, record later
      ++stats_.discarded;
      return false;
    }
    return give_up(!thrown.empty() ? thrown : std::string("cudaStreamEndCapture: ") + cudaGetErrorName(err));
  }
  size_t nodes = 0;
  if (cudaGraphGetNodes(graph, nullptr, &nodes) != cudaSuccess) nodes = 0;  // only reported, never relied on
  cudaGetLastError();
  cudaGraphExec_t exec = nullptr;
  // Node priorities (copied from the capturing streams: the main stream's is the greatest, cuda_util.h) are used
  // only with this flag; without it every node would run at the launch stream's priority.
  err = cudaGraphInstantiate(&exec, graph, stream_priority_enabled() ? cudaGraphInstantiateFlagUseNodePriority : 0);
  cudaGraphDestroy(graph);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return give_up(std::string("cudaGraphInstantiate: ") + cudaGetErrorName(err));
  }
  e.exec = exec;
  e.nodes = nodes;
  e.exec_allocs = allocs;
  return true;
}

void SegmentGraphs::run(const std::vector<uint64_t>& key, const std::function<void()>& ops,
                        const std::function<void()>& reset_host) {
  reset_host();
  Entry& e = entries_[key.empty() ? 0 : key[0]];
  if (e.failed) {
    ++stats_.eager;
    return ops();
  }
  if (e.key != key) {  // other buffers (a regrown forward scratch) or another pass shape under this id
    if (e.exec) ++stats_.invalidated;
    drop(e);
    e.key = key;
    e.eager_done = false;
  }
  const uint64_t allocs = device_malloc_count();
  if (e.exec && e.exec_allocs != allocs) {  // some backend buffer may have moved since the recording
    ++stats_.invalidated;
    drop(e);
  }
  if (e.exec) {
    check(cudaGraphLaunch(e.exec, stream_), "cuda backend: graph launch");
    ++stats_.replayed;
    reset_host();
    return;
  }
  if (e.eager_done && e.eager_allocs == allocs) {  // ran once with these buffers: nothing left to set up
    if (capture(e, ops, allocs)) {
      check(cudaGraphLaunch(e.exec, stream_), "cuda backend: graph launch");
      ++stats_.captured;
      reset_host();
      return;
    }
    reset_host();  // the failed capture left cache entries for quantizations that never ran
  }
  ops();
  ++stats_.eager;
  e.eager_done = true;
  e.eager_allocs = device_malloc_count();  // what this run allocated is in place for the next one
}

}  // namespace dsv4::cuda

namespace dsv4::cuda_impl {

void CudaBackend::run_segment(const std::vector<uint64_t>& key, const std::function<void()>& ops) {
  // The profiler times ops one by one, the CPU attention mode synchronizes inside ops: both run eagerly.
  // A side Sinkhorn forked inside the segment rejoins at its end (a capture must end with every fork joined).
  const auto ops_joined = [&] {
    ops();
    join_sinkhorn();
  };
  if (!graphs_enabled_ || prof_->enabled() || cpu_attention_) return ops_joined();
  if (!graphs_) graphs_ = std::make_unique<cuda::SegmentGraphs>(stream_);
  graphs_->run(key, ops_joined, [this] { forget_all_activations(); });
}

}  // namespace dsv4::cuda_impl

namespace dsv4 {

cuda::SegmentGraphStats cuda_segment_graph_stats(const Backend& be) {
  const auto* c = dynamic_cast<const cuda_impl::CudaBackend*>(&be);
  return c ? c->graph_stats() : cuda::SegmentGraphStats{};
}

}  // namespace dsv4
