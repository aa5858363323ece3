// GgufFile::open: maps the file and validates the header, the metadata and the tensor directory in one pass.
// Nothing is trusted: each length is checked against the bytes left before it is used, so a hostile file can
// neither read out of bounds nor make us allocate more than a small multiple of its own size.
#include <algorithm>
#include <cstring>
#include <limits>

#include "common/error.h"
#include "common/mmap_file.h"
#include "gguf/gguf.h"
#include "gguf/gguf_parser.h"

namespace dsv4 {

namespace {

constexpr uint32_t kGgufMagic = 0x46554747;  // "GGUF" read as a little-endian u32

// Smallest encodings, used to reject absurd counts before looping over them.
constexpr uint64_t kMinKvBytes = 8 + 1 + 4 + 1;      // key length, 1-char key, type, 1-byte value
constexpr uint64_t kMinTensorInfoBytes = 8 + 4 + 8 + 4 + 8;  // name length, n_dims, ne[0], type, offset

}  // namespace

struct GgufFileLoader {
  GgufFile& file;
  GgufParser& in;
  const GgufOpenOptions& options;

  static void load(GgufFile& file, const GgufOpenOptions& options);

  void header(uint64_t* n_tensors, uint64_t* n_kv) {
    in.context = "header";
    uint32_t magic = in.read<uint32_t>("magic");
    if (magic != kGgufMagic) in.error_at(0, "not a GGUF file (magic 0x%08x, expected 0x%08x \"GGUF\")", magic, kGgufMagic);
    file.version_ = in.read<uint32_t>("version");
    // A big-endian file stores its version byte-swapped (0x03000000): say so rather than "version 50331648".
    if (file.version_ >= 0x01000000 && (file.version_ & 0xffff) == 0)
      in.error_at(4, "big-endian GGUF (version 0x%08x) is not supported", file.version_);
    if (file.version_ != 2 && file.version_ != 3)
      in.error_at(4, "unsupported GGUF version %u (this reader handles 2 and 3)", file.version_);
    uint64_t at = in.pos;
    *n_tensors = in.read<uint64_t>("tensor count");
    *n_kv = in.read<uint64_t>("metadata count");
    if (*n_kv > in.left() / kMinKvBytes)
      in.error_at(at + 8, "metadata count %llu cannot fit in the %llu bytes left", (unsigned long long)*n_kv,
                  (unsigned long long)in.left());
    if (*n_tensors > in.left() / kMinTensorInfoBytes)
      in.error_at(at, "tensor count %llu cannot fit in the %llu bytes left", (unsigned long long)*n_tensors,
                  (unsigned long long)in.left());
  }

  void metadata(uint64_t n_kv) {
    for (uint64_t i = 0; i < n_kv; ++i) {
      in.context = strfmt("metadata entry %llu", (unsigned long long)i);
      uint64_t key_at = in.pos;
      std::string key(in.read_string("key"));
      in.context = "key '" + key + "'";
      if (file.kv_index_.count(key)) in.error_at(key_at, "duplicate key");
      GgufValue v;
      v.file_ = &file;
      v.type_ = in.read_type("value type");
      v.offset_ = in.pos;
      in.skip_value(v.type_, 0);
      v.byte_size_ = in.pos - v.offset_;
      file.kv_index_.emplace(key, file.kv_.size());
      file.kv_.emplace_back(std::move(key), v);
    }
    in.context.clear();
    if (const GgufValue* a = file.find("general.alignment")) {
      in.context = "key 'general.alignment'";
      if (a->type() != GgufType::UINT32)
        in.error_at(a->offset(), "expected u32, found %s", gguf_type_name(a->type()).c_str());
      uint32_t al = a->as_u32();
      if (al == 0 || (al & (al - 1)) != 0) in.error_at(a->offset(), "alignment %u is not a power of two", al);
      file.alignment_ = al;
      in.context.clear();
    }
  }

  void tensor_directory(uint64_t n_tensors) {
    for (uint64_t i = 0; i < n_tensors; ++i) {
      in.context = strfmt("tensor %llu", (unsigned long long)i);
      GgufTensorInfo t;
      uint64_t name_at = in.pos;
      t.name = std::string(in.read_string("tensor name"));
      in.context = "tensor '" + t.name + "'";
      if (file.tensor_index_.count(t.name)) in.error_at(name_at, "duplicate tensor name");
      uint64_t dims_at = in.pos;
      t.n_dims = in.read<uint32_t>("n_dims");
      if (t.n_dims < 1 || t.n_dims > 4) in.error_at(dims_at, "n_dims = %u (expected 1 to 4)", t.n_dims);
      for (uint32_t d = 0; d < t.n_dims; ++d) {
        uint64_t at = in.pos;
        uint64_t raw = in.read<uint64_t>("dimension");
        if (raw > uint64_t(std::numeric_limits<int64_t>::max()))
          in.error_at(at, "dimension %u = %llu is out of range", d, (unsigned long long)raw);
        t.ne[d] = int64_t(raw);
      }
      uint64_t type_at = in.pos;
      t.type = in.read<uint32_t>("tensor type");
      uint64_t off_at = in.pos;
      t.offset = in.read<uint64_t>("data offset");  // relative for now; made absolute in place_tensors()
      try {
        t.n_bytes = ggml_tensor_bytes(t.type, std::span<const int64_t>(t.ne.data(), t.n_dims), "size",
                                      options.extra_types);
      } catch (const Error& e) {
        in.error_at(type_at, "%s", e.what());
      }
      if (t.offset % file.alignment_ != 0)
        in.error_at(off_at, "data offset %llu is not a multiple of the alignment %u",
                    (unsigned long long)t.offset, file.alignment_);
      file.tensor_index_.emplace(t.name, file.tensors_.size());
      file.tensors_.push_back(std::move(t));
    }
    in.context.clear();
  }

  // Checks every tensor's data lies inside the file and no two overlap, then makes offsets absolute.
  void place_tensors() {
    uint64_t end_of_dir = in.pos;
    uint64_t al = file.alignment_;
    uint64_t data_offset = (end_of_dir + al - 1) / al * al;
    file.data_offset_ = data_offset;
    uint64_t size = in.size;
    // Even empty tensors get a data pointer, so the data section must begin inside the file (fuzzer find: a
    // zero-element tensor in a file cut before the aligned data start pointed past the mapping).
    if (!file.tensors_.empty() && data_offset > size)
      fail("%s: tensor data section starts at byte %llu (end of directory %llu aligned to %llu), past the end of "
           "the file (%llu bytes)",
           file.path_.c_str(), (unsigned long long)data_offset, (unsigned long long)end_of_dir,
           (unsigned long long)al, (unsigned long long)size);
    for (auto& t : file.tensors_) {
      uint64_t avail = data_offset <= size ? size - data_offset : 0;
      if (t.offset > avail || t.n_bytes > avail - t.offset)
        fail("%s: tensor '%s': data [%llu, +%llu) at absolute byte offset %llu runs past the end of the file "
             "(%llu bytes)",
             file.path_.c_str(), t.name.c_str(), (unsigned long long)t.offset, (unsigned long long)t.n_bytes,
             (unsigned long long)(data_offset + t.offset), (unsigned long long)size);
      t.offset += data_offset;
      t.data = file.data_ + t.offset;
    }
    std::vector<const GgufTensorInfo*> by_offset;
    by_offset.reserve(file.tensors_.size());
    for (const auto& t : file.tensors_)
      if (t.n_bytes > 0) by_offset.push_back(&t);
    std::sort(by_offset.begin(), by_offset.end(),
              [](const GgufTensorInfo* a, const GgufTensorInfo* b) { return a->offset < b->offset; });
    for (size_t i = 1; i < by_offset.size(); ++i) {
      const GgufTensorInfo* a = by_offset[i - 1];
      const GgufTensorInfo* b = by_offset[i];
      if (a->offset + a->n_bytes > b->offset)
        fail("%s: tensor '%s' (bytes %llu..%llu) overlaps tensor '%s' (starting at byte %llu)", file.path_.c_str(),
             a->name.c_str(), (unsigned long long)a->offset, (unsigned long long)(a->offset + a->n_bytes),
             b->name.c_str(), (unsigned long long)b->offset);
    }
  }
};

void GgufFileLoader::load(GgufFile& file, const GgufOpenOptions& options) {
  GgufParser in(file.path_, file.data_, file.size_);
  GgufFileLoader loader{file, in, options};
  uint64_t n_tensors = 0, n_kv = 0;
  loader.header(&n_tensors, &n_kv);
  loader.metadata(n_kv);
  loader.tensor_directory(n_tensors);
  loader.place_tensors();
}

std::unique_ptr<GgufFile> GgufFile::open(const std::string& path, const GgufOpenOptions& options) {
  std::unique_ptr<GgufFile> file(new GgufFile());
  file->path_ = path;
  file->map_ = std::make_unique<MmapFile>(path);
  file->data_ = file->map_->data();
  file->size_ = file->map_->size();
  GgufFileLoader::load(*file, options);
  return file;
}

std::unique_ptr<GgufFile> GgufFile::open_memory(const std::string& name, const uint8_t* data, size_t size,
                                                const GgufOpenOptions& options) {
  std::unique_ptr<GgufFile> file(new GgufFile());
  file->path_ = name;
  file->data_ = data;
  file->size_ = size;
  GgufFileLoader::load(*file, options);
  return file;
}

GgufFile::~GgufFile() = default;


// ---- tensors ---------------------------------------------------------------------------------------------

std::string GgufTensorInfo::shape_string() const {
  std::string s = "[";
  for (uint32_t d = 0; d < n_dims; ++d) s += (d ? ", " : "") + std::to_string(ne[d]);
  return s + "]";
}

const GgufTensorInfo* GgufFile::find_tensor(const std::string& name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

const GgufTensorInfo& GgufFile::get_tensor(const std::string& name) const {
  const GgufTensorInfo* t = find_tensor(name);
  if (!t) fail("%s: missing tensor '%s'", path_.c_str(), name.c_str());
  return *t;
}

void GgufFile::prefetch(const GgufTensorInfo& t) const {
  if (map_) map_->prefetch(size_t(t.offset), size_t(t.n_bytes));
}

const GgufTensorInfo& GgufFile::require_tensor(const std::string& name, std::initializer_list<uint32_t> types,
                                               std::initializer_list<int64_t> ne) const {
  return require_tensor(name, std::span<const uint32_t>(types.begin(), types.size()),
                        std::span<const int64_t>(ne.begin(), ne.size()));
}

const GgufTensorInfo& GgufFile::require_tensor(const std::string& name, std::span<const uint32_t> types,
                                               std::span<const int64_t> ne) const {
  const GgufTensorInfo& t = get_tensor(name);
  if (!types.empty() && std::find(types.begin(), types.end(), t.type) == types.end()) {
    std::string want;
    for (size_t i = 0; i < types.size(); ++i) want += (i ? " or " : "") + ggml_type_name(types[i]);
    fail("%s: tensor '%s': expected type %s, found %s", path_.c_str(), name.c_str(), want.c_str(),
         ggml_type_name(t.type).c_str());
  }
  if (!ne.empty()) {
    bool ok = ne.size() <= 4;
    for (size_t d = 0; ok && d < 4; ++d) ok = t.ne[d] == (d < ne.size() ? ne[d] : 1);
    // A declared trailing dim of 1 (n_dims 3 with ne[2] = 1) still matches a 2-element expectation.
    if (!ok) {
      std::string want = "[";
      for (size_t d = 0; d < ne.size(); ++d) want += (d ? ", " : "") + std::to_string(ne[d]);
      fail("%s: tensor '%s': expected shape %s], found %s", path_.c_str(), name.c_str(), want.c_str(),
           t.shape_string().c_str());
    }
  }
  return t;
}

}  // namespace dsv4
