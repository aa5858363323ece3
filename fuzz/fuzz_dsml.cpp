// libFuzzer target for the text output side: the DSML tool-call block parser (parse_tool_calls_block) on the
// raw input, then the streaming OutputParser on the input's tokens (built-in DeepSeek V4 vocabulary, so the
// BPE encoder and the PCRE2 pre-tokenizer see the same hostile bytes). Both may only return or throw
// dsv4::Error; anything else (another exception type, a crash, a sanitizer report) is a finding. The first
// byte picks whether the stream starts in reasoning.
//
// Build and run: scripts/fuzz-smoke.sh. Seeds: fuzz/corpus/fuzz_dsml/.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include "common/error.h"
#include "dsv4/text.h"

uint64_t fuzz_dsml_sink = 0;

namespace {

void check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "fuzz_dsml: invariant violated: %s\n", what);
    std::abort();
  }
}

const dsv4::Tokenizer& tokenizer() {
  static const dsv4::Tokenizer tok = dsv4::Tokenizer::builtin();  // loading the vocab takes ~1 s: once
  return tok;
}

void sink(const dsv4::OutputDelta& d) {
  fuzz_dsml_sink += d.reasoning.size() + d.content.size() + d.tool_calls.size();
  for (const auto& c : d.tool_calls) fuzz_dsml_sink += c.name.size() + c.arguments.size();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  // Bound the work per input: the parsers are linear, and long inputs only slow the search down.
  if (size > 8192) size = 8192;
  const bool reasoning = data[0] & 1;
  std::string_view text(reinterpret_cast<const char*>(data + 1), size - 1);
  try {
    auto calls = dsv4::parse_tool_calls_block(text);
    check(!calls.empty(), "parse_tool_calls_block returns at least one call or throws");
    for (const auto& c : calls) fuzz_dsml_sink += c.name.size() + c.arguments.size();
  } catch (const dsv4::Error&) {
  }
  const dsv4::Tokenizer& tok = tokenizer();
  std::vector<dsv4::Token> ids = tok.encode(text);
  dsv4::OutputParser parser(tok, reasoning);
  for (dsv4::Token t : ids) {
    try {
      sink(parser.push(t));
    } catch (const dsv4::Error&) {
    }
    if (parser.done()) break;
  }
  try {
    sink(parser.finish());
  } catch (const dsv4::Error&) {
  }
  return 0;
}
