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

// argmax_usable (common/argmax.h) over many CTAs: each thread walks its elements in increasing index order
// keeping the first largest usable value; each warp's best goes into one 64-bit atomicMax on a key that orders
// (value, then lower index): high word the value's bits made order-preserving as an unsigned integer (-0 taken as
// +0: the host rule treats them as equal), low word ~index. Usable values are never -inf, so a key of 0 (the
// cudaMemsetAsync before the launch) means "none". One CTA read the 0.5 MB of Flash logits in 15 us (H200 trace,
// session 11); the atomics of 128 CTAs x 8 warps cost less than the serial walk.
constexpr int kArgmaxThreads = 256;
constexpr int kArgmaxCtas = 128;

__device__ __forceinline__ unsigned long long argmax_key(float v, int64_t i) {
  uint32_t b = __float_as_uint(v == 0.0f ? 0.0f : v);
  b = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  return (static_cast<unsigned long long>(b) << 32) | static_cast<uint32_t>(~static_cast<uint32_t>(i));
}

__device__ __forceinline__ void argmax_take(float v, int64_t i, unsigned long long& best) {
  if (!isnan(v) && v != -INFINITY) {
    const unsigned long long k = argmax_key(v, i);
    if (k > best) best = k;
  }
}

__global__ void __launch_bounds__(kArgmaxThreads) argmax_kernel(const float* x, int64_t n, unsigned long long* out) {
  unsigned long long best = 0;
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x, stride = int64_t(gridDim.x) * blockDim.x;
  int64_t tail = 0;
  if ((reinterpret_cast<uintptr_t>(x) & 15u) == 0) {
    const int64_t n4 = n / 4;
    const float4* x4 = reinterpret_cast<const float4*>(x);
    for (int64_t j = t; j < n4; j += stride) {
      const float4 v = x4[j];
      argmax_take(v.x, 4 * j, best);
      argmax_take(v.y, 4 * j + 1, best);
      argmax_take(v.z, 4 * j + 2, best);
      argmax_take(v.w, 4 * j + 3, best);
    }
    tail = 4 * n4;
  }
  for (int64_t i = tail + t; i < n; i += stride) argmax_take(x[i], i, best);
  for (int o = 16; o > 0; o >>= 1) {
    const unsigned long long other = __shfl_xor_sync(kFullMask, best, o);
    if (other > best) best = other;
  }
  if ((threadIdx.x & 31) == 0 && best != 0) atomicMax(out, best);
}

}  // namespace

void argmax_usable_cuda(const float* x, int64_t n, uint64_t* key, cudaStream_t stream) {
  if (n <= 0 || n > int64_t(UINT32_MAX)) fail("argmax_usable_cuda: n = %lld outside [1, 2^32)", (long long)n);
  check(cudaMemsetAsync(key, 0, sizeof(uint64_t), stream), "argmax_usable_cuda: clear");
  const int64_t ctas = std::min<int64_t>(kArgmaxCtas, (n + 4 * kArgmaxThreads - 1) / (4 * kArgmaxThreads));
  argmax_kernel<<<unsigned(ctas), kArgmaxThreads, 0, stream>>>(x, n, reinterpret_cast<unsigned long long*>(key));
  check(cudaGetLastError(), "argmax_kernel launch");
}

int64_t argmax_index_of_key(uint64_t key) {
  return key == 0 ? -1 : int64_t(~static_cast<uint32_t>(key & 0xFFFFFFFFu));
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
