// element_step.cu — the CUDA step of every element algorithm (algorithms.h): ElementOp<A>
// (element_ops.cuh) through the shells of moment_step.cuh (dense, 8-bit, packed 4-bit),
// instantiated once per entry of SPAM_ELEMENT_ALGORITHMS. The element function is the one the
// CPU loops call; with --fmad=false the two agree bit for bit (no reductions).
#include "../cpp/spam/algorithms.h"
#include "../cpp/spam/cuda_api.h"
#include "common.cuh"
#include "element_ops.cuh"
#include "moment_step.cuh"
#include "step8.cuh"  // check_maps

namespace spam {

template <class A>
void cuda_element_step(const std::vector<ElementTensor<A>>& tensors, const typename A::Hyper& hyper,
                       const QuantMaps& maps, int64_t* counters, const CudaContext& ctx) {
  if (tensors.empty()) return;
  SPAM_CHECK(counters != nullptr, "counters must be a device buffer");
  cuda::DeviceGuard guard(ctx.device);
  for (const ElementTensor<A>& t : tensors)
    if (t.q8.active()) cuda::check_maps(maps);
  cuda::launch_step(
      tensors, cuda::ElementOp<A>{hyper}, [&](int i) { return tensors[i].scalars; }, maps, counters,
      cuda::to_stream(ctx.stream));
}

#define SPAM_INSTANTIATE(A)                                                                 \
  template void cuda_element_step<A>(const std::vector<ElementTensor<A>>&, const A::Hyper&, \
                                     const QuantMaps&, int64_t*, const CudaContext&);
SPAM_ELEMENT_ALGORITHMS(SPAM_INSTANTIATE)
#undef SPAM_INSTANTIATE

}  // namespace spam
