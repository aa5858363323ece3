// `dsv4 synth --shape flash|pro|tiny --mix q2|q4|iq2|q8_0|f16|bf16|f32 --out FILE.gguf [--seed N] [--sparse-experts]`:
// random but valid weights in ds4's exact GGUF layout (src/convert/synth.h, docs/convert.md).
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>

#include "command.h"
#include "convert/synth.h"

namespace {
struct SynthArgs {
  std::string shape = "tiny", mix = "q2", out;
  uint64_t seed = 1;
  bool sparse = false;
};

DSV4_COMMAND("synth", "Write a synthetic DeepSeek-V4 GGUF (ds4 names, metadata and quant mix; random weights)",
             [](CLI::App& sub) {
               auto a = std::make_shared<SynthArgs>();
               sub.add_option("--shape", a->shape, "flash, pro or tiny")->check(CLI::IsMember({"flash", "pro", "tiny"}));
               sub.add_option("--mix", a->mix, "q2, q4, iq2 (all experts IQ2_XXS: fits 80 GB cards), q8_0, f16, bf16 or f32");
               sub.add_option("--out", a->out, "GGUF file to write")->required();
               // CLI11 would wrap "-1" into 2^64 - 1 for an unsigned option: refuse negatives instead.
               sub.add_option("--seed", a->seed, "random seed (same seed, same file)")
                   ->check([](const std::string& v) {
                     return !v.empty() && v[0] == '-' ? std::string("must not be negative, got " + v) : std::string();
                   });
               sub.add_flag("--sparse-experts", a->sparse, "leave routed-expert data as file holes (zeros)");
               return [a]() {
                 dsv4::SynthOptions o;
                 o.shape = a->shape;
                 o.mix = dsv4::parse_mix(a->mix);
                 o.out_path = a->out;
                 o.seed = a->seed;
                 o.sparse_experts = a->sparse;
                 o.log = [](const std::string& s) { std::fprintf(stderr, "synth: %s\n", s.c_str()); };
                 const auto t0 = std::chrono::steady_clock::now();
                 auto rep = dsv4::synth_model(o);
                 const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
                 std::fprintf(stderr, "synth: wrote %s (%s, %s): %d tensors, %.2f GB data (%.2f GB holes) in %.1f s\n",
                              a->out.c_str(), a->shape.c_str(), a->mix.c_str(), rep.n_tensors,
                              double(rep.data_bytes) / 1e9, double(rep.hole_bytes) / 1e9, s);
                 return 0;
               };
             });
}  // namespace
