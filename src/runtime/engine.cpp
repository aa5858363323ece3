// Engine and Session implementations behind include/dsv4/engine.h: a loaded Model + backend + thread pool, and
// per-session SequenceState + token history + last logits, with a versioned, checksummed state stream.
#include <algorithm>
#include <cstring>
#include <istream>
#include <mutex>
#include <ostream>

#include "backend/cpu/cpu_backend.h"
#ifdef DSV4_HAVE_CUDA
#include "backend/cuda/cuda_backend.h"
#endif
#include "common/argmax.h"
#include "common/error.h"
#include "common/thread_pool.h"
#include "dsv4/engine.h"
#include "gguf/gguf.h"
#include "model/forward.h"
#include "model/model.h"
#include "runtime/checksum_stream.h"

namespace dsv4 {

namespace {

constexpr char kSessionMagic[8] = {'D', 'S', 'V', '4', 'S', 'E', 'S', 'S'};
constexpr uint32_t kSessionVersion = 2;  // 2: fingerprint ends with a digest of the weights file

class EngineImpl;
uint64_t weights_digest(const GgufFile& f);  // below, with the session stream format

class SessionImpl final : public Session {
 public:
  SessionImpl(EngineImpl& e, int64_t max_context);
  void eval(std::span<const Token> tokens, std::vector<float>* all_logits) override;
  std::span<const float> logits() const override;
  Token argmax() const override;
  int64_t position() const override { return st_.n_past; }
  int64_t max_context() const override { return st_.max_context; }
  const std::vector<Token>& tokens() const override { return tokens_; }
  void save(std::ostream& out) const override;
  void restore(std::istream& in) override;
  std::unique_ptr<Session> clone() const override { return std::make_unique<SessionImpl>(*this); }

  // Checks tokens against the vocabulary and the remaining context (what eval() rejects up front).
  void check_input(std::span<const Token> tokens) const;
  // Bookkeeping after a forward over `tokens` whose last-row logits are `last` (n_vocab floats).
  void commit(std::span<const Token> tokens, const float* last) {
    tokens_.insert(tokens_.end(), tokens.begin(), tokens.end());
    logits_.assign(last, last + eng_config_vocab());
    logits_on_device_ = false;
    greedy_ = kGreedyUnknown;
  }
  SequenceState& state() { return st_; }
  const void* engine() const { return &eng_; }

 private:
  size_t eng_config_vocab() const;
  EngineImpl& eng_;
  SequenceState st_;
  std::vector<Token> tokens_;
  // The next-token logits live in dev_logits_ (the engine backend's memory) after a single-row eval and are
  // copied into logits_ when logits() is first asked for (logits_on_device_ until then): greedy decoding
  // (argmax) never moves them to the host. Mutable: logits() is a const read that may fill the host copy.
  mutable std::vector<float> logits_;
  mutable bool logits_on_device_ = false;
  DeviceBuffer dev_logits_;
  // argmax_usable of the current logits as computed by eval on the backend (-1: none usable), or kGreedyUnknown
  // (host logits from eval_batch / all-rows evals / restore: argmax() reduces logits_ then).
  static constexpr int64_t kGreedyUnknown = -2;
  int64_t greedy_ = kGreedyUnknown;
};

class EngineImpl final : public Engine {
 public:
  explicit EngineImpl(const EngineOptions& o) : opt_(o) {
    if (o.pass_tokens < 0 || o.pass_tokens > EngineOptions::kMaxPassTokens)
      fail("engine option pass_tokens (CLI -b/--batch-size): %d outside [0, %d] (0 = the backend's default)", o.pass_tokens,
           EngineOptions::kMaxPassTokens);
    if (o.progress) o.progress(0.0, "opening " + o.model_path);
    model_ = Model::load(o.model_path);
    pool_ = std::make_unique<ThreadPool>(o.threads);
    bool use_cuda = o.backend == BackendKind::Cuda;
#ifdef DSV4_HAVE_CUDA
    if (o.backend == BackendKind::Auto) use_cuda = cuda_backend_available();  // the GPU when there is one
#endif
    if (use_cuda) {
#ifdef DSV4_HAVE_CUDA
      backend_ = make_cuda_backend();  // op table on the GPU, state and activations in device memory
#else
      fail("%s: the CUDA backend is not available in this build (use --backend cpu)", o.model_path.c_str());
#endif
    } else {
      backend_ = make_cpu_backend(pool_.get());
    }
    const ModelConfig& c = model_->config();
    info_.name = c.name;
    info_.n_layers = c.n_layers;
    info_.d_model = c.d_model;
    info_.n_vocab = c.n_vocab;
    info_.n_heads = c.n_heads;
    info_.head_dim = c.head_dim;
    info_.n_experts = c.n_experts;
    info_.n_experts_used = c.n_experts_used;
    info_.n_hash_layers = c.n_hash_layers;
    info_.hc_mult = c.hc_mult;
    info_.sliding_window = c.sliding_window;
    info_.compress_ratios.assign(c.compress_ratios.begin(), c.compress_ratios.begin() + c.n_layers);
    info_.context_length = c.context_length;
    info_.weight_bytes = model_->weight_bytes();
    digest_ = weights_digest(model_->file());
    info_.backend = backend_->name();
    // Default pass size: the CPU's matmuls gain little past 256 tokens; the GPU's tensor-core GEMMs read each
    // weight once per pass, so an 8k prompt ran 958 / 1656 / 2008 t/s at 256 / 1024 / 2048 (H200, 7e0e2fe).
    info_.pass_tokens = o.pass_tokens > 0 ? o.pass_tokens : backend_->host_memory() ? 256 : 2048;
    if (!backend_->host_memory()) upload_weights();
    if (o.progress) o.progress(1.0, "loaded");
  }
  // A device backend copies each weight on first use: one untimed single-token pass at load moves the whole model
  // (every layer's tensors, each routed-expert stack as a whole) so the first prompt is not the one that waits,
  // a model that does not fit fails here naming the tensor, and the load can report progress.
  void upload_weights() {
    const double total = double(std::max<uint64_t>(info_.weight_bytes, 1));
    double done = 0;
    if (opt_.progress)
      backend_->set_upload_observer([&](size_t bytes, const char*) {
        done += double(bytes);
        opt_.progress(std::min(0.99, done / total),
                      strfmt("weights to %s: %.1f / %.1f GB", backend_->name(), done / 1e9, total / 1e9));
      });
    SequenceState st;
    st.init(model_->config(), 1, backend_.get());
    const Token first = 0;
    std::vector<float> logits(size_t(model_->config().n_vocab));
    try {
      model_forward(*model_, *backend_, st, &first, 1, logits.data(), false, forward_options());
    } catch (...) {
      backend_->set_upload_observer(nullptr);
      throw;
    }
    backend_->set_upload_observer(nullptr);
  }
  const ModelInfo& info() const override { return info_; }
  std::unique_ptr<Session> new_session(int64_t max_context) override {
    return std::make_unique<SessionImpl>(*this, max_context);
  }

  // The backend keeps scratch buffers, so forward calls of different sessions are serialized here.
  // device_logits: the logits go there (backend memory) instead of `logits` (ForwardOptions::device_logits).
  void run(SequenceState& st, const Token* tokens, int T, float* logits, bool all_rows,
           float* device_logits = nullptr) {
    std::lock_guard<std::mutex> lock(run_mutex_);
    ForwardOptions fo = forward_options();
    fo.device_logits = device_logits;
    model_forward(*model_, *backend_, st, tokens, T, logits, all_rows, fo);
  }
  // Backend reads of a session's device logits, serialized with the forwards (the backend is not thread-safe).
  void download(void* dst, const void* src, size_t bytes) {
    std::lock_guard<std::mutex> lock(run_mutex_);
    backend_->download(dst, src, bytes);
  }
  int64_t argmax(const float* x, int64_t n) {
    std::lock_guard<std::mutex> lock(run_mutex_);
    return backend_->argmax(x, n);
  }
  ForwardOptions forward_options() {
    ForwardOptions fo;
    fo.qat_sim = opt_.qat_sim;
    fo.scratch = &scratch_;
    fo.max_tokens_per_pass = info_.pass_tokens;
    return fo;
  }
  const ModelConfig& config() const { return model_->config(); }
  uint64_t digest() const { return digest_; }
  Backend& backend() { return *backend_; }  // owner of every session's state memory

  void eval_batch(std::span<Session* const> sessions, std::span<const std::span<const Token>> tokens) override {
    if (sessions.size() != tokens.size())
      fail("Engine::eval_batch: %zu sessions but %zu token lists", sessions.size(), tokens.size());
    std::vector<SessionImpl*> ss;
    std::vector<BatchSlice> slices;
    std::vector<Token> all;
    for (size_t i = 0; i < sessions.size(); ++i) {
      auto* si = dynamic_cast<SessionImpl*>(sessions[i]);
      if (!si || si->engine() != this) fail("Engine::eval_batch: session %zu does not belong to this engine", i);
      for (size_t j = 0; j < i; ++j)
        if (ss[j] == si) fail("Engine::eval_batch: session %zu appears twice (also at %zu)", i, j);
      si->check_input(tokens[i]);
      ss.push_back(si);
      slices.push_back({&si->state(), int(tokens[i].size())});
      all.insert(all.end(), tokens[i].begin(), tokens[i].end());
    }
    if (ss.empty()) return;
    const size_t V = size_t(config().n_vocab);
    std::vector<float> last(ss.size() * V);
    {
      std::lock_guard<std::mutex> lock(run_mutex_);
      ForwardOptions fo = forward_options();
      model_forward_batch(*model_, *backend_, slices, all.data(), last.data(), false, fo);
    }
    for (size_t i = 0; i < ss.size(); ++i) ss[i]->commit(tokens[i], last.data() + i * V);
  }

 private:
  EngineOptions opt_;
  std::unique_ptr<Model> model_;
  std::unique_ptr<ThreadPool> pool_;
  std::unique_ptr<Backend> backend_;
  ModelInfo info_;
  uint64_t digest_ = 0;
  std::mutex run_mutex_;
  ForwardScratch scratch_;  // activations in backend memory, reused by every forward (under run_mutex_)
};

SessionImpl::SessionImpl(EngineImpl& e, int64_t max_context) : eng_(e) {
  st_.init(e.config(), max_context, &e.backend());
}

size_t SessionImpl::eng_config_vocab() const { return size_t(eng_.config().n_vocab); }

void SessionImpl::check_input(std::span<const Token> tokens) const {
  // Bad input is rejected before any state changes, so a failed eval leaves the session as it was. (The state
  // is not copied for this: at long context it holds gigabytes of compressed rows.)
  if (tokens.empty()) fail("Session::eval: no tokens");
  const size_t V = eng_config_vocab();
  for (size_t t = 0; t < tokens.size(); ++t)
    if (tokens[t] < 0 || size_t(tokens[t]) >= V)
      fail("Session::eval: token id %d at index %zu outside the vocabulary [0, %zu)", tokens[t], t, V);
  if (st_.n_past + int64_t(tokens.size()) > st_.max_context)
    fail("Session::eval: %zu tokens at position %lld exceed the session's max context %lld", tokens.size(),
         (long long)st_.n_past, (long long)st_.max_context);
}

void SessionImpl::eval(std::span<const Token> tokens, std::vector<float>* all_logits) {
  check_input(tokens);
  const size_t V = eng_config_vocab();
  const int T = int(tokens.size());
  if (all_logits) {
    std::vector<float> rows(size_t(T) * V);
    eng_.run(st_, tokens.data(), T, rows.data(), true);
    commit(tokens, rows.data() + (rows.size() - V));
    *all_logits = std::move(rows);
    return;
  }
  if (dev_logits_.bytes() < V * sizeof(float)) dev_logits_ = eng_.backend().alloc(V * sizeof(float));
  eng_.run(st_, tokens.data(), T, nullptr, false, dev_logits_.f32());
  tokens_.insert(tokens_.end(), tokens.begin(), tokens.end());
  logits_on_device_ = true;
  // The greedy id right away: on a GPU one small reduction whose 8-byte result is the pass's one host wait, so eval
  // still returns with the forward complete (callers time it) and argmax() costs nothing more.
  greedy_ = eng_.argmax(dev_logits_.f32(), int64_t(V));
}

std::span<const float> SessionImpl::logits() const {
  if (logits_on_device_) {
    logits_.resize(eng_config_vocab());
    eng_.download(logits_.data(), dev_logits_.f32(), logits_.size() * sizeof(float));
    logits_on_device_ = false;
  }
  return logits_;
}

Token SessionImpl::argmax() const {
  if (greedy_ == kGreedyUnknown && logits_.empty()) fail("Session::argmax: no logits before the first eval");
  const int64_t n = int64_t(eng_config_vocab());
  const int64_t best = greedy_ != kGreedyUnknown ? greedy_ : argmax_usable(logits_.data(), n);
  if (best < 0) fail("Session::argmax: all %lld logits are -inf or NaN", (long long)n);
  return Token(best);
}

// Digest of the weights a state was computed with: FNV-1a over every tensor's name, type and shape plus up to 64
// bytes at its start, middle and end. Two files of the same shape (another quant mix, another imatrix run,
// another synth seed) almost surely differ here, so a session saved with one model is refused by another
// instead of continuing from the wrong model's KV. Samples, not a full hash: the real file is 81+ GB.
uint64_t weights_digest(const GgufFile& f) {
  uint64_t h = 0xcbf29ce484222325ull;
  auto mix = [&h](const void* p, size_t n) {
    const auto* b = static_cast<const uint8_t*>(p);
    for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 0x100000001b3ull;
  };
  for (const GgufTensorInfo& t : f.tensors()) {
    mix(t.name.data(), t.name.size());
    mix(&t.type, sizeof t.type);
    mix(t.ne.data(), sizeof t.ne);
    const uint64_t k = std::min<uint64_t>(64, t.n_bytes);
    for (uint64_t at : {uint64_t(0), (t.n_bytes - k) / 2, t.n_bytes - k}) mix(t.data + at, size_t(k));
  }
  return h;
}

// Model fingerprint: the shape numbers a state depends on, then the weights digest (two i64 halves).
std::vector<int64_t> fingerprint(const ModelConfig& c, uint64_t digest) {
  std::vector<int64_t> f = {c.n_layers, c.d_model, c.n_vocab, c.n_heads, c.head_dim, c.hc_mult, c.idx_head_dim,
                            c.sliding_window};
  for (int il = 0; il < c.n_layers; ++il) f.push_back(c.ratio(il));
  f.push_back(int64_t(digest >> 32));
  f.push_back(int64_t(digest & 0xffffffffu));
  return f;
}

template <typename T>
void put(std::ostream& os, const T& v) {
  os.write(reinterpret_cast<const char*>(&v), sizeof v);
}

template <typename T>
T get(std::istream& is, HashingInBuf& hb, const char* field) {
  T v{};
  uint64_t at = hb.offset();
  is.read(reinterpret_cast<char*>(&v), sizeof v);
  if (!is) fail("session state: truncated while reading field '%s' at byte %llu", field, (unsigned long long)at);
  return v;
}

void SessionImpl::save(std::ostream& out) const {
  // Layout (little-endian): magic[8], u32 version, u32 reserved, u64 n_fp, i64 fingerprint[n_fp],
  // i64 max_context, i64 position, u64 n_tokens, i32 tokens[n], u64 n_logits, f32 logits[n],
  // SequenceState records, then u64 FNV-1a of every preceding byte.
  HashingOutBuf hb(out);
  std::ostream os(&hb);
  os.write(kSessionMagic, 8);
  put(os, kSessionVersion);
  put(os, uint32_t(0));
  auto fp = fingerprint(eng_.config(), eng_.digest());
  put(os, uint64_t(fp.size()));
  for (int64_t v : fp) put(os, v);
  put(os, st_.max_context);
  put(os, st_.n_past);
  put(os, uint64_t(tokens_.size()));
  os.write(reinterpret_cast<const char*>(tokens_.data()), std::streamsize(tokens_.size() * sizeof(Token)));
  const std::span<const float> lg = logits();  // copied from the device if they are still there
  put(os, uint64_t(lg.size()));
  os.write(reinterpret_cast<const char*>(lg.data()), std::streamsize(lg.size() * sizeof(float)));
  st_.save(os);
  os.flush();
  if (!os || !out) fail("session state: write failed");
  uint64_t h = hb.hash();
  out.write(reinterpret_cast<const char*>(&h), sizeof h);
  if (!out) fail("session state: write failed");
}

void SessionImpl::restore(std::istream& in) {
  std::streamoff start = in.tellg();
  HashingInBuf hb(in, start < 0 ? 0 : uint64_t(start));
  std::istream is(&hb);
  char magic[8];
  is.read(magic, 8);
  if (!is || std::memcmp(magic, kSessionMagic, 8) != 0) fail("session state: bad magic (not a dsv4 session stream)");
  uint32_t version = get<uint32_t>(is, hb, "version");
  if (version != kSessionVersion)
    fail("session state: field 'version' is %u, this build reads version %u", version, kSessionVersion);
  get<uint32_t>(is, hb, "reserved");
  const auto fp = fingerprint(eng_.config(), eng_.digest());
  uint64_t n_fp = get<uint64_t>(is, hb, "fingerprint size");
  if (n_fp != fp.size()) fail("session state: saved for a different model (fingerprint size %llu, expected %zu)",
                              (unsigned long long)n_fp, fp.size());
  for (size_t i = 0; i < fp.size(); ++i) {
    int64_t v = get<int64_t>(is, hb, "fingerprint");
    if (v != fp[i] && i + 2 >= fp.size())
      fail("session state: saved with different weights (same shape, weights digest differs): refusing to continue "
           "another model's state");
    if (v != fp[i]) fail("session state: saved for a different model (fingerprint entry %zu is %lld, expected %lld)",
                         i, (long long)v, (long long)fp[i]);
  }
  int64_t max_ctx = get<int64_t>(is, hb, "max_context");
  int64_t pos = get<int64_t>(is, hb, "position");
  if (max_ctx <= 0 || max_ctx > (int64_t(1) << 40) || pos < 0 || pos > max_ctx)
    fail("session state: field 'max_context' %lld / 'position' %lld out of range", (long long)max_ctx,
         (long long)pos);
  uint64_t n_tok = get<uint64_t>(is, hb, "n_tokens");
  if (n_tok != uint64_t(pos)) fail("session state: field 'n_tokens' %llu != position %lld", (unsigned long long)n_tok,
                                   (long long)pos);
  std::vector<Token> toks(n_tok);
  for (auto& t : toks) t = get<Token>(is, hb, "tokens");
  uint64_t n_log = get<uint64_t>(is, hb, "n_logits");
  if (n_log != 0 && n_log != uint64_t(eng_.config().n_vocab))
    fail("session state: field 'n_logits' is %llu, expected 0 or %d", (unsigned long long)n_log,
         eng_.config().n_vocab);
  std::vector<float> lg(n_log);
  for (auto& v : lg) v = get<float>(is, hb, "logits");
  SequenceState st;
  st.init(eng_.config(), max_ctx, &eng_.backend());
  st.load(is);
  uint64_t expect = hb.hash();
  uint64_t at = hb.offset();
  uint64_t stored = 0;
  in.read(reinterpret_cast<char*>(&stored), sizeof stored);
  if (!in) fail("session state: truncated checksum at byte %llu", (unsigned long long)at);
  if (stored != expect)
    fail("session state: checksum mismatch at byte %llu (stored %016llx, computed %016llx)", (unsigned long long)at,
         (unsigned long long)stored, (unsigned long long)expect);
  if (st.n_past != pos) fail("session state: layer position %lld != header position %lld", (long long)st.n_past,
                             (long long)pos);
  st_ = std::move(st);
  tokens_ = std::move(toks);
  logits_ = std::move(lg);
  logits_on_device_ = false;
  greedy_ = kGreedyUnknown;
}

}  // namespace

std::unique_ptr<Engine> Engine::load(const EngineOptions& options) { return std::make_unique<EngineImpl>(options); }

}  // namespace dsv4
