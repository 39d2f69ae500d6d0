// stable_stats.h — StableStats: Stable-SPAM's per-tensor gradient statistics for one call.
// Per tensor the float32 [M, mu, nu] buffer the step updates in place (GradStatsIndex) and the
// bias corrections (1 - gamma1^k, 1 - gamma2^k, 1 - gamma3^k) of its statistic count k, given
// as one list per correction (no per-tensor Python object is made for them).
#pragma once

#include <nanobind/stl/vector.h>

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
