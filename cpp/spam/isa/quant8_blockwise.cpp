// isa/quant8_blockwise.cpp — blockwise 8-bit quantise / dequantise of whole tensors
// (spam_lowmem.functional.quantize_blockwise / dequantize_blockwise): the same block runs
// (quant8_runs.h) the fused optimizer steps use, so tests of these functions against a
// brute-force argmin cover the steps' lookups too. OpenMP over blocks.
#include <algorithm>
#include <cmath>

#include "../cpu_chunks.h"
#include "../cpu_isa.h"
#include "../half.h"
#include "../quant8.h"
#include "quant8_runs.h"

namespace spam {
namespace SPAM_CPU_ISA {

// Block b of a tensor of numel elements laid out by `rows` (quant8.h); OpenMP over blocks, each
// block's place found by division (a block is 256 lookups; the division is noise).
void cpu_quantize_blockwise(const TensorRef& x, uint8_t* codes, float* absmax,
                            const BlockRows& rows, const QuantMap& map) {
  const int64_t n_blocks = rows.total(x.numel);
  dispatch_dtype(x.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* __restrict src = static_cast<const T*>(x.data);
#pragma omp parallel for schedule(static) if (x.numel >= kCpuParallelMin)
    for (int64_t b = 0; b < n_blocks; ++b) {
      const int64_t begin = rows.block_start(b);
      const int n = static_cast<int>(rows.block_len(b));
      float values[kQuantBlock];
      float amax = 0.0f;
      for (int i = 0; i < n; ++i) {
        values[i] = Storage<T>::load(src, begin + i);
        const float a = std::fabs(values[i]);
        amax = (a > amax || a != a) ? a : amax;  // NaN-sticky, like the optimizer blocks
      }
      absmax[b] = amax;
      quantize_run(values, codes + begin, n, amax, map);
    }
  });
}

void cpu_dequantize_blockwise(const uint8_t* codes, const float* absmax, const BlockRows& rows,
                              const TensorRef& out, const QuantMap& map) {
  dispatch_dtype(out.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* __restrict dst = static_cast<T*>(out.data);
    const int64_t n_blocks = rows.total(out.numel);
#pragma omp parallel for schedule(static) if (out.numel >= kCpuParallelMin)
    for (int64_t b = 0; b < n_blocks; ++b) {
      const int64_t begin = rows.block_start(b);
      const int n = static_cast<int>(rows.block_len(b));
      float values[kQuantBlock];
      dequantize_run(codes + begin, values, n, absmax[b], map);
      for (int i = 0; i < n; ++i) Storage<T>::store(dst, begin + i, values[i]);
    }
  });
}

}  // namespace SPAM_CPU_ISA
}  // namespace spam
