// adam_update.cu — the fused Stable-SPAM / AdamW element update (adam_update.cuh) for dense and
// 8-bit moments, and the public CUDA AdamW step (cuda_api.h).
//
// The element math is stable_spam_element() from math.h, the function the CPU loops call;
// with --fmad=false the update itself agrees with the CPU bit for bit (Stable-SPAM's inputs
// differ only through its reductions; AdamW has none).
#include <cmath>

#include "../cpp/spam/dtype_dispatch.h"
#include "../cpp/spam/cuda_api.h"
#include "../cpp/spam/half.h"
#include "../cpp/spam/math.h"
#include "adam_update.cuh"
#include "common.cuh"
#include "multi_tensor.cuh"
#include "packed_step.cuh"
#include "step8.cuh"

namespace spam::cuda {
namespace {

struct UpdateExtra {
  StableAdamTensor adam;  // step_size, sqrt_bc2
  int32_t tensor;         // TensorState index
};
using UpdateArgs = MultiTensorArgs<4, UpdateExtra>;          // ptr: 0 param, 1 grad, 2 m, 3 v
using UpdateArgs8 = MultiTensorArgs<kQ8Depth, UpdateExtra>;  // ptr: see Q8Ptr (step8.cuh)

struct UpdateShared {
  StableAdamHyper hyper;
  const TensorState* state;  // null: plain AdamW
  int64_t* counters;
};
static_assert(sizeof(UpdateShared) <= kSharedBudget, "kernel arguments exceed 4 KB");
static_assert(sizeof(UpdateArgs8) + sizeof(UpdateShared) + sizeof(MapValues) +
                  2 * sizeof(void*) <= 4096, "kernel arguments exceed 4 KB");

// The per-tensor scalars of the element: Stable-SPAM's, or AdamW's identity (no clipping,
// ||g|| = 0 turns the normalisation off). A uniform branch, once per thread block.
__device__ __forceinline__ StableTensorScalars tensor_scalars(const UpdateShared& shared,
                                                              int32_t tensor) {
  if (shared.state == nullptr) return StableTensorScalars{INFINITY, 1.0f, 0.0f, 0.0f};
  return shared.state[tensor].scalars;
}

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    adam_update_kernel(const __grid_constant__ UpdateArgs args, const UpdateShared shared) {
  const ChunkRange r = chunk_range(args);
  const UpdateExtra e = args.extra[r.slot];
  const StableTensorScalars s = tensor_scalars(shared, e.tensor);
  const StableAdamHyper h = shared.hyper;
  T* __restrict__ p = static_cast<T*>(args.ptr[0][r.slot]);
  const T* __restrict__ g = static_cast<const T*>(args.ptr[1][r.slot]);
  T* __restrict__ m = static_cast<T*>(args.ptr[2][r.slot]);
  T* __restrict__ v = static_cast<T*>(args.ptr[3][r.slot]);

  int clipped = 0, nonfinite = 0;
  for (int64_t base = r.begin; base < r.end; base += int64_t{kBlockThreads} * kIlp) {
    float pr[kIlp] = {}, gr[kIlp] = {}, mr[kIlp] = {}, vr[kIlp] = {};
#pragma unroll
    for (int j = 0; j < kIlp; ++j) {  // all loads first: 4 x kIlp loads in flight per thread
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
        const ElementFlags f = stable_spam_element(pr[j], gr[j], mr[j], vr[j], h, e.adam, s);
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

// 8-bit moments: one warp per quantisation block (step8.cuh); the bucket tables are
// __restrict__ parameters so their lookups go through the read-only cache.
template <typename T>
__global__ void __launch_bounds__(kBlockThreads, kQ8MinBlocks)
    adam_update8_kernel(const __grid_constant__ UpdateArgs8 args, const UpdateShared shared,
                        const MapValues values, const int32_t* __restrict__ m_buckets,
                        const int32_t* __restrict__ v_buckets) {
  __shared__ float map_values[2][kQuantCodes];
  stage_map_values(values, map_values);
  const ChunkRange r = chunk_range(args);
  const UpdateExtra e = args.extra[r.slot];
  const StableTensorScalars s = tensor_scalars(shared, e.tensor);
  const StableAdamHyper h = shared.hyper;
  const StableAdamTensor adam = e.adam;
  const QuantMap m_map{map_values[0], nullptr, m_buckets};
  const QuantMap v_map{map_values[1], nullptr, v_buckets};
  int clipped = 0, nonfinite = 0;
  quant8_chunk<T>(args, r, m_map, v_map,
                  [&](float& p, float g, float& m, float& v) {
                    return stable_spam_element(p, g, m, v, h, adam, s);
                  },
                  clipped, nonfinite);
  block_add_counts(shared.counters, clipped, nonfinite);
}

template <typename T>
void launch_dense(const std::vector<AdamUpdateTensor>& tensors, const std::vector<int>& order,
                  const UpdateShared& shared, cudaStream_t stream) {
  multi_tensor_apply<UpdateArgs>(
      order, [&](int i) { return tensors[i].param.numel; },
      [&](UpdateArgs& a, int slot, int i) {
        const AdamUpdateTensor& t = tensors[i];
        a.ptr[0][slot] = t.param.data;
        a.ptr[1][slot] = t.grad.data;
        a.ptr[2][slot] = t.exp_avg.data;
        a.ptr[3][slot] = t.exp_avg_sq.data;
        a.extra[slot] = UpdateExtra{t.adam, t.state};
      },
      [&](const UpdateArgs& a, int blocks) {
        adam_update_kernel<T><<<blocks, kBlockThreads, 0, stream>>>(a, shared);
        check_launch();
      });
}

template <typename T>
void launch_quant8(const std::vector<AdamUpdateTensor>& tensors, const std::vector<int>& order,
                   const UpdateShared& shared, const QuantMaps& maps, cudaStream_t stream) {
  const MapValues values{maps.m.values, maps.v.values};
  multi_tensor_apply<UpdateArgs8>(
      order, [&](int i) { return tensors[i].param.numel; },
      [&](UpdateArgs8& a, int slot, int i) {
        const AdamUpdateTensor& t = tensors[i];
        fill_q8_ptrs(a, slot, t.param, t.grad, t.q8);
        a.extra[slot] = UpdateExtra{t.adam, t.state};
      },
      [&](const UpdateArgs8& a, int blocks) {
        adam_update8_kernel<T><<<blocks, kBlockThreads, 0, stream>>>(a, shared, values,
                                                                     maps.m.buckets,
                                                                     maps.v.buckets);
        check_launch();
      });
}

}  // namespace

void launch_adam_update(const std::vector<AdamUpdateTensor>& tensors, const StableAdamHyper& hyper,
                        const TensorState* state, const QuantMaps& maps, int64_t* counters,
                        cudaStream_t stream) {
  for (const AdamUpdateTensor& t : tensors)
    if (t.q8.active()) check_maps(maps);
  const UpdateShared shared{hyper, state, counters};
  for_each_kind(tensors, [&](auto tag, bool q8, const std::vector<int>& order) {
    using T = typename decltype(tag)::type;
    if (q8)
      launch_quant8<T>(tensors, order, shared, maps, stream);
    else
      launch_dense<T>(tensors, order, shared, stream);
  });
  for (const AdamUpdateTensor& t : tensors)
    if (t.q4.active())
      launch_packed_adam(t.q4, t.grad, t.exp_avg, t.exp_avg_sq, hyper, t.adam, state, t.state,
                         counters, stream);
}

}  // namespace spam::cuda

namespace spam {

void cuda_adamw_step(const std::vector<AdamTensor>& tensors, const StableAdamHyper& hyper,
                     const QuantMaps& maps, int64_t* counters, const CudaContext& ctx) {
  if (tensors.empty()) return;
  SPAM_CHECK(counters != nullptr, "counters must be a device buffer");
  std::vector<cuda::AdamUpdateTensor> items;
  items.reserve(tensors.size());
  for (const AdamTensor& t : tensors)
    items.push_back({t.param, t.grad, t.exp_avg, t.exp_avg_sq, t.adam, t.q8, 0, t.q4});
  cuda::DeviceGuard guard(ctx.device);
  cuda::launch_adam_update(items, hyper, nullptr, maps, counters, cuda::to_stream(ctx.stream));
}

}  // namespace spam
