// spam_step.cu — CUDA SPAM step (ALGORITHMS.md §2.4): one fused pass per element (spike
// test against the previous v, clip, moment update, bias-corrected step scaled by the
// warmup factor, weight decay), all tensors of a group in multi-tensor launches.
//
// The element math is spam_element() from math.h, the same function the CPU loop calls,
// and the library is built with --fmad=false, so CPU and GPU agree bit for bit: there is no
// reduction in SPAM. Telemetry counts are added to the device counters with one atomic per
// block and counter.
//
// Tensors with dense moments and tensors with 8-bit blockwise moments (step8.cuh) may be
// mixed in one call; each (dtype, moment kind) group gets its own multi-tensor launches.
#include "../cpp/spam/dtype_dispatch.h"
#include "../cpp/spam/cuda_api.h"
#include "../cpp/spam/half.h"
#include "../cpp/spam/math.h"
#include "common.cuh"
#include "multi_tensor.cuh"
#include "packed_step.cuh"
#include "step8.cuh"

namespace spam::cuda {
namespace {

struct SpamExtra {
  float update_scale;  // lr * s * sqrt(1 - beta2^t) / (1 - beta1^t), per tensor
};
using SpamArgs = MultiTensorArgs<4, SpamExtra>;  // ptr: 0 param, 1 grad, 2 exp_avg, 3 exp_avg_sq
using SpamArgs8 = MultiTensorArgs<kQ8Depth, SpamExtra>;  // ptr: see Q8Ptr (step8.cuh)

// Call-wide kernel arguments, next to the multi-tensor table.
struct SpamShared {
  SpamHyper hyper;
  int64_t* counters;
};
static_assert(sizeof(SpamShared) <= kSharedBudget, "kernel arguments exceed 4 KB");
static_assert(sizeof(SpamArgs8) + sizeof(SpamShared) + sizeof(MapValues) + 2 * sizeof(void*) <=
                  4096, "kernel arguments exceed 4 KB");

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

// 8-bit moments: one warp per 256-element quantisation block (step8.cuh). The bucket tables
// are separate __restrict__ parameters so their lookups use the read-only cache.
template <typename T>
__global__ void __launch_bounds__(kBlockThreads, kQ8MinBlocks)
    spam_update8_kernel(const __grid_constant__ SpamArgs8 args, const SpamShared shared,
                        const MapValues values, const int32_t* __restrict__ m_buckets,
                        const int32_t* __restrict__ v_buckets) {
  __shared__ float map_values[2][kQuantCodes];
  stage_map_values(values, map_values);
  const ChunkRange r = chunk_range(args);
  const float scale = args.extra[r.slot].update_scale;
  const SpamHyper h = shared.hyper;
  const QuantMap m_map{map_values[0], nullptr, m_buckets};
  const QuantMap v_map{map_values[1], nullptr, v_buckets};
  int clipped = 0, nonfinite = 0;
  quant8_chunk<T>(args, r, m_map, v_map,
                  [&](float& p, float g, float& m, float& v) {
                    return spam_element(p, g, m, v, h, scale);
                  },
                  clipped, nonfinite);
  block_add_counts(shared.counters, clipped, nonfinite);
}

template <typename T>
void launch_spam_group8(const std::vector<SpamTensor>& tensors, const std::vector<int>& order,
                        const SpamShared& shared, const QuantMaps& maps, cudaStream_t stream) {
  const MapValues values{maps.m.values, maps.v.values};
  multi_tensor_apply<SpamArgs8>(
      order, [&](int i) { return tensors[i].param.numel; },
      [&](SpamArgs8& a, int slot, int i) {
        const SpamTensor& t = tensors[i];
        fill_q8_ptrs(a, slot, t.param, t.grad, t.q8);
        a.extra[slot] = SpamExtra{t.update_scale};
      },
      [&](const SpamArgs8& a, int blocks) {
        spam_update8_kernel<T><<<blocks, kBlockThreads, 0, stream>>>(a, shared, values,
                                                                     maps.m.buckets,
                                                                     maps.v.buckets);
        check_launch();
      });
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
                    const QuantMaps& maps, int64_t* counters, const CudaContext& ctx) {
  if (tensors.empty()) return;
  SPAM_CHECK(counters != nullptr, "counters must be a device buffer");
  for (const SpamTensor& t : tensors)
    if (t.q8.active()) cuda::check_maps(maps);
  cuda::DeviceGuard guard(ctx.device);
  const cudaStream_t stream = cuda::to_stream(ctx.stream);
  const cuda::SpamShared shared{hyper, counters};
  cuda::for_each_kind(tensors, [&](auto tag, bool q8, const std::vector<int>& order) {
    using T = typename decltype(tag)::type;
    if (q8)
      cuda::launch_spam_group8<T>(tensors, order, shared, maps, stream);
    else
      cuda::launch_spam_group<T>(tensors, order, shared, stream);
  });
  for (const SpamTensor& t : tensors)
    if (t.q4.active())
      cuda::launch_packed_spam(t.q4, t.grad, t.exp_avg, t.exp_avg_sq, hyper, t.update_scale,
                               counters, stream);
}

}  // namespace spam
