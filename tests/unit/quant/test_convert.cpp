// Scalar format conversions: hand-computed values, rounding ties, exhaustive round trips, and an independent
// oracle (the CPU's F16C instruction) for f32 -> f16. All comparisons here are exact: these conversions are
// specified bit for bit (IEEE / OCP round-to-nearest-even), so there is no tolerance to state.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define DSV4_TEST_X86 1
#endif
#include <random>

#include "quant/blocks.h"
#include "quant/iq2xxs_tables.h"

using namespace dsv4;

namespace {

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

#if defined(DSV4_TEST_X86)
__attribute__((target("f16c"))) uint16_t hw_f32_to_f16(float f) {
  return uint16_t(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#endif

}  // namespace

TEST(Convert, F16KnownValues) {
  EXPECT_EQ(f16_to_f32(0x3C00), 1.0f);
  EXPECT_EQ(f16_to_f32(0xC000), -2.0f);
  EXPECT_EQ(f16_to_f32(0x7BFF), 65504.0f);
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.0f, -24));     // smallest subnormal
  EXPECT_EQ(f16_to_f32(0x03FF), std::ldexp(1023.0f, -24));  // largest subnormal
  EXPECT_TRUE(std::isinf(f16_to_f32(0x7C00)));
  EXPECT_TRUE(std::isnan(f16_to_f32(0x7E00)));
  EXPECT_EQ(bits(f16_to_f32(0x8000)), 0x80000000u);

  EXPECT_EQ(f32_to_f16(1.0f), 0x3C00);
  EXPECT_EQ(f32_to_f16(1.0f + std::ldexp(1.0f, -11)), 0x3C00);      // tie -> even mantissa 0
  EXPECT_EQ(f32_to_f16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3C02);  // tie between mantissa 1 and 2 -> 2
  EXPECT_EQ(f32_to_f16(65519.0f), 0x7BFF);
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7C00);               // tie between 65504 and 2^16 -> inf
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -25)), 0x0000);  // tie between 0 and 2^-24 -> 0
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0001f, -25)), 0x0001);
  EXPECT_EQ(f32_to_f16(std::ldexp(3.0f, -25)), 0x0002);  // 1.5 quanta -> 2
  EXPECT_EQ(f32_to_f16(-0.0f), 0x8000);
  EXPECT_EQ(f32_to_f16(INFINITY), 0x7C00);
  EXPECT_EQ(f32_to_f16(NAN) & 0x7C00, 0x7C00);
  EXPECT_NE(f32_to_f16(NAN) & 0x03FF, 0);
}

TEST(Convert, F16RoundTripAllCodes) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = f16_to_f32(uint16_t(h));
    if (std::isnan(f)) continue;
    ASSERT_EQ(f32_to_f16(f), h) << "code " << h;
  }
}

#if defined(DSV4_TEST_X86)
TEST(Convert, F16MatchesHardwareF16C) {
  if (!__builtin_cpu_supports("f16c")) GTEST_SKIP() << "CPU has no F16C to compare against";
  std::mt19937 rng(1);
  for (int i = 0; i < 2'000'000; ++i) {
    // Random bit patterns over all exponents (NaNs excluded: payload handling differs by design).
    const float f = from_bits(uint32_t(rng()));
    if (std::isnan(f)) continue;
    ASSERT_EQ(f32_to_f16(f), hw_f32_to_f16(f)) << "bits " << std::hex << bits(f);
  }
  // Dense sweep around the subnormal/normal boundary and the overflow threshold.
  for (uint32_t u = 0x33000000u; u < 0x38900000u; u += 97)
    ASSERT_EQ(f32_to_f16(from_bits(u)), hw_f32_to_f16(from_bits(u)));
  for (uint32_t u = 0x477F0000u; u < 0x47810000u; u += 7)
    ASSERT_EQ(f32_to_f16(from_bits(u)), hw_f32_to_f16(from_bits(u)));
}
#endif

TEST(Convert, BF16) {
  EXPECT_EQ(bf16_to_f32(0x3F80), 1.0f);
  EXPECT_EQ(bf16_to_f32(0xC040), -3.0f);
  EXPECT_EQ(f32_to_bf16(from_bits(0x3F808000u)), 0x3F80);  // tie, even stays
  EXPECT_EQ(f32_to_bf16(from_bits(0x3F818000u)), 0x3F82);  // tie, odd rounds up
  EXPECT_EQ(f32_to_bf16(from_bits(0x3F808001u)), 0x3F81);
  EXPECT_EQ(f32_to_bf16(from_bits(0x7F7FFFFFu)), 0x7F80);  // max float rounds to inf
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(NAN))));
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = bf16_to_f32(uint16_t(h));
    if (std::isnan(f)) continue;
    ASSERT_EQ(f32_to_bf16(f), h);
  }
}

TEST(Convert, Fp8E4M3) {
  EXPECT_EQ(fp8_e4m3_to_f32(0x38), 1.0f);                  // exp 7, mant 0
  EXPECT_EQ(fp8_e4m3_to_f32(0xB9), -1.125f);               // sign, exp 7, mant 1
  EXPECT_EQ(fp8_e4m3_to_f32(0x7E), 448.0f);                // exp 15, mant 6: 1.75 * 2^8
  EXPECT_EQ(fp8_e4m3_to_f32(0x01), std::ldexp(1.0f, -9));  // smallest subnormal
  EXPECT_EQ(fp8_e4m3_to_f32(0x07), 7 * std::ldexp(1.0f, -9));
  EXPECT_EQ(fp8_e4m3_to_f32(0x08), std::ldexp(1.0f, -6));  // smallest normal
  EXPECT_TRUE(std::isnan(fp8_e4m3_to_f32(0x7F)));
  EXPECT_TRUE(std::isnan(fp8_e4m3_to_f32(0xFF)));
  EXPECT_EQ(bits(fp8_e4m3_to_f32(0x80)), 0x80000000u);

  EXPECT_EQ(f32_to_fp8_e4m3(448.0f), 0x7E);
  EXPECT_EQ(f32_to_fp8_e4m3(464.0f), 0x7E);  // would round to 480 (not representable): saturate
  EXPECT_EQ(f32_to_fp8_e4m3(1e9f), 0x7E);
  EXPECT_EQ(f32_to_fp8_e4m3(-INFINITY), 0xFE);
  EXPECT_EQ(f32_to_fp8_e4m3(1.0625f), 0x38);                 // tie between 1 and 1.125 -> even (mant 0)
  EXPECT_EQ(f32_to_fp8_e4m3(1.1875f), 0x3A);                 // tie between 1.125 and 1.25 -> even (mant 2)
  EXPECT_EQ(f32_to_fp8_e4m3(std::ldexp(1.0f, -10)), 0x00);   // half a quantum -> 0
  EXPECT_EQ(f32_to_fp8_e4m3(std::ldexp(3.0f, -10)), 0x02);   // 1.5 quanta -> 2
  EXPECT_EQ(f32_to_fp8_e4m3(std::ldexp(15.0f, -10)), 0x08);  // 7.5 quanta -> 8 = smallest normal
  EXPECT_EQ(f32_to_fp8_e4m3(NAN), 0x7F);
  for (uint32_t b = 0; b < 256; ++b) {
    const float f = fp8_e4m3_to_f32(uint8_t(b));
    if (std::isnan(f)) continue;
    ASSERT_EQ(f32_to_fp8_e4m3(f), b);
  }
}

TEST(Convert, Fp8NearestOverAllInputsBetweenCodes) {
  // Midpoints between neighbouring positive codes must round to the even code; points just off the midpoint
  // must round to the nearer one. Neighbours are enumerated from the decode table, not from the encoder.
  for (uint32_t c = 0; c < 0x7E; ++c) {
    const float lo = fp8_e4m3_to_f32(uint8_t(c)), hi = fp8_e4m3_to_f32(uint8_t(c + 1));
    const float mid = 0.5f * (lo + hi);
    EXPECT_EQ(f32_to_fp8_e4m3(mid), (c & 1) ? c + 1 : c) << "code " << c;
    EXPECT_EQ(f32_to_fp8_e4m3(std::nextafter(mid, 0.0f)), c);
    EXPECT_EQ(f32_to_fp8_e4m3(std::nextafter(mid, 1e9f)), c + 1);
  }
}

TEST(Convert, E8M0) {
  EXPECT_EQ(e8m0_to_f32(127), 1.0f);
  EXPECT_EQ(e8m0_to_f32(128), 2.0f);
  EXPECT_EQ(e8m0_to_f32(120), 1.0f / 128);
  EXPECT_EQ(e8m0_to_f32(254), std::ldexp(1.0f, 127));
  EXPECT_EQ(e8m0_to_f32(0), std::ldexp(1.0f, -127));
  EXPECT_EQ(e8m0_to_f32(1), std::ldexp(1.0f, -126));
  for (int e = 0; e < 255; ++e) EXPECT_EQ(e8m0_to_f32_half(uint8_t(e)), 0.5f * e8m0_to_f32(uint8_t(e))) << e;
  for (int e = 0; e < 255; ++e)
    EXPECT_EQ(f32_to_e8m0(e8m0_to_f32(uint8_t(e))), e) << e;  // powers of two exact
  EXPECT_EQ(f32_to_e8m0(1.4f), 127);
  EXPECT_EQ(f32_to_e8m0(1.6f), 128);
  EXPECT_EQ(f32_to_e8m0(1.5f), 128);   // tie between codes 127 and 128 -> even
  EXPECT_EQ(f32_to_e8m0(3.0f), 128);   // tie between 128 and 129 -> even
  EXPECT_EQ(f32_to_e8m0(0.75f), 126);  // tie between 126 and 127 -> even
  EXPECT_EQ(f32_to_e8m0(-4.0f), 129);  // sign ignored
  EXPECT_EQ(f32_to_e8m0(0.0f), 0);
  EXPECT_EQ(f32_to_e8m0(1e38f * 10.0f), 254);
  EXPECT_EQ(f32_to_e8m0(NAN), 255);
  EXPECT_EQ(f32_to_e8m0(std::ldexp(1.75f, -127)), 1);  // subnormal input above the 1.5 * 2^-127 midpoint
}

TEST(Convert, E2M1) {
  const float expect[16] = {0, .5f, 1, 1.5f, 2, 3, 4, 6, -0.0f, -.5f, -1, -1.5f, -2, -3, -4, -6};
  for (int c = 0; c < 16; ++c) {
    EXPECT_EQ(e2m1_to_f32(uint8_t(c)), expect[c]);
    EXPECT_EQ(f32_to_e2m1(expect[c]), c) << c;  // -0 keeps its sign code 8
  }
  EXPECT_EQ(f32_to_e2m1(0.25f), 0);  // tie 0 / 0.5 -> code 0 (even)
  EXPECT_EQ(f32_to_e2m1(0.26f), 1);
  EXPECT_EQ(f32_to_e2m1(0.75f), 2);  // tie 0.5 / 1 -> code 2
  EXPECT_EQ(f32_to_e2m1(1.25f), 2);  // tie 1 / 1.5 -> code 2
  EXPECT_EQ(f32_to_e2m1(1.75f), 4);  // tie 1.5 / 2 -> code 4
  EXPECT_EQ(f32_to_e2m1(2.5f), 4);   // tie 2 / 3 -> code 4
  EXPECT_EQ(f32_to_e2m1(3.5f), 6);   // tie 3 / 4 -> code 6
  EXPECT_EQ(f32_to_e2m1(5.0f), 6);   // tie 4 / 6 -> code 6
  EXPECT_EQ(f32_to_e2m1(5.01f), 7);
  EXPECT_EQ(f32_to_e2m1(100.0f), 7);  // saturates
  EXPECT_EQ(f32_to_e2m1(-2.6f), 13);
}

TEST(Convert, Iq2Tables) {
  // Spot values of ggml's ksigns_iq2xs table (ggml-common.h), written out by hand from the published table.
  const uint8_t want[][2] = {{0, 0},    {1, 129}, {2, 130},  {3, 3},     {7, 135},  {15, 15},
                             {16, 144}, {63, 63}, {64, 192}, {100, 228}, {127, 255}};
  for (const auto& w : want) EXPECT_EQ(ksigns_iq2xs(w[0]), w[1]) << int(w[0]);
  // Grid: first, last and a middle entry; every byte is one of the three magnitudes.
  EXPECT_EQ(iq2xxs_grid[0], 0x0808080808080808ull);
  EXPECT_EQ(iq2xxs_grid[1], 0x080808080808082bull);
  EXPECT_EQ(iq2xxs_grid[132], 0x1908080808080819ull);  // first entry starting with magnitude 25
  EXPECT_EQ(iq2xxs_grid[255], 0x2b2b2b1908081908ull);
  for (int g = 0; g < 256; ++g)
    for (int k = 0; k < 8; ++k) {
      const int v = int((iq2xxs_grid[g] >> (8 * k)) & 255);
      EXPECT_TRUE(v == 8 || v == 25 || v == 43) << g << " " << k;
    }
}
