// Metadata access: GgufValue (a validated view into the mapping) and GgufFile's typed getters with their
// widening rules, plus the display formatting used by `dsv4 inspect`.
#include <algorithm>
#include <cinttypes>
#include <cstring>
#include <limits>

#include "common/error.h"
#include "gguf/gguf.h"
#include "gguf/gguf_parser.h"

namespace dsv4 {

// ---- GgufValue ---------------------------------------------------------------------------------------------

void GgufValue::wrong_type(GgufType wanted) const {
  fail("%s: value at byte offset %llu: expected %s, found %s", file_->path().c_str(), (unsigned long long)offset_,
       gguf_type_name(wanted).c_str(), gguf_type_name(type_).c_str());
}

namespace {
template <typename T>
T load(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}
}  // namespace

#define DSV4_SCALAR_GETTER(fn, T, TAG)                     \
  T GgufValue::fn() const {                                \
    if (type_ != GgufType::TAG) wrong_type(GgufType::TAG); \
    return load<T>(file_->file_data() + offset_);          \
  }
DSV4_SCALAR_GETTER(as_u8, uint8_t, UINT8)
DSV4_SCALAR_GETTER(as_i8, int8_t, INT8)
DSV4_SCALAR_GETTER(as_u16, uint16_t, UINT16)
DSV4_SCALAR_GETTER(as_i16, int16_t, INT16)
DSV4_SCALAR_GETTER(as_u32, uint32_t, UINT32)
DSV4_SCALAR_GETTER(as_i32, int32_t, INT32)
DSV4_SCALAR_GETTER(as_u64, uint64_t, UINT64)
DSV4_SCALAR_GETTER(as_i64, int64_t, INT64)
DSV4_SCALAR_GETTER(as_f32, float, FLOAT32)
DSV4_SCALAR_GETTER(as_f64, double, FLOAT64)
#undef DSV4_SCALAR_GETTER

bool GgufValue::as_bool() const {
  if (type_ != GgufType::BOOL) wrong_type(GgufType::BOOL);
  return file_->file_data()[offset_] != 0;
}

std::string_view GgufValue::as_string() const {
  if (type_ != GgufType::STRING) wrong_type(GgufType::STRING);
  uint64_t len = load<uint64_t>(file_->file_data() + offset_);
  return std::string_view(reinterpret_cast<const char*>(file_->file_data() + offset_ + 8), size_t(len));
}

GgufType GgufValue::array_type() const {
  if (type_ != GgufType::ARRAY) wrong_type(GgufType::ARRAY);
  return GgufType(load<uint32_t>(file_->file_data() + offset_));
}

uint64_t GgufValue::array_size() const {
  if (type_ != GgufType::ARRAY) wrong_type(GgufType::ARRAY);
  return load<uint64_t>(file_->file_data() + offset_ + 4);
}

void GgufValue::for_each_element(const std::function<void(const GgufValue&)>& fn, uint64_t limit) const {
  GgufType et = array_type();
  uint64_t n = std::min(array_size(), limit);
  // The bytes were validated at open; walking them again with the checked parser costs little and keeps
  // this code from trusting anything it did not just check.
  GgufParser in(file_->path(), file_->file_data(), offset_ + byte_size_);
  in.pos = offset_ + 12;
  for (uint64_t i = 0; i < n; ++i) {
    GgufValue e;
    e.file_ = file_;
    e.type_ = et;
    e.offset_ = in.pos;
    in.skip_value(et, 1);
    e.byte_size_ = in.pos - e.offset_;
    fn(e);
  }
}

GgufValue GgufValue::array_element(uint64_t i) const {
  GgufType et = array_type();
  uint64_t n = array_size();
  if (i >= n)
    fail("%s: array at byte offset %llu: index %llu out of range (%llu elements)", file_->path().c_str(),
         (unsigned long long)offset_, (unsigned long long)i, (unsigned long long)n);
  GgufValue e;
  e.file_ = file_;
  e.type_ = et;
  int fs = GgufParser::fixed_size(et);
  if (fs > 0) {
    e.offset_ = offset_ + 12 + i * uint64_t(fs);
    e.byte_size_ = uint64_t(fs);
    return e;
  }
  GgufParser in(file_->path(), file_->file_data(), offset_ + byte_size_);
  in.pos = offset_ + 12;
  for (uint64_t k = 0; k < i; ++k) in.skip_value(et, 1);
  e.offset_ = in.pos;
  in.skip_value(et, 1);
  e.byte_size_ = in.pos - e.offset_;
  return e;
}

// ---- widening conversions shared by scalar and array getters ------------------------------------------------

namespace {

[[noreturn]] void type_error(const GgufFile& f, const std::string& key, const char* want, GgufType found,
                             const char* where = "") {
  fail("%s: key '%s'%s: expected %s, found %s", f.path().c_str(), key.c_str(), where, want,
       gguf_type_name(found).c_str());
}

// Integer value of any integer type, as (is_negative, magnitude-or-value) through int128.
bool integer_value(const GgufValue& v, __int128* out) {
  switch (v.type()) {
    case GgufType::UINT8: *out = v.as_u8(); return true;
    case GgufType::INT8: *out = v.as_i8(); return true;
    case GgufType::UINT16: *out = v.as_u16(); return true;
    case GgufType::INT16: *out = v.as_i16(); return true;
    case GgufType::UINT32: *out = v.as_u32(); return true;
    case GgufType::INT32: *out = v.as_i32(); return true;
    case GgufType::UINT64: *out = v.as_u64(); return true;
    case GgufType::INT64: *out = v.as_i64(); return true;
    default: return false;
  }
}

bool is_unsigned(GgufType t) {
  return t == GgufType::UINT8 || t == GgufType::UINT16 || t == GgufType::UINT32 || t == GgufType::UINT64;
}

template <typename T>
T to_unsigned(const GgufFile& f, const std::string& key, const GgufValue& v, const char* want,
              const char* where) {
  __int128 x;
  if (!is_unsigned(v.type()) || !integer_value(v, &x)) type_error(f, key, want, v.type(), where);
  if (x > __int128(std::numeric_limits<T>::max()))
    fail("%s: key '%s'%s: value %llu does not fit %s", f.path().c_str(), key.c_str(), where,
         (unsigned long long)x, want);
  return T(x);
}

int32_t to_i32(const GgufFile& f, const std::string& key, const GgufValue& v, const char* where) {
  __int128 x;
  if (v.type() == GgufType::INT64 || !integer_value(v, &x)) type_error(f, key, "i32", v.type(), where);
  if (x > std::numeric_limits<int32_t>::max() || x < std::numeric_limits<int32_t>::min())
    fail("%s: key '%s'%s: value %lld does not fit i32", f.path().c_str(), key.c_str(), where, (long long)x);
  return int32_t(x);
}

double to_f64(const GgufFile& f, const std::string& key, const GgufValue& v, const char* want, const char* where) {
  if (v.type() == GgufType::FLOAT32) return v.as_f32();
  if (v.type() == GgufType::FLOAT64) return v.as_f64();
  type_error(f, key, want, v.type(), where);
}

}  // namespace

// ---- GgufFile scalar getters ----------------------------------------------------------------------------------

const GgufValue* GgufFile::find(const std::string& key) const {
  auto it = kv_index_.find(key);
  return it == kv_index_.end() ? nullptr : &kv_[it->second].second;
}

const GgufValue& GgufFile::get(const std::string& key) const {
  const GgufValue* v = find(key);
  if (!v) fail("%s: missing key '%s'", path_.c_str(), key.c_str());
  return *v;
}

uint32_t GgufFile::get_u32(const std::string& key) const { return to_unsigned<uint32_t>(*this, key, get(key), "u32", ""); }
uint64_t GgufFile::get_u64(const std::string& key) const { return to_unsigned<uint64_t>(*this, key, get(key), "u64", ""); }
int32_t GgufFile::get_i32(const std::string& key) const { return to_i32(*this, key, get(key), ""); }
float GgufFile::get_f32(const std::string& key) const { return float(to_f64(*this, key, get(key), "f32", "")); }
double GgufFile::get_f64(const std::string& key) const { return to_f64(*this, key, get(key), "f64", ""); }

bool GgufFile::get_bool(const std::string& key) const {
  const GgufValue& v = get(key);
  if (v.type() != GgufType::BOOL) type_error(*this, key, "bool", v.type());
  return v.as_bool();
}

std::string GgufFile::get_string(const std::string& key) const {
  const GgufValue& v = get(key);
  if (v.type() != GgufType::STRING) type_error(*this, key, "string", v.type());
  return std::string(v.as_string());
}

std::optional<uint32_t> GgufFile::get_u32_opt(const std::string& key) const {
  return has(key) ? std::optional(get_u32(key)) : std::nullopt;
}
std::optional<uint64_t> GgufFile::get_u64_opt(const std::string& key) const {
  return has(key) ? std::optional(get_u64(key)) : std::nullopt;
}
std::optional<int32_t> GgufFile::get_i32_opt(const std::string& key) const {
  return has(key) ? std::optional(get_i32(key)) : std::nullopt;
}
std::optional<float> GgufFile::get_f32_opt(const std::string& key) const {
  return has(key) ? std::optional(get_f32(key)) : std::nullopt;
}
std::optional<bool> GgufFile::get_bool_opt(const std::string& key) const {
  return has(key) ? std::optional(get_bool(key)) : std::nullopt;
}
std::optional<std::string> GgufFile::get_string_opt(const std::string& key) const {
  return has(key) ? std::optional(get_string(key)) : std::nullopt;
}

// ---- GgufFile array getters -----------------------------------------------------------------------------------

namespace {
const GgufValue& get_array(const GgufFile& f, const std::string& key) {
  const GgufValue& v = f.get(key);
  if (v.type() != GgufType::ARRAY) type_error(f, key, "array", v.type());
  return v;
}

template <typename T, typename Conv>
std::vector<T> convert_array(const GgufFile& f, const std::string& key, Conv conv) {
  const GgufValue& a = get_array(f, key);
  std::vector<T> out;
  out.reserve(size_t(a.array_size()));  // bounded: validated against the file size at open
  a.for_each_element([&](const GgufValue& e) { out.push_back(conv(e)); });
  return out;
}
}  // namespace

uint64_t GgufFile::get_array_size(const std::string& key) const { return get_array(*this, key).array_size(); }
GgufType GgufFile::get_array_type(const std::string& key) const { return get_array(*this, key).array_type(); }

std::vector<int32_t> GgufFile::get_array_i32(const std::string& key) const {
  return convert_array<int32_t>(*this, key, [&](const GgufValue& e) { return to_i32(*this, key, e, " element"); });
}
std::vector<uint32_t> GgufFile::get_array_u32(const std::string& key) const {
  return convert_array<uint32_t>(
      *this, key, [&](const GgufValue& e) { return to_unsigned<uint32_t>(*this, key, e, "u32", " element"); });
}
std::vector<float> GgufFile::get_array_f32(const std::string& key) const {
  return convert_array<float>(
      *this, key, [&](const GgufValue& e) { return float(to_f64(*this, key, e, "f32", " element")); });
}
std::vector<std::string_view> GgufFile::get_array_string_views(const std::string& key) const {
  return convert_array<std::string_view>(*this, key, [&](const GgufValue& e) {
    if (e.type() != GgufType::STRING) type_error(*this, key, "string", e.type(), " element");
    return e.as_string();
  });
}
std::vector<std::string> GgufFile::get_array_string(const std::string& key) const {
  std::vector<std::string_view> views = get_array_string_views(key);
  return std::vector<std::string>(views.begin(), views.end());
}

// ---- display -------------------------------------------------------------------------------------------------

namespace {
std::string quote(std::string_view s, size_t max_chars) {
  std::string out = "\"";
  size_t n = std::min(s.size(), max_chars);
  for (size_t i = 0; i < n; ++i) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    if (c == '"' || c == '\\') out += {'\\', char(c)};
    else if (c == '\n') out += "\\n";
    else if (c < 0x20 || c == 0x7f) out += strfmt("\\x%02x", c);
    else out += char(c);  // UTF-8 bytes pass through
  }
  out += '"';
  if (s.size() > max_chars) out += strfmt("... (%zu bytes)", s.size());
  return out;
}
}  // namespace

std::string GgufFile::format_value(const GgufValue& v, size_t max_items, size_t max_string) const {
  __int128 x;
  switch (v.type()) {
    case GgufType::FLOAT32: return strfmt("%.9g", double(v.as_f32()));
    case GgufType::FLOAT64: return strfmt("%.17g", v.as_f64());
    case GgufType::BOOL: return v.as_bool() ? "true" : "false";
    case GgufType::STRING: return quote(v.as_string(), max_string);
    case GgufType::ARRAY: {
      uint64_t n = v.array_size();
      std::string out = "[";
      uint64_t shown = 0;
      if (n > 0 && max_items > 0) {
        v.for_each_element(
            [&](const GgufValue& e) { out += (shown++ ? ", " : "") + format_value(e, max_items, max_string); },
            max_items);
      }
      if (shown < n) out += strfmt("%s... (%llu items)", shown ? ", " : "", (unsigned long long)n);
      return out + "]";
    }
    default:
      integer_value(v, &x);
      return v.type() == GgufType::UINT64 ? strfmt("%llu", (unsigned long long)x) : strfmt("%lld", (long long)x);
  }
}

}  // namespace dsv4
