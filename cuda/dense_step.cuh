// dense_step.cuh — the dense (32-bit-moment) loop of the CUDA optimizer steps, written once for
// every Adam-family op (element_ops.cuh): the twin of the 8-bit loop in step8.cuh.
//
// Work split: each thread block owns one multi-tensor chunk (multi_tensor.cuh) of one tensor;
// its 256 threads walk the chunk in strides of kBlockThreads * kIlp elements:
//
//   element  base + j * kBlockThreads + threadIdx.x,   j = 0 .. kIlp-1
//
// so consecutive threads touch consecutive elements (coalesced), and each thread loads kIlp
// elements of all four arrays before computing: 4 x kIlp independent loads in flight.
// Per element: load p, g, m, v as fp32 (Storage<T>), run the op's element function, store
// p, m, v back in T. The block's telemetry goes into the counters once, at the end.
#pragma once

#include <cstdint>
#include <vector>

#include "../cpp/spam/half.h"
#include "../cpp/spam/math.h"
#include "common.cuh"
#include "multi_tensor.cuh"

namespace spam::cuda {

// Pointer slots of the dense multi-tensor table (MultiTensorArgs<kDenseDepth, Op::Extra>).
enum DensePtr : int { kDenseParam = 0, kDenseGrad, kDenseM, kDenseV, kDenseDepth };

template <typename Op>
using DenseArgs = MultiTensorArgs<kDenseDepth, typename Op::Extra>;

#if defined(__CUDACC__)

template <typename T, typename Op>
__global__ void __launch_bounds__(kBlockThreads)
    dense_step_kernel(const __grid_constant__ DenseArgs<Op> args, const Op op, int64_t* counters) {
  const ChunkRange r = chunk_range(args);
  const auto fn = op.element(args.extra[r.slot]);
  T* __restrict__ p = static_cast<T*>(args.ptr[kDenseParam][r.slot]);
  const T* __restrict__ g = static_cast<const T*>(args.ptr[kDenseGrad][r.slot]);
  T* __restrict__ m = static_cast<T*>(args.ptr[kDenseM][r.slot]);
  T* __restrict__ v = static_cast<T*>(args.ptr[kDenseV][r.slot]);

  int clipped = 0, nonfinite = 0;  // at most kChunk / kBlockThreads per thread
  for (int64_t base = r.begin; base < r.end; base += int64_t{kBlockThreads} * kIlp) {
    float pr[kIlp] = {}, gr[kIlp] = {}, mr[kIlp] = {}, vr[kIlp] = {};
#pragma unroll
    for (int j = 0; j < kIlp; ++j) {  // all loads first
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
        const ElementFlags f = fn(pr[j], gr[j], mr[j], vr[j]);
        Storage<T>::store(p, i, pr[j]);
        Storage<T>::store(m, i, mr[j]);
        Storage<T>::store(v, i, vr[j]);
        clipped += f.clipped;
        nonfinite += f.nonfinite;
      }
    }
  }
  block_add_counts(counters, clipped, nonfinite);
}

// Enqueues the tensors `order` (indices into `tensors`, all of storage type T, dense moments)
// in multi-tensor launches. extra_of(i) -> Op::Extra gives tensor i's table entry.
template <typename T, typename Op, typename Tensors, typename ExtraOf>
void launch_dense_step(const Tensors& tensors, const std::vector<int>& order, const Op& op,
                       ExtraOf&& extra_of, int64_t* counters, cudaStream_t stream) {
  static_assert(sizeof(Op) + sizeof(counters) <= kSharedBudget, "kernel arguments exceed 4 KB");
  multi_tensor_apply<DenseArgs<Op>>(
      order, [&](int i) { return tensors[i].param.numel; },
      [&](DenseArgs<Op>& a, int slot, int i) {
        a.ptr[kDenseParam][slot] = tensors[i].param.data;
        a.ptr[kDenseGrad][slot] = tensors[i].grad.data;
        a.ptr[kDenseM][slot] = tensors[i].exp_avg.data;
        a.ptr[kDenseV][slot] = tensors[i].exp_avg_sq.data;
        a.extra[slot] = extra_of(i);
      },
      [&](const DenseArgs<Op>& a, int blocks) {
        dense_step_kernel<T, Op><<<blocks, kBlockThreads, 0, stream>>>(a, op, counters);
        check_launch();
      });
}

#endif  // __CUDACC__

}  // namespace spam::cuda
