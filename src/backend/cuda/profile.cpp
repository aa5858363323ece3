// Op profiler (see profile.h).
#include "backend/cuda/profile.h"

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <cstring>

#include "backend/cuda/cuda_util.h"
#include "common/error.h"

namespace dsv4::cuda {

namespace {
constexpr size_t kFoldEvery = 4096;  // pending pairs before a fold (bounds the events alive at once)
}

OpProfiler::OpProfiler(cudaStream_t stream) : stream_(stream) {
  const char* e = std::getenv("DSV4_CUDA_PROFILE");
  enabled_ = e && *e && std::strcmp(e, "0") != 0;
}

OpProfiler::~OpProfiler() {
  if (!enabled_) return;
  try {
    const std::string r = report();
    if (!r.empty()) std::fputs(r.c_str(), stderr);
  } catch (const std::exception& ex) {
    std::fprintf(stderr, "cuda profile: %s\n", ex.what());
  }
  for (auto& p : pending_) cudaEventDestroy(p.begin), cudaEventDestroy(p.end);
  for (auto& o : open_) cudaEventDestroy(o.begin);
  for (cudaEvent_t e : free_) cudaEventDestroy(e);
}

cudaEvent_t OpProfiler::event() {
  if (!free_.empty()) {
    cudaEvent_t e = free_.back();
    free_.pop_back();
    return e;
  }
  cudaEvent_t e;
  check(cudaEventCreate(&e), "cuda profile: cudaEventCreate");
  return e;
}

void OpProfiler::begin(const char* name, int64_t n_tokens) {
  const int group = n_tokens == 1 ? 0 : 1;
  const std::string key = std::string(group ? "n|" : "1|") + name;
  auto it = ids_.find(key);
  if (it == ids_.end()) {
    it = ids_.emplace(key, int(stats_.size())).first;
    Stat s;
    s.name = name;
    s.group = group;
    s.depth = int(open_.size());
    stats_.push_back(s);
  }
  cudaEvent_t b = event();
  check(cudaEventRecord(b, stream_), "cuda profile: cudaEventRecord");
  open_.push_back({it->second, b, false, std::chrono::steady_clock::now()});
}

void OpProfiler::end() {
  if (open_.empty()) return;
  const Open o = open_.back();
  open_.pop_back();
  Stat& s = stats_[size_t(o.id)];
  if (o.discard) {
    free_.push_back(o.begin);
    ++s.discarded;
    return;
  }
  s.host_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - o.t0).count();
  cudaEvent_t e = event();
  check(cudaEventRecord(e, stream_), "cuda profile: cudaEventRecord");
  pending_.push_back({o.id, o.begin, e});
  if (pending_.size() >= kFoldEvery && open_.empty()) fold();
}

void OpProfiler::fold() {
  for (const Pending& p : pending_) {
    check(cudaEventSynchronize(p.end), "cuda profile: cudaEventSynchronize");
    float ms = 0;
    check(cudaEventElapsedTime(&ms, p.begin, p.end), "cuda profile: cudaEventElapsedTime");
    stats_[size_t(p.id)].ms += ms;
    stats_[size_t(p.id)].calls += 1;
    free_.push_back(p.begin);
    free_.push_back(p.end);
  }
  pending_.clear();
}

std::string OpProfiler::report() {
  if (!enabled_) return {};
  fold();
  std::string out;
  for (int group = 0; group < 2; ++group) {
    std::vector<const Stat*> order;
    double top_ms = 0, top_host = 0;
    long long discarded = 0;
    for (const Stat& s : stats_) {
      if (s.group != group) continue;
      order.push_back(&s);
      discarded += s.discarded;
      if (s.depth == 0) top_ms += s.ms, top_host += s.host_ms;
    }
    if (order.empty()) continue;
    std::sort(order.begin(), order.end(), [](const Stat* a, const Stat* b) { return a->ms > b->ms; });
    out += strfmt("cuda op profile, %s (DSV4_CUDA_PROFILE; GPU time between events around each op on the backend "
                  "stream; '.part' rows are inside their op and not in the share):\n%-44s %9s %11s %10s %10s %7s\n",
                  group == 0 ? "one-token calls (decode)" : "multi-token calls (prefill)", "op", "calls", "GPU ms",
                  "us/call", "host us", "share");
    for (const Stat* s : order) {
      if (s->calls == 0) continue;
      const double n = double(s->calls);
      out += strfmt("%-44s %9lld %11.3f %10.2f %10.2f %6.1f%%\n", s->name.c_str(), s->calls, s->ms, 1e3 * s->ms / n,
                    1e3 * s->host_ms / n, s->depth == 0 && top_ms > 0 ? 100.0 * s->ms / top_ms : 0.0);
    }
    out += strfmt("%-44s %9s %11.3f %10s %10.3f ms host\n", "total (top-level ops)", "", top_ms, "", top_host);
    if (discarded) out += strfmt("(%lld calls that mirrored weights to the device left out)\n", discarded);
  }
  return out;
}

std::string tensor_class(const char* name) {
  if (!name) return "?";
  std::string s(name);
  if (s.rfind("blk.", 0) == 0) {
    size_t i = 4;
    while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i]))) ++i;
    if (i < s.size() && s[i] == '.') s = s.substr(i + 1);
  }
  const std::string suffix = ".weight";
  if (s.size() > suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0)
    s.resize(s.size() - suffix.size());
  return s;
}

}  // namespace dsv4::cuda
