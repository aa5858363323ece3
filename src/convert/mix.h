// Quant mixes shared by `dsv4 convert` and `dsv4 synth`, and the tokenizer metadata both embed.
//
// The q2 / q4 mixes are ds4's published layouts (model-spec §13.1): attention projections, shared experts and
// the output head Q8_0; HC, compressor, indexer, router, token embedding and compressor ape F16; norms, sinks,
// HC base/scale and expert bias F32; tid2eid I32; routed experts IQ2_XXS (gate/up) + Q2_K (down) for q2,
// Q4_K for q4. iq2 is q2 with the down experts IQ2_XXS too (all routed experts 2.06 bits): the Flash file is
// ~6.5 GB smaller than q2 (80.2 vs 86.7 GB), which is what lets it load on an 80 GB H100; ds4 reads it as well
// (same names, a type it knows). f32 keeps every value exact (tests); f16/bf16 store every matrix in that type; q8_0 is the q4
// layout with Q8_0 experts.
//
// Small test configs have rows shorter than a 256-value super-block; such a tensor falls back to the next
// type that fits its row (K-quant/IQ2 -> Q8_0 -> F16), so every mix works on every shape. The fallback never
// happens at Flash/Pro shapes (all widths are multiples of 256).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/names.h"
#include "quant/quant.h"

namespace dsv4 {

class GgufWriter;

enum class Mix { F32, F16, BF16, Q8_0, Q2, Q4, IQ2 };

Mix parse_mix(const std::string& s);  // throws naming the accepted values
const char* mix_name(Mix m);

// Storage type of one tensor under a mix (after the row-length fallback described above).
QType mix_tensor_type(const TensorSpec& spec, Mix mix);

// Encodes `rows` rows of `cols` floats as `type` (F32/F16/BF16 converted, quantized types through
// quantize_rows, whose importance-free fallback then sees exactly these rows), appending to `out`.
void encode_f32_rows(QType type, const float* src, int64_t rows, int64_t cols, std::vector<uint8_t>& out);

// Writes the tokenizer.ggml.* keys: the real DeepSeek V4 vocabulary when n_vocab == 129280 (from the shipped
// tiktoken file), else a synthetic byte-level vocabulary of exactly n_vocab entries.
void write_tokenizer_metadata(GgufWriter& w, int n_vocab);

}  // namespace dsv4
