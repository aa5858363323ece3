// Tensor-core building blocks of the attention kernels (sink attention, indexer scores): ldmatrix loads,
// mma.sync m16n8k16 (fp16 inputs, fp32 accumulators) and the hi/lo fp16 split that keeps fp32-level accuracy:
// x = hi + lo with hi = fp16(x), lo = fp16(x - hi) (the difference is exact in fp32), and a product of two split
// operands taken as hi*hi + lo*hi + hi*lo (the dropped lo*lo is ~2^-22 relative). Values beyond the fp16 range
// (65504) become inf. Included only by .cu files.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace dsv4::cuda::tcore {

__device__ __forceinline__ uint32_t smem_u32(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
// c += a * b, m16n8k16, fp16 inputs, fp32 accumulators.
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// hi*hi + lo*hi + hi*lo: the product of two hi/lo-split operands to ~2^-22 relative.
__device__ __forceinline__ void mma3(float (&c)[4], const uint32_t (&ah)[4], const uint32_t (&al)[4], uint32_t bh0,
                                     uint32_t bh1, uint32_t bl0, uint32_t bl1) {
  mma(c, ah, bh0, bh1);
  mma(c, al, bh0, bh1);
  mma(c, ah, bl0, bl1);
}

__device__ __forceinline__ uint32_t h2_bits(__half2 h) { return *reinterpret_cast<uint32_t*>(&h); }
// x = hi + lo with hi = fp16(x) and lo = fp16(x - hi) (x - hi is exact in fp32).
__device__ __forceinline__ void split2(float a, float b, uint32_t& hi, uint32_t& lo) {
  const __half2 h = __floats2half2_rn(a, b);
  const float2 f = __half22float2(h);
  hi = h2_bits(h);
  lo = h2_bits(__floats2half2_rn(a - f.x, b - f.y));
}
// Stores the split of 4 floats; returns whether any lo part is nonzero (-0 counts as nonzero: harmless).
__device__ __forceinline__ bool store_split4(float4 v, __half* hi, __half* lo) {
  uint2 h, l;
  split2(v.x, v.y, h.x, l.x);
  split2(v.z, v.w, h.y, l.y);
  *reinterpret_cast<uint2*>(hi) = h;
  *reinterpret_cast<uint2*>(lo) = l;
  return (l.x | l.y) != 0;
}

}  // namespace dsv4::cuda::tcore
