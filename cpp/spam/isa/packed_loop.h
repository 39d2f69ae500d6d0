// isa/packed_loop.h — the fused step of a packed 4-bit weight (PackedParam, cpu_ops.h): per
// quantisation group, in one pass over codes + grad + moments and nothing full-size,
//
//   1  dequantise the group into a stack/L1 row (`old`, the exact stored values) and round
//      each value to the working dtype T, as a materialised working copy would hold it;
//   2  run the optimizer's element function (math.h) on it, with the dense moments in T;
//   3  round the result to T, form the stochastic-rounding target sr_target<T>(w, old);
//   4  re-quantise and pack the group (requant_group_sr, the code requantize_ runs).
//
// Steps 1-4 are what unpack_weight -> dense step -> requantize_ compute, element for element
// and in the same fp32 operations, so the two paths agree bit for bit. Included only by
// cpp/spam/isa/*.cpp (one copy per instruction set), through moment_loops.h.
#pragma once

#include <vector>

#include "../cpu_ops.h"
#include "../half.h"
#include "../quant4.h"
#include "../quant4_group_cpu.h"

namespace spam {
namespace SPAM_CPU_ISA {
namespace {

// The value a store to T followed by a load returns (identity for fp32).
template <typename T>
inline float round_to(float x) {
  T t;
  Storage<T>::store(&t, 0, x);
  return Storage<T>::load(&t, 0);
}

// [begin, end) covers whole groups (the chunk plan aligns packed tensors to the group size).
template <typename T, typename Fn>
void run_packed(const PackedParam& q, const TensorRef& grad, const TensorRef& exp_avg,
                const TensorRef& exp_avg_sq, int64_t begin, int64_t end, const Fn& fn,
                int64_t& clipped, int64_t& nonfinite) {
  const T* __restrict g = static_cast<const T*>(grad.data);
  T* __restrict m = static_cast<T*>(exp_avg.data);
  T* __restrict v = static_cast<T*>(exp_avg_sq.data);
  const int64_t group = q.group;
  // Per-call rows of one group: old values, targets, and the requantiser's 2*group scratch.
  std::vector<float> rows(static_cast<size_t>(4 * group));
  float* old = rows.data();
  float* x = old + group;
  float* scratch = x + group;
  int64_t n_clip = 0, n_bad = 0, bad_groups = 0;
  for (int64_t b0 = begin; b0 < end; b0 += group) {
    const int64_t gi = b0 / group;
    for (int64_t j = 0; j < group; ++j) old[j] = q4::packed_value(q.buf, q.fmt, group, gi, j);
    for (int64_t j = 0; j < group; ++j) {
      const int64_t i = b0 + j;
      float pi = round_to<T>(old[j]);
      float mi = Storage<T>::load(m, i), vi = Storage<T>::load(v, i);
      const ElementFlags f = fn(pi, Storage<T>::load(g, i), mi, vi);
      Storage<T>::store(m, i, mi);
      Storage<T>::store(v, i, vi);
      x[j] = q4::sr_target<T>(round_to<T>(pi), old[j]);
      n_clip += f.clipped;
      n_bad += f.nonfinite;
    }
    bad_groups += q4::requant_group_sr(x, group, q.buf, q.fmt, gi, group, q.key, scratch);
  }
  clipped += n_clip;
  nonfinite += n_bad;
  if (bad_groups) {  // rare (a NaN/Inf weight): one atomic per chunk that saw any
#pragma omp atomic
    *q.bad_groups += bad_groups;
  }
}

}  // namespace
}  // namespace SPAM_CPU_ISA
}  // namespace spam
