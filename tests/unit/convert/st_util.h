// Test helpers: a minimal safetensors reader/writer written independently of src/convert (so the converter is
// checked against a second implementation of the format), temp directories and fixture paths.
#pragma once

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace dsv4::test {

namespace fs = std::filesystem;

struct RawTensor {
  std::string dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;

  std::vector<float> f32() const {  // F32 tensors only (the HF fixtures are all F32)
    std::vector<float> v(bytes.size() / 4);
    std::memcpy(v.data(), bytes.data(), bytes.size());
    return v;
  }
};
using RawCheckpoint = std::map<std::string, RawTensor>;

inline std::vector<uint8_t> slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}

inline void spit(const fs::path& p, const void* data, size_t n) {
  std::ofstream out(p, std::ios::binary);
  out.write(static_cast<const char*>(data), std::streamsize(n));
}

inline RawCheckpoint read_st_file(const fs::path& p) {
  RawCheckpoint out;
  const auto b = slurp(p);
  uint64_t n = 0;
  std::memcpy(&n, b.data(), 8);
  const auto h = nlohmann::json::parse(b.begin() + 8, b.begin() + 8 + int64_t(n));
  for (auto it = h.begin(); it != h.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    RawTensor t;
    t.dtype = it.value()["dtype"];
    t.shape = it.value()["shape"].get<std::vector<int64_t>>();
    const uint64_t s = it.value()["data_offsets"][0], e = it.value()["data_offsets"][1];
    t.bytes.assign(b.begin() + int64_t(8 + n + s), b.begin() + int64_t(8 + n + e));
    out[it.key()] = std::move(t);
  }
  return out;
}

inline RawCheckpoint read_st_dir(const fs::path& dir) {
  RawCheckpoint all;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().extension() == ".safetensors") all.merge(read_st_file(e.path()));
  return all;
}

inline void write_st_file(const fs::path& p, const RawCheckpoint& c) {
  nlohmann::json h = nlohmann::json::object();
  uint64_t off = 0;
  for (const auto& [name, t] : c) {
    h[name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {off, off + t.bytes.size()}}};
    off += t.bytes.size();
  }
  std::string hs = h.dump();
  while (hs.size() % 8) hs += ' ';
  std::ofstream out(p, std::ios::binary);
  const uint64_t n = hs.size();
  out.write(reinterpret_cast<const char*>(&n), 8);
  out.write(hs.data(), std::streamsize(hs.size()));
  for (const auto& [name, t] : c) out.write(reinterpret_cast<const char*>(t.bytes.data()), std::streamsize(t.bytes.size()));
}

struct TempDir {
  fs::path path;
  TempDir() {
    std::random_device rd;
    path = fs::temp_directory_path() / ("dsv4_convert_test_" + std::to_string(rd()) + std::to_string(rd()));
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string str(const std::string& name) const { return (path / name).string(); }
};

inline fs::path fixture_dir(const std::string& name) { return fs::path(DSV4_SOURCE_DIR) / "tests/fixtures" / name; }

}  // namespace dsv4::test
