// adam_update.cuh — the fused Adam-family update shared by the CUDA Stable-SPAM step (its
// phase 5) and the CUDA AdamW step: stable_spam_element (math.h) per element, over dense or
// 8-bit moments, every tensor of a call in multi-tensor launches (adam_update.cu).
//
// Plain AdamW is this update with the identity scalars {clip threshold +inf, clip scale 1,
// ||g|| 0 (normalisation off), target 0} and no reductions, exactly as on the CPU
// (cpu_adamw_step); Stable-SPAM supplies the scalars its phases 2 and 4 left in scratch.
#pragma once

#include <cstdint>
#include <vector>

#include "../cpp/spam/common.h"
#include "../cpp/spam/math.h"
#include "../cpp/spam/step_tensors.h"
#include "common.cuh"

namespace spam::cuda {

// Per-tensor state of a Stable-SPAM step in device scratch (layout in stable_spam_step.cu).
struct alignas(16) TensorState {
  StableTensorScalars scalars;  // written by phase 2 (clip) and phase 4 (norm)
  double sum_sq;                // unclipped sum of squares, from phase 2
  int32_t clips;                // stable_clips(): phase 3 needs the clipped sum
  int32_t pad;
};
static_assert(sizeof(TensorState) == 32, "scratch layout");

// One tensor of an update launch.
struct AdamUpdateTensor {
  TensorRef param, grad, exp_avg, exp_avg_sq;  // exp_avg/exp_avg_sq unused when q8 is active
  StableAdamTensor adam;                       // step_size, sqrt_bc2
  Quant8Moments q8;
  int32_t state;  // index into the TensorState array (unused for AdamW)
  PackedParam q4;  // active: a packed 4-bit weight (packed_step.cuh), param has no data
};

// Enqueues the update of every tensor on `stream`. `state` null: plain AdamW (identity
// scalars); otherwise the device TensorState array the Stable-SPAM phases filled. `maps` is
// read only if some tensor has 8-bit moments. The caller has made the device current.
void launch_adam_update(const std::vector<AdamUpdateTensor>& tensors, const StableAdamHyper& hyper,
                        const TensorState* state, const QuantMaps& maps, int64_t* counters,
                        cudaStream_t stream);

}  // namespace spam::cuda
