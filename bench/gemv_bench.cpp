// GEMV throughput per weight type, SIMD level and thread count, reported as weight GB/s (weight bytes read
// per call / time): batch-1 decode is bound by streaming weights, so this is the number to compare against
// the machine's memory bandwidth.
//
//   build/<dir>/gemv_bench --benchmark_counters_tabular=true
//
// The matrix is 4096 x 4096 (a DeepSeek-V4 attention projection is 4096 wide). Weights are made by
// quantizing 16 Gaussian rows and tiling them: the content does not change the kernels' speed, and it keeps
// the IQ2_XXS quantizer (exhaustive grid search) out of the set-up time.
#include <benchmark/benchmark.h>

#include <cstring>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "common/thread_pool.h"
#include "quant/quant.h"

using namespace dsv4;

namespace {

constexpr int64_t kRows = 4096, kCols = 4096, kSeedRows = 16;

const QType kTypes[] = {QType::F32,  QType::F16,  QType::BF16,    QType::FP8_E4M3, QType::Q8_0,
                        QType::Q4_K, QType::Q2_K, QType::IQ2_XXS, QType::MXFP4};

struct Matrix {
  std::vector<uint8_t> bytes;
  int64_t row_bytes = 0;
};

const Matrix& matrix(QType t) {
  static std::unique_ptr<Matrix> cache[64];
  const size_t slot = uint32_t(t) % 64;
  if (!cache[slot]) {
    std::mt19937 rng(1);
    std::normal_distribution<float> nd(0.0f, 0.02f);
    std::vector<float> seed(static_cast<size_t>(kSeedRows * kCols));
    for (float& f : seed) f = nd(rng);
    auto m = std::make_unique<Matrix>();
    m->row_bytes = row_bytes(t, kCols);
    std::vector<uint8_t> q(static_cast<size_t>(kSeedRows * m->row_bytes));
    quantize_rows(t, seed.data(), q.data(), kSeedRows, kCols);
    m->bytes.resize(size_t(kRows * m->row_bytes));
    for (int64_t r = 0; r < kRows; ++r)
      std::memcpy(m->bytes.data() + r * m->row_bytes, q.data() + (r % kSeedRows) * m->row_bytes,
                  size_t(m->row_bytes));
    cache[slot] = std::move(m);
  }
  return *cache[slot];
}

// Args: type index, SIMD level, threads (0 = all hardware threads).
void BM_gemv(benchmark::State& state) {
  const QType t = kTypes[state.range(0)];
  const SimdLevel level = SimdLevel(state.range(1));
  if (int(level) > int(simd_supported())) {
    state.SkipWithError("SIMD level not supported on this CPU");
    return;
  }
  const int threads = state.range(2) > 0 ? int(state.range(2)) : int(std::thread::hardware_concurrency());
  ThreadPool pool(threads);
  set_simd_level(level);
  const Matrix& m = matrix(t);
  std::vector<float> x(static_cast<size_t>(kCols)), y(static_cast<size_t>(kRows));
  std::mt19937 rng(2);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (float& f : x) f = nd(rng);
  for (auto _ : state) {
    gemv(t, m.bytes.data(), kRows, kCols, x.data(), y.data(), &pool);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  const double bytes = double(m.bytes.size());
  state.SetBytesProcessed(int64_t(bytes) * state.iterations());
  state.counters["GB/s"] =
      benchmark::Counter(bytes * 1e-9 * double(state.iterations()), benchmark::Counter::kIsRate);
  state.SetLabel(qtype_name(t) + "/" + simd_name(level) + "/t" + std::to_string(threads));
  set_simd_level(simd_supported());
}

// Reference quantizer speed (converter cost), 16 rows x 4096, single thread: reported as values/s.
void BM_quantize(benchmark::State& state) {
  const QType t = kTypes[state.range(0)];
  const int64_t n = kSeedRows * kCols;
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.0f, 0.02f);
  std::vector<float> x(static_cast<size_t>(n));
  for (float& f : x) f = nd(rng);
  std::vector<uint8_t> q(static_cast<size_t>(row_bytes(t, n)));
  for (auto _ : state) {
    quantize_row(t, x.data(), q.data(), n);
    benchmark::DoNotOptimize(q.data());
  }
  state.counters["Mvalues/s"] =
      benchmark::Counter(double(n) * 1e-6 * double(state.iterations()), benchmark::Counter::kIsRate);
  state.SetLabel(qtype_name(t));
}

void register_all() {
  for (int64_t ti = 0; ti < int64_t(std::size(kTypes)); ++ti)
    benchmark::RegisterBenchmark(("quantize/" + qtype_name(kTypes[ti])).c_str(), BM_quantize)
        ->Arg(ti)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
  for (int64_t ti = 0; ti < int64_t(std::size(kTypes)); ++ti)
    for (int64_t level = 0; level <= int64_t(simd_supported()); ++level)
      for (int64_t threads : {int64_t(1), int64_t(0)})
        benchmark::RegisterBenchmark(("gemv/" + qtype_name(kTypes[ti]) + "/" + simd_name(SimdLevel(level)) +
                                      (threads == 1 ? "/1thread" : "/allthreads"))
                                         .c_str(),
                                     BM_gemv)
            ->Args({ti, level, threads})
            ->Unit(benchmark::kMicrosecond)
            ->UseRealTime();
}

}  // namespace

int main(int argc, char** argv) {
  register_all();
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
