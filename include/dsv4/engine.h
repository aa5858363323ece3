// dsv4 public API: the only engine header the CLI, server, bench and tests include.
//
//   Engine  — weights and the backend, read-only after load, shared by many sessions.
//   Session — one timeline: KV state (window ring, compressed rows, indexer rows, compressor buffers),
//             position, and the logits of the last evaluated token.
//
// Error policy: every call may throw dsv4::Error (common/error.h re-exported below) with a message naming the
// file, tensor, key or field at fault. No tensors, kernels or backend handles appear here.
//
// Room left for the roadmap (docs/roadmap.md in ../shared): sessions are plain objects (no global state), the
// state is serialized through a stream (written and checksummed piece by piece, never one buffer), and clone()
// is the snapshot a speculative (MTP) decoder can roll back to until a cheaper truncate() exists.
#pragma once

#include <cstdint>
#include <functional>
#include <iosfwd>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "dsv4/error.h"

namespace dsv4 {

using Token = int32_t;

enum class BackendKind { Auto, Cpu, Cuda };

struct EngineOptions {
  std::string model_path;              // GGUF file
  BackendKind backend = BackendKind::Auto;  // Auto: CUDA when a device is present, else CPU
  int threads = 0;                     // CPU threads; 0 = all cores
  bool qat_sim = true;                 // FP8/FP4 QAT simulations as in the official code (--no-qat-sim)
  // Tokens per forward pass when a long prompt is evaluated (prefill chunk, llama.cpp's ubatch). Results do not
  // depend on it; memory and speed do: bigger passes amortize weight reads (the CUDA prefill GEMMs were measured
  // to prefer 1024-2048, docs/cuda.md) at the cost of scratch memory. 0: the backend's default (CPU 256,
  // CUDA 2048). At most kMaxPassTokens.
  int pass_tokens = 0;
  static constexpr int kMaxPassTokens = 8192;
  // Load progress in [0, 1] (model upload can take a while on the real 81 GB file).
  std::function<void(double fraction, const std::string& what)> progress;
};

// Model shape as read from GGUF metadata (display and validation; not needed to drive the engine).
struct ModelInfo {
  std::string name;
  int n_layers = 0, d_model = 0, n_vocab = 0, n_heads = 0, head_dim = 0;
  int n_experts = 0, n_experts_used = 0, n_hash_layers = 0, hc_mult = 0, sliding_window = 0;
  std::vector<int> compress_ratios;    // per decoder layer: 0 sliding, 4 CSA, 128 HCA
  uint64_t context_length = 0;
  uint64_t weight_bytes = 0;
  std::string backend;                 // "cpu" or "cuda"
  int pass_tokens = 0;                 // tokens per forward pass in effect (EngineOptions::pass_tokens or default)
};

class Session;

class Engine {
 public:
  static std::unique_ptr<Engine> load(const EngineOptions& options);
  virtual ~Engine() = default;

  virtual const ModelInfo& info() const = 0;
  // max_context: tokens the session may hold (bounds compressed-row storage). The session's state lives in
  // the engine's backend memory (device memory for a GPU backend): destroy sessions before their engine.
  virtual std::unique_ptr<Session> new_session(int64_t max_context) = 0;

  // Continuous batching: appends tokens[i] to sessions[i] (distinct sessions of this engine) in one forward
  // over all of them. Each session ends bitwise as if eval(tokens[i]) had been called on it alone (same
  // backend); afterwards its logits() holds its own next-token logits. Bad input throws before any change.
  virtual void eval_batch(std::span<Session* const> sessions, std::span<const std::span<const Token>> tokens) = 0;
};

class Session {
 public:
  virtual ~Session() = default;

  // Appends tokens at the current position and runs the forward over them (prefill when many, decode when
  // one). Afterwards logits() holds the next-token logits after the last token. When all_logits is non-null
  // it receives one row of n_vocab floats per input token (diagnostics, `dsv4 logits`). Splitting a token
  // stream over several eval() calls gives bitwise the same logits and state as one call (same backend).
  // Throws (leaving the session unchanged) on a token id outside the vocabulary or when position() + size
  // would exceed max_context().
  virtual void eval(std::span<const Token> tokens, std::vector<float>* all_logits = nullptr) = 0;

  virtual std::span<const float> logits() const = 0;  // n_vocab floats; empty before the first eval
  // The greedy next token: the id of the largest of logits() that is neither NaN nor -inf (the lowest such id on
  // ties), the Sampler's choice at temperature 0. A GPU session's eval reduces the logits where they are and copies
  // back only the id (that wait is also how eval returns with the forward complete); logits() copies all n_vocab
  // floats, once per eval, when first called. Throws before the first eval or when every logit is -inf or NaN.
  virtual Token argmax() const = 0;
  virtual int64_t position() const = 0;               // tokens consumed so far
  virtual int64_t max_context() const = 0;
  virtual const std::vector<Token>& tokens() const = 0;  // history, for prefix matching (not model state)

  // State save/restore: versioned, checksummed byte stream (layout in src/runtime/engine.cpp: header with a
  // model fingerprint, position, token history, last logits, per-layer attention state, FNV-1a trailer).
  // restore() of what save() wrote, then eval, equals never having stopped (bitwise on the same backend). It
  // also restores the saved max_context. A stream from another model, a corrupted or truncated stream throws
  // naming the field / byte offset and leaves the session unchanged.
  virtual void save(std::ostream& out) const = 0;
  virtual void restore(std::istream& in) = 0;

  // Copies the whole state into a fresh session of the same engine (fork a shared prefix).
  virtual std::unique_ptr<Session> clone() const = 0;
};

}  // namespace dsv4
