// isa/quant8_blockwise.cpp — blockwise 8-bit quantise / dequantise of whole tensors
// (spam_lowmem.functional.quantize_blockwise / dequantize_blockwise): the same per-element
// rules (quant8.h) the fused optimizer steps use, OpenMP over blocks.
#include <algorithm>
#include <cmath>

#include "../cpu_chunks.h"
#include "../cpu_isa.h"
#include "../half.h"
#include "../quant8.h"

namespace spam {
namespace SPAM_CPU_ISA {

void cpu_quantize_blockwise(const TensorRef& x, uint8_t* codes, float* absmax, const QuantMap& map) {
  const int64_t n_blocks = (x.numel + kQuantBlock - 1) / kQuantBlock;
  dispatch_dtype(x.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* __restrict src = static_cast<const T*>(x.data);
#pragma omp parallel for schedule(static) if (x.numel >= kCpuParallelMin)
    for (int64_t b = 0; b < n_blocks; ++b) {
      const int64_t begin = b * kQuantBlock, end = std::min(begin + kQuantBlock, x.numel);
      float amax = 0.0f;
      for (int64_t i = begin; i < end; ++i) {
        const float a = std::fabs(Storage<T>::load(src, i));
        amax = (a > amax || a != a) ? a : amax;  // NaN-sticky, like the optimizer blocks
      }
      absmax[b] = amax;
      const float div = quant_divisor(amax);
      for (int64_t i = begin; i < end; ++i)
        codes[i] = quantize_code(Storage<T>::load(src, i) / div, map);
    }
  });
}

void cpu_dequantize_blockwise(const uint8_t* codes, const float* absmax, const TensorRef& out,
                              const QuantMap& map) {
  dispatch_dtype(out.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* __restrict dst = static_cast<T*>(out.data);
#pragma omp parallel for schedule(static) if (out.numel >= kCpuParallelMin)
    for (int64_t i = 0; i < out.numel; ++i)
      Storage<T>::store(dst, i, dequantize_code(codes[i], absmax[i / kQuantBlock], map));
  });
}

}  // namespace SPAM_CPU_ISA
}  // namespace spam
