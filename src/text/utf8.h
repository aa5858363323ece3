// Small UTF-8 helpers shared by the tokenizer, the stream decoder and the parser.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace dsv4::text {

// Decodes one code point at s[i] and advances i. Returns false (i unchanged) on malformed or truncated input.
inline bool utf8_next(std::string_view s, size_t& i, uint32_t& cp) {
  if (i >= s.size()) return false;
  unsigned char c = s[i];
  int n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
  if (n == 0 || i + n > s.size()) return false;
  cp = n == 1 ? c : n == 2 ? (c & 0x1F) : n == 3 ? (c & 0x0F) : (c & 0x07);
  for (int k = 1; k < n; ++k) {
    unsigned char cc = s[i + k];
    if ((cc >> 6) != 2) return false;
    cp = (cp << 6) | (cc & 0x3F);
  }
  i += n;
  return true;
}

inline void utf8_append(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out.push_back(char(cp));
  } else if (cp < 0x800) {
    out.push_back(char(0xC0 | (cp >> 6)));
    out.push_back(char(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(char(0xE0 | (cp >> 12)));
    out.push_back(char(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(char(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(char(0xF0 | (cp >> 18)));
    out.push_back(char(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(char(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(char(0x80 | (cp & 0x3F)));
  }
}

// Length of the longest prefix of s that does not end inside an incomplete (but so far valid) UTF-8
// sequence. Bytes that can never become valid are not held back: the stream decoder passes them on.
inline size_t utf8_complete_prefix(std::string_view s) {
  size_t n = s.size();
  // An incomplete sequence is at most 3 bytes: a lead byte followed by fewer continuation bytes than it
  // needs.
  for (size_t back = 1; back <= 3 && back <= n; ++back) {
    unsigned char c = s[n - back];
    if ((c >> 6) == 2) continue;  // continuation byte: keep looking for the lead
    int need = (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
    return need > int(back) ? n - back : n;
  }
  return n;
}

}  // namespace dsv4::text
