// Interactive chat for `dsv4 run`: readline (when built with it) or plain stdin lines, /commands, Ctrl+C.
#include "chat_repl.h"

#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>

#include "common/error.h"
#include "file_io.h"

#ifdef DSV4_HAVE_READLINE
#include <readline/history.h>
#include <readline/readline.h>
#endif

namespace dsv4::app {

namespace {

std::atomic<bool> g_interrupt{false};
std::atomic<bool> g_generating{false};
std::atomic<bool> g_at_prompt{false};

void on_sigint(int) {
  if (g_generating.load()) {
    g_interrupt.store(true);
    return;
  }
#ifdef DSV4_HAVE_READLINE
  if (g_at_prompt.load()) {
    // Abandon the line being typed and show a fresh prompt (what shells do on Ctrl+C).
    ssize_t ignored = write(STDOUT_FILENO, "\n", 1);
    (void)ignored;
    rl_on_new_line();
    rl_replace_line("", 0);
    rl_redisplay();
    return;
  }
#endif
  signal(SIGINT, SIG_DFL);  // not generating and no line editor: behave like an ordinary program
  raise(SIGINT);
}

const char* kHelp =
    "commands:\n"
    "  /help          this text\n"
    "  /think         thinking on (reasoning effort high)\n"
    "  /think-max     thinking at max effort (needs --ctx >= 393216, else high)\n"
    "  /nothink       thinking off: the model answers directly\n"
    "  /ctx N         set the context size (re-evaluates the conversation)\n"
    "  /read FILE     send the contents of FILE as your message\n"
    "  /save NAME     save the session (KV state + transcript) under NAME\n"
    "  /load NAME     load a saved session\n"
    "  /quit, /exit   leave (Ctrl+D too)\n"
    "Ctrl+C stops the reply being generated and returns to the prompt.\n";

std::string mode_name(const ChatSession& chat) {
  if (chat.config().mode == ThinkingMode::Chat) return "nothink";
  return chat.effective_effort() == ReasoningEffort::Max ? "think-max" : "think";
}

// NAME -> file: a path when it has a '/', else ~/.dsv4/sessions/NAME.
std::string session_path(const std::string& name) {
  if (name.find('/') != std::string::npos) return name;
  const char* home = std::getenv("HOME");
  std::filesystem::path dir = std::filesystem::path(home ? home : ".") / ".dsv4" / "sessions";
  std::filesystem::create_directories(dir);
  return (dir / name).string();
}

bool read_line(const std::string& prompt, std::string& line) {
#ifdef DSV4_HAVE_READLINE
  if (isatty(STDIN_FILENO)) {
    g_at_prompt = true;
    char* s = readline(prompt.c_str());
    g_at_prompt = false;
    if (!s) return false;
    line = s;
    std::free(s);
    if (!line.empty()) add_history(line.c_str());
    return true;
  }
#endif
  std::fputs(prompt.c_str(), stdout);
  std::fflush(stdout);
  return bool(std::getline(std::cin, line));
}

std::string trim(const std::string& s) {
  size_t b = s.find_first_not_of(" \t\r\n"), e = s.find_last_not_of(" \t\r\n");
  return b == std::string::npos ? "" : s.substr(b, e - b + 1);
}

// Handles a /command; returns false to quit.
bool command(ChatSession& chat, const std::string& line, const TermStyle& style) {
  std::istringstream in(line);
  std::string cmd, arg;
  in >> cmd;
  std::getline(in, arg);
  arg = trim(arg);
  auto& cfg = chat.config();
  if (cmd == "/quit" || cmd == "/exit") return false;
  if (cmd == "/help") {
    std::fputs(kHelp, stdout);
  } else if (cmd == "/think") {
    cfg.mode = ThinkingMode::Thinking;
    cfg.effort = ReasoningEffort::High;
  } else if (cmd == "/think-max") {
    cfg.mode = ThinkingMode::Thinking;
    cfg.effort = ReasoningEffort::Max;
    if (chat.effective_effort() != ReasoningEffort::Max)
      std::printf("max effort needs /ctx %lld or more; using high\n", (long long)kMaxEffortMinContext);
  } else if (cmd == "/nothink") {
    cfg.mode = ThinkingMode::Chat;
  } else if (cmd == "/ctx") {
    char* end = nullptr;
    long long n = std::strtoll(arg.c_str(), &end, 10);
    if (arg.empty() || *end || n < 64) {
      std::printf("usage: /ctx N (N >= 64); now %lld\n", (long long)cfg.ctx);
      return true;
    }
    const int64_t old_ctx = cfg.ctx;
    cfg.ctx = n;
    try {
      chat.rebuild();
    } catch (...) {
      cfg.ctx = old_ctx;  // rebuild() kept the old session; keep the setting that matches it
      throw;
    }
  } else if (cmd == "/read") {
    std::string text = read_whole_file(arg, "/read");
    if (text.empty()) fail("/read '%s': the file is empty", arg.c_str());
    print_turn(chat, text, style);
    return true;
  } else if (cmd == "/save" || cmd == "/load") {
    if (arg.empty()) {
      std::printf("usage: %s NAME\n", cmd.c_str());
      return true;
    }
    std::string path = session_path(arg);
    if (cmd == "/save")
      chat.save(path);
    else
      chat.load(path);
    std::printf("%s %s (%lld tokens)\n", cmd == "/save" ? "saved" : "loaded", path.c_str(),
                (long long)chat.position());
    return true;
  } else {
    std::printf("unknown command %s (try /help)\n", cmd.c_str());
    return true;
  }
  std::printf("[%s, ctx %lld]\n", mode_name(chat).c_str(), (long long)cfg.ctx);
  return true;
}

}  // namespace

std::atomic<bool>& interrupt_flag() {
  return g_interrupt;
}

void install_sigint_handler() {
#ifdef DSV4_HAVE_READLINE
  rl_catch_signals = 0;  // our handler decides what Ctrl+C means (see on_sigint)
#endif
  struct sigaction sa {};
  sa.sa_handler = on_sigint;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGINT, &sa, nullptr);
}

bool print_turn(ChatSession& chat, const std::string& user_text, const TermStyle& style) {
  const char* dim = style.color ? "\033[2m" : "";
  const char* reset = style.color ? "\033[0m" : "";
  bool in_reasoning = false, wrote = false;
  TurnOutput out;
  out.reasoning = [&](const std::string& s) {
    if (!in_reasoning) std::fputs(dim, stdout);
    in_reasoning = wrote = true;
    std::fputs(s.c_str(), stdout);
    std::fflush(stdout);
  };
  auto end_reasoning = [&](const char* sep) {
    if (in_reasoning) std::printf("%s%s", reset, sep);
    in_reasoning = false;
  };
  out.content = [&](const std::string& s) {
    end_reasoning("\n\n");
    wrote = true;
    std::fputs(s.c_str(), stdout);
    std::fflush(stdout);
  };
  out.tool_call = [&](const ParsedToolCall& c) {
    end_reasoning("\n");
    std::printf("\n[tool call] %s %s\n", c.name.c_str(), c.arguments.c_str());
  };
  out.prefill_progress = [&](double f) {
    int w = 30, n = int(f * w);
    std::fprintf(stderr, "\rprefill [%s%s] %3d%%", std::string(n, '#').c_str(),
                 std::string(w - n, ' ').c_str(), int(f * 100));
    if (f >= 1.0) std::fputs("\r\033[K", stderr);
  };
  g_interrupt = false;
  g_generating = true;
  TurnStats st;
  try {
    st = chat.turn(user_text, out, &g_interrupt);
  } catch (const std::exception& e) {  // dsv4::Error, and also bad_alloc & co.: the chat must survive them
    g_generating = false;
    end_reasoning("\n");
    std::fprintf(stderr, "dsv4: error: %s\n", e.what());
    return false;
  }
  g_generating = false;
  bool was_reasoning = in_reasoning;
  end_reasoning("\n");
  if (wrote && !was_reasoning) std::fputs("\n", stdout);
  if (st.finish == "interrupted") std::printf("%s[interrupted]%s\n", dim, reset);
  std::fflush(stdout);
  double pf = st.prefill_s > 0 ? double(st.prompt_tokens) / st.prefill_s : 0;
  double dc = st.decode_s > 0 ? double(st.gen_tokens) / st.decode_s : 0;
  std::fprintf(
      stderr,
      "%s[prompt %lld tok, prefill %.1f t/s | gen %lld tok, decode %.1f t/s | ctx %lld/%lld | %s | %s]%s\n",
      dim, (long long)st.prompt_tokens, pf, (long long)st.gen_tokens, dc, (long long)chat.position(),
      (long long)chat.max_context(), mode_name(chat).c_str(), st.finish.c_str(), reset);
  return true;
}

int run_repl(ChatSession& chat, const TermStyle& style) {
  std::printf("dsv4 chat [%s, ctx %lld] — /help for commands, Ctrl+D to leave\n", mode_name(chat).c_str(),
              (long long)chat.max_context());
  std::string line;
  while (read_line("> ", line)) {
    line = trim(line);
    if (line.empty()) continue;
    try {
      if (line[0] == '/') {
        if (!command(chat, line, style)) break;
        continue;
      }
    } catch (const std::exception& e) {  // also filesystem_error from /save's directory, bad_alloc from /ctx
      std::fprintf(stderr, "dsv4: error: %s\n", e.what());
      continue;
    }
    print_turn(chat, line, style);
  }
  std::fputs("\n", stdout);
  return 0;
}

}  // namespace dsv4::app
