// isa/element_step.cpp — the CPU step of every element algorithm (algorithms.h), for this
// instruction set: run_group's shell (moment_loops.h: dense, 8-bit and packed 4-bit) with the
// algorithm's element function, instantiated once per entry of SPAM_ELEMENT_ALGORITHMS.
#include "../algorithms.h"
#include "../cpu_isa.h"
#include "moment_loops.h"

namespace spam {
namespace SPAM_CPU_ISA {

template <class A>
void cpu_element_step(const std::vector<ElementTensor<A>>& tensors, const typename A::Hyper& hyper,
                      const QuantMaps& maps, int64_t* counters) {
  using Hyper = typename A::Hyper;
  using Scalars = typename A::TensorScalars;
  run_group(
      tensors, maps,
      [&](int i) {
        // Captured by value: the loops vectorise only over a functor that holds its scalars.
        const Hyper h = hyper;
        const Scalars s = tensors[i].scalars;
        return
            [h, s](float& p, float g, float& m, float& v) { return A::element(p, g, m, v, h, s); };
      },
      counters);
}

#define SPAM_INSTANTIATE(A)                                                                \
  template void cpu_element_step<A>(const std::vector<ElementTensor<A>>&, const A::Hyper&, \
                                    const QuantMaps&, int64_t*);
SPAM_ELEMENT_ALGORITHMS(SPAM_INSTANTIATE)
#undef SPAM_INSTANTIATE

}  // namespace SPAM_CPU_ISA
}  // namespace spam
