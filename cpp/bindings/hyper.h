// hyper.h — the per-call hyper-parameters as Python classes (SpamHyper, AdamHyper, StatHyper)
// and the moment-reset mode as an enum, registered in each core module by bind_hypers.
//
// Constants arrive as Python floats (double). Every `1 - beta` is computed here (math.h
// complement()) from the double and rounded to fp32 once, so a constant and its complement
// cannot disagree, and the bits equal those of the former Python-side `1.0 - beta` (double)
// rounded in C++. (The element algorithms build theirs in their descriptors, algorithms.h.)
#pragma once

#include <nanobind/nanobind.h>

#include "../spam/math.h"

namespace spam::bind {

namespace nb = nanobind;

inline float f32(double x) { return static_cast<float>(x); }

// An int, not the enum type, so a bad value is a ValueError naming `reset` rather than a
// nanobind signature mismatch; MomentReset members are ints and pass as they are.
inline MomentReset to_reset(int reset) {
  if (reset < 0 || reset > 2) throw nb::value_error("spam_lowmem: reset must be 0, 1 or 2");
  return static_cast<MomentReset>(reset);
}

// Stable-SPAM's statistic EMA constants (gamma1 already includes the cosine factor). The
// per-tensor bias corrections travel in StableStats; eps is the Adam one.
struct StatHyper {
  float gamma1, one_minus_gamma1;
  float gamma2, one_minus_gamma2;
  float gamma3, one_minus_gamma3;
};

inline void bind_hypers(nb::module_& m) {
  using namespace nb::literals;
  nb::enum_<MomentReset>(m, "MomentReset", nb::is_arithmetic(),
                         "How a momentum reset treats the current call (spam::MomentReset).")
      .value("NONE", MomentReset::kNone)
      .value("BEFORE_UPDATE", MomentReset::kBeforeUpdate,
             "m, v read as zero, then updated (SPAM; Stable-SPAM clean mode)")
      .value("AFTER_UPDATE", MomentReset::kAfterUpdate,
             "step with the old m, v, then store zeros (Stable-SPAM as implemented)");

  nb::class_<SpamHyper>(m, "SpamHyper", "Per-call constants of a SPAM step (dense or sparse).")
      .def(
          "__init__",
          [](SpamHyper* h, double beta1, double beta2, double eps, double clip_threshold,
             double weight_decay_scale, int reset, bool skip_nonfinite) {
            new (h) SpamHyper{f32(beta1),
                              complement(beta1),
                              f32(beta2),
                              complement(beta2),
                              f32(eps),
                              f32(clip_threshold),
                              f32(weight_decay_scale),
                              to_reset(reset),
                              NonFinite{skip_nonfinite}};
          },
          nb::kw_only(), "beta1"_a, "beta2"_a, "eps"_a, "clip_threshold"_a, "weight_decay_scale"_a,
          "reset"_a, "skip_nonfinite"_a)
      .def_ro("one_minus_beta1", &SpamHyper::one_minus_beta1)
      .def_ro("one_minus_beta2", &SpamHyper::one_minus_beta2)
      .def_ro("reset", &SpamHyper::reset);

  nb::class_<AdamHyper>(m, "AdamHyper",
                        "Per-call constants of a Stable-SPAM step's element update.")
      .def(
          "__init__",
          [](AdamHyper* h, double beta1, double beta2, double eps, double weight_keep,
             bool skip_nonfinite, int reset) {
            new (h) AdamHyper{
                f32(beta1), complement(beta1), f32(beta2),      complement(beta2),
                f32(eps),   f32(weight_keep),  to_reset(reset), NonFinite{skip_nonfinite}};
          },
          nb::kw_only(), "beta1"_a, "beta2"_a, "eps"_a, "weight_keep"_a, "skip_nonfinite"_a,
          "reset"_a = 0)
      .def_ro("one_minus_beta1", &AdamHyper::one_minus_beta1)
      .def_ro("one_minus_beta2", &AdamHyper::one_minus_beta2)
      .def_ro("reset", &AdamHyper::reset);

  nb::class_<StatHyper>(m, "StatHyper", "Stable-SPAM's gradient-statistic EMA constants.")
      .def(
          "__init__",
          [](StatHyper* h, double gamma1, double gamma2, double gamma3) {
            new (h) StatHyper{f32(gamma1),        complement(gamma1), f32(gamma2),
                              complement(gamma2), f32(gamma3),        complement(gamma3)};
          },
          nb::kw_only(), "gamma1"_a, "gamma2"_a, "gamma3"_a)
      .def_ro("one_minus_gamma1", &StatHyper::one_minus_gamma1);
}

}  // namespace spam::bind
