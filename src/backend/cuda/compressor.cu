// Streaming compressor kernels (see compressor.h).
#include "backend/cuda/compressor.h"

#include <cstring>

#include "backend/cuda/cuda_util.h"
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

// grid (n_emit, ceil(dC / 128)): u[c] of row w = softmax-over-slots pooling, slots prev 0..m-1 then own 0..m-1.
__global__ void compressor_pool_kernel(CompressorStepParams p, int64_t w_first) {
  const int c = blockIdx.y * kThreads + threadIdx.x;
  if (c >= p.dim) return;
  const int64_t w = w_first + blockIdx.x;
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
  p.rows[w * p.dim + c] = num / den;
}

// One thread per (slot r, channel ch of c*dC): advances cur (latest pass token of residue r) and prev (A halves
// of the last window closed in the pass). Each thread reads and writes only its own (r, ch), so no races.
__global__ void compressor_update_kernel(CompressorStepParams p, int64_t n_emit) {
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

}  // namespace

int64_t compressor_step_cuda(const CompressorStepParams& p, cudaStream_t stream) {
  if (p.ratio <= 0 || p.dim <= 0 || p.T < 0 || p.pos0 < 0)
    fail("compressor_step_cuda: bad ratio %d / dim %d / T %d / pos0 %lld", p.ratio, p.dim, p.T, (long long)p.pos0);
  if (p.overlap != (p.ratio == 4)) fail("compressor_step_cuda: overlap must be set exactly for ratio 4");
  if (p.T == 0) return 0;
  const int64_t w_first = p.pos0 / p.ratio, n_emit = compressor_rows_emitted(p.pos0, p.T, p.ratio);
  if (w_first + n_emit > p.max_rows)
    fail("compressor_step_cuda: row %lld exceeds the session capacity of %lld rows (max context too small)",
         (long long)(w_first + n_emit - 1), (long long)p.max_rows);
  if (n_emit > 0) {
    dim3 grid(unsigned(n_emit), unsigned((p.dim + kThreads - 1) / kThreads));
    compressor_pool_kernel<<<grid, kThreads, 0, stream>>>(p, w_first);
    check_launch("compressor_pool_kernel");
    RowFinishParams f;
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
    row_finish_cuda(f, stream);
  }
  const int64_t n_upd = int64_t(p.ratio) * (p.overlap ? 2 * p.dim : p.dim);
  compressor_update_kernel<<<unsigned((n_upd + 255) / 256), 256, 0, stream>>>(p, n_emit);
  check_launch("compressor_update_kernel");
  return n_emit;
}

}  // namespace dsv4::cuda
