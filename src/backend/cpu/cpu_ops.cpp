#include "backend/cpu/cpu_ops.h"

#include <cmath>

namespace dsv4::cpu {

float sigmoid(float x) { return 1.f / (1.f + std::exp(-x)); }

float silu(float x) { return x / (1.f + std::exp(-x)); }

float sqrt_softplus(float z) {
  float sp;
  if (z > 20.f) {
    sp = z;  // log1p(e^z) == z to fp32 precision here
  } else if (z < -20.f) {
    sp = std::exp(z);  // log1p(e^z) ~= e^z for tiny e^z
  } else {
    sp = std::log1p(std::exp(z));
  }
  return std::sqrt(sp);
}

float swiglu_clamped(float gate, float up, float limit) {
  // Upper clamp only on the gate, symmetric clamp on the up projection (model-spec §3.3).
  float g = std::fmin(gate, limit);
  float u = std::fmax(std::fmin(up, limit), -limit);
  return silu(g) * u;
}

static void col_normalize(float* C, int n, float eps) {
  for (int o = 0; o < n; ++o) {
    float s = 0.f;
    for (int i = 0; i < n; ++i) s += C[i * n + o];
    float inv = 1.f / (s + eps);
    for (int i = 0; i < n; ++i) C[i * n + o] *= inv;
  }
}

void sinkhorn(float* C, int n, int iters, float eps) {
  for (int i = 0; i < n; ++i) {
    float* row = C + i * n;
    float mx = row[0];
    for (int o = 1; o < n; ++o) mx = std::fmax(mx, row[o]);
    float s = 0.f;
    for (int o = 0; o < n; ++o) {
      row[o] = std::exp(row[o] - mx);
      s += row[o];
    }
    for (int o = 0; o < n; ++o) row[o] = row[o] / s + eps;
  }
  col_normalize(C, n, eps);
  for (int it = 1; it < iters; ++it) {
    for (int i = 0; i < n; ++i) {
      float* row = C + i * n;
      float s = 0.f;
      for (int o = 0; o < n; ++o) s += row[o];
      float inv = 1.f / (s + eps);
      for (int o = 0; o < n; ++o) row[o] *= inv;
    }
    col_normalize(C, n, eps);
  }
}

void hc_split(const float* mix, const float* base, const float* scale, int n, int iters, float eps, float* pre,
              float* post, float* comb) {
  for (int i = 0; i < n; ++i) pre[i] = sigmoid(mix[i] * scale[0] + base[i]) + eps;
  for (int o = 0; o < n; ++o) post[o] = 2.f * sigmoid(mix[n + o] * scale[1] + base[n + o]);
  for (int j = 0; j < n * n; ++j) comb[j] = mix[2 * n + j] * scale[2] + base[2 * n + j];
  sinkhorn(comb, n, iters, eps);
}

void route_weights(const float* scores, const int32_t* ids, int k, float scale, float* weights) {
  // No epsilon on the sum (reference, model-spec §16.5): scores are sqrt(softplus) > 0 for finite logits.
  float s = 0.f;
  for (int j = 0; j < k; ++j) s += scores[ids[j]];
  for (int j = 0; j < k; ++j) weights[j] = scores[ids[j]] / s * scale;
}

void route_topk(const float* scores, const float* bias, int E, int k, float scale, int32_t* ids, float* weights) {
  // Selection sort over k picks: E <= 384 and k = 6, and it gives a fixed tie rule (lower id wins).
  for (int j = 0; j < k; ++j) {
    int best = -1;
    float best_v = 0.f;
    for (int e = 0; e < E; ++e) {
      bool taken = false;
      for (int q = 0; q < j; ++q) taken |= (ids[q] == e);
      if (taken) continue;
      float v = scores[e] + (bias ? bias[e] : 0.f);
      if (best < 0 || v > best_v) {
        best = e;
        best_v = v;
      }
    }
    ids[j] = best;
  }
  route_weights(scores, ids, k, scale, weights);
}

}  // namespace dsv4::cpu
