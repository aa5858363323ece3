// Sampler: edge cases (greedy, all-masked, NaN), filters, reproducibility, and statistical checks with a
// fixed sample count. Statistical tolerance: with N = 20000 draws a frequency's standard deviation is at most
// sqrt(0.25 / N) = 0.0035, so +-0.02 is over 5 sigma (and the seed is fixed, so the test is deterministic).
#include <gtest/gtest.h>

#include <cmath>

#include "dsv4/text.h"

namespace dsv4::test {
namespace {

std::vector<float> logits_for(std::vector<double> probs) {
  std::vector<float> l;
  for (double p : probs) l.push_back(p > 0 ? float(std::log(p)) : -INFINITY);
  return l;
}

std::vector<double> frequencies(Sampler& s, const std::vector<float>& logits, int n = 20000) {
  std::vector<double> f(logits.size(), 0);
  for (int i = 0; i < n; ++i) f[s.sample(logits)] += 1.0 / n;
  return f;
}

TEST(Sampler, GreedyCases) {
  std::vector<float> l = {0.1f, 2.0f, 2.0f, -1.0f};
  SamplingParams p;
  p.temperature = 0;
  Sampler g(p);
  for (int i = 0; i < 10; ++i) EXPECT_EQ(g.sample(l), 1);  // lowest id among equal maxima
  p.temperature = 1;
  p.top_k = 1;
  Sampler k1(p);
  for (int i = 0; i < 10; ++i) EXPECT_EQ(k1.sample(l), 1);
}

TEST(Sampler, MaskedAndNaN) {
  Sampler s(SamplingParams{});
  std::vector<float> l = {-INFINITY, NAN, 0.0f, -INFINITY};
  for (int i = 0; i < 50; ++i) EXPECT_EQ(s.sample(l), 2);
  std::vector<float> none = {-INFINITY, NAN};
  EXPECT_THROW(s.sample(none), dsv4::Error);
  EXPECT_THROW(s.sample(std::span<const float>()), dsv4::Error);
  SamplingParams bad;
  bad.top_p = 0;
  EXPECT_THROW(Sampler{bad}, dsv4::Error);
  bad = {};
  bad.min_p = 2;
  EXPECT_THROW(Sampler{bad}, dsv4::Error);
}

TEST(Sampler, MatchesDistributionAtTemperatureOne) {
  SamplingParams p;
  p.min_p = 0;
  p.seed = 7;
  Sampler s(p);
  auto f = frequencies(s, logits_for({0.5, 0.3, 0.2}));
  EXPECT_NEAR(f[0], 0.5, 0.02);
  EXPECT_NEAR(f[1], 0.3, 0.02);
  EXPECT_NEAR(f[2], 0.2, 0.02);
}

TEST(Sampler, TemperatureSharpens) {
  // T = 0.5 squares the probabilities: 0.25, 0.09, 0.04 -> normalized 0.658, 0.237, 0.105.
  SamplingParams p;
  p.min_p = 0;
  p.temperature = 0.5f;
  p.seed = 8;
  Sampler s(p);
  auto f = frequencies(s, logits_for({0.5, 0.3, 0.2}));
  EXPECT_NEAR(f[0], 0.25 / 0.38, 0.02);
  EXPECT_NEAR(f[1], 0.09 / 0.38, 0.02);
  EXPECT_NEAR(f[2], 0.04 / 0.38, 0.02);
}

TEST(Sampler, Filters) {
  auto l = logits_for({0.5, 0.3, 0.15, 0.04, 0.01});
  SamplingParams p;
  p.seed = 9;
  p.min_p = 0.05f;  // cut at 0.025: tokens 3 (0.04) stays, 4 (0.01) goes
  {
    Sampler s(p);
    auto f = frequencies(s, l);
    EXPECT_EQ(f[4], 0.0);
    EXPECT_NEAR(f[3], 0.04 / 0.99, 0.02);
  }
  p.min_p = 0;
  p.top_k = 2;  // renormalized over 0.5 / 0.3
  {
    Sampler s(p);
    auto f = frequencies(s, l);
    EXPECT_EQ(f[2] + f[3] + f[4], 0.0);
    EXPECT_NEAR(f[0], 0.625, 0.02);
  }
  p.top_k = 0;
  p.top_p = 0.6f;  // smallest prefix reaching 0.6: tokens 0 and 1
  {
    Sampler s(p);
    auto f = frequencies(s, l);
    EXPECT_EQ(f[2] + f[3] + f[4], 0.0);
    EXPECT_NEAR(f[1], 0.375, 0.02);
  }
}

TEST(Sampler, SeedReproducible) {
  auto l = logits_for({0.2, 0.2, 0.2, 0.2, 0.2});
  SamplingParams p;
  p.seed = 42;
  Sampler a(p), b(p);
  p.seed = 43;
  Sampler c(p);
  int same_ab = 0, same_ac = 0;
  for (int i = 0; i < 200; ++i) {
    Token x = a.sample(l), y = b.sample(l), z = c.sample(l);
    same_ab += x == y;
    same_ac += x == z;
  }
  EXPECT_EQ(same_ab, 200);
  EXPECT_LT(same_ac, 100);  // independent streams agree ~20% of the time; 100/200 is far outside that
}

TEST(StopMatcher, HoldsBackAndStops) {
  StopMatcher m({"STOP", "\n\n"});
  EXPECT_EQ(m.push("abc ST").text, "abc ");
  auto r = m.push("OX");
  EXPECT_EQ(r.text, "STOX");
  EXPECT_FALSE(r.stopped);
  r = m.push("yz\n");
  EXPECT_EQ(r.text, "yz");
  r = m.push("\nrest");
  EXPECT_TRUE(r.stopped);
  EXPECT_EQ(r.text, "");
  EXPECT_TRUE(m.push("more").stopped);
  StopMatcher n({"END"});
  n.push("xE");
  EXPECT_EQ(n.flush(), "E");
  StopMatcher none({});
  EXPECT_EQ(none.push("anything").text, "anything");
}

}  // namespace
}  // namespace dsv4::test
