// Op profiler of the CUDA backend: with DSV4_CUDA_PROFILE=1 every op of the op table is bracketed by a pair of
// CUDA events on the backend's stream, the elapsed times are aggregated per op name (matmuls per weight type and
// tensor class, e.g. "matmul Q8_0 attn_q_b") and per pass kind (ops over one token, i.e. decode steps, apart from
// ops over several tokens, i.e. prefill), and a table per kind (calls, GPU ms, us/call, host us/call, share) is
// printed to stderr when the backend is destroyed, sorted by total time. Calls that mirrored a weight to the
// device (first use) are left out (counted apart): they time the upload, not the op.
//
// Launch-bound or not: "host us/call" is the time the host spent inside the op (argument checks, launches). When
// it is close to the GPU us/call, the GPU waits for launches and fewer launches (fusion, graphs) pay; when the
// GPU time is much larger, the kernels themselves are the cost.
//
// What the numbers mean: an interval runs from the GPU reaching the op's begin event to it finishing the op's
// last kernel. When the host launches slower than the GPU executes (a launch-bound decode) the GPU reaches the
// begin event early and waits for the op's launches inside the interval, so an op's time then includes its own
// launch overhead, and the column sums to the wall time of the stream. Nested scopes (parts of an op, named
// "op.part") are listed but left out of the share's denominator. Recording events costs little, but pending
// pairs are folded (a stream synchronization) every few thousand ops: this is a diagnostic, not the fast path.
#pragma once

#include <cuda_runtime_api.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

namespace dsv4::cuda {

class OpProfiler {
 public:
  // Enabled when the environment variable DSV4_CUDA_PROFILE is set to a value other than "0".
  explicit OpProfiler(cudaStream_t stream);
  ~OpProfiler();  // prints the table (when enabled and anything was recorded)
  OpProfiler(const OpProfiler&) = delete;
  OpProfiler& operator=(const OpProfiler&) = delete;

  bool enabled() const { return enabled_; }

  // RAII bracket of one op (no-op when disabled). The name is copied only when enabled.
  class Scope {
   public:
    // n_tokens: the op's token count (1: a decode step's op).
    Scope(OpProfiler& p, const char* name, int64_t n_tokens) : p_(p.enabled_ ? &p : nullptr) {
      if (p_) p_->begin(name, n_tokens);
    }
    Scope(OpProfiler& p, const std::string& name, int64_t n_tokens) : p_(p.enabled_ ? &p : nullptr) {
      if (p_) p_->begin(name.c_str(), n_tokens);
    }
    ~Scope() {
      if (p_) p_->end();
    }
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    OpProfiler* p_;
  };

  // The scopes now open time something else (a weight upload): their samples are dropped.
  void discard_open() {
    for (Open& o : open_) o.discard = true;
  }

  // The aggregated table as text (folds pending pairs first). Empty when disabled or nothing was recorded.
  std::string report();

 private:
  struct Pending {
    int id;
    cudaEvent_t begin, end;
  };
  struct Stat {
    std::string name;
    int group = 0;  // 0: one-token calls (decode), 1: several tokens
    int depth = 0;
    long long calls = 0, discarded = 0;
    double ms = 0, host_ms = 0;
  };
  struct Open {
    int id;
    cudaEvent_t begin;
    bool discard;
    std::chrono::steady_clock::time_point t0;
  };
  void begin(const char* name, int64_t n_tokens);
  void end();
  void fold();  // waits for the pending pairs, adds their times, recycles the events
  cudaEvent_t event();

  bool enabled_ = false;
  cudaStream_t stream_;
  std::vector<Stat> stats_;
  std::map<std::string, int> ids_;
  std::vector<Pending> pending_;
  std::vector<Open> open_;  // the scopes now open, innermost last
  std::vector<cudaEvent_t> free_;
};

// "blk.12.attn_q_b.weight" -> "attn_q_b": the tensor's class, shared by every layer.
std::string tensor_class(const char* name);

}  // namespace dsv4::cuda
