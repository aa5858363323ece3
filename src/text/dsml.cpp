// Output parsing: the incremental reasoning/content/tool-calls state machine and the tolerant DSML block
// parser (io-and-api.md §2.9).
#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>
#include <optional>

#include "common/error.h"
#include "dsv4/text.h"

namespace dsv4 {

namespace {

using ojson = nlohmann::ordered_json;

// Openers of a tool-calls block as models actually write them: canonical, missing first bar, doubled bars,
// the "toolcalls" typo, plain XML, and the V4.1 spacing.
const char* const kOpeners[] = {
    "<｜DSML｜tool_calls", "<DSML｜tool_calls",    "<｜｜DSML｜｜tool_calls",
    "<｜DSML｜toolcalls",  "<｜DSML｜ tool_calls", "<tool_calls>",
};
const char* const kClosers[] = {
    "</｜DSML｜tool_calls>", "</DSML｜tool_calls>",    "</｜｜DSML｜｜tool_calls>",
    "</｜DSML｜toolcalls>",  "</｜DSML｜ tool_calls>", "</tool_calls>",
};
const std::string kEndThinkText = "</think>";

bool is_space(char c) {
  return c == ' ' || c == '\n' || c == '\r' || c == '\t';
}

// Length of the longest suffix of s that is a proper prefix of `marker`.
size_t partial_suffix(std::string_view s, std::string_view marker) {
  size_t max = std::min(s.size(), marker.size() - 1);
  for (size_t n = max; n > 0; --n)
    if (s.substr(s.size() - n) == marker.substr(0, n)) return n;
  return 0;
}

void replace_all(std::string& s, std::string_view from, std::string_view to) {
  size_t i = 0;
  while ((i = s.find(from, i)) != std::string::npos) {
    s.replace(i, from.size(), to);
    i += to.size();
  }
}

std::string normalize_dsml(std::string_view in) {
  std::string s(in);
  replace_all(s, "｜｜DSML｜｜", "｜DSML｜");
  replace_all(s, "<DSML｜", "<｜DSML｜");
  replace_all(s, "</DSML｜", "</｜DSML｜");
  replace_all(s, "<｜DSML｜ ", "<｜DSML｜");
  replace_all(s, "</｜DSML｜ ", "</｜DSML｜");
  replace_all(s, "｜DSML｜toolcalls", "｜DSML｜tool_calls");
  replace_all(s, "<invoke ", "<｜DSML｜invoke ");
  replace_all(s, "</invoke>", "</｜DSML｜invoke>");
  replace_all(s, "<parameter ", "<｜DSML｜parameter ");
  replace_all(s, "</parameter>", "</｜DSML｜parameter>");
  replace_all(s, "</tool_calls>", "</｜DSML｜tool_calls>");
  replace_all(s, "“", "\"");
  replace_all(s, "”", "\"");
  return s;
}

// Value of attribute `key` in `name="x" string="true"`; nullopt when absent.
std::optional<std::string> attribute(std::string_view attrs, std::string_view key) {
  size_t i = 0;
  while ((i = attrs.find(key, i)) != std::string_view::npos) {
    bool boundary = i == 0 || is_space(attrs[i - 1]);
    size_t eq = i + key.size();
    if (boundary && eq + 1 < attrs.size() && attrs[eq] == '=' && attrs[eq + 1] == '"') {
      size_t end = attrs.find('"', eq + 2);
      if (end == std::string_view::npos) return std::string(attrs.substr(eq + 2));
      return std::string(attrs.substr(eq + 2, end - eq - 2));
    }
    i = eq;
  }
  return std::nullopt;
}

const std::string kParamOpen = "<｜DSML｜parameter";
const std::string kParamClose = "</｜DSML｜parameter>";
const std::string kInvokeOpen = "<｜DSML｜invoke";
const std::string kInvokeClose = "</｜DSML｜invoke>";

// End of the parameter value starting at `from` (position of its closer), honouring nested parameters.
size_t value_end(const std::string& s, size_t from, size_t limit) {
  int depth = 0;
  size_t i = from;
  while (i < limit) {
    size_t o = s.find(kParamOpen, i), c = s.find(kParamClose, i);
    if (c == std::string::npos || c >= limit) return limit;
    if (o != std::string::npos && o < c) {
      ++depth;
      i = o + kParamOpen.size();
    } else {
      if (depth == 0) return c;
      --depth;
      i = c + kParamClose.size();
    }
  }
  return limit;
}

std::string json_string(std::string_view v) {
  return ojson(std::string(v)).dump(-1, ' ', false, ojson::error_handler_t::replace);
}

// Parameters in s[from, limit) -> official argument JSON: {"k": v, ...} with ", " / ": " separators.
std::string parse_parameters(const std::string& s, size_t from, size_t limit) {
  std::string out = "{";
  std::vector<std::string> seen;
  size_t i = from;
  while (true) {
    size_t k = s.find(kParamOpen, i);
    if (k == std::string::npos || k >= limit) break;
    size_t gt = s.find('>', k);
    if (gt == std::string::npos || gt >= limit) break;
    std::string_view attrs(s.data() + k + kParamOpen.size(), gt - k - kParamOpen.size());
    std::string name = attribute(attrs, "name").value_or("");
    bool is_string = attribute(attrs, "string").value_or("true") != "false";  // missing -> string (§2.9)
    size_t vs = gt + 1, ve = value_end(s, vs, limit);
    std::string value = s.substr(vs, ve - vs);
    i = std::min(limit, ve + kParamClose.size());
    if (name.empty() || std::find(seen.begin(), seen.end(), name) != seen.end()) continue;  // first wins
    seen.push_back(name);
    std::string json;
    if (value.find(kParamOpen) != std::string::npos) {
      json = parse_parameters(value, 0, value.size());  // nested parameters -> object (as ds4)
    } else if (!is_string && ojson::accept(value)) {
      json = value;  // the official parser inserts string="false" values verbatim
    } else {
      json = json_string(value);  // string, or a non-JSON "false" value kept as text rather than lost
    }
    if (out.size() > 1) out += ", ";
    out += json_string(name) + ": " + json;
  }
  return out + "}";
}

}  // namespace

std::vector<ParsedToolCall> parse_tool_calls_block(std::string_view block) {
  std::string s = normalize_dsml(block);
  std::vector<ParsedToolCall> calls;
  size_t pos = 0;
  while (true) {
    size_t i = s.find(kInvokeOpen, pos);
    if (i == std::string::npos) break;
    size_t gt = s.find('>', i);
    if (gt == std::string::npos) fail("tool calls: unterminated invoke tag at byte %zu", i);
    std::string_view attrs(s.data() + i + kInvokeOpen.size(), gt - i - kInvokeOpen.size());
    auto name = attribute(attrs, "name");
    if (!name || name->empty()) fail("tool calls: invoke without a name at byte %zu", i);
    size_t end = s.find(kInvokeClose, gt);
    size_t next = s.find(kInvokeOpen, gt);
    if (end == std::string::npos || (next != std::string::npos && next < end)) end = next;
    if (end == std::string::npos) end = s.size();
    calls.push_back({*name, parse_parameters(s, gt + 1, end)});
    pos = end;
  }
  if (calls.empty()) fail("tool calls: no invoke found in the block (%zu bytes)", block.size());
  return calls;
}

OutputParser::OutputParser(const Tokenizer& tok, bool starts_in_reasoning)
    : tok_(&tok),
      end_think_(tok.special(chat_tokens::kEndThink)),
      eos_(tok.eos()),
      state_(starts_in_reasoning ? State::Reasoning : State::Content),
      stream_(tok) {}

OutputDelta OutputParser::push(Token t) {
  OutputDelta d;
  if (state_ == State::Done) return d;
  if (t == eos_) {
    feed_text(stream_.flush(), d);
    drain(d, true);
    if (state_ == State::ToolCalls) close_tool_block(d, false);
    state_ = State::Done;
    return d;
  }
  if (t == end_think_ && state_ == State::Reasoning) {
    feed_text(stream_.flush(), d);
    d.reasoning += held_;
    held_.clear();
    state_ = State::Content;
    return d;
  }
  feed_text(stream_.push(t), d);
  return d;
}

OutputDelta OutputParser::finish() {
  OutputDelta d;
  if (state_ == State::Done) return d;
  feed_text(stream_.flush(), d);
  drain(d, true);
  if (state_ == State::ToolCalls) close_tool_block(d, false);
  state_ = State::Done;
  return d;
}

void OutputParser::feed_text(const std::string& s, OutputDelta& d) {
  if (s.empty()) return;
  if (state_ == State::ToolCalls) {
    block_ += s;
  } else {
    held_ += s;
  }
  drain(d, false);
}

// Moves everything that can no longer be part of a marker out of held_, switching state on markers.
void OutputParser::drain(OutputDelta& d, bool final) {
  while (true) {
    if (state_ == State::Reasoning) {
      size_t k = held_.find(kEndThinkText);  // </think> written as plain text instead of the token
      if (k != std::string::npos) {
        d.reasoning += held_.substr(0, k);
        held_.erase(0, k + kEndThinkText.size());
        state_ = State::Content;
        continue;
      }
      size_t keep = final ? 0 : partial_suffix(held_, kEndThinkText);
      d.reasoning += held_.substr(0, held_.size() - keep);
      held_.erase(0, held_.size() - keep);
      return;
    }
    if (state_ == State::Content) {
      size_t best = std::string::npos, best_len = 0;
      for (const char* o : kOpeners) {
        size_t k = held_.find(o);
        if (k < best) best = k, best_len = std::strlen(o);
      }
      if (best != std::string::npos) {
        size_t c = best;
        while (c > 0 && is_space(held_[c - 1])) --c;  // the "\n\n" before the block is not content
        d.content += held_.substr(0, c);
        opener_ = held_.substr(c, best + best_len - c);
        block_ = held_.substr(best + best_len);
        held_.clear();
        state_ = State::ToolCalls;
        continue;
      }
      size_t keep = 0;
      if (!final) {
        for (const char* o : kOpeners) keep = std::max(keep, partial_suffix(held_, o));
        while (keep < held_.size() && is_space(held_[held_.size() - keep - 1])) ++keep;
      }
      d.content += held_.substr(0, held_.size() - keep);
      held_.erase(0, held_.size() - keep);
      return;
    }
    if (state_ == State::ToolCalls) {
      announce_calls(d);
      for (const char* c : kClosers) {
        size_t k = block_.find(c);
        if (k != std::string::npos) {
          closer_ = block_.substr(k);  // the closer and anything after it (only EOS may follow)
          block_.erase(k);
          close_tool_block(d, true);
          state_ = State::Done;
          return;
        }
      }
      return;
    }
    return;
  }
}

void OutputParser::announce_calls(OutputDelta& d) {
  std::string b = normalize_dsml(block_);
  size_t pos = 0, seen = 0;
  while ((pos = b.find(kInvokeOpen, pos)) != std::string::npos) {
    size_t gt = b.find('>', pos);
    if (gt == std::string::npos) break;  // tag not complete yet
    if (++seen > announced_) {
      std::string_view attrs(b.data() + pos + kInvokeOpen.size(), gt - pos - kInvokeOpen.size());
      d.tool_calls_started.push_back(attribute(attrs, "name").value_or(""));
      announced_ = seen;
    }
    pos = gt;
  }
}

bool OutputParser::in_markup() const {
  if (state_ != State::ToolCalls) return false;
  // The open parameter tags are canonical or variants; compare on the normalized text.
  std::string b = normalize_dsml(block_);
  size_t lt = b.rfind('<'), gt = b.rfind('>');
  if (lt != std::string::npos && (gt == std::string::npos || lt > gt)) {
    // Inside a tag... unless that '<' is part of a value (a value may contain '<'): a tag starts with a
    // known name.
    std::string_view tail = std::string_view(b).substr(lt);
    bool tag = tail.rfind("<｜DSML｜", 0) == 0 || tail.rfind("</｜DSML｜", 0) == 0 ||
               std::string_view("<｜DSML｜").rfind(tail, 0) == 0 ||
               std::string_view("</｜DSML｜").rfind(tail, 0) == 0;
    if (tag) return true;
  }
  size_t open = b.rfind(kParamOpen), close = b.rfind(kParamClose);
  bool in_value = open != std::string::npos && (close == std::string::npos || open > close) &&
                  b.find('>', open) != std::string::npos;
  return !in_value;
}

void OutputParser::close_tool_block(OutputDelta& d, bool terminated) {
  try {
    if (!terminated) fail("tool calls: the block was opened but never closed");
    auto calls = parse_tool_calls_block(block_);
    d.tool_calls.insert(d.tool_calls.end(), calls.begin(), calls.end());
  } catch (const dsv4::Error& e) {
    error_ = e.what();
    d.content += opener_ + block_ + closer_;  // never lose what the model wrote
  }
  block_.clear();
}

}  // namespace dsv4
