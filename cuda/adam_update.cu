// adam_update.cu — the fused Stable-SPAM / AdamW update (adam_update.cuh) through the step
// shells of moment_step.cuh, and the public CUDA AdamW step (cuda_api.h).
//
// The element math is stable_spam_element() from math.h (AdamOp), the function the CPU loops
// call; with --fmad=false the update itself agrees with the CPU bit for bit (Stable-SPAM's
// inputs differ only through its reductions; AdamW has none).
#include "../cpp/spam/cuda_api.h"
#include "adam_update.cuh"
#include "common.cuh"
#include "element_ops.cuh"
#include "moment_step.cuh"
#include "step8.cuh"  // check_maps

namespace spam::cuda {

void launch_adam_update(const std::vector<AdamTensor>& tensors, const AdamHyper& hyper,
                        const TensorState* state, const QuantMaps& maps, int64_t* counters,
                        cudaStream_t stream) {
  launch_step(
      tensors, AdamOp{hyper, state},
      [&](int i) { return AdamExtra{tensors[i].adam, static_cast<int32_t>(i)}; }, maps, counters,
      stream);
}

}  // namespace spam::cuda

namespace spam {

void cuda_adamw_step(const std::vector<AdamTensor>& tensors, const AdamHyper& hyper,
                     const QuantMaps& maps, int64_t* counters, const CudaContext& ctx) {
  if (tensors.empty()) return;
  SPAM_CHECK(counters != nullptr, "counters must be a device buffer");
  cuda::DeviceGuard guard(ctx.device);
  for (const AdamTensor& t : tensors)
    if (t.q8.active()) cuda::check_maps(maps);
  cuda::launch_adam_update(tensors, hyper, nullptr, maps, counters, cuda::to_stream(ctx.stream));
}

}  // namespace spam
