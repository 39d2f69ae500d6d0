// spam_step.cu — CUDA SPAM step (docs/algorithms.md §2.4): one fused pass per element (spike
// test against the previous v, clip, moment update, bias-corrected step scaled by the
// warmup factor, weight decay), all tensors of a group in multi-tensor launches.
//
// The element math is spam_element() from math.h (SpamOp, element_ops.cuh), the same function
// the CPU loop calls, and the library is built with --fmad=false, so CPU and GPU agree bit for
// bit: there is no reduction in SPAM. Telemetry counts are added to the device counters with
// one atomic per block and counter.
//
// Tensors with dense moments, tensors with 8-bit blockwise moments and packed 4-bit weights
// may be mixed in one call; launch_step (moment_step.cuh) gives each kind its shell.
#include "../cpp/spam/cuda_api.h"
#include "common.cuh"
#include "element_ops.cuh"
#include "moment_step.cuh"
#include "step8.cuh"  // check_maps

namespace spam {

void cuda_spam_step(const std::vector<SpamTensor>& tensors, const SpamHyper& hyper,
                    const QuantMaps& maps, int64_t* counters, const CudaContext& ctx) {
  if (tensors.empty()) return;
  SPAM_CHECK(counters != nullptr, "counters must be a device buffer");
  for (const SpamTensor& t : tensors)
    if (t.q8.active()) cuda::check_maps(maps);
  cuda::DeviceGuard guard(ctx.device);
  cuda::launch_step(
      tensors, cuda::SpamOp{hyper}, [&](int i) { return cuda::SpamExtra{tensors[i].update_scale}; },
      maps, counters, cuda::to_stream(ctx.stream));
}

}  // namespace spam
