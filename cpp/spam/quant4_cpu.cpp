// quant4_cpu.cpp — CPU 4-bit quantisers: fake quantisation, nibble pack/unpack and the
// stochastic-rounding re-quantisation of packed weights. One OpenMP loop over groups per call;
// each group is converted once into a small fp32 scratch row (L1-resident), then one scan
// computes its statistics and one writes its results, so every call reads and writes each
// element of the tensor once. Scalar rules and formats: quant4.h; layouts: quant4_ops.h.
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_chunks.h"        // kCpuParallelMin, dispatch_dtype
#include "quant4_group_cpu.h"  // group statistics, packing, requant_group_sr
#include "quant4_ops.h"

namespace spam::q4 {
namespace {

int64_t num_groups(int64_t numel, int64_t group) { return (numel + group - 1) / group; }

// Runs body(group_index, fp32_row, row_length, scratch) for every group of `in`, in parallel
// when the call is large enough; `bad` accumulates the int64 the body returns. `scratch` is
// per-thread room for 2 x row_length floats (codes before packing, uniforms).
// The per-thread row is sized by the longest group that thread actually meets (at most the
// tensor), never by the requested group size: a huge group_size on a small tensor must not
// allocate for elements that do not exist, and a thread that gets no group allocates nothing.
template <typename T, typename Body>
int64_t for_each_group(const TensorRef& in, int64_t group, Body&& body) {
  const T* src = static_cast<const T*>(in.data);
  const int64_t groups = num_groups(in.numel, group);
  int64_t bad = 0;
#pragma omp parallel if (in.numel >= kCpuParallelMin) reduction(+ : bad)
  {
    std::vector<float> row;
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t begin = g * group;
      const int64_t n = in.numel - begin < group ? in.numel - begin : group;
      if (static_cast<int64_t>(row.size()) < 3 * n) row.resize(static_cast<size_t>(3 * n));
      float* x = row.data();
      for (int64_t j = 0; j < n; ++j) x[j] = Storage<T>::load(src, begin + j);
      bad += body(g, x, n, x + n);
    }
  }
  return bad;
}

// Writes f(x[j]) for every element, then restores the two outliers exactly.
template <typename T, typename F>
void write_with_outliers(T* dst, int64_t begin, const float* x, int64_t n, const Top3& t, F&& f) {
  for (int64_t j = 0; j < n; ++j) Storage<T>::store(dst, begin + j, f(x[j]));
  if (t.i0 >= 0) Storage<T>::store(dst, begin + t.i0, x[t.i0]);
  if (t.i1 >= 0) Storage<T>::store(dst, begin + t.i1, x[t.i1]);
}

void check_group(int64_t group) { SPAM_CHECK(group > 0, "group size must be positive"); }

void check_packed(const TensorRef& w, const Packed& p, Format fmt, int64_t group) {
  check_group(group);
  SPAM_CHECK(group % 2 == 0, "packed storage needs an even group size");
  SPAM_CHECK(w.numel % group == 0, "packed storage needs numel divisible by the group size");
  SPAM_CHECK(p.codes && p.scale, "packed buffers missing");
  if (fmt == Format::kInt4) SPAM_CHECK(p.zero, "int4 packing needs the zero-point buffer");
  if (fmt == Format::kFp4) {
    SPAM_CHECK(p.outlier_idx && p.outlier_val, "fp4 packing needs the outlier buffers");
    SPAM_CHECK(group <= 32767, "fp4 packing stores outlier positions as int16: group <= 32767");
  }
}

// The fp4 outlier positions are the one piece of packed data used as an address (unpack
// stores to o[idx]): buffers loaded from a file or edited by hand may hold anything, so every
// index is checked before the parallel loop (where an exception could not be thrown). One
// pass over 2 int16 per group, negligible next to the unpack itself.
void check_outlier_idx(const Packed& p, int64_t groups, int64_t group) {
  int64_t bad = -1;
  for (int64_t i = 0; i < 2 * groups && bad < 0; ++i)
    if (p.outlier_idx[i] < 0 || p.outlier_idx[i] >= group) bad = i;
  if (bad >= 0)
    throw Error("spam_lowmem: fp4 outlier_idx[" + std::to_string(bad / 2) + ", " +
                std::to_string(bad % 2) + "] = " + std::to_string(p.outlier_idx[bad]) +
                " is outside the group [0, " + std::to_string(group) + ")");
}

}  // namespace

namespace {

// Fake quantisation: rule(dst, begin, x, n) writes the quantised group x[0..n) to dst[begin..).
template <typename Rule>
void fake_quantise(const TensorRef& in, const TensorRef& out, int64_t group, const Rule& rule) {
  check_group(group);
  if (group > in.numel)
    group = in.numel > 0 ? in.numel : 1;  // a group longer than the tensor is the tensor
  dispatch_dtype(in.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* dst = static_cast<T*>(out.data);
    for_each_group<T>(in, group,
                      [&](int64_t g, const float* x, int64_t n, float* /*tmp*/) -> int64_t {
                        rule(dst, g * group, x, n);
                        return 0;
                      });
  });
}

// The top-2 |x| of each group kept exact; the rest through fake(v, param), where
// param = param_of(the third-largest |x|) (docs/algorithms.md §5.2-5.3).
template <typename ParamOf, typename Fake>
void fake_with_outliers(const TensorRef& in, const TensorRef& out, int64_t group, ParamOf param_of,
                        Fake fake) {
  fake_quantise(in, out, group, [&](auto* dst, int64_t begin, const float* x, int64_t n) {
    const Top3 t = top3(x, n);
    const float param = param_of(t.rest_max());
    // param and fake by value: read through a reference they would be reloaded per element.
    write_with_outliers(dst, begin, x, n, t, [param, fake](float v) { return fake(v, param); });
  });
}

}  // namespace

void cpu_fake_weight_int4(const TensorRef& in, const TensorRef& out, int64_t group) {
  fake_quantise(in, out, group, [](auto* dst, int64_t begin, const float* x, int64_t n) {
    const MinMax mm = min_max(x, n);
    const Int4Grid grid = int4_weight_grid(mm.lo, mm.hi);
    for (int64_t j = 0; j < n; ++j)
      Storage<std::remove_pointer_t<decltype(dst)>>::store(dst, begin + j,
                                                           int4_weight_fake(x[j], grid));
  });
}

void cpu_fake_act_int4(const TensorRef& in, const TensorRef& out, int64_t group) {
  fake_with_outliers(
      in, out, group, [](float rest_max) { return act_scale(rest_max); },
      [](float v, float scale) { return int4_act_fake(v, scale); });
}

void cpu_fake_fp4(const TensorRef& in, const TensorRef& out, int64_t group) {
  fake_with_outliers(
      in, out, group, [](float rest_max) { return fp4_step(rest_max); },
      [](float v, float step) { return fp4_fake(v, step); });
}

int64_t cpu_pack(const TensorRef& w, const Packed& p, Format fmt, int64_t group) {
  check_packed(w, p, fmt, group);
  return dispatch_dtype(w.dtype, [&](auto tag) -> int64_t {
    using T = typename decltype(tag)::type;
    return for_each_group<T>(
        w, group, [&](int64_t g, const float* x, int64_t n, float* tmp) -> int64_t {
          if (fmt == Format::kInt4) {
            const MinMax mm = min_max(x, n);
            if (!mm.finite) return 1;
            const Int4Grid grid = int4_weight_grid(mm.lo, mm.hi);
            for (int64_t j = 0; j < n; ++j) tmp[j] = int4_weight_code(x[j], grid);
            pack_codes(p.codes, g * group, n, tmp);
            p.scale[g] = grid.scale;
            p.zero[g] = static_cast<uint8_t>(grid.zero);
          } else {
            if (!all_finite(x, n)) return 1;
            const Top3 t = top3(x, n);
            const float step = fp4_step(t.rest_max());
            for (int64_t j = 0; j < n; ++j) tmp[j] = fp4_level(x[j], step) + float(kFp4Zero);
            tmp[t.i0] = tmp[t.i1] = float(kFp4Zero);  // outliers: stored exactly elsewhere
            pack_codes(p.codes, g * group, n, tmp);
            p.scale[g] = step;
            store_outliers(p, g, x, t);
          }
          return 0;
        });
  });
}

void cpu_unpack(const Packed& p, const TensorRef& out, Format fmt, int64_t group) {
  check_packed(out, p, fmt, group);
  if (fmt == Format::kFp4) check_outlier_idx(p, out.numel / group, group);
  dispatch_dtype(out.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* dst = static_cast<T*>(out.data);
    const int64_t groups = out.numel / group;
#pragma omp parallel for schedule(static) if (out.numel >= kCpuParallelMin)
    for (int64_t g = 0; g < groups; ++g) {
      const float scale = p.scale[g];
      const float zero = fmt == Format::kInt4 ? float(p.zero[g]) : float(kFp4Zero);
      const uint8_t* codes = p.codes + g * group / 2;
      T* o = dst + g * group;
      for (int64_t j = 0; j < group; j += 2) {
        const uint32_t byte = codes[j / 2];
        Storage<T>::store(o, j, int4_dequant(float(byte & 0xfu), zero, scale));
        Storage<T>::store(o, j + 1, int4_dequant(float(byte >> 4), zero, scale));
      }
      if (fmt == Format::kFp4) {
        Storage<T>::store(o, p.outlier_idx[2 * g], p.outlier_val[2 * g]);
        Storage<T>::store(o, p.outlier_idx[2 * g + 1], p.outlier_val[2 * g + 1]);
      }
    }
  });
}

int64_t cpu_requant_sr(const TensorRef& w, const Packed& p, Format fmt, int64_t group,
                       uint64_t seed, uint64_t step) {
  check_packed(w, p, fmt, group);
  const uint64_t key = sr_key(seed, step);
  return dispatch_dtype(w.dtype, [&](auto tag) -> int64_t {
    using T = typename decltype(tag)::type;
    return for_each_group<T>(w, group, [&](int64_t g, float* x, int64_t n, float* tmp) -> int64_t {
      if (!std::is_same<T, float>::value)  // read the old group before it is overwritten
        for (int64_t j = 0; j < n; ++j)
          x[j] = sr_target<T>(x[j], packed_value(p, fmt, group, g, j));
      return requant_group_sr(x, n, p, fmt, g, group, key, tmp);
    });
  });
}

}  // namespace spam::q4
