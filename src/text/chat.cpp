// The official DeepSeek V4 prompt encoder (encoding/encoding_dsv4.py of deepseek-ai/DeepSeek-V4-Flash),
// re-implemented: tool messages merged into user messages, tool results sorted into call order, earlier
// reasoning dropped, tools and response format in the system prompt, DSML for historical tool calls.
//
// Where the official encoder produces one string that the official tokenizer then scans for added tokens, we
// build a Prompt whose special segments are exactly the control tokens the template inserts: template text
// goes through add_template() (which recognizes the chat specials), client text through add_text() (never).
#include <nlohmann/json.hpp>

#include "common/error.h"
#include "dsv4/text.h"

namespace dsv4 {

const char* const kReasoningEffortMaxPrefix =
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the "
    "root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n";

namespace {

using ojson = nlohmann::ordered_json;
namespace ct = chat_tokens;

// "{D}" stands for the DSML token, "{T}" / "{/T}" for <think> / </think> (specials in the official
// tokenization); everything else is plain text.
const char* const kToolsTemplateHead =
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "
    "\"<{D}tool_calls>\" block like the following:\n\n"
    "<{D}tool_calls>\n"
    "<{D}invoke name=\"$TOOL_NAME\">\n"
    "<{D}parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</{D}parameter>\n"
    "...\n"
    "</{D}invoke>\n"
    "<{D}invoke name=\"$TOOL_NAME2\">\n"
    "...\n"
    "</{D}invoke>\n"
    "</{D}tool_calls>\n\n"
    "String parameters should be specified as is and set `string=\"true\"`. For all other types (numbers, "
    "booleans, arrays, objects), pass the value in JSON format and set `string=\"false\"`.\n\n"
    "If thinking_mode is enabled (triggered by {T}), you MUST output your complete reasoning inside "
    "{T}...{/T} BEFORE any tool calls or final response.\n\n"
    "Otherwise, output directly after {/T} with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n";
const char* const kToolsTemplateTail =
    "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n";
const char* const kResponseFormatHead =
    "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n";

// Template text with {D}, {T}, {/T} placeholders -> segments.
void add_template(Prompt& p, std::string_view t) {
  size_t i = 0;
  while (i < t.size()) {
    size_t j = t.find('{', i);
    if (j == std::string_view::npos) break;
    const char* special = nullptr;
    size_t len = 0;
    if (t.substr(j, 3) == "{D}")
      special = ct::kDsml, len = 3;
    else if (t.substr(j, 3) == "{T}")
      special = ct::kThink, len = 3;
    else if (t.substr(j, 4) == "{/T}")
      special = ct::kEndThink, len = 4;
    if (!special) {
      p.add_text(t.substr(i, j + 1 - i));
      i = j + 1;
      continue;
    }
    p.add_text(t.substr(i, j - i));
    p.add_special(special);
    i = j + len;
  }
  p.add_text(t.substr(i));
}

// Python json.dumps(value, ensure_ascii=False) with default separators.
void dumps(const ojson& v, std::string& out) {
  if (v.is_object()) {
    out += '{';
    bool first = true;
    for (auto it = v.begin(); it != v.end(); ++it) {
      if (!first) out += ", ";
      first = false;
      out += ojson(it.key()).dump(-1, ' ', false, ojson::error_handler_t::replace);
      out += ": ";
      dumps(it.value(), out);
    }
    out += '}';
  } else if (v.is_array()) {
    out += '[';
    for (size_t i = 0; i < v.size(); ++i) {
      if (i) out += ", ";
      dumps(v[i], out);
    }
    out += ']';
  } else {
    out += v.dump(-1, ' ', false, ojson::error_handler_t::replace);
  }
}

std::string dumps(const ojson& v) {
  std::string s;
  dumps(v, s);
  return s;
}

struct Block {
  bool tool_result = false;
  std::string text;
  std::string tool_use_id;
};

// A message after merge_tool_messages: user messages carry blocks.
struct Msg {
  const ChatMessage* src = nullptr;
  std::string role;
  std::vector<Block> blocks;
  bool has_blocks = false;
  bool drop_reasoning = false;  // set by the drop-thinking pass
};

std::vector<Msg> merge_tool_messages(std::span<const ChatMessage> in) {
  std::vector<Msg> out;
  for (const ChatMessage& m : in) {
    if (m.role == "tool") {
      Block b{true, m.content, m.tool_call_id};
      if (!out.empty() && out.back().role == "user" && out.back().has_blocks) {
        out.back().blocks.push_back(b);
      } else {
        Msg u;
        u.role = "user";
        u.blocks.push_back(b);
        u.has_blocks = true;
        out.push_back(u);
      }
    } else if (m.role == "user") {
      Block b{false, m.content, ""};
      bool prev_task = !out.empty() && out.back().src && !out.back().src->task.empty();
      if (!out.empty() && out.back().role == "user" && out.back().has_blocks && !prev_task) {
        out.back().blocks.push_back(b);
      } else {
        Msg u;
        u.src = &m;
        u.role = "user";
        u.blocks.push_back(b);
        u.has_blocks = true;
        out.push_back(u);
      }
    } else {
      Msg o;
      o.src = &m;
      o.role = m.role;
      out.push_back(o);
    }
  }
  return out;
}

void sort_tool_results_by_call_order(std::vector<Msg>& msgs) {
  std::vector<std::pair<std::string, int>> order;
  for (Msg& m : msgs) {
    if (m.role == "assistant" && m.src && !m.src->tool_calls.empty()) {
      order.clear();
      for (size_t i = 0; i < m.src->tool_calls.size(); ++i)
        if (!m.src->tool_calls[i].id.empty()) order.emplace_back(m.src->tool_calls[i].id, int(i));
    } else if (m.role == "user" && m.has_blocks) {
      std::vector<Block> results;
      for (auto& b : m.blocks)
        if (b.tool_result) results.push_back(b);
      if (results.size() < 2 || order.empty()) continue;
      auto rank = [&](const Block& b) {
        for (auto& [id, i] : order)
          if (id == b.tool_use_id) return i;
        return 0;  // unknown ids sort as the first call, as the official code does
      };
      std::stable_sort(results.begin(), results.end(),
                       [&](const Block& a, const Block& b) { return rank(a) < rank(b); });
      size_t k = 0;
      for (auto& b : m.blocks)
        if (b.tool_result) b = results[k++];
    }
  }
}

int last_user_index(const std::vector<Msg>& msgs) {
  for (int i = int(msgs.size()) - 1; i >= 0; --i)
    if (msgs[i].role == "user" || msgs[i].role == "developer") return i;
  return -1;
}

// _drop_thinking_messages: before the last user message, assistant reasoning goes and developer messages
// (and any role not kept) are dropped.
std::vector<Msg> drop_thinking(const std::vector<Msg>& msgs) {
  int last = last_user_index(msgs);
  std::vector<Msg> out;
  for (int i = 0; i < int(msgs.size()); ++i) {
    const Msg& m = msgs[i];
    bool keep = m.role == "user" || m.role == "system" || m.role == "tool" || m.role == "latest_reminder";
    if (keep || i >= last) {
      out.push_back(m);
    } else if (m.role == "assistant") {
      out.push_back(m);
      out.back().drop_reasoning = true;
    }
  }
  return out;
}

ojson parse_json(const std::string& text, size_t index, const char* field) {
  try {
    return ojson::parse(text);
  } catch (const std::exception& e) {
    fail("chat message %zu: field '%s' is not valid JSON: %s", index, field, e.what());
  }
}

// Python truthiness of an optional JSON field, as the official code tests it (`if tools:`): absent, null,
// empty list / object / string all count as "not given".
bool truthy(const std::string& json_text, size_t index, const char* field) {
  if (json_text.empty()) return false;
  ojson v = parse_json(json_text, index, field);
  if (v.is_null()) return false;
  if (v.is_array() || v.is_object() || v.is_string())
    return !v.empty() && !(v.is_string() && v.get<std::string>().empty());
  return !(v.is_boolean() && !v.get<bool>());
}

void add_tools(Prompt& p, const ChatMessage& m, size_t index) {
  ojson tools = parse_json(m.tools, index, "tools");
  if (!tools.is_array()) fail("chat message %zu: field 'tools' must be a JSON array", index);
  std::string schemas;
  for (size_t i = 0; i < tools.size(); ++i) {
    // OpenAI wraps each tool as {"type": "function", "function": {...}}; the official code takes "function".
    const ojson& t = tools[i].is_object() && tools[i].contains("function") ? tools[i]["function"] : tools[i];
    if (!t.is_object() || !t.contains("name"))
      fail("chat message %zu: tools[%zu] has no function name", index, i);
    if (i) schemas += "\n";
    schemas += dumps(t);
  }
  p.add_text("\n\n");
  add_template(p, kToolsTemplateHead);
  p.add_text(schemas);
  p.add_text(kToolsTemplateTail);
}

void add_response_format(Prompt& p, const ChatMessage& m, size_t index) {
  p.add_text("\n\n");
  p.add_text(kResponseFormatHead);
  p.add_text(dumps(parse_json(m.response_format, index, "response_format")));
}

// encode_arguments_to_dsml + tool_call_template + tool_calls_template.
void add_tool_calls(Prompt& p, const std::vector<ToolCall>& calls) {
  p.add_text("\n\n<");
  p.add_special(ct::kDsml);
  p.add_text("tool_calls>\n");
  for (size_t c = 0; c < calls.size(); ++c) {
    const ToolCall& tc = calls[c];
    if (c) p.add_text("\n");
    p.add_text("<");
    p.add_special(ct::kDsml);
    p.add_text("invoke name=\"" + tc.name + "\">\n");
    ojson args;
    bool ok = true;
    try {
      args = ojson::parse(tc.arguments);
    } catch (const std::exception&) {
      ok = false;
    }
    if (!ok || !args.is_object()) args = ojson{{"arguments", tc.arguments}};  // official fallback
    bool first = true;
    for (auto it = args.begin(); it != args.end(); ++it) {
      if (!first) p.add_text("\n");
      first = false;
      bool is_str = it.value().is_string();
      p.add_text("<");
      p.add_special(ct::kDsml);
      p.add_text("parameter name=\"" + it.key() + "\" string=\"" + (is_str ? "true" : "false") + "\">");
      p.add_text(is_str ? it.value().get<std::string>() : dumps(it.value()));
      p.add_text("</");
      p.add_special(ct::kDsml);
      p.add_text("parameter>");
    }
    p.add_text("\n</");
    p.add_special(ct::kDsml);
    p.add_text("invoke>");
  }
  p.add_text("\n</");
  p.add_special(ct::kDsml);
  p.add_text("tool_calls>");
}

const char* task_token(const std::string& task, size_t index) {
  if (task == "action") return "<｜action｜>";
  if (task == "query") return "<｜query｜>";
  if (task == "authority") return "<｜authority｜>";
  if (task == "domain") return "<｜domain｜>";
  if (task == "title") return "<｜title｜>";
  if (task == "read_url") return "<｜read_url｜>";
  fail("chat message %zu: unknown task '%s' (action, query, authority, domain, title, read_url)", index,
       task.c_str());
}

struct Renderer {
  const std::vector<Msg>& msgs;
  bool thinking;
  bool drop;
  ReasoningEffort effort;
  int last_user;

  void render(Prompt& p, int index) const;
  void render_role(Prompt& p, int index) const;
  void transition(Prompt& p, int index) const;
};

void Renderer::render_role(Prompt& p, int index) const {
  const Msg& m = msgs[index];
  static const ChatMessage empty;
  const ChatMessage& s = m.src ? *m.src : empty;
  if (m.role == "system") {
    p.add_text(s.content);
    if (truthy(s.tools, index, "tools")) add_tools(p, s, index);
    if (truthy(s.response_format, index, "response_format")) add_response_format(p, s, index);
  } else if (m.role == "developer") {
    if (s.content.empty()) fail("chat message %d: a developer message needs content", index);
    p.add_special(ct::kUser);
    p.add_text(s.content);
    if (truthy(s.tools, index, "tools")) add_tools(p, s, index);
    if (truthy(s.response_format, index, "response_format")) add_response_format(p, s, index);
  } else if (m.role == "user") {
    p.add_special(ct::kUser);
    for (size_t i = 0; i < m.blocks.size(); ++i) {
      if (i) p.add_text("\n\n");
      if (m.blocks[i].tool_result) {
        p.add_text("<tool_result>");
        p.add_text(m.blocks[i].text);
        p.add_text("</tool_result>");
      } else {
        p.add_text(m.blocks[i].text);
      }
    }
  } else if (m.role == "latest_reminder") {
    p.add_special(ct::kLatestReminder);
    p.add_text(s.content);
  } else if (m.role == "assistant") {
    bool prev_task = index > 0 && msgs[index - 1].src && !msgs[index - 1].src->task.empty();
    if (thinking && !prev_task && (!drop || index > last_user)) {
      if (!m.drop_reasoning) p.add_text(s.reasoning);
      p.add_special(ct::kEndThink);
    }
    p.add_text(s.content);
    if (!s.tool_calls.empty()) add_tool_calls(p, s.tool_calls);
    if (!s.wo_eos) p.add_special(ct::kEos);
  } else {
    fail("chat message %d: unknown role '%s' (system, developer, user, assistant, tool, latest_reminder)",
         index, m.role.c_str());
  }
}

void Renderer::transition(Prompt& p, int index) const {
  // Only before an assistant / latest_reminder message, or after the last message.
  if (index + 1 < int(msgs.size()) && msgs[index + 1].role != "assistant" &&
      msgs[index + 1].role != "latest_reminder")
    return;
  const Msg& m = msgs[index];
  if (m.src && !m.src->task.empty()) {
    const char* tok = task_token(m.src->task, index);
    if (m.src->task != "action") {
      p.add_special(tok);
    } else {
      p.add_special(ct::kAssistant);
      p.add_special(thinking ? ct::kThink : ct::kEndThink);
      p.add_special(tok);
    }
  } else if (m.role == "user" || m.role == "developer") {
    p.add_special(ct::kAssistant);
    bool open = thinking && (!drop || index >= last_user);
    p.add_special(open ? ct::kThink : ct::kEndThink);
  }
}

void Renderer::render(Prompt& p, int index) const {
  if (index == 0 && thinking && effort == ReasoningEffort::Max) p.add_text(kReasoningEffortMaxPrefix);
  render_role(p, index);
  transition(p, index);
}

}  // namespace

std::string python_json_dumps(std::string_view json_text) {
  try {
    return dumps(ojson::parse(json_text));
  } catch (const nlohmann::json::exception& e) {
    fail("invalid JSON: %s", e.what());
  }
}

Prompt render_chat(std::span<const ChatMessage> messages, const ChatOptions& options, size_t n_context) {
  if (n_context > messages.size())
    fail("render_chat: context (%zu) longer than messages (%zu)", n_context, messages.size());
  std::vector<Msg> ctx = merge_tool_messages(messages.subspan(0, n_context));
  std::vector<Msg> full = merge_tool_messages(messages.subspan(0, n_context));
  {
    std::vector<Msg> tail = merge_tool_messages(messages.subspan(n_context));
    full.insert(full.end(), tail.begin(), tail.end());
  }
  sort_tool_results_by_call_order(full);
  sort_tool_results_by_call_order(ctx);
  size_t n_new = full.size() - ctx.size();

  bool thinking = options.mode == ThinkingMode::Thinking;
  bool drop = options.drop_thinking;
  for (size_t i = 0; i < messages.size(); ++i)
    if (truthy(messages[i].tools, i, "tools")) drop = false;  // agent loops keep every turn's reasoning

  Prompt p;
  if (options.add_bos && n_context == 0) p.add_special(ct::kBos);
  size_t context_len = ctx.size();
  if (thinking && drop) {
    full = drop_thinking(full);
    n_new = full.size() - drop_thinking(ctx).size();
    context_len = full.size() - n_new;
  }
  Renderer r{full, thinking, drop, options.effort, last_user_index(full)};
  for (size_t i = 0; i < n_new; ++i) r.render(p, int(context_len + i));
  return p;
}

}  // namespace dsv4
