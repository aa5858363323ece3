#include "convert/mix.h"

#include <cstring>

#include "common/error.h"
#include "quant/blocks.h"
#include "gguf/gguf.h"
#include "text/vocab.h"

namespace dsv4 {

Mix parse_mix(const std::string& s) {
  if (s == "f32") return Mix::F32;
  if (s == "f16") return Mix::F16;
  if (s == "bf16") return Mix::BF16;
  if (s == "q8_0") return Mix::Q8_0;
  if (s == "q2") return Mix::Q2;
  if (s == "q4") return Mix::Q4;
  if (s == "iq2") return Mix::IQ2;
  fail("unknown quant mix '%s' (expected f32, f16, bf16, q8_0, q2, q4 or iq2)", s.c_str());
}

const char* mix_name(Mix m) {
  switch (m) {
    case Mix::F32: return "f32";
    case Mix::F16: return "f16";
    case Mix::BF16: return "bf16";
    case Mix::Q8_0: return "q8_0";
    case Mix::Q2: return "q2";
    case Mix::Q4: return "q4";
    case Mix::IQ2: return "iq2";
  }
  return "?";
}

namespace {

bool ends_with(const std::string& s, const char* suffix) {
  const std::string t(suffix);
  return s.size() >= t.size() && s.compare(s.size() - t.size(), t.size(), t) == 0;
}

QType preferred_type(const TensorSpec& spec, Mix mix) {
  if (spec.cls == TensorClass::Index) return QType::I32;
  if (mix == Mix::F32) return QType::F32;
  if (spec.cls == TensorClass::Vector) return QType::F32;
  switch (mix) {
    case Mix::F16: return QType::F16;
    case Mix::BF16: return QType::BF16;
    default: break;
  }
  if (spec.cls == TensorClass::Dense || spec.cls == TensorClass::Ape) return QType::F16;
  if (spec.cls == TensorClass::Projection) return QType::Q8_0;
  // Routed experts.
  if (mix == Mix::Q8_0) return QType::Q8_0;
  if (mix == Mix::Q4) return QType::Q4_K;
  if (mix == Mix::IQ2) return QType::IQ2_XXS;
  return ends_with(spec.name, "ffn_down_exps.weight") ? QType::Q2_K : QType::IQ2_XXS;
}

}  // namespace

QType mix_tensor_type(const TensorSpec& spec, Mix mix) {
  QType t = preferred_type(spec, mix);
  const int64_t ne0 = spec.ne.empty() ? 1 : spec.ne[0];
  if ((t == QType::Q2_K || t == QType::Q4_K || t == QType::IQ2_XXS) && ne0 % block_elems(t) != 0) t = QType::Q8_0;
  if (t == QType::Q8_0 && ne0 % block_elems(t) != 0) t = QType::F16;
  return t;
}

void encode_f32_rows(QType type, const float* src, int64_t rows, int64_t cols, std::vector<uint8_t>& out) {
  const size_t base = out.size();
  out.resize(base + size_t(rows * row_bytes(type, cols)));
  uint8_t* dst = out.data() + base;
  const int64_t n = rows * cols;
  switch (type) {
    case QType::F32: std::memcpy(dst, src, size_t(n) * 4); break;
    case QType::F16:
      for (int64_t i = 0; i < n; ++i) {
        const uint16_t h = f32_to_f16(src[i]);
        std::memcpy(dst + 2 * i, &h, 2);
      }
      break;
    case QType::BF16:
      for (int64_t i = 0; i < n; ++i) {
        const uint16_t h = f32_to_bf16(src[i]);
        std::memcpy(dst + 2 * i, &h, 2);
      }
      break;
    default: quantize_rows(type, src, dst, rows, cols); break;
  }
}

void write_tokenizer_metadata(GgufWriter& w, int n_vocab) {
  const TokenizerData td = n_vocab == text::kDeepSeekV4VocabSize
                               ? text::deepseek_v4_vocab(text::default_tiktoken_path())
                               : text::synthetic_vocab(n_vocab);
  if (int(td.tokens.size()) != n_vocab)
    fail("tokenizer: built %zu tokens for a vocabulary of %d", td.tokens.size(), n_vocab);
  w.add_string(text::kGgufKeyModel, td.model);
  w.add_string(text::kGgufKeyPre, td.pre);
  w.add_array_string(text::kGgufKeyTokens, td.tokens);
  w.add_array_i32(text::kGgufKeyTokenType, td.token_types);
  w.add_array_string(text::kGgufKeyMerges, td.merges);
  w.add_u32(text::kGgufKeyBos, uint32_t(td.bos_id));
  w.add_u32(text::kGgufKeyEos, uint32_t(td.eos_id));
  w.add_u32(text::kGgufKeyPad, uint32_t(td.pad_id));
  w.add_bool(text::kGgufKeyAddBos, td.add_bos);
}

}  // namespace dsv4
