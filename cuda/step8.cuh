// step8.cuh — the 8-bit blockwise moment loop of the CUDA optimizer steps (the device twin of
// run_quant8 in cpp/spam/isa/moment_loops.h), its kernel and launcher for the ops of
// element_ops.cuh (the 8-bit twin of dense_step.cuh), and the split of a call's tensors into
// dense and 8-bit groups.
//
// Work split: one warp owns one whole quantisation block (<= 256 elements) at a time (8
// elements a lane, lane + 32 k), so the block's new absmax is a warp reduction of shuffles: no
// barrier, no shared scratch, and the 8 warps of a thread block work on 8 quantisation blocks
// independently. Tensors with flat blocks (1-D, or rows of whole blocks) run the flat kernel:
// multi-tensor chunks (kChunk = 2^16) are whole blocks. Tensors whose blocks restart at rows of
// other lengths (quant8.h, BlockRows; the layout travels with each tensor slot, Q8Extra) run
// the row kernel, launched apart: a chunk need not hold whole blocks there, so a thread block
// takes the blocks whose start lies in its chunk (as the CPU's run_quant8), and a block belongs
// to exactly one thread block whichever chunk it ends in. (One kernel for both would give the
// flat loop the row walk's register pressure: at 64 registers it spilled. Apart, the flat
// kernel is the loop of before the row layout, spill-free; the row kernel spills 12-28 bytes,
// loop-invariant values reloaded once per block, ptxas -v sm_90.)
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

// Flat blocks (1-D tensors, rows of whole blocks) then start on a chunk's first element.
static_assert(kChunk % kQuantBlock == 0, "flat 8-bit blocks must not straddle chunks");
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
// Extra) and 29 for the Adam-family update (12-byte Extra), with the same 320 block rows
// (the row kernel's entries are 16 bytes larger: 24 and 22 slots).
enum Q8Ptr : int { kQ8Param = 0, kQ8Grad, kQ8MCodes, kQ8MAbsmax, kQ8VCodes, kQ8VAbsmax, kQ8Depth };

// The per-slot entry of the 8-bit table for tensors whose blocks restart at each row: the op's
// per-tensor scalars and the tensor's block layout (16 bytes more a slot than flat tensors').
template <typename Extra>
struct Q8Extra {
  Extra op;
  BlockRows rows;
};

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

// One quantisation block of one tensor with 8-bit moments, by one warp: elements [b0, b_end)
// (b_end - b0 <= kQuantBlock; lanes past b_end are masked), absmax entry `block`.
template <typename T, typename Fn>
__device__ __forceinline__ void quant8_warp_block(
    T* __restrict__ p, const T* __restrict__ g, uint8_t* __restrict__ m_codes,
    uint8_t* __restrict__ v_codes, float* __restrict__ m_absmax, float* __restrict__ v_absmax,
    int64_t b0, int64_t b_end, int64_t block, const QuantMap& m_map, const QuantMap& v_map,
    const Fn& fn, int& clipped, int& nonfinite) {
  const int lane = threadIdx.x % kWarpSize;
  // Every lane reads the old absmax before the shuffles below, and lane 0 writes the new
  // one only after them, so the read-modify-write of absmax needs no further ordering.
  const float m_scale = m_absmax[block], v_scale = v_absmax[block];
  float pr[kPerLane], gr[kPerLane], mr[kPerLane], vr[kPerLane];
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {  // all loads first: 4 x 8 independent loads in flight
    const int64_t i = b0 + j * kWarpSize + lane;
    const bool in = i < b_end;
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
    if (i < b_end) {
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
    if (i < b_end) {
      m_codes[i] = quantize_value(mr[j], m_div, m_map);
      v_codes[i] = quantize_value(vr[j], v_div, v_map);
    }
  }
}

// The blocks of one chunk as one warp walks them when they restart at each row, in int32
// offsets from the chunk (r.begin, and its first block): the blocks that start in a chunk end
// less than kQuantBlock past it, so every offset stays below kChunk + kQuantBlock (int64 walk
// state costs registers the kernel, held to 64 a thread by kQ8MinBlocks, does not have). A
// row longer than kFarRow is clamped to it: its end lies beyond any block the walk reaches.
constexpr int kFarRow = 1 << 30;
static_assert(kChunk + kQuantBlock < kFarRow, "chunk offsets must stay below the clamp");

struct ChunkBlocks {
  int block;    // from the chunk's first block
  int blocks;   // blocks starting in the chunk
  int start;    // first element, from r.begin
  int row_end;  // end of start's row, from r.begin (clamped to kFarRow)
  int row_len;  // clamped to kFarRow
  // Elements of the block (<= kQuantBlock: a row's last block may be partial).
  __device__ __forceinline__ int len() const {
    const int left = row_end - start;
    return left < static_cast<int>(kQuantBlock) ? left : static_cast<int>(kQuantBlock);
  }
};

__device__ __forceinline__ int clamp_far(int64_t x) {
  return x < kFarRow ? static_cast<int>(x) : kFarRow;
}

// The chunk's first block (its absmax index in *first) and the walk positioned on it.
__device__ __forceinline__ ChunkBlocks chunk_blocks(const BlockRows& rows, const ChunkRange& r,
                                                    int64_t* first) {
  *first = rows.first_block_at_or_after(r.begin);
  const int64_t last = rows.first_block_at_or_after(r.end);
  const BlockWalk w = walk_at(rows, *first);
  const int64_t row_end = w.start - w.col + rows.row_len;
  return ChunkBlocks{0, static_cast<int>(last - *first), static_cast<int>(w.start - r.begin),
                     clamp_far(row_end - r.begin), clamp_far(rows.row_len)};
}

// The next block: it starts where this one ends (walk_next of quant8.h, in chunk offsets).
__device__ __forceinline__ void next_block(ChunkBlocks& c) {
  ++c.block;
  c.start += c.len();
  if (c.start >= c.row_end)
    c.row_end = c.row_end + c.row_len < kFarRow ? c.row_end + c.row_len : kFarRow;
}

// The pointers of one tensor slot of the 8-bit table.
template <typename T>
struct Q8Slot {
  T* p;
  const T* g;
  uint8_t* m_codes;
  float* m_absmax;
  uint8_t* v_codes;
  float* v_absmax;
};

template <typename T, typename Args>
__device__ __forceinline__ Q8Slot<T> q8_slot(const Args& args, int slot) {
  return Q8Slot<T>{static_cast<T*>(args.ptr[kQ8Param][slot]),
                   static_cast<const T*>(args.ptr[kQ8Grad][slot]),
                   static_cast<uint8_t*>(args.ptr[kQ8MCodes][slot]),
                   static_cast<float*>(args.ptr[kQ8MAbsmax][slot]),
                   static_cast<uint8_t*>(args.ptr[kQ8VCodes][slot]),
                   static_cast<float*>(args.ptr[kQ8VAbsmax][slot])};
}

// One chunk [r.begin, r.end) of a tensor with flat blocks (1-D tensors, rows of whole blocks):
// kChunk is a multiple of kQuantBlock, so the chunk's blocks are its own 256-element pieces, the
// last one ending with the tensor. Warp w takes the chunk's blocks w, w + kWarps, ... fn(p, g,
// m, v) -> ElementFlags is the optimizer's element function (math.h). Warp-uniform control flow
// around every shuffle: the loop bound depends on the warp only.
template <typename T, typename Fn>
__device__ __forceinline__ void quant8_flat_chunk(const Q8Slot<T>& s, const ChunkRange& r,
                                                  const QuantMap& m_map, const QuantMap& v_map,
                                                  const Fn& fn, int& clipped, int& nonfinite) {
  const int warp = threadIdx.x / kWarpSize;
  for (int64_t b0 = r.begin + int64_t{warp} * kQuantBlock; b0 < r.end;
       b0 += int64_t{kWarps} * kQuantBlock)
    quant8_warp_block(s.p, s.g, s.m_codes, s.v_codes, s.m_absmax, s.v_absmax, b0, r.end,
                      b0 / kQuantBlock, m_map, v_map, fn, clipped, nonfinite);
}

// One chunk of a tensor whose blocks restart at each row (`rows`): the blocks whose start lies
// in [r.begin, r.end); a block may run past r.end, never past its row. Warps as above.
template <typename T, typename Fn>
__device__ __forceinline__ void quant8_row_chunk(const Q8Slot<T>& s, const ChunkRange& r,
                                                 const BlockRows& rows, const QuantMap& m_map,
                                                 const QuantMap& v_map, const Fn& fn, int& clipped,
                                                 int& nonfinite) {
  const int warp = threadIdx.x / kWarpSize;
  int64_t first = 0;
  ChunkBlocks c = chunk_blocks(rows, r, &first);
  // The pointers moved to the chunk's first element and first block, so that the walk's int32
  // offsets index them (fewer live registers than int64 positions).
  const Q8Slot<T> at{s.p + r.begin,      s.g + r.begin,       s.m_codes + r.begin,
                     s.m_absmax + first, s.v_codes + r.begin, s.v_absmax + first};
  for (int k = 0; k < warp; ++k) next_block(c);
  while (c.block < c.blocks) {
    quant8_warp_block(at.p, at.g, at.m_codes, at.v_codes, at.m_absmax, at.v_absmax, c.start,
                      c.start + c.len(), c.block, m_map, v_map, fn, clipped, nonfinite);
    for (int k = 0; k < kWarps; ++k) next_block(c);
  }
}

// The 8-bit shell of an op (element_ops.cuh): the twin of dense_step_kernel. kRows: the
// launch's tensors have blocks restarting at each row and their table entries carry the layout
// (Q8Extra); flat tensors get a kernel of their own, the loop of before the row layout, whose
// registers (64 a thread, kQ8MinBlocks) the row walk would overflow into spills. The bucket
// tables are separate __restrict__ parameters so their lookups use the read-only cache.
template <typename Extra, bool kRows>
using Q8TableExtra = std::conditional_t<kRows, Q8Extra<Extra>, Extra>;

template <typename T, typename Op, bool kRows>
__global__ void __launch_bounds__(kBlockThreads, kQ8MinBlocks) quant8_step_kernel(
    const __grid_constant__ MultiTensorArgs<kQ8Depth, Q8TableExtra<typename Op::Extra, kRows>> args,
    const Op op, int64_t* counters, const MapValues values, const int32_t* __restrict__ m_buckets,
    const int32_t* __restrict__ v_buckets) {
  __shared__ float map_values[2][kQuantCodes];
  stage_map_values(values, map_values);
  const ChunkRange r = chunk_range(args);
  const QuantMap m_map{map_values[0], nullptr, m_buckets};
  const QuantMap v_map{map_values[1], nullptr, v_buckets};
  const Q8Slot<T> s = q8_slot<T>(args, r.slot);
  int clipped = 0, nonfinite = 0;
  if constexpr (kRows) {
    const Q8Extra<typename Op::Extra>& extra = args.extra[r.slot];
    quant8_row_chunk(s, r, extra.rows, m_map, v_map, op.element(extra.op), clipped, nonfinite);
  } else {
    quant8_flat_chunk(s, r, m_map, v_map, op.element(args.extra[r.slot]), clipped, nonfinite);
  }
  block_add_counts(counters, clipped, nonfinite);
}

// Enqueues the tensors `order` (all of storage type T, 8-bit moments, flat or restarting at
// each row as kRows says) in multi-tensor launches; extra_of(i) -> Op::Extra.
template <typename T, bool kRows, typename Op, typename Tensors, typename ExtraOf>
void launch_quant8_kind(const Tensors& tensors, const std::vector<int>& order, const Op& op,
                        ExtraOf&& extra_of, const QuantMaps& maps, int64_t* counters,
                        cudaStream_t stream) {
  using Args = MultiTensorArgs<kQ8Depth, Q8TableExtra<typename Op::Extra, kRows>>;
  static_assert(
      sizeof(Args) + sizeof(Op) + sizeof(counters) + sizeof(MapValues) + 2 * sizeof(void*) <= 4096,
      "kernel arguments exceed 4 KB");
  const MapValues values{maps.m.values, maps.v.values};
  multi_tensor_apply<Args>(
      order, [&](int i) { return tensors[i].param.numel; },
      [&](Args& a, int slot, int i) {
        fill_q8_ptrs(a, slot, tensors[i].param, tensors[i].grad, tensors[i].q8);
        if constexpr (kRows)
          a.extra[slot] = Q8Extra<typename Op::Extra>{extra_of(i), tensors[i].q8.rows};
        else
          a.extra[slot] = extra_of(i);
      },
      [&](const Args& a, int blocks) {
        quant8_step_kernel<T, Op, kRows><<<blocks, kBlockThreads, 0, stream>>>(
            a, op, counters, values, maps.m.buckets, maps.v.buckets);
        check_launch();
      });
}

// Enqueues the tensors `order` (indices into `tensors`, all of storage type T, 8-bit moments):
// those with flat blocks and those whose blocks restart at each row in launches of their own.
template <typename T, typename Op, typename Tensors, typename ExtraOf>
void launch_quant8_step(const Tensors& tensors, const std::vector<int>& order, const Op& op,
                        ExtraOf&& extra_of, const QuantMaps& maps, int64_t* counters,
                        cudaStream_t stream) {
  std::vector<int> flat, rows;
  for (const int i : order)
    (tensors[i].q8.rows.flat(tensors[i].param.numel) ? flat : rows).push_back(i);
  if (!flat.empty())
    launch_quant8_kind<T, false>(tensors, flat, op, extra_of, maps, counters, stream);
  if (!rows.empty())
    launch_quant8_kind<T, true>(tensors, rows, op, extra_of, maps, counters, stream);
}

#endif  // __CUDACC__

}  // namespace spam::cuda
