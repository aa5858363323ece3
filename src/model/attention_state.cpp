// AttentionShape from the config, and the per-layer attention state: reset and byte-exact save/load.
#include <istream>
#include <ostream>
#include <utility>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "common/error.h"
#include "model/attention.h"
#include "model/attention_io.h"
#include "model/config.h"

namespace dsv4 {

AttentionShape attention_shape(const ModelConfig& c, int layer, int64_t max_context) {
  if (layer < 0 || layer >= int(c.compress_ratios.size()))
    fail("attention: layer %d has no compress ratio (config has %zu)", layer, c.compress_ratios.size());
  AttentionShape s;
  s.d_model = c.d_model;
  s.n_heads = c.n_heads;
  s.head_dim = c.head_dim;
  s.rope_dim = c.rope_dim;
  s.q_rank = c.q_lora_rank;
  s.o_groups = c.o_groups;
  s.o_rank = c.o_lora_rank;
  s.window = c.sliding_window;
  s.ratio = c.ratio(layer);
  s.idx_heads = c.idx_heads;
  s.idx_dim = c.idx_head_dim;
  s.idx_topk = c.idx_topk;
  s.eps = c.rms_eps;
  s.max_context = max_context;
  s.rope = rope_freqs_for_layer(c, layer);
  return s;
}

namespace {
// First i64 of every layer's record: bytes "ATTN" then format version 1 (little-endian u32 pair).
constexpr int64_t kStateTag = int64_t(0x4E545441) | (int64_t(1) << 32);
}  // namespace

void AttentionState::init(const AttentionShape& s, Backend* backend) {
  if (s.n_heads <= 0 || s.head_dim <= 0 || s.window <= 0 || s.rope_dim <= 0 || s.rope_dim > s.head_dim)
    fail("attention: bad shape (heads %d, head_dim %d, window %d, rope_dim %d)", s.n_heads, s.head_dim, s.window,
         s.rope_dim);
  if (s.max_context <= 0) fail("attention: max_context must be positive, got %lld", (long long)s.max_context);
  if (s.has_indexer() && (s.idx_dim < s.rope_dim || s.idx_heads <= 0 || s.idx_topk <= 0))
    fail("attention: bad indexer shape (heads %d, dim %d, top_k %d)", s.idx_heads, s.idx_dim, s.idx_topk);
  shape = s;
  be = backend ? backend : &host_backend();
  window = be->alloc(sizeof(float) * size_t(s.window) * size_t(s.head_dim));
  if (s.has_compressor()) comp.init(s.ratio, s.head_dim, s.max_context, be);
  if (s.has_indexer()) idx_comp.init(s.ratio, s.idx_dim, s.max_context, be);
  reset();
}

void AttentionState::reset() {
  n_past = 0;
  be->fill(window.f32(), 0.0f, size_t(shape.window) * size_t(shape.head_dim));
  if (shape.has_compressor()) comp.reset();
  if (shape.has_indexer()) idx_comp.reset();
}

void AttentionState::save(std::ostream& os) const {
  using namespace attn_io;
  put_i64(os, kStateTag);
  put_i64(os, shape.ratio);
  put_i64(os, shape.window);
  put_i64(os, shape.head_dim);
  put_i64(os, shape.has_indexer() ? shape.idx_dim : 0);
  put_i64(os, n_past);
  std::vector<float> ring(window.bytes() / sizeof(float));
  be->download(ring.data(), window.data(), window.bytes());
  put_floats(os, ring.data(), ring.size());
  if (shape.has_compressor()) comp.save(os);
  if (shape.has_indexer()) idx_comp.save(os);
}

void AttentionState::load(std::istream& is) {
  // Read into a copy so a failed load leaves this state untouched.
  AttentionState t = *this;
  t.load_unchecked(is);
  *this = std::move(t);
}

void AttentionState::load_unchecked(std::istream& is) {
  using namespace attn_io;
  expect_i64(is, kStateTag, "tag/version");
  expect_i64(is, shape.ratio, "ratio");
  expect_i64(is, shape.window, "window");
  expect_i64(is, shape.head_dim, "head_dim");
  expect_i64(is, shape.has_indexer() ? shape.idx_dim : 0, "idx_dim");
  std::streamoff at = is.tellg();
  int64_t n = get_i64(is, "n_past");
  if (n < 0 || n > shape.max_context)
    fail("attention state: field n_past at stream offset %lld is %lld, outside [0, max_context %lld]",
         (long long)at, (long long)n, (long long)shape.max_context);
  std::vector<float> ring(window.bytes() / sizeof(float));
  get_floats(is, ring.data(), ring.size(), "window");
  be->upload(window.data(), ring.data(), window.bytes());
  if (shape.has_compressor()) comp.load(is, "compressor");
  if (shape.has_indexer()) idx_comp.load(is, "indexer");
  int64_t m = shape.ratio;
  if (shape.has_compressor() && comp.n_rows != n / m)
    fail("attention state: %lld compressed rows do not match n_past %lld at ratio %lld", (long long)comp.n_rows,
         (long long)n, (long long)m);
  if (shape.has_indexer() && idx_comp.n_rows != n / m)
    fail("attention state: %lld indexer rows do not match n_past %lld at ratio %lld", (long long)idx_comp.n_rows,
         (long long)n, (long long)m);
  n_past = n;
}

}  // namespace dsv4
