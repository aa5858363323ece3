// ChatSession: rendering, prefill and generation for `dsv4 run` (see chat_session.h for the KV policy).
#include "chat_session.h"

#include <chrono>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "common/error.h"
#include "file_io.h"

namespace dsv4::app {

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Prompts longer than this are evaluated in chunks so a progress bar can move (chunked prefill gives the same
// state as one call: docs/roadmap.md determinism rule).
constexpr size_t kPrefillChunk = 256;

}  // namespace

ChatSession::ChatSession(Engine& engine, Tokenizer tokenizer, ChatConfig config)
    : engine_(engine), tok_(std::move(tokenizer)), cfg_(std::move(config)) {
  if (!cfg_.system.empty()) {
    ChatMessage sys;
    sys.role = "system";
    sys.content = cfg_.system;
    messages_.push_back(sys);
  }
}

ReasoningEffort ChatSession::effective_effort() const {
  if (cfg_.effort == ReasoningEffort::Max && cfg_.ctx < kMaxEffortMinContext) return ReasoningEffort::High;
  return cfg_.effort;
}

Prompt ChatSession::render_new(size_t n_context) const {
  ChatOptions o;
  o.mode = cfg_.mode;
  o.effort = effective_effort();
  return render_chat(messages_, o, n_context);
}

void ChatSession::prefill(const std::vector<Token>& toks, const TurnOutput& out, TurnStats& st) {
  if (session_->position() + int64_t(toks.size()) >= cfg_.ctx)
    fail("context full: %lld tokens used + %zu to add >= --ctx %lld (start over, or raise it with /ctx N)",
         (long long)session_->position(), toks.size(), (long long)cfg_.ctx);
  auto t0 = Clock::now();
  // Chunks no smaller than the engine's pass size: a smaller chunk would cap the pass (and the GPU's prefill speed).
  const size_t chunk = std::max(kPrefillChunk, size_t(std::max(1, engine_.info().pass_tokens)));
  bool show = toks.size() > chunk && out.prefill_progress;
  for (size_t i = 0; i < toks.size(); i += chunk) {
    size_t n = std::min(chunk, toks.size() - i);
    session_->eval(std::span<const Token>(toks.data() + i, n));
    if (show) out.prefill_progress(double(i + n) / double(toks.size()));
  }
  st.prompt_tokens += int64_t(toks.size());
  st.prefill_s += seconds_since(t0);
}

void ChatSession::rebuild() {
  const ModelInfo& info = engine_.info();
  if (info.context_length > 0 && uint64_t(cfg_.ctx) > info.context_length)
    fail("context size %lld exceeds the model's context length %llu", (long long)cfg_.ctx,
         (unsigned long long)info.context_length);
  // On failure (the transcript no longer fits, allocation) the previous live session is put back, so the
  // chat goes on exactly as before instead of continuing from a half-built state without its BOS.
  std::unique_ptr<Session> old = std::move(session_);
  const bool old_open = open_turn_;
  const ReasoningEffort old_effort = rendered_effort_;
  try {
    session_ = engine_.new_session(cfg_.ctx);
    open_turn_ = false;
    rendered_effort_ = cfg_.mode == ThinkingMode::Thinking ? effective_effort() : ReasoningEffort::None;
    if (messages_.empty() || (messages_.size() == 1 && messages_[0].role == "system")) {
      session_.reset();  // nothing to evaluate yet: the first turn renders from BOS
      return;
    }
    // The transcript ends with an assistant message: rendered with its EOS, ready for the next user turn.
    std::vector<Token> toks = tok_.encode(render_new(0));
    TurnStats ignored;
    prefill(toks, TurnOutput{}, ignored);
  } catch (...) {
    session_ = std::move(old);
    open_turn_ = old_open;
    rendered_effort_ = old_effort;
    throw;
  }
}

TurnStats ChatSession::turn(const std::string& user_text, const TurnOutput& out,
                            const std::atomic<bool>* interrupt) {
  TurnStats st;
  // A different max-effort prefix means a different prefix: re-prefill the transcript first.
  ReasoningEffort want = cfg_.mode == ThinkingMode::Thinking ? effective_effort() : ReasoningEffort::None;
  if (session_ && (want == ReasoningEffort::Max) != (rendered_effort_ == ReasoningEffort::Max)) rebuild();

  ChatMessage user;
  user.role = "user";
  user.content = user_text;
  messages_.push_back(user);
  std::vector<Token> toks;
  try {
    if (!session_) {
      session_ = engine_.new_session(cfg_.ctx);
      rendered_effort_ = want;
      toks = tok_.encode(render_new(0));
    } else {
      if (open_turn_) toks.push_back(tok_.eos());  // close the previous assistant turn in the KV
      auto more = tok_.encode(render_new(messages_.size() - 1));
      toks.insert(toks.end(), more.begin(), more.end());
    }
    prefill(toks, out, st);
  } catch (...) {
    messages_.pop_back();
    if (session_ && session_->position() == 0) session_.reset();  // the next turn must start from BOS again
    throw;
  }
  open_turn_ = false;

  // Each turn gets its own stream derived from the seed and the position, so replays are reproducible.
  SamplingParams sp = cfg_.sampling;
  sp.seed = cfg_.sampling.seed * 1000003u + uint64_t(session_->position());
  Sampler sampler(sp);
  OutputParser parser(tok_, cfg_.mode == ThinkingMode::Thinking);
  ChatMessage reply;
  reply.role = "assistant";
  auto emit = [&](const OutputDelta& d) {
    reply.reasoning += d.reasoning;
    reply.content += d.content;
    if (!d.reasoning.empty() && out.reasoning) out.reasoning(d.reasoning);
    if (!d.content.empty() && out.content) out.content(d.content);
    for (const auto& c : d.tool_calls) {
      reply.tool_calls.push_back(
          {"call_" + std::to_string(messages_.size()) + "_" + std::to_string(reply.tool_calls.size()), c.name,
           c.arguments});
      if (out.tool_call) out.tool_call(c);
    }
  };

  auto t0 = Clock::now();
  st.finish = "length";
  for (int i = 0; i < cfg_.max_new_tokens; ++i) {
    if (interrupt && interrupt->load()) {
      st.finish = "interrupted";
      break;
    }
    // Greedy inside DSML tags and attributes (keeps the markup well-formed: ds4's rule) and at temperature 0 /
    // top-k 1: Session::argmax (the Sampler's temperature-0 rule) reduces the logits where they are, so a GPU
    // session moves one id per token instead of n_vocab floats.
    const bool pick_greedy = parser.in_markup() || sp.temperature <= 0.0f || sp.top_k == 1;
    Token t = pick_greedy ? session_->argmax() : sampler.sample(session_->logits());
    if (t == tok_.eos()) {  // not evaluated now: the next turn starts with it (open_turn_)
      emit(parser.push(t));
      st.finish = "stop";
      break;
    }
    if (session_->position() + 1 >= cfg_.ctx) {
      st.finish = "context";
      break;
    }
    session_->eval(std::span<const Token>(&t, 1));
    ++st.gen_tokens;
    emit(parser.push(t));
    if (parser.done()) {
      st.finish = "stop";
      break;
    }
  }
  emit(parser.finish());
  st.decode_s = seconds_since(t0);
  open_turn_ = true;
  messages_.push_back(reply);
  return st;
}

void ChatSession::save(const std::string& path) const {
  if (!session_) fail("nothing to save yet: the conversation is empty");
  nlohmann::json j;
  j["ctx"] = cfg_.ctx;
  j["thinking"] = cfg_.mode == ThinkingMode::Thinking;
  j["effort"] = int(rendered_effort_);
  j["open_turn"] = open_turn_;
  for (const auto& m : messages_) {
    nlohmann::json jm = {{"role", m.role}, {"content", m.content}, {"reasoning", m.reasoning}};
    for (const auto& c : m.tool_calls)
      jm["tool_calls"].push_back({{"id", c.id}, {"name", c.name}, {"arguments", c.arguments}});
    j["messages"].push_back(jm);
  }
  // Model text may hold invalid UTF-8 (a reply cut mid-character); replace it rather than fail the save.
  std::string text = j.dump(1, ' ', false, nlohmann::json::error_handler_t::replace);
  // Both files are written in full to temporaries before either replaces an earlier save of the same name,
  // so a failed save (disk full, bad directory) leaves the previous pair intact.
  std::string state_tmp = write_temp(path, [&](std::ostream& f) { session_->save(f); });
  std::string json_tmp;
  try {
    json_tmp = write_temp(path + ".json", [&](std::ostream& f) { f << text; });
  } catch (...) {
    std::remove(state_tmp.c_str());
    throw;
  }
  commit_temp(json_tmp, path + ".json");
  commit_temp(state_tmp, path);
}

void ChatSession::load(const std::string& path) {
  std::string text = read_whole_file(path + ".json", "session transcript");
  std::vector<ChatMessage> msgs;
  int64_t ctx = 0;
  bool thinking = true, open_turn = true;
  int effort = 0;
  // Every field is read (and type-checked) before anything changes, so a bad file leaves the chat as it was.
  try {
    nlohmann::json j = nlohmann::json::parse(text);
    for (const auto& jm : j.at("messages")) {
      ChatMessage m;
      m.role = jm.at("role");
      m.content = jm.at("content");
      m.reasoning = jm.value("reasoning", "");
      if (jm.contains("tool_calls"))
        for (const auto& c : jm["tool_calls"])
          m.tool_calls.push_back({c.at("id"), c.at("name"), c.at("arguments")});
      msgs.push_back(m);
    }
    ctx = j.value("ctx", cfg_.ctx);
    thinking = j.value("thinking", true);
    effort = j.value("effort", 0);
    open_turn = j.value("open_turn", true);
  } catch (const nlohmann::json::exception& e) {
    fail("%s.json: %s", path.c_str(), e.what());
  }
  if (ctx < 1) fail("%s.json: field 'ctx' is %lld; need at least 1", path.c_str(), (long long)ctx);
  if (effort < int(ReasoningEffort::None) || effort > int(ReasoningEffort::Max))
    fail("%s.json: field 'effort' is %d, not a known reasoning effort", path.c_str(), effort);
  require_input_file(path, "session state");
  std::ifstream sf(path, std::ios::binary);
  if (!sf) fail("cannot open '%s'", path.c_str());
  auto s = engine_.new_session(ctx);
  try {
    s->restore(sf);
  } catch (const Error& e) {
    fail("%s: %s", path.c_str(), e.what());  // the stream's own message lacks the file name
  }
  session_ = std::move(s);
  messages_ = std::move(msgs);
  cfg_.ctx = session_->max_context();
  cfg_.mode = thinking ? ThinkingMode::Thinking : ThinkingMode::Chat;
  rendered_effort_ = ReasoningEffort(effort);
  open_turn_ = open_turn;
}

}  // namespace dsv4::app
