// isa/spam_fn.h — SPAM's element function as the CPU loops take it (dense, 8-bit and sparse
// steps): spam_element (math.h) with the block-level spike test of moment_loops.h, so runs
// without a spike (nearly all) skip the clip's sqrt.
#pragma once

#include "../math.h"
#include "moment_loops.h"

namespace spam {
namespace SPAM_CPU_ISA {
namespace {

inline auto spam_fn(const SpamHyper h, const float scale) {
  return with_fast_path([h, scale](float& p, float g, float& m,
                                   float& v) { return spam_element(p, g, m, v, h, scale); },
                        [h, scale](float& p, float g, float& m, float& v) {
                          return spam_element<false>(p, g, m, v, h, scale);
                        },
                        [h](float g, float v) { return spam_spikes(g, v, h); });
}

}  // namespace
}  // namespace SPAM_CPU_ISA
}  // namespace spam
