// The attention sublayer of DeepSeek V4 (model-spec §6), written as a sequence of backend ops (backend.h), with
// its per-layer session state (§11) in backend memory.
//
// One call processes T consecutive tokens of ONE session (prefill chunk or a single decode token):
//   Q path      qr = RMSNorm_w(wq_a x); q = wq_b qr -> H heads x dh, per-head RMSNorm, RoPE on the last dr dims
//   KV path     kv = RMSNorm_w(wkv x), RoPE, FP8 round trip on the first dh-dr dims (QAT sim), window ring
//   compressor  (ratio m > 0) streaming gated pooling of windows of m tokens (overlapping for m == 4)
//   indexer     (m == 4) its own 128-dim compressor + per-query top-k over the visible compressed rows
//   attention   one softmax over window rows + (all | selected) compressed rows + a per-head sink logit
//   output      inverse RoPE on each head's output, grouped wo_a (G groups), then wo_b
// Everything the host decides (positions, row counts, buffer growth) follows from st.n_past and T; no op
// result is read back on the host.
//
// Determinism: every output row and every state row is computed by the same code in the same summation order
// whatever the chunking of the token stream, so chunked prefill is bitwise equal to whole prefill, and T
// single-token calls equal one T-token call up to the quant matmul's own per-batch behaviour (tests state it).
#pragma once

#include <cstdint>
#include <iosfwd>
#include <vector>

#include "backend/backend.h"
#include "model/compressor.h"
#include "model/rope.h"
#include "model/weights.h"

namespace dsv4 {

struct ModelConfig;
class Backend;

// Weights of a compressor (model-spec §2, §13.3): ape [c*dC, m] (F32), kv / gate [D -> c*dC], norm [dC] (F32).
struct CompressorWeights {
  WeightView ape, kv, gate, norm;
};

// Lightning indexer (m == 4 layers): q_b [rq -> HI*dI], proj [D -> HI], its own compressor at dI.
struct IndexerWeights {
  WeightView q_b, proj;
  CompressorWeights compressor;
};

// GGUF names (blk.N.*): attn_q_a, attn_q_a_norm, attn_q_b, attn_kv, attn_kv_a_norm, attn_sinks, attn_output_a,
// attn_output_b, attn_compressor_{ape,kv,gate,norm}, indexer.attn_q_b, indexer.proj,
// indexer_compressor_{ape,kv,gate,norm}. Vectors (norms, sinks, ape) are F32 (binding guarantees it).
struct AttentionWeights {
  WeightView q_a;       // [D -> rq]
  WeightView q_a_norm;  // [rq]
  WeightView q_b;       // [rq -> H*dh], head-major rows
  WeightView kv;        // [D -> dh]
  WeightView kv_norm;   // [dh]
  WeightView sinks;     // [H]
  WeightView output_a;  // [(H/G)*dh -> G*ro], rows ro*g.. consume heads (H/G)*g..
  WeightView output_b;  // [G*ro -> D]
  CompressorWeights compressor;  // ratio > 0
  IndexerWeights indexer;        // ratio == 4
};

// Everything attention needs about one layer, derived from ModelConfig (or built by hand in tests).
struct AttentionShape {
  int d_model = 0, n_heads = 0, head_dim = 0, rope_dim = 0, q_rank = 0;
  int o_groups = 0, o_rank = 0, window = 0;
  int ratio = 0;  // m: 0 sliding, 4 CSA (overlap + indexer), other > 0 HCA-style
  int idx_heads = 0, idx_dim = 0, idx_topk = 0;
  float eps = 1e-6f;
  int64_t max_context = 0;  // positions must stay below this; sizes the compressed-row capacity
  RopeFreqs rope;           // this layer's frequency table

  bool has_compressor() const { return ratio > 0; }
  bool has_indexer() const { return ratio == 4; }
};
AttentionShape attention_shape(const ModelConfig& c, int layer, int64_t max_context);

// Scratch activations of the sublayer in backend memory, reusable across calls and layers (ensure() only grows
// them), so a steady decode step allocates nothing (a requirement for capturing it as a device graph).
struct AttentionScratch {
  Backend* owner = nullptr;
  DeviceBuffer qr, q, kv, o, low, v, z, iv, iz, qI, wI, sel;  // v, z: main compressor; iv, iz: indexer's
  void ensure(Backend& be, const AttentionShape& s, int T);  // room for T tokens of shape s on be
};

struct AttentionOptions {
  bool qat_sim = true;             // FP8 KV and Hadamard+FP4 indexer round trips (model-spec §3.4)
  // Runs the ops (nullptr: the state's backend). Must be the state's backend or, when both keep host memory
  // (Backend::host_memory), another one (e.g. the engine's CPU backend on its own thread pool).
  Backend* backend = nullptr;
  AttentionScratch* scratch = nullptr;  // reused scratch (nullptr: allocated for this call)
  int max_tokens_per_pass = 256;   // internal sub-chunking bound on scratch memory (results do not depend on it)
};

// Per-layer, per-session state (model-spec §11), its arrays in the memory of backend `be`, which also runs the
// sublayer's ops. Copyable (Session::clone: a backend-side copy).
struct AttentionState {
  AttentionShape shape;
  Backend* be = nullptr;           // owner of the buffers and executor of the ops
  int64_t n_past = 0;              // tokens consumed so far = position of the next token
  DeviceBuffer window;             // [W, dh] ring, slot p mod W holds the KV row of position p
  CompressorState comp;            // m > 0: main compressor buffers + compressed KV rows [n, dh], row w <-> window w
  CompressorState idx_comp;        // m == 4: indexer compressor buffers + indexer keys [n, dI]

  AttentionState() = default;
  explicit AttentionState(const AttentionShape& s, Backend* backend = nullptr) { init(s, backend); }
  // Allocates (backend == nullptr: host_backend(), the CPU) and resets.
  void init(const AttentionShape& s, Backend* backend = nullptr);
  void reset();                        // start of a new sequence: empty rows, cleared buffers, n_past 0

  int64_t n_comp() const { return shape.has_compressor() ? comp.n_rows : 0; }
  int64_t n_idx() const { return shape.has_indexer() ? idx_comp.n_rows : 0; }

  // Byte-exact little-endian serialization: a header (tag, shape numbers, counts) then raw float arrays.
  // load() validates the header against this state's shape and throws dsv4::Error naming the field and the
  // stream byte offset on any mismatch or truncation.
  void save(std::ostream& os) const;
  void load(std::istream& is);

 private:
  void load_unchecked(std::istream& is);
};

// The sublayer (see the top of this file) on st.be. x: [T, d_model] attn_norm-ed input and out: [T, d_model] are
// backend memory of st.be; positions: [T] (host) consecutive with positions[0] == st.n_past. Throws dsv4::Error on non-consecutive positions, context
// overflow or weights whose shapes disagree with the config.
void attention_forward(const ModelConfig& cfg, int layer, const AttentionWeights& w, AttentionState& st,
                       const float* x, const int64_t* positions, int T, float* out, const AttentionOptions& opt);
// The same on an explicit shape (the state's), for tests and callers without a ModelConfig.
void attention_forward(const AttentionWeights& w, AttentionState& st, const float* x, const int64_t* positions,
                       int T, float* out, const AttentionOptions& opt);

// ---- the sublayer in three parts (the forward's decode graphs) ---------------------------------------------
// attention_forward = attention_check, then for each sub-chunk of T tokens: attention_project (position-free:
// reads x, writes scratch), attention_core (everything that depends on the positions or the session state;
// advances st.n_past), attention_output (position-free: reads scratch, writes out). A caller that runs the
// parts itself (so it can put the position-free parts into Backend::run_segment) checks first, sizes the
// scratch with S.ensure(be, st.shape, T) before any part runs, and passes the same T to all three.
// attention_check validates as attention_forward does and returns the backend that runs the ops.
Backend& attention_check(const ModelConfig& cfg, int layer, const AttentionWeights& w, const AttentionState& st,
                         const int64_t* positions, int T, const AttentionOptions& opt);
Backend& attention_check(const AttentionWeights& w, const AttentionState& st, const int64_t* positions, int T,
                         const AttentionOptions& opt);
void attention_project(Backend& be, const AttentionWeights& w, const AttentionShape& s, const float* x, int T,
                       AttentionScratch& S);
void attention_core(Backend& be, const AttentionWeights& w, AttentionState& st, int T, bool qat,
                    AttentionScratch& S);
void attention_output(Backend& be, const AttentionWeights& w, const AttentionShape& s, int T, AttentionScratch& S,
                      float* out);

}  // namespace dsv4
