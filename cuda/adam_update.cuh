// adam_update.cuh — the fused Stable-SPAM update (AdamOp, element_ops.cuh) over every tensor of
// a call: phase 5 of the CUDA Stable-SPAM step, with the TensorState array its phases 2 and 4
// filled. (Plain AdamW is an element algorithm: algorithms.h, element_step.cu.)
#pragma once

#include <cstdint>
#include <vector>

#include "../cpp/spam/math.h"
#include "../cpp/spam/step_tensors.h"
#include "common.cuh"
#include "element_ops.cuh"  // TensorState

namespace spam::cuda {

// Enqueues the update of every tensor on `stream`; tensor i reads state[i]. `maps` is read only if
// some tensor has 8-bit moments. The caller has checked the maps and made the device current.
void launch_adam_update(const std::vector<AdamTensor>& tensors, const AdamHyper& hyper,
                        const TensorState* state, const QuantMaps& maps, int64_t* counters,
                        cudaStream_t stream);

}  // namespace spam::cuda
