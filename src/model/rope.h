// Partial, interleaved rotary position embedding with optional YaRN (model-spec §3.2).
//
// Only the last `n_rot` dims of a vector rotate; pairs are adjacent (x[2j], x[2j+1]) and rotate as the complex
// number a + i*b by angle pos * omega_j. One frequency table per layer kind: sliding layers use plain
// theta^(-2j/n_rot); compressed layers (ratio > 0) use the compressed theta blended with YaRN. YaRN here has no
// magnitude scaling (cos/sin are not multiplied by 0.1 ln(s) + 1), as the reference forces attention_factor=1.
//
// Angles are formed in double (pos * omega in double, then cos/sin in double, rounded to float once): the same
// position always gives the same float cos/sin, so chunked and whole prefill see bit-identical rotations.
#pragma once

#include <cstdint>
#include <vector>

namespace dsv4 {

struct ModelConfig;

struct RopeYarn {
  double factor = 1.0;          // frequency divisor for the slow pairs (16 for V4); <= 1 disables YaRN
  double orig_ctx = 65536.0;    // original_max_position_embeddings
  double beta_fast = 32.0;
  double beta_slow = 1.0;
};

// Per-pair angular frequencies omega_j, j in [0, n_rot/2).
struct RopeFreqs {
  int n_rot = 0;
  std::vector<double> omega;
};

// Plain table: omega_j = theta^(-2j/n_rot).
RopeFreqs rope_freqs_plain(double theta, int n_rot);
// YaRN table (model-spec §3.2): corr(r) = n_rot ln(orig/(2 pi r)) / (2 ln theta), low = max(floor(corr(beta_fast)),
// 0), high = min(ceil(corr(beta_slow)), n_rot-1), ramp_j = clamp((j-low)/(high-low), 0, 1),
// omega_j = omega0_j/factor * ramp_j + omega0_j * (1 - ramp_j).
RopeFreqs rope_freqs_yarn(double theta, int n_rot, const RopeYarn& y);
// The table of layer `layer`: plain rope_theta for ratio 0, compressed theta + YaRN for ratio > 0.
RopeFreqs rope_freqs_for_layer(const ModelConfig& c, int layer);

// cos/sin of pos * omega_j for every pair: cs[2j] = cos, cs[2j+1] = sin. cs has n_rot floats.
void rope_cos_sin(const RopeFreqs& f, int64_t pos, float* cs);

// Rotates the last n_rot dims of x (length len) in place by the angles in cs (from rope_cos_sin). inverse=true
// rotates by the negated angle (the output de-rotation of model-spec §6.6).
void rope_rotate(float* x, int len, int n_rot, const float* cs, bool inverse = false);

}  // namespace dsv4
