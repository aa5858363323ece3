// dsv4 text API: tokenizer, chat prompt rendering (encoding_dsv4), output parsing (reasoning / content /
// DSML tool calls) and sampling. Tensor-free: used by the CLI, the server and the tests without the model.
//
// Error policy as everywhere: bad input throws dsv4::Error naming the file / key / field / offset.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "dsv4/error.h"

namespace dsv4 {

using Token = int32_t;

// Tokenizer arrays in GGUF form (tokenizer.ggml.*): token strings in the GPT-2 byte-to-unicode alphabet,
// merges "left right" by rank, llama.cpp token types. See src/text/vocab.h for builders and key names.
struct TokenizerData {
  std::vector<std::string> tokens;
  std::vector<std::string> merges;
  std::vector<int32_t> token_types;
  std::string model = "gpt2";
  std::string pre = "deepseek-v3";
  int32_t bos_id = 0, eos_id = 1, pad_id = 2;
  bool add_bos = false;  // V4 tooling writes BOS itself (§1.1)
};

// A prompt as the renderer builds it: text segments (client or template text, always tokenized as plain
// BPE) and special segments (one control token each, looked up by string). Keeping the two apart is what
// stops a user who types "<｜User｜>" from forging a turn marker (ds4 #95).
struct PromptSegment {
  bool special = false;
  std::string text;
};
struct Prompt {
  std::vector<PromptSegment> segments;
  void add_text(std::string_view s);
  void add_special(std::string_view s);
  void append(const Prompt& other);
  std::string str() const;  // the rendered string (what the official encoder returns)
};

// Byte-level BPE tokenizer (DeepSeek V3/V4: GPT-2 bytes, three-regex pre-tokenizer, rank-ordered merges).
// Immutable after construction and cheap to copy (shared state); safe to use from several threads.
class Tokenizer {
 public:
  explicit Tokenizer(const TokenizerData& data);
  // Reads tokenizer.ggml.* from a GGUF file (tokens, merges; model must be "gpt2").
  static Tokenizer from_gguf(const std::string& path);
  // The real DeepSeek V4 vocabulary rebuilt from the tiktoken file shipped in data/ (used without -m).
  static Tokenizer builtin();
  static Tokenizer from_tiktoken(const std::string& path);

  int n_vocab() const;
  Token bos() const;
  Token eos() const;

  // Plain text -> tokens. Never yields a control token, whatever the text contains.
  std::vector<Token> encode(std::string_view text) const;
  // Rendered prompt -> tokens: text segments as encode(), special segments as their single token.
  std::vector<Token> encode(const Prompt& prompt) const;
  // The pre-tokenizer alone (for tests and diagnostics): the pieces BPE runs on.
  std::vector<std::string> pre_tokenize(std::string_view text) const;

  // Token id of an exact token string (any token), or nullopt.
  std::optional<Token> find(std::string_view token_string) const;
  // Like find() for a control token; throws dsv4::Error naming the string when the vocabulary lacks it.
  Token special(std::string_view token_string) const;
  bool is_special(Token t) const;  // not byte-level text (BOS, <think>, <｜User｜>, ...)

  // Bytes of one token (special tokens: their string); throws on an id out of range.
  std::string token_bytes(Token t) const;
  std::string decode(std::span<const Token> tokens) const;

  struct Impl;

 private:
  std::shared_ptr<const Impl> impl_;
};

// Incremental decoder: feeds tokens, returns only complete UTF-8 (an incomplete trailing sequence is held
// back until the next token completes it, or flush()).
class TokenStream {
 public:
  explicit TokenStream(const Tokenizer& tok) : tok_(&tok) {}
  std::string push(Token t);
  std::string flush();  // whatever is held back (possibly invalid UTF-8)

 private:
  const Tokenizer* tok_;
  std::string pending_;
};

// ---- chat prompt rendering: DeepSeek's official encoding_dsv4 (io-and-api.md §2) -------------------------

// Control-token strings of the V4 chat format (looked up in the vocabulary by string, never by id).
namespace chat_tokens {
inline constexpr const char* kBos = "<｜begin▁of▁sentence｜>";
inline constexpr const char* kEos = "<｜end▁of▁sentence｜>";
inline constexpr const char* kUser = "<｜User｜>";
inline constexpr const char* kAssistant = "<｜Assistant｜>";
inline constexpr const char* kLatestReminder = "<｜latest_reminder｜>";
inline constexpr const char* kThink = "<think>";
inline constexpr const char* kEndThink = "</think>";
inline constexpr const char* kDsml = "｜DSML｜";
}  // namespace chat_tokens

struct ToolCall {
  std::string id;
  std::string name;
  std::string
      arguments;  // JSON object text (as OpenAI sends it); not valid JSON -> one "arguments" parameter
};

struct ChatMessage {
  // system, developer, user, assistant, tool, latest_reminder
  std::string role;
  std::string content;
  std::string reasoning;             // assistant: reasoning_content
  std::vector<ToolCall> tool_calls;  // assistant
  std::string tool_call_id;          // tool
  std::string tools;                 // system/developer: JSON array (OpenAI {"type":"function",...} items)
  std::string response_format;       // system/developer: JSON value
  std::string task;                  // internal quick-instruction task (action, query, title, ...)
  bool wo_eos = false;               // assistant prefill: no EOS after the message
};

enum class ThinkingMode { Chat, Thinking };
enum class ReasoningEffort { None, High, Max };

struct ChatOptions {
  ThinkingMode mode = ThinkingMode::Thinking;
  ReasoningEffort effort = ReasoningEffort::None;  // Max only applies with Thinking
  bool drop_thinking = true;                       // forced off when any message declares tools
  bool add_bos = true;
};

// The max-effort prefix written right after BOS (§2.3); ends in "\n\n".
extern const char* const kReasoningEffortMaxPrefix;
// ds4's rule (and the model card's): max effort needs >= 384K context, else it is downgraded to high.
inline constexpr int64_t kMaxEffortMinContext = 393216;

// Renders messages[n_context..] as encode_messages(messages[n_context..], context=messages[..n_context])
// does: BOS only when n_context == 0. Template text and client text are kept apart in the result (Prompt).
// Throws dsv4::Error naming the message index and field for invalid input (unknown role, bad tools JSON).
Prompt render_chat(std::span<const ChatMessage> messages, const ChatOptions& options, size_t n_context = 0);

// JSON serialized like Python's json.dumps(ensure_ascii=False): ", " and ": " separators, key order kept.
std::string python_json_dumps(std::string_view json_text);

// ---- output parsing: reasoning / content / DSML tool calls (io-and-api.md §2.9) ------------------------

struct ParsedToolCall {
  std::string name;
  std::string arguments;  // JSON object text, as the official parser builds it
};

// Text produced by one push(): what to show (reasoning dimmed, content plain) and finished tool calls.
struct OutputDelta {
  std::string reasoning;
  std::string content;
  std::vector<ParsedToolCall> tool_calls;  // complete calls, when the block closes
  // Names of calls as soon as their invoke tag is complete (before the arguments), for clients that show a
  // call header early; index i is the i-th call of the block. Their arguments arrive in tool_calls.
  std::vector<std::string> tool_calls_started;
};

// Incremental parser of generated tokens. States: Reasoning (when the prompt ended in <think>) -> Content ->
// ToolCalls -> Done. Holds back only what could still become a marker (a prefix of </think> typed as text,
// of a tool-calls opener, trailing whitespace before an opener, incomplete UTF-8) and releases it as soon as
// it is disambiguated. Never drops text: a tool block that cannot be parsed is returned as content.
class OutputParser {
 public:
  enum class State { Reasoning, Content, ToolCalls, Done };
  OutputParser(const Tokenizer& tok, bool starts_in_reasoning);

  OutputDelta push(Token t);
  OutputDelta finish();  // generation stopped (EOS, length, interrupt): flush everything held back

  State state() const { return state_; }
  bool done() const { return state_ == State::Done; }  // EOS seen or the tool-calls block closed
  // Set when a tool-calls block was opened but not parseable (finish reason "error" in ds4); empty otherwise.
  const std::string& error() const { return error_; }
  // True inside a tool-calls block but outside a parameter value: tag names, attributes and the newlines
  // between tags. ds4 samples greedily there to keep the markup well-formed (io-and-api.md §3.7).
  bool in_markup() const;

 private:
  void feed_text(const std::string& s, OutputDelta& d);
  void drain(OutputDelta& d, bool final);
  void close_tool_block(OutputDelta& d, bool terminated);
  void announce_calls(OutputDelta& d);

  const Tokenizer* tok_;
  Token end_think_, eos_;
  State state_;
  TokenStream stream_;
  std::string held_;             // text not yet emitted in the current state
  std::string block_;            // tool-calls block text (after the opener)
  std::string opener_, closer_;  // as written, to hand back an unparseable block verbatim
  size_t announced_ = 0;         // invoke names already reported in tool_calls_started
  std::string error_;
};

// Parses the inside of a tool-calls block (everything after "<｜DSML｜tool_calls>", closer optional),
// tolerant of the §2.9 variants: "<DSML｜", doubled bars, plain <invoke>/<parameter>, typographic quotes,
// "toolcalls", missing string attribute (string), nested parameters (JSON object). Throws dsv4::Error naming
// the byte offset when no invoke can be parsed.
std::vector<ParsedToolCall> parse_tool_calls_block(std::string_view block);

// ---- sampling --------------------------------------------------------------------------------------------

// Defaults as ds4 and DeepSeek recommend: temperature 1, top_p 1, min_p 0.05 (relative to the top
// probability), top_k off. Filters apply to the temperature-scaled distribution in the order top-k, min-p,
// top-p. temperature <= 0 or top_k == 1 is greedy (lowest id among equal maxima).
struct SamplingParams {
  float temperature = 1.0f;
  int top_k = 0;
  float top_p = 1.0f;
  float min_p = 0.05f;
  uint64_t seed = 0;
};

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);
  // -inf and NaN logits are never chosen; if every logit is, throws dsv4::Error.
  Token sample(std::span<const float> logits);
  const SamplingParams& params() const { return params_; }

 private:
  double uniform();  // [0, 1)
  SamplingParams params_;
  uint64_t state_;
  std::vector<std::pair<float, Token>> cand_;
};

// Stop strings on streamed text: push() returns the text safe to show (a suffix that may begin a stop string
// is held back) and whether a stop string completed; the stop string itself is never returned.
class StopMatcher {
 public:
  explicit StopMatcher(std::vector<std::string> stops);
  struct Result {
    std::string text;
    bool stopped = false;
  };
  Result push(std::string_view text);
  std::string flush();  // end of generation: release what was held back

 private:
  std::vector<std::string> stops_;
  std::string held_;
  bool stopped_ = false;
};

}  // namespace dsv4
