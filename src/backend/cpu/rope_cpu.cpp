// RoPE tables and rotation (model-spec §3.2); see model/rope.h for the conventions. Lives in the CPU backend
// library because the backend's attention ops rotate with it; rope_freqs_for_layer (config-dependent) stays in
// src/model/rope.cpp.
#include <algorithm>
#include <cmath>

#include "common/error.h"
#include "model/rope.h"

namespace dsv4 {

RopeFreqs rope_freqs_plain(double theta, int n_rot) {
  if (n_rot <= 0 || n_rot % 2 != 0) fail("rope: rotary dims must be a positive even number, got %d", n_rot);
  if (!(theta > 1.0)) fail("rope: theta must be > 1, got %g", theta);
  RopeFreqs f;
  f.n_rot = n_rot;
  f.omega.resize(size_t(n_rot / 2));
  for (int j = 0; j < n_rot / 2; ++j) f.omega[size_t(j)] = std::pow(theta, -2.0 * j / n_rot);
  return f;
}

RopeFreqs rope_freqs_yarn(double theta, int n_rot, const RopeYarn& y) {
  RopeFreqs f = rope_freqs_plain(theta, n_rot);
  if (y.factor <= 1.0) return f;
  // The pair index whose wavelength completes r turns over the original context.
  auto corr = [&](double r) { return n_rot * std::log(y.orig_ctx / (2.0 * M_PI * r)) / (2.0 * std::log(theta)); };
  double low = std::max(std::floor(corr(y.beta_fast)), 0.0);
  double high = std::min(std::ceil(corr(y.beta_slow)), double(n_rot - 1));
  if (high == low) high += 0.001;  // avoid a zero-width ramp
  for (int j = 0; j < n_rot / 2; ++j) {
    double ramp = std::clamp((j - low) / (high - low), 0.0, 1.0);
    double w0 = f.omega[size_t(j)];
    f.omega[size_t(j)] = w0 / y.factor * ramp + w0 * (1.0 - ramp);
  }
  return f;
}

void rope_cos_sin(const RopeFreqs& f, int64_t pos, float* cs) {
  for (int j = 0; j < f.n_rot / 2; ++j) {
    double a = double(pos) * f.omega[size_t(j)];
    cs[2 * j] = float(std::cos(a));
    cs[2 * j + 1] = float(std::sin(a));
  }
}

void rope_rotate(float* x, int len, int n_rot, const float* cs, bool inverse) {
  float* t = x + (len - n_rot);
  for (int j = 0; j < n_rot / 2; ++j) {
    float c = cs[2 * j], s = inverse ? -cs[2 * j + 1] : cs[2 * j + 1];
    float a = t[2 * j], b = t[2 * j + 1];
    t[2 * j] = a * c - b * s;
    t[2 * j + 1] = a * s + b * c;
  }
}

}  // namespace dsv4
