// quant4.cu — CUDA 4-bit quantisers: fake quantisation, nibble pack/unpack and the
// stochastic-rounding re-quantisation of packed weights (same results as quant4_cpu.cpp).
//
// One warp per group: the 32 lanes stride over the group (coalesced), merge their statistics
// with the warp butterflies of quant4_warp.cuh (exact, so CPU and GPU agree bit for bit), then
// write. Scalar rules: cpp/spam/quant4.h.
#include "../cpp/spam/dtype_dispatch.h"
#include "../cpp/spam/cuda_quant4_api.h"
#include "../cpp/spam/half.h"
#include "../cpp/spam/quant4.h"
#include "common.cuh"
#include "quant4_warp.cuh"

namespace spam::q4 {
namespace {

using namespace warp;  // NOLINT: warp statistics (quant4_warp.cuh)
using cuda::check_launch;
using cuda::DeviceGuard;
using cuda::to_stream;
constexpr int kThreads = cuda::kBlockThreads;
constexpr int kWarpsPerBlock = kThreads / kWarp;

int grid_for(int64_t groups) {
  const int64_t blocks = (groups + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return static_cast<int>(blocks < (int64_t{1} << 20) ? (blocks > 0 ? blocks : 1)
                                                      : (int64_t{1} << 20));
}

// ----------------------------------------------------------------- fake quantisation
enum class Fake { kWeightInt4, kActInt4, kFp4 };

template <typename T, Fake K>
__global__ void __launch_bounds__(kThreads)
    fake_kernel(const T* __restrict__ in, T* __restrict__ out, int64_t numel, int64_t group) {
  const int64_t groups = (numel + group - 1) / group;
  const int64_t stride = int64_t{gridDim.x} * kWarpsPerBlock;
  for (int64_t g = int64_t{blockIdx.x} * kWarpsPerBlock + threadIdx.x / kWarp; g < groups;
       g += stride) {
    const WarpGroup w = warp_group(g, numel, group);
    auto value = [&](int j) { return Storage<T>::load(in, w.begin + j); };
    if constexpr (K == Fake::kWeightInt4) {
      MinMaxBad s = warp_min_max(lane_min_max(w, value));
      const Int4Grid grid = int4_weight_grid(s.lo, s.hi);
      for (int j = lane_id(); j < w.n; j += kWarp) {
        const float v = Storage<T>::load(in, w.begin + j);
        Storage<T>::store(out, w.begin + j, int4_weight_fake(v, grid));
      }
    } else {
      unsigned bad = 0;
      const Top3 t = warp_top3(lane_top3(w, &bad, value));
      const float s = K == Fake::kActInt4 ? act_scale(t.rest_max()) : fp4_step(t.rest_max());
      for (int j = lane_id(); j < w.n; j += kWarp) {
        const float v = Storage<T>::load(in, w.begin + j);
        const float r =
            t.is_outlier(j) ? v : (K == Fake::kActInt4 ? int4_act_fake(v, s) : fp4_fake(v, s));
        Storage<T>::store(out, w.begin + j, r);
      }
    }
  }
}

// ----------------------------------------------------------------- pack / requantise
// RTN packing (kSr = false) or stochastic re-quantisation against the old grid (kSr = true).
template <typename T, bool kSr>
__global__ void __launch_bounds__(kThreads)
    pack_kernel(const T* __restrict__ x, Packed p, Format fmt, int64_t numel, int64_t group,
                uint64_t key, int64_t* bad_groups) {
  const int64_t groups = numel / group;
  const int64_t stride = int64_t{gridDim.x} * kWarpsPerBlock;
  for (int64_t g = int64_t{blockIdx.x} * kWarpsPerBlock + threadIdx.x / kWarp; g < groups;
       g += stride) {
    const WarpGroup w = warp_group(g, numel, group);
    uint8_t* codes = p.codes + w.begin / 2;
    // RTN: the input; SR: the target built from the old packed value (read before any lane
    // writes: the butterflies below are the warp's barrier, and a lane rewrites only bytes it
    // read itself)
    auto value = [&](int j) -> float {
      const float v = Storage<T>::load(x, w.begin + j);
      if constexpr (kSr) return sr_target<T>(v, packed_value(p, fmt, group, g, j));
      return v;
    };
    if (fmt == Format::kInt4) {
      const MinMaxBad s = warp_min_max(lane_min_max(w, value));
      if (s.bad) {
        if (lane_id() == 0) atomicAdd(reinterpret_cast<unsigned long long*>(bad_groups), 1ull);
        continue;
      }
      const Int4Grid grid = kSr ? int4_requant_grid(p.scale[g], float(p.zero[g]), s.lo, s.hi)
                                : int4_weight_grid(s.lo, s.hi);
      for (int j = 2 * lane_id(); j < w.n; j += 2 * kWarp) {
        float c[2];
#pragma unroll
        for (int k = 0; k < 2; ++k) {
          const float v = value(j + k);
          c[k] = kSr ? int4_sr_code(v, grid, sr_uniform(key, w.begin + j + k))
                     : int4_weight_code(v, grid);
        }
        codes[j / 2] = pack_nibbles(static_cast<uint32_t>(c[0]), static_cast<uint32_t>(c[1]));
      }
      __syncwarp();  // every lane is done reading the old scale/zero before lane 0 rewrites them
      if (lane_id() == 0) {
        p.scale[g] = grid.scale;
        p.zero[g] = static_cast<uint8_t>(grid.zero);
      }
    } else {
      unsigned bad = 0;
      const Top3 t = warp_top3(lane_top3(w, &bad, value));
      if (warp_or(bad)) {
        if (lane_id() == 0) atomicAdd(reinterpret_cast<unsigned long long*>(bad_groups), 1ull);
        continue;
      }
      const float step = kSr ? fp4_requant_step(p.scale[g], t.rest_max()) : fp4_step(t.rest_max());
      float outlier[2] = {0.f, 0.f};
      for (int j = 2 * lane_id(); j < w.n; j += 2 * kWarp) {
        float c[2];
#pragma unroll
        for (int k = 0; k < 2; ++k) {
          const float v = value(j + k);
          const float level =
              kSr ? fp4_sr_level(v, step, sr_uniform(key, w.begin + j + k)) : fp4_level(v, step);
          c[k] = t.is_outlier(j + k) ? float(kFp4Zero) : level + float(kFp4Zero);
          if (j + k == t.i0) outlier[0] = v;
          if (j + k == t.i1) outlier[1] = v;
        }
        codes[j / 2] = pack_nibbles(static_cast<uint32_t>(c[0]), static_cast<uint32_t>(c[1]));
      }
      // the lanes that met the outliers hand their values to lane 0
      outlier[0] = __shfl_sync(kFull, outlier[0], static_cast<int>((t.i0 / 2) % kWarp));
      outlier[1] = __shfl_sync(kFull, outlier[1], static_cast<int>((t.i1 / 2) % kWarp));
      __syncwarp();  // every lane is done reading the old metadata before lane 0 rewrites it
      if (lane_id() == 0) {
        p.scale[g] = step;
        p.outlier_idx[2 * g] = static_cast<int16_t>(t.i0);
        p.outlier_idx[2 * g + 1] = static_cast<int16_t>(t.i1);
        p.outlier_val[2 * g] = outlier[0];
        p.outlier_val[2 * g + 1] = outlier[1];
      }
    }
  }
}

// One thread per byte (two elements); fp4 outliers are resolved per element, so no two
// threads write the same output.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    unpack_kernel(Packed p, T* __restrict__ out, Format fmt, int64_t numel, int64_t group) {
  const int64_t bytes = numel / 2;
  for (int64_t b = int64_t{blockIdx.x} * kThreads + threadIdx.x; b < bytes;
       b += int64_t{gridDim.x} * kThreads) {
    const int64_t i = 2 * b;
    const int64_t g = i / group;
    const int64_t j = i - g * group;
    const float scale = p.scale[g];
    const float zero = fmt == Format::kInt4 ? float(p.zero[g]) : float(kFp4Zero);
    const uint32_t byte = p.codes[b];
    float v[2] = {int4_dequant(float(byte & 0xfu), zero, scale),
                  int4_dequant(float(byte >> 4), zero, scale)};
    if (fmt == Format::kFp4) {
      const int o0 = p.outlier_idx[2 * g], o1 = p.outlier_idx[2 * g + 1];
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        if (j + k == o0) v[k] = p.outlier_val[2 * g];
        if (j + k == o1) v[k] = p.outlier_val[2 * g + 1];
      }
    }
    Storage<T>::store(out, i, v[0]);
    Storage<T>::store(out, i + 1, v[1]);
  }
}

void check_group(int64_t group) {
  SPAM_CHECK(group > 0 && group <= (int64_t{1} << 30), "group size must be in [1, 2^30]");
}

template <Fake K>
void launch_fake(const TensorRef& in, const TensorRef& out, int64_t group, int device,
                 uintptr_t stream) {
  SPAM_CHECK(group > 0, "group size must be positive");
  if (in.numel == 0) return;
  // a group longer than the tensor is the tensor (one tail group): same result, and the
  // 2^30 bound below then limits the group actually processed, not the request
  if (group > in.numel) group = in.numel;
  check_group(group);
  DeviceGuard guard(device);
  const int grid = grid_for((in.numel + group - 1) / group);
  dispatch_dtype(in.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    fake_kernel<T, K><<<grid, kThreads, 0, to_stream(stream)>>>(
        static_cast<const T*>(in.data), static_cast<T*>(out.data), in.numel, group);
  });
  check_launch();
}

template <bool kSr>
void launch_pack_impl(const TensorRef& w, const Packed& p, Format fmt, int64_t group, uint64_t key,
                      int64_t* bad, int device, uintptr_t stream) {
  check_group(group);
  SPAM_CHECK(group % 2 == 0 && w.numel % group == 0,
             "packed storage needs an even group dividing numel");
  if (w.numel == 0) return;
  DeviceGuard guard(device);
  dispatch_dtype(w.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    pack_kernel<T, kSr><<<grid_for(w.numel / group), kThreads, 0, to_stream(stream)>>>(
        static_cast<const T*>(w.data), p, fmt, w.numel, group, key, bad);
  });
  check_launch();
}

}  // namespace

void launch_fake_weight_int4(const TensorRef& in, const TensorRef& out, int64_t group, int device,
                             uintptr_t stream) {
  launch_fake<Fake::kWeightInt4>(in, out, group, device, stream);
}
void launch_fake_act_int4(const TensorRef& in, const TensorRef& out, int64_t group, int device,
                          uintptr_t stream) {
  launch_fake<Fake::kActInt4>(in, out, group, device, stream);
}
void launch_fake_fp4(const TensorRef& in, const TensorRef& out, int64_t group, int device,
                     uintptr_t stream) {
  launch_fake<Fake::kFp4>(in, out, group, device, stream);
}

void launch_pack(const TensorRef& w, const Packed& p, Format fmt, int64_t group, int64_t* bad,
                 int device, uintptr_t stream) {
  launch_pack_impl<false>(w, p, fmt, group, 0, bad, device, stream);
}

void launch_requant_sr(const TensorRef& w, const Packed& p, Format fmt, int64_t group,
                       uint64_t seed, uint64_t step, int64_t* bad, int device, uintptr_t stream) {
  launch_pack_impl<true>(w, p, fmt, group, sr_key(seed, step), bad, device, stream);
}

void launch_unpack(const Packed& p, const TensorRef& out, Format fmt, int64_t group, int device,
                   uintptr_t stream) {
  check_group(group);
  SPAM_CHECK(group % 2 == 0 && out.numel % group == 0,
             "packed storage needs an even group dividing numel");
  if (out.numel == 0) return;
  DeviceGuard guard(device);
  const int64_t blocks = (out.numel / 2 + kThreads - 1) / kThreads;
  const int grid = static_cast<int>(blocks < (int64_t{1} << 20) ? blocks : (int64_t{1} << 20));
  dispatch_dtype(out.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    unpack_kernel<T><<<grid, kThreads, 0, to_stream(stream)>>>(p, static_cast<T*>(out.data), fmt,
                                                               out.numel, group);
  });
  check_launch();
}

}  // namespace spam::q4
