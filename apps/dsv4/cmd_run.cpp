// `dsv4 run` (also what `dsv4` with no subcommand does): one-shot prompt or interactive multi-turn chat.
// Flags follow ds4's CLI (io-and-api.md §3.1) where they exist.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>

#include "chat_repl.h"
#include "chat_session.h"
#include "command.h"
#include "common/error.h"
#include "file_io.h"

namespace {

using namespace dsv4;

struct RunArgs {
  std::string model = "./ds4flash.gguf";
  std::string prompt, prompt_file, system = "You are a helpful assistant";
  int n_predict = 50000;
  int64_t ctx = 32768;
  bool think = false, think_max = false, nothink = false;
  float temp = 1.0f, top_p = 1.0f, min_p = 0.05f;
  int top_k = 0;
  int64_t seed = -1;
  std::string backend = "auto";
  int threads = 0, batch = 0;
  bool no_color = false;
  bool have_prompt = false;  // -p given (an explicit empty prompt is an error, not interactive mode)
};

void print_missing_model(const std::string& path) {
  std::fprintf(
      stderr,
      "dsv4: model file '%s' not found.\n"
      "\n"
      "The DeepSeek V4 Flash GGUFs dsv4 runs are the same files as ds4's, published on Hugging Face at\n"
      "  https://huggingface.co/antirez/deepseek-v4-gguf\n"
      "Download one (the q2 file is about 81 GB) and pass it with -m FILE, or save it as ./ds4flash.gguf.\n"
      "\n"
      "To try dsv4 without a download, run the built-in demo:\n"
      "  make run                 (or: scripts/make-run.sh build/release)\n"
      "which writes a tiny DeepSeek-V4-architecture model with the real tokenizer and random weights\n"
      "(dsv4 synth --shape tiny --out build/dsv4-tiny.gguf) and chats with it: its replies are noise.\n",
      path.c_str());
}

// Flags that are wrong whatever the model: checked before the (possibly minutes long) load.
void check_flags(const RunArgs& a) {
  if (a.n_predict < 1) fail("-n/--tokens: %d new tokens per reply; need at least 1", a.n_predict);
  if (a.ctx < 1) fail("-c/--ctx: %lld tokens; need at least 1", (long long)a.ctx);
  if (a.threads < 0) fail("-t/--threads: %d is negative (0 means all cores)", a.threads);
  if (a.have_prompt && a.prompt.empty()) fail("-p/--prompt: the prompt is empty");
  if (a.have_prompt && !a.prompt_file.empty()) fail("-p/--prompt and --prompt-file: give only one");
}

int run_main(const RunArgs& a) {
  check_flags(a);
  if (!std::filesystem::exists(a.model)) {
    print_missing_model(a.model);
    return 1;
  }
  // Read the prompt before loading: a missing or empty file should not cost a model load first.
  std::string prompt = a.have_prompt ? a.prompt : std::string();
  if (!a.prompt_file.empty()) {
    prompt = app::read_whole_file(a.prompt_file, "--prompt-file");
    if (prompt.empty()) fail("--prompt-file '%s': the file is empty", a.prompt_file.c_str());
  }
  app::TermStyle style;
  style.color = !a.no_color && isatty(STDOUT_FILENO) && isatty(STDERR_FILENO);

  EngineOptions eo;
  eo.model_path = a.model;
  eo.backend = a.backend == "cpu"    ? BackendKind::Cpu
               : a.backend == "cuda" ? BackendKind::Cuda
                                     : BackendKind::Auto;
  eo.threads = a.threads;
  eo.pass_tokens = a.batch;
  bool tty_err = isatty(STDERR_FILENO);
  eo.progress = [tty_err](double f, const std::string& what) {
    if (!tty_err) return;  // a bar only makes sense on a terminal; the summary line below is always printed
    int w = 30, n = int(f * w);
    std::fprintf(stderr, "\rload [%s%s] %3d%% %s\033[K", std::string(n, '#').c_str(),
                 std::string(w - n, ' ').c_str(), int(f * 100), what.c_str());
    if (f >= 1.0) std::fputs("\r\033[K", stderr);
  };
  auto t0 = std::chrono::steady_clock::now();
  auto engine = Engine::load(eo);
  Tokenizer tok = Tokenizer::from_gguf(a.model);
  const ModelInfo& info = engine->info();
  double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::fprintf(stderr,
               "model %s: %d layers, d_model %d, vocab %d, %.2f GB weights, backend %s, loaded in %.1f s\n",
               info.name.c_str(), info.n_layers, info.d_model, info.n_vocab, double(info.weight_bytes) / 1e9,
               info.backend.c_str(), load_s);
  // The session would accept a larger ctx (its storage grows lazily), but positions past the trained
  // context length are outside what the model (and its YaRN scaling) was built for.
  if (info.context_length > 0 && uint64_t(a.ctx) > info.context_length)
    fail("-c/--ctx: %lld tokens exceeds the model's context length %llu (%s)", (long long)a.ctx,
         (unsigned long long)info.context_length, a.model.c_str());
  if (tok.n_vocab() != info.n_vocab)
    fail("%s: tokenizer has %d tokens but the model has %d vocabulary rows", a.model.c_str(), tok.n_vocab(),
         info.n_vocab);

  app::ChatConfig cfg;
  cfg.system = a.system;
  cfg.ctx = a.ctx;
  cfg.max_new_tokens = a.n_predict;
  cfg.mode = a.nothink ? ThinkingMode::Chat : ThinkingMode::Thinking;
  cfg.effort = a.think_max ? ReasoningEffort::Max : ReasoningEffort::High;
  cfg.sampling.temperature = a.temp;
  cfg.sampling.top_p = a.top_p;
  cfg.sampling.min_p = a.min_p;
  cfg.sampling.top_k = a.top_k;
  cfg.sampling.seed =
      a.seed >= 0 ? uint64_t(a.seed) : uint64_t(std::chrono::system_clock::now().time_since_epoch().count());
  Sampler check(cfg.sampling);  // validates the sampling flags before any work
  if (a.think_max && a.ctx < kMaxEffortMinContext)
    std::fprintf(stderr, "note: --think-max needs --ctx >= %lld; using high effort\n",
                 (long long)kMaxEffortMinContext);

  app::ChatSession chat(*engine, tok, cfg);
  app::install_sigint_handler();
  if (!prompt.empty()) return app::print_turn(chat, prompt, style) ? 0 : 1;
  return app::run_repl(chat, style);
}

DSV4_COMMAND(
    "run", "Chat with a model: one-shot (-p) or interactive (default when no subcommand is given)",
    [](CLI::App& sub) {
      auto a = std::make_shared<RunArgs>();
      sub.add_option("-m,--model", a->model, "GGUF model file")->capture_default_str();
      auto* p = sub.add_option("-p,--prompt", a->prompt, "one-shot prompt (prints the reply and exits)");
      sub.add_option("--prompt-file", a->prompt_file, "one-shot prompt read from a file");
      sub.add_option("-s,--system", a->system, "system prompt ('' for none)")->capture_default_str();
      sub.add_option("-n,--tokens", a->n_predict, "max new tokens per reply")->capture_default_str();
      sub.add_option("-c,--ctx", a->ctx, "context size in tokens")->capture_default_str();
      sub.add_flag("--think", a->think, "thinking mode, high effort (default)");
      sub.add_flag("--think-max", a->think_max, "thinking mode, max effort (needs --ctx >= 393216)");
      sub.add_flag("--nothink", a->nothink, "no thinking: answer directly");
      sub.add_option("--temp", a->temp, "temperature (0 = greedy)")->capture_default_str();
      sub.add_option("--top-p", a->top_p, "nucleus sampling mass")->capture_default_str();
      sub.add_option("--top-k", a->top_k, "keep the k most likely tokens (0 = off)")->capture_default_str();
      sub.add_option("--min-p", a->min_p, "drop tokens below min_p x the top probability")
          ->capture_default_str();
      sub.add_option("--seed", a->seed, "sampling seed (default: from the clock)");
      sub.add_option("--backend", a->backend, "cpu, cuda or auto")
          ->check(CLI::IsMember({"cpu", "cuda", "auto"}))
          ->capture_default_str();
      sub.add_option("-t,--threads", a->threads, "CPU threads (0 = all cores)");
      sub.add_option("-b,--batch-size", a->batch, "tokens per forward pass of a prompt (default: 256 on the CPU, 2048 on CUDA; results do not depend on it)");
      sub.add_flag("--no-color", a->no_color, "no ANSI styling");
      return [a, p]() {
        a->have_prompt = p->count() > 0;
        return run_main(*a);
      };
    });

}  // namespace
