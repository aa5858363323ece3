// libFuzzer target for the GGUF reader. The input is parsed from libFuzzer's own heap buffer (open_memory),
// so AddressSanitizer sees any read outside it. Files the reader accepts are then walked completely through
// the public API (every value, every array element, every typed getter, every tensor's first and last byte),
// and the reader's stated invariants are checked; a violated invariant aborts like a crash.
//
// Build and run: scripts/fuzz-smoke.sh (clang, -DDSV4_FUZZ=ON). Seeds: fuzz/corpus/fuzz_gguf/, written by
// fuzz/tools/make_gguf_seeds.cpp.
#include <cstdint>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

#include "common/error.h"
#include "gguf/gguf.h"

// External linkage: the compiler must keep the reads that feed it.
uint64_t fuzz_gguf_sink = 0;

namespace {

void check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "fuzz_gguf: invariant violated: %s\n", what);
    std::abort();
  }
}

void walk_value(const dsv4::GgufFile& f, const dsv4::GgufValue& v, const uint8_t* begin, const uint8_t* end) {
  using dsv4::GgufType;
  check(v.offset() < f.file_size(), "value offset inside the file");
  switch (v.type()) {
    case GgufType::STRING: {
      std::string_view s = v.as_string();
      check(reinterpret_cast<const uint8_t*>(s.data()) >= begin &&
                reinterpret_cast<const uint8_t*>(s.data()) + s.size() <= end,
            "string inside the file");
      for (char c : s) fuzz_gguf_sink += uint8_t(c);
      break;
    }
    case GgufType::ARRAY: {
      uint64_t n = 0;
      v.for_each_element([&](const dsv4::GgufValue& e) {
        ++n;
        walk_value(f, e, begin, end);
      });
      check(n == v.array_size(), "for_each_element visits array_size() elements");
      if (n > 0) {
        dsv4::GgufValue last = v.array_element(n - 1);
        check(last.type() == v.array_type(), "element type");
      }
      break;
    }
    case GgufType::BOOL: fuzz_gguf_sink += v.as_bool(); break;
    default: break;
  }
  fuzz_gguf_sink += f.format_value(v, 4, 16).size();
}

template <typename Fn>
void may_throw(Fn&& fn) {
  try {
    fn();
  } catch (const dsv4::Error&) {
  }
}

void walk_file(const dsv4::GgufFile& f, const uint8_t* data, size_t size) {
  check(f.file_data() == data && f.file_size() == size, "file_data/file_size");
  uint32_t al = f.alignment();
  check(al != 0 && (al & (al - 1)) == 0, "alignment is a power of two");
  for (const auto& kv : f.metadata()) {
    const std::string& key = kv.first;
    const dsv4::GgufValue& v = kv.second;
    walk_value(f, v, data, data + size);
    // Every typed getter either returns or throws dsv4::Error.
    may_throw([&] { fuzz_gguf_sink += f.get_u32(key); });
    may_throw([&] { fuzz_gguf_sink += f.get_u64(key); });
    may_throw([&] { fuzz_gguf_sink += uint64_t(f.get_i32(key)); });
    may_throw([&] {  // bits, not a float->int conversion (UB for out-of-range values such as -1.7e38)
      float x = f.get_f32(key);
      uint32_t bits;
      std::memcpy(&bits, &x, sizeof bits);
      fuzz_gguf_sink += bits;
    });
    may_throw([&] { fuzz_gguf_sink += f.get_bool(key); });
    may_throw([&] { fuzz_gguf_sink += f.get_string(key).size(); });
    may_throw([&] { fuzz_gguf_sink += f.get_array_i32(key).size(); });
    may_throw([&] { fuzz_gguf_sink += f.get_array_u32(key).size(); });
    may_throw([&] { fuzz_gguf_sink += f.get_array_f32(key).size(); });
    may_throw([&] { fuzz_gguf_sink += f.get_array_string(key).size(); });
  }
  for (const auto& t : f.tensors()) {
    check(t.offset % al == 0, "tensor offset aligned");
    check(t.offset >= f.data_offset(), "tensor inside the data section");
    check(t.offset <= size && t.n_bytes <= size - t.offset, "tensor inside the file");
    check(t.data == data + t.offset, "tensor data pointer");
    check(t.n_dims >= 1 && t.n_dims <= 4, "n_dims");
    if (t.n_bytes > 0) fuzz_gguf_sink += t.data[0] + t.data[t.n_bytes - 1];
    check(f.find_tensor(t.name) == &t, "find_tensor");
    may_throw([&] { f.require_tensor(t.name, {0, 1}, {t.ne[0], t.ne[1]}); });
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::unique_ptr<dsv4::GgufFile> f;
  try {
    f = dsv4::GgufFile::open_memory("fuzz-input", data, size);
  } catch (const dsv4::Error&) {
    return 0;  // rejected cleanly: the expected outcome for most inputs
  }
  walk_file(*f, data, size);
  return 0;
}
