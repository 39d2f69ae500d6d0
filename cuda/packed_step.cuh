// packed_step.cuh — the fused optimizer step of packed 4-bit weights on CUDA (PackedParam,
// cpp/spam/step_tensors.h; CPU twin: cpp/spam/isa/packed_loop.h), for the ops of
// element_ops.cuh: SpamOp, AdamOp (Stable-SPAM's update with the scalars its phases 2 and 4
// left in device scratch) and ElementOp<A> (every element algorithm, algorithms.h). One launch per
// packed tensor; the caller has made the device current, nothing waits for the GPU.
#pragma once

#include <cstdint>

#include "../cpp/spam/step_tensors.h"
#include "common.cuh"
#include "element_ops.cuh"

namespace spam::cuda {

// Packed weight `q` with gradient/moments in the working dtype of `grad`; the element is
// op.element(extra). Instantiated in packed_step.cu for SpamOp, AdamOp and every ElementOp.
template <typename Op>
void launch_packed_step(const PackedParam& q, const TensorRef& grad, const TensorRef& exp_avg,
                        const TensorRef& exp_avg_sq, const Op& op, const typename Op::Extra& extra,
                        int64_t* counters, cudaStream_t stream);

}  // namespace spam::cuda
