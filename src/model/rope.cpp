// The per-layer RoPE table from the config (model-spec §3.2). The table builders and the rotation itself are
// in src/backend/cpu/rope_cpu.cpp (backend library).
#include "model/config.h"
#include "model/rope.h"

namespace dsv4 {

RopeFreqs rope_freqs_for_layer(const ModelConfig& c, int layer) {
  if (c.ratio(layer) == 0) return rope_freqs_plain(c.rope_theta, c.rope_dim);
  RopeYarn y;
  y.factor = c.yarn_factor;
  y.orig_ctx = double(c.yarn_orig_ctx);
  y.beta_fast = c.yarn_beta_fast;
  y.beta_slow = c.yarn_beta_slow;
  return rope_freqs_yarn(c.compress_rope_theta, c.rope_dim, y);
}

}  // namespace dsv4
