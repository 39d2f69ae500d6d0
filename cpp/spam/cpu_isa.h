// cpu_isa.h — the CPU kernels are compiled once per instruction set (baseline, AVX2,
// AVX-512, AVX-512 + VBMI) into separate namespaces; cpu_dispatch.cpp picks one at run time
// from cpuid (or a lower one named by SPAM_LOWMEM_CPU_ISA, for tests and comparisons).
// This keeps wheels portable while matching torch's own AVX-512 kernels in speed.
//
// A kernel translation unit is compiled with -DSPAM_CPU_ISA=<namespace> and defines
// spam::<namespace>::cpu_spam_step / cpu_stable_spam_step with the cpu_ops.h signatures; the
// element algorithms' steps (algorithms.h) are one template, cpu_element_step<A>, instantiated
// for every entry of SPAM_ELEMENT_ALGORITHMS in isa/element_step.cpp.
#pragma once

#include "cpu_ops.h"

#ifndef SPAM_CPU_ISA
#define SPAM_CPU_ISA isa_baseline
#endif

namespace spam {

#define SPAM_DECLARE_CPU_KERNELS(ns)                                                              \
  namespace ns {                                                                                  \
  void cpu_spam_step(const std::vector<SpamTensor>&, const SpamHyper&, const QuantMaps&,          \
                     int64_t*);                                                                   \
  void cpu_sparse_spam_step(const std::vector<SparseSpamTensor>&, const SpamHyper&,               \
                            const QuantMaps&, int64_t*);                                          \
  void cpu_stable_spam_step(const std::vector<StableSpamTensor>&, const AdamHyper&,               \
                            const QuantMaps&, int64_t*, const StatsReduce&);                      \
  template <class A>                                                                              \
  void cpu_element_step(const std::vector<ElementTensor<A>>&, const typename A::Hyper&,           \
                        const QuantMaps&, int64_t*);                                              \
  void cpu_quantize_blockwise(const TensorRef&, uint8_t*, float*, const BlockRows&,               \
                              const QuantMap&);                                                   \
  void cpu_dequantize_blockwise(const uint8_t*, const float*, const BlockRows&, const TensorRef&, \
                                const QuantMap&);                                                 \
  }

SPAM_DECLARE_CPU_KERNELS(isa_baseline)
SPAM_DECLARE_CPU_KERNELS(isa_avx2)
SPAM_DECLARE_CPU_KERNELS(isa_avx512)
SPAM_DECLARE_CPU_KERNELS(isa_avx512vbmi)
#undef SPAM_DECLARE_CPU_KERNELS

}  // namespace spam
