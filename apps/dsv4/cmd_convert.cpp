// `dsv4 convert --in DIR --out FILE.gguf --mix f32|f16|bf16|q8_0|q2|q4|iq2`: safetensors checkpoint -> GGUF
// (docs/convert.md).
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>

#include "command.h"
#include "convert/convert.h"

namespace {
DSV4_COMMAND("convert", "Convert a DeepSeek-V4 safetensors checkpoint (HF or official layout) to GGUF",
             [](CLI::App& sub) {
               auto in = std::make_shared<std::string>();
               auto out = std::make_shared<std::string>();
               auto mix = std::make_shared<std::string>("q2");
               sub.add_option("--in", *in, "checkpoint directory (config.json + *.safetensors)")->required();
               sub.add_option("--out", *out, "GGUF file to write")->required();
               sub.add_option("--mix", *mix, "quant mix: f32, f16, bf16, q8_0, q2 (ds4 q2), q4 (ds4 q4), iq2 (q2 with IQ2_XXS down experts)");
               return [in, out, mix]() {
                 dsv4::ConvertOptions o;
                 o.in_dir = *in;
                 o.out_path = *out;
                 o.mix = dsv4::parse_mix(*mix);
                 o.log = [](const std::string& s) { std::fprintf(stderr, "convert: %s\n", s.c_str()); };
                 const auto t0 = std::chrono::steady_clock::now();
                 auto rep = dsv4::convert_checkpoint(o);
                 const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
                 std::fprintf(stderr, "convert: done in %.2f s (%d tensors, %d skipped)\n", s, rep.n_tensors,
                              rep.n_skipped);
                 return 0;
               };
             });
}  // namespace
