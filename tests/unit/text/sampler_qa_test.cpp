// QA-pass regression: sampling parameters that cannot be meant are refused with a message naming them.
#include <gtest/gtest.h>

#include <cmath>
#include <string>

#include "common/error.h"
#include "dsv4/text.h"

namespace dsv4::test {
namespace {

// Was: --temp 1e39 (inf as a float) was accepted and sampled uniformly from the whole vocabulary.
TEST(SamplerQa, InfiniteTemperatureIsRefused) {
  for (float t : {INFINITY, -INFINITY}) {
    SamplingParams p;
    p.temperature = t;
    try {
      Sampler s(p);
      ADD_FAILURE() << "temperature " << t << " accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("temperature"), std::string::npos) << e.what();
    }
  }
  SamplingParams ok;
  ok.temperature = 1e30f;  // huge but finite stays legal
  EXPECT_NO_THROW(Sampler{ok});
}

}  // namespace
}  // namespace dsv4::test
