// Safetensors reader for the converter: one file (SafetensorsFile) or a checkpoint directory (Checkpoint) with
// either a single model.safetensors, a sharded set described by model.safetensors.index.json, or loose
// *.safetensors files.
//
// Format: u64 little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets: [b, e]}, ...,
// "__metadata__": {...}}, then the data section; offsets are relative to the data section. open() validates
// the whole header against the file length before returning (dtype known, shape non-negative, e - b equal to
// shape product x dtype size, [b, e) inside the data section, no two tensors overlapping), so a hostile or
// truncated file yields dsv4::Error naming the file, the tensor and the field, never an out-of-bounds read.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace dsv4 {

class MmapFile;

enum class StDtype { F64, F32, F16, BF16, F8_E4M3, F8_E8M0, I64, I32, I16, I8, U8, BOOL };
const char* st_dtype_name(StDtype t);
int st_dtype_size(StDtype t);

struct StTensor {
  std::string name;
  StDtype dtype = StDtype::F32;
  std::vector<int64_t> shape;   // PyTorch order: shape[0] outermost
  uint64_t offset = 0;          // absolute byte offset in the file
  uint64_t n_bytes = 0;
  const uint8_t* data = nullptr;
  const std::string* file = nullptr;  // path of the file holding it

  int64_t n_elements() const;
  std::string shape_string() const;  // "[129280, 4096]"
};

class SafetensorsFile {
 public:
  static std::unique_ptr<SafetensorsFile> open(const std::string& path);
  // Parses a safetensors image already in memory (the caller keeps it alive); `name` stands for the path in
  // error messages. Same validation as open(); the fuzz target uses it so ASan sees reads past the buffer.
  static std::unique_ptr<SafetensorsFile> open_memory(const std::string& name, const uint8_t* data,
                                                      uint64_t size);
  ~SafetensorsFile();
  const std::string& path() const { return path_; }
  const std::vector<StTensor>& tensors() const { return tensors_; }

 private:
  SafetensorsFile() = default;
  void parse(const uint8_t* base, uint64_t size);
  std::string path_;
  std::unique_ptr<MmapFile> map_;
  std::vector<StTensor> tensors_;
};

// All tensors of a checkpoint directory, by name.
class Checkpoint {
 public:
  // Opens DIR/model.safetensors.index.json when present (every listed shard must exist and hold exactly the
  // tensors the index assigns to it), else every *.safetensors in DIR. Duplicate names across files throw.
  static std::unique_ptr<Checkpoint> open(const std::string& dir);
  const std::string& dir() const { return dir_; }
  const StTensor* find(const std::string& name) const;
  const std::map<std::string, const StTensor*>& all() const { return by_name_; }
  size_t n_files() const { return files_.size(); }

 private:
  std::string dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const StTensor*> by_name_;
};

// Reads elements [first, first + count) of a floating tensor (F64/F32/F16/BF16, or F8_E4M3 as raw unscaled
// e4m3 values, or F8_E8M0 as the power of two it encodes) as float.
void st_read_f32(const StTensor& t, int64_t first, int64_t count, float* out);
// Reads elements of an integer tensor (I64/I32/I16/I8/U8) as int64; other dtypes throw.
void st_read_i64(const StTensor& t, int64_t first, int64_t count, int64_t* out);

}  // namespace dsv4
