// Type table and the public (de)quantization entry points: argument checks, then per-type reference code.
#include <cstring>
#include <vector>

#include "common/error.h"
#include "common/thread_pool.h"
#include "quant/kernels.h"
#include "quant/quant.h"

namespace dsv4 {

namespace qd = quant_detail;

namespace {

struct TypeInfo {
  QType type;
  const char* name;
  int64_t elems;
  int64_t bytes;
};

// Order matters: find_type indexes this table.
constexpr TypeInfo kTypes[] = {
    {QType::F32, "F32", 1, 4},
    {QType::F16, "F16", 1, 2},
    {QType::Q8_0, "Q8_0", kQK8_0, sizeof(block_q8_0)},
    {QType::Q2_K, "Q2_K", kQK_K, sizeof(block_q2_K)},
    {QType::Q4_K, "Q4_K", kQK_K, sizeof(block_q4_K)},
    {QType::Q8_K, "Q8_K", kQK_K, sizeof(block_q8_K)},
    {QType::IQ2_XXS, "IQ2_XXS", kQK_K, sizeof(block_iq2_xxs)},
    {QType::I32, "I32", 1, 4},
    {QType::BF16, "BF16", 1, 2},
    {QType::MXFP4, "MXFP4", kQKMXFP4, sizeof(block_mxfp4)},
    {QType::FP8_E4M3, "FP8_E4M3", 1, 1},
};

// Constant-time lookup (vec_dot checks sizes on every call, so this sits on the per-row path).
constexpr const TypeInfo* find_type(uint32_t id) {
  switch (QType(id)) {
    case QType::F32:
      return &kTypes[0];
    case QType::F16:
      return &kTypes[1];
    case QType::Q8_0:
      return &kTypes[2];
    case QType::Q2_K:
      return &kTypes[3];
    case QType::Q4_K:
      return &kTypes[4];
    case QType::Q8_K:
      return &kTypes[5];
    case QType::IQ2_XXS:
      return &kTypes[6];
    case QType::I32:
      return &kTypes[7];
    case QType::BF16:
      return &kTypes[8];
    case QType::MXFP4:
      return &kTypes[9];
    case QType::FP8_E4M3:
      return &kTypes[10];
  }
  return nullptr;
}

const TypeInfo& info(QType t) {
  const TypeInfo* i = find_type(uint32_t(t));
  if (!i) fail("quant: unsupported tensor type id %u", unsigned(t));
  return *i;
}

void check_count(QType t, int64_t n, const char* what) {
  const TypeInfo& i = info(t);
  if (n < 0 || n % i.elems != 0)
    fail("quant: %s of %lld values: %s needs a multiple of %lld", what, static_cast<long long>(n), i.name,
         static_cast<long long>(i.elems));
}

constexpr bool table_consistent() {
  for (const TypeInfo& t : kTypes)
    if (find_type(uint32_t(t.type)) != &t) return false;
  return true;
}
static_assert(table_consistent(), "find_type must map every QType to its own kTypes entry");

}  // namespace

std::string qtype_name(QType t) {
  const TypeInfo* i = find_type(uint32_t(t));
  return i ? std::string(i->name) : strfmt("QType(%u)", unsigned(t));
}

bool qtype_is_known(uint32_t id) {
  return id != uint32_t(QType::FP8_E4M3) && find_type(id) != nullptr;
}

QType qtype_from_id(uint32_t id) {
  // FP8_E4M3 has no GGUF id: a file claiming type 1000 is malformed, not FP8.
  if (!qtype_is_known(id)) fail("quant: tensor type id %u is not supported by dsv4", id);
  return QType(id);
}

int64_t block_elems(QType t) {
  return info(t).elems;
}
int64_t block_bytes(QType t) {
  return info(t).bytes;
}

int64_t row_bytes(QType t, int64_t n) {
  check_count(t, n, "row");
  return n / info(t).elems * info(t).bytes;
}

void dequantize_row(QType t, const void* src, float* dst, int64_t n) {
  check_count(t, n, "dequantize_row");
  switch (t) {
    case QType::F32:
      std::memcpy(dst, src, size_t(n) * 4);
      return;
    case QType::F16: {
      const auto* s = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i]);
      return;
    }
    case QType::BF16: {
      const auto* s = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
      return;
    }
    case QType::FP8_E4M3: {
      const auto* s = static_cast<const uint8_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = fp8_e4m3_to_f32(s[i]);
      return;
    }
    case QType::Q8_0:
      qd::dequant_q8_0(static_cast<const block_q8_0*>(src), dst, n);
      return;
    case QType::Q2_K:
      qd::dequant_q2_K(static_cast<const block_q2_K*>(src), dst, n);
      return;
    case QType::Q4_K:
      qd::dequant_q4_K(static_cast<const block_q4_K*>(src), dst, n);
      return;
    case QType::Q8_K:
      qd::dequant_q8_K(static_cast<const block_q8_K*>(src), dst, n);
      return;
    case QType::IQ2_XXS:
      qd::dequant_iq2_xxs(static_cast<const block_iq2_xxs*>(src), dst, n);
      return;
    case QType::MXFP4:
      qd::dequant_mxfp4(static_cast<const block_mxfp4*>(src), dst, n);
      return;
    case QType::I32:
      break;
  }
  fail("quant: dequantize_row: %s is not a float encoding", qtype_name(t).c_str());
}

void quantize_row(QType t, const float* src, void* dst, int64_t n, const float* importance) {
  check_count(t, n, "quantize_row");
  switch (t) {
    case QType::F32:
      std::memcpy(dst, src, size_t(n) * 4);
      return;
    case QType::F16: {
      auto* d = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = f32_to_f16(src[i]);
      return;
    }
    case QType::BF16: {
      auto* d = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = f32_to_bf16(src[i]);
      return;
    }
    case QType::FP8_E4M3: {
      auto* d = static_cast<uint8_t*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = f32_to_fp8_e4m3(src[i]);
      return;
    }
    case QType::Q8_0:
      qd::quant_q8_0(src, static_cast<block_q8_0*>(dst), n);
      return;
    case QType::Q8_K:
      qd::quant_q8_K(src, static_cast<block_q8_K*>(dst), n);
      return;
    case QType::Q2_K:
      qd::quant_q2_K(src, static_cast<block_q2_K*>(dst), n, importance);
      return;
    case QType::Q4_K:
      qd::quant_q4_K(src, static_cast<block_q4_K*>(dst), n, importance);
      return;
    case QType::MXFP4:
      qd::quant_mxfp4(src, static_cast<block_mxfp4*>(dst), n);
      return;
    case QType::IQ2_XXS: {
      if (importance) {
        qd::quant_iq2_xxs(src, static_cast<block_iq2_xxs*>(dst), n, importance);
      } else {
        // ds4's fallback when no imatrix is given: each column's importance is its squared weight.
        std::vector<float> sq(static_cast<size_t>(n));
        for (int64_t i = 0; i < n; ++i) sq[size_t(i)] = src[i] * src[i];
        qd::quant_iq2_xxs(src, static_cast<block_iq2_xxs*>(dst), n, sq.data());
      }
      return;
    }
    case QType::I32:
      break;
  }
  fail("quant: quantize_row: %s is not a float encoding", qtype_name(t).c_str());
}

void quantize_rows(QType t, const float* src, void* dst, int64_t rows, int64_t cols,
                   const float* importance) {
  if (rows < 0) fail("quant: quantize_rows: negative row count %lld", static_cast<long long>(rows));
  const int64_t rb = row_bytes(t, cols);
  std::vector<float> colsq;
  if (!importance && t == QType::IQ2_XXS) {
    // Matrix-level fallback: column importance = sum over rows of w^2 (what ds4 uses without an imatrix).
    colsq.assign(size_t(cols), 0.0f);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) colsq[size_t(c)] += src[r * cols + c] * src[r * cols + c];
    importance = colsq.data();
  }
  default_thread_pool().parallel_for(rows, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      quantize_row(t, src + r * cols, static_cast<uint8_t*>(dst) + r * rb, cols, importance);
  });
}

}  // namespace dsv4
