// `dsv4 bench`: prefill and decode speed as the context grows (ds4-bench style), through the public API only.
//
// Loads the model once, builds one fixed token sequence (a prompt file tokenized and repeated, or seeded
// synthetic tokens), and walks it to a series of context frontiers: ctx-start, then + step-incr or x step-mul,
// up to ctx-max. For each frontier it measures
//   prefill t/s  — eval() of the tokens between the previous frontier and this one (one call: incremental
//                  prefill over the cache built so far), and
//   decode t/s   — gen-tokens greedy single-token evals from a clone of the session at the frontier (the clone
//                  keeps the walk itself undisturbed; cloning is not timed),
// plus the size of the session's serialized state (KV rows, compressed rows, indexer rows, compressor buffers:
// what save() writes), reported as kv_bytes. Output: a table, optional CSV and an SVG plot of both curves.
#include <algorithm>
#include <chrono>
#include <filesystem>
#include <cmath>
#include <cstdio>
#include <memory>
#include <ostream>
#include <streambuf>
#include <string>
#include <vector>

#include "command.h"
#include "file_io.h"
#include "common/error.h"
#include "dsv4/engine.h"
#include "dsv4/text.h"

namespace {

struct BenchArgs {
  std::string model, backend = "auto", prompt_file, csv, svg;
  int64_t ctx_start = 512, ctx_max = 8192, step_incr = 0;
  double step_mul = 2.0;
  int gen_tokens = 32, threads = 0, batch = 0;
  uint64_t seed = 1;
  bool no_qat = false;
};

struct Row {
  int64_t ctx = 0, prefill_tokens = 0;
  double prefill_s = 0, decode_s = 0;
  int gen_tokens = 0;
  uint64_t kv_bytes = 0;
  double prefill_tps() const { return prefill_s > 0 ? double(prefill_tokens) / prefill_s : 0; }
  double decode_tps() const { return decode_s > 0 ? double(gen_tokens) / decode_s : 0; }
};

// Counts the bytes written through it (Session::save into nowhere).
class CountingBuf : public std::streambuf {
 public:
  uint64_t n = 0;

 protected:
  int_type overflow(int_type c) override {
    if (c != traits_type::eof()) ++n;
    return traits_type::not_eof(c);
  }
  std::streamsize xsputn(const char*, std::streamsize k) override {
    n += uint64_t(k);
    return k;
  }
};

uint64_t state_bytes(const dsv4::Session& s) {
  CountingBuf buf;
  std::ostream os(&buf);
  s.save(os);
  return buf.n;
}

std::vector<int64_t> frontiers(const BenchArgs& a) {
  if (a.ctx_start < 1 || a.ctx_max < a.ctx_start)
    dsv4::fail("bench: need 1 <= --ctx-start <= --ctx-max (got %lld, %lld)", (long long)a.ctx_start,
               (long long)a.ctx_max);
  if (a.ctx_max > (int64_t(1) << 31))  // far past any V4 context (1M); bounds the frontier list
    dsv4::fail("bench: --ctx-max %lld is out of range (at most 2^31)", (long long)a.ctx_max);
  if (a.step_incr < 0 || (a.step_incr == 0 && !(a.step_mul > 1.0)))
    dsv4::fail("bench: --step-incr must be > 0 or --step-mul > 1");
  std::vector<int64_t> f;
  for (int64_t c = a.ctx_start; c <= a.ctx_max;) {
    f.push_back(c);
    const int64_t next = a.step_incr > 0 ? c + a.step_incr : int64_t(std::ceil(double(c) * a.step_mul));
    c = std::max(next, c + 1);
  }
  return f;
}

std::vector<dsv4::Token> bench_tokens(const BenchArgs& a, int64_t n, int n_vocab) {
  std::vector<dsv4::Token> toks;
  if (!a.prompt_file.empty()) {
    const std::string prompt = dsv4::app::read_whole_file(a.prompt_file, "--prompt-file");
    dsv4::Tokenizer tok = [&] {
      try {
        return dsv4::Tokenizer::from_gguf(a.model);
      } catch (const dsv4::Error&) {
        return dsv4::Tokenizer::builtin();  // a synthetic GGUF may carry no tokenizer
      }
    }();
    const std::vector<dsv4::Token> text = tok.encode(prompt);
    if (text.empty()) dsv4::fail("%s: prompt file gives no tokens", a.prompt_file.c_str());
    while (int64_t(toks.size()) < n) toks.insert(toks.end(), text.begin(), text.end());
    for (dsv4::Token t : toks)
      if (t >= n_vocab) dsv4::fail("%s: token %d is outside the model's vocabulary (%d)", a.prompt_file.c_str(), t, n_vocab);
  } else {
    // Seeded xorshift over ordinary text ids (skip the first 100: BOS/EOS and friends live there).
    uint64_t x = a.seed * 0x9E3779B97F4A7C15ull + 1;
    const int span = std::max(1, n_vocab - 1000);
    while (int64_t(toks.size()) < n) {
      x ^= x << 13, x ^= x >> 7, x ^= x << 17;
      toks.push_back(dsv4::Token(100 + int(x % uint64_t(span))));
    }
  }
  toks.resize(size_t(n));
  return toks;
}


double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Two stacked panels (prefill t/s, decode t/s) over context, each with its own y scale; hand-written SVG.
void write_svg(std::ostream& f, const std::vector<Row>& rows, const std::string& title) {
  const double W = 820, H = 640, left = 80, right = 30, top = 50, panel_h = 230, gap = 70;
  const double x_max = double(rows.back().ctx);
  auto px = [&](double ctx) { return left + (W - left - right) * ctx / x_max; };
  f << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H
    << "\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    << "<text x=\"" << W / 2 << "\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">" << title << "</text>\n";
  struct Panel {
    const char* name;
    const char* color;
    double (Row::*value)() const;
  };
  const Panel panels[2] = {{"prefill tokens/s", "#1f77b4", &Row::prefill_tps},
                           {"decode tokens/s", "#d62728", &Row::decode_tps}};
  for (int k = 0; k < 2; ++k) {
    const double y0 = top + k * (panel_h + gap), y1 = y0 + panel_h;
    double y_max = 0;
    for (const Row& r : rows) y_max = std::max(y_max, (r.*panels[k].value)());
    y_max = y_max > 0 ? y_max * 1.1 : 1.0;
    auto py = [&](double v) { return y1 - panel_h * v / y_max; };
    f << "<rect x=\"" << left << "\" y=\"" << y0 << "\" width=\"" << W - left - right << "\" height=\"" << panel_h
      << "\" fill=\"none\" stroke=\"#888\"/>\n";
    for (int t = 0; t <= 4; ++t) {
      const double v = y_max * t / 4;
      f << "<text x=\"" << left - 6 << "\" y=\"" << py(v) + 4 << "\" text-anchor=\"end\">" << int(v + 0.5)
        << "</text>\n<line x1=\"" << left << "\" x2=\"" << W - right << "\" y1=\"" << py(v) << "\" y2=\"" << py(v)
        << "\" stroke=\"#eee\"/>\n";
    }
    f << "<text x=\"" << left + 8 << "\" y=\"" << y0 + 16 << "\" fill=\"" << panels[k].color << "\">"
      << panels[k].name << "</text>\n<polyline fill=\"none\" stroke=\"" << panels[k].color
      << "\" stroke-width=\"2\" points=\"";
    for (const Row& r : rows) f << px(double(r.ctx)) << "," << py((r.*panels[k].value)()) << " ";
    f << "\"/>\n";
    for (const Row& r : rows)
      f << "<circle cx=\"" << px(double(r.ctx)) << "\" cy=\"" << py((r.*panels[k].value)()) << "\" r=\"3\" fill=\""
        << panels[k].color << "\"/>\n";
    for (const Row& r : rows)
      f << "<text x=\"" << px(double(r.ctx)) << "\" y=\"" << y1 + 16 << "\" text-anchor=\"middle\" font-size=\"10\">"
        << r.ctx << "</text>\n";
  }
  f << "<text x=\"" << W / 2 << "\" y=\"" << H - 8 << "\" text-anchor=\"middle\">context (tokens)</text>\n</svg>\n";
}

void write_csv(std::ostream& f, const std::vector<Row>& rows, const std::string& backend) {
  f << "backend,ctx,prefill_tokens,prefill_s,prefill_tps,gen_tokens,decode_s,decode_tps,kv_bytes\n";
  char line[256];
  for (const Row& r : rows) {
    std::snprintf(line, sizeof line, "%s,%lld,%lld,%.6f,%.2f,%d,%.6f,%.2f,%llu\n", backend.c_str(),
                  (long long)r.ctx, (long long)r.prefill_tokens, r.prefill_s, r.prefill_tps(), r.gen_tokens,
                  r.decode_s, r.decode_tps(), (unsigned long long)r.kv_bytes);
    f << line;
  }
}

int run_bench(const BenchArgs& a) {
  const std::vector<int64_t> fr = frontiers(a);
  if (a.gen_tokens < 0) dsv4::fail("bench: --gen-tokens must be >= 0");
  dsv4::EngineOptions eo;
  eo.model_path = a.model;
  eo.threads = a.threads;
  eo.pass_tokens = a.batch;
  eo.qat_sim = !a.no_qat;
  if (a.backend == "cpu") eo.backend = dsv4::BackendKind::Cpu;
  else if (a.backend == "cuda") eo.backend = dsv4::BackendKind::Cuda;
  else if (a.backend == "auto") eo.backend = dsv4::BackendKind::Auto;
  else dsv4::fail("--backend: expected auto, cpu or cuda, found '%s'", a.backend.c_str());
  // Output paths are checked before the (possibly long) run, so a typo does not throw the results away.
  for (const std::string* out : {&a.csv, &a.svg})
    if (!out->empty() && std::filesystem::is_directory(*out))
      dsv4::fail("bench: output '%s' is a directory", out->c_str());
  const auto t_load = std::chrono::steady_clock::now();
  auto engine = dsv4::Engine::load(eo);
  const double load_s = seconds_since(t_load);
  const dsv4::ModelInfo& info = engine->info();
  if (uint64_t(fr.back() + a.gen_tokens) > info.context_length)
    dsv4::fail("bench: last frontier %lld + --gen-tokens %d exceeds the model's context length %llu",
               (long long)fr.back(), a.gen_tokens, (unsigned long long)info.context_length);
  const std::vector<dsv4::Token> toks = bench_tokens(a, fr.back(), info.n_vocab);
  auto session = engine->new_session(fr.back() + a.gen_tokens);
  std::printf("dsv4 bench: %s, backend %s, %zu frontiers %lld..%lld, %d generated tokens each\n",
              info.name.c_str(), info.backend.c_str(), fr.size(), (long long)fr.front(), (long long)fr.back(),
              a.gen_tokens);
  {
    // Warm-up, not timed: the engine moved the weights to a device backend at load; a short prefill plus one
    // decode step grows the scratch of both shapes and loads the kernels.
    const auto t0 = std::chrono::steady_clock::now();
    auto warm = engine->new_session(16);
    warm->eval(std::span<const dsv4::Token>(toks.data(), std::min<size_t>(8, toks.size())));
    const dsv4::Token next = warm->argmax();
    warm->eval(std::span<const dsv4::Token>(&next, 1));
    std::printf("load: %.2f s (includes the weights' copy to a device backend), warm-up (first passes): %.2f s\n",
                load_s, seconds_since(t0));
  }
  std::printf("%8s %9s %12s %10s %12s %14s\n", "ctx", "prefill", "prefill t/s", "gen", "decode t/s", "kv bytes");
  std::vector<Row> rows;
  int64_t at = 0;
  for (int64_t ctx : fr) {
    Row r;
    r.ctx = ctx;
    r.prefill_tokens = ctx - at;
    auto t0 = std::chrono::steady_clock::now();
    session->eval(std::span<const dsv4::Token>(toks.data() + at, size_t(ctx - at)));
    r.prefill_s = seconds_since(t0);
    at = ctx;
    r.kv_bytes = state_bytes(*session);
    if (a.gen_tokens > 0) {
      auto gen = session->clone();
      dsv4::Token next = gen->argmax();
      t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < a.gen_tokens; ++i) {
        gen->eval(std::span<const dsv4::Token>(&next, 1));
        next = gen->argmax();  // greedy: the id is the one host sync (and transfer) of a decode step
      }
      r.decode_s = seconds_since(t0);
      r.gen_tokens = a.gen_tokens;
    }
    std::printf("%8lld %9lld %12.1f %10d %12.2f %14llu\n", (long long)r.ctx, (long long)r.prefill_tokens,
                r.prefill_tps(), r.gen_tokens, r.decode_tps(), (unsigned long long)r.kv_bytes);
    std::fflush(stdout);
    rows.push_back(r);
  }
  if (!a.csv.empty())
    dsv4::app::write_file_atomically(a.csv, [&](std::ostream& f) { write_csv(f, rows, info.backend); });
  if (!a.svg.empty())
    dsv4::app::write_file_atomically(a.svg, [&](std::ostream& f) {
      write_svg(f, rows, "dsv4 bench: " + info.name + " (" + info.backend + ")");
    });
  return 0;
}

DSV4_COMMAND("bench", "Prefill and greedy-decode speed at growing context frontiers (CSV + SVG)", [](CLI::App& sub) {
  auto a = std::make_shared<BenchArgs>();
  sub.add_option("-m,--model", a->model, "GGUF model file")->required();
  sub.add_option("--backend", a->backend, "auto, cpu or cuda (default auto)");
  sub.add_option("-t,--threads", a->threads, "CPU threads (0 = all cores)");
  sub.add_option("-b,--batch-size", a->batch, "tokens per forward pass of a prompt (default: 256 on the CPU, 2048 on CUDA; results do not depend on it)");
  sub.add_option("--ctx-start", a->ctx_start, "first context frontier (default 512)");
  sub.add_option("--ctx-max", a->ctx_max, "last context frontier (default 8192)");
  auto* incr = sub.add_option("--step-incr", a->step_incr, "frontier step: add this many tokens");
  sub.add_option("--step-mul", a->step_mul, "frontier step: multiply by this (default 2)")->excludes(incr);
  sub.add_option("--gen-tokens", a->gen_tokens, "greedy tokens decoded at each frontier (default 32)");
  sub.add_option("--prompt-file", a->prompt_file, "text to tokenize and repeat (default: synthetic tokens)");
  sub.add_option("--seed", a->seed, "seed of the synthetic tokens (default 1)");
  sub.add_option("--csv", a->csv, "write one CSV row per frontier");
  sub.add_option("--svg", a->svg, "write an SVG plot of prefill and decode t/s");
  sub.add_flag("--no-qat-sim", a->no_qat, "disable the FP8/FP4 QAT simulations");
  return [a]() { return run_bench(*a); };
});

}  // namespace
