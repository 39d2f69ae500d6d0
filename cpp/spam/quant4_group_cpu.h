// quant4_group_cpu.h — the per-group pieces of the CPU 4-bit quantisers: group statistics
// (min/max, top-3 magnitudes), nibble packing of a group's codes, and the stochastic
// re-quantisation of one group. Shared by quant4_cpu.cpp (pack, requantise) and by the fused
// packed-weight optimizer loops (isa/packed_loop.h), so the fused step re-quantises with the
// very code requantize_ uses. Scalar rules: quant4.h; buffer layout: quant4_ops.h.
//
// Everything is in an anonymous namespace on purpose: the ISA kernels include this header
// once per instruction set (cpu_isa.h), and internal linkage keeps the AVX-512 copy of an
// inline function from being picked by the linker for the baseline build (an ODR trap).
#pragma once

#include <cstdint>

#include "quant4.h"

namespace spam::q4 {
namespace {

struct MinMax {
  float lo, hi;
  bool finite;
};

// An all-ones exponent marks Inf/NaN; OR-ing the comparison keeps the loop vectorisable.
inline uint32_t is_nonfinite(float v) {
  return (float_bits(v) & 0x7f800000u) == 0x7f800000u ? 1u : 0u;
}

// Eight independent accumulators: min/max of finite values do not depend on the order, and
// without -ffast-math the compiler vectorises only reductions written this way.
// lo/hi cover the finite entries only (a non-finite one is replaced by the neutral +-Inf:
// quant4.h "Edge rules"); `finite` says whether there was none. No finite entry: lo = +Inf,
// hi = -Inf.
inline MinMax min_max(const float* x, int64_t n) {
  constexpr int kLanes = 8;
  constexpr float kInf = __builtin_huge_valf();
  float lo[kLanes], hi[kLanes];
  uint32_t nonfinite[kLanes];
  for (int k = 0; k < kLanes; ++k) lo[k] = kInf, hi[k] = -kInf, nonfinite[k] = 0;
  auto add = [&](int k, float v) {
    const uint32_t bad = is_nonfinite(v);
    lo[k] = minf(lo[k], select(bad != 0u, kInf, v));
    hi[k] = maxf(hi[k], select(bad != 0u, -kInf, v));
    nonfinite[k] |= bad;
  };
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int k = 0; k < kLanes; ++k) add(k, x[j + k]);
  for (; j < n; ++j) add(0, x[j]);
  for (int k = 1; k < kLanes; ++k) {
    lo[0] = minf(lo[0], lo[k]);
    hi[0] = maxf(hi[0], hi[k]);
    nonfinite[0] |= nonfinite[k];
  }
  return MinMax{lo[0], hi[0], nonfinite[0] == 0};
}

inline Top3 top3(const float* x, int64_t n) {
  Top3 t;
  for (int64_t j = 0; j < n; ++j) t.push(Top3::key(x[j]), j);
  return t;
}

inline bool all_finite(const float* x, int64_t n) {
  uint32_t nonfinite = 0;
  for (int64_t j = 0; j < n; ++j) nonfinite |= is_nonfinite(x[j]);
  return nonfinite == 0;
}

// Codes of one group are computed into `tmp` by plain loops the compiler can vectorise (the
// 64-bit hash of the uniforms gets its own loop for that reason), then packed two per byte.
inline void pack_codes(uint8_t* codes, int64_t begin, int64_t n, const float* tmp) {
  uint8_t* out = codes + begin / 2;
  for (int64_t j = 0; j < n / 2; ++j)
    out[j] = pack_nibbles(static_cast<uint32_t>(tmp[2 * j]), static_cast<uint32_t>(tmp[2 * j + 1]));
}

inline void fill_uniforms(float* u, int64_t n, uint64_t key, int64_t begin) {
  for (int64_t j = 0; j < n; ++j) u[j] = sr_uniform(key, begin + j);
}

inline void store_outliers(const Packed& p, int64_t g, const float* x, const Top3& t) {
  p.outlier_idx[2 * g] = static_cast<int16_t>(t.i0);
  p.outlier_idx[2 * g + 1] = static_cast<int16_t>(t.i1);
  p.outlier_val[2 * g] = x[t.i0];
  p.outlier_val[2 * g + 1] = x[t.i1];
}

// Stochastic re-quantisation of group g (elements [g*group, g*group + n)) whose target values
// (sr_target, already applied) are x[0..n): grid choice against the old scale/zero, rounding
// with the uniforms of sr_key `key` at the elements' flat indices, nibble packing. `scratch`
// holds 2*n floats. Returns 1 and leaves the packed group untouched if a value is non-finite.
inline int64_t requant_group_sr(const float* x, int64_t n, const Packed& p, Format fmt, int64_t g,
                                int64_t group, uint64_t key, float* scratch) {
  const int64_t begin = g * group;
  float* tmp = scratch;
  float* u = scratch + n;
  if (fmt == Format::kInt4) {
    const MinMax mm = min_max(x, n);
    if (!mm.finite) return 1;
    const Int4Grid grid = int4_requant_grid(p.scale[g], float(p.zero[g]), mm.lo, mm.hi);
    fill_uniforms(u, n, key, begin);
    for (int64_t j = 0; j < n; ++j) tmp[j] = int4_sr_code(x[j], grid, u[j]);
    pack_codes(p.codes, begin, n, tmp);
    p.scale[g] = grid.scale;
    p.zero[g] = static_cast<uint8_t>(grid.zero);
  } else {
    if (!all_finite(x, n)) return 1;
    const Top3 t = top3(x, n);
    const float s = fp4_requant_step(p.scale[g], t.rest_max());
    fill_uniforms(u, n, key, begin);
    for (int64_t j = 0; j < n; ++j) tmp[j] = fp4_sr_level(x[j], s, u[j]) + float(kFp4Zero);
    tmp[t.i0] = tmp[t.i1] = float(kFp4Zero);  // outliers: stored exactly elsewhere
    pack_codes(p.codes, begin, n, tmp);
    p.scale[g] = s;
    store_outliers(p, g, x, t);
  }
  return 0;
}

}  // namespace
}  // namespace spam::q4
