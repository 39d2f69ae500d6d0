// cpu_dispatch.cpp — run-time choice of the CPU kernel build (see cpu_isa.h).
#include "cpu_isa.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace spam {
namespace {

enum class Isa { kBaseline, kAvx2, kAvx512 };

Isa detect_isa() {
#if defined(SPAM_HAVE_X86_ISAS) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

Isa isa() {
  static const Isa chosen = detect_isa();
  return chosen;
}

}  // namespace

void cpu_spam_step(const std::vector<SpamTensor>& t, const SpamHyper& h, int64_t* c) {
#if defined(SPAM_HAVE_X86_ISAS)
  if (isa() == Isa::kAvx512) return isa_avx512::cpu_spam_step(t, h, c);
  if (isa() == Isa::kAvx2) return isa_avx2::cpu_spam_step(t, h, c);
#endif
  isa_baseline::cpu_spam_step(t, h, c);
}

void cpu_stable_spam_step(const std::vector<StableSpamTensor>& t, const StableAdamHyper& h,
                          int64_t* c) {
#if defined(SPAM_HAVE_X86_ISAS)
  if (isa() == Isa::kAvx512) return isa_avx512::cpu_stable_spam_step(t, h, c);
  if (isa() == Isa::kAvx2) return isa_avx2::cpu_stable_spam_step(t, h, c);
#endif
  isa_baseline::cpu_stable_spam_step(t, h, c);
}

const char* cpu_isa_name() {
  switch (isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

int cpu_num_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace spam
