// Known-answer blocks: bytes written by hand from the layout description (model-spec §13.4, performance.md
// §4), expected floats computed by hand in the comments. Every expected value is exactly representable and
// every dequantizer step is exact for these inputs (small integers times powers of two), so comparisons are
// exact.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "quant/quant.h"

using namespace dsv4;

namespace {

std::vector<float> deq(QType t, const void* blocks, int64_t n) {
  std::vector<float> out(static_cast<size_t>(n), -999.0f);
  dequantize_row(t, blocks, out.data(), n);
  return out;
}

constexpr uint16_t kF16One = 0x3C00;   // 1.0
constexpr uint16_t kF16Half = 0x3800;  // 0.5

}  // namespace

TEST(KnownAnswer, Q8_0) {
  block_q8_0 b{};
  b.d = kF16Half;
  b.qs[0] = 2;     // 0.5 * 2
  b.qs[1] = -3;    // 0.5 * -3
  b.qs[31] = 127;  // 0.5 * 127
  const auto y = deq(QType::Q8_0, &b, 32);
  EXPECT_EQ(y[0], 1.0f);
  EXPECT_EQ(y[1], -1.5f);
  EXPECT_EQ(y[2], 0.0f);
  EXPECT_EQ(y[31], 63.5f);
}

TEST(KnownAnswer, Q4_K) {
  block_q4_K b{};
  b.d = kF16One;
  b.dmin = kF16Half;
  // Sub-block 0: sc = s[0]&63 = 2, m = s[4]&63 = 3. s[0] also carries bits 4-5 of sub-block 4's scale (01).
  b.scales[0] = 2 | (1 << 6);
  b.scales[4] = 3;
  // Sub-block 1: sc = s[1]&63 = 1, m = s[5]&63 = 4.
  b.scales[1] = 1;
  b.scales[5] = 4;
  // Sub-block 4: sc = (s[8]&15) | (s[0]>>6)<<4 = 1 | 16 = 17; m = (s[8]>>4) | (s[4]>>6)<<4 = 2.
  b.scales[8] = 0x21;
  // Sub-block 5: sc = (s[9]&15) | (s[1]>>6)<<4 = 0; m = (s[9]>>4) | (s[5]>>6)<<4 = 5.
  b.scales[9] = 0x50;
  b.qs[0] = 0x75;   // element 0 (low nibble, sub-block 0) q=5; element 32 (high, sub-block 1) q=7
  b.qs[64] = 0x03;  // chunk 2: element 128 (sub-block 4) q=3; element 160 (sub-block 5) q=0
  const auto y = deq(QType::Q4_K, &b, 256);
  EXPECT_EQ(y[0], 1 * 2 * 5 - 0.5f * 3);   // 8.5
  EXPECT_EQ(y[1], -1.5f);                  // q = 0: only the min term
  EXPECT_EQ(y[32], 1 * 1 * 7 - 0.5f * 4);  // 5
  EXPECT_EQ(y[33], -2.0f);
  EXPECT_EQ(y[128], 1 * 17 * 3 - 0.5f * 2);  // 50
  EXPECT_EQ(y[160], -2.5f);                  // 0 - 0.5 * 5
  EXPECT_EQ(y[255], 0.0f);                   // sub-block 7: all-zero scale and min bytes
}

TEST(KnownAnswer, Q2_K) {
  block_q2_K b{};
  b.d = kF16One;
  b.dmin = kF16Half;
  // Value 0: half 0, shift 0, byte 0, scale index 0. Value 32: shift 2 (s=1), byte 0, scale index 2.
  b.qs[0] = 0b00001011;  // value 0 q=3, value 32 q=2
  b.scales[0] = 0x21;    // scale 1, min 2
  b.scales[2] = 0x03;    // scale 3, min 0
  // Value 16: byte 16, shift 0, scale index 1.
  b.scales[1] = 0x10;  // scale 0, min 1
  // Value 244 = 128 + 3*32 + 20: half 1, shift 6, byte 32+20, scale index 8 + 6 + 1 = 15.
  b.qs[52] = 0b11000000;
  b.scales[15] = 0xF2;  // scale 2, min 15
  const auto y = deq(QType::Q2_K, &b, 256);
  EXPECT_EQ(y[0], 1 * 1 * 3 - 0.5f * 2);  // 2
  EXPECT_EQ(y[1], -1.0f);                 // q = 0 in the same sub-block
  EXPECT_EQ(y[32], 1 * 3 * 2 - 0.0f);     // 6
  EXPECT_EQ(y[16], -0.5f);
  EXPECT_EQ(y[244], 1 * 2 * 3 - 0.5f * 15);  // -1.5
  EXPECT_EQ(y[240], -7.5f);                  // same sub-block, q = 0
  EXPECT_EQ(y[100], 0.0f);
}

TEST(KnownAnswer, IQ2_XXS) {
  block_iq2_xxs b{};
  b.d = kF16One;
  // Group 0: a0 = grid indices {1, 2, 0, 0}; a1 = sign codes {1, 0, 0, 0}, ls = 3.
  // grid[1] = 0x080808080808082b -> element 0 = 43, elements 1..7 = 8.
  // grid[2] = 0x0808080808081919 -> elements 0,1 = 25, the rest 8.  grid[0] = all 8.
  // Sign code 1 -> element 0 negative; one negative is odd parity, so element 7 is negative too.
  // Group scale: 1.0 * (0.5 + 3) * 0.25 = 0.875.
  const uint32_t a0 = 0x00000201u, a1 = 0x30000001u;
  b.qs[0] = uint16_t(a0 & 0xFFFF);
  b.qs[1] = uint16_t(a0 >> 16);
  b.qs[2] = uint16_t(a1 & 0xFFFF);
  b.qs[3] = uint16_t(a1 >> 16);
  // Group 1 left all-zero: grid[0], no signs, ls = 0 -> every value is 8 * 0.125 = 1.
  const auto y = deq(QType::IQ2_XXS, &b, 256);
  EXPECT_EQ(y[0], -43 * 0.875f);
  for (int k = 1; k < 7; ++k) EXPECT_EQ(y[k], 7.0f) << k;
  EXPECT_EQ(y[7], -7.0f);
  EXPECT_EQ(y[8], 25 * 0.875f);
  EXPECT_EQ(y[9], 25 * 0.875f);
  EXPECT_EQ(y[10], 7.0f);
  EXPECT_EQ(y[31], 7.0f);
  for (int i = 32; i < 64; ++i) EXPECT_EQ(y[i], 1.0f) << i;
}

TEST(KnownAnswer, MXFP4) {
  block_mxfp4 b{};
  b.e = 128;              // scale 2^(128-127) = 2
  b.qs[0] = 0x9 | 0x70;   // element 0: code 9 = -0.5; element 16: code 7 = 6
  b.qs[15] = 0x5 | 0xC0;  // element 15: code 5 = 3; element 31: code 12 = -2
  const auto y = deq(QType::MXFP4, &b, 32);
  EXPECT_EQ(y[0], -1.0f);
  EXPECT_EQ(y[16], 12.0f);
  EXPECT_EQ(y[15], 6.0f);
  EXPECT_EQ(y[31], -4.0f);
  EXPECT_EQ(y[1], 0.0f);
  b.e = 0;  // 2^-127
  const auto z = deq(QType::MXFP4, &b, 32);
  EXPECT_EQ(z[16], 6.0f * std::ldexp(1.0f, -127));
}

TEST(KnownAnswer, Q8_K) {
  block_q8_K b{};
  b.d = 0.25f;
  b.qs[0] = -4;
  b.qs[255] = 8;
  const auto y = deq(QType::Q8_K, &b, 256);
  EXPECT_EQ(y[0], -1.0f);
  EXPECT_EQ(y[255], 2.0f);
}

TEST(KnownAnswer, PlainTypes) {
  const uint16_t h[2] = {0x3C00, 0xC100};  // 1, -2.5
  auto y = deq(QType::F16, h, 2);
  EXPECT_EQ(y[0], 1.0f);
  EXPECT_EQ(y[1], -2.5f);
  const uint16_t bf[2] = {0x4040, 0xBF00};  // 3, -0.5
  y = deq(QType::BF16, bf, 2);
  EXPECT_EQ(y[0], 3.0f);
  EXPECT_EQ(y[1], -0.5f);
  const uint8_t f8[3] = {0x38, 0xC0, 0x7E};  // 1, -2, 448
  y = deq(QType::FP8_E4M3, f8, 3);
  EXPECT_EQ(y[0], 1.0f);
  EXPECT_EQ(y[1], -2.0f);
  EXPECT_EQ(y[2], 448.0f);
}

TEST(KnownAnswer, Q8_0QuantizeMatchesGgmlRule) {
  // ggml: d = amax/127 (stored f16), q = round(x * 127/amax) with halves away from zero.
  // x = [127, -63.5, 0.5, ...]: amax 127 -> d = 1, q = [127, -64 (half away), 1 (0.5 -> 1), 0...].
  float x[32] = {127.0f, -63.5f, 0.5f};
  block_q8_0 b;
  quantize_row(QType::Q8_0, x, &b, 32);
  EXPECT_EQ(b.d, kF16One);
  EXPECT_EQ(b.qs[0], 127);
  EXPECT_EQ(b.qs[1], -64);
  EXPECT_EQ(b.qs[2], 1);
  EXPECT_EQ(b.qs[3], 0);
}
