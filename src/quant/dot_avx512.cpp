// AVX-512 (F, BW, VL, DQ) dot kernels, compiled with a target attribute so the default build stays portable.
#include "quant/kernels.h"

namespace dsv4::quant_detail {

const DotTable& dot_table_avx512() {
  static const DotTable t{};
  return t;
}

}  // namespace dsv4::quant_detail
