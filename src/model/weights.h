// Weight views and per-layer weight structs, bound from a GGUF file by ds4 tensor names (model/names.h).
//
// A WeightView is a non-owning view of one tensor's bytes in the mmapped file (or, for small vectors stored
// as F16/BF16, of an F32 copy owned by ModelWeights: binding guarantees every TensorClass::Vector and
// TensorClass::Ape view has type F32, so ops may read them as plain float arrays).
//
// Matrices use GGUF order: ne[0] = input width (contiguous), ne[1] = output rows, ne[2] = experts (3-D stacks;
// expert e's [ne1 x ne0] matrix starts at byte e * ne[1] * row_bytes(ne[0])).
//
// ---- Contract with the attention sublayer (src/model/attention.h, written by the attention engineer) ----
// model/layer.h includes attention.h and embeds `AttentionWeights attn;` in LayerWeights and
// `AttentionState` in the per-layer session state. The layer loop (model/forward.cpp) calls, once per layer
// per token batch of ONE session with consecutive positions:
//
//   void attention_forward(const ModelConfig& cfg, int layer, const AttentionWeights& w, AttentionState& st,
//                          const float* x,          // [T, d_model] attn_norm-ed sublayer input, fp32, in
//                                                   //     backend memory (backend/backend.h)
//                          const int64_t* positions,// [T] absolute positions, consecutive, positions[0] == the
//                                                   //     state's current position
//                          int T,
//                          float* out,              // [T, d_model] sublayer output (before HC post), backend
//                                                   //     memory
//                          const AttentionOptions& opt);  // opt.qat_sim (default true), backend, scratch
//
// Requirements the runtime relies on: chunking a batch differently gives bitwise-identical `out` and state;
// AttentionState has reset(), save(std::ostream&) and load(std::istream&) that are byte-exact, and is copyable
// (Session::clone). State capacity (compressed rows) is sized from the session's max_context.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace dsv4 {

enum class QType : uint32_t;  // src/quant/quant.h (ggml type ids)

struct WeightView {
  QType type{};
  const void* data = nullptr;
  int64_t ne[4] = {1, 1, 1, 1};
  int n_dims = 0;
  size_t n_bytes = 0;
  const char* name = "";  // GGUF tensor name (points into the binding's storage), for error messages

  bool present() const { return data != nullptr; }
  int64_t cols() const { return ne[0]; }  // input width
  int64_t rows() const { return ne[1]; }  // output rows (per expert for 3-D stacks)
  // Only valid for views binding guarantees F32 (Vector / Ape classes, or F32 matrices).
  const float* f32() const { return static_cast<const float*>(data); }
};

// Hyper-connection control parameters of one sublayer (model-spec §4): fn [n*D -> mix], base [mix], scale [3].
struct HcWeights {
  WeightView fn, base, scale;
};

// Final HC head: fn [n*D -> n], base [n], scale [1].
struct HcHeadWeights {
  WeightView fn, base, scale;
};

// MoE sublayer (model-spec §7).
struct MoeWeights {
  WeightView gate_inp;     // router [D -> E]
  WeightView exp_probs_b;  // selection bias [E] (score layers; absent => zero)
  WeightView tid2eid;      // [k, V] I32 (hash layers)
  WeightView gate_exps, up_exps;  // [D -> F] x E
  WeightView down_exps;           // [F -> D] x E
  WeightView gate_shexp, up_shexp, down_shexp;
};

}  // namespace dsv4
