// isa/spam_step.cpp — CPU SPAM step: one fused pass per element (spike test against the
// previous v, clip, moment update, bias-corrected step scaled by the warmup factor,
// weight decay), dense or 8-bit moments, OpenMP over chunks of all tensors of a group.
#include "../cpu_isa.h"
#include "../math.h"
#include "moment_loops.h"
#include "spam_fn.h"

namespace spam {
namespace SPAM_CPU_ISA {

void cpu_spam_step(const std::vector<SpamTensor>& tensors, const SpamHyper& hyper,
                   const QuantMaps& maps, int64_t* counters) {
  run_group(
      tensors, maps, [&](int i) { return spam_fn(hyper, tensors[i].update_scale); }, counters);
}

}  // namespace SPAM_CPU_ISA
}  // namespace spam
