// A persistent CPU thread pool with one primitive: parallel_for over [0, n) with static chunking.
//
// Why static chunking: the CPU backend is the numeric oracle, and the roadmap requires bitwise-identical
// results for identical inputs. Every parallel_for(n) on a pool of T threads splits [0, n) into the same
// min(T, n) contiguous chunks, chunk t = [n*t/k, n*(t+1)/k), so any per-chunk reduction is reproducible.
//
// The calling thread runs chunk 0 itself, so a pool of 1 thread has no workers and no synchronisation.
// A parallel_for issued from inside a chunk (nested) runs serially on the calling thread as one chunk
// [0, n): nesting never deadlocks and never oversubscribes. Calls from two outside threads on the same pool
// are serialised (the second waits). An exception thrown by fn in any chunk is rethrown to the caller after
// every chunk has finished (the first one thrown wins).
//
// Workers spin briefly before sleeping, because decode issues thousands of small parallel_for calls per
// token and a condition-variable wake-up per call would dominate them.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace dsv4 {

class ThreadPool {
 public:
  using RangeFn = std::function<void(int64_t begin, int64_t end)>;

  // n_threads counts the caller; 0 (or negative) means hardware_concurrency().
  explicit ThreadPool(int n_threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int n_threads() const { return n_threads_; }
  // Stops the workers and starts n_threads - 1 new ones. Must not be called from inside a parallel_for.
  void set_n_threads(int n_threads);

  // Runs fn over [0, n) split into min(n_threads, n) static chunks; returns when all are done.
  void parallel_for(int64_t n, const RangeFn& fn);

  // The chunk [begin, end) that chunk index t of k gets for n items (exposed so tests and callers that
  // need per-chunk scratch can reproduce the partition).
  static void chunk_range(int64_t n, int k, int t, int64_t* begin, int64_t* end);
  // Number of chunks parallel_for(n) uses on this pool.
  int n_chunks(int64_t n) const;

  // True while the current thread is executing a chunk of some pool's parallel_for.
  static bool in_parallel_region();

 private:
  void start_workers();
  void stop_workers();
  void worker_main(int index, uint64_t start_generation);
  void run_chunk(int t);

  int n_threads_ = 1;
  std::vector<std::thread> workers_;
  std::mutex call_mutex_;  // serialises outside callers

  // Job description, published by bumping generation_.
  const RangeFn* job_fn_ = nullptr;
  int64_t job_n_ = 0;
  int job_chunks_ = 0;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};  // chunks not yet finished by workers
  std::atomic<bool> stop_{false};

  std::mutex wake_mutex_;
  std::condition_variable wake_cv_;   // workers sleep here between jobs
  std::condition_variable done_cv_;   // the caller sleeps here waiting for pending_ == 0

  std::mutex error_mutex_;
  std::exception_ptr error_;
};

// A process-wide pool for code that has no engine-owned pool at hand (tools, tests, benchmarks). The engine
// owns its own ThreadPool (EngineOptions::threads); kernels take the pool as a parameter.
ThreadPool& default_thread_pool();

}  // namespace dsv4
