#include "convert/safetensors.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/mmap_file.h"
#include "quant/blocks.h"

namespace dsv4 {

namespace {

struct DtypeInfo {
  const char* name;
  StDtype type;
  int size;
};
constexpr DtypeInfo kDtypes[] = {
    {"F64", StDtype::F64, 8},   {"F32", StDtype::F32, 4},         {"F16", StDtype::F16, 2},
    {"BF16", StDtype::BF16, 2}, {"F8_E4M3", StDtype::F8_E4M3, 1}, {"F8_E8M0", StDtype::F8_E8M0, 1},
    {"I64", StDtype::I64, 8},   {"I32", StDtype::I32, 4},         {"I16", StDtype::I16, 2},
    {"I8", StDtype::I8, 1},     {"U8", StDtype::U8, 1},           {"BOOL", StDtype::BOOL, 1},
};

// A header larger than this is not a model header but a corrupt length (real Flash shards have < 1 MB).
constexpr uint64_t kMaxHeader = 256ull << 20;

template <typename T>
T load_le(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof v);  // the engine targets little-endian hosts only (x86-64, aarch64)
  return v;
}

}  // namespace

const char* st_dtype_name(StDtype t) {
  for (const auto& d : kDtypes)
    if (d.type == t) return d.name;
  return "?";
}

int st_dtype_size(StDtype t) {
  for (const auto& d : kDtypes)
    if (d.type == t) return d.size;
  return 0;
}

int64_t StTensor::n_elements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string StTensor::shape_string() const {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

SafetensorsFile::~SafetensorsFile() = default;

std::unique_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  f->map_ = std::make_unique<MmapFile>(path);
  f->parse(f->map_->data(), f->map_->size());
  return f;
}

std::unique_ptr<SafetensorsFile> SafetensorsFile::open_memory(const std::string& name, const uint8_t* data,
                                                              uint64_t size) {
  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = name;
  f->parse(data, size);
  return f;
}

void SafetensorsFile::parse(const uint8_t* base, uint64_t size) {
  const std::string& path = path_;
  SafetensorsFile* f = this;
  if (size < 8) fail("%s: not a safetensors file: %llu bytes, the 8-byte header length is missing", path.c_str(),
                     (unsigned long long)size);
  const uint64_t hlen = load_le<uint64_t>(base);
  if (hlen > kMaxHeader || hlen > size - 8)
    fail("%s: header length %llu at byte 0 exceeds the file (%llu bytes)", path.c_str(), (unsigned long long)hlen,
         (unsigned long long)size);
  nlohmann::json h;
  try {
    h = nlohmann::json::parse(base + 8, base + 8 + hlen);
  } catch (const std::exception& e) {
    fail("%s: header JSON (bytes 8..%llu) does not parse: %s", path.c_str(), (unsigned long long)(8 + hlen),
         e.what());
  }
  if (!h.is_object()) fail("%s: header JSON is not an object", path.c_str());
  const uint64_t data_start = 8 + hlen, data_size = size - data_start;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (auto it = h.begin(); it != h.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    const std::string& name = it.key();
    const auto& v = it.value();
    auto bad = [&](const char* field, const std::string& why) {
      fail("%s: tensor '%s': field '%s' %s", path.c_str(), name.c_str(), field, why.c_str());
    };
    if (!v.is_object()) bad("(entry)", "is not an object");
    if (!v.contains("dtype") || !v["dtype"].is_string()) bad("dtype", "missing or not a string");
    if (!v.contains("shape") || !v["shape"].is_array()) bad("shape", "missing or not an array");
    if (!v.contains("data_offsets") || !v["data_offsets"].is_array() || v["data_offsets"].size() != 2)
      bad("data_offsets", "missing or not a pair");
    StTensor t;
    t.name = name;
    const std::string dt = v["dtype"].get<std::string>();
    const DtypeInfo* info = nullptr;
    for (const auto& d : kDtypes)
      if (dt == d.name) info = &d;
    if (!info) bad("dtype", "has unsupported value '" + dt + "'");
    t.dtype = info->type;
    uint64_t n = 1;
    for (const auto& d : v["shape"]) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0) bad("shape", "has a non-integer or negative dim");
      const uint64_t dim = d.get<uint64_t>();
      if (dim && n > (uint64_t(1) << 62) / dim) bad("shape", "overflows 64 bits");
      n *= dim;
      t.shape.push_back(int64_t(dim));
    }
    const auto& off = v["data_offsets"];
    if (!off[0].is_number_unsigned() || !off[1].is_number_unsigned()) bad("data_offsets", "are not unsigned");
    const uint64_t b = off[0].get<uint64_t>(), e = off[1].get<uint64_t>();
    if (e < b || e > data_size)
      bad("data_offsets", strfmt("[%llu, %llu] fall outside the data section of %llu bytes", (unsigned long long)b,
                                 (unsigned long long)e, (unsigned long long)data_size));
    // Compared by division: n is only bounded by 2^62, so n * size could wrap (a shape of 2^61 F64 elements
    // would "need" 0 bytes and pass with an empty span).
    if ((e - b) % uint64_t(info->size) != 0 || (e - b) / uint64_t(info->size) != n)
      bad("data_offsets", strfmt("span %llu bytes but shape %s x %s needs %s", (unsigned long long)(e - b),
                                 t.shape_string().c_str(), info->name,
                                 n > (uint64_t(1) << 60) ? "more than 2^60 bytes"
                                                         : std::to_string(n * info->size).c_str()));
    t.offset = data_start + b;
    t.n_bytes = e - b;
    t.data = base + t.offset;
    t.file = &f->path_;
    if (e > b) ranges.push_back({b, e});
    f->tensors_.push_back(std::move(t));
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i)
    if (ranges[i].first < ranges[i - 1].second)
      fail("%s: two tensors overlap at data byte %llu (file byte %llu)", path.c_str(),
           (unsigned long long)ranges[i].first, (unsigned long long)(data_start + ranges[i].first));
}

std::unique_ptr<Checkpoint> Checkpoint::open(const std::string& dir) {
  namespace fs = std::filesystem;
  std::unique_ptr<Checkpoint> c(new Checkpoint());
  c->dir_ = dir;
  if (!fs::is_directory(dir)) fail("%s: not a directory", dir.c_str());
  const fs::path index = fs::path(dir) / "model.safetensors.index.json";
  std::map<std::string, std::string> assigned;  // tensor -> shard file name, from the index
  std::vector<std::string> files;
  if (fs::exists(index)) {
    nlohmann::json j;
    try {
      std::ifstream in(index);
      j = nlohmann::json::parse(in);
    } catch (const std::exception& e) {
      fail("%s: does not parse: %s", index.c_str(), e.what());
    }
    if (!j.contains("weight_map") || !j["weight_map"].is_object())
      fail("%s: field 'weight_map' missing or not an object", index.c_str());
    std::set<std::string> shards;
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      if (!it.value().is_string())
        fail("%s: weight_map['%s'] is not a string", index.c_str(), it.key().c_str());
      const std::string shard = it.value().get<std::string>();
      if (shard.find('/') != std::string::npos || shard.empty() || shard == "..")
        fail("%s: weight_map['%s'] = '%s' is not a file name in the directory", index.c_str(), it.key().c_str(),
             shard.c_str());
      assigned[it.key()] = shard;
      shards.insert(shard);
    }
    if (shards.empty()) fail("%s: 'weight_map' lists no tensors", index.c_str());
    for (const auto& s : shards) {
      if (!fs::exists(fs::path(dir) / s)) fail("%s: shard '%s' listed in the index is missing", index.c_str(), s.c_str());
      files.push_back((fs::path(dir) / s).string());
    }
  } else {
    for (const auto& e : fs::directory_iterator(dir))
      if (e.path().extension() == ".safetensors") files.push_back(e.path().string());
    std::sort(files.begin(), files.end());
    if (files.empty()) fail("%s: no *.safetensors files and no model.safetensors.index.json", dir.c_str());
  }
  for (const auto& p : files) {
    c->files_.push_back(SafetensorsFile::open(p));
    const auto& sf = *c->files_.back();
    const std::string base = fs::path(p).filename().string();
    for (const auto& t : sf.tensors()) {
      auto [it, fresh] = c->by_name_.emplace(t.name, &t);
      if (!fresh) fail("%s: tensor '%s' also appears in %s", p.c_str(), t.name.c_str(), it->second->file->c_str());
      if (!assigned.empty()) {
        auto a = assigned.find(t.name);
        if (a == assigned.end())
          fail("%s: tensor '%s' is not listed in model.safetensors.index.json", p.c_str(), t.name.c_str());
        if (a->second != base)
          fail("%s: tensor '%s' is here but the index assigns it to '%s'", p.c_str(), t.name.c_str(),
               a->second.c_str());
      }
    }
  }
  for (const auto& [name, shard] : assigned)
    if (!c->by_name_.count(name))
      fail("%s: tensor '%s' listed in the index is missing from shard '%s'", index.c_str(), name.c_str(),
           shard.c_str());
  return c;
}

const StTensor* Checkpoint::find(const std::string& name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : it->second;
}

void st_read_f32(const StTensor& t, int64_t first, int64_t count, float* out) {
  if (first < 0 || count < 0 || first + count > t.n_elements())
    fail("%s: tensor '%s': read of elements [%lld, %lld) outside %lld", t.file->c_str(), t.name.c_str(),
         (long long)first, (long long)(first + count), (long long)t.n_elements());
  const int sz = st_dtype_size(t.dtype);
  const uint8_t* p = t.data + first * sz;
  switch (t.dtype) {
    case StDtype::F32: std::memcpy(out, p, size_t(count) * 4); return;
    case StDtype::F64:
      for (int64_t i = 0; i < count; ++i) out[i] = float(load_le<double>(p + 8 * i));
      return;
    case StDtype::F16:
      for (int64_t i = 0; i < count; ++i) out[i] = f16_to_f32(load_le<uint16_t>(p + 2 * i));
      return;
    case StDtype::BF16:
      for (int64_t i = 0; i < count; ++i) out[i] = bf16_to_f32(load_le<uint16_t>(p + 2 * i));
      return;
    case StDtype::F8_E4M3:
      for (int64_t i = 0; i < count; ++i) out[i] = fp8_e4m3_to_f32(p[i]);
      return;
    case StDtype::F8_E8M0:
      for (int64_t i = 0; i < count; ++i) out[i] = e8m0_to_f32(p[i]);
      return;
    default:
      fail("%s: tensor '%s': dtype %s is not a float type", t.file->c_str(), t.name.c_str(), st_dtype_name(t.dtype));
  }
}

void st_read_i64(const StTensor& t, int64_t first, int64_t count, int64_t* out) {
  if (first < 0 || count < 0 || first + count > t.n_elements())
    fail("%s: tensor '%s': read of elements [%lld, %lld) outside %lld", t.file->c_str(), t.name.c_str(),
         (long long)first, (long long)(first + count), (long long)t.n_elements());
  const int sz = st_dtype_size(t.dtype);
  const uint8_t* p = t.data + first * sz;
  for (int64_t i = 0; i < count; ++i) {
    switch (t.dtype) {
      case StDtype::I64: out[i] = load_le<int64_t>(p + 8 * i); break;
      case StDtype::I32: out[i] = load_le<int32_t>(p + 4 * i); break;
      case StDtype::I16: out[i] = load_le<int16_t>(p + 2 * i); break;
      case StDtype::I8: out[i] = int8_t(p[i]); break;
      case StDtype::U8: out[i] = p[i]; break;
      default:
        fail("%s: tensor '%s': dtype %s is not an integer type", t.file->c_str(), t.name.c_str(),
             st_dtype_name(t.dtype));
    }
  }
}

}  // namespace dsv4
