// Read-only memory mapping of a whole file (RAII). The GGUF reader maps the model once and hands out
// pointers into the mapping, so weights are paged in on demand and never copied.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace dsv4 {

class MmapFile {
 public:
  // Maps `path` read-only. Throws dsv4::Error naming the path and the errno text on failure.
  // An empty file maps to data() == nullptr, size() == 0.
  explicit MmapFile(const std::string& path);
  ~MmapFile();
  MmapFile(const MmapFile&) = delete;
  MmapFile& operator=(const MmapFile&) = delete;
  MmapFile(MmapFile&& other) noexcept;
  MmapFile& operator=(MmapFile&& other) noexcept;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

  // Hints that [offset, offset + len) will be read soon (madvise WILLNEED); out-of-range parts are ignored.
  void prefetch(size_t offset, size_t len) const;

 private:
  void release() noexcept;

  std::string path_;
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace dsv4
