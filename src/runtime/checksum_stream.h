// Stream wrappers that hash every byte passing through them (FNV-1a 64), so a session file can be written and
// verified tensor by tensor without ever holding the whole state in one buffer (roadmap: KV on disk).
#pragma once

#include <cstdint>
#include <istream>
#include <ostream>
#include <streambuf>

namespace dsv4 {

inline uint64_t fnv1a(uint64_t h, const char* p, std::streamsize n) {
  for (std::streamsize i = 0; i < n; ++i) {
    h ^= uint8_t(p[i]);
    h *= 0x100000001b3ULL;
  }
  return h;
}
constexpr uint64_t kFnvOffset = 0xcbf29ce484222325ULL;

// Forwards writes to `dst`, hashing them.
class HashingOutBuf : public std::streambuf {
 public:
  explicit HashingOutBuf(std::ostream& dst) : dst_(dst) {}
  uint64_t hash() const { return hash_; }
  uint64_t count() const { return count_; }

 protected:
  std::streamsize xsputn(const char* s, std::streamsize n) override {
    dst_.write(s, n);
    if (!dst_) return 0;
    hash_ = fnv1a(hash_, s, n);
    count_ += uint64_t(n);
    return n;
  }
  int_type overflow(int_type c) override {
    if (traits_type::eq_int_type(c, traits_type::eof())) return traits_type::not_eof(c);
    char ch = traits_type::to_char_type(c);
    return xsputn(&ch, 1) == 1 ? c : traits_type::eof();
  }
  pos_type seekoff(off_type off, std::ios_base::seekdir dir, std::ios_base::openmode) override {
    if (off == 0 && dir == std::ios_base::cur) return pos_type(off_type(count_));
    return pos_type(off_type(-1));
  }

 private:
  std::ostream& dst_;
  uint64_t hash_ = kFnvOffset;
  uint64_t count_ = 0;
};

// Reads from `src`, hashing what is consumed; tellg() reports bytes consumed through this buffer (plus `base`,
// the offset of the first byte in the underlying stream) so error messages carry real file offsets.
class HashingInBuf : public std::streambuf {
 public:
  HashingInBuf(std::istream& src, uint64_t base) : src_(src), base_(base) {}
  uint64_t hash() const { return hash_; }
  uint64_t offset() const { return base_ + count_; }

 protected:
  std::streamsize xsgetn(char* s, std::streamsize n) override {
    src_.read(s, n);
    std::streamsize got = src_.gcount();
    hash_ = fnv1a(hash_, s, got);
    count_ += uint64_t(got);
    return got;
  }
  int_type underflow() override { return traits_type::eof(); }  // unbuffered: all reads go through xsgetn
  int_type uflow() override {
    char ch;
    return xsgetn(&ch, 1) == 1 ? traits_type::to_int_type(ch) : traits_type::eof();
  }
  pos_type seekoff(off_type off, std::ios_base::seekdir dir, std::ios_base::openmode) override {
    if (off == 0 && dir == std::ios_base::cur) return pos_type(off_type(base_ + count_));
    return pos_type(off_type(-1));
  }

 private:
  std::istream& src_;
  uint64_t base_;
  uint64_t hash_ = kFnvOffset;
  uint64_t count_ = 0;
};

}  // namespace dsv4
