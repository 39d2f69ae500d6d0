// packed_step.cu — fused optimizer step of packed 4-bit weights (packed_step.cuh): per
// quantisation group, unpack, optimizer element update, stochastic re-quantisation and nibble
// packing, with no full-size weight temporary. Same results as cpp/spam/isa/packed_loop.h.
//
// One warp per group, two passes over it, both in registers:
//   pass 1  every lane computes the updated targets of its elements (pairs 2k, 2k+1, the bytes
//           it will own) and keeps their min/max (int4) or top-3 magnitudes (fp4); the warp
//           butterflies of quant4_warp.cuh merge them exactly;
//   pass 2  the lane recomputes the same targets — the update is a pure function of the old
//           code, g, m and v, none of which has been written yet — stores m and v, and writes
//           its bytes; lane 0 rewrites the group's metadata once every lane has read it.
// Recomputing costs one more read of g, m, v per element but needs no scratch whatever the
// group size. A group whose targets are not all finite keeps its codes (moments are still
// written, as in the unfused path) and is counted in *bad_groups.
#include "../cpp/spam/dtype_dispatch.h"
#include "../cpp/spam/half.h"
#include "../cpp/spam/quant4.h"
#include "packed_step.cuh"
#include "quant4_warp.cuh"

namespace spam::cuda {
namespace {

using namespace q4::warp;  // NOLINT: warp statistics (quant4_warp.cuh)
constexpr int kWarpsPerBlock = kBlockThreads / kWarp;

template <typename T>
__device__ __forceinline__ float round_to(float x) {
  T t;
  Storage<T>::store(&t, 0, x);
  return Storage<T>::load(&t, 0);
}

template <typename T, typename Op>
__global__ void __launch_bounds__(kBlockThreads)
    packed_step_kernel(const T* __restrict__ grad, T* __restrict__ m, T* __restrict__ v,
                       q4::Packed p, q4::Format fmt, int64_t numel, int64_t group, uint64_t key,
                       int64_t* bad_groups, const Op op, const typename Op::Extra extra,
                       int64_t* counters) {
  const auto fn = op.element(extra);
  const int64_t groups = numel / group;
  const int64_t stride = int64_t{gridDim.x} * kWarpsPerBlock;
  const int lane = lane_id();
  int clipped = 0, nonfinite = 0;
  for (int64_t g = int64_t{blockIdx.x} * kWarpsPerBlock + threadIdx.x / kWarp; g < groups;
       g += stride) {
    const int64_t begin = g * group;
    // The sr target of element j after the update; m/v/flags are returned for pass 2.
    auto target = [&](int64_t j, float& mi, float& vi, ElementFlags& f) -> float {
      const float old = q4::packed_value(p, fmt, group, g, j);
      float pi = round_to<T>(old);
      mi = Storage<T>::load(m, begin + j);
      vi = Storage<T>::load(v, begin + j);
      f = fn(pi, Storage<T>::load(grad, begin + j), mi, vi);
      return q4::sr_target<T>(round_to<T>(pi), old);
    };
    // pass 1: statistics of the targets
    MinMaxBad mm{3.402823466e38f, -3.402823466e38f, 0u};
    q4::Top3 top;
    unsigned bad = 0;
    for (int64_t j = 2 * lane; j < group; j += 2 * kWarp) {
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        float mi, vi;
        ElementFlags f;
        const float x = target(j + k, mi, vi, f);
        mm.lo = q4::minf(mm.lo, x);
        mm.hi = q4::maxf(mm.hi, x);
        bad |= q4::finite(x) ? 0u : 1u;
        top.push(q4::absf(x), j + k);
      }
    }
    bool group_bad;
    q4::Int4Grid grid{};
    float step = 0.0f;
    if (fmt == q4::Format::kInt4) {
      mm.bad = bad;
      mm = warp_min_max(mm);
      group_bad = mm.bad != 0u;
      if (!group_bad) grid = q4::int4_requant_grid(p.scale[g], float(p.zero[g]), mm.lo, mm.hi);
    } else {
      top = warp_top3(top);
      group_bad = warp_or(bad) != 0u;
      if (!group_bad) step = q4::fp4_requant_step(p.scale[g], top.rest_max());
    }
    // pass 2: moments, codes
    float outlier[2] = {0.f, 0.f};
    uint8_t* codes = p.codes + begin / 2;
    for (int64_t j = 2 * lane; j < group; j += 2 * kWarp) {
      float c[2];
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        float mi, vi;
        ElementFlags f;
        const float x = target(j + k, mi, vi, f);
        Storage<T>::store(m, begin + j + k, mi);
        Storage<T>::store(v, begin + j + k, vi);
        clipped += f.clipped;
        nonfinite += f.nonfinite;
        const float u = q4::sr_uniform(key, begin + j + k);
        if (fmt == q4::Format::kInt4) {
          c[k] = q4::int4_sr_code(x, grid, u);
        } else {
          c[k] = top.is_outlier(j + k) ? float(q4::kFp4Zero)
                                       : q4::fp4_sr_level(x, step, u) + float(q4::kFp4Zero);
          if (j + k == top.i0) outlier[0] = x;
          if (j + k == top.i1) outlier[1] = x;
        }
      }
      if (!group_bad)
        codes[j / 2] = q4::pack_nibbles(static_cast<uint32_t>(c[0]), static_cast<uint32_t>(c[1]));
    }
    if (group_bad) {
      if (lane == 0) atomicAdd(reinterpret_cast<unsigned long long*>(bad_groups), 1ull);
      continue;  // warp-uniform
    }
    if (fmt == q4::Format::kFp4) {  // the lanes that met the outliers hand their values to lane 0
      outlier[0] = __shfl_sync(kFull, outlier[0], static_cast<int>((top.i0 / 2) % kWarp));
      outlier[1] = __shfl_sync(kFull, outlier[1], static_cast<int>((top.i1 / 2) % kWarp));
    }
    __syncwarp();  // every lane is done reading the old metadata before lane 0 rewrites it
    if (lane == 0) {
      if (fmt == q4::Format::kInt4) {
        p.scale[g] = grid.scale;
        p.zero[g] = static_cast<uint8_t>(grid.zero);
      } else {
        p.scale[g] = step;
        p.outlier_idx[2 * g] = static_cast<int16_t>(top.i0);
        p.outlier_idx[2 * g + 1] = static_cast<int16_t>(top.i1);
        p.outlier_val[2 * g] = outlier[0];
        p.outlier_val[2 * g + 1] = outlier[1];
      }
    }
    __syncwarp();
  }
  block_add_counts(counters, clipped, nonfinite);
}

int grid_for(int64_t groups) {
  const int64_t blocks = (groups + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return static_cast<int>(blocks < (int64_t{1} << 20) ? (blocks > 0 ? blocks : 1)
                                                      : (int64_t{1} << 20));
}

}  // namespace

template <typename Op>
void launch_packed_step(const PackedParam& q, const TensorRef& grad, const TensorRef& exp_avg,
                        const TensorRef& exp_avg_sq, const Op& op, const typename Op::Extra& extra,
                        int64_t* counters, cudaStream_t stream) {
  SPAM_CHECK(q.group > 0 && q.group % 2 == 0 && grad.numel % q.group == 0,
             "packed weights need an even group size dividing numel");
  SPAM_CHECK(q.group <= (int64_t{1} << 30), "group size must be at most 2^30");
  SPAM_CHECK(q.bad_groups != nullptr && counters != nullptr,
             "packed step needs its device counters");
  if (grad.numel == 0) return;
  dispatch_dtype(grad.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    packed_step_kernel<T, Op><<<grid_for(grad.numel / q.group), kBlockThreads, 0, stream>>>(
        static_cast<const T*>(grad.data), static_cast<T*>(exp_avg.data),
        static_cast<T*>(exp_avg_sq.data), q.buf, q.fmt, grad.numel, q.group, q.key, q.bad_groups,
        op, extra, counters);
  });
  check_launch();
}

// The ops of the CUDA steps (moment_step.cuh).
template void launch_packed_step<SpamOp>(const PackedParam&, const TensorRef&, const TensorRef&,
                                         const TensorRef&, const SpamOp&, const SpamExtra&,
                                         int64_t*, cudaStream_t);
template void launch_packed_step<AdamOp>(const PackedParam&, const TensorRef&, const TensorRef&,
                                         const TensorRef&, const AdamOp&, const AdamExtra&,
                                         int64_t*, cudaStream_t);
#define SPAM_INSTANTIATE(A)                                                     \
  template void launch_packed_step<ElementOp<A>>(                               \
      const PackedParam&, const TensorRef&, const TensorRef&, const TensorRef&, \
      const ElementOp<A>&, const A::TensorScalars&, int64_t*, cudaStream_t);
SPAM_ELEMENT_ALGORITHMS(SPAM_INSTANTIATE)
#undef SPAM_INSTANTIATE

}  // namespace spam::cuda
