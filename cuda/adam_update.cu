// adam_update.cu — the fused Stable-SPAM update (adam_update.cuh, phase 5 of
// stable_spam_step.cu) through the step shells of moment_step.cuh.
//
// The element math is stable_spam_element() from math.h (AdamOp), the function the CPU loops
// call; with --fmad=false the update itself agrees with the CPU bit for bit (Stable-SPAM's
// inputs differ only through its reductions).
#include "adam_update.cuh"
#include "common.cuh"
#include "element_ops.cuh"
#include "moment_step.cuh"

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
