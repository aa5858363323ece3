// `dsv4 logits`: diagnostic with a stable interface (tests and reviewers use it). Writes little-endian f32
// logits, one row of n_vocab floats per input position. Default: one prefill of all tokens; --decode: one
// token at a time through a session; --chunks 7,13: prefill in chunks of those sizes, then the rest.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "command.h"
#include "common/error.h"
#include "dsv4/engine.h"
#include "file_io.h"

namespace {

struct LogitsArgs {
  std::string model, tokens, out, backend = "cpu", chunks;
  bool decode = false, no_qat = false;
  int threads = 0, batch = 0;
};

std::vector<int> parse_ints(const std::string& s, char sep, const char* what) {
  std::vector<int> v;
  std::string item;
  std::istringstream is(s);
  while (std::getline(is, item, sep)) {
    if (item.empty()) continue;
    size_t used = 0;
    long long x = 0;
    try {
      x = std::stoll(item, &used);
    } catch (...) {
      used = 0;
    }
    if (used != item.size() || x < 0 || x > 0x7fffffff) dsv4::fail("%s: '%s' is not a valid number", what, item.c_str());
    v.push_back(int(x));
  }
  return v;
}

int run_logits(const LogitsArgs& a) {
  // Token ids may be separated by spaces or commas.
  std::string ts = a.tokens;
  for (char& c : ts)
    if (c == ',' || c == '\t' || c == '\n') c = ' ';
  std::vector<dsv4::Token> toks;
  for (int t : parse_ints(ts, ' ', "--tokens")) toks.push_back(t);
  if (toks.empty()) dsv4::fail("--tokens: no token ids given");
  if (a.threads < 0) dsv4::fail("--threads: %d is negative (0 means all cores)", a.threads);
  // Refuse an output that cannot be written before spending minutes on the forward.
  if (std::filesystem::is_directory(a.out)) dsv4::fail("--out %s: is a directory", a.out.c_str());
  dsv4::EngineOptions eo;
  eo.model_path = a.model;
  eo.threads = a.threads;
  eo.pass_tokens = a.batch;
  eo.qat_sim = !a.no_qat;
  if (a.backend == "cpu") eo.backend = dsv4::BackendKind::Cpu;
  else if (a.backend == "cuda") eo.backend = dsv4::BackendKind::Cuda;
  else dsv4::fail("--backend: expected cpu or cuda, found '%s'", a.backend.c_str());
  const std::vector<int> chunks = parse_ints(a.chunks, ',', "--chunks");  // checked before the load
  auto engine = dsv4::Engine::load(eo);
  const uint64_t max_ctx = engine->info().context_length;
  if (max_ctx > 0 && toks.size() > max_ctx)
    dsv4::fail("--tokens: %zu tokens exceed the model's context length %llu (%s)", toks.size(),
               (unsigned long long)max_ctx, a.model.c_str());
  auto session = engine->new_session(int64_t(toks.size()));
  const size_t V = size_t(engine->info().n_vocab);
  // Rows are streamed to the (temporary) output as they come, so memory holds one eval's rows, not all of
  // them (positions x 129280 floats is 0.5 MB per token).
  dsv4::app::write_file_atomically(a.out, [&](std::ostream& f) {
    std::vector<float> rows;
    auto feed = [&](size_t begin, size_t n) {
      session->eval(std::span<const dsv4::Token>(toks.data() + begin, n), &rows);
      f.write(reinterpret_cast<const char*>(rows.data()), std::streamsize(rows.size() * sizeof(float)));
      if (!f) dsv4::fail("%s: write failed", a.out.c_str());
    };
    if (a.decode) {
      for (size_t i = 0; i < toks.size(); ++i) feed(i, 1);
    } else {
      size_t at = 0;
      for (int c : chunks) {
        if (c == 0 || at >= toks.size()) continue;
        size_t n = std::min(size_t(c), toks.size() - at);
        feed(at, n);
        at += n;
      }
      if (at < toks.size()) feed(at, toks.size() - at);
    }
  });
  std::fprintf(stderr, "dsv4 logits: %zu positions x %zu vocab -> %s\n", toks.size(), V, a.out.c_str());
  return 0;
}

DSV4_COMMAND("logits", "Write f32 logits (one row of n_vocab per input position) for a token sequence",
             [](CLI::App& sub) {
               auto a = std::make_shared<LogitsArgs>();
               sub.add_option("-m,--model", a->model, "GGUF model file")->required();
               sub.add_option("--tokens", a->tokens, "token ids, e.g. \"0 1 2\"")->required();
               sub.add_option("--out", a->out, "output file (little-endian f32)")->required();
               sub.add_flag("--decode", a->decode, "feed tokens one at a time through a session");
               sub.add_flag("--no-qat-sim", a->no_qat, "disable the FP8/FP4 QAT simulations");
               sub.add_option("--backend", a->backend, "cpu or cuda (default cpu)");
               sub.add_option("--chunks", a->chunks, "prefill chunk sizes, e.g. 7,13 (the rest follows)");
               sub.add_option("-t,--threads", a->threads, "CPU threads (0 = all cores)");
               sub.add_option("-b,--batch-size", a->batch, "tokens per forward pass of a prompt (default: 256 on the CPU, 2048 on CUDA; results do not depend on it)");
               return [a]() { return run_logits(*a); };
             });

}  // namespace
