// Row post-processing kernel: norm, RoPE, QAT (see attention_rows.h).
#include "backend/cuda/attention_rows.h"

#include <algorithm>

#include "backend/cuda/attention_rows.cuh"
#include "backend/cuda/cuda_util.h"
#include "backend/cuda/pdl.cuh"
#include "common/error.h"

namespace dsv4::cuda {
namespace {

// One block per row.
__global__ void row_finish_kernel(RowFinishParams p) {
  pdl_trigger();
  pdl_wait();  // PDL (pdl.cuh): every input may come from the previous kernel
  __shared__ RowShared sh;
  row_finish_row(p, blockIdx.x, sh);
}

// One block per row of all jobs, job j's rows after job j-1's. The job is picked with constant indices (each
// branch inlines row_finish_row on its own parameter block) so the parameters stay in the constant bank.
__global__ void row_finish_batch_kernel(RowFinishBatch b) {
  pdl_trigger();
  pdl_wait();  // PDL (pdl.cuh): every input may come from the previous kernel
  __shared__ RowShared sh;
  int64_t r = blockIdx.x;
  if (r < b.job[0].n_rows) return row_finish_row(b.job[0], r, sh);
  r -= b.job[0].n_rows;
  if (r < b.job[1].n_rows) return row_finish_row(b.job[1], r, sh);
  r -= b.job[1].n_rows;
  row_finish_row(b.job[2], r, sh);
}

}  // namespace

void row_finish_check(RowFinishParams& p) {
  if (p.d <= 0 || p.d > kRowMaxDim) fail("row_finish_cuda: row width %d outside 1..%d", p.d, kRowMaxDim);
  if (p.n_rot < 0 || p.n_rot % 2 || p.n_rot / 2 > kRowMaxPairs || p.n_rot > p.d)
    fail("row_finish_cuda: n_rot %d must be even, <= %d and <= d %d", p.n_rot, 2 * kRowMaxPairs, p.d);
  if (p.qat == RowQat::Fp4Hadamard && (p.d & (p.d - 1)) != 0)
    fail("row_finish_cuda: Hadamard needs a power-of-two width, got %d", p.d);
  if (p.norm == RowNorm::Weighted && !p.norm_w) fail("row_finish_cuda: weighted norm without weights");
  if (p.rows_per_pos <= 0) fail("row_finish_cuda: rows_per_pos %d must be positive", p.rows_per_pos);
  if (p.q8 && p.d % 32 != 0) fail("row_finish_cuda: Q8 output needs a width multiple of 32, got %d", p.d);
  if (p.stride == 0) p.stride = p.d;
}

void row_finish_cuda(const RowFinishParams& p_in, cudaStream_t stream) {
  RowFinishParams p = p_in;
  row_finish_check(p);
  if (p.n_rows <= 0) return;
  const int threads = (p.d + 31) / 32 * 32;
  launch_pdl("row_finish_kernel", row_finish_kernel, dim3(unsigned(p.n_rows)), dim3(unsigned(threads)), 0, stream, p);
}

void row_finish_batch_cuda(const RowFinishBatch& b_in, cudaStream_t stream) {
  RowFinishBatch b = b_in;
  if (b.n_jobs < 1 || b.n_jobs > kRowMaxJobs) fail("row_finish_batch_cuda: %d jobs (1..%d)", b.n_jobs, kRowMaxJobs);
  int64_t rows = 0;
  int width = 0;
  for (int j = 0; j < kRowMaxJobs; ++j) {
    RowFinishParams& p = b.job[j];
    if (j >= b.n_jobs) {
      p.n_rows = 0;  // unused slots: no rows
      continue;
    }
    row_finish_check(p);
    if (p.q8) fail("row_finish_batch_cuda: job %d asks for Q8 output (single jobs only)", j);
    if (p.n_rows < 0) fail("row_finish_batch_cuda: job %d has %lld rows", j, (long long)p.n_rows);
    rows += p.n_rows;
    width = std::max(width, p.d);
  }
  if (rows <= 0) return;
  const int threads = (width + 31) / 32 * 32;
  launch_pdl("row_finish_batch_kernel", row_finish_batch_kernel, dim3(unsigned(rows)), dim3(unsigned(threads)), 0,
             stream, b);
}

}  // namespace dsv4::cuda
