// stable_stats.h — StableStats: Stable-SPAM's per-tensor gradient statistics for one call.
// Per tensor the float32 [M, mu, nu] buffer the step updates in place (GradStatsIndex) and the
// bias corrections (1 - gamma1^k, 1 - gamma2^k, 1 - gamma3^k) of its statistic count k, given
// as one list per correction (no per-tensor Python object is made for them). And the optional
// cross-shard reduction of the per-tensor max|g| and sum g^2 (StatsReduceArgs).
#pragma once

#include <nanobind/stl/vector.h>

#include <string>
#include <vector>

#include "../spam/cpu_ops.h"
#include "convert.h"
#include "hyper.h"

namespace spam::bind {

struct StatCorrections {
  float bc1, bc2, bc3;
};

struct StableStats {
  ArrayList arrays;  // kept alive for `stats`
  std::vector<float*> stats;
  std::vector<StatCorrections> corrections;

  size_t size() const { return stats.size(); }

  // The kernel's statistic constants of tensor i.
  StableStatHyper hyper(size_t i, const StatHyper& s, float eps) const {
    const StatCorrections& c = corrections[i];
    return StableStatHyper{s.gamma1, s.one_minus_gamma1,
                           s.gamma2, s.one_minus_gamma2,
                           s.gamma3, s.one_minus_gamma3,
                           c.bc1,    c.bc2,
                           c.bc3,    eps};
  }
};

// `dev` is the step batch's: the buffers must share its device.
inline void check_stats_device(const StableStats& s, SameDevice dev) {
  for (size_t i = 0; i < s.arrays.size(); ++i) dev.check(s.arrays[i], describe("grad_stats", i));
}

// The cross-shard reduction of one call (StatsReduce, step_tensors.h) and the array it keeps
// alive. Built with the GIL held; the callback reacquires it, since the step runs with it
// released (step_entry.h). It captures a handle, not an object: copying or destroying the
// std::function then touches no reference count without the GIL, and the caller's argument
// keeps the callable alive for the whole call.
struct StatsReduceArgs {
  nb::ndarray<> buffer;
  StatsReduce reduce;
};

// `buffer`: float64 [n, 2] on the call's device, C-contiguous; `callback(phase)`: a Python
// callable. Both or neither; with no tensor in the call there is nothing to reduce and the
// reduction stays inactive.
template <int DeviceType>
StatsReduceArgs convert_stats_reduce(const nb::object& buffer, const nb::object& callback, size_t n,
                                     SameDevice dev) {
  StatsReduceArgs out;
  if (buffer.is_none() && callback.is_none()) return out;
  if (buffer.is_none() || callback.is_none())
    throw nb::value_error("reduce_buffer and reduce: pass both or neither");
  if (!PyCallable_Check(callback.ptr())) throw nb::type_error("reduce: expected a callable");
  out.buffer = nb::cast<nb::ndarray<>>(buffer);
  const nb::ndarray<>& a = out.buffer;
  double* stats = typed_buffer<double>(a, DeviceType, 0, "reduce_buffer");
  dev.check(a, "reduce_buffer");
  if (a.ndim() != 2 || a.shape(0) != n || a.shape(1) != 2)
    throw nb::value_error(
        ("reduce_buffer: expected shape [" + std::to_string(n) + ", 2] (one row per tensor)")
            .c_str());
  if (n == 0) return out;
  const nb::handle fn = callback;
  out.reduce.stats = stats;
  out.reduce.reduce = [fn](int phase) {
    nb::gil_scoped_acquire gil;
    fn(phase);  // a Python exception becomes nb::python_error, which is safe without the GIL
  };
  return out;
}

template <int DeviceType>
void bind_stable_stats(nb::module_& m) {
  using namespace nb::literals;
  nb::class_<StableStats>(m, "StableStats",
                          "Stable-SPAM's per-tensor statistics buffers and bias corrections.")
      .def(
          "__init__",
          [](StableStats* self, ArrayList grad_stats, const std::vector<double>& bias_correction1,
             const std::vector<double>& bias_correction2,
             const std::vector<double>& bias_correction3) {
            const size_t n = grad_stats.size();
            check_lengths(n, bias_correction1.size(), "bias_correction1", "grad_stats");
            check_lengths(n, bias_correction2.size(), "bias_correction2", "grad_stats");
            check_lengths(n, bias_correction3.size(), "bias_correction3", "grad_stats");
            StableStats s;
            for (size_t i = 0; i < n; ++i) {
              s.stats.push_back(typed_buffer<float>(
                  grad_stats[i], DeviceType, GradStatsIndex::kCount, describe("grad_stats", i)));
              s.corrections.push_back(
                  {f32(bias_correction1[i]), f32(bias_correction2[i]), f32(bias_correction3[i])});
            }
            s.arrays = std::move(grad_stats);
            new (self) StableStats(std::move(s));
          },
          "grad_stats"_a, "bias_correction1"_a, "bias_correction2"_a, "bias_correction3"_a)
      .def("__len__", &StableStats::size);
}

}  // namespace spam::bind
