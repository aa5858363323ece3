// Vocabulary builders: the real DeepSeek V4 arrays from the tiktoken file, and synthetic byte-level ones.
#include "text/vocab.h"

#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <unordered_map>

#include "common/error.h"
#include "text/utf8.h"

namespace dsv4::text {

namespace {

// GPT-2 table (§1.3): printable bytes keep their code point, the other 68 get 256, 257, ... in byte order.
struct ByteTable {
  std::array<uint32_t, 256> to_cp{};
  std::unordered_map<uint32_t, uint8_t> from_cp;
  ByteTable() {
    uint32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      to_cp[b] = printable ? uint32_t(b) : next++;
      from_cp[to_cp[b]] = uint8_t(b);
    }
  }
};

const ByteTable& byte_table() {
  static const ByteTable t;
  return t;
}

int base64_value(char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+') return 62;
  if (c == '/') return 63;
  return -1;
}

bool base64_decode(std::string_view in, std::string& out) {
  out.clear();
  uint32_t acc = 0;
  int bits = 0;
  size_t i = 0;
  for (; i < in.size() && in[i] != '='; ++i) {
    int v = base64_value(in[i]);
    if (v < 0) return false;
    acc = (acc << 6) | uint32_t(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(char((acc >> bits) & 0xFF));
    }
  }
  for (; i < in.size(); ++i)
    if (in[i] != '=') return false;
  return true;
}

}  // namespace

uint32_t byte_to_unicode(uint8_t b) {
  return byte_table().to_cp[b];
}

bool unicode_to_bytes(std::string_view remapped, std::string& bytes) {
  bytes.clear();
  const auto& t = byte_table();
  size_t i = 0;
  while (i < remapped.size()) {
    uint32_t cp;
    if (!utf8_next(remapped, i, cp)) return false;
    auto it = t.from_cp.find(cp);
    if (it == t.from_cp.end()) return false;
    bytes.push_back(char(it->second));
  }
  return true;
}

std::string bytes_to_unicode(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size() * 2);
  for (unsigned char b : bytes) utf8_append(out, byte_table().to_cp[b]);
  return out;
}

std::vector<std::string> read_tiktoken(const std::string& path) {
  std::ifstream in(path);
  if (!in) fail("cannot open tiktoken vocabulary '%s'", path.c_str());
  std::vector<std::string> tokens;
  std::string line, bytes;
  size_t lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    if (line.empty()) continue;
    size_t sp = line.find(' ');
    if (sp == std::string::npos) fail("%s:%zu: expected 'base64 id'", path.c_str(), lineno);
    char* end = nullptr;
    long id = std::strtol(line.c_str() + sp + 1, &end, 10);
    if (end == line.c_str() + sp + 1 || id != long(tokens.size()))
      fail("%s:%zu: id must be %zu (ids are dense and ordered)", path.c_str(), lineno, tokens.size());
    if (!base64_decode(std::string_view(line).substr(0, sp), bytes))
      fail("%s:%zu: invalid base64", path.c_str(), lineno);
    tokens.push_back(bytes);
  }
  if (tokens.empty()) fail("tiktoken vocabulary '%s' is empty", path.c_str());
  return tokens;
}

// One merge per multi-byte token: BPE its own bytes with rank = id, allowing only ranks below the token's id
// (tiktoken semantics: repeatedly merge the adjacent pair whose concatenation has the lowest rank). The two
// parts left just before the token would form are its merge. With merges listed in id order, GGUF's
// rank-by-position BPE then reproduces rank-by-id BPE; the golden tests check that on real text.
std::vector<std::string> derive_merges(const std::vector<std::string>& tokens, int first_added_id) {
  std::unordered_map<std::string, int> rank;  // raw bytes -> id
  std::vector<std::string> raw(tokens.size());
  std::vector<bool> is_text(tokens.size(), false);
  for (int id = 0; id < first_added_id && id < int(tokens.size()); ++id) {
    if (!unicode_to_bytes(tokens[id], raw[id])) continue;  // specials (BOS/EOS/pad)
    is_text[id] = true;
    rank.emplace(raw[id], id);
  }
  std::vector<std::string> merges;
  std::vector<std::string> parts;
  for (int id = 0; id < first_added_id && id < int(tokens.size()); ++id) {
    if (!is_text[id] || raw[id].size() < 2) continue;
    const std::string& b = raw[id];
    parts.clear();
    for (char c : b) parts.emplace_back(1, c);
    while (parts.size() > 2) {
      int best = -1, best_rank = id;
      for (size_t i = 0; i + 1 < parts.size(); ++i) {
        auto it = rank.find(parts[i] + parts[i + 1]);
        if (it != rank.end() && it->second < best_rank) best_rank = it->second, best = int(i);
      }
      if (best < 0) break;
      parts[best] += parts[best + 1];
      parts.erase(parts.begin() + best + 1);
    }
    if (parts.size() != 2 || !rank.count(parts[0]) || !rank.count(parts[1]))
      fail("vocabulary: token %d is not reachable by BPE from lower-ranked tokens (no merge derivable)", id);
    merges.push_back(bytes_to_unicode(parts[0]) + " " + bytes_to_unicode(parts[1]));
  }
  return merges;
}

TokenizerData deepseek_v4_vocab(const std::string& tiktoken_path) {
  std::vector<std::string> raw = read_tiktoken(tiktoken_path);
  if (raw.size() != size_t(kDeepSeekBaseVocabSize))
    fail("tiktoken vocabulary '%s' has %zu tokens, expected %d (DeepSeek V3/V4 base)", tiktoken_path.c_str(),
         raw.size(), kDeepSeekBaseVocabSize);
  TokenizerData d;
  // The antirez V4 GGUFs name the pre-tokenizer "joyai-llm" (io-and-api §1.7); llama.cpp maps it to the
  // same regexes as "deepseek-v3". Using ds4's name keeps synth/convert metadata identical to those files.
  d.pre = "joyai-llm";
  // The file stores each token as UTF-8 of its remapped (byte-to-unicode) string, i.e. already GGUF form.
  d.tokens = std::move(raw);
  d.token_types.assign(d.tokens.size(), kTokenNormal);
  for (int i = 0; i < 3; ++i) d.token_types[i] = kTokenControl;
  // Byte tokens must sit at 3..258 in table order (§1.4): everything else (and ds4) relies on it.
  for (int b = 0; b < 256; ++b) {
    std::string bytes;
    int id = 3 + b;
    if (!unicode_to_bytes(d.tokens[id], bytes) || bytes.size() != 1)
      fail("tiktoken vocabulary '%s': token %d should be a single byte", tiktoken_path.c_str(), id);
  }
  d.merges = derive_merges(d.tokens, kDeepSeekBaseVocabSize);
  // Which added tokens V4 GGUFs type as control vs user-defined was not observed (§1.5); control is the safe
  // choice: no tokenizer here matches added tokens inside text anyway.
  for (const auto& s : v4_added_tokens()) {
    d.tokens.push_back(s);
    d.token_types.push_back(kTokenControl);
  }
  d.bos_id = 0, d.eos_id = 1, d.pad_id = 2;
  d.add_bos = false;
  return d;
}

std::string default_tiktoken_path() {
  const char* rel = "deepseek_v3_base_vocab.tiktoken";
  std::vector<std::filesystem::path> candidates;
  if (const char* env = std::getenv("DSV4_DATA_DIR"))
    candidates.emplace_back(std::filesystem::path(env) / rel);
  std::error_code ec;
  auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    candidates.push_back(exe.parent_path() / "data" / rel);
    candidates.push_back(exe.parent_path().parent_path().parent_path() / "data" / rel);  // build/<name>/dsv4
  }
#ifdef DSV4_SOURCE_DIR
  candidates.emplace_back(std::filesystem::path(DSV4_SOURCE_DIR) / "data" / rel);
#endif
  candidates.emplace_back(std::filesystem::path("data") / rel);
  for (const auto& p : candidates)
    if (std::filesystem::exists(p, ec)) return p.string();
  fail(
      "built-in vocabulary not found: looked for %s in $DSV4_DATA_DIR, next to the executable and in the "
      "source tree's data/ directory",
      rel);
}

namespace {

// Specials the renderer and the parser look up by string; a synthetic vocabulary must hold all of them.
const char* const kSyntheticSpecials[] = {
    "<｜User｜>",      "<｜Assistant｜>",       "<think>",      "</think>",
    "｜DSML｜",        "<｜latest_reminder｜>", "<｜action｜>", "<｜query｜>",
    "<｜authority｜>", "<｜domain｜>",          "<｜title｜>",  "<｜read_url｜>",
};

}  // namespace

int synthetic_vocab_min_size() {
  return 3 + 256 + int(std::size(kSyntheticSpecials));
}

TokenizerData synthetic_vocab(int n_vocab) {
  if (n_vocab < synthetic_vocab_min_size())
    fail(
        "synthetic vocabulary: n_vocab %d is too small (need >= %d: BOS/EOS/pad, 256 bytes, %zu chat "
        "specials)",
        n_vocab, synthetic_vocab_min_size(), std::size(kSyntheticSpecials));
  TokenizerData d;
  d.tokens = {"<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"};
  d.token_types = {kTokenControl, kTokenControl, kTokenControl};
  // Same byte order as the real vocabulary: printable bytes first (by value), then the remapped ones.
  std::vector<std::pair<uint32_t, int>> by_cp;
  for (int b = 0; b < 256; ++b) by_cp.emplace_back(byte_to_unicode(uint8_t(b)), b);
  std::sort(by_cp.begin(), by_cp.end());
  for (auto& [cp, b] : by_cp) {
    std::string s;
    utf8_append(s, cp);
    d.tokens.push_back(s);
    d.token_types.push_back(kTokenNormal);
  }
  for (const char* s : kSyntheticSpecials) {
    d.tokens.push_back(s);
    d.token_types.push_back(kTokenControl);
  }
  for (int i = 0; int(d.tokens.size()) < n_vocab; ++i) {
    d.tokens.push_back("<｜place▁holder▁no▁" + std::to_string(i) + "｜>");
    d.token_types.push_back(kTokenUnused);
  }
  d.pre = "deepseek-v3";
  return d;
}

}  // namespace dsv4::text
