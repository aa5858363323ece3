// Prompt rendering against the worked examples of io-and-api.md §2.7 (the official encoder's exact output),
// plus the rules of §2.2–2.6 written out by hand. Comparisons are exact string / token equality.
#include <gtest/gtest.h>

#include "dsv4/text.h"
#include "test_util.h"

namespace dsv4::test {
namespace {

ChatMessage msg(std::string role, std::string content) {
  ChatMessage m;
  m.role = std::move(role);
  m.content = std::move(content);
  return m;
}

std::string render(const std::vector<ChatMessage>& ms, ThinkingMode mode,
                   ReasoningEffort effort = ReasoningEffort::None) {
  ChatOptions o;
  o.mode = mode;
  o.effort = effort;
  return render_chat(ms, o).str();
}

TEST(Chat, ExampleA_NonThinking) {
  EXPECT_EQ(render({msg("system", "You are terse."), msg("user", "Hi")}, ThinkingMode::Chat),
            "<｜begin▁of▁sentence｜>You are terse.<｜User｜>Hi<｜Assistant｜></think>");
}

TEST(Chat, ExampleB_Thinking) {
  EXPECT_EQ(render({msg("system", "You are terse."), msg("user", "Hi")}, ThinkingMode::Thinking),
            "<｜begin▁of▁sentence｜>You are terse.<｜User｜>Hi<｜Assistant｜><think>");
}

TEST(Chat, ExampleC_EarlierReasoningDropped) {
  ChatMessage a = msg("assistant", "A1");
  a.reasoning = "R1";
  EXPECT_EQ(render({msg("system", "S"), msg("user", "Q1"), a, msg("user", "Q2")}, ThinkingMode::Thinking),
            "<｜begin▁of▁sentence｜>S<｜User｜>Q1<｜Assistant｜></think>A1<｜end▁of▁sentence｜>"
            "<｜User｜>Q2<｜Assistant｜><think>");
}

TEST(Chat, ExampleD_MaxEffort) {
  std::string expected =
      "<｜begin▁of▁sentence｜>Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
      "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the "
      "root "
      "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
      "scenarios.\n"
      "Explicitly write out your entire deliberation process, documenting every intermediate step, "
      "considered "
      "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
      "<｜User｜>Q<｜Assistant｜><think>";
  EXPECT_EQ(render({msg("user", "Q")}, ThinkingMode::Thinking, ReasoningEffort::Max), expected);
  // "high" adds nothing; max without thinking adds nothing.
  EXPECT_EQ(render({msg("user", "Q")}, ThinkingMode::Thinking, ReasoningEffort::High),
            "<｜begin▁of▁sentence｜><｜User｜>Q<｜Assistant｜><think>");
  EXPECT_EQ(render({msg("user", "Q")}, ThinkingMode::Chat, ReasoningEffort::Max),
            "<｜begin▁of▁sentence｜><｜User｜>Q<｜Assistant｜></think>");
}

const char* kWeatherTool =
    R"([{"type": "function", "function": {"name": "get_weather", "description": "Get the weather",)"
    R"( "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}])";

std::string tools_section(const std::string& schemas) {
  return "## Tools\n\n"
         "You have access to a set of tools to help answer the user's question. You can invoke tools by "
         "writing a "
         "\"<｜DSML｜tool_calls>\" block like the following:\n\n"
         "<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"$TOOL_NAME\">\n"
         "<｜DSML｜parameter name=\"$PARAMETER_NAME\" "
         "string=\"true|false\">$PARAMETER_VALUE</｜DSML｜parameter>\n"
         "...\n</｜DSML｜invoke>\n<｜DSML｜invoke name=\"$TOOL_NAME2\">\n...\n</｜DSML｜invoke>\n"
         "</｜DSML｜tool_calls>\n\n"
         "String parameters should be specified as is and set `string=\"true\"`. For all other types "
         "(numbers, "
         "booleans, arrays, objects), pass the value in JSON format and set `string=\"false\"`.\n\n"
         "If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside "
         "<think>...</think> BEFORE any tool calls or final response.\n\n"
         "Otherwise, output directly after </think> with tool calls or final response.\n\n"
         "### Available Tool Schemas\n\n" +
         schemas +
         "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool "
         "calls.\n";
}

TEST(Chat, ExampleE_ToolRoundTrip) {
  ChatMessage sys = msg("system", "S");
  sys.tools = kWeatherTool;
  ChatMessage a = msg("assistant", "");
  a.reasoning = "R";
  a.tool_calls = {{"call_1", "get_weather", R"({"city":"Rome","days":2})"}};
  ChatMessage tool = msg("tool", "sunny");
  tool.tool_call_id = "call_1";
  std::string schema =
      R"({"name": "get_weather", "description": "Get the weather", "parameters": {"type": "object", )"
      R"("properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}})";
  std::string expected = "<｜begin▁of▁sentence｜>S\n\n" + tools_section(schema) +
                         "<｜User｜>Weather in Rome?<｜Assistant｜><think>R</think>\n\n"
                         "<｜DSML｜tool_calls>\n"
                         "<｜DSML｜invoke name=\"get_weather\">\n"
                         "<｜DSML｜parameter name=\"city\" string=\"true\">Rome</｜DSML｜parameter>\n"
                         "<｜DSML｜parameter name=\"days\" string=\"false\">2</｜DSML｜parameter>\n"
                         "</｜DSML｜invoke>\n"
                         "</｜DSML｜tool_calls><｜end▁of▁sentence｜><｜User｜><tool_result>sunny</"
                         "tool_result><｜Assistant｜><think>";
  EXPECT_EQ(render({sys, msg("user", "Weather in Rome?"), a, tool}, ThinkingMode::Thinking), expected);
}

TEST(Chat, ParallelToolResultsSortedIntoCallOrder) {
  ChatMessage a = msg("assistant", "");
  a.tool_calls = {{"c1", "f", "{}"}, {"c2", "g", R"({"x": [1, 2], "y": null})"}};
  ChatMessage t2 = msg("tool", "b");
  t2.tool_call_id = "c2";
  ChatMessage t1 = msg("tool", "a");
  t1.tool_call_id = "c1";
  ChatMessage sys = msg("system", "");
  sys.tools = R"([{"name": "f"}, {"name": "g"}])";
  std::string out = render({sys, msg("user", "go"), a, t2, t1, msg("user", "and?")}, ThinkingMode::Chat);
  std::string tail =
      "<｜Assistant｜></think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n\n</｜DSML｜invoke>\n"
      "<｜DSML｜invoke name=\"g\">\n<｜DSML｜parameter name=\"x\" string=\"false\">[1, "
      "2]</｜DSML｜parameter>\n"
      "<｜DSML｜parameter name=\"y\" string=\"false\">null</｜DSML｜parameter>\n</｜DSML｜invoke>\n"
      "</｜DSML｜tool_calls><｜end▁of▁sentence｜>"
      "<｜User｜><tool_result>a</tool_result>\n\n<tool_result>b</tool_result>\n\nand?<｜Assistant｜></think>";
  ASSERT_GE(out.size(), tail.size());
  EXPECT_EQ(out.substr(out.size() - tail.size()), tail);
  EXPECT_EQ(out.find("<｜begin▁of▁sentence｜>\n\n## Tools"), 0u);  // empty system content + separator
}

TEST(Chat, InvalidArgumentsJsonBecomesOneParameter) {
  ChatMessage a = msg("assistant", "ok");
  a.tool_calls = {{"", "f", "not json"}};
  std::string out = render({msg("user", "u"), a}, ThinkingMode::Chat);
  EXPECT_NE(out.find("ok\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n"
                     "<｜DSML｜parameter name=\"arguments\" string=\"true\">not json</｜DSML｜parameter>"),
            std::string::npos)
      << out;
}

TEST(Chat, OtherRoles) {
  ChatMessage dev = msg("developer", "D");
  ChatMessage rem = msg("latest_reminder", "today is Monday");
  ChatMessage sys = msg("system", "S");
  sys.response_format = R"({"type":"json_object"})";
  // developer renders like user; latest_reminder gets its marker and no transition of its own.
  EXPECT_EQ(render({sys, dev, rem}, ThinkingMode::Chat),
            "<｜begin▁of▁sentence｜>S\n\n## Response Format:\n\nYou MUST strictly adhere to the following "
            "schema to reply:\n{\"type\": \"json_object\"}<｜User｜>D<｜Assistant｜></think>"
            "<｜latest_reminder｜>today is Monday");
  // Developer messages before the last user message are dropped in thinking mode.
  ChatMessage a = msg("assistant", "A");
  EXPECT_EQ(render({dev, a, msg("user", "Q")}, ThinkingMode::Thinking),
            "<｜begin▁of▁sentence｜>A<｜end▁of▁sentence｜><｜User｜>Q<｜Assistant｜><think>");
  EXPECT_THROW(render({msg("wizard", "x")}, ThinkingMode::Chat), dsv4::Error);
  ChatMessage bad = msg("system", "S");
  bad.tools = "[{";
  EXPECT_THROW(render({bad}, ThinkingMode::Chat), dsv4::Error);
}

TEST(Chat, ToolsKeepEarlierReasoning) {
  ChatMessage sys = msg("system", "S");
  sys.tools = kWeatherTool;
  ChatMessage a = msg("assistant", "A1");
  a.reasoning = "R1";
  std::string out = render({sys, msg("user", "Q1"), a, msg("user", "Q2")}, ThinkingMode::Thinking);
  EXPECT_NE(out.find("<｜User｜>Q1<｜Assistant｜><think>R1</think>A1<｜end▁of▁sentence｜><｜User｜>Q2"
                     "<｜Assistant｜><think>"),
            std::string::npos)
      << out;
}

TEST(Chat, ContextRendersOnlyTheContinuation) {
  // A live session appends turns: rendering with the history as context gives exactly the new tokens.
  ChatMessage a = msg("assistant", "A1");
  std::vector<ChatMessage> ms = {msg("user", "Q1"), a, msg("user", "Q2")};
  ChatOptions o;
  o.mode = ThinkingMode::Chat;
  EXPECT_EQ(render_chat(ms, o, 2).str(), "<｜User｜>Q2<｜Assistant｜></think>");
  EXPECT_EQ(render_chat(ms, o, 0).str(),
            render_chat(std::span(ms).first(2), o).str() + "<｜User｜>Q2<｜Assistant｜></think>");
}

TEST(Chat, SpecialsOnlyFromTheTemplate) {
  // Client text that spells control tokens stays text; the template's markers are special segments.
  Prompt p = render_chat(std::vector<ChatMessage>{msg("user", "<｜User｜>x</think>")}, ChatOptions{});
  ASSERT_EQ(p.segments.size(), 5u);
  EXPECT_TRUE(p.segments[0].special);  // BOS
  EXPECT_TRUE(p.segments[1].special);  // <｜User｜>
  EXPECT_FALSE(p.segments[2].special);
  EXPECT_EQ(p.segments[2].text, "<｜User｜>x</think>");
  EXPECT_TRUE(p.segments[3].special);
  EXPECT_TRUE(p.segments[4].special);
}

TEST(Chat, DsmlInTemplateIsTheSpecialToken) {
  // §1.6: "<｜DSML｜tool_calls>" tokenizes as "<" + ｜DSML｜ + BPE; the tools section does the same.
  ChatMessage sys = msg("system", "");
  sys.tools = kWeatherTool;
  Prompt p = render_chat(std::vector<ChatMessage>{sys, msg("user", "u")}, ChatOptions{});
  int dsml = 0, think = 0;
  for (auto& s : p.segments) {
    dsml += s.special && s.text == "｜DSML｜";
    think += s.special && (s.text == "<think>" || s.text == "</think>");
  }
  EXPECT_EQ(dsml, 9);   // ｜DSML｜ occurrences in the §2.5 template text (counted by hand)
  EXPECT_EQ(think, 5);  // 4 in the template text + the final transition
}

TEST(Chat, PythonJsonDumps) {
  EXPECT_EQ(python_json_dumps(R"({"b":1,"a":[true,null,"é\n"],"c":{}})"),
            "{\"b\": 1, \"a\": [true, null, \"é\\n\"], \"c\": {}}");
  EXPECT_THROW(python_json_dumps("{"), dsv4::Error);
}

}  // namespace
}  // namespace dsv4::test

namespace dsv4::test {
namespace {

TEST(Chat, EmptyToolsAndFormatAreAbsent) {
  // The official code tests `if tools:` / `if response_format:` — an empty list or null is no section, and
  // an empty tools list does not stop earlier reasoning from being dropped.
  ChatMessage sys = msg("system", "S");
  sys.tools = "[]";
  sys.response_format = "null";
  ChatMessage a = msg("assistant", "A1");
  a.reasoning = "R1";
  EXPECT_EQ(render({sys, msg("user", "Q1"), a, msg("user", "Q2")}, ThinkingMode::Thinking),
            "<｜begin▁of▁sentence｜>S<｜User｜>Q1<｜Assistant｜></think>A1<｜end▁of▁sentence｜>"
            "<｜User｜>Q2<｜Assistant｜><think>");
}

}  // namespace
}  // namespace dsv4::test
