// Attention primitives against hand-computed values: RoPE/YaRN tables and rotation (model-spec §3.2), the QAT
// round trips (§3.4), indexer top-k selection and the visibility rules of §6.10.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "model/attention_qat.h"
#include "model/config.h"
#include "model/indexer.h"
#include "model/rope.h"

namespace dsv4 {
namespace {

TEST(AttentionRope, PlainTableIsThetaPowers) {
  RopeFreqs f = rope_freqs_plain(10000.0, 64);
  ASSERT_EQ(f.omega.size(), 32u);
  // omega_j = 10000^(-j/32): j=0 -> 1, j=16 -> 10000^-0.5 = 0.01, j=8 -> 10000^-0.25 = 0.1.
  // Tolerance 1e-15 relative: pow in double.
  EXPECT_DOUBLE_EQ(f.omega[0], 1.0);
  EXPECT_NEAR(f.omega[16], 0.01, 1e-15);
  EXPECT_NEAR(f.omega[8], 0.1, 1e-15);
}

TEST(AttentionRope, FlashYarnTableMatchesSpecReferenceValues) {
  ModelConfig c = ModelConfig::flash();
  RopeFreqs f = rope_freqs_for_layer(c, 2);  // a CSA layer: theta 160000 + YaRN
  ASSERT_EQ(f.omega.size(), 32u);
  // model-spec §3.2 reference values, printed there to 3-5 significant digits: each is checked to half a unit
  // of its last printed digit.
  struct Ref { int j; double w, half_ulp; };
  const Ref ref[] = {{0, 1.0, 5e-5},          {1, 0.6877, 5e-5},        {2, 0.4729, 5e-5},
                     {15, 0.0036355, 5e-8},   {16, 0.0022656, 5e-8},    {25, 5.37e-6, 5e-9},
                     {31, 5.68e-7, 5e-10}};
  for (const Ref& r : ref) EXPECT_NEAR(f.omega[size_t(r.j)], r.w, r.half_ulp) << "pair " << r.j;
  // Ramp by hand: low = 15, high = 25 (§1.3). Pair 20 is half-way: omega0 * (0.5/16 + 0.5).
  double w0 = std::pow(160000.0, -40.0 / 64.0);
  EXPECT_NEAR(f.omega[20], w0 * (0.5 / 16.0 + 0.5), 1e-15);
  // Sliding layer 0: plain theta 10000, no YaRN.
  RopeFreqs s = rope_freqs_for_layer(c, 0);
  EXPECT_NEAR(s.omega[31], std::pow(10000.0, -62.0 / 64.0), 1e-18);
}

TEST(AttentionRope, RotatesAdjacentPairsOfTheTail) {
  RopeFreqs f;
  f.n_rot = 4;
  f.omega = {1.0, 0.5};
  std::vector<float> cs(4);
  rope_cos_sin(f, 3, cs.data());
  // x = [head 2 dims untouched | (1, 2) rotated by 3 rad | (3, -1) rotated by 1.5 rad]
  std::vector<float> x = {7.f, 8.f, 1.f, 2.f, 3.f, -1.f};
  rope_rotate(x.data(), 6, 4, cs.data());
  // Tolerance 1e-6 absolute: float rounding of cos/sin and one multiply-add on O(1) values.
  EXPECT_EQ(x[0], 7.f);
  EXPECT_EQ(x[1], 8.f);
  EXPECT_NEAR(x[2], 1 * std::cos(3.0) - 2 * std::sin(3.0), 1e-6);
  EXPECT_NEAR(x[3], 1 * std::sin(3.0) + 2 * std::cos(3.0), 1e-6);
  EXPECT_NEAR(x[4], 3 * std::cos(1.5) + 1 * std::sin(1.5), 1e-6);
  EXPECT_NEAR(x[5], 3 * std::sin(1.5) - 1 * std::cos(1.5), 1e-6);
  // The inverse rotation undoes it (to float rounding, 1e-6).
  rope_rotate(x.data(), 6, 4, cs.data(), /*inverse=*/true);
  const float orig[] = {7.f, 8.f, 1.f, 2.f, 3.f, -1.f};
  for (int i = 0; i < 6; ++i) EXPECT_NEAR(x[size_t(i)], orig[i], 1e-6) << i;
}

TEST(AttentionQat, E4m3RoundingByHand) {
  EXPECT_EQ(e4m3_round(448.f), 448.f);
  EXPECT_EQ(e4m3_round(0.3f), 0.3125f);       // [0.25, 0.5): step 2^-5, 9.6 steps -> 10
  EXPECT_EQ(e4m3_round(17.f), 16.f);          // [16, 32): step 2, 8.5 -> tie to even 8
  EXPECT_EQ(e4m3_round(19.f), 20.f);          // 9.5 -> tie to even 10
  EXPECT_EQ(e4m3_round(-440.f), -448.f);      // [256, 512): step 32, 13.75 -> 14
  EXPECT_EQ(e4m3_round(0.001f), 0x1p-9f);     // subnormal step 2^-9: 0.512 -> 1
  EXPECT_EQ(e4m3_round(0x1p-10f), 0.f);       // exactly half the smallest subnormal: tie to even 0
  EXPECT_EQ(e4m3_round(0x1.4p-6f), 0x1.4p-6f);  // 1.25 * 2^-6 is representable (mantissa 010)
}

TEST(AttentionQat, E2m1RoundingByHand) {
  const std::pair<float, float> cases[] = {{0.25f, 0.f}, {0.75f, 1.f}, {1.25f, 1.f}, {1.75f, 2.f}, {2.5f, 2.f},
                                           {3.5f, 4.f},  {5.f, 4.f},   {5.1f, 6.f},  {-2.6f, -3.f}, {6.f, 6.f},
                                           {0.3f, 0.5f}};
  for (auto [in, out] : cases) EXPECT_EQ(e2m1_round(in), out) << in;
}

TEST(AttentionQat, Fp8BlockScaleByHand) {
  // One block with amax 1: s = 2^ceil(log2(1/448)) = 2^-8, so x/s = 256 x.
  // 1.0 -> 256 (exact) -> 1.0; 0.3 -> 76.8 -> step 8 in [64,128) -> 80 -> 0.3125; -0.01 -> -2.56 -> step 0.25
  // -> -2.5 -> -0.009765625.
  std::vector<float> x = {1.0f, 0.3f, -0.01f};
  qat_fp8_blocks(x.data(), 3, 64);
  EXPECT_EQ(x[0], 1.0f);
  EXPECT_EQ(x[1], 0.3125f);
  EXPECT_EQ(x[2], -0.009765625f);
  // Blocks are independent: the second block (amax 448 * 2^-3... here 56) gets its own scale 2^-3.
  std::vector<float> y(66, 0.0f);
  y[0] = 1.0f;
  y[64] = 56.0f;
  y[65] = 0.3f;  // 0.3 / 2^-3 = 2.4 -> step 0.25 in [2,4) -> 2.5 -> 0.3125
  qat_fp8_blocks(y.data(), 66, 64);
  EXPECT_EQ(y[64], 56.0f);
  EXPECT_EQ(y[65], 0.3125f);
}

TEST(AttentionQat, HadamardSylvesterOrder) {
  std::vector<float> x = {1.f, 2.f, 3.f, 4.f};
  hadamard_orthonormal(x.data(), 4);
  // Rows of H4 (Sylvester): ++++, +-+-, ++--, +--+; scaled by 1/2.
  EXPECT_EQ(x[0], 5.f);
  EXPECT_EQ(x[1], -1.f);
  EXPECT_EQ(x[2], -2.f);
  EXPECT_EQ(x[3], 0.f);
}

TEST(AttentionQat, Fp4IndexerRowByHand) {
  // e_0 of length 32 -> Hadamard gives 1/sqrt(32) = 0.17678 everywhere; amax/6 = 0.02946 -> s = 2^-5;
  // 0.17678 * 32 = 5.657 -> e2m1 step 2 in [4,6] -> 6 -> 6/32 = 0.1875.
  std::vector<float> x(32, 0.0f);
  x[0] = 1.0f;
  qat_fp4_indexer_row(x.data(), 32);
  for (int i = 0; i < 32; ++i) EXPECT_EQ(x[size_t(i)], 0.1875f) << i;
}

TEST(AttentionIndexer, TopKPicksHighestAscendingWithLowerRowOnTies) {
  const float scores[] = {0.5f, 3.f, -1.f, 3.f, 2.f, 0.f};
  int32_t sel[3] = {-1, -1, -1};
  ASSERT_EQ(indexer_top_k(scores, 6, 3, sel), 3);
  EXPECT_EQ(sel[0], 1);
  EXPECT_EQ(sel[1], 3);
  EXPECT_EQ(sel[2], 4);
  // Ties at the cut: rows 1 and 3 tie; with k = 1 the lower row wins.
  ASSERT_EQ(indexer_top_k(scores, 6, 1, sel), 1);
  EXPECT_EQ(sel[0], 1);
  // Only the visible prefix competes: with 3 visible rows row 3 cannot be chosen.
  ASSERT_EQ(indexer_top_k(scores, 3, 2, sel), 2);
  EXPECT_EQ(sel[0], 0);
  EXPECT_EQ(sel[1], 1);
  // Fewer visible rows than k: all of them, scores unread.
  ASSERT_EQ(indexer_top_k(nullptr, 2, 5, sel), 2);
  EXPECT_EQ(sel[0], 0);
  EXPECT_EQ(sel[1], 1);
  EXPECT_EQ(indexer_top_k(nullptr, 0, 5, sel), 0);
}

TEST(AttentionIndexer, VisibilityWorkedExamples) {
  // model-spec §6.10. CSA m=4: row 0 closes at p=3 and is visible to p=3; p=10 sees rows {0,1}.
  EXPECT_EQ(compressed_visible(2, 4), 0);
  EXPECT_EQ(compressed_visible(3, 4), 1);
  EXPECT_EQ(compressed_visible(6, 4), 1);
  EXPECT_EQ(compressed_visible(7, 4), 2);
  EXPECT_EQ(compressed_visible(10, 4), 2);
  EXPECT_EQ(window_first(10, 128), 0);  // window tokens 0..10 (11 rows)
  // HCA m=128: rows at p = 127, 255; p=300 sees rows {0,1} and window tokens 173..300.
  EXPECT_EQ(compressed_visible(126, 128), 0);
  EXPECT_EQ(compressed_visible(127, 128), 1);
  EXPECT_EQ(compressed_visible(300, 128), 2);
  EXPECT_EQ(window_first(300, 128), 173);
  // CSA at p = 1,048,575: 262,144 visible rows.
  EXPECT_EQ(compressed_visible(1048575, 4), 262144);
}

}  // namespace
}  // namespace dsv4
