// The DeepSeek-V4 forward pass (model-spec §5), written once against the backend op table: embedding, per
// layer HC-pre -> attn_norm -> attention -> HC-post -> HC-pre -> ffn_norm -> MoE -> HC-post, then HC head,
// output_norm and the LM head. Prefill (T tokens) and decode (T = 1) are the same code path.
#pragma once

#include <cstdint>
#include <functional>
#include <iosfwd>
#include <memory>
#include <span>
#include <vector>

#include "model/attention.h"

namespace dsv4 {

class Backend;
class Model;
struct ModelConfig;

// Scratch activations of the forward in backend memory, kept across calls by a caller that runs many (the
// engine): buffers only grow, so a steady decode step allocates nothing. One per backend; not shared by
// concurrent calls.
class ForwardScratch {
 public:
  ForwardScratch();
  ~ForwardScratch();
  struct Impl;
  std::unique_ptr<Impl> impl;
};

struct ForwardOptions {
  bool qat_sim = true;             // QAT round trips (model-spec §3.4); the attention sublayer applies them
  int max_tokens_per_pass = 256;   // bounds scratch memory; results do not depend on it
  ForwardScratch* scratch = nullptr;  // reused scratch (nullptr: allocated for this call)
  // Debug tap (roadmap: activations by name for imatrix collection and reference diffs). When set, called with
  // rows x width fp32 activations of the current pass: "embed" (layer -1, width n*D), per layer "attn_in",
  // "attn_out", "ffn_in", "ffn_out" (width D) and "residual" (width n*D, after the layer), and "head_in"
  // (layer -1, width D, the normed final hidden state of the rows whose logits are computed).
  std::function<void(const char* name, int layer, const float* data, int rows, int64_t width)> tap;
  // When set, the logits rows go to this buffer in the backend's memory (same rows and layout as `logits`, which
  // must then be null) and stay there: no download. A session keeps its next-token logits on the device this way
  // and copies them to the host only when asked (Session::logits; Session::argmax reduces them in place).
  float* device_logits = nullptr;
};

// Everything one sequence carries between forward calls (model-spec §11): per-layer attention state (window
// ring, compressed rows, indexer rows, compressor buffers) and the position. Copyable.
struct SequenceState {
  std::vector<AttentionState> layers;
  int64_t n_past = 0;
  int64_t max_context = 0;

  // Allocates every layer's state in the memory of `be` (nullptr: host_backend(), the CPU); model_forward must
  // then run on that backend (or, for host memory, on another host-memory backend).
  void init(const ModelConfig& c, int64_t max_context, Backend* be = nullptr);
  void reset();
  // Grows every compressed-row buffer to hold the rows of n_tokens positions (capped at max_context), so the
  // forward allocates nothing before that length (device graphs; otherwise buffers grow on demand).
  void reserve(int64_t n_tokens);
  // Layer records in order (AttentionState's byte-exact format) after a small header; load() validates the
  // header against this state's shape and leaves the state untouched on error.
  void save(std::ostream& os) const;
  void load(std::istream& is);
};

// Runs tokens [T] (host) at positions st.n_past .. st.n_past+T-1 and advances st. When `logits` (host) is non-null
// it receives next-token logits: [T, n_vocab] if all_rows, else [1, n_vocab] for the last token only.
// Chunking a token stream across calls gives bitwise the same logits and state as one call.
void model_forward(const Model& model, Backend& backend, SequenceState& st, const int32_t* tokens, int T,
                   float* logits, bool all_rows, const ForwardOptions& opt);

// One batch of tokens from several sequences (continuous batching): slice i owns the next slices[i].n_tokens
// rows of `tokens`, continuing its own sequence. All ops except attention run over the whole batch. Each
// sequence's logits and state are bitwise those of running its slice alone (every op is row-independent).
// logits: [sum n_tokens, n_vocab] if all_rows, else [slices.size(), n_vocab] (each slice's last token).
// A sequence state may appear in one slice only. Bad input throws before any state changes.
struct BatchSlice {
  SequenceState* st = nullptr;
  int n_tokens = 0;
};
void model_forward_batch(const Model& model, Backend& backend, std::span<const BatchSlice> slices,
                         const int32_t* tokens, float* logits, bool all_rows, const ForwardOptions& opt);

}  // namespace dsv4
