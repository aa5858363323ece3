// The ds4 GGUF tensor-name table (model-spec §13.3): for a config and a layer, which tensors exist, their GGUF
// names and their expected GGUF shapes (ne order: ne[0] contiguous). Weight binding (src/model/weights.cpp)
// and the converter / synth writer (src/convert) both use this table, so names and shapes cannot drift.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model/config.h"

namespace dsv4 {

// What storage a tensor may have. The converter maps a class to a concrete type per quant mix; binding checks
// the file's type against the class (model-spec §13.1 / §13.3 types).
enum class TensorClass {
  Vector,      // norms, sinks, HC base/scale, expert bias: F32 (ds4 files); F16/BF16 accepted
  Dense,       // small fp32-semantics matrices kept unquantized by ds4: HC fn, compressor, indexer, router,
               // token embedding: F32 / F16 / BF16
  Projection,  // attention projections, shared experts, output head: Q8_0 in ds4 files; any matrix type
  Expert,      // 3-D routed expert stacks: IQ2_XXS / Q2_K / Q4_K in ds4 files; any matrix type
  Ape,         // compressor position bias [c*dC, m]: F32 / F16 / BF16
  Index,       // tid2eid: I32
};

struct TensorSpec {
  std::string name;            // full GGUF name, e.g. "blk.3.attn_q_a.weight"
  std::vector<int64_t> ne;     // expected GGUF shape, ne[0] contiguous
  TensorClass cls = TensorClass::Vector;
  bool optional = false;       // may be absent (exp_probs_b on score layers: ds4 treats it as optional)
};

// Per-layer GGUF name: "blk.<layer>.<suffix>" (suffix e.g. "attn_q_a.weight").
std::string layer_tensor_name(int layer, const std::string& suffix);

// Top-level tensors: token_embd, output_norm, output, output_hc_{fn,base,scale}.
std::vector<TensorSpec> global_tensor_specs(const ModelConfig& c);
// Every tensor of decoder layer `layer` (depends on its kind and whether it is a hash layer).
std::vector<TensorSpec> layer_tensor_specs(const ModelConfig& c, int layer);
// All tensors of the main model (global then layer 0..n_layers-1), in the order a writer should emit them.
std::vector<TensorSpec> all_tensor_specs(const ModelConfig& c);

// Human-readable shape "[a, b, c]" for error messages.
std::string shape_str(const std::vector<int64_t>& ne);
std::string shape_str(const int64_t* ne, int n_dims);
const char* tensor_class_name(TensorClass c);

}  // namespace dsv4
