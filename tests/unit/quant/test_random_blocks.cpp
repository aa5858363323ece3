// Random blocks dequantized by an independent numpy implementation of the layouts
// (gen_random_blocks.py -> random_blocks.inc). Both sides evaluate the same float32 expression in the same
// order, so values must match bit for bit; random scale bytes exercise every packed-scale bit (Q4_K high
// bits, Q2_K min nibbles, IQ2_XXS sign parity) that the hand-built blocks only sample.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "quant/quant.h"

using namespace dsv4;

namespace {

struct RandomCase {
  QType type;
  int64_t n;
  std::vector<uint8_t> bytes;
  std::vector<uint32_t> expect_bits;
};

const std::vector<RandomCase>& cases() {
  static const std::vector<RandomCase> c = {
#include "random_blocks.inc"
  };
  return c;
}

}  // namespace

TEST(RandomBlocks, DequantizeMatchesIndependentReference) {
  ASSERT_EQ(cases().size(), 6u);
  for (const RandomCase& c : cases()) {
    ASSERT_EQ(int64_t(c.bytes.size()), row_bytes(c.type, c.n)) << qtype_name(c.type);
    std::vector<float> y(static_cast<size_t>(c.n));
    dequantize_row(c.type, c.bytes.data(), y.data(), c.n);
    for (int64_t i = 0; i < c.n; ++i) {
      uint32_t got;
      std::memcpy(&got, &y[size_t(i)], 4);
      ASSERT_EQ(got, c.expect_bits[size_t(i)])
          << qtype_name(c.type) << " value " << i << " = " << y[size_t(i)];
    }
  }
}

TEST(RandomBlocks, DotOfRandomBlocksAgreesAcrossLevels) {
  // The same random weight blocks through vec_dot at every SIMD level vs the scalar kernel; tolerance
  // 1e-5 * sum|w*x| (f32 summation order only, see test_dot.cpp).
  const SimdLevel saved = simd_level();
  for (const RandomCase& c : cases()) {
    if (c.type == QType::FP8_E4M3) continue;  // n = 254 is not a block multiple of any activation format
    std::vector<float> x(static_cast<size_t>(c.n)), w(static_cast<size_t>(c.n));
    for (int64_t i = 0; i < c.n; ++i) x[size_t(i)] = float((i * 7919) % 201 - 100) / 37.0f;
    std::vector<uint8_t> xq(static_cast<size_t>(activation_bytes(c.type, c.n)));
    quantize_activation(c.type, x.data(), xq.data(), c.n);
    dequantize_row(c.type, c.bytes.data(), w.data(), c.n);
    double mag = 0;
    for (int64_t i = 0; i < c.n; ++i) mag += std::abs(double(w[size_t(i)]) * x[size_t(i)]);
    set_simd_level(SimdLevel::Scalar);
    const float ref = vec_dot(c.type, c.bytes.data(), xq.data(), c.n);
    for (int l = 1; l <= int(simd_supported()); ++l) {
      set_simd_level(SimdLevel(l));
      EXPECT_NEAR(vec_dot(c.type, c.bytes.data(), xq.data(), c.n), ref, 1e-5 * mag)
          << qtype_name(c.type) << " " << simd_name(SimdLevel(l));
    }
  }
  set_simd_level(saved);
}
