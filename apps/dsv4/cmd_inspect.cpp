// `dsv4 inspect FILE`: prints a GGUF file's header, metadata (long arrays and strings abbreviated) and tensor
// table (name, type, shape, bytes, offset), in the spirit of gguf-py's gguf-dump; `--json` gives the same
// information as one JSON object for scripts. The file is fully validated by GgufFile::open first, so
// inspect doubles as a checker: a damaged file fails with the reader's precise error and exit code 1.
#include <nlohmann/json.hpp>

#include <cstdio>
#include <map>
#include <memory>
#include <string>

#include "command.h"
#include "common/error.h"
#include "gguf/gguf.h"

namespace {

using dsv4::GgufFile;
using dsv4::GgufType;
using dsv4::GgufValue;

std::string human_bytes(uint64_t n) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = double(n);
  int u = 0;
  while (v >= 1024 && u < 4) {
    v /= 1024;
    ++u;
  }
  return u == 0 ? std::to_string(n) + " B" : dsv4::strfmt("%.2f %s", v, units[u]);
}

// "u32", "[string]", "[[i32]]" (element type of arrays shown in brackets).
std::string type_label(const GgufValue& v) {
  if (v.type() != GgufType::ARRAY) return dsv4::gguf_type_name(v.type());
  if (v.array_type() == GgufType::ARRAY && v.array_size() > 0) return "[" + type_label(v.array_element(0)) + "]";
  return "[" + dsv4::gguf_type_name(v.array_type()) + "]";
}

nlohmann::json value_json(const GgufFile& f, const GgufValue& v, size_t max_items) {
  switch (v.type()) {
    case GgufType::UINT8: return v.as_u8();
    case GgufType::INT8: return v.as_i8();
    case GgufType::UINT16: return v.as_u16();
    case GgufType::INT16: return v.as_i16();
    case GgufType::UINT32: return v.as_u32();
    case GgufType::INT32: return v.as_i32();
    case GgufType::UINT64: return v.as_u64();
    case GgufType::INT64: return v.as_i64();
    case GgufType::FLOAT32: return v.as_f32();
    case GgufType::FLOAT64: return v.as_f64();
    case GgufType::BOOL: return v.as_bool();
    case GgufType::STRING: return std::string(v.as_string());
    case GgufType::ARRAY: {
      nlohmann::json items = nlohmann::json::array();
      v.for_each_element([&](const GgufValue& e) { items.push_back(value_json(f, e, max_items)); }, max_items);
      return items;
    }
  }
  return nullptr;
}

nlohmann::json file_json(const GgufFile& f, size_t max_items) {
  nlohmann::json j;
  j["path"] = f.path();
  j["version"] = f.version();
  j["alignment"] = f.alignment();
  j["file_size"] = f.file_size();
  j["data_offset"] = f.data_offset();
  nlohmann::json meta = nlohmann::json::array();
  for (const auto& [key, v] : f.metadata()) {
    nlohmann::json m = {{"key", key}, {"type", type_label(v)}, {"value", value_json(f, v, max_items)}};
    if (v.type() == GgufType::ARRAY) {
      m["count"] = v.array_size();
      m["truncated"] = v.array_size() > max_items;
    }
    meta.push_back(std::move(m));
  }
  j["metadata"] = std::move(meta);
  nlohmann::json tensors = nlohmann::json::array();
  for (const auto& t : f.tensors()) {
    nlohmann::json shape = nlohmann::json::array();
    for (uint32_t d = 0; d < t.n_dims; ++d) shape.push_back(t.ne[d]);
    tensors.push_back({{"name", t.name},
                       {"type", dsv4::ggml_type_name(t.type)},
                       {"type_id", t.type},
                       {"shape", shape},
                       {"offset", t.offset},
                       {"n_bytes", t.n_bytes}});
  }
  j["tensors"] = std::move(tensors);
  return j;
}

void print_text(const GgufFile& f, size_t max_items, bool show_tensors) {
  uint64_t weight_bytes = 0;
  for (const auto& t : f.tensors()) weight_bytes += t.n_bytes;
  std::printf("%s: GGUF v%u, %zu metadata keys, %zu tensors (%s), alignment %u, data at byte %llu, file %s\n",
              f.path().c_str(), f.version(), f.metadata().size(), f.tensors().size(),
              human_bytes(weight_bytes).c_str(), f.alignment(), (unsigned long long)f.data_offset(),
              human_bytes(f.file_size()).c_str());
  std::printf("\n* metadata\n");
  int i = 0;
  for (const auto& [key, v] : f.metadata())
    std::printf("%5d: %-10s %s = %s\n", ++i, type_label(v).c_str(), key.c_str(),
                f.format_value(v, max_items).c_str());
  if (!show_tensors) return;
  std::printf("\n* tensors\n%5s  %-8s %-24s %14s %14s  %s\n", "#", "type", "shape", "bytes", "offset", "name");
  i = 0;
  std::map<std::string, std::pair<int, uint64_t>> by_type;
  for (const auto& t : f.tensors()) {
    std::string type = dsv4::ggml_type_name(t.type);
    std::printf("%5d  %-8s %-24s %14llu %14llu  %s\n", ++i, type.c_str(), t.shape_string().c_str(),
                (unsigned long long)t.n_bytes, (unsigned long long)t.offset, t.name.c_str());
    by_type[type].first++;
    by_type[type].second += t.n_bytes;
  }
  std::printf("\n* bytes by type\n");
  for (const auto& [type, cb] : by_type)
    std::printf("  %-8s %6d tensors %14llu bytes (%s)\n", type.c_str(), cb.first, (unsigned long long)cb.second,
                human_bytes(cb.second).c_str());
}

struct InspectOptions {
  std::string path;
  bool json = false;
  bool no_tensors = false;
  size_t max_items = 8;
};

DSV4_COMMAND("inspect", "Validate a GGUF file and print its metadata and tensor table", [](CLI::App& sub) {
  auto opt = std::make_shared<InspectOptions>();
  sub.add_option("file", opt->path, "GGUF file")->required();
  sub.add_flag("--json", opt->json, "Print one JSON object instead of text");
  sub.add_flag("--no-tensors", opt->no_tensors, "Text mode: omit the tensor table");
  sub.add_option("--max-items", opt->max_items, "Array elements shown per metadata value (default 8)");
  return [opt]() {
    auto f = GgufFile::open(opt->path);
    if (opt->json) {
      // Replace invalid UTF-8 rather than throw: inspect must describe any file the reader accepts.
      std::string out = file_json(*f, opt->max_items).dump(1, ' ', false, nlohmann::json::error_handler_t::replace);
      std::printf("%s\n", out.c_str());
    } else {
      print_text(*f, opt->max_items, !opt->no_tensors);
    }
    return 0;
  };
});

}  // namespace
