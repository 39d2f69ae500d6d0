// isa/spam_step.cpp — CPU SPAM step: one fused pass per element (spike test against the
// previous v, clip, moment update, bias-corrected step scaled by the warmup factor,
// weight decay), dense or 8-bit moments, OpenMP over chunks of all tensors of a group.
#include "../cpu_isa.h"
#include "../math.h"
#include "moment_loops.h"

namespace spam {
namespace SPAM_CPU_ISA {

void cpu_spam_step(const std::vector<SpamTensor>& tensors, const SpamHyper& hyper,
                   const QuantMaps& maps, int64_t* counters) {
  run_group(tensors, maps, [&](int i) {
    const SpamHyper h = hyper;
    const float scale = tensors[i].update_scale;
    // Runs without a spike (nearly all) skip the clip's sqrt: see moment_loops.h.
    return with_fast_path(
        [h, scale](float& p, float g, float& m, float& v) { return spam_element(p, g, m, v, h, scale); },
        [h, scale](float& p, float g, float& m, float& v) { return spam_element<false>(p, g, m, v, h, scale); },
        [h](float g, float v) { return spam_spikes(g, v, h); });
  }, counters);
}

}  // namespace SPAM_CPU_ISA
}  // namespace spam
