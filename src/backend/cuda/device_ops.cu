// Small device kernels of the CUDA op table (see device_ops.h).
#include "backend/cuda/device_ops.h"

#include <algorithm>

#include "backend/cuda/common.cuh"
#include "backend/cuda/cuda_util.h"
#include "backend/cuda/pdl.cuh"
#include "common/error.h"
#include "quant/blocks.h"

namespace dsv4::cuda {
namespace {

constexpr int kThreads = 256;

unsigned blocks_for(int64_t n) { return unsigned(std::max<int64_t>(1, (n + kThreads - 1) / kThreads)); }

__global__ void fill_kernel(float* dst, float value, size_t n) {
  pdl_trigger();
  pdl_wait();  // PDL contract (pdl.cuh): nothing read or written before the previous kernel is done
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    dst[i] = value;
}

// One CTA per (token, column chunk): decode the element once, store it to every stream.
template <QType kType>
__global__ void embed_kernel(const uint8_t* table, int64_t vocab, int64_t dim, const int32_t* tokens,
                             int n_streams, float* X) {
  pdl_trigger();
  pdl_wait();  // PDL contract (pdl.cuh): nothing read or written before the previous kernel is done
  const int t = blockIdx.y;
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= dim) return;
  const int32_t tok = tokens[t];
  float v = 0.0f;
  if (tok >= 0 && tok < vocab) {
    if constexpr (kType == QType::F32) {
      v = reinterpret_cast<const float*>(table)[int64_t(tok) * dim + c];
    } else if constexpr (kType == QType::F16) {
      v = f16_to_f32(reinterpret_cast<const uint16_t*>(table)[int64_t(tok) * dim + c]);
    } else {  // Q8_0: 34-byte blocks {f16 d; int8 qs[32]}, the same product as dequant_q8_0 on the CPU
      const uint8_t* blk = table + int64_t(tok) * (dim / kQK8_0) * 34 + (c / kQK8_0) * 34;
      const uint16_t d = uint16_t(blk[0]) | uint16_t(uint16_t(blk[1]) << 8);
      v = f16_to_f32(d) * float(int8_t(blk[2 + c % kQK8_0]));
    }
  }
  float* x = X + int64_t(t) * n_streams * dim + c;
  for (int s = 0; s < n_streams; ++s) x[int64_t(s) * dim] = v;
}

__global__ void hash_ids_kernel(const int32_t* table, int64_t vocab, int k, const int32_t* tokens, int T,
                                int32_t* ids) {
  pdl_trigger();
  pdl_wait();  // PDL contract (pdl.cuh): nothing read or written before the previous kernel is done
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= T * k) return;
  const int32_t tok = tokens[i / k];
  ids[i] = (tok >= 0 && tok < vocab) ? table[int64_t(tok) * k + i % k] : 0;
}

__global__ void ramp_kernel(int32_t* ids, int64_t n, int period) {
  pdl_trigger();
  pdl_wait();  // PDL contract (pdl.cuh): nothing read or written before the previous kernel is done
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) ids[i] = int32_t(i % period);
}

// argmax_usable (common/argmax.h) in one CTA: each thread walks its elements in increasing index order keeping
// the first largest usable value, then the (value, index) pairs are merged preferring the larger value and, on
// equal values, the lower index: the host rule's result. float4 loads when x is 16-byte aligned.
constexpr int kArgmaxThreads = 1024;

__device__ __forceinline__ bool argmax_better(float v, int64_t i, float bv, int64_t bi) {
  return i >= 0 && (bi < 0 || v > bv || (v == bv && i < bi));
}

__device__ __forceinline__ void argmax_take(float v, int64_t i, float& bv, int64_t& bi) {
  if (!isnan(v) && v != -INFINITY && (bi < 0 || v > bv)) bv = v, bi = i;
}

__global__ void __launch_bounds__(kArgmaxThreads) argmax_kernel(const float* x, int64_t n, int64_t* out) {
  float bv = 0.0f;
  int64_t bi = -1;
  const int64_t t = threadIdx.x;
  int64_t tail = 0;
  if ((reinterpret_cast<uintptr_t>(x) & 15u) == 0) {
    const int64_t n4 = n / 4;
    const float4* x4 = reinterpret_cast<const float4*>(x);
#pragma unroll 4
    for (int64_t j = t; j < n4; j += kArgmaxThreads) {
      const float4 v = x4[j];
      argmax_take(v.x, 4 * j, bv, bi);
      argmax_take(v.y, 4 * j + 1, bv, bi);
      argmax_take(v.z, 4 * j + 2, bv, bi);
      argmax_take(v.w, 4 * j + 3, bv, bi);
    }
    tail = 4 * n4;
  }
  // The scalar part (everything when x is misaligned) comes after the float4 part in index order, so the
  // "first largest" rule of each thread still holds.
  for (int64_t i = tail + t; i < n; i += kArgmaxThreads) argmax_take(x[i], i, bv, bi);
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(kFullMask, bv, o);
    const int64_t oi = __shfl_xor_sync(kFullMask, bi, o);
    if (argmax_better(ov, oi, bv, bi)) bv = ov, bi = oi;
  }
  __shared__ float s_v[kArgmaxThreads / 32];
  __shared__ int64_t s_i[kArgmaxThreads / 32];
  const int warp = int(t >> 5), lane = int(t & 31);
  if (lane == 0) s_v[warp] = bv, s_i[warp] = bi;
  __syncthreads();
  if (warp != 0) return;
  bv = s_v[lane], bi = s_i[lane];
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(kFullMask, bv, o);
    const int64_t oi = __shfl_xor_sync(kFullMask, bi, o);
    if (argmax_better(ov, oi, bv, bi)) bv = ov, bi = oi;
  }
  if (lane == 0) *out = bi;
}

}  // namespace

void argmax_usable_cuda(const float* x, int64_t n, int64_t* out, cudaStream_t stream) {
  if (n <= 0) fail("argmax_usable_cuda: n = %lld", (long long)n);
  argmax_kernel<<<1, kArgmaxThreads, 0, stream>>>(x, n, out);
  check(cudaGetLastError(), "argmax_kernel launch");
}

void fill_f32_cuda(float* dst, float value, size_t n, cudaStream_t stream) {
  if (n == 0) return;
  const unsigned grid = unsigned(std::min<size_t>((n + kThreads - 1) / kThreads, 4096));
  launch_pdl("fill_kernel", fill_kernel, grid, kThreads, 0, stream, dst, value, n);
}

bool embed_supports(QType type) { return type == QType::F32 || type == QType::F16 || type == QType::Q8_0; }

void embed_rows_cuda(QType type, const void* table, int64_t vocab, int64_t dim, const int32_t* tokens, int T,
                     int n_streams, float* X, cudaStream_t stream) {
  if (T <= 0) return;
  if (dim <= 0 || (type == QType::Q8_0 && dim % kQK8_0 != 0) || T > 65535)
    fail("embed_rows_cuda: bad shape dim=%lld T=%d for %s", (long long)dim, T, qtype_name(type).c_str());
  const dim3 grid(blocks_for(dim), unsigned(T));
  const auto* tb = static_cast<const uint8_t*>(table);
  void (*kernel)(const uint8_t*, int64_t, int64_t, const int32_t*, int, float*) = nullptr;
  switch (type) {
    case QType::F32: kernel = embed_kernel<QType::F32>; break;
    case QType::F16: kernel = embed_kernel<QType::F16>; break;
    case QType::Q8_0: kernel = embed_kernel<QType::Q8_0>; break;
    default: fail("embed_rows_cuda: no device decoder for %s", qtype_name(type).c_str());
  }
  launch_pdl("embed_kernel", kernel, grid, kThreads, 0, stream, tb, vocab, dim, tokens, n_streams, X);
}

void gather_hash_ids_cuda(const int32_t* table, int64_t vocab, int k, const int32_t* tokens, int T, int32_t* ids,
                          cudaStream_t stream) {
  if (T <= 0) return;
  launch_pdl("hash_ids_kernel", hash_ids_kernel, blocks_for(int64_t(T) * k), kThreads, 0, stream, table, vocab, k,
             tokens, T, ids);
}

void ramp_mod_cuda(int32_t* ids, int64_t n, int period, cudaStream_t stream) {
  if (n <= 0) return;
  if (period <= 0) fail("ramp_mod_cuda: period %d", period);
  launch_pdl("ramp_kernel", ramp_kernel, blocks_for(n), kThreads, 0, stream, ids, n, period);
}

}  // namespace dsv4::cuda
