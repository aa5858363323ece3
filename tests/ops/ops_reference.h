// CPU twins of the small CUDA ops, written from model-spec §3-4 independently of the kernels. They are the
// oracle for the parity tests until the CPU backend (src/backend/cpu) exposes the same ops; each states where
// its numerics deliberately mirror the kernel (so a test can be exact) and where they do not.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

namespace dsv4::test {

// RMSNorm with a double accumulator (the reference the fp32 GPU tree sum is compared against).
inline void rms_norm_ref(const float* x, const float* w, int64_t rows, int n, float eps, float* y) {
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int i = 0; i < n; ++i) ss += double(x[r * n + i]) * double(x[r * n + i]);
    const double scale = 1.0 / std::sqrt(ss / n + double(eps));
    for (int i = 0; i < n; ++i) y[r * n + i] = float(double(x[r * n + i]) * scale * (w ? double(w[i]) : 1.0));
  }
}

// RoPE frequencies from model-spec §3.2 (plain when yarn_factor <= 1).
inline std::vector<double> rope_omega_ref(double theta, int n_rot, double yarn_factor, double orig_ctx,
                                          double beta_fast, double beta_slow) {
  std::vector<double> om(size_t(n_rot / 2));
  for (int j = 0; j < n_rot / 2; ++j) om[size_t(j)] = std::pow(theta, -2.0 * j / n_rot);
  if (yarn_factor <= 1.0) return om;
  auto corr = [&](double r) { return n_rot * std::log(orig_ctx / (2.0 * M_PI * r)) / (2.0 * std::log(theta)); };
  const double low = std::max(std::floor(corr(beta_fast)), 0.0);
  double high = std::min(std::ceil(corr(beta_slow)), double(n_rot - 1));
  if (high == low) high += 0.001;
  for (int j = 0; j < n_rot / 2; ++j) {
    const double ramp = std::clamp((j - low) / (high - low), 0.0, 1.0);
    om[size_t(j)] = om[size_t(j)] / yarn_factor * ramp + om[size_t(j)] * (1.0 - ramp);
  }
  return om;
}

// Rotates the last n_rot dims of each [head_dim] vector: angle in double, cos/sin rounded to float once, the
// complex product in float without contraction (as the kernel), so results can match bitwise.
inline void rope_ref(float* x, const int64_t* pos, int64_t n_tokens, int n_heads, int head_dim, int n_rot,
                     const std::vector<double>& omega, bool inverse) {
  for (int64_t t = 0; t < n_tokens; ++t)
    for (int h = 0; h < n_heads; ++h) {
      float* v = x + (t * n_heads + h) * head_dim + (head_dim - n_rot);
      for (int j = 0; j < n_rot / 2; ++j) {
        const double a = double(pos[t]) * omega[size_t(j)];
        const float c = float(std::cos(a)), s = inverse ? -float(std::sin(a)) : float(std::sin(a));
        volatile float ac = v[2 * j] * c, bs = v[2 * j + 1] * s, as = v[2 * j] * s, bc = v[2 * j + 1] * c;
        v[2 * j] = ac - bs;
        v[2 * j + 1] = as + bc;
      }
    }
}

// HC split + Sinkhorn of one token, model-spec §4 steps 3-7, in float in the spec's loop order.
inline void hc_sinkhorn_ref(const float* mix, const float* base, const float* scale, int iters, float eps,
                            float* pre, float* post, float* comb) {
  constexpr int N = 4;
  auto sig = [](float z) { return 1.0f / (1.0f + std::exp(-z)); };
  for (int i = 0; i < N; ++i) {
    pre[i] = sig(mix[i] * scale[0] + base[i]) + eps;
    post[i] = 2.0f * sig(mix[N + i] * scale[1] + base[N + i]);
  }
  float c[N][N];
  for (int i = 0; i < N; ++i) {
    float m = -INFINITY;
    for (int o = 0; o < N; ++o) m = std::max(m, c[i][o] = mix[2 * N + N * i + o] * scale[2] + base[2 * N + N * i + o]);
    float sum = 0;
    for (int o = 0; o < N; ++o) sum += (c[i][o] = std::exp(c[i][o] - m));
    for (int o = 0; o < N; ++o) c[i][o] = c[i][o] / sum + eps;
  }
  for (int it = 0; it < iters; ++it) {
    if (it > 0)
      for (int i = 0; i < N; ++i) {
        float sum = 0;
        for (int o = 0; o < N; ++o) sum += c[i][o];
        for (int o = 0; o < N; ++o) c[i][o] /= sum + eps;
      }
    for (int o = 0; o < N; ++o) {
      float sum = 0;
      for (int i = 0; i < N; ++i) sum += c[i][o];
      for (int i = 0; i < N; ++i) c[i][o] /= sum + eps;
    }
  }
  std::memcpy(comb, c, sizeof(c));
}

// Top-k under the total order (value desc, index asc), via order-preserving keys as the kernel defines them.
inline uint32_t order_key_ref(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
inline std::vector<int32_t> topk_ref(const float* s, int64_t n, int k) {
  std::vector<int32_t> idx(static_cast<size_t>(n));
  std::iota(idx.begin(), idx.end(), 0);
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int32_t a, int32_t b) {
    const uint32_t ka = order_key_ref(s[a]), kb = order_key_ref(s[b]);
    return ka > kb || (ka == kb && a < b);
  });
  idx.resize(size_t(k));
  return idx;
}

inline void softmax_ref(const float* x, int64_t rows, int64_t n, float scale, double* y) {
  for (int64_t r = 0; r < rows; ++r) {
    double m = -INFINITY, sum = 0;
    for (int64_t i = 0; i < n; ++i) m = std::max(m, double(x[r * n + i]) * scale);
    for (int64_t i = 0; i < n; ++i) sum += std::exp(double(x[r * n + i]) * scale - m);
    for (int64_t i = 0; i < n; ++i) y[r * n + i] = std::exp(double(x[r * n + i]) * scale - m) / sum;
  }
}

}  // namespace dsv4::test
