// isa/moment_loops.h — the loops every Adam-family step shares, for dense and 8-bit moments.
// Included only by cpp/spam/isa/*.cpp (one copy per instruction set).
//
// An optimizer supplies an element function fn(p, g, m, v) -> ElementFlags (math.h) per
// tensor; these loops load and store the storage types around it:
//   dense moments: one pass, p/g/m/v in the parameter dtype;
//   8-bit moments: per 256-element block, dequantise m and v into registers/stack, run fn,
//                  take the new per-block absmax, requantise (quant8.h) — one pass over memory;
//   packed 4-bit parameter (dense moments): per quantisation group, unpack, run fn,
//                  re-quantise with stochastic rounding (packed_loop.h) — one pass as well.
#pragma once

#include <algorithm>
#include <cmath>

#include "../cpu_chunks.h"
#include "../cpu_ops.h"
#include "../half.h"
#include "../quant8.h"
#include "packed_loop.h"

namespace spam {
namespace SPAM_CPU_ISA {
namespace {

// Max that keeps a NaN once seen ("propagate" policy must not hide a NaN moment).
inline float sticky_max(float acc, float x) { return (x > acc || x != x) ? x : acc; }

// Codes of n values of one block. Kept out of line on purpose: inlined into the block loop,
// GCC 12 no longer vectorises the table lookups (no gathers, 10x slower); on its own, with
// plain restrict pointers, it does. The call costs nothing next to 256 elements.
#if defined(__GNUC__)
__attribute__((noinline))
#endif
void quantize_run(const float* __restrict x, uint8_t* __restrict codes, int n, float divisor,
                         const QuantMap map) {
  for (int i = 0; i < n; ++i) codes[i] = quantize_code(x[i] / divisor, map);
}

template <typename T, typename Fn>
void run_dense(const TensorRef& param, const TensorRef& grad, const TensorRef& exp_avg,
               const TensorRef& exp_avg_sq, int64_t begin, int64_t end, const Fn& fn,
               int64_t& clipped, int64_t& nonfinite) {
  T* __restrict p = static_cast<T*>(param.data);
  const T* __restrict g = static_cast<const T*>(grad.data);
  T* __restrict m = static_cast<T*>(exp_avg.data);
  T* __restrict v = static_cast<T*>(exp_avg_sq.data);
  int64_t n_clip = 0, n_bad = 0;
  for (int64_t i = begin; i < end; ++i) {
    float pi = Storage<T>::load(p, i), mi = Storage<T>::load(m, i), vi = Storage<T>::load(v, i);
    const ElementFlags f = fn(pi, Storage<T>::load(g, i), mi, vi);
    Storage<T>::store(p, i, pi);
    Storage<T>::store(m, i, mi);
    Storage<T>::store(v, i, vi);
    n_clip += f.clipped;
    n_bad += f.nonfinite;
  }
  clipped += n_clip;
  nonfinite += n_bad;
}

// [begin, end) starts on a block boundary (chunks are multiples of kQuantBlock).
template <typename T, typename Fn>
void run_quant8(const TensorRef& param, const TensorRef& grad, const Quant8Moments& q,
                const QuantMaps& maps, int64_t begin, int64_t end, const Fn& fn,
                int64_t& clipped, int64_t& nonfinite) {
  T* __restrict p = static_cast<T*>(param.data);
  const T* __restrict g = static_cast<const T*>(grad.data);
  // Local copies and restrict pointers: uint8 stores may alias anything, and without these
  // the compiler reloads the map pointers every element and gives up vectorising.
  uint8_t* __restrict m_codes = q.m_codes;
  uint8_t* __restrict v_codes = q.v_codes;
  float* __restrict m_absmax = q.m_absmax;
  float* __restrict v_absmax = q.v_absmax;
  const QuantMap m_map = maps.m, v_map = maps.v;
  float m[kQuantBlock], v[kQuantBlock];
  int64_t n_clip = 0, n_bad = 0;
  for (int64_t b0 = begin; b0 < end; b0 += kQuantBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kQuantBlock, end - b0));
    const int64_t block = b0 / kQuantBlock;
    const float m_scale = m_absmax[block], v_scale = v_absmax[block];
    for (int i = 0; i < n; ++i) {
      m[i] = dequantize_code(m_codes[b0 + i], m_scale, m_map);
      v[i] = dequantize_code(v_codes[b0 + i], v_scale, v_map);
    }
    for (int i = 0; i < n; ++i) {
      float pi = Storage<T>::load(p, b0 + i);
      const ElementFlags f = fn(pi, Storage<T>::load(g, b0 + i), m[i], v[i]);
      Storage<T>::store(p, b0 + i, pi);
      n_clip += f.clipped;
      n_bad += f.nonfinite;
    }
    float new_m = 0.0f, new_v = 0.0f;
    int nans = 0;
#pragma omp simd reduction(max : new_m, new_v) reduction(+ : nans)
    for (int i = 0; i < n; ++i) {
      new_m = std::max(new_m, std::fabs(m[i]));
      new_v = std::max(new_v, v[i]);
      nans += (m[i] != m[i]) | (v[i] != v[i]);
    }
    if (nans) {  // a NaN moment ("propagate" policy) must poison its block, not vanish
      for (int i = 0; i < n; ++i) {
        new_m = sticky_max(new_m, std::fabs(m[i]));
        new_v = sticky_max(new_v, v[i]);
      }
    }
    m_absmax[block] = new_m;
    v_absmax[block] = new_v;
    const float m_div = quant_divisor(new_m), v_div = quant_divisor(new_v);
    quantize_run(m, m_codes + b0, n, m_div, m_map);
    quantize_run(v, v_codes + b0, n, v_div, v_map);
  }
  clipped += n_clip;
  nonfinite += n_bad;
}

// One OpenMP loop over the chunks of every tensor of a group. element_fn(i) returns the
// element function of tensor i (capturing its per-tensor scalars by value).
template <typename Tensor, typename MakeFn>
void run_group(const std::vector<Tensor>& tensors, const QuantMaps& maps, const MakeFn& element_fn,
               int64_t* counters) {
  std::vector<int64_t> numels, aligns;
  numels.reserve(tensors.size());
  aligns.reserve(tensors.size());
  for (const auto& t : tensors) {
    numels.push_back(t.param.numel);
    aligns.push_back(t.q4.active() ? t.q4.group : 1);  // packed: chunks of whole groups
  }
  const ChunkPlan plan = make_chunks(numels, &aligns);
  const int64_t n_chunks = static_cast<int64_t>(plan.chunks.size());
  int64_t clipped = 0, nonfinite = 0;
#pragma omp parallel for schedule(static) reduction(+ : clipped, nonfinite) if (plan.parallel)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const Chunk& ch = plan.chunks[c];
    const Tensor& t = tensors[ch.tensor];
    const auto fn = element_fn(ch.tensor);
    dispatch_dtype(t.param.dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      if (t.q4.active())
        run_packed<T>(t.q4, t.grad, t.exp_avg, t.exp_avg_sq, ch.begin, ch.end, fn, clipped,
                      nonfinite);
      else if (t.q8.active())
        run_quant8<T>(t.param, t.grad, t.q8, maps, ch.begin, ch.end, fn, clipped, nonfinite);
      else
        run_dense<T>(t.param, t.grad, t.exp_avg, t.exp_avg_sq, ch.begin, ch.end, fn, clipped,
                     nonfinite);
    });
  }
  counters[Counters::kClipped] += clipped;
  counters[Counters::kNonFinite] += nonfinite;
}

}  // namespace
}  // namespace SPAM_CPU_ISA
}  // namespace spam
