// Scalar building blocks of the CPU backend, exposed so tests can check them against hand-computed values and
// the CUDA backend's tests can use them as the reference. All fp32 in / out; the summation order of every
// function is fixed (sequential), so results are reproducible bit for bit.
#pragma once

#include <cstdint>

namespace dsv4::cpu {

float sigmoid(float x);
float silu(float x);
// Router score sqrt(softplus(z)) with ds4's stable branches (z > 20 -> z, z < -20 -> e^z), model-spec §3.3.
float sqrt_softplus(float z);
// Clamped SwiGLU (model-spec §3.3): silu(min(gate, limit)) * clamp(up, -limit, limit).
float swiglu_clamped(float gate, float up, float limit);

// Sinkhorn normalization of the n x n HC combination matrix in place (model-spec §4 step 7): row softmax,
// + eps, column normalize, then (iters - 1) x (row normalize, column normalize). C is row-major, row = input
// stream i, column = output stream o.
void sinkhorn(float* C, int n, int iters, float eps);

// HC control from the raw projection `mix` ((2+n)*n values: pre | post | comb), base (same size) and
// scale (3): fills pre [n], post [n] and comb [n*n] (after Sinkhorn). model-spec §4 steps 3-7.
void hc_split(const float* mix, const float* base, const float* scale, int n, int iters, float eps, float* pre,
              float* post, float* comb);

// Top-k selection of one token (model-spec §7 steps 2-3). scores: E unbiased scores; bias: E selection biases
// (null = none). Picks the k largest (scores + bias), ties to the lower expert id, and writes ids in
// descending biased-score order; weights = scores[id] / sum(selected scores) * scale.
void route_topk(const float* scores, const float* bias, int E, int k, float scale, int32_t* ids, float* weights);
// Hash routing: ids given (tid2eid row); weights from the unbiased scores as above.
void route_weights(const float* scores, const int32_t* ids, int k, float scale, float* weights);

}  // namespace dsv4::cpu
