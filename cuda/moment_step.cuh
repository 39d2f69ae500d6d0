// moment_step.cuh — one Adam-family optimizer step (an op of element_ops.cuh) over every
// tensor of a call, routed to the shell that fits each tensor:
//
//   dense moments, storage dtype T   dense_step.cuh   multi-tensor launches per dtype
//   8-bit moments, storage dtype T   step8.cuh        multi-tensor launches per dtype
//   packed 4-bit weight              packed_step.cuh  one launch per tensor
//
// Every shell runs op.element(extra_of(i)) on tensor i, so SPAM, Stable-SPAM's update and the
// element algorithms (ElementOp<A>: AdamW, ...) differ only in the op they pass. The caller has
// checked the maps (check_maps) and made the device current; everything is enqueued on `stream`,
// nothing waits for it.
#pragma once

#include <vector>

#include "../cpp/spam/step_tensors.h"
#include "dense_step.cuh"
#include "packed_step.cuh"
#include "step8.cuh"

namespace spam::cuda {

#if defined(__CUDACC__)

// Tensors: a vector of SpamTensor, AdamTensor or ElementTensor<A> (param, grad, exp_avg,
// exp_avg_sq, q8, q4); extra_of(i) -> Op::Extra, the per-tensor scalars of tensor i.
template <typename Op, typename Tensors, typename ExtraOf>
void launch_step(const Tensors& tensors, const Op& op, ExtraOf&& extra_of, const QuantMaps& maps,
                 int64_t* counters, cudaStream_t stream) {
  for_each_kind(tensors, [&](auto tag, bool q8, const std::vector<int>& order) {
    using T = typename decltype(tag)::type;
    if (q8)
      launch_quant8_step<T>(tensors, order, op, extra_of, maps, counters, stream);
    else
      launch_dense_step<T>(tensors, order, op, extra_of, counters, stream);
  });
  for (int i = 0; i < static_cast<int>(tensors.size()); ++i) {
    const auto& t = tensors[i];
    if (t.q4.active())
      launch_packed_step(t.q4, t.grad, t.exp_avg, t.exp_avg_sq, op, extra_of(i), counters, stream);
  }
}

#endif  // __CUDACC__

}  // namespace spam::cuda
