// quant8_blockwise.cu — blockwise 8-bit quantise / dequantise of whole tensors on CUDA
// (spam_lowmem.functional.quantize_blockwise / dequantize_blockwise), the same rules
// (quant8.h) and results as cpp/spam/isa/quant8_blockwise.cpp.
//
// Quantise: one warp per block (<= 256 elements, laid out by BlockRows: flat or restarting at
// each row, quant8.h), as in the optimizer steps (step8.cuh): 8 values a lane, lanes past the
// block's end masked, a NaN-sticky warp max for the absmax, then quantize_value(x, divisor) per
// value. Dequantise: element-wise (each element finds its block), map values in shared memory. Both
// are grid-stride loops over int64 indices with a capped grid, so any size launches the same small
// grid.
#include <cmath>

#include "../cpp/spam/dtype_dispatch.h"
#include "../cpp/spam/cuda_api.h"
#include "../cpp/spam/half.h"
#include "../cpp/spam/quant8.h"
#include "common.cuh"
#include "step8.cuh"

namespace spam::cuda {
namespace {

// Enough blocks to fill any current GPU several times over (8 blocks of 256 threads per SM
// are resident at most); beyond it the grid-stride loops take over.
constexpr int64_t kMaxGrid = 4096;

int grid_for(int64_t work_items, int64_t items_per_block) {
  const int64_t blocks = (work_items + items_per_block - 1) / items_per_block;
  return static_cast<int>(blocks < kMaxGrid ? blocks : kMaxGrid);
}

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    quantize8_kernel(const T* __restrict__ x, uint8_t* __restrict__ codes,
                     float* __restrict__ absmax, int64_t numel, const BlockRows rows,
                     const int32_t* __restrict__ buckets) {
  const QuantMap map{nullptr, nullptr, buckets};  // quantize_code reads only the buckets
  const int lane = threadIdx.x % kWarpSize;
  const int64_t n_blocks = rows.total(numel);
  const int64_t warps_total = int64_t{gridDim.x} * kWarps;
  // Warp-uniform loop: every lane of a warp runs the same blocks, so the shuffles are safe.
  for (int64_t block = int64_t{blockIdx.x} * kWarps + threadIdx.x / kWarpSize; block < n_blocks;
       block += warps_total) {
    const int64_t b0 = rows.block_start(block);
    const int64_t b_end = b0 + rows.block_len(block);  // <= its row's end
    float xr[kPerLane];
    float amax = 0.0f;  // lanes past the end add 0, the CPU's starting value
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int64_t i = b0 + j * kWarpSize + lane;
      xr[j] = i < b_end ? Storage<T>::load(x, i) : 0.0f;
      amax = sticky_max(amax, fabsf(xr[j]));
    }
    amax = warp_sticky_max(amax);
    if (lane == 0) absmax[block] = amax;
    const float div = quant_divisor(amax);
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int64_t i = b0 + j * kWarpSize + lane;
      if (i < b_end) codes[i] = quantize_value(xr[j], div, map);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    dequantize8_kernel(const uint8_t* __restrict__ codes, const float* __restrict__ absmax,
                       const BlockRows rows, T* __restrict__ out, int64_t numel,
                       const float* __restrict__ values) {
  __shared__ float map_values[kQuantCodes];
  map_values[threadIdx.x] = values[threadIdx.x];
  __syncthreads();
  const QuantMap map{map_values, nullptr, nullptr};
  const int64_t stride = int64_t{gridDim.x} * kBlockThreads;
  for (int64_t i = int64_t{blockIdx.x} * kBlockThreads + threadIdx.x; i < numel; i += stride)
    Storage<T>::store(out, i, dequantize_code(codes[i], absmax[rows.block_of(i)], map));
}

}  // namespace
}  // namespace spam::cuda

namespace spam {

void cuda_quantize_blockwise(const TensorRef& x, uint8_t* codes, float* absmax,
                             const BlockRows& rows, const QuantMap& map, const CudaContext& ctx) {
  if (x.numel <= 0) return;
  SPAM_CHECK(map.buckets != nullptr, "quantize_blockwise needs the map's bucket table");
  cuda::DeviceGuard guard(ctx.device);
  const cudaStream_t stream = cuda::to_stream(ctx.stream);
  const int64_t n_blocks = rows.total(x.numel);
  const int grid = cuda::grid_for(n_blocks, cuda::kWarps);
  dispatch_dtype(x.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    cuda::quantize8_kernel<T><<<grid, cuda::kBlockThreads, 0, stream>>>(
        static_cast<const T*>(x.data), codes, absmax, x.numel, rows, map.buckets);
    cuda::check_launch();
  });
}

void cuda_dequantize_blockwise(const uint8_t* codes, const float* absmax, const BlockRows& rows,
                               const TensorRef& out, const QuantMap& map, const CudaContext& ctx) {
  if (out.numel <= 0) return;
  SPAM_CHECK(map.values != nullptr, "dequantize_blockwise needs the map's values");
  cuda::DeviceGuard guard(ctx.device);
  const cudaStream_t stream = cuda::to_stream(ctx.stream);
  const int grid = cuda::grid_for(out.numel, cuda::kBlockThreads);
  dispatch_dtype(out.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    cuda::dequantize8_kernel<T><<<grid, cuda::kBlockThreads, 0, stream>>>(
        codes, absmax, rows, static_cast<T*>(out.data), out.numel, map.values);
    cuda::check_launch();
  });
}

}  // namespace spam
