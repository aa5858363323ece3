// A live chat over one engine Session, shared by `dsv4 run` one-shot and interactive modes.
//
// Each turn extends the KV state: the first turn evaluates BOS + [system] + user + transition, later turns
// only
// "<｜User｜>text<｜Assistant｜><think>|</think>" after what the model generated (its EOS included, or one we
// append when generation was cut short). This keeps the earlier reasoning in the KV, which the official
// encoder would drop from a re-rendered prompt; the price of not re-prefilling (same choice as ds4's CLI).
// Changes that alter the prefix (max effort on/off, /ctx, /load) rebuild the session from the transcript.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "dsv4/engine.h"
#include "dsv4/text.h"

namespace dsv4::app {

struct TurnStats {
  int64_t prompt_tokens = 0;  // tokens evaluated before generating
  double prefill_s = 0;
  int64_t gen_tokens = 0;
  double decode_s = 0;  // time of the generated tokens' evals (first token's sampling included)
  std::string finish;   // "stop" (EOS / end of tool block), "length", "context", "interrupted"
};

// Where the turn's text goes as it is generated.
struct TurnOutput {
  std::function<void(const std::string&)> reasoning;
  std::function<void(const std::string&)> content;
  std::function<void(const ParsedToolCall&)> tool_call;
  std::function<void(double fraction)> prefill_progress;  // called for long prompts only
};

struct ChatConfig {
  std::string system;
  ThinkingMode mode = ThinkingMode::Thinking;
  ReasoningEffort effort = ReasoningEffort::High;
  int64_t ctx = 32768;
  int max_new_tokens = 50000;
  SamplingParams sampling;
};

class ChatSession {
 public:
  ChatSession(Engine& engine, Tokenizer tokenizer, ChatConfig config);

  // Sends one user message and generates the reply. Stops at EOS, at the end of a tool-calls block, after
  // max_new_tokens, when the context is full, or when *interrupt becomes true (then returns promptly).
  TurnStats turn(const std::string& user_text, const TurnOutput& out, const std::atomic<bool>* interrupt);

  ChatConfig& config() { return cfg_; }
  const ChatConfig& config() const { return cfg_; }
  // The effort actually used (max needs ctx >= kMaxEffortMinContext, else it is downgraded to high).
  ReasoningEffort effective_effort() const;
  // Applies cfg changes that alter the rendered prefix or the context size: re-prefills the transcript.
  void rebuild();

  int64_t position() const { return session_ ? session_->position() : 0; }
  int64_t max_context() const { return cfg_.ctx; }
  size_t n_messages() const { return messages_.size(); }

  // Session state + transcript in two files: PATH (engine state stream) and PATH.json (messages, mode).
  void save(const std::string& path) const;
  void load(const std::string& path);

 private:
  Prompt render_new(size_t n_context) const;
  void prefill(const std::vector<Token>& toks, const TurnOutput& out, TurnStats& st);

  Engine& engine_;
  Tokenizer tok_;
  ChatConfig cfg_;
  std::unique_ptr<Session> session_;
  std::vector<ChatMessage> messages_;                        // transcript (system first when set)
  ReasoningEffort rendered_effort_ = ReasoningEffort::None;  // effort the live KV was rendered with
  bool open_turn_ = false;                                   // last generation ended without EOS in the KV
};

}  // namespace dsv4::app
