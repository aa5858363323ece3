// A test backend whose memory the host cannot touch: alloc() hands out addresses inside a reserved PROT_NONE
// region (any host dereference of one segfaults), backed by private host blocks that only this backend's ops
// see. Every op translates its pointers and runs the CPU implementation, so results must be bitwise the CPU
// backend's. A forward that runs on it proves the model code keeps activations and state behind the op table,
// as a device backend requires (host_memory() is false, so the download paths are exercised too).
#pragma once

#include <sys/mman.h>

#include <cstring>
#include <map>
#include <memory>
#include <type_traits>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu/cpu_backend.h"
#include "common/error.h"

namespace dsv4::test {

class OpaqueBackend final : public Backend {
 public:
  OpaqueBackend() : cpu_(make_cpu_backend()) {
    base_ = mmap(nullptr, kSpan, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base_ == MAP_FAILED) fail("opaque backend: cannot reserve address space");
  }
  ~OpaqueBackend() override { munmap(base_, kSpan); }
  const char* name() const override { return "opaque"; }

  size_t live_blocks() const { return blocks_.size(); }

  void* mem_alloc(size_t bytes) override {
    const size_t step = (bytes + 63) / 64 * 64 + 64;  // a gap, so an overrun lands outside every block
    if (next_ + step > kSpan) fail("opaque backend: address space exhausted");
    const uintptr_t a = reinterpret_cast<uintptr_t>(base_) + next_;
    next_ += step;
    blocks_[a].assign(bytes, 0xA5);  // garbage, like real device memory
    return reinterpret_cast<void*>(a);
  }
  void mem_free(void* p) noexcept override { blocks_.erase(reinterpret_cast<uintptr_t>(p)); }
  void upload(void* dst, const void* src, size_t n) override {
    if (n) std::memcpy(real(dst, n), src, n);
  }
  void download(void* dst, const void* src, size_t n) override {
    if (n) std::memcpy(dst, real(src, n), n);
  }
  void copy(void* dst, const void* src, size_t n) override {
    if (n) std::memmove(real(dst, n), real(src, n), n);
  }
  void fill(float* dst, float v, size_t n) override {
    if (n == 0) return;
    float* d = real(dst, n * sizeof(float));
    for (size_t i = 0; i < n; ++i) d[i] = v;
  }

  void embed(const WeightView& e, const int32_t* tokens, int T, int n, float* X) override {
    cpu_->embed(e, R(tokens), T, n, R(X));
  }
  void rms_norm(const float* x, const WeightView* w, int T, int64_t dim, float eps, float* y) override {
    cpu_->rms_norm(R(x), w, T, dim, eps, R(y));
  }
  void matmul(const WeightView& w, int expert, const float* x, int T, float* y) override {
    cpu_->matmul(w, expert, R(x), T, R(y));
  }
  void hc_pre(const HcWeights& w, const HcParams& p, const float* X, int T, float* a, float* post,
              float* comb) override {
    cpu_->hc_pre(w, p, R(X), T, R(a), R(post), R(comb));
  }
  void hc_post(const HcParams& p, const float* y, const float* post, const float* comb, int T, float* X) override {
    cpu_->hc_post(p, R(y), R(post), R(comb), T, R(X));
  }
  void hc_head(const HcHeadWeights& w, const HcParams& p, const float* X, int T, float* h) override {
    cpu_->hc_head(w, p, R(X), T, R(h));
  }
  void moe_route(const MoeWeights& w, const MoeParams& p, const float* x, const int32_t* tokens, int T,
                 int32_t* ids, float* wts) override {
    cpu_->moe_route(w, p, R(x), R(tokens), T, R(ids), R(wts));
  }
  void moe_ffn(const MoeWeights& w, const MoeParams& p, const float* x, const int32_t* ids, const float* wts, int T,
               float* y) override {
    cpu_->moe_ffn(w, p, R(x), R(ids), R(wts), T, R(y));
  }
  void matmul_grouped(const WeightView& w, int groups, const float* x, int T, float* y) override {
    cpu_->matmul_grouped(w, groups, R(x), T, R(y));
  }
  void head_prep(float* x, int T, int H, int dim, const HeadPrep& p) override { cpu_->head_prep(R(x), T, H, dim, p); }
  void compressor_step(const CompressorParams& p, const CompressorBuffers& s, const float* v, const float* z, int T,
                       int64_t p0) override {
    CompressorBuffers r = s;
    r.cur_v = R(s.cur_v), r.cur_z = R(s.cur_z), r.prev_v = R(s.prev_v), r.prev_z = R(s.prev_z), r.rows = R(s.rows);
    cpu_->compressor_step(p, r, R(v), R(z), T, p0);
  }
  void indexer_topk(const IndexerParams& p, const float* qI, const float* wI, const float* keys, int T, int64_t p0,
                    int32_t* sel) override {
    cpu_->indexer_topk(p, R(qI), R(wI), R(keys), T, p0, R(sel));
  }
  void sink_attention(const SinkAttnParams& p, const float* q, const float* kv_new, const float* ring,
                      const float* comp, const int32_t* sel, int T, int64_t p0, float* out) override {
    cpu_->sink_attention(p, R(q), R(kv_new), R(ring), R(comp), R(sel), T, p0, R(out));
  }
  void window_store(float* ring, int W, int dim, const float* kv, int T, int64_t p0) override {
    cpu_->window_store(R(ring), W, dim, R(kv), T, p0);
  }

 private:
  static constexpr size_t kSpan = size_t(1) << 40;  // address space only (PROT_NONE, no backing)

  // The host block behind an opaque address (which may point inside a block); null stays null.
  template <typename T>
  T* R(T* p) {
    return p ? real(p, 0) : nullptr;
  }
  template <typename T>
  T* real(T* p, size_t n) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    auto it = blocks_.upper_bound(a);
    if (it == blocks_.begin()) fail("opaque backend: %p is not backend memory", static_cast<const void*>(p));
    --it;
    const size_t off = a - it->first;
    if (off + n > it->second.size())
      fail("opaque backend: %zu bytes at %p run past a block of %zu", n, static_cast<const void*>(p),
           it->second.size());
    using Byte = std::conditional_t<std::is_const_v<T>, const uint8_t, uint8_t>;
    return reinterpret_cast<T*>(reinterpret_cast<Byte*>(it->second.data()) + off);
  }

  std::unique_ptr<Backend> cpu_;
  void* base_ = nullptr;
  size_t next_ = 0;
  std::map<uintptr_t, std::vector<uint8_t>> blocks_;
};

}  // namespace dsv4::test
