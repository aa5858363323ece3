// Output parser: state switching on </think> / EOS / tool-call blocks, token-by-token streaming with
// hold-back, the §2.9 tolerated variants, and the never-lose-text rule. Exact string comparisons throughout.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <random>

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
  auto c = run(gen({{false, "Let me think."},
                    {true, "</think>"},
                    {false, "The answer is 4."},
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
      "<DSML｜invoke name=\"f\">\n<DSML｜parameter name=\"a\" "
      "string=\"true\">x</DSML｜parameter>\n</DSML｜invoke>\n",
      "<｜｜DSML｜｜invoke name=\"f\">\n<｜｜DSML｜｜parameter name=\"a\" "
      "string=\"true\">x</｜｜DSML｜｜parameter>"
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

namespace dsv4::test {
namespace {

// Property: whatever the model emits, the parser loses nothing. Random sequences over an alphabet of markers,
// marker prefixes, whitespace, text and split UTF-8; when no tool call was parsed, reasoning + "</think>" (if
// the state switched) + content must equal the decoded tokens exactly. 2,000 sequences, fixed seed.
TEST(Dsml, NeverLosesTextProperty) {
  const char* pieces[] = {
      "a",   " b",       "\n",      "\n\n",       "  ", "<",      "</",          "</thi",
      "nk>", "｜DSML｜", "<｜",     "tool_calls", ">",  "invoke", " name=\"f\"", "</｜DSML｜tool_calls>",
      "🌍",   "é",        "<think>", "x"};
  std::vector<std::vector<Token>> alphabet;
  for (const char* p : pieces) alphabet.push_back(v4().encode(p));
  alphabet.push_back({v4().special("｜DSML｜")});
  // Whole openers (as the model writes them, with the DSML token) so blocks open often.
  for (int k = 0; k < 3; ++k) {
    std::vector<Token> open = v4().encode("\n\n<");
    open.push_back(v4().special("｜DSML｜"));
    auto rest = v4().encode("tool_calls>\n");
    open.insert(open.end(), rest.begin(), rest.end());
    alphabet.push_back(open);
  }
  alphabet.push_back(v4().encode("<DSML｜tool_calls>"));
  const Token end_think = v4().special("</think>");
  alphabet.push_back({end_think});
  alphabet.push_back({19923, 73369});  // "Hello" + first half of 🌍 (left incomplete if nothing follows)
  std::mt19937 rng(99);
  for (int n = 0; n < 2000; ++n) {
    bool thinking = n % 2;
    std::vector<Token> toks;
    int len = 1 + int(rng() % 12);
    for (int k = 0; k < len; ++k) {
      auto& a = alphabet[rng() % alphabet.size()];
      toks.insert(toks.end(), a.begin(), a.end());
    }
    OutputParser p(v4(), thinking);
    Collected c;
    bool switched = false;
    std::vector<Token> fed;
    for (Token t : toks) {
      if (thinking && t == end_think && p.state() == OutputParser::State::Reasoning) switched = true;
      fed.push_back(t);
      c.add(p.push(t));
      if (p.done()) break;  // a closed tool block ends generation
    }
    c.add(p.finish());
    if (!c.calls.empty()) continue;  // a parsed block is consumed by design
    std::string expect = v4().decode(fed);
    std::string got = c.reasoning + (switched ? "</think>" : "") + c.content;
    if (!switched && thinking && got != expect) {
      // </think> typed as text also switches; it is consumed between reasoning and content.
      got = c.reasoning + "</think>" + c.content;
    }
    ASSERT_EQ(got, expect) << "sequence " << n << (thinking ? " (thinking)" : "");
  }
}

}  // namespace
}  // namespace dsv4::test

namespace dsv4::test {
namespace {

// Robustness: random DSML-ish fragments either parse into calls whose arguments are valid JSON objects or
// throw dsv4::Error; nothing else (no crash, no other exception). 5,000 cases, fixed seed.
TEST(Dsml, BlockParserRobustness) {
  const char* frags[] = {"<｜DSML｜invoke",
                         " name=\"",
                         "f",
                         "\"",
                         ">",
                         "\n",
                         "<｜DSML｜parameter",
                         " string=\"",
                         "true",
                         "false",
                         "</｜DSML｜parameter>",
                         "</｜DSML｜invoke>",
                         "{\"a\": [1",
                         "]}",
                         "<",
                         "/",
                         "｜",
                         "DSML",
                         "“",
                         "<invoke ",
                         "<parameter ",
                         "</parameter>",
                         "x\\\"y",
                         "\xff",
                         "12"};
  std::mt19937 rng(5);
  int parsed = 0;
  for (int n = 0; n < 5000; ++n) {
    std::string s;
    int len = 1 + int(rng() % 20);
    for (int k = 0; k < len; ++k) s += frags[rng() % std::size(frags)];
    try {
      for (const auto& c : parse_tool_calls_block(s)) {
        ASSERT_FALSE(c.name.empty()) << s;
        auto j = nlohmann::json::parse(c.arguments, nullptr, false);
        ASSERT_TRUE(!j.is_discarded() && j.is_object()) << s << " -> " << c.arguments;
      }
      ++parsed;
    } catch (const dsv4::Error&) {
    }
  }
  EXPECT_GT(parsed, 100);  // the generator does produce parseable blocks, so the JSON check is exercised
}

}  // namespace
}  // namespace dsv4::test

namespace dsv4::test {
namespace {

TEST(Dsml, MarkupVersusPayload) {
  OutputParser p(v4(), false);
  auto feed = [&](const std::string& s) {
    for (Token t : v4().encode(s)) p.push(t);
  };
  EXPECT_FALSE(p.in_markup());  // content
  feed("ok\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f");
  EXPECT_TRUE(p.in_markup());  // inside an attribute of a tag
  feed("\">\n<｜DSML｜parameter name=\"a\" string=\"true\">");
  EXPECT_FALSE(p.in_markup());  // payload starts
  feed("x < y and <b>");
  EXPECT_FALSE(p.in_markup());  // '<' inside a value is payload
  feed("</｜DSML｜param");
  EXPECT_TRUE(p.in_markup());  // the closing tag
  feed("eter>\n");
  EXPECT_TRUE(p.in_markup());  // between tags
}

}  // namespace
}  // namespace dsv4::test

namespace dsv4::test {
namespace {

TEST(Dsml, CallNamesAnnouncedBeforeArguments) {
  OutputParser p(v4(), false);
  std::vector<std::string> started;
  std::vector<ParsedToolCall> done;
  auto feed = [&](const std::string& s) {
    for (Token t : v4().encode(s)) {
      OutputDelta d = p.push(t);
      started.insert(started.end(), d.tool_calls_started.begin(), d.tool_calls_started.end());
      done.insert(done.end(), d.tool_calls.begin(), d.tool_calls.end());
    }
  };
  feed("\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_");
  EXPECT_TRUE(started.empty());  // the name is not complete yet
  feed("weather\">\n<｜DSML｜parameter name=\"city\" string=\"true\">Ro");
  EXPECT_EQ(started, std::vector<std::string>{"get_weather"});
  EXPECT_TRUE(done.empty());
  feed("me</｜DSML｜parameter>\n</｜DSML｜invoke>\n<｜DSML｜invoke name=\"g\">\n</｜DSML｜invoke>\n");
  EXPECT_EQ(started, (std::vector<std::string>{"get_weather", "g"}));
  feed("</｜DSML｜tool_calls>");
  ASSERT_EQ(done.size(), 2u);
  EXPECT_EQ(done[0].arguments, R"({"city": "Rome"})");
}

}  // namespace
}  // namespace dsv4::test
