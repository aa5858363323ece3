// Kernel timeline of any CUDA program via CUPTI's activity API (LD_PRELOAD; a dev tool, not part of dsv4).
//
// Why: on the GPU box Nsight Systems cannot make reports and Nsight Compute cannot read counters (device tool
// KINDS.md), so per-kernel durations inside the decode graphs, the gaps between kernels and the overlap of the side
// streams were never seen directly (the skip table of timing_skip.h infers them). CUPTI's concurrent-kernel records
// carry start/end timestamps of every kernel, graph nodes included, without serializing them.
//
//   g++ -O2 -shared -fPIC dev/cuda/trace/cupti_trace.cpp -I$CUDA/include -L$CUPTI_LIB -lcupti -o libtrace.so
//   DSV4_TRACE_OUT=trace.csv LD_PRELOAD=./libtrace.so dsv4 bench ...
//   python3 dev/cuda/trace/summarize.py trace.csv
// Output: one line per kernel: start_ns,end_ns,stream,graph_id,grid_x*y*z,block_x,name (sorted later).
#include <cupti.h>
#include <cupti_callbacks.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace {

FILE* g_out = nullptr;
std::mutex g_mu;
constexpr size_t kBufBytes = 16u << 20;

void CUPTIAPI buffer_requested(uint8_t** buf, size_t* size, size_t* max_records) {
  *buf = static_cast<uint8_t*>(std::aligned_alloc(8, kBufBytes));
  *size = kBufBytes;
  *max_records = 0;
}

void CUPTIAPI buffer_completed(CUcontext, uint32_t, uint8_t* buf, size_t, size_t valid) {
  CUpti_Activity* rec = nullptr;
  std::lock_guard<std::mutex> lock(g_mu);
  while (cuptiActivityGetNextRecord(buf, valid, &rec) == CUPTI_SUCCESS) {
    if (!g_out) continue;
    if (rec->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {  // "#M": device copies (kind 1 = H2D, 2 = D2H; 1 = pageable)
      const auto* m = reinterpret_cast<const CUpti_ActivityMemcpy6*>(rec);
      std::fprintf(g_out, "#M,%llu,%llu,%u,%u,%u,%u,%llu\n", (unsigned long long)m->start,
                   (unsigned long long)m->end, m->streamId, unsigned(m->copyKind), unsigned(m->srcKind),
                   unsigned(m->dstKind), (unsigned long long)m->bytes);
      continue;
    }
    if (rec->kind == CUPTI_ACTIVITY_KIND_RUNTIME) {  // "#R": host runtime API calls (what the host was doing)
      const auto* a = reinterpret_cast<const CUpti_ActivityAPI*>(rec);
      const char* name = nullptr;
      cuptiGetCallbackName(CUPTI_CB_DOMAIN_RUNTIME_API, a->cbid, &name);
      std::fprintf(g_out, "#R,%llu,%llu,%u,%s\n", (unsigned long long)a->start, (unsigned long long)a->end,
                   a->threadId, name ? name : "?");
      continue;
    }
    if (rec->kind != CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL && rec->kind != CUPTI_ACTIVITY_KIND_KERNEL) continue;
    const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(rec);
    if (g_out)
      std::fprintf(g_out, "%llu,%llu,%u,%u,%d,%d,%s\n", (unsigned long long)k->start, (unsigned long long)k->end,
                   k->streamId, k->graphId, k->gridX * k->gridY * k->gridZ, k->blockX, k->name ? k->name : "?");
  }
  size_t dropped = 0;
  cuptiActivityGetNumDroppedRecords(nullptr, 0, &dropped);
  if (dropped && g_out) std::fprintf(g_out, "# dropped %zu records\n", dropped);
  std::free(buf);
}

void check(CUptiResult r, const char* what) {
  if (r == CUPTI_SUCCESS) return;
  const char* msg = nullptr;
  cuptiGetResultString(r, &msg);
  std::fprintf(stderr, "cupti_trace: %s: %s\n", what, msg ? msg : "?");
}

__attribute__((constructor)) void trace_init() {
  const char* path = std::getenv("DSV4_TRACE_OUT");
  if (!path) return;
  g_out = std::fopen(path, "w");
  if (!g_out) {
    std::fprintf(stderr, "cupti_trace: cannot open %s\n", path);
    return;
  }
  check(cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed), "register callbacks");
  check(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL), "enable concurrent kernel");
  if (std::getenv("DSV4_TRACE_HOST")) {  // copies and runtime API calls too (more overhead per call)
    check(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY), "enable memcpy");
    check(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_RUNTIME), "enable runtime");
  }
  check(cuptiActivityFlushPeriod(200), "flush period");  // buffers reach the file while the program runs
}

__attribute__((destructor)) void trace_fini() {
  if (!g_out) return;
  check(cuptiActivityFlushAll(1), "flush");
  std::lock_guard<std::mutex> lock(g_mu);
  std::fclose(g_out);
  g_out = nullptr;
}

}  // namespace
