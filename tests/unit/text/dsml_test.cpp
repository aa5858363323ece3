// Output parser: state switching on </think> / EOS / tool-call blocks, token-by-token streaming with hold-back,
// the §2.9 tolerated variants, and the never-lose-text rule. Exact string comparisons throughout.
#include <gtest/gtest.h>

#include "dsv4/text.h"
#include "test_util.h"
#include "text/vocab.h"

namespace dsv4::test {
namespace {

const Tokenizer& v4() {
  static const Tokenizer tok(v4_data());
  return tok;
}

struct Collected {
  std::string reasoning, content;
  std::vector<ParsedToolCall> calls;
  void add(const OutputDelta& d) {
    reasoning += d.reasoning;
    content += d.content;
    calls.insert(calls.end(), d.tool_calls.begin(), d.tool_calls.end());
  }
};

// Generated text as the model would emit it: the specials as single tokens, the rest BPE.
std::vector<Token> gen(std::initializer_list<std::pair<bool, std::string>> parts) {
  std::vector<Token> out;
  for (auto& [special, s] : parts) {
    if (special) {
      out.push_back(v4().special(s));
    } else {
      auto t = v4().encode(s);
      out.insert(out.end(), t.begin(), t.end());
    }
  }
  return out;
}

Collected run(const std::vector<Token>& toks, bool thinking, OutputParser** keep = nullptr) {
  static std::unique_ptr<OutputParser> p;
  p = std::make_unique<OutputParser>(v4(), thinking);
  Collected c;
  for (Token t : toks) c.add(p->push(t));
  c.add(p->finish());
  if (keep) *keep = p.get();
  return c;
}

TEST(Dsml, ReasoningThenContent) {
  OutputParser* p;
  auto c = run(gen({{false, "Let me think."}, {true, "</think>"}, {false, "The answer is 4."},
                    {true, "<｜end▁of▁sentence｜>"}}),
               true, &p);
  EXPECT_EQ(c.reasoning, "Let me think.");
  EXPECT_EQ(c.content, "The answer is 4.");
  EXPECT_TRUE(c.calls.empty());
  EXPECT_TRUE(p->done());
  EXPECT_EQ(p->error(), "");
}

TEST(Dsml, EndThinkWrittenAsText) {
  auto c = run(gen({{false, "hmm</think>ok"}}), true);
  EXPECT_EQ(c.reasoning, "hmm");
  EXPECT_EQ(c.content, "ok");
}

TEST(Dsml, NonThinkingIsAllContent) {
  auto c = run(gen({{false, "Hello </thin"}, {false, "k> a <tool"}}), false);
  EXPECT_EQ(c.reasoning, "");
  EXPECT_EQ(c.content, "Hello </think> a <tool");  // markers of other states are just text here
}

const char* kCanonical =
    "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n"
    "<｜DSML｜parameter name=\"city\" string=\"true\">Rome</｜DSML｜parameter>\n"
    "<｜DSML｜parameter name=\"days\" string=\"false\">2</｜DSML｜parameter>\n"
    "</｜DSML｜invoke>\n</｜DSML｜tool_calls>";

TEST(Dsml, ToolCallStreamedTokenByToken) {
  // The renderer writes ｜DSML｜ as the special token; the model does the same. Build the text like §2.7.
  std::string s = kCanonical;
  std::vector<Token> toks = gen({{false, "R"}, {true, "</think>"}, {false, "Checking."}});
  size_t i = 0;
  const std::string dsml = "｜DSML｜";
  while (i < s.size()) {
    size_t k = s.find(dsml, i);
    auto t = v4().encode(s.substr(i, k == std::string::npos ? std::string::npos : k - i));
    toks.insert(toks.end(), t.begin(), t.end());
    if (k == std::string::npos) break;
    toks.push_back(v4().special(dsml));
    i = k + dsml.size();
  }
  OutputParser* p;
  // No EOS: the parser stops at the closer by itself.
  auto c = run(toks, true, &p);
  EXPECT_EQ(c.reasoning, "R");
  EXPECT_EQ(c.content, "Checking.");
  ASSERT_EQ(c.calls.size(), 1u);
  EXPECT_EQ(c.calls[0].name, "get_weather");
  EXPECT_EQ(c.calls[0].arguments, R"({"city": "Rome", "days": 2})");
  EXPECT_EQ(p->error(), "");
}

TEST(Dsml, DoneAtCloserBeforeEos) {
  OutputParser p(v4(), false);
  std::vector<Token> toks = v4().encode(std::string("x") + kCanonical);
  for (Token t : toks) p.push(t);
  EXPECT_TRUE(p.done());
  EXPECT_EQ(p.state(), OutputParser::State::Done);
}

TEST(Dsml, ContentHoldsBackOnlyPossibleMarkers) {
  OutputParser p(v4(), false);
  std::string shown;
  for (Token t : v4().encode("a <b> c\n\n<｜DS")) shown += p.push(t).content;
  EXPECT_EQ(shown, "a <b> c");  // "\n\n<｜DS" could still open a tool block
  for (Token t : v4().encode("MARK")) shown += p.push(t).content;
  EXPECT_EQ(shown, "a <b> c\n\n<｜DSMARK");  // disambiguated: released
}

TEST(Dsml, TolerantVariants) {
  const char* variants[] = {
      "<DSML｜invoke name=\"f\">\n<DSML｜parameter name=\"a\" string=\"true\">x</DSML｜parameter>\n</DSML｜invoke>\n",
      "<｜｜DSML｜｜invoke name=\"f\">\n<｜｜DSML｜｜parameter name=\"a\" string=\"true\">x</｜｜DSML｜｜parameter>"
      "\n</｜｜DSML｜｜invoke>",
      "<invoke name=\"f\">\n<parameter name=\"a\">x</parameter>\n</invoke>",
      "<｜DSML｜invoke name=“f”>\n<｜DSML｜parameter name=“a” string=“true”>x</｜DSML｜parameter>\n",
      "<｜DSML｜ invoke name=\"f\">\n<｜DSML｜ parameter name=\"a\" string=\"true\">x</｜DSML｜ parameter>\n",
  };
  for (const char* v : variants) {
    auto calls = parse_tool_calls_block(v);
    ASSERT_EQ(calls.size(), 1u) << v;
    EXPECT_EQ(calls[0].name, "f") << v;
    EXPECT_EQ(calls[0].arguments, R"({"a": "x"})") << v;
  }
}

TEST(Dsml, ParameterTypes) {
  auto calls = parse_tool_calls_block(
      ">\n<｜DSML｜invoke name=\"g\">\n"
      "<｜DSML｜parameter name=\"n\" string=\"false\">[1, {\"k\": true}]</｜DSML｜parameter>\n"
      "<｜DSML｜parameter name=\"s\" string=\"true\">line1\n\"q\"</｜DSML｜parameter>\n"
      "<｜DSML｜parameter name=\"bad\" string=\"false\">not json</｜DSML｜parameter>\n"
      "<｜DSML｜parameter name=\"s\" string=\"true\">dup</｜DSML｜parameter>\n"
      "<｜DSML｜parameter name=\"obj\"><｜DSML｜parameter name=\"in\" string=\"false\">3</｜DSML｜parameter>"
      "</｜DSML｜parameter>\n</｜DSML｜invoke>\n"
      "<｜DSML｜invoke name=\"h\">\n</｜DSML｜invoke>\n");
  ASSERT_EQ(calls.size(), 2u);
  EXPECT_EQ(calls[0].arguments,
            R"({"n": [1, {"k": true}], "s": "line1\n\"q\"", "bad": "not json", "obj": {"in": 3}})");
  EXPECT_EQ(calls[1].name, "h");
  EXPECT_EQ(calls[1].arguments, "{}");
  EXPECT_THROW(parse_tool_calls_block("nothing here"), dsv4::Error);
  EXPECT_THROW(parse_tool_calls_block("<｜DSML｜invoke>"), dsv4::Error);
}

TEST(Dsml, UnparseableBlockIsReturnedAsContent) {
  OutputParser* p;
  auto c = run(gen({{false, "hi\n\n<｜DSML｜tool_calls>garbage</｜DSML｜tool_calls>"}}), false, &p);
  EXPECT_TRUE(c.calls.empty());
  EXPECT_EQ(c.content, "hi\n\n<｜DSML｜tool_calls>garbage</｜DSML｜tool_calls>");  // verbatim
  EXPECT_NE(p->error(), "");
  // Opened and never closed: error, text kept.
  c = run(gen({{false, "<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">"}}), false, &p);
  EXPECT_TRUE(c.calls.empty());
  EXPECT_EQ(c.content, "<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">");
  EXPECT_NE(p->error().find("never closed"), std::string::npos);
}

TEST(Dsml, DsmlInsideUnclosedReasoningIsNotACall) {
  auto c = run(gen({{false, std::string("plan") + kCanonical}}), true);
  EXPECT_TRUE(c.calls.empty());
  EXPECT_EQ(c.reasoning, std::string("plan") + kCanonical);
}

TEST(Dsml, SplitUtf8AcrossTokens) {
  auto c = run({19923, 73369, 238}, false);  // "Hello 🌍" with the emoji over two tokens
  EXPECT_EQ(c.content, "Hello 🌍");
}

}  // namespace
}  // namespace dsv4::test
