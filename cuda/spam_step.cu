// spam_step.cu — CUDA SPAM step (ALGORITHMS.md §2.4): one fused pass per element (spike
// test against the previous v, clip, moment update, bias-corrected step scaled by the
// warmup factor, weight decay), all tensors of a group in multi-tensor launches.
//
// The element math is spam_element() from math.h, the same function the CPU loop calls,
// and the library is built with --fmad=false, so CPU and GPU agree bit for bit: there is no
// reduction in SPAM. Telemetry counts are added to the device counters with one atomic per
// block and counter.
#include "../cpp/spam/cpu_chunks.h"  // dispatch_dtype: the one place a DType becomes a type
#include "../cpp/spam/cuda_api.h"
#include "../cpp/spam/half.h"
#include "../cpp/spam/math.h"
#include "common.cuh"
#include "multi_tensor.cuh"

namespace spam::cuda {
namespace {

struct SpamExtra {
  float update_scale;  // lr * s * sqrt(1 - beta2^t) / (1 - beta1^t), per tensor
};
using SpamArgs = MultiTensorArgs<4, SpamExtra>;  // ptr: 0 param, 1 grad, 2 exp_avg, 3 exp_avg_sq

// Call-wide kernel arguments, next to the multi-tensor table.
struct SpamShared {
  SpamHyper hyper;
  int64_t* counters;
};
static_assert(sizeof(SpamShared) <= kSharedBudget, "kernel arguments exceed 4 KB");

// Each thread loads kIlp elements of every array before computing, so 4 x kIlp independent
// loads are in flight per thread; consecutive threads touch consecutive elements (coalesced).
template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    spam_update_kernel(const __grid_constant__ SpamArgs args, const SpamShared shared) {
  const ChunkRange r = chunk_range(args);
  T* __restrict__ p = static_cast<T*>(args.ptr[0][r.slot]);
  const T* __restrict__ g = static_cast<const T*>(args.ptr[1][r.slot]);
  T* __restrict__ m = static_cast<T*>(args.ptr[2][r.slot]);
  T* __restrict__ v = static_cast<T*>(args.ptr[3][r.slot]);
  const float scale = args.extra[r.slot].update_scale;
  const SpamHyper h = shared.hyper;

  int clipped = 0, nonfinite = 0;  // at most kChunk / kBlockThreads per thread
  for (int64_t base = r.begin; base < r.end; base += int64_t{kBlockThreads} * kIlp) {
    float pr[kIlp] = {}, gr[kIlp] = {}, mr[kIlp] = {}, vr[kIlp] = {};
#pragma unroll
    for (int j = 0; j < kIlp; ++j) {
      const int64_t i = base + j * kBlockThreads + threadIdx.x;
      if (i < r.end) {
        pr[j] = Storage<T>::load(p, i);
        gr[j] = Storage<T>::load(g, i);
        mr[j] = Storage<T>::load(m, i);
        vr[j] = Storage<T>::load(v, i);
      }
    }
#pragma unroll
    for (int j = 0; j < kIlp; ++j) {
      const int64_t i = base + j * kBlockThreads + threadIdx.x;
      if (i < r.end) {
        const ElementFlags f = spam_element(pr[j], gr[j], mr[j], vr[j], h, scale);
        Storage<T>::store(p, i, pr[j]);
        Storage<T>::store(m, i, mr[j]);
        Storage<T>::store(v, i, vr[j]);
        clipped += f.clipped;
        nonfinite += f.nonfinite;
      }
    }
  }
  block_add_counts(shared.counters, clipped, nonfinite);
}

template <typename T>
void launch_spam_group(const std::vector<SpamTensor>& tensors, const std::vector<int>& order,
                       const SpamShared& shared, cudaStream_t stream) {
  multi_tensor_apply<SpamArgs>(
      order, [&](int i) { return tensors[i].param.numel; },
      [&](SpamArgs& a, int slot, int i) {
        const SpamTensor& t = tensors[i];
        a.ptr[0][slot] = t.param.data;
        a.ptr[1][slot] = t.grad.data;
        a.ptr[2][slot] = t.exp_avg.data;
        a.ptr[3][slot] = t.exp_avg_sq.data;
        a.extra[slot] = SpamExtra{t.update_scale};
      },
      [&](const SpamArgs& a, int blocks) {
        spam_update_kernel<T><<<blocks, kBlockThreads, 0, stream>>>(a, shared);
        check_launch();
      });
}

}  // namespace
}  // namespace spam::cuda

namespace spam {

void cuda_spam_step(const std::vector<SpamTensor>& tensors, const SpamHyper& hyper,
                    int64_t* counters, const CudaContext& ctx) {
  if (tensors.empty()) return;
  SPAM_CHECK(counters != nullptr, "counters must be a device buffer");
  cuda::DeviceGuard guard(ctx.device);
  const cudaStream_t stream = cuda::to_stream(ctx.stream);
  const cuda::SpamShared shared{hyper, counters};
  const auto groups = cuda::group_by_dtype(static_cast<int>(tensors.size()),
                                           [&](int i) { return tensors[i].param.dtype; });
  for (int d = 0; d < static_cast<int>(groups.size()); ++d) {
    if (groups[d].empty()) continue;
    dispatch_dtype(static_cast<DType>(d), [&](auto tag) {
      using T = typename decltype(tag)::type;
      cuda::launch_spam_group<T>(tensors, groups[d], shared, stream);
    });
  }
}

}  // namespace spam
