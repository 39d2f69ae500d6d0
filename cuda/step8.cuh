// step8.cuh — the 8-bit blockwise moment loop of the CUDA optimizer steps (the device twin of
// run_quant8 in cpp/spam/isa/moment_loops.h), its kernel and launcher for the ops of
// element_ops.cuh (the 8-bit twin of dense_step.cuh), and the split of a call's tensors into
// dense and 8-bit groups.
//
// Work split: one warp owns one whole 256-element quantisation block at a time (8 elements a
// lane, lane + 32 k), so the block's new absmax is a warp reduction of shuffles: no barrier,
// no shared scratch, and the 8 warps of a thread block work on 8 quantisation blocks
// independently. Multi-tensor chunks (kChunk = 2^16) are whole quantisation blocks, so a warp
// never shares a quantisation block with another thread block.
//
// Per quantisation block and lane: load 8 codes of m and v, p and g, and the two absmax;
// dequantise (map values from shared memory); run the element function; NaN-sticky max of
// |m| and of v over the warp; requantise with quantize_value (quant8.h): the code of x / divisor.
//
// Map tables:
//   values[256] x 2      shared memory (2 KiB), loaded once per thread block: every element
//                        dequantises through it, with random indices.
//   buckets[2*6145] x 2  int32, 48 KiB each: read from global memory through the read-only
//                        (non-coherent, texture) path. The pointers reach the kernel as
//                        `const int32_t* __restrict__` parameters, which is what lets nvcc
//                        emit ld.global.nc for the lookup inside quantize_code (the same
//                        instruction __ldg produces; checked in the PTX). Copying 96 KiB into
//                        dynamic shared memory per thread block would cost more L2 traffic
//                        than a 64Ki-element chunk's codes, and would cap residency at one or
//                        two blocks per SM for a memory-bound kernel; the entries a step
//                        touches are few (normalised moments span a handful of binades, a
//                        binade is 256 entries = 1 KiB), so they stay resident in L1.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "../cpp/spam/dtype_dispatch.h"
#include "../cpp/spam/half.h"
#include "../cpp/spam/math.h"
#include "../cpp/spam/quant8.h"
#include "../cpp/spam/step_tensors.h"
#include "common.cuh"
#include "multi_tensor.cuh"

namespace spam::cuda {

static_assert(kChunk % kQuantBlock == 0, "a multi-tensor chunk must hold whole 8-bit blocks");
static_assert(kBlockThreads == kQuantCodes, "map values are staged with one thread per entry");

constexpr int kWarps = kBlockThreads / kWarpSize;
// Minimum resident blocks per SM asked of ptxas for the 8-bit update kernels: 4 x 256 threads
// caps them at 64 registers, which they fit without spilling (ptxas -v, sm_80 and sm_90);
// left free they take 80 and only 3 blocks fit. Each thread keeps 4 x 8 loads in flight, so
// either way the SM has far more bytes in flight than HBM latency needs; the extra warps
// hide the table lookups and the shuffle/barrier latency.
constexpr int kQ8MinBlocks = 4;
constexpr int kPerLane = static_cast<int>(kQuantBlock) / kWarpSize;  // 8 elements a lane

// Pointer slots of the 8-bit multi-tensor table (MultiTensorArgs<kQ8Depth, Extra>): six
// pointers a tensor instead of four, so a launch holds 32 tensor slots for SPAM (4-byte
// Extra) and 29 for the Adam-family update (12-byte Extra), with the same 320 block rows.
enum Q8Ptr : int { kQ8Param = 0, kQ8Grad, kQ8MCodes, kQ8MAbsmax, kQ8VCodes, kQ8VAbsmax, kQ8Depth };

// Map values of both maps, the part of the maps that travels with the call-wide arguments
// (the bucket tables travel as separate __restrict__ kernel parameters, see above).
struct MapValues {
  const float* m;
  const float* v;
};

template <typename Args>
void fill_q8_ptrs(Args& a, int slot, const TensorRef& param, const TensorRef& grad,
                  const Quant8Moments& q) {
  a.ptr[kQ8Param][slot] = param.data;
  a.ptr[kQ8Grad][slot] = grad.data;
  a.ptr[kQ8MCodes][slot] = q.m_codes;
  a.ptr[kQ8MAbsmax][slot] = q.m_absmax;
  a.ptr[kQ8VCodes][slot] = q.v_codes;
  a.ptr[kQ8VAbsmax][slot] = q.v_absmax;
}

// Whether a tensor of a call is a packed 4-bit weight (only dense-step tensors can be).
template <typename Tensor, typename = void>
struct HasPacked : std::false_type {};
template <typename Tensor>
struct HasPacked<Tensor, std::void_t<decltype(std::declval<const Tensor&>().q4)>> : std::true_type {
};

template <typename Tensor>
bool is_packed(const Tensor& t) {
  if constexpr (HasPacked<Tensor>::value) return t.q4.active();
  return false;
}

// Tensors of a call split by (storage dtype, 8-bit moments), call order kept within a group,
// packed 4-bit weights left out (the caller launches them through packed_step.cuh);
// group index = 2 * dtype + q8. fn(tag, q8, order) runs for each non-empty group.
template <typename Tensors, typename Fn>
void for_each_kind(const Tensors& tensors, Fn&& fn) {
  std::vector<std::vector<int>> groups(6);
  for (int i = 0; i < static_cast<int>(tensors.size()); ++i) {
    if (is_packed(tensors[i])) continue;  // packed 4-bit weights: packed_step.cu
    groups[2 * static_cast<int>(tensors[i].param.dtype) + (tensors[i].q8.active() ? 1 : 0)]
        .push_back(i);
  }
  for (int k = 0; k < 6; ++k) {
    if (groups[k].empty()) continue;
    dispatch_dtype(static_cast<DType>(k / 2), [&](auto tag) { fn(tag, k % 2 == 1, groups[k]); });
  }
}

// Host-side check of the maps of a call with 8-bit tensors (null pointers would fault).
inline void check_maps(const QuantMaps& maps) {
  SPAM_CHECK(maps.m.values != nullptr && maps.m.buckets != nullptr && maps.v.values != nullptr &&
                 maps.v.buckets != nullptr,
             "8-bit moments need the m and v code maps on the device");
}

#if defined(__CUDACC__)

// Max that keeps a NaN once seen (the CPU's sticky_max): with the "propagate" policy a NaN
// moment must poison its block's absmax, not vanish as it would under fmaxf. Any NaN input
// gives a NaN result whatever the order, so the warp tree agrees with the CPU's loop.
__device__ __forceinline__ float sticky_max(float acc, float x) {
  return (x > acc || x != x) ? x : acc;
}

// Butterfly reduction: every lane ends with the warp's result (all lanes requantise with it).
__device__ __forceinline__ float warp_sticky_max(float x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1)
    x = sticky_max(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// Stages both maps' values in shared memory. Every thread of the block must call it (barrier).
__device__ __forceinline__ void stage_map_values(const MapValues& maps,
                                                 float (&values)[2][kQuantCodes]) {
  values[0][threadIdx.x] = maps.m[threadIdx.x];
  values[1][threadIdx.x] = maps.v[threadIdx.x];
  __syncthreads();
}

// One chunk [r.begin, r.end) of one tensor with 8-bit moments; r.begin is a multiple of
// kQuantBlock. fn(p, g, m, v) -> ElementFlags is the optimizer's element function (math.h).
// Warp-uniform control flow around every shuffle: the loop bound depends on the warp only.
template <typename T, typename Args, typename Fn>
__device__ __forceinline__ void quant8_chunk(const Args& args, const ChunkRange& r,
                                             const QuantMap& m_map, const QuantMap& v_map,
                                             const Fn& fn, int& clipped, int& nonfinite) {
  T* __restrict__ p = static_cast<T*>(args.ptr[kQ8Param][r.slot]);
  const T* __restrict__ g = static_cast<const T*>(args.ptr[kQ8Grad][r.slot]);
  uint8_t* __restrict__ m_codes = static_cast<uint8_t*>(args.ptr[kQ8MCodes][r.slot]);
  float* __restrict__ m_absmax = static_cast<float*>(args.ptr[kQ8MAbsmax][r.slot]);
  uint8_t* __restrict__ v_codes = static_cast<uint8_t*>(args.ptr[kQ8VCodes][r.slot]);
  float* __restrict__ v_absmax = static_cast<float*>(args.ptr[kQ8VAbsmax][r.slot]);
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;

  for (int64_t b0 = r.begin + int64_t{warp} * kQuantBlock; b0 < r.end;
       b0 += int64_t{kWarps} * kQuantBlock) {
    const int64_t block = b0 / kQuantBlock;
    // Every lane reads the old absmax before the shuffles below, and lane 0 writes the new
    // one only after them, so the read-modify-write of absmax needs no further ordering.
    const float m_scale = m_absmax[block], v_scale = v_absmax[block];
    float pr[kPerLane], gr[kPerLane], mr[kPerLane], vr[kPerLane];
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {  // all loads first: 4 x 8 independent loads in flight
      const int64_t i = b0 + j * kWarpSize + lane;
      const bool in = i < r.end;
      pr[j] = in ? Storage<T>::load(p, i) : 0.0f;
      gr[j] = in ? Storage<T>::load(g, i) : 0.0f;
      mr[j] = in ? dequantize_code(m_codes[i], m_scale, m_map) : 0.0f;
      vr[j] = in ? dequantize_code(v_codes[i], v_scale, v_map) : 0.0f;
    }
    // 0 is the CPU's starting value too; lanes past the end contribute it unchanged.
    float m_max = 0.0f, v_max = 0.0f;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int64_t i = b0 + j * kWarpSize + lane;
      if (i < r.end) {
        const ElementFlags f = fn(pr[j], gr[j], mr[j], vr[j]);
        Storage<T>::store(p, i, pr[j]);
        clipped += f.clipped;
        nonfinite += f.nonfinite;
        m_max = sticky_max(m_max, fabsf(mr[j]));
        v_max = sticky_max(v_max, vr[j]);
      }
    }
    m_max = warp_sticky_max(m_max);
    v_max = warp_sticky_max(v_max);
    if (lane == 0) {
      m_absmax[block] = m_max;
      v_absmax[block] = v_max;
    }
    // True IEEE division (nvcc's default -prec-div=true), as on the CPU: same codes.
    const float m_div = quant_divisor(m_max), v_div = quant_divisor(v_max);
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int64_t i = b0 + j * kWarpSize + lane;
      if (i < r.end) {
        m_codes[i] = quantize_value(mr[j], m_div, m_map);
        v_codes[i] = quantize_value(vr[j], v_div, v_map);
      }
    }
  }
}

// The 8-bit shell of an op (element_ops.cuh): the twin of dense_step_kernel. The bucket
// tables are separate __restrict__ parameters so their lookups use the read-only cache.
template <typename T, typename Op>
__global__ void __launch_bounds__(kBlockThreads, kQ8MinBlocks)
    quant8_step_kernel(const __grid_constant__ MultiTensorArgs<kQ8Depth, typename Op::Extra> args,
                       const Op op, int64_t* counters, const MapValues values,
                       const int32_t* __restrict__ m_buckets,
                       const int32_t* __restrict__ v_buckets) {
  __shared__ float map_values[2][kQuantCodes];
  stage_map_values(values, map_values);
  const ChunkRange r = chunk_range(args);
  const auto fn = op.element(args.extra[r.slot]);
  const QuantMap m_map{map_values[0], nullptr, m_buckets};
  const QuantMap v_map{map_values[1], nullptr, v_buckets};
  int clipped = 0, nonfinite = 0;
  quant8_chunk<T>(args, r, m_map, v_map, fn, clipped, nonfinite);
  block_add_counts(counters, clipped, nonfinite);
}

// Enqueues the tensors `order` (indices into `tensors`, all of storage type T, 8-bit moments)
// in multi-tensor launches; extra_of(i) -> Op::Extra as for launch_dense_step.
template <typename T, typename Op, typename Tensors, typename ExtraOf>
void launch_quant8_step(const Tensors& tensors, const std::vector<int>& order, const Op& op,
                        ExtraOf&& extra_of, const QuantMaps& maps, int64_t* counters,
                        cudaStream_t stream) {
  using Args = MultiTensorArgs<kQ8Depth, typename Op::Extra>;
  static_assert(
      sizeof(Args) + sizeof(Op) + sizeof(counters) + sizeof(MapValues) + 2 * sizeof(void*) <= 4096,
      "kernel arguments exceed 4 KB");
  const MapValues values{maps.m.values, maps.v.values};
  multi_tensor_apply<Args>(
      order, [&](int i) { return tensors[i].param.numel; },
      [&](Args& a, int slot, int i) {
        fill_q8_ptrs(a, slot, tensors[i].param, tensors[i].grad, tensors[i].q8);
        a.extra[slot] = extra_of(i);
      },
      [&](const Args& a, int blocks) {
        quant8_step_kernel<T, Op><<<blocks, kBlockThreads, 0, stream>>>(
            a, op, counters, values, maps.m.buckets, maps.v.buckets);
        check_launch();
      });
}

#endif  // __CUDACC__

}  // namespace spam::cuda
