// packed_step.cuh — the fused optimizer step of packed 4-bit weights on CUDA (PackedParam,
// cpp/spam/step_tensors.h; CPU twin: cpp/spam/isa/packed_loop.h). Launchers for the SPAM element
// and for the Adam-family element (AdamW, and Stable-SPAM's phase 5 with the scalars its
// phases 2 and 4 left in device scratch). One launch per packed tensor; the caller has made
// the device current, nothing waits for the GPU.
#pragma once

#include <cstdint>

#include "../cpp/spam/math.h"
#include "../cpp/spam/step_tensors.h"
#include "adam_update.cuh"  // TensorState
#include "common.cuh"

namespace spam::cuda {

// Packed weight `q` with gradient/moments in the working dtype of `grad`.
void launch_packed_spam(const PackedParam& q, const TensorRef& grad, const TensorRef& exp_avg,
                        const TensorRef& exp_avg_sq, const SpamHyper& hyper, float update_scale,
                        int64_t* counters, cudaStream_t stream);

// `state` null: AdamW (identity scalars); else Stable-SPAM with state[index].scalars.
void launch_packed_adam(const PackedParam& q, const TensorRef& grad, const TensorRef& exp_avg,
                        const TensorRef& exp_avg_sq, const StableAdamHyper& hyper,
                        const StableAdamTensor& adam, const TensorState* state, int32_t index,
                        int64_t* counters, cudaStream_t stream);

}  // namespace spam::cuda
