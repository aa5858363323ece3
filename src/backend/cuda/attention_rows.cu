// Row post-processing kernel: norm, RoPE, QAT (see attention_rows.h).
#include "backend/cuda/attention_rows.h"

#include <cstdint>

#include "backend/cuda/attention_qat.cuh"
#include "backend/cuda/common.cuh"
#include "backend/cuda/cuda_util.h"
#include "common/error.h"

namespace dsv4::cuda {
namespace {

// Per-block absolute maxima as int bits: non-negative floats order like their bit patterns, so a shared int
// atomicMax is an exact float max.
__device__ __forceinline__ float block_amax(float v, int i, int n, int block, float floor_v, int* amax_bits) {
  const int n_blocks = (n + block - 1) / block;
  if (threadIdx.x < n_blocks) amax_bits[threadIdx.x] = __float_as_int(floor_v);
  __syncthreads();
  if (i < n) atomicMax(&amax_bits[i / block], __float_as_int(fabsf(v)));
  __syncthreads();
  return i < n ? __int_as_float(amax_bits[i / block]) : 0.0f;
}

// One block per row, thread i owns element i.
__global__ void row_finish_kernel(RowFinishParams p) {
  __shared__ float buf[kRowMaxDim];
  __shared__ float red[32];
  __shared__ int amax_bits[kRowMaxDim / 32];
  const int64_t r = blockIdx.x;
  const int i = threadIdx.x, d = p.d;
  float* x = p.x + r * p.stride;
  float v = i < d ? x[i] : 0.0f;

  if (p.norm != RowNorm::None) {
    const float ss = block_sum(v * v, red);
    const float inv = 1.0f / sqrtf(ss / float(d) + p.eps);  // the CPU's expression (no rsqrtf)
    v = v * inv;
    if (p.norm == RowNorm::Weighted && i < d) v = v * p.norm_w[i];
  }

  if (p.n_rot > 0) {
    buf[i] = v;
    __syncthreads();
    const int k = i - (d - p.n_rot);
    if (k >= 0 && i < d) {
      const int j = k / 2;
      const int64_t pos = p.pos0 + (r / p.rows_per_pos) * p.pos_step;
      double sd, cd;
      sincos(double(pos) * p.omega[j], &sd, &cd);
      const float c = float(cd), s = p.inverse ? -float(sd) : float(sd);
      const float a = buf[i - (k & 1)], b = buf[i - (k & 1) + 1];
      v = (k & 1) == 0 ? __fadd_rn(__fmul_rn(a, c), -__fmul_rn(b, s)) : __fadd_rn(__fmul_rn(a, s), __fmul_rn(b, c));
    }
    __syncthreads();
  }

  if (p.qat == RowQat::Fp8) {
    const int n = d - p.n_rot;
    const float amax = block_amax(v, i, n, 64, 1e-4f, amax_bits);
    if (i < n) v = qat_fp8_elem(v, qat_pow2_ceil(__fdiv_rn(amax, 448.0f)));
  } else if (p.qat == RowQat::Fp4Hadamard) {
    buf[i] = v;
    __syncthreads();
    for (int h = 1; h < d; h *= 2) {  // Sylvester butterflies, stage by stage as on the CPU
      if (i < d && (i & h) == 0) {
        const float a = buf[i], b = buf[i + h];
        buf[i] = a + b;
        buf[i + h] = a - b;
      }
      __syncthreads();
    }
    v = i < d ? buf[i] * (1.0f / sqrtf(float(d))) : 0.0f;
    const float amax = block_amax(v, i, d, 32, 6.0f * 0x1p-126f, amax_bits);
    if (i < d) v = qat_fp4_elem(v, qat_pow2_ceil(__fdiv_rn(amax, 6.0f)));
  }
  if (i < d) x[i] = v;
}


// Warp per row for the common wide case (d a multiple of 128 up to 512, no Hadamard): q heads (T x H rows per
// pass) and KV rows. Lane l holds the float4s l, l + 32, ... of its row; RoPE pairs sit inside one float4 and
// FP8 blocks of 64 are 16 consecutive float4s (half a warp), so the norm, the rotation and the block maxima need
// only warp shuffles, no block barriers: one block of 512 threads per row spent most of its time in barriers.
// Same operations per element as row_finish_kernel (the sum of squares is another tree order).
constexpr int kWarpRowMaxF4 = 4;
constexpr int kWarpRowsPerBlock = 8;

__device__ __forceinline__ float rope_elem(float a, float b, float c, float s, bool odd) {
  return odd ? __fadd_rn(__fmul_rn(a, s), __fmul_rn(b, c)) : __fadd_rn(__fmul_rn(a, c), -__fmul_rn(b, s));
}

__global__ void __launch_bounds__(kWarpRowsPerBlock * 32) row_finish_warp_kernel(RowFinishParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t r = int64_t(blockIdx.x) * kWarpRowsPerBlock + (threadIdx.x >> 5);
  if (r >= p.n_rows) return;  // whole warps only: the shuffles below stay full-warp
  const int d = p.d, n_f4 = d / 128;
  float4* x = reinterpret_cast<float4*>(p.x + r * p.stride);
  float4 v[kWarpRowMaxF4];
#pragma unroll
  for (int k = 0; k < kWarpRowMaxF4; ++k) v[k] = k < n_f4 ? x[lane + 32 * k] : make_float4(0.f, 0.f, 0.f, 0.f);

  if (p.norm != RowNorm::None) {
    float ss = 0.0f;
#pragma unroll
    for (int k = 0; k < kWarpRowMaxF4; ++k) ss += v[k].x * v[k].x + v[k].y * v[k].y + v[k].z * v[k].z + v[k].w * v[k].w;
    ss = warp_sum(ss);
    const float inv = 1.0f / sqrtf(ss / float(d) + p.eps);  // the CPU's expression (no rsqrtf)
#pragma unroll
    for (int k = 0; k < kWarpRowMaxF4; ++k) {
      v[k].x = v[k].x * inv, v[k].y = v[k].y * inv, v[k].z = v[k].z * inv, v[k].w = v[k].w * inv;
      if (p.norm == RowNorm::Weighted && k < n_f4) {
        const float4 w = reinterpret_cast<const float4*>(p.norm_w)[lane + 32 * k];
        v[k].x = v[k].x * w.x, v[k].y = v[k].y * w.y, v[k].z = v[k].z * w.z, v[k].w = v[k].w * w.w;
      }
    }
  }

  if (p.n_rot > 0) {
    const int64_t pos = p.pos0 + (r / p.rows_per_pos) * p.pos_step;
#pragma unroll
    for (int k = 0; k < kWarpRowMaxF4; ++k) {
      const int i0 = 4 * (lane + 32 * k) - (d - p.n_rot);  // rotary index of the float4's first element
      if (k >= n_f4 || i0 < 0) continue;
      float4& u = v[k];
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // pairs (x, y) and (z, w)
        double sd, cd;
        sincos(double(pos) * p.omega[i0 / 2 + h], &sd, &cd);
        const float c = float(cd), sn = p.inverse ? -float(sd) : float(sd);
        float& a = h == 0 ? u.x : u.z;
        float& b = h == 0 ? u.y : u.w;
        const float ra = rope_elem(a, b, c, sn, false), rb = rope_elem(a, b, c, sn, true);
        a = ra, b = rb;
      }
    }
  }

  if (p.qat == RowQat::Fp8) {  // blocks of 64 over dims 0 .. d - n_rot - 1: 16 lanes per block per k
    const int n = d - p.n_rot;
#pragma unroll
    for (int k = 0; k < kWarpRowMaxF4; ++k) {
      const int i0 = 4 * (lane + 32 * k);
      float a = 0.0f;
      if (k < n_f4) {
        if (i0 + 0 < n) a = fmaxf(a, fabsf(v[k].x));
        if (i0 + 1 < n) a = fmaxf(a, fabsf(v[k].y));
        if (i0 + 2 < n) a = fmaxf(a, fabsf(v[k].z));
        if (i0 + 3 < n) a = fmaxf(a, fabsf(v[k].w));
      }
#pragma unroll
      for (int o = 1; o < 16; o <<= 1) a = fmaxf(a, __shfl_xor_sync(kFullMask, a, o));
      const float sc = qat_pow2_ceil(__fdiv_rn(fmaxf(a, 1e-4f), 448.0f));
      if (k < n_f4) {
        if (i0 + 0 < n) v[k].x = qat_fp8_elem(v[k].x, sc);
        if (i0 + 1 < n) v[k].y = qat_fp8_elem(v[k].y, sc);
        if (i0 + 2 < n) v[k].z = qat_fp8_elem(v[k].z, sc);
        if (i0 + 3 < n) v[k].w = qat_fp8_elem(v[k].w, sc);
      }
    }
  }
#pragma unroll
  for (int k = 0; k < kWarpRowMaxF4; ++k)
    if (k < n_f4) x[lane + 32 * k] = v[k];
}

}  // namespace

void row_finish_cuda(const RowFinishParams& p_in, cudaStream_t stream) {
  RowFinishParams p = p_in;
  if (p.d <= 0 || p.d > kRowMaxDim) fail("row_finish_cuda: row width %d outside 1..%d", p.d, kRowMaxDim);
  if (p.n_rot < 0 || p.n_rot % 2 || p.n_rot / 2 > kRowMaxPairs || p.n_rot > p.d)
    fail("row_finish_cuda: n_rot %d must be even, <= %d and <= d %d", p.n_rot, 2 * kRowMaxPairs, p.d);
  if (p.qat == RowQat::Fp4Hadamard && (p.d & (p.d - 1)) != 0)
    fail("row_finish_cuda: Hadamard needs a power-of-two width, got %d", p.d);
  if (p.norm == RowNorm::Weighted && !p.norm_w) fail("row_finish_cuda: weighted norm without weights");
  if (p.rows_per_pos <= 0) fail("row_finish_cuda: rows_per_pos %d must be positive", p.rows_per_pos);
  if (p.stride == 0) p.stride = p.d;
  if (p.n_rows <= 0) return;
  const bool aligned = p.stride % 4 == 0 && reinterpret_cast<uintptr_t>(p.x) % 16 == 0 &&
                       (p.norm != RowNorm::Weighted || reinterpret_cast<uintptr_t>(p.norm_w) % 16 == 0);
  // The warp kernel needs whole float4s on each side of the rotary boundary (RoPE pairs inside one float4).
  if (p.qat != RowQat::Fp4Hadamard && p.d % 128 == 0 && p.d <= 128 * kWarpRowMaxF4 && (p.d - p.n_rot) % 4 == 0 &&
      aligned) {
    const int64_t blocks = (p.n_rows + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock;
    row_finish_warp_kernel<<<unsigned(blocks), kWarpRowsPerBlock * 32, 0, stream>>>(p);
    check_launch("row_finish_warp_kernel");
    return;
  }
  const int threads = (p.d + 31) / 32 * 32;
  row_finish_kernel<<<unsigned(p.n_rows), unsigned(threads), 0, stream>>>(p);
  check_launch("row_finish_kernel");
}

}  // namespace dsv4::cuda
