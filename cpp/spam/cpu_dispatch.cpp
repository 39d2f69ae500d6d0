// cpu_dispatch.cpp — run-time choice of the CPU kernel build (see cpu_isa.h).
#include "cpu_isa.h"

#include "algorithms.h"

#include <cstdlib>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace spam {
namespace {

enum class Isa { kBaseline, kAvx2, kAvx512, kAvx512Vbmi };

const char* isa_name(Isa i) {
  switch (i) {
    case Isa::kAvx512Vbmi:
      return "avx512vbmi";
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "baseline";
  }
}

Isa detect_isa() {
#if defined(SPAM_HAVE_X86_ISAS) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    if (__builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("bmi2"))
      return Isa::kAvx512Vbmi;
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

// SPAM_LOWMEM_CPU_ISA=baseline|avx2|avx512|avx512vbmi caps the choice (tests compare the
// builds; benchmarks measure one). A name above what the CPU runs, or unknown, is ignored:
// running an unsupported build would crash, and the cap is an experiment, not a requirement.
Isa chosen_isa() {
  const Isa best = detect_isa();
  const char* cap = std::getenv("SPAM_LOWMEM_CPU_ISA");
  if (cap == nullptr) return best;
  for (Isa i : {Isa::kBaseline, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Vbmi})
    if (std::strcmp(cap, isa_name(i)) == 0 && static_cast<int>(i) <= static_cast<int>(best))
      return i;
  return best;
}

Isa isa() {
  static const Isa chosen = chosen_isa();
  return chosen;
}

}  // namespace

// Forwards a call to the kernel build chosen for this CPU.
#if defined(SPAM_HAVE_X86_ISAS)
#define SPAM_DISPATCH(fn, ...)                                             \
  do {                                                                     \
    if (isa() == Isa::kAvx512Vbmi) return isa_avx512vbmi::fn(__VA_ARGS__); \
    if (isa() == Isa::kAvx512) return isa_avx512::fn(__VA_ARGS__);         \
    if (isa() == Isa::kAvx2) return isa_avx2::fn(__VA_ARGS__);             \
    return isa_baseline::fn(__VA_ARGS__);                                  \
  } while (0)
#else
#define SPAM_DISPATCH(fn, ...) return isa_baseline::fn(__VA_ARGS__)
#endif

void cpu_spam_step(const std::vector<SpamTensor>& t, const SpamHyper& h, const QuantMaps& q,
                   int64_t* c) {
  SPAM_DISPATCH(cpu_spam_step, t, h, q, c);
}

void cpu_sparse_spam_step(const std::vector<SparseSpamTensor>& t, const SpamHyper& h,
                          const QuantMaps& q, int64_t* c) {
  SPAM_DISPATCH(cpu_sparse_spam_step, t, h, q, c);
}

void cpu_stable_spam_step(const std::vector<StableSpamTensor>& t, const AdamHyper& h,
                          const QuantMaps& q, int64_t* c, const StatsReduce& r) {
  SPAM_DISPATCH(cpu_stable_spam_step, t, h, q, c, r);
}

template <class A>
void cpu_element_step(const std::vector<ElementTensor<A>>& t, const typename A::Hyper& h,
                      const QuantMaps& q, int64_t* c) {
  SPAM_DISPATCH(cpu_element_step<A>, t, h, q, c);
}
#define SPAM_INSTANTIATE(A)                                                                \
  template void cpu_element_step<A>(const std::vector<ElementTensor<A>>&, const A::Hyper&, \
                                    const QuantMaps&, int64_t*);
SPAM_ELEMENT_ALGORITHMS(SPAM_INSTANTIATE)
#undef SPAM_INSTANTIATE

void cpu_quantize_blockwise(const TensorRef& x, uint8_t* codes, float* absmax,
                            const BlockRows& rows, const QuantMap& m) {
  SPAM_DISPATCH(cpu_quantize_blockwise, x, codes, absmax, rows, m);
}

void cpu_dequantize_blockwise(const uint8_t* codes, const float* absmax, const BlockRows& rows,
                              const TensorRef& out, const QuantMap& m) {
  SPAM_DISPATCH(cpu_dequantize_blockwise, codes, absmax, rows, out, m);
}

const char* cpu_isa_name() { return isa_name(isa()); }

int cpu_num_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace spam
