// adam_update.cuh — the fused Adam-family update (AdamOp, element_ops.cuh) over every tensor of
// a call, shared by the CUDA AdamW step and the CUDA Stable-SPAM step (its phase 5), compiled
// once in adam_update.cu so both steps launch the same kernels.
//
// Plain AdamW is this update with `state` null (AdamOp's identity scalars) and no reductions,
// exactly as on the CPU (cpu_adamw_step); Stable-SPAM passes the TensorState array its phases
// 2 and 4 filled.
#pragma once

#include <cstdint>
#include <vector>

#include "../cpp/spam/math.h"
#include "../cpp/spam/step_tensors.h"
#include "common.cuh"
#include "element_ops.cuh"  // TensorState

namespace spam::cuda {

// Enqueues the update of every tensor on `stream`; tensor i reads state[i] when `state` is not
// null. `maps` is read only if some tensor has 8-bit moments. The caller has checked the maps
// and made the device current.
void launch_adam_update(const std::vector<AdamTensor>& tensors, const AdamHyper& hyper,
                        const TensorState* state, const QuantMaps& maps, int64_t* counters,
                        cudaStream_t stream);

}  // namespace spam::cuda
