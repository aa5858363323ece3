// Streaming KV compressor state (model-spec §6.3, §6.9): allocation in backend memory, growth, byte-exact
// save/load. The pooling itself is the backend's compressor_step op (src/backend/cpu/attention_ops.cpp).
#include "model/compressor.h"

#include <algorithm>
#include <limits>
#include <string>

#include "backend/cpu/cpu_backend.h"
#include "common/error.h"
#include "model/attention_io.h"

namespace dsv4 {

void CompressorState::init(int m, int d, int64_t max_context, Backend* backend) {
  if (m <= 0 || d <= 0) fail("compressor: bad ratio %d / dim %d", m, d);
  ratio = m;
  dim = d;
  overlap = (m == 4);
  max_rows = max_context / m;
  be = backend ? backend : &host_backend();
  cur_v = be->alloc(sizeof(float) * size_t(m) * size_t(width()));
  cur_z = be->alloc(sizeof(float) * size_t(m) * size_t(width()));
  prev_v = be->alloc(overlap ? sizeof(float) * size_t(m) * size_t(d) : 0);
  prev_z = be->alloc(overlap ? sizeof(float) * size_t(m) * size_t(d) : 0);
  reset();
}

void CompressorState::reset() {
  const float ninf = -std::numeric_limits<float>::infinity();
  be->fill(cur_v.f32(), 0.0f, size_t(ratio) * size_t(width()));
  be->fill(cur_z.f32(), ninf, size_t(ratio) * size_t(width()));
  if (overlap) {
    be->fill(prev_v.f32(), 0.0f, size_t(ratio) * size_t(dim));
    be->fill(prev_z.f32(), ninf, size_t(ratio) * size_t(dim));
  }
  n_rows = 0;  // rows keep their capacity: a reserve() made for device graphs survives a new sequence
}

void CompressorState::reserve(int64_t n) {
  if (n <= capacity()) return;
  if (n > max_rows)
    fail("compressor: row %lld exceeds the session capacity of %lld rows (max context too small)",
         (long long)(n - 1), (long long)max_rows);
  // Geometric growth bounds the copies; the first block is sized for a modest prompt.
  const int64_t cap = std::min(max_rows, std::max({n, 2 * capacity(), int64_t(64)}));
  DeviceBuffer grown = be->alloc(sizeof(float) * size_t(cap) * size_t(dim));
  if (n_rows > 0) be->copy(grown.data(), rows.data(), sizeof(float) * size_t(n_rows) * size_t(dim));
  rows = std::move(grown);
}

CompressorBuffers CompressorState::buffers() const {
  CompressorBuffers b;
  b.ratio = ratio;
  b.dim = dim;
  b.overlap = overlap;
  b.cur_v = cur_v.f32();
  b.cur_z = cur_z.f32();
  b.prev_v = prev_v.f32();
  b.prev_z = prev_z.f32();
  b.rows = rows.f32();
  return b;
}

std::vector<float> CompressorState::download_rows() const {
  std::vector<float> h(size_t(n_rows) * size_t(dim));
  if (!h.empty()) be->download(h.data(), rows.data(), h.size() * sizeof(float));
  return h;
}

namespace {
std::vector<float> download(Backend* be, const DeviceBuffer& b) {
  std::vector<float> h(b.bytes() / sizeof(float));
  if (!h.empty()) be->download(h.data(), b.data(), b.bytes());
  return h;
}
}  // namespace

void CompressorState::save(std::ostream& os) const {
  using namespace attn_io;
  put_i64(os, ratio);
  put_i64(os, dim);
  put_i64(os, n_rows);
  for (const DeviceBuffer* b : {&cur_v, &cur_z, &prev_v, &prev_z}) {
    std::vector<float> h = download(be, *b);
    put_floats(os, h.data(), h.size());
  }
  std::vector<float> r = download_rows();
  put_floats(os, r.data(), r.size());
}

void CompressorState::load(std::istream& is, const char* what) {
  using namespace attn_io;
  std::string w(what);
  expect_i64(is, ratio, (w + ".ratio").c_str());
  expect_i64(is, dim, (w + ".dim").c_str());
  std::streamoff at = is.tellg();
  int64_t n = get_i64(is, (w + ".n_rows").c_str());
  if (n < 0 || n > max_rows)
    fail("attention state: field %s.n_rows at stream offset %lld is %lld, capacity is %lld", what,
         (long long)at, (long long)n, (long long)max_rows);
  const char* names[4] = {".cur_v", ".cur_z", ".prev_v", ".prev_z"};
  DeviceBuffer* bufs[4] = {&cur_v, &cur_z, &prev_v, &prev_z};
  for (int i = 0; i < 4; ++i) {
    std::vector<float> h(bufs[i]->bytes() / sizeof(float));
    get_floats(is, h.data(), h.size(), (w + names[i]).c_str());
    if (!h.empty()) be->upload(bufs[i]->data(), h.data(), bufs[i]->bytes());
  }
  std::vector<float> r(size_t(n) * size_t(dim));
  get_floats(is, r.data(), r.size(), (w + ".rows").c_str());
  rows = DeviceBuffer();
  n_rows = 0;
  reserve(n);
  if (!r.empty()) be->upload(rows.data(), r.data(), r.size() * sizeof(float));
  n_rows = n;
}

}  // namespace dsv4
