// Op-table attention ops on device pointers (see attention_ops.h).
#include "backend/cuda/attention_ops.h"

#include <algorithm>

#include "backend/cuda/attention.h"
#include "backend/cuda/attention_rows.h"
#include "backend/cuda/compressor.h"
#include "backend/cuda/indexer.h"
#include "common/error.h"

namespace dsv4::cuda {
namespace {

RowQat row_qat(AttnQat q) {
  switch (q) {
    case AttnQat::None: return RowQat::None;
    case AttnQat::Fp8: return RowQat::Fp8;
    case AttnQat::Fp4Indexer: return RowQat::Fp4Hadamard;
  }
  return RowQat::None;
}

static_assert(kAttnMaxRotPairs == kRowMaxPairs, "copy_omega fills both tables");

// Copies a RoPE table into a kernel parameter block; returns n_rot (0 without a table).
int copy_omega(const RopeFreqs* rope, double* omega) {
  if (!rope) return 0;
  if (rope->n_rot / 2 > kRowMaxPairs || size_t(rope->n_rot / 2) > rope->omega.size())
    fail("cuda attention: RoPE table of %d rotary dims (max %d)", rope->n_rot, 2 * kRowMaxPairs);
  std::copy_n(rope->omega.begin(), rope->n_rot / 2, omega);
  return rope->n_rot;
}

SinkAttnLaunch sink_launch(const SinkAttnParams& p, int T, int64_t p0) {
  SinkAttnLaunch L;
  L.T = T, L.H = p.heads, L.dh = p.dim, L.pos0 = p0, L.window = p.window, L.scale = p.scale;
  if (p.comp != CompRows::None) L.ratio = p.ratio;
  if (p.comp == CompRows::Selected) L.top_k = p.top_k;
  return L;
}

RowFinishParams row_finish_params(float* x, int T, int H, int dim, const HeadPrep& p, const float* norm_w) {
  RowFinishParams f;
  f.x = x, f.n_rows = int64_t(T) * H, f.d = dim;
  f.norm = !p.norm ? RowNorm::None : (norm_w ? RowNorm::Weighted : RowNorm::Unweighted);
  f.norm_w = norm_w, f.eps = p.eps;
  f.n_rot = copy_omega(p.rope, f.omega);
  f.pos0 = p.pos0, f.pos_step = 1, f.rows_per_pos = H, f.inverse = p.inverse;
  f.qat = row_qat(p.qat);
  return f;
}

IndexerLaunch indexer_launch(const IndexerParams& p, int T, int64_t p0) {
  IndexerLaunch L;
  L.T = T, L.HI = p.heads, L.dI = p.dim, L.pos0 = p0, L.ratio = p.ratio, L.k = p.top_k;
  L.weight_scale = p.weight_scale;
  return L;
}

}  // namespace

void head_prep_device(float* x, int T, int H, int dim, const HeadPrep& p, const float* norm_w, cudaStream_t stream,
                      void* q8) {
  RowFinishParams f = row_finish_params(x, T, H, dim, p, norm_w);
  f.q8 = q8;
  row_finish_cuda(f, stream);
}

void head_prep_batch_device(const HeadPrepJob* jobs, const float* const* norm_w, int n, int T, cudaStream_t stream) {
  if (n <= 0) return;
  if (n > kRowMaxJobs) fail("head_prep_batch_device: %d jobs (at most %d)", n, kRowMaxJobs);
  RowFinishBatch b;
  b.n_jobs = n;
  for (int j = 0; j < n; ++j) b.job[j] = row_finish_params(jobs[j].x, T, jobs[j].H, jobs[j].dim, jobs[j].p, norm_w[j]);
  row_finish_batch_cuda(b, stream);
}

namespace {

CompressorStepParams step_params(const CompressorParams& p, const CompressorBuffers& s, const float* ape,
                                 const float* norm_w, const float* v, const float* z, int T, int64_t p0) {
  CompressorStepParams c;
  c.ratio = s.ratio, c.dim = s.dim, c.overlap = s.overlap, c.pos0 = p0, c.T = T;
  c.v = v, c.z = z, c.ape = ape;
  c.cur_v = s.cur_v, c.cur_z = s.cur_z, c.prev_v = s.prev_v, c.prev_z = s.prev_z, c.rows = s.rows;
  c.max_rows = (p0 + T) / s.ratio;  // the op's contract: capacity >= (p0 + T) / m
  c.norm_w = norm_w, c.eps = p.eps, c.n_rot = copy_omega(p.rope, c.omega), c.qat = row_qat(p.qat);
  return c;
}

}  // namespace

void compressor_step_device(const CompressorParams& p, const CompressorBuffers& s, const float* ape,
                            const float* norm_w, const float* v, const float* z, int T, int64_t p0,
                            cudaStream_t stream) {
  compressor_step_cuda(step_params(p, s, ape, norm_w, v, z, T, p0), stream);
}

void compressor_step_pair_device(const CompressorJob& a, const float* ape_a, const float* norm_a,
                                 const CompressorJob& b, const float* ape_b, const float* norm_b, int T, int64_t p0,
                                 cudaStream_t stream) {
  compressor_step_pair_cuda(step_params(*a.p, a.s, ape_a, norm_a, a.v, a.z, T, p0),
                            step_params(*b.p, b.s, ape_b, norm_b, b.v, b.z, T, p0), stream);
}

int64_t indexer_topk_scratch_floats(const IndexerParams& p, int T, int64_t p0) {
  return indexer_scratch_floats(indexer_launch(p, T, p0));
}

void indexer_topk_device(const IndexerParams& p, const float* qI, const float* wI, const float* keys, int T,
                         int64_t p0, int32_t* sel, float* scratch, cudaStream_t stream) {
  IndexerLaunch L = indexer_launch(p, T, p0);
  L.q = qI, L.w = wI, L.keys = keys, L.sel = sel;
  indexer_select_cuda(L, scratch, stream);
}

int64_t sink_attention_scratch_floats(const SinkAttnParams& p, int T, int64_t p0) {
  SinkAttnLaunch L = sink_launch(p, T, p0);
  L.kv_new = reinterpret_cast<const float*>(16);  // shape-only query: any non-null row pointers
  L.ring = L.kv_new;
  if (p.comp != CompRows::None) L.comp = L.kv_new;
  if (p.comp == CompRows::Selected) L.comp_idx = reinterpret_cast<const int32_t*>(16);
  return sink_attention_scratch_floats(L);
}

void sink_attention_device(const SinkAttnParams& p, const float* sinks, const float* q, const float* kv_new,
                           const float* ring, const float* comp, const int32_t* sel, int T, int64_t p0, float* out,
                           float* scratch, cudaStream_t stream, void* q8, int64_t q8_cols) {
  SinkAttnLaunch L = sink_launch(p, T, p0);
  L.q = q, L.out = out, L.sinks = sinks, L.kv_new = kv_new, L.ring = ring;
  L.q8 = q8, L.q8_cols = q8 ? q8_cols : 0;
  if (p.comp != CompRows::None) L.comp = comp;
  if (p.comp == CompRows::Selected) L.comp_idx = sel;
  L.n_rot = copy_omega(p.out_rope, L.omega);
  // The op's contract: with store_window, ring is the session's writable ring buffer.
  if (p.store_window) L.ring_out = const_cast<float*>(ring);
  sink_attention_cuda(L, scratch, stream);
}

}  // namespace dsv4::cuda
