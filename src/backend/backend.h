// The backend op table: the fixed set of DeepSeek-V4 ops the forward pass (src/model/forward.cpp) is written
// against, once, for every backend. The CPU backend (src/backend/cpu) is the oracle: plain, fp32-accumulating,
// multi-threaded over output rows with a static partition, so every output value is produced by one thread in
// one fixed summation order. That makes each token row's result independent of how many tokens are in the
// batch and of the thread count: chunked prefill == whole prefill bitwise, and decode == prefill bitwise.
//
// Ops are deliberately coarse (HC control with Sinkhorn in one op, routing in one op, the whole routed+shared
// expert FFN in one op) so a GPU backend can fuse each into a few kernels and keep routing decisions on the
// device. Activations are row-major [T, ...] fp32 arrays in memory the backend can address (host memory for
// the CPU backend). A batch row t is one token; rows may belong to different sessions, so nothing here keeps
// per-sequence state: positions and KV live in the caller's session state.
//
// Shapes use T = tokens in the batch, D = d_model, n = hc_mult, E = experts, k = experts per token.
#pragma once

#include <cstdint>

#include "model/weights.h"  // WeightView & weight structs: header-only plain data, no link dependency

namespace dsv4 {

// Hyper-connection hyperparameters (model-spec §4).
struct HcParams {
  int n = 4;                // streams
  int64_t d = 0;            // D
  int sinkhorn_iters = 20;
  float hc_eps = 1e-6f;
  float norm_eps = 1e-6f;   // eps of the unweighted RMS over the flattened n*D vector
};

// MoE hyperparameters of one layer (model-spec §7).
struct MoeParams {
  int n_experts = 0;        // E
  int n_used = 0;           // k
  int64_t d = 0;            // D
  int64_t ff = 0;           // F
  float weights_scale = 1.5f;  // routed_scaling_factor
  float swiglu_clamp = 10.f;
  bool hash = false;        // route by tid2eid instead of top-k
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;

  // X[t][s][:] = embedding row of tokens[t] for every stream s < n.       X: [T, n, D]
  virtual void embed(const WeightView& tok_embd, const int32_t* tokens, int T, int n, float* X) = 0;

  // y[t] = x[t] * rsqrt(mean(x[t]^2) + eps) * w  (w may be null: unweighted).  x, y: [T, dim] (may alias)
  virtual void rms_norm(const float* x, const WeightView* w, int T, int64_t dim, float eps, float* y) = 0;

  // y[t][r] = sum_c W[r][c] * x[t][c] with W 2-D, or expert `expert` of a 3-D stack (expert = -1 for 2-D).
  // x: [T, W.cols()], y: [T, W.rows()]. The weight's quant type decides the activation format.
  virtual void matmul(const WeightView& w, int expert, const float* x, int T, float* y) = 0;

  // HC control + Sinkhorn + stream mix (model-spec §4 steps 1-8).
  //   X: [T, n, D] residual streams; a: [T, D] sublayer input sum_i pre[i] X[i];
  //   post: [T, n]; comb: [T, n, n] row = input stream i, column = output stream o.
  virtual void hc_pre(const HcWeights& w, const HcParams& p, const float* X, int T, float* a, float* post,
                      float* comb) = 0;
  // X[t][o] = post[t][o] * y[t] + sum_i comb[t][i][o] * X[t][i]  (in place).   y: [T, D]
  virtual void hc_post(const HcParams& p, const float* y, const float* post, const float* comb, int T,
                       float* X) = 0;
  // Final HC head: h[t] = sum_i w_i X[t][i] with w = sigmoid(fn.x * rsqrt(..) * scale + base) + hc_eps.
  //   X: [T, n, D], h: [T, D]
  virtual void hc_head(const HcHeadWeights& w, const HcParams& p, const float* X, int T, float* h) = 0;

  // MoE routing (model-spec §7 steps 1-3): expert ids [T, k] and routing weights [T, k] (already normalized
  // over the k unbiased scores and multiplied by weights_scale). x: [T, D] ffn_norm-ed input.
  virtual void moe_route(const MoeWeights& w, const MoeParams& p, const float* x, const int32_t* tokens, int T,
                         int32_t* expert_ids, float* expert_weights) = 0;
  // Routed experts (weight applied before the down projection) + shared expert, clamped SwiGLU.
  //   x: [T, D] -> y: [T, D]; experts accumulated in selection order, then the shared expert.
  virtual void moe_ffn(const MoeWeights& w, const MoeParams& p, const float* x, const int32_t* expert_ids,
                       const float* expert_weights, int T, float* y) = 0;
};

}  // namespace dsv4
