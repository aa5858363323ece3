// libFuzzer target for the safetensors header parser (src/convert/safetensors.cpp). The input is parsed from
// libFuzzer's own heap buffer (SafetensorsFile::open_memory), so AddressSanitizer sees any read outside it.
// An accepted file must describe every tensor inside the buffer with a byte size that matches its shape; every
// tensor is then read through st_read_f32 / st_read_i64, which may only return or throw dsv4::Error.
//
// Build and run: scripts/fuzz-smoke.sh. Seeds: fuzz/corpus/fuzz_safetensors/.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <vector>

#include "common/error.h"
#include "convert/safetensors.h"

uint64_t fuzz_safetensors_sink = 0;

namespace {

void check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "fuzz_safetensors: invariant violated: %s\n", what);
    std::abort();
  }
}

void walk(const dsv4::StTensor& t, const uint8_t* data, size_t size) {
  check(t.data >= data && t.n_bytes <= size && t.data - data <= ptrdiff_t(size - t.n_bytes), "tensor inside the input");
  int64_t n = t.n_elements();
  check(n >= 0, "element count is not negative");
  // By division: a product could wrap to the (small) n_bytes and hide the bug this checks for.
  const uint64_t sz = uint64_t(dsv4::st_dtype_size(t.dtype));
  check(sz > 0 && t.n_bytes % sz == 0 && t.n_bytes / sz == uint64_t(n), "n_bytes = elements x dtype size");
  if (n == 0) return;
  // First and last element, through both readers (one of them throws for the wrong dtype family).
  for (int64_t at : {int64_t(0), n - 1}) {
    try {
      float f = 0;
      dsv4::st_read_f32(t, at, 1, &f);
      fuzz_safetensors_sink += uint64_t(f != f);
    } catch (const dsv4::Error&) {
    }
    try {
      int64_t v = 0;
      dsv4::st_read_i64(t, at, 1, &v);
      fuzz_safetensors_sink += uint64_t(v);
    } catch (const dsv4::Error&) {
    }
  }
  // A range past the end must be refused, never read.
  try {
    float f[2];
    dsv4::st_read_f32(t, n - 1, 2, f);
    check(false, "st_read_f32 past the last element");
  } catch (const dsv4::Error&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::unique_ptr<dsv4::SafetensorsFile> f;
  try {
    f = dsv4::SafetensorsFile::open_memory("fuzz.safetensors", data, size);
  } catch (const dsv4::Error&) {
    return 0;
  }
  for (const auto& t : f->tensors()) walk(t, data, size);
  return 0;
}
