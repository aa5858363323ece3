// Streaming compressor kernels (see compressor.h).
#include "backend/cuda/compressor.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "backend/cuda/attention_rows.cuh"
#include "backend/cuda/cuda_util.h"
#include "backend/cuda/pdl.cuh"
#include "common/error.h"

namespace dsv4::cuda {
namespace {

constexpr int kThreads = 128;

struct Slot {
  float v, z;
};

// Channel ch (of c*dC) of the token at position q = window_base + r (slot r): from the pass, the open window
// at the start of the pass, or (A halves of a window closed before the pass) the prev buffers.
__device__ __forceinline__ Slot slot_value(const CompressorStepParams& p, int64_t q, int r, int ch,
                                           int64_t open_start) {
  const int width = p.overlap ? 2 * p.dim : p.dim;
  if (q >= p.pos0) {
    const int64_t o = (q - p.pos0) * width + ch;
    return {p.v[o], p.z[o] + p.ape[int64_t(r) * width + ch]};
  }
  if (q >= open_start) return {p.cur_v[int64_t(r) * width + ch], p.cur_z[int64_t(r) * width + ch]};
  return {p.prev_v[int64_t(r) * p.dim + ch], p.prev_z[int64_t(r) * p.dim + ch]};
}

// u[c] of row w = softmax-over-slots pooling, slots prev 0..m-1 then own 0..m-1.
__device__ __forceinline__ float pool_channel(const CompressorStepParams& p, int64_t w, int c) {
  const int m = p.ratio, boff = p.overlap ? p.dim : 0;
  const int64_t open_start = p.pos0 / m * m;
  float zmax = -INFINITY;
  if (p.overlap)
    for (int r = 0; r < m; ++r) zmax = fmaxf(zmax, slot_value(p, (w - 1) * m + r, r, c, open_start).z);
  for (int r = 0; r < m; ++r) zmax = fmaxf(zmax, slot_value(p, w * m + r, r, boff + c, open_start).z);
  float num = 0.0f, den = 0.0f;
  if (p.overlap) {
    for (int r = 0; r < m; ++r) {
      const Slot s = slot_value(p, (w - 1) * m + r, r, c, open_start);
      const float e = expf(s.z - zmax);  // -inf gates give exactly 0
      num += e * s.v;
      den += e;
    }
  }
  for (int r = 0; r < m; ++r) {
    const Slot s = slot_value(p, w * m + r, r, boff + c, open_start);
    const float e = expf(s.z - zmax);
    num += e * s.v;
    den += e;
  }
  return num / den;
}

// grid (n_emit, ceil(dC / 128)): channel c of row w_first + blockIdx.x.
__global__ void compressor_pool_kernel(CompressorStepParams p, int64_t w_first) {
  pdl_trigger();
  pdl_wait();  // PDL (pdl.cuh): every input may come from the previous kernel
  const int c = blockIdx.y * kThreads + threadIdx.x;
  if (c >= p.dim) return;
  const int64_t w = w_first + blockIdx.x;
  p.rows[w * p.dim + c] = pool_channel(p, w, c);
}

// One thread per (slot r, channel ch of c*dC): advances cur (latest pass token of residue r) and prev (A halves
// of the last window closed in the pass). Each thread reads and writes only its own (r, ch), so no races.
__global__ void compressor_update_kernel(CompressorStepParams p, int64_t n_emit) {
  pdl_trigger();
  pdl_wait();  // PDL (pdl.cuh): every input may come from the previous kernel
  const int width = p.overlap ? 2 * p.dim : p.dim;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= int64_t(p.ratio) * width) return;
  const int r = int(idx / width), ch = int(idx % width), m = p.ratio;
  const int64_t open_start = p.pos0 / m * m;
  if (p.overlap && n_emit > 0 && ch < p.dim) {
    const int64_t w_last = p.pos0 / m + n_emit - 1;
    const Slot s = slot_value(p, w_last * m + r, r, ch, open_start);
    p.prev_v[int64_t(r) * p.dim + ch] = s.v;
    p.prev_z[int64_t(r) * p.dim + ch] = s.z;
  }
  const int64_t e = p.pos0 + p.T - 1;
  const int64_t q = e - ((e - r) % m + m) % m;  // last position <= e with q mod m == r
  if (q >= p.pos0) {
    const int64_t o = (q - p.pos0) * width + ch;
    p.cur_v[idx] = p.v[o];
    p.cur_z[idx] = p.z[o] + p.ape[idx];
  }
}

// Decode (T == 1), the whole step in ONE block of round32(dC) threads instead of up to three launches (pool over
// dC / 128 CTAs, row_finish, and an update grid of m x width threads of which only one slot's do work):
//   emit  (the token closes window w) thread c pools channel c into rows[w] (pool_channel), the block finishes
//         the row (row_finish_row: the block size row_finish_cuda uses, so the same bits), then the A halves
//         of window w become prev (overlap)
//   always the token's own slot r0 = pos0 mod m of cur takes v and z + ape
// Same expressions as compressor_pool_kernel / row_finish_kernel / compressor_update_kernel. Hazards: pooling
// reads prev, which the update rewrites (a barrier between them); the prev update reads slot r0 of window w
// from the pass inputs (slot_value: position pos0), never from cur, so the cur write does not race it.
// The body by the whole block (blockDim.x >= round32(dC); extra threads only join the row's reductions, which
// leaves their bits unchanged: attention_rows.cuh).
__device__ __forceinline__ void decode_step(const CompressorStepParams& p, const RowFinishParams& f, int emit,
                                            RowShared& sh) {
  const int m = p.ratio, width = p.overlap ? 2 * p.dim : p.dim, tid = threadIdx.x;
  const int64_t w = p.pos0 / m, open_start = w * m;
  const int r0 = int(p.pos0 - open_start);
  if (emit) {
    if (tid < p.dim) p.rows[w * p.dim + tid] = pool_channel(p, w, tid);
    row_finish_row(f, 0, sh);  // thread i reads back element i, which it wrote itself
    __syncthreads();           // every read of prev by the pooling is done
    if (p.overlap)
      for (int idx = tid; idx < m * p.dim; idx += blockDim.x) {
        const int r = idx / p.dim, ch = idx % p.dim;
        const Slot s = slot_value(p, w * m + r, r, ch, open_start);
        p.prev_v[idx] = s.v;
        p.prev_z[idx] = s.z;
      }
  }
  for (int ch = tid; ch < width; ch += blockDim.x) {
    const int64_t idx = int64_t(r0) * width + ch;
    p.cur_v[idx] = p.v[ch];
    p.cur_z[idx] = p.z[ch] + p.ape[idx];
  }
}

__global__ void compressor_decode_kernel(CompressorStepParams p, RowFinishParams f, int emit) {
  pdl_trigger();
  pdl_wait();  // PDL (pdl.cuh): every input may come from the previous kernel
  __shared__ RowShared sh;
  decode_step(p, f, emit, sh);
}

// Two independent compressors (a CSA layer's main and indexer compressors), block 0 and block 1.
__global__ void compressor_decode_pair_kernel(CompressorStepParams a, RowFinishParams fa, int ea,
                                              CompressorStepParams b, RowFinishParams fb, int eb) {
  pdl_trigger();
  pdl_wait();  // PDL (pdl.cuh): every input may come from the previous kernel
  __shared__ RowShared sh;
  if (blockIdx.x == 0) decode_step(a, fa, ea, sh);
  else decode_step(b, fb, eb, sh);
}

bool decode_kernel_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("DSV4_CUDA_COMPRESSOR_KERNEL");
    return !(e && e[0] == '0' && e[1] == 0);
  }();
  return on;
}

bool uses_decode_kernel(const CompressorStepParams& p) {
  return p.T == 1 && p.decode_kernel && decode_kernel_enabled();
}

// Checks p; fills f (the emitted rows' finishing) and returns the number of rows the call emits.
int64_t prepare(const CompressorStepParams& p, RowFinishParams& f) {
  if (p.ratio <= 0 || p.dim <= 0 || p.T < 0 || p.pos0 < 0)
    fail("compressor_step_cuda: bad ratio %d / dim %d / T %d / pos0 %lld", p.ratio, p.dim, p.T, (long long)p.pos0);
  if (p.overlap != (p.ratio == 4)) fail("compressor_step_cuda: overlap must be set exactly for ratio 4");
  f = RowFinishParams();
  if (p.T == 0) return 0;  // nothing to do (no capacity check, as before)
  const int64_t w_first = p.pos0 / p.ratio, n_emit = compressor_rows_emitted(p.pos0, p.T, p.ratio);
  if (w_first + n_emit > p.max_rows)
    fail("compressor_step_cuda: row %lld exceeds the session capacity of %lld rows (max context too small)",
         (long long)(w_first + n_emit - 1), (long long)p.max_rows);
  f.x = p.rows + w_first * p.dim;
  f.n_rows = n_emit;
  f.d = p.dim;
  f.norm = RowNorm::Weighted;
  f.norm_w = p.norm_w;
  f.eps = p.eps;
  f.n_rot = p.n_rot;
  f.pos0 = w_first * p.ratio;
  f.pos_step = p.ratio;
  std::memcpy(f.omega, p.omega, sizeof f.omega);
  f.qat = p.qat;
  if (uses_decode_kernel(p)) {
    if (n_emit > 0) row_finish_check(f);  // as row_finish_cuda would on the general path (stride = d)
    if (p.dim > kRowMaxDim) fail("compressor_step_cuda: row width %d > %d", p.dim, kRowMaxDim);
  }
  return n_emit;
}

}  // namespace

int64_t compressor_step_cuda(const CompressorStepParams& p, cudaStream_t stream) {
  RowFinishParams f;
  const int64_t n_emit = prepare(p, f);
  if (p.T == 0) return 0;
  const int64_t w_first = p.pos0 / p.ratio;
  if (uses_decode_kernel(p)) {
    launch_pdl("compressor_decode_kernel", compressor_decode_kernel, dim3(1), dim3(unsigned((p.dim + 31) / 32 * 32)), 0,
               stream, p, f, int(n_emit));
    return n_emit;
  }
  if (n_emit > 0) {
    dim3 grid(unsigned(n_emit), unsigned((p.dim + kThreads - 1) / kThreads));
    launch_pdl("compressor_pool_kernel", compressor_pool_kernel, grid, dim3(kThreads), 0, stream, p, w_first);
    row_finish_cuda(f, stream);
  }
  const int64_t n_upd = int64_t(p.ratio) * (p.overlap ? 2 * p.dim : p.dim);
  launch_pdl("compressor_update_kernel", compressor_update_kernel, dim3(unsigned((n_upd + 255) / 256)), dim3(256), 0,
             stream, p, n_emit);
  return n_emit;
}

void compressor_step_pair_cuda(const CompressorStepParams& a, const CompressorStepParams& b, cudaStream_t stream) {
  if (!uses_decode_kernel(a) || !uses_decode_kernel(b)) {
    compressor_step_cuda(a, stream);
    compressor_step_cuda(b, stream);
    return;
  }
  RowFinishParams fa, fb;
  const int64_t ea = prepare(a, fa), eb = prepare(b, fb);
  const int threads = (std::max(a.dim, b.dim) + 31) / 32 * 32;
  launch_pdl("compressor_decode_pair_kernel", compressor_decode_pair_kernel, dim3(2), dim3(unsigned(threads)), 0,
             stream, a, fa, int(ea), b, fb, int(eb));
}

}  // namespace dsv4::cuda
