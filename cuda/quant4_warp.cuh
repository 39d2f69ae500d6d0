// quant4_warp.cuh — warp-level statistics of one 4-bit quantisation group, shared by the
// quantisers (quant4.cu) and the fused packed-weight optimizer step (packed_step.cu).
//
// One warp owns one group: the 32 lanes stride over it, each keeps partial statistics in
// registers, and a 5-step xor butterfly merges them so that every lane ends with the group's
// statistics (no shared memory, no block barrier). The statistics are exact summaries (min/max;
// top-2 magnitudes under "larger |x|, then lower index" plus the third magnitude), so the merge
// order cannot change the result and the GPU agrees with the CPU bit for bit.
#pragma once

#include <cstdint>

#include "../cpp/spam/quant4.h"
#include "common.cuh"

namespace spam::q4 {
namespace warp {

constexpr int kWarp = cuda::kWarpSize;
constexpr unsigned kFull = 0xffffffffu;

struct WarpGroup {
  int64_t g, begin;
  int n;  // elements in this group (the tail group of an activation may be shorter)
};

__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x) % kWarp; }

__device__ __forceinline__ WarpGroup warp_group(int64_t g, int64_t numel, int64_t group) {
  const int64_t begin = g * group;
  const int64_t n = numel - begin < group ? numel - begin : group;
  return WarpGroup{g, begin, static_cast<int>(n)};
}

// ----------------------------------------------------------------- warp statistics
struct MinMaxBad {
  float lo, hi;
  unsigned bad;
};

__device__ __forceinline__ MinMaxBad warp_min_max(MinMaxBad s) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    s.lo = minf(s.lo, __shfl_xor_sync(kFull, s.lo, o));
    s.hi = maxf(s.hi, __shfl_xor_sync(kFull, s.hi, o));
    s.bad |= __shfl_xor_sync(kFull, s.bad, o);
  }
  return s;
}

struct Entry {
  float v;
  int i;  // -1: empty
};

__device__ __forceinline__ bool before(Entry a, Entry b) {
  return a.v > b.v || (a.v == b.v && a.i >= 0 && (b.i < 0 || a.i < b.i));
}

// Exact top-2 (with indices) and third magnitude of the union of two lanes' summaries.
__device__ __forceinline__ Top3 merge(const Top3& a, const Top3& b) {
  Entry e[4] = {{a.v0, int(a.i0)}, {a.v1, int(a.i1)}, {b.v0, int(b.i0)}, {b.v1, int(b.i1)}};
  // 4-element sorting network under before(): (0,1)(2,3)(0,2)(1,3)(1,2)
  auto cmpswap = [&](int x, int y) {
    if (before(e[y], e[x])) {
      const Entry t = e[x];
      e[x] = e[y];
      e[y] = t;
    }
  };
  cmpswap(0, 1);
  cmpswap(2, 3);
  cmpswap(0, 2);
  cmpswap(1, 3);
  cmpswap(1, 2);
  Top3 r;
  r.v0 = e[0].v;
  r.i0 = e[0].i;
  r.v1 = e[1].v;
  r.i1 = e[1].i;
  r.v2 = maxf(e[2].v, maxf(a.v2, b.v2));
  return r;
}

__device__ __forceinline__ Top3 warp_top3(Top3 t) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    Top3 other;
    other.v0 = __shfl_xor_sync(kFull, t.v0, o);
    other.v1 = __shfl_xor_sync(kFull, t.v1, o);
    other.v2 = __shfl_xor_sync(kFull, t.v2, o);
    other.i0 = __shfl_xor_sync(kFull, static_cast<int>(t.i0), o);
    other.i1 = __shfl_xor_sync(kFull, static_cast<int>(t.i1), o);
    t = merge(t, other);
  }
  return t;
}

// `value(j)` yields element j of the group as fp32 (the input, or the requant target).
template <typename V>
__device__ __forceinline__ MinMaxBad lane_min_max(const WarpGroup& w, V&& value) {
  MinMaxBad s{3.402823466e38f, -3.402823466e38f, 0u};
  for (int j = lane_id(); j < w.n; j += kWarp) {
    const float v = value(j);
    const bool ok = finite(v);  // lo/hi over the finite entries (quant4.h "Edge rules")
    s.lo = ok ? minf(s.lo, v) : s.lo;
    s.hi = ok ? maxf(s.hi, v) : s.hi;
    s.bad |= ok ? 0u : 1u;
  }
  return s;
}

// Scans the lane's elements in ascending order, as the CPU scans the group (tie rule).
template <typename V>
__device__ __forceinline__ Top3 lane_top3(const WarpGroup& w, unsigned* bad, V&& value) {
  Top3 t;
  for (int j = lane_id(); j < w.n; j += kWarp) {
    const float v = value(j);
    *bad |= finite(v) ? 0u : 1u;
    t.push(Top3::key(v), j);  // non-finite entries are never outliers
  }
  return t;
}

__device__ __forceinline__ unsigned warp_or(unsigned b) {
  return __any_sync(kFull, b != 0u) ? 1u : 0u;
}

}  // namespace warp
}  // namespace spam::q4
