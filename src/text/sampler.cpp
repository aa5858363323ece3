// Token sampling (temperature, top-k, min-p, top-p, seeded xorshift RNG) and stop-string matching.
#include <algorithm>
#include <cmath>

#include "common/argmax.h"
#include "common/error.h"
#include "dsv4/text.h"

namespace dsv4 {

namespace {

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

}  // namespace

Sampler::Sampler(const SamplingParams& p) : params_(p), state_(splitmix64(p.seed) | 1) {
  if (!(p.top_p > 0.0f && p.top_p <= 1.0f))
    fail("sampling: top_p must be in (0, 1], got %g", double(p.top_p));
  if (!(p.min_p >= 0.0f && p.min_p <= 1.0f))
    fail("sampling: min_p must be in [0, 1], got %g", double(p.min_p));
  if (p.top_k < 0) fail("sampling: top_k must be >= 0, got %d", p.top_k);
  if (std::isnan(p.temperature)) fail("sampling: temperature is NaN");
  // Infinite temperature (e.g. --temp 1e39 overflowing float) would silently sample uniformly over the vocab.
  if (std::isinf(p.temperature)) fail("sampling: temperature must be finite, got %g", double(p.temperature));
}

double Sampler::uniform() {
  // xorshift64* (the generator family ds4 uses), 53 bits of the output.
  state_ ^= state_ >> 12;
  state_ ^= state_ << 25;
  state_ ^= state_ >> 27;
  uint64_t r = state_ * 0x2545F4914F6CDD1Dull;
  return double(r >> 11) * (1.0 / 9007199254740992.0);
}

Token Sampler::sample(std::span<const float> logits) {
  const Token best = Token(argmax_usable(logits.data(), int64_t(logits.size())));  // Session::argmax's rule
  if (best < 0) fail("sampling: all %zu logits are -inf or NaN", logits.size());
  const float best_v = logits[size_t(best)];
  if (params_.temperature <= 0.0f || params_.top_k == 1 || best_v == INFINITY) return best;

  // Probabilities relative to the top one: exp((l - max) / T). min-p cuts against that ratio directly.
  const double inv_t = 1.0 / double(params_.temperature);
  const double min_rel = std::max(double(params_.min_p), 1e-30);  // drops exp underflow to 0 as well
  cand_.clear();
  for (size_t i = 0; i < logits.size(); ++i) {
    if (!usable_logit(logits[i])) continue;
    double rel = std::exp((double(logits[i]) - double(best_v)) * inv_t);
    if (rel >= min_rel) cand_.emplace_back(float(rel), Token(i));
  }
  // Highest first; ties by id so the result does not depend on the sort's stability.
  auto order = [](const auto& a, const auto& b) {
    return a.first != b.first ? a.first > b.first : a.second < b.second;
  };
  if (params_.top_k > 0 && size_t(params_.top_k) < cand_.size()) {
    std::partial_sort(cand_.begin(), cand_.begin() + params_.top_k, cand_.end(), order);
    cand_.resize(size_t(params_.top_k));
  } else {
    std::sort(cand_.begin(), cand_.end(), order);
  }
  double total = 0;
  for (auto& c : cand_) total += c.first;
  if (params_.top_p < 1.0f) {
    double acc = 0, limit = double(params_.top_p) * total;
    size_t keep = 0;
    while (keep < cand_.size()) {
      acc += cand_[keep++].first;
      if (acc >= limit) break;
    }
    cand_.resize(keep);
    total = acc;
  }
  double u = uniform() * total;
  for (auto& c : cand_) {
    u -= c.first;
    if (u < 0) return c.second;
  }
  return cand_.back().second;  // rounding left u >= 0 after the last candidate
}

StopMatcher::StopMatcher(std::vector<std::string> stops) {
  for (auto& s : stops)
    if (!s.empty()) stops_.push_back(std::move(s));
}

StopMatcher::Result StopMatcher::push(std::string_view text) {
  Result r;
  if (stopped_) {
    r.stopped = true;
    return r;
  }
  held_ += text;
  size_t first = std::string::npos;
  for (auto& s : stops_) first = std::min(first, held_.find(s));
  if (first != std::string::npos) {
    r.text = held_.substr(0, first);
    held_.clear();
    stopped_ = r.stopped = true;
    return r;
  }
  size_t keep = 0;
  for (auto& s : stops_)
    for (size_t n = std::min(held_.size(), s.size() - 1); n > keep; --n)
      if (held_.compare(held_.size() - n, n, s, 0, n) == 0) {
        keep = n;
        break;
      }
  r.text = held_.substr(0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
  return r;
}

std::string StopMatcher::flush() {
  std::string out;
  if (!stopped_) out.swap(held_);
  return out;
}

}  // namespace dsv4
