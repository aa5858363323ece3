// GGUF v2/v3 reader (GgufFile) and streaming writer (GgufWriter).
//
// Reader guarantees (see docs/gguf.md): open() parses and validates the whole header, metadata and tensor
// directory against the file length before returning. Every count, string length, array size, tensor
// dimension, data offset and data size is checked; a truncated or hostile file yields dsv4::Error naming the
// file, the key or tensor, and the byte offset, never an out-of-bounds read or an unbounded allocation. After
// open() succeeds, every accessor reads only validated bytes.
//
// Dimension order is ggml's: ne[0] is the contiguous dimension; unused trailing dims are 1.
// Tensor type ids are ggml's raw uint32 ids (F32 0, F16 1, Q8_0 8, Q2_K 10, Q4_K 12, Q8_K 15, IQ2_XXS 16,
// I32 26, BF16 30, MXFP4 39, ...). This layer only needs each type's block size and bytes per block, from
// the table behind ggml_type_layout() (or the caller's extra_types hook for ids it does not know).
#pragma once

#include <array>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <initializer_list>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace dsv4 {

class MmapFile;
class GgufFile;

// ---- types ---------------------------------------------------------------------------------------------------

enum class GgufType : uint32_t {
  UINT8 = 0, INT8 = 1, UINT16 = 2, INT16 = 3, UINT32 = 4, INT32 = 5, FLOAT32 = 6, BOOL = 7,
  STRING = 8, ARRAY = 9, UINT64 = 10, INT64 = 11, FLOAT64 = 12,
};
// "u8", "i8", ..., "f64", "bool", "string", "array", or "type#N" for an unknown id.
std::string gguf_type_name(GgufType t);

// Storage layout of a ggml tensor type: block_size values are stored in type_size bytes.
struct GgmlTypeLayout {
  const char* name;
  uint32_t block_size;
  uint32_t type_size;
};
// The built-in table of ggml type ids (nullopt for ids not in it).
std::optional<GgmlTypeLayout> ggml_type_layout(uint32_t type_id);
// Hook for tensor type ids outside the built-in table.
using GgmlTypeLookup = std::function<std::optional<GgmlTypeLayout>(uint32_t type_id)>;
// Display name of a type id: the table name or "type#N".
std::string ggml_type_name(uint32_t type_id);

// Bytes of a tensor of `type` with dims ne[0..n_dims). Throws dsv4::Error (mentioning `what`) if ne[0] is not
// a multiple of the block size, a dim is negative, the type is unknown or the size overflows 64 bits.
uint64_t ggml_tensor_bytes(uint32_t type, std::span<const int64_t> ne, const std::string& what,
                           const GgmlTypeLookup& extra_types = nullptr);

// ---- reader ------------------------------------------------------------------------------------------------

// A metadata value: a view into the mapped file (valid while its GgufFile lives).
class GgufValue {
 public:
  GgufType type() const { return type_; }
  uint64_t offset() const { return offset_; }  // byte offset of the value in the file

  // Scalars, exact type only (the GgufFile::get_* accessors add the allowed widenings).
  uint8_t as_u8() const;
  int8_t as_i8() const;
  uint16_t as_u16() const;
  int16_t as_i16() const;
  uint32_t as_u32() const;
  int32_t as_i32() const;
  uint64_t as_u64() const;
  int64_t as_i64() const;
  float as_f32() const;
  double as_f64() const;
  bool as_bool() const;
  std::string_view as_string() const;

  // Arrays.
  GgufType array_type() const;
  uint64_t array_size() const;
  // Element i (O(1) for fixed-size element types, O(i) for strings and nested arrays).
  GgufValue array_element(uint64_t i) const;
  // Calls fn for each of the first `limit` elements in order (O(n) for every element type).
  void for_each_element(const std::function<void(const GgufValue&)>& fn, uint64_t limit = UINT64_MAX) const;

 private:
  friend class GgufFile;
  friend struct GgufFileLoader;
  const GgufFile* file_ = nullptr;
  GgufType type_ = GgufType::UINT8;
  uint64_t offset_ = 0;      // where the value's bytes start (string: its length prefix; array: its type)
  uint64_t byte_size_ = 0;   // total encoded size, validated at open
  void wrong_type(GgufType wanted) const;
};

struct GgufTensorInfo {
  std::string name;
  uint32_t type = 0;
  uint32_t n_dims = 0;
  std::array<int64_t, 4> ne{1, 1, 1, 1};
  uint64_t offset = 0;    // absolute byte offset of the data in the file (aligned)
  uint64_t n_bytes = 0;
  const uint8_t* data = nullptr;  // into the mapping

  int64_t n_elements() const { return ne[0] * ne[1] * ne[2] * ne[3]; }
  std::string shape_string() const;  // "[4096, 129280]"
};

struct GgufOpenOptions {
  GgmlTypeLookup extra_types;  // sizes for tensor type ids outside ggml_type_layout()
};

class GgufFile {
 public:
  // Maps and validates the file. Throws dsv4::Error on any problem.
  static std::unique_ptr<GgufFile> open(const std::string& path, const GgufOpenOptions& options = {});
  // Parses a GGUF image already in memory (the fuzzer, tests). `name` stands in for the path in messages.
  // The bytes are not copied and must outlive the returned object.
  static std::unique_ptr<GgufFile> open_memory(const std::string& name, const uint8_t* data, size_t size,
                                               const GgufOpenOptions& options = {});
  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  const std::string& path() const { return path_; }
  uint32_t version() const { return version_; }
  uint32_t alignment() const { return alignment_; }
  uint64_t file_size() const { return size_; }
  uint64_t data_offset() const { return data_offset_; }  // start of the tensor data section
  const uint8_t* file_data() const { return data_; }     // the whole mapping

  // ---- metadata: key order as in the file
  const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return kv_; }
  bool has(const std::string& key) const { return find(key) != nullptr; }
  const GgufValue* find(const std::string& key) const;
  const GgufValue& get(const std::string& key) const;  // throws "FILE: missing key 'K'"

  // Typed getters. Allowed widenings: get_u64 accepts u8/u16/u32/u64; get_u32 accepts u8/u16/u32 and a u64
  // that fits; get_i32 accepts i8/i16/i32 and unsigned values that fit; get_f32 accepts f32 and f64;
  // get_f64 accepts f32 and f64. Anything else throws "FILE: key 'K': expected u32, found f32".
  uint32_t get_u32(const std::string& key) const;
  uint64_t get_u64(const std::string& key) const;
  int32_t get_i32(const std::string& key) const;
  float get_f32(const std::string& key) const;
  double get_f64(const std::string& key) const;
  bool get_bool(const std::string& key) const;
  std::string get_string(const std::string& key) const;

  // Optional variants: nullopt when the key is absent, but a present key of the wrong type still throws.
  std::optional<uint32_t> get_u32_opt(const std::string& key) const;
  std::optional<uint64_t> get_u64_opt(const std::string& key) const;
  std::optional<int32_t> get_i32_opt(const std::string& key) const;
  std::optional<float> get_f32_opt(const std::string& key) const;
  std::optional<bool> get_bool_opt(const std::string& key) const;
  std::optional<std::string> get_string_opt(const std::string& key) const;

  // Arrays. Element widenings follow the scalar getters (e.g. get_array_i32 accepts i8/i16/i32 and
  // u8/u16/u32 elements that fit; get_array_f32 accepts f32 and f64).
  uint64_t get_array_size(const std::string& key) const;
  GgufType get_array_type(const std::string& key) const;
  std::vector<int32_t> get_array_i32(const std::string& key) const;
  std::vector<uint32_t> get_array_u32(const std::string& key) const;
  std::vector<float> get_array_f32(const std::string& key) const;
  std::vector<std::string> get_array_string(const std::string& key) const;
  // Views into the mapping (no copies): for the tokenizer's 129k-entry vocab.
  std::vector<std::string_view> get_array_string_views(const std::string& key) const;

  // ---- tensors: order as in the file
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  const GgufTensorInfo* find_tensor(const std::string& name) const;
  const GgufTensorInfo& get_tensor(const std::string& name) const;  // throws "FILE: missing tensor 'T'"
  // Asks the kernel to start paging in a tensor's bytes (no-op for open_memory files).
  void prefetch(const GgufTensorInfo& t) const;
  // Checks type (one of `types`, empty = any) and dims (exactly `ne`, trailing dims 1; empty = any).
  // Throws "FILE: tensor 'T': expected type Q8_0 or F16, found F32" / "expected shape [..], found [..]".
  const GgufTensorInfo& require_tensor(const std::string& name, std::initializer_list<uint32_t> types,
                                       std::initializer_list<int64_t> ne) const;
  const GgufTensorInfo& require_tensor(const std::string& name, std::span<const uint32_t> types,
                                       std::span<const int64_t> ne) const;

  // Formats a value for display: scalars in full, strings quoted (cut after max_string chars), arrays as
  // "[a, b, c, ... (N items)]" showing at most max_items elements.
  std::string format_value(const GgufValue& v, size_t max_items = 8, size_t max_string = 80) const;

 private:
  GgufFile() = default;
  friend class GgufValue;
  friend struct GgufFileLoader;

  std::string path_;
  std::unique_ptr<MmapFile> map_;  // null for open_memory()
  const uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
  uint32_t version_ = 0;
  uint32_t alignment_ = 32;
  uint64_t data_offset_ = 0;
  std::vector<std::pair<std::string, GgufValue>> kv_;
  std::unordered_map<std::string, size_t> kv_index_;
  std::vector<GgufTensorInfo> tensors_;
  std::unordered_map<std::string, size_t> tensor_index_;
};

// ---- writer ------------------------------------------------------------------------------------------------

// Encodes one array value (possibly of arrays) for GgufWriter::add_array.
class GgufArrayBuilder {
 public:
  explicit GgufArrayBuilder(GgufType element_type);
  GgufType element_type() const { return type_; }
  uint64_t size() const { return count_; }

  // Each push must match element_type (checked; a mismatch throws).
  GgufArrayBuilder& push_u8(uint8_t v);
  GgufArrayBuilder& push_i8(int8_t v);
  GgufArrayBuilder& push_u16(uint16_t v);
  GgufArrayBuilder& push_i16(int16_t v);
  GgufArrayBuilder& push_u32(uint32_t v);
  GgufArrayBuilder& push_i32(int32_t v);
  GgufArrayBuilder& push_u64(uint64_t v);
  GgufArrayBuilder& push_i64(int64_t v);
  GgufArrayBuilder& push_f32(float v);
  GgufArrayBuilder& push_f64(double v);
  GgufArrayBuilder& push_bool(bool v);
  GgufArrayBuilder& push_string(std::string_view v);
  GgufArrayBuilder& push_array(const GgufArrayBuilder& v);

  // Encoded bytes: element type u32, count u64, elements.
  std::vector<uint8_t> encode() const;

 private:
  void expect(GgufType t);
  GgufType type_;
  uint64_t count_ = 0;
  std::vector<uint8_t> body_;
};

// Streaming GGUF v3 writer. Usage:
//   GgufWriter w(path);                      // creates a temporary file next to path
//   w.add_u32("deepseek4.block_count", 43);  // metadata, any order (duplicate keys throw)
//   w.add_tensor("token_embd.weight", 1, {4096, 129280});   // declare every tensor up front
//   w.begin_data();                          // writes header + metadata + tensor directory
//   w.write_tensor_data("token_embd.weight", bytes);   // in declaration order; may be called repeatedly
//                                                      // per tensor to stream it in chunks
//   w.skip_tensor_data("...");               // or leave the (rest of the) tensor as a zero-filled hole
//   w.finish();                              // checks every tensor is complete, sets the file length,
//                                            // renames the temporary file to path
// Only metadata and the tensor directory are kept in memory; tensor bytes go straight to the file.
class GgufWriter {
 public:
  // Writes to a temporary file next to `path` (PATH.tmp.<pid>.<n>) and renames it over `path` only in
  // finish(), so an existing file at `path` survives any failure before that point.
  explicit GgufWriter(const std::string& path);
  ~GgufWriter();  // without finish(): closes and deletes the temporary file; `path` is untouched
  GgufWriter(const GgufWriter&) = delete;
  GgufWriter& operator=(const GgufWriter&) = delete;

  // Data alignment (power of two, default 32). Also stored as general.alignment (u32) when != 32.
  // Must be called before begin_data(). add_u32("general.alignment", a) does the same.
  void set_alignment(uint32_t alignment);

  void add_u8(const std::string& key, uint8_t v);
  void add_i8(const std::string& key, int8_t v);
  void add_u16(const std::string& key, uint16_t v);
  void add_i16(const std::string& key, int16_t v);
  void add_u32(const std::string& key, uint32_t v);
  void add_i32(const std::string& key, int32_t v);
  void add_u64(const std::string& key, uint64_t v);
  void add_i64(const std::string& key, int64_t v);
  void add_f32(const std::string& key, float v);
  void add_f64(const std::string& key, double v);
  void add_bool(const std::string& key, bool v);
  void add_string(const std::string& key, std::string_view v);
  void add_array(const std::string& key, const GgufArrayBuilder& array);
  void add_array_i32(const std::string& key, std::span<const int32_t> v);
  void add_array_u32(const std::string& key, std::span<const uint32_t> v);
  void add_array_f32(const std::string& key, std::span<const float> v);
  void add_array_string(const std::string& key, std::span<const std::string> v);

  // Declares a tensor; n_bytes is computed from the type table (or extra_types). Returns its data offset
  // relative to the start of the data section.
  uint64_t add_tensor(const std::string& name, uint32_t type, std::span<const int64_t> ne,
                      const GgmlTypeLookup& extra_types = nullptr);
  uint64_t add_tensor(const std::string& name, uint32_t type, std::initializer_list<int64_t> ne,
                      const GgmlTypeLookup& extra_types = nullptr);

  void begin_data();
  // Appends bytes to `name`, which must be the current tensor (the first incomplete one in declaration
  // order). A tensor is complete when exactly its n_bytes were written or skipped.
  void write_tensor_data(const std::string& name, const void* data, size_t n);
  void write_tensor_data(const std::string& name, std::span<const uint8_t> bytes) {
    write_tensor_data(name, bytes.data(), bytes.size());
  }
  // Leaves the rest of the current tensor as zeros by seeking (a file hole on filesystems that have them).
  void skip_tensor_data(const std::string& name);
  // Checks all tensors are complete, writes the final padding/length and closes the file.
  void finish();

  const std::string& path() const { return path_; }
  uint64_t tensor_data_size() const { return data_size_; }  // bytes of the data section incl. padding

 private:
  struct PendingTensor {
    std::string name;
    uint32_t type;
    std::vector<int64_t> ne;
    uint64_t rel_offset;
    uint64_t n_bytes;
  };
  void add_kv(const std::string& key, GgufType type, const void* payload, size_t n);
  void add_kv_bytes(const std::string& key, GgufType type, const std::vector<uint8_t>& payload);
  void write_raw(const void* p, size_t n);
  void seek_to(uint64_t pos);
  PendingTensor& current_tensor(const std::string& name, const char* op);
  void advance_past_complete();

  std::string path_;
  std::string tmp_path_;  // where the bytes go until finish() renames it to path_
  std::FILE* f_ = nullptr;
  uint32_t alignment_ = 32;
  bool alignment_key_ = false;
  std::vector<uint8_t> kv_bytes_;
  uint64_t n_kv_ = 0;
  std::unordered_map<std::string, bool> keys_;
  std::vector<PendingTensor> tensors_;
  std::unordered_map<std::string, size_t> tensor_index_;
  uint64_t data_size_ = 0;     // running end of the data section (relative), padded per tensor
  enum class State { Metadata, Data, Finished } state_ = State::Metadata;
  uint64_t data_start_ = 0;    // absolute offset of the data section
  size_t cur_ = 0;             // current tensor index while streaming
  uint64_t cur_written_ = 0;   // bytes of the current tensor written or skipped
};

}  // namespace dsv4
