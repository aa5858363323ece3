// ThreadPool implementation: a generation counter publishes each job; workers spin briefly on it, then sleep
// on a condition variable. Every worker acknowledges every generation (even when it has no chunk), so a worker
// can never mistake the next job's parameters for the one it woke up for.
#include "common/thread_pool.h"

#include "common/error.h"

#include <algorithm>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define DSV4_CPU_RELAX() _mm_pause()
#else
#define DSV4_CPU_RELAX() std::this_thread::yield()
#endif

namespace dsv4 {

namespace {
// Spin iterations before sleeping: long enough to cover the gap between back-to-back decode ops, short enough
// not to burn a core when the engine is idle. After the first kPauseIterations the spinner yields instead of
// pausing, so on an oversubscribed machine the thread it waits for can get the core.
constexpr int kSpinIterations = 4096;
constexpr int kPauseIterations = 256;

void spin_step(int i) {
  if (i < kPauseIterations)
    DSV4_CPU_RELAX();
  else
    std::this_thread::yield();
}
thread_local bool t_in_parallel_region = false;

// More workers than this is a typo (-t 100000), not a machine: each one is an OS thread with its own stack,
// and creating tens of thousands of them exhausts memory or aborts under the sanitizers.
constexpr int kMaxThreads = 1024;

int resolve_threads(int n) {
  if (n > kMaxThreads) fail("thread count %d is above the supported maximum of %d", n, kMaxThreads);
  if (n > 0) return n;
  unsigned hw = std::thread::hardware_concurrency();
  return hw > 0 ? int(hw) : 1;
}

// Runs fn(begin, end) with the region flag set, restoring it afterwards (also when fn throws).
void run_flagged(const ThreadPool::RangeFn& fn, int64_t begin, int64_t end) {
  bool was = t_in_parallel_region;
  t_in_parallel_region = true;
  try {
    fn(begin, end);
  } catch (...) {
    t_in_parallel_region = was;
    throw;
  }
  t_in_parallel_region = was;
}
}  // namespace

ThreadPool::ThreadPool(int n_threads) : n_threads_(resolve_threads(n_threads)) { start_workers(); }

ThreadPool::~ThreadPool() { stop_workers(); }

void ThreadPool::set_n_threads(int n_threads) {
  std::lock_guard<std::mutex> call(call_mutex_);
  stop_workers();
  n_threads_ = resolve_threads(n_threads);
  start_workers();
}

bool ThreadPool::in_parallel_region() { return t_in_parallel_region; }

void ThreadPool::chunk_range(int64_t n, int k, int t, int64_t* begin, int64_t* end) {
  // 128-bit intermediate: n * t can overflow int64 for huge n and many threads.
  *begin = int64_t((__int128)n * t / k);
  *end = int64_t((__int128)n * (t + 1) / k);
}

int ThreadPool::n_chunks(int64_t n) const {
  if (n <= 0) return 0;
  return int(std::min<int64_t>(n_threads_, n));
}

void ThreadPool::start_workers() {
  stop_.store(false);
  workers_.clear();
  // The generation is read here, not in the new thread: a thread that starts late must still see a job
  // published right after the constructor returned as new.
  uint64_t gen = generation_.load(std::memory_order_acquire);
  for (int i = 1; i < n_threads_; ++i) workers_.emplace_back([this, i, gen] { worker_main(i, gen); });
}

void ThreadPool::stop_workers() {
  {
    std::lock_guard<std::mutex> lk(wake_mutex_);
    stop_.store(true);
  }
  wake_cv_.notify_all();
  for (auto& w : workers_) w.join();
  workers_.clear();
}

void ThreadPool::run_chunk(int t) {
  int64_t begin, end;
  chunk_range(job_n_, job_chunks_, t, &begin, &end);
  try {
    run_flagged(*job_fn_, begin, end);
  } catch (...) {
    std::lock_guard<std::mutex> lk(error_mutex_);
    if (!error_) error_ = std::current_exception();
  }
}

void ThreadPool::worker_main(int index, uint64_t seen) {
  // `seen` is the generation current when start_workers() ran (no job was in flight then).
  for (;;) {
    uint64_t g = seen;
    for (int i = 0; i < kSpinIterations; ++i) {
      g = generation_.load(std::memory_order_acquire);
      if (g != seen || stop_.load(std::memory_order_relaxed)) break;
      spin_step(i);
    }
    if (g == seen) {
      std::unique_lock<std::mutex> lk(wake_mutex_);
      wake_cv_.wait(lk, [&] { return generation_.load(std::memory_order_acquire) != seen || stop_.load(); });
      g = generation_.load(std::memory_order_acquire);
    }
    if (stop_.load()) return;
    seen = g;
    if (index < job_chunks_) run_chunk(index);
    if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      std::lock_guard<std::mutex> lk(wake_mutex_);
      done_cv_.notify_one();
    }
  }
}

void ThreadPool::parallel_for(int64_t n, const RangeFn& fn) {
  if (n <= 0) return;
  if (t_in_parallel_region || n_threads_ == 1 || n == 1) {
    run_flagged(fn, 0, n);  // nested or trivially serial: one chunk on this thread
    return;
  }
  std::lock_guard<std::mutex> call(call_mutex_);
  job_fn_ = &fn;
  job_n_ = n;
  job_chunks_ = n_chunks(n);
  error_ = nullptr;
  pending_.store(int(workers_.size()), std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> lk(wake_mutex_);
    generation_.fetch_add(1, std::memory_order_acq_rel);
  }
  wake_cv_.notify_all();

  run_chunk(0);

  for (int i = 0; i < kSpinIterations && pending_.load(std::memory_order_acquire) != 0; ++i) spin_step(i);
  if (pending_.load(std::memory_order_acquire) != 0) {
    std::unique_lock<std::mutex> lk(wake_mutex_);
    done_cv_.wait(lk, [&] { return pending_.load(std::memory_order_acquire) == 0; });
  }
  job_fn_ = nullptr;
  if (error_) {
    std::exception_ptr e = error_;
    error_ = nullptr;
    std::rethrow_exception(e);
  }
}

ThreadPool& default_thread_pool() {
  static ThreadPool pool(0);
  return pool;
}

}  // namespace dsv4
