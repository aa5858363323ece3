// Random device weights for the kernel workbenches (wb_gemv, wb_gemm): random bytes with the f16 scale fields of
// every block forced to small positive values (random bytes would give inf/NaN scales). Timings do not depend on
// the values; parity is checked by the tests in tests/ops, not here. Included by one workbench .cu each.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "backend/cuda/cuda_util.h"
#include "common/error.h"
#include "quant/quant.h"

namespace {

__global__ void fill_random_kernel(uint32_t* p, size_t n_words, uint32_t seed) {
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n_words; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t x = uint32_t(i) * 0x9E3779B9u ^ seed;
    x ^= x >> 16, x *= 0x7FEB352Du, x ^= x >> 15, x *= 0x846CA68Bu, x ^= x >> 16;
    p[i] = x;
  }
}

// Puts sane values in the f16 fields: scales ~1e-3 for block types; F16 weights get a small exponent.
__global__ void fix_scales_kernel(uint8_t* w, size_t n_blocks, int block_bytes, int off_a, int off_b, int f16) {
  for (size_t b = size_t(blockIdx.x) * blockDim.x + threadIdx.x; b < n_blocks; b += size_t(gridDim.x) * blockDim.x) {
    uint16_t* h = reinterpret_cast<uint16_t*>(w + b * block_bytes);
    if (f16) {
      for (int i = 0; i < block_bytes / 2; ++i) h[i] = uint16_t((h[i] & 0x83FFu) | 0x2000u);
      continue;
    }
    if (off_a >= 0) h[off_a / 2] = uint16_t(0x1400u | (h[off_a / 2] & 0xFFu));
    if (off_b >= 0) h[off_b / 2] = uint16_t(0x1000u | (h[off_b / 2] & 0xFFu));
  }
}

// `bytes` bytes of type-t blocks at w (device) with random quants and sane scales. Byte offsets of the f16
// scale fields per block: Q8_0 d at 0; Q2_K d/dmin at 80/82; Q4_K d/dmin at 0/2; IQ2_XXS d at 0.
void random_device_weights(dsv4::QType t, uint8_t* w, size_t bytes, uint32_t seed) {
  using dsv4::QType;
  fill_random_kernel<<<1024, 256>>>(reinterpret_cast<uint32_t*>(w), bytes / 4, seed);
  dsv4::cuda::check_launch("fill_random_kernel");
  int bb = int(dsv4::block_bytes(t)), a = -1, b = -1, f16 = 0;
  switch (t) {
    case QType::Q8_0: a = 0; break;
    case QType::Q2_K: a = 80, b = 82; break;
    case QType::Q4_K: a = 0, b = 2; break;
    case QType::IQ2_XXS: a = 0; break;
    case QType::F16: bb = 16, f16 = 1; break;
    default: dsv4::fail("workbench: no random generator for %s", dsv4::qtype_name(t).c_str());
  }
  fix_scales_kernel<<<1024, 256>>>(w, bytes / size_t(bb), bb, a, b, f16);
  dsv4::cuda::check_launch("fix_scales_kernel");
}

}  // namespace
