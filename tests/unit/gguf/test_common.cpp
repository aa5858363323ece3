// src/common: ThreadPool (partition determinism, coverage, nesting, exceptions, resizing) and MmapFile.
// These live with the gguf tests because common has no test binary of its own and gguf links it.
#include <gtest/gtest.h>

#include <atomic>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "common/error.h"
#include "common/mmap_file.h"
#include "common/thread_pool.h"
#include "gguf_test_util.h"

using namespace dsv4;

namespace {
// Records the chunks a parallel_for call produced, sorted by begin.
std::vector<std::pair<int64_t, int64_t>> chunks_of(ThreadPool& pool, int64_t n) {
  std::mutex m;
  std::vector<std::pair<int64_t, int64_t>> out;
  pool.parallel_for(n, [&](int64_t b, int64_t e) {
    std::lock_guard<std::mutex> lk(m);
    out.emplace_back(b, e);
  });
  std::sort(out.begin(), out.end());
  return out;
}
}  // namespace

TEST(ThreadPool, StaticPartitionIsDeterministicAndCovers) {
  ThreadPool pool(4);
  EXPECT_EQ(pool.n_threads(), 4);
  for (int64_t n : {1, 2, 3, 4, 5, 7, 100, 1001}) {
    auto c = chunks_of(pool, n);
    ASSERT_EQ(int(c.size()), pool.n_chunks(n)) << n;
    EXPECT_EQ(int64_t(c.size()), std::min<int64_t>(4, n));
    int64_t next = 0;
    for (size_t t = 0; t < c.size(); ++t) {
      int64_t b, e;
      ThreadPool::chunk_range(n, int(c.size()), int(t), &b, &e);
      EXPECT_EQ(c[t].first, b);
      EXPECT_EQ(c[t].second, e);
      EXPECT_EQ(c[t].first, next);  // contiguous, no gaps or overlaps
      EXPECT_GT(c[t].second, c[t].first);
      next = c[t].second;
    }
    EXPECT_EQ(next, n);
    for (int rep = 0; rep < 20; ++rep) ASSERT_EQ(chunks_of(pool, n), c);  // same partition every call
  }
  EXPECT_TRUE(chunks_of(pool, 0).empty());
}

TEST(ThreadPool, ChunksRunOnSeveralThreadsIncludingCaller) {
  ThreadPool pool(3);
  std::mutex m;
  std::set<std::thread::id> ids;
  // Each chunk sleeps so that one thread cannot run them all back to back before the others start.
  pool.parallel_for(3, [&](int64_t, int64_t) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    std::lock_guard<std::mutex> lk(m);
    ids.insert(std::this_thread::get_id());
  });
  EXPECT_EQ(ids.size(), 3u);
  EXPECT_TRUE(ids.count(std::this_thread::get_id()));
}

TEST(ThreadPool, ManySmallJobsSumCorrectly) {
  ThreadPool pool(4);
  for (int job = 0; job < 2000; ++job) {
    std::atomic<int64_t> sum{0};
    int64_t n = 1 + job % 37;
    pool.parallel_for(n, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) sum += i;
    });
    ASSERT_EQ(sum.load(), n * (n - 1) / 2) << "job " << job;
  }
}

TEST(ThreadPool, NestedCallsRunSerially) {
  ThreadPool pool(4);
  std::atomic<int> inner_chunks{0};
  std::atomic<int64_t> covered{0};
  pool.parallel_for(4, [&](int64_t, int64_t) {
    EXPECT_TRUE(ThreadPool::in_parallel_region());
    pool.parallel_for(10, [&](int64_t b, int64_t e) {
      inner_chunks++;
      covered += e - b;
    });
  });
  EXPECT_EQ(inner_chunks.load(), 4);  // one serial chunk per outer chunk
  EXPECT_EQ(covered.load(), 40);
  EXPECT_FALSE(ThreadPool::in_parallel_region());
}

TEST(ThreadPool, ExceptionPropagatesAndPoolSurvives) {
  ThreadPool pool(4);
  EXPECT_THROW(pool.parallel_for(8, [&](int64_t b, int64_t) {
    if (b >= 4) fail("chunk at %lld failed", (long long)b);
  }),
               Error);
  std::atomic<int64_t> n{0};
  pool.parallel_for(8, [&](int64_t b, int64_t e) { n += e - b; });
  EXPECT_EQ(n.load(), 8);
}

TEST(ThreadPool, ResizeAndSingleThread) {
  ThreadPool pool(1);
  auto c = chunks_of(pool, 10);
  ASSERT_EQ(c.size(), 1u);
  EXPECT_EQ(c[0], std::make_pair(int64_t(0), int64_t(10)));
  pool.set_n_threads(3);
  EXPECT_EQ(pool.n_threads(), 3);
  EXPECT_EQ(chunks_of(pool, 10).size(), 3u);
  pool.set_n_threads(0);
  EXPECT_GE(pool.n_threads(), 1);
}

TEST(ThreadPool, ConcurrentCallersAreSerialised) {
  ThreadPool pool(2);
  std::atomic<int64_t> total{0};
  auto work = [&] {
    for (int i = 0; i < 300; ++i) pool.parallel_for(16, [&](int64_t b, int64_t e) { total += e - b; });
  };
  std::thread a(work), b(work);
  a.join();
  b.join();
  EXPECT_EQ(total.load(), 2 * 300 * 16);
}

TEST(MmapFile, MapsContentAndReportsErrors) {
  test::TempPath p("mmap");
  test::write_bytes(p, {1, 2, 3, 250});
  MmapFile m(p);
  ASSERT_EQ(m.size(), 4u);
  EXPECT_EQ(m.data()[3], 250);
  m.prefetch(0, 100);  // out-of-range tail is clipped, not an error
  MmapFile moved(std::move(m));
  EXPECT_EQ(moved.size(), 4u);
  EXPECT_EQ(m.data(), nullptr);

  test::write_bytes(p, {});
  MmapFile empty(p);
  EXPECT_EQ(empty.size(), 0u);
  EXPECT_EQ(empty.data(), nullptr);

  try {
    MmapFile missing("/nonexistent/file.bin");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "/nonexistent/file.bin: cannot open: No such file or directory");
  }
  EXPECT_THROW(MmapFile("/tmp"), Error);  // a directory is not a regular file
}
