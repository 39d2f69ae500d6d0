// algorithms.h — the element algorithms: Adam-family optimizers whose step is one element
// function per entry with per-call and per-tensor constants, and nothing else (no reduction,
// no subset, no statistics). Each is a descriptor struct; SPAM_ELEMENT_ALGORITHMS lists them,
// and every layer is generated from that list (docs/design.md §6):
//   CPU   isa/element_step.cpp  cpu_element_step<A> per instruction set, run_group's shell;
//         cpu_dispatch.cpp      the run-time choice of the build
//   CUDA  cuda/element_step.cu  cuda_element_step<A>: ElementOp<A> (element_ops.cuh) through
//                               launch_step (dense, 8-bit and packed shells)
//   bind  element_entry.h       step(batch, name, hyper: dict, scalars: dict, skip_nonfinite)
//   Python functional.element_step(name, ...); an optimizer class naming ALGORITHM = kName
//          (SpikeAwareOptimizer steps it, spam_lowmem/optim/base.py)
//
// A descriptor carries
//   kName                 the name Python passes;
//   Hyper, kHyperNames,   the per-call constants, built by make_hyper from the named doubles
//   make_hyper(x, nf)     in kHyperNames order (any 1 - beta from the double, complement());
//   TensorScalars,        the per-tensor constants, built by make_scalars from entry i of each
//   kScalarNames,         per-tensor list in kScalarNames order (the lists' keyword names);
//   make_scalars(x)       (or derived from AdamBiasScalars: Adam's two bias corrections)
//   element(p, g, m, v, hyper, scalars) -> ElementFlags, SPAM_HD, so CPU and CUDA run it alike.
//
// Plain C++ (math.h only): included by the CPU kernels, the .cu files and the bindings.
#pragma once

#include <array>

#include "common.h"
#include "math.h"

namespace spam {

// The per-tensor scalars of an Adam with bias correction: step_sizes[i] = lr / (1 - beta1^k_i),
// sqrt_bc2s[i] = sqrt(1 - beta2^k_i), k_i the tensor's step count. A descriptor derives from
// it to take these.
struct AdamBiasScalars {
  using TensorScalars = AdamBiasCorrection;
  static constexpr std::array<const char*, 2> kScalarNames{{"step_sizes", "sqrt_bc2s"}};
  static TensorScalars make_scalars(const std::array<double, 2>& x) {
    return TensorScalars{static_cast<float>(x[0]), static_cast<float>(x[1])};
  }
};

// -------------------------------------------------------------------------------- AdamW
// torch.optim.AdamW's conventions (decay first, eps after bias correction; docs/algorithms.md
// §8): Stable-SPAM's element with clipping and normalisation off, so its arithmetic is that
// of the Stable-SPAM update instruction for instruction.
struct AdamWAlgorithm : AdamBiasScalars {
  static constexpr const char* kName = "adamw";

  using Hyper = AdamHyper;
  static constexpr std::array<const char*, 4> kHyperNames{{"beta1", "beta2", "eps", "weight_keep"}};
  static Hyper make_hyper(const std::array<double, 4>& x, NonFinite nonfinite) {
    return Hyper{static_cast<float>(x[0]), complement(x[0]),
                 static_cast<float>(x[1]), complement(x[1]),
                 static_cast<float>(x[2]), static_cast<float>(x[3]),
                 MomentReset::kNone,       nonfinite};
  }

  static SPAM_HD ElementFlags element(float& p, float g, float& m, float& v, const Hyper& h,
                                      const TensorScalars& t) {
    return stable_spam_element(p, g, m, v, h, t, no_clip());
  }
};

// ------------------------------------------------------------------ Adam with L2 decay
// torch.optim.Adam's weight_decay (L2 folded into the gradient, no decoupled decay):
//   g' = g + wd * p;  m, v <- EMAs of g', g'^2;  p <- p - step_size * m / (sqrt(v)/sqrt_bc2 + eps).
// The worked example of docs/design.md §6 (tests/test_element_algorithms.py); no public class.
struct AdamL2Hyper {
  float beta1, one_minus_beta1;
  float beta2, one_minus_beta2;
  float eps;
  float weight_decay;
  NonFinite nonfinite;
};

struct AdamL2Algorithm : AdamBiasScalars {
  static constexpr const char* kName = "adam_l2";

  using Hyper = AdamL2Hyper;
  static constexpr std::array<const char*, 4> kHyperNames{
      {"beta1", "beta2", "eps", "weight_decay"}};
  static Hyper make_hyper(const std::array<double, 4>& x, NonFinite nonfinite) {
    return Hyper{static_cast<float>(x[0]),
                 complement(x[0]),
                 static_cast<float>(x[1]),
                 complement(x[1]),
                 static_cast<float>(x[2]),
                 static_cast<float>(x[3]),
                 nonfinite};
  }

  static SPAM_HD ElementFlags element(float& p, float g, float& m, float& v, const Hyper& h,
                                      const TensorScalars& t) {
    const bool finite = is_finite(g);
    const bool drop = static_cast<bool>(!finite & h.nonfinite.skip);  // bitwise &: no branch
    const float gl = g + h.weight_decay * p;
    const float m_new = h.beta1 * m + h.one_minus_beta1 * gl;
    const float v_new = h.beta2 * v + h.one_minus_beta2 * (gl * gl);
    const float denom = sqrtf(v_new) / t.sqrt_bc2 + h.eps;
    const float p_new = p - t.step_size * (m_new / denom);
    p = drop ? p : p_new;
    m = drop ? m : m_new;
    v = drop ? v : v_new;
    return ElementFlags{false, !finite};
  }
};

// The list every layer is generated from: X(descriptor) per element algorithm.
#define SPAM_ELEMENT_ALGORITHMS(X) \
  X(AdamWAlgorithm)                \
  X(AdamL2Algorithm)

}  // namespace spam
