// GgufWriter: metadata and the tensor directory are encoded in memory (small), tensor bytes are streamed to
// the file in declaration order. Padding and skipped tensors are never written: we seek past them, so they
// read back as zeros and, on filesystems with sparse files, occupy no disk blocks (the synthetic-model
// generator relies on this to write files with the real tensor table without writing ~80 GB).
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>

#include "common/error.h"
#include "gguf/gguf.h"

namespace dsv4 {

namespace {

constexpr uint32_t kGgufMagic = 0x46554747;
constexpr uint32_t kGgufVersion = 3;
constexpr uint32_t kDefaultAlignment = 32;

template <typename T>
void put(std::vector<uint8_t>& out, T v) {
  // resize + memcpy rather than insert(): GCC 12 reports a bogus -Wstringop-overflow for the latter.
  size_t at = out.size();
  out.resize(at + sizeof(T));
  std::memcpy(out.data() + at, &v, sizeof(T));
}

void put_string(std::vector<uint8_t>& out, std::string_view s) {
  put<uint64_t>(out, s.size());
  size_t at = out.size();
  out.resize(at + s.size());
  if (!s.empty()) std::memcpy(out.data() + at, s.data(), s.size());
}

uint64_t align_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

}  // namespace

// ---- GgufArrayBuilder -----------------------------------------------------------------------------------

GgufArrayBuilder::GgufArrayBuilder(GgufType element_type) : type_(element_type) {
  if (uint32_t(element_type) > uint32_t(GgufType::FLOAT64))
    fail("GgufArrayBuilder: unknown element type %u", uint32_t(element_type));
}

void GgufArrayBuilder::expect(GgufType t) {
  if (t != type_)
    fail("GgufArrayBuilder: pushing %s into an array of %s", gguf_type_name(t).c_str(),
         gguf_type_name(type_).c_str());
  ++count_;
}

#define DSV4_PUSH(fn, T, TAG)                          \
  GgufArrayBuilder& GgufArrayBuilder::fn(T v) {        \
    expect(GgufType::TAG);                             \
    put<T>(body_, v);                                  \
    return *this;                                      \
  }
DSV4_PUSH(push_u8, uint8_t, UINT8)
DSV4_PUSH(push_i8, int8_t, INT8)
DSV4_PUSH(push_u16, uint16_t, UINT16)
DSV4_PUSH(push_i16, int16_t, INT16)
DSV4_PUSH(push_u32, uint32_t, UINT32)
DSV4_PUSH(push_i32, int32_t, INT32)
DSV4_PUSH(push_u64, uint64_t, UINT64)
DSV4_PUSH(push_i64, int64_t, INT64)
DSV4_PUSH(push_f32, float, FLOAT32)
DSV4_PUSH(push_f64, double, FLOAT64)
#undef DSV4_PUSH

GgufArrayBuilder& GgufArrayBuilder::push_bool(bool v) {
  expect(GgufType::BOOL);
  body_.push_back(v ? 1 : 0);
  return *this;
}

GgufArrayBuilder& GgufArrayBuilder::push_string(std::string_view v) {
  expect(GgufType::STRING);
  put_string(body_, v);
  return *this;
}

GgufArrayBuilder& GgufArrayBuilder::push_array(const GgufArrayBuilder& v) {
  expect(GgufType::ARRAY);
  std::vector<uint8_t> enc = v.encode();
  body_.insert(body_.end(), enc.begin(), enc.end());
  return *this;
}

std::vector<uint8_t> GgufArrayBuilder::encode() const {
  std::vector<uint8_t> out;
  out.reserve(12 + body_.size());
  put<uint32_t>(out, uint32_t(type_));
  put<uint64_t>(out, count_);
  out.insert(out.end(), body_.begin(), body_.end());
  return out;
}

// ---- GgufWriter: metadata --------------------------------------------------------------------------------

GgufWriter::GgufWriter(const std::string& path) : path_(path) {
  // Refuse a directory now rather than after streaming gigabytes into the temporary file.
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) fail("%s: is a directory", path.c_str());
  // A unique name in the same directory, so the final rename() is atomic and never crosses filesystems.
  static std::atomic<unsigned> counter{0};
  tmp_path_ = strfmt("%s.tmp.%d.%u", path.c_str(), int(::getpid()), counter.fetch_add(1));
  int fd = ::open(tmp_path_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
  if (fd < 0) fail("%s: cannot create '%s': %s", path.c_str(), tmp_path_.c_str(), std::strerror(errno));
  f_ = ::fdopen(fd, "wb");
  if (!f_) {
    int err = errno;
    ::close(fd);
    ::unlink(tmp_path_.c_str());
    fail("%s: cannot open '%s': %s", path.c_str(), tmp_path_.c_str(), std::strerror(err));
  }
}

GgufWriter::~GgufWriter() {
  if (f_) {
    std::fclose(f_);
    ::unlink(tmp_path_.c_str());  // unfinished: drop the partial file, leave whatever was at path_ alone
  }
}

void GgufWriter::add_kv(const std::string& key, GgufType type, const void* payload, size_t n) {
  if (state_ != State::Metadata) fail("%s: key '%s' added after begin_data()", path_.c_str(), key.c_str());
  if (key.empty()) fail("%s: empty metadata key", path_.c_str());
  if (!keys_.emplace(key, true).second) fail("%s: duplicate key '%s'", path_.c_str(), key.c_str());
  put_string(kv_bytes_, key);
  put<uint32_t>(kv_bytes_, uint32_t(type));
  const uint8_t* p = static_cast<const uint8_t*>(payload);
  kv_bytes_.insert(kv_bytes_.end(), p, p + n);
  ++n_kv_;
}

void GgufWriter::add_kv_bytes(const std::string& key, GgufType type, const std::vector<uint8_t>& payload) {
  add_kv(key, type, payload.data(), payload.size());
}

void GgufWriter::set_alignment(uint32_t alignment) {
  if (state_ != State::Metadata) fail("%s: set_alignment() after begin_data()", path_.c_str());
  if (alignment == 0 || (alignment & (alignment - 1)) != 0)
    fail("%s: alignment %u is not a power of two", path_.c_str(), alignment);
  if (!tensors_.empty()) fail("%s: set_alignment() must come before add_tensor()", path_.c_str());
  if (alignment_key_ && alignment != alignment_)
    fail("%s: general.alignment already set to %u", path_.c_str(), alignment_);
  alignment_ = alignment;
}

#define DSV4_ADD(fn, T, TAG)                                \
  void GgufWriter::fn(const std::string& key, T v) {        \
    add_kv(key, GgufType::TAG, &v, sizeof(T));              \
  }
DSV4_ADD(add_u8, uint8_t, UINT8)
DSV4_ADD(add_i8, int8_t, INT8)
DSV4_ADD(add_u16, uint16_t, UINT16)
DSV4_ADD(add_i16, int16_t, INT16)
DSV4_ADD(add_i32, int32_t, INT32)
DSV4_ADD(add_u64, uint64_t, UINT64)
DSV4_ADD(add_i64, int64_t, INT64)
DSV4_ADD(add_f32, float, FLOAT32)
DSV4_ADD(add_f64, double, FLOAT64)
#undef DSV4_ADD

void GgufWriter::add_u32(const std::string& key, uint32_t v) {
  if (key == "general.alignment") {
    // Routed through set_alignment so the key and the actual data alignment cannot disagree.
    set_alignment(v);
    alignment_key_ = true;
  }
  add_kv(key, GgufType::UINT32, &v, sizeof(v));
}

void GgufWriter::add_bool(const std::string& key, bool v) {
  uint8_t b = v ? 1 : 0;
  add_kv(key, GgufType::BOOL, &b, 1);
}

void GgufWriter::add_string(const std::string& key, std::string_view v) {
  std::vector<uint8_t> payload;
  put_string(payload, v);
  add_kv_bytes(key, GgufType::STRING, payload);
}

void GgufWriter::add_array(const std::string& key, const GgufArrayBuilder& array) {
  add_kv_bytes(key, GgufType::ARRAY, array.encode());
}

void GgufWriter::add_array_i32(const std::string& key, std::span<const int32_t> v) {
  GgufArrayBuilder a(GgufType::INT32);
  for (int32_t x : v) a.push_i32(x);
  add_array(key, a);
}

void GgufWriter::add_array_u32(const std::string& key, std::span<const uint32_t> v) {
  GgufArrayBuilder a(GgufType::UINT32);
  for (uint32_t x : v) a.push_u32(x);
  add_array(key, a);
}

void GgufWriter::add_array_f32(const std::string& key, std::span<const float> v) {
  GgufArrayBuilder a(GgufType::FLOAT32);
  for (float x : v) a.push_f32(x);
  add_array(key, a);
}

void GgufWriter::add_array_string(const std::string& key, std::span<const std::string> v) {
  GgufArrayBuilder a(GgufType::STRING);
  for (const std::string& x : v) a.push_string(x);
  add_array(key, a);
}

// ---- GgufWriter: tensors -----------------------------------------------------------------------------------

uint64_t GgufWriter::add_tensor(const std::string& name, uint32_t type, std::initializer_list<int64_t> ne,
                                const GgmlTypeLookup& extra_types) {
  return add_tensor(name, type, std::span<const int64_t>(ne.begin(), ne.size()), extra_types);
}

uint64_t GgufWriter::add_tensor(const std::string& name, uint32_t type, std::span<const int64_t> ne,
                                const GgmlTypeLookup& extra_types) {
  if (state_ != State::Metadata) fail("%s: tensor '%s' added after begin_data()", path_.c_str(), name.c_str());
  if (name.empty()) fail("%s: empty tensor name", path_.c_str());
  if (tensor_index_.count(name)) fail("%s: duplicate tensor '%s'", path_.c_str(), name.c_str());
  uint64_t n_bytes = ggml_tensor_bytes(type, ne, path_ + ": tensor '" + name + "'", extra_types);
  uint64_t rel = data_size_;
  if (n_bytes > std::numeric_limits<uint64_t>::max() - rel - alignment_)
    fail("%s: tensor '%s': data section size overflows", path_.c_str(), name.c_str());
  data_size_ = align_up(rel + n_bytes, alignment_);
  tensor_index_.emplace(name, tensors_.size());
  tensors_.push_back({name, type, std::vector<int64_t>(ne.begin(), ne.end()), rel, n_bytes});
  return rel;
}

void GgufWriter::write_raw(const void* p, size_t n) {
  if (n && std::fwrite(p, 1, n, f_) != n) fail("%s: write failed: %s", path_.c_str(), std::strerror(errno));
}

void GgufWriter::seek_to(uint64_t pos) {
  if (::fseeko(f_, off_t(pos), SEEK_SET) != 0)
    fail("%s: seek to byte %llu failed: %s", path_.c_str(), (unsigned long long)pos, std::strerror(errno));
}

void GgufWriter::begin_data() {
  if (state_ != State::Metadata) fail("%s: begin_data() called twice", path_.c_str());
  std::vector<uint8_t> head;
  put<uint32_t>(head, kGgufMagic);
  put<uint32_t>(head, kGgufVersion);
  put<uint64_t>(head, tensors_.size());
  bool emit_alignment = alignment_ != kDefaultAlignment && !alignment_key_;
  put<uint64_t>(head, n_kv_ + (emit_alignment ? 1 : 0));
  write_raw(head.data(), head.size());
  write_raw(kv_bytes_.data(), kv_bytes_.size());
  uint64_t pos = head.size() + kv_bytes_.size();
  std::vector<uint8_t> dir;
  if (emit_alignment) {
    put_string(dir, "general.alignment");
    put<uint32_t>(dir, uint32_t(GgufType::UINT32));
    put<uint32_t>(dir, alignment_);
  }
  for (const PendingTensor& t : tensors_) {
    put_string(dir, t.name);
    put<uint32_t>(dir, uint32_t(t.ne.size()));
    for (int64_t d : t.ne) put<uint64_t>(dir, uint64_t(d));
    put<uint32_t>(dir, t.type);
    put<uint64_t>(dir, t.rel_offset);
  }
  write_raw(dir.data(), dir.size());
  pos += dir.size();
  data_start_ = align_up(pos, alignment_);
  std::vector<uint8_t> pad(size_t(data_start_ - pos), 0);
  write_raw(pad.data(), pad.size());
  kv_bytes_.clear();
  kv_bytes_.shrink_to_fit();
  state_ = State::Data;
  cur_ = 0;
  cur_written_ = 0;
  advance_past_complete();
}

void GgufWriter::advance_past_complete() {
  while (cur_ < tensors_.size() && cur_written_ == tensors_[cur_].n_bytes) {
    ++cur_;
    cur_written_ = 0;
  }
}

GgufWriter::PendingTensor& GgufWriter::current_tensor(const std::string& name, const char* op) {
  if (state_ != State::Data) fail("%s: %s('%s') outside begin_data()..finish()", path_.c_str(), op, name.c_str());
  advance_past_complete();
  if (cur_ >= tensors_.size())
    fail("%s: %s('%s'): all tensors are already complete", path_.c_str(), op, name.c_str());
  PendingTensor& t = tensors_[cur_];
  if (t.name != name) {
    if (!tensor_index_.count(name)) fail("%s: %s: unknown tensor '%s'", path_.c_str(), op, name.c_str());
    fail("%s: %s('%s'): tensors must be written in declaration order; '%s' is next (%llu of %llu bytes done)",
         path_.c_str(), op, name.c_str(), t.name.c_str(), (unsigned long long)cur_written_,
         (unsigned long long)t.n_bytes);
  }
  return t;
}

void GgufWriter::write_tensor_data(const std::string& name, const void* data, size_t n) {
  PendingTensor& t = current_tensor(name, "write_tensor_data");
  if (n > t.n_bytes - cur_written_)
    fail("%s: tensor '%s': writing %zu bytes at %llu overflows its %llu bytes", path_.c_str(), name.c_str(), n,
         (unsigned long long)cur_written_, (unsigned long long)t.n_bytes);
  seek_to(data_start_ + t.rel_offset + cur_written_);
  write_raw(data, n);
  cur_written_ += n;
}

void GgufWriter::skip_tensor_data(const std::string& name) {
  PendingTensor& t = current_tensor(name, "skip_tensor_data");
  cur_written_ = t.n_bytes;  // nothing written: the bytes stay a hole until finish() sets the file length
}

void GgufWriter::finish() {
  if (state_ == State::Finished) fail("%s: finish() called twice", path_.c_str());
  if (state_ == State::Metadata) begin_data();
  advance_past_complete();
  if (cur_ < tensors_.size())
    fail("%s: finish(): tensor '%s' has %llu of %llu bytes (and %zu tensors after it are missing)", path_.c_str(),
         tensors_[cur_].name.c_str(), (unsigned long long)cur_written_, (unsigned long long)tensors_[cur_].n_bytes,
         tensors_.size() - cur_ - 1);
  if (std::fflush(f_) != 0) fail("%s: flush failed: %s", path_.c_str(), std::strerror(errno));
  // The data section ends padded to the alignment; trailing skipped tensors and padding become a hole.
  if (::ftruncate(::fileno(f_), off_t(data_start_ + data_size_)) != 0)
    fail("%s: cannot set the file length: %s", path_.c_str(), std::strerror(errno));
  std::FILE* f = f_;
  f_ = nullptr;
  state_ = State::Finished;
  if (std::fclose(f) != 0) {
    int err = errno;
    ::unlink(tmp_path_.c_str());
    fail("%s: close failed: %s", path_.c_str(), std::strerror(err));
  }
  if (std::rename(tmp_path_.c_str(), path_.c_str()) != 0) {
    int err = errno;
    ::unlink(tmp_path_.c_str());
    fail("%s: cannot rename '%s' over it: %s", path_.c_str(), tmp_path_.c_str(), std::strerror(err));
  }
}

}  // namespace dsv4
