// Byte-level BPE tokenizer: PCRE2 pre-tokenizer with the exact DeepSeek regexes (io-and-api.md §1.2), GPT-2
// byte remapping (§1.3) and merges by rank (§1.4).
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <mutex>
#include <queue>
#include <unordered_map>

#include "common/error.h"
#include "dsv4/text.h"
#include "text/utf8.h"
#include "text/vocab.h"

namespace dsv4 {

namespace {

// The three Split steps of tokenizer.json, in order. Each re-splits every piece of the previous step;
// matches and the gaps between them both become pieces ("Isolated").
const char* const kPreTokenizerRegexes[] = {
    R"re(\p{N}{1,3})re",
    R"re([一-龥぀-ゟ゠-ヿ]+)re",
    R"re([!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)re",
};

struct Regex {
  pcre2_code* code = nullptr;
  explicit Regex(const char* pattern) {
    int err = 0;
    PCRE2_SIZE off = 0;
    // UCP: \s, \p{..} use Unicode properties as the reference (Oniguruma) does. MATCH_INVALID_UTF: client
    // text may be invalid UTF-8; such bytes never match and fall into gaps, where byte-level BPE handles
    // them.
    code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern), PCRE2_ZERO_TERMINATED,
                         PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &err, &off, nullptr);
    if (!code) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof msg);
      fail("pre-tokenizer regex failed to compile at offset %zu: %s", size_t(off),
           reinterpret_cast<char*>(msg));
    }
    pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // optional speed-up; the interpreter is the fallback
  }
  ~Regex() { pcre2_code_free(code); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;
};

struct Span {
  size_t off, len;
};

uint64_t pair_key(Token a, Token b) {
  return (uint64_t(uint32_t(a)) << 32) | uint32_t(b);
}

}  // namespace

struct Tokenizer::Impl {
  std::vector<std::string> strings;  // GGUF token strings
  std::vector<std::string> bytes;    // decoded bytes (specials: their string)
  std::vector<bool> special;
  std::unordered_map<std::string_view, Token> by_string;  // views into `strings`
  std::array<Token, 256> byte_token{};
  struct Merge {
    int rank;
    Token result;
  };
  std::unordered_map<uint64_t, Merge> merges;
  Token bos = 0, eos = 1;
  Regex re[3] = {Regex(kPreTokenizerRegexes[0]), Regex(kPreTokenizerRegexes[1]),
                 Regex(kPreTokenizerRegexes[2])};

  // Results per pre-token: prompts are mostly repeated agent context (§1.11). Bounded by clearing.
  mutable std::mutex cache_mu;
  mutable std::unordered_map<std::string, std::vector<Token>> cache;

  void split(std::string_view text, std::vector<Span>& pieces) const;
  void bpe(std::string_view piece, std::vector<Token>& out) const;
};

void Tokenizer::Impl::split(std::string_view text, std::vector<Span>& pieces) const {
  pieces.assign(1, Span{0, text.size()});
  if (text.empty()) {
    pieces.clear();
    return;
  }
  std::vector<Span> next;
  for (const Regex& r : re) {
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(r.code, nullptr);
    next.clear();
    for (const Span& p : pieces) {
      auto subject = reinterpret_cast<PCRE2_SPTR>(text.data() + p.off);
      size_t last = 0, start = 0;
      while (start < p.len) {
        int rc = pcre2_match(r.code, subject, p.len, start, 0, md, nullptr);
        if (rc == PCRE2_ERROR_NOMATCH) break;
        if (rc < 0) {
          pcre2_match_data_free(md);
          fail("pre-tokenizer: regex match failed (PCRE2 error %d) at byte %zu", rc, p.off + start);
        }
        const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
        size_t ms = ov[0], me = ov[1];
        if (me == ms) {  // none of the patterns can match empty; guard against looping anyway
          start = ms + 1;
          continue;
        }
        if (ms > last) next.push_back({p.off + last, ms - last});
        next.push_back({p.off + ms, me - ms});
        last = start = me;
      }
      if (last < p.len) next.push_back({p.off + last, p.len - last});
    }
    pcre2_match_data_free(md);
    pieces.swap(next);
  }
}

void Tokenizer::Impl::bpe(std::string_view piece, std::vector<Token>& out) const {
  // Symbols in a linked list and candidate merges in a min-heap ordered by (rank, position), as the reference
  // (Hugging Face tokenizers' BPE word merge) does: O(n log n) per piece, so a 200 KB run of letters with no
  // pre-tokenizer split costs milliseconds, not a pass over the piece per merge rank.
  const int n = int(piece.size());
  std::vector<Token> sym(n);
  std::vector<int> prev(n), next(n);
  for (int i = 0; i < n; ++i) {
    sym[i] = byte_token[uint8_t(piece[i])];
    prev[i] = i - 1;
    next[i] = i + 1 < n ? i + 1 : -1;
  }
  struct Cand {
    int rank, pos;
    Token left, right, result;
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  auto push = [&](int pos) {
    if (pos < 0 || next[pos] < 0) return;
    auto it = merges.find(pair_key(sym[pos], sym[next[pos]]));
    if (it != merges.end()) heap.push({it->second.rank, pos, sym[pos], sym[next[pos]], it->second.result});
  };
  for (int i = 0; i + 1 < n; ++i) push(i);
  while (!heap.empty()) {
    Cand c = heap.top();
    heap.pop();
    int r = next[c.pos];
    if (sym[c.pos] < 0 || r < 0 || sym[c.pos] != c.left || sym[r] != c.right) continue;  // stale entry
    sym[c.pos] = c.result;
    sym[r] = -1;  // removed
    next[c.pos] = next[r];
    if (next[r] >= 0) prev[next[r]] = c.pos;
    push(prev[c.pos]);
    push(c.pos);
  }
  for (int i = 0; i >= 0 && i < n; i = next[i]) out.push_back(sym[i]);
}

Tokenizer::Tokenizer(const TokenizerData& d) {
  auto impl = std::make_shared<Impl>();
  Impl& m = *impl;
  size_t n = d.tokens.size();
  if (n == 0) fail("tokenizer: empty vocabulary (%s)", text::kGgufKeyTokens);
  if (n > size_t(INT32_MAX)) fail("tokenizer: vocabulary too large (%zu)", n);
  if (!d.token_types.empty() && d.token_types.size() != n)
    fail("tokenizer: %s has %zu entries but %s has %zu", text::kGgufKeyTokenType, d.token_types.size(),
         text::kGgufKeyTokens, n);
  m.strings = d.tokens;
  m.bytes.resize(n);
  m.special.assign(n, false);
  m.byte_token.fill(-1);
  for (size_t i = 0; i < n; ++i) {
    int32_t type = d.token_types.empty() ? text::kTokenNormal : d.token_types[i];
    bool text_token = text::unicode_to_bytes(m.strings[i], m.bytes[i]) && !m.bytes[i].empty();
    bool control =
        type == text::kTokenControl || type == text::kTokenUnused || type == text::kTokenUserDefined;
    if (!text_token || control) {
      m.special[i] = true;
      m.bytes[i] = m.strings[i];
    } else if (m.bytes[i].size() == 1 && m.byte_token[uint8_t(m.bytes[i][0])] < 0) {
      m.byte_token[uint8_t(m.bytes[i][0])] = Token(i);
    }
    m.by_string.emplace(m.strings[i], Token(i));  // first wins on duplicates
  }
  for (int b = 0; b < 256; ++b)
    if (m.byte_token[b] < 0)
      fail("tokenizer: %s has no token for byte 0x%02X (a byte-level vocabulary needs all 256)",
           text::kGgufKeyTokens, b);
  m.merges.reserve(d.merges.size() * 2);
  for (size_t k = 0; k < d.merges.size(); ++k) {
    const std::string& mg = d.merges[k];
    size_t sp = mg.find(' ');
    if (sp == std::string::npos || sp == 0 || sp + 1 == mg.size())
      fail("tokenizer: %s[%zu] = '%s' is not 'left right'", text::kGgufKeyMerges, k, mg.c_str());
    std::string_view l(mg.data(), sp), r(mg.data() + sp + 1, mg.size() - sp - 1);
    auto li = m.by_string.find(l), ri = m.by_string.find(r);
    if (li == m.by_string.end() || ri == m.by_string.end())
      fail("tokenizer: %s[%zu] = '%s' names a token that is not in %s", text::kGgufKeyMerges, k, mg.c_str(),
           text::kGgufKeyTokens);
    auto res = m.by_string.find(std::string(l) + std::string(r));
    if (res == m.by_string.end()) continue;  // inconsistent file: the pieces stay split (ds4 does the same)
    m.merges.emplace(pair_key(li->second, ri->second), Impl::Merge{int(k), res->second});
  }
  // A token that neither is a byte nor results from a merge can only come from the template: treat it as a
  // control token even when the file types it "normal" (ds4 ignores token_type; files differ in how they
  // type added tokens such as <think>), so special("<think>") finds it and plain text never produces it.
  std::vector<bool> reachable(n, false);
  for (Token t : m.byte_token) reachable[t] = true;
  for (const auto& [key, mg] : m.merges) reachable[mg.result] = true;
  for (size_t i = 0; i < n; ++i)
    if (!reachable[i]) m.special[i] = true;
  auto check_id = [&](int32_t id, const char* key) {
    if (id < 0 || size_t(id) >= n) fail("tokenizer: %s = %d is outside the vocabulary (%zu)", key, id, n);
  };
  check_id(d.bos_id, text::kGgufKeyBos);
  check_id(d.eos_id, text::kGgufKeyEos);
  m.bos = d.bos_id;
  m.eos = d.eos_id;
  impl_ = std::move(impl);
}

Tokenizer Tokenizer::from_tiktoken(const std::string& path) {
  return Tokenizer(text::deepseek_v4_vocab(path));
}

Tokenizer Tokenizer::builtin() {
  // Building the merges takes ~0.3 s; the built-in vocabulary is immutable, so share one instance.
  static const Tokenizer tok = from_tiktoken(text::default_tiktoken_path());
  return tok;
}

int Tokenizer::n_vocab() const {
  return int(impl_->strings.size());
}
Token Tokenizer::bos() const {
  return impl_->bos;
}
Token Tokenizer::eos() const {
  return impl_->eos;
}

std::vector<std::string> Tokenizer::pre_tokenize(std::string_view text) const {
  std::vector<Span> spans;
  impl_->split(text, spans);
  std::vector<std::string> out;
  for (const Span& s : spans) out.emplace_back(text.substr(s.off, s.len));
  return out;
}

std::vector<Token> Tokenizer::encode(std::string_view text) const {
  std::vector<Span> spans;
  impl_->split(text, spans);
  std::vector<Token> out;
  out.reserve(text.size() / 3 + 1);
  for (const Span& s : spans) {
    std::string_view piece = text.substr(s.off, s.len);
    {
      std::lock_guard<std::mutex> lock(impl_->cache_mu);
      auto it = impl_->cache.find(std::string(piece));
      if (it != impl_->cache.end()) {
        out.insert(out.end(), it->second.begin(), it->second.end());
        continue;
      }
    }
    size_t before = out.size();
    impl_->bpe(piece, out);
    if (piece.size() <= 64) {  // long pieces rarely repeat; don't let them fill the cache
      std::lock_guard<std::mutex> lock(impl_->cache_mu);
      if (impl_->cache.size() > 200000) impl_->cache.clear();
      impl_->cache.emplace(std::string(piece), std::vector<Token>(out.begin() + before, out.end()));
    }
  }
  return out;
}

std::vector<Token> Tokenizer::encode(const Prompt& prompt) const {
  std::vector<Token> out;
  for (const PromptSegment& seg : prompt.segments) {
    if (seg.special) {
      out.push_back(special(seg.text));
    } else {
      auto t = encode(seg.text);
      out.insert(out.end(), t.begin(), t.end());
    }
  }
  return out;
}

std::optional<Token> Tokenizer::find(std::string_view s) const {
  auto it = impl_->by_string.find(s);
  if (it == impl_->by_string.end()) return std::nullopt;
  return it->second;
}

Token Tokenizer::special(std::string_view s) const {
  auto id = find(s);
  if (!id || !impl_->special[*id])
    fail("tokenizer: the vocabulary has no control token '%.*s' (needed by the chat format)", int(s.size()),
         s.data());
  return *id;
}

bool Tokenizer::is_special(Token t) const {
  return t >= 0 && size_t(t) < impl_->special.size() && impl_->special[t];
}

std::string Tokenizer::token_bytes(Token t) const {
  if (t < 0 || size_t(t) >= impl_->bytes.size())
    fail("token id %d is outside the vocabulary (0..%zu)", t, impl_->bytes.size() - 1);
  return impl_->bytes[t];
}

std::string Tokenizer::decode(std::span<const Token> tokens) const {
  std::string out;
  for (Token t : tokens) out += token_bytes(t);
  return out;
}

std::string TokenStream::push(Token t) {
  pending_ += tok_->token_bytes(t);
  size_t n = text::utf8_complete_prefix(pending_);
  std::string out = pending_.substr(0, n);
  pending_.erase(0, n);
  return out;
}

std::string TokenStream::flush() {
  std::string out;
  out.swap(pending_);
  return out;
}

void Prompt::add_text(std::string_view s) {
  if (s.empty()) return;
  if (!segments.empty() && !segments.back().special)
    segments.back().text += s;
  else
    segments.push_back({false, std::string(s)});
}

void Prompt::add_special(std::string_view s) {
  segments.push_back({true, std::string(s)});
}

void Prompt::append(const Prompt& other) {
  for (const auto& seg : other.segments) {
    if (seg.special)
      add_special(seg.text);
    else
      add_text(seg.text);
  }
}

std::string Prompt::str() const {
  std::string s;
  for (const auto& seg : segments) s += seg.text;
  return s;
}

}  // namespace dsv4
