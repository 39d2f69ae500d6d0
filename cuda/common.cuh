// common.cuh — what every CUDA translation unit of the core shares: error checking that
// throws (never exit(), docs/design.md §3 rule 6), a device guard that restores the caller's
// current device, and deterministic block reductions.
//
// Only CUDA headers and cpp/spam/*.h are included here: no nanobind, Python or torch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "../cpp/spam/common.h"
#include "../cpp/spam/step_tensors.h"  // Counters: the layout of the telemetry buffer

// Turns a CUDA error into spam::Error, which nanobind raises as a Python RuntimeError.
// A sticky error left by an earlier asynchronous kernel also surfaces here.
#define SPAM_CUDA_CHECK(expr)                                                               \
  do {                                                                                      \
    const cudaError_t spam_err_ = (expr);                                                   \
    if (spam_err_ != cudaSuccess)                                                           \
      throw ::spam::Error(std::string("spam_lowmem: CUDA error: ") +                        \
                          cudaGetErrorString(spam_err_) + " (" #expr ") at " __FILE__ ":" + \
                          std::to_string(__LINE__));                                        \
  } while (0)

namespace spam::cuda {

// Every kernel of the core runs blocks of this many threads. The reductions below rely on
// it being a multiple of the warp size and at most 32 warps.
constexpr int kBlockThreads = 256;
constexpr int kWarpSize = 32;
static_assert(kBlockThreads % kWarpSize == 0 && kBlockThreads <= kWarpSize * kWarpSize,
              "block reductions need whole warps, at most 32 of them");

// Makes `device` current for the lifetime of the guard and restores the previous device
// after, so a launcher never leaves the caller's thread on another GPU (torch keeps its own
// notion of the current device, and a silent switch would misplace its next allocation).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    SPAM_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) {
      SPAM_CUDA_CHECK(cudaSetDevice(device));
      switched_ = true;
    }
  }
  ~DeviceGuard() {
    if (switched_) cudaSetDevice(previous_);  // destructor: nothing sensible to do on failure
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

inline cudaStream_t to_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

// Checked after every launch: a bad configuration (too many blocks, too large arguments)
// is reported at the call that caused it instead of at some later, unrelated call.
inline void check_launch() { SPAM_CUDA_CHECK(cudaGetLastError()); }

#if defined(__CUDACC__)

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};

// fmaxf ignores a NaN operand, which makes the max order-independent; callers that must
// propagate NaN (Stable-SPAM's "propagate" policy) detect it through the sum instead.
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1)
    v = op(v, __shfl_down_sync(0xffffffffu, v, offset));
  return v;
}

// Reduces one value per thread over the block; the result is valid in thread 0 only.
// The combination tree is fixed by kBlockThreads, so a sum is bitwise reproducible from run
// to run (no atomics). Every thread of the block must call it (it contains barriers); the
// leading barrier makes back-to-back calls with the same T safe without an extra sync.
template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T identity) {
  __shared__ T warp_partials[kWarpSize];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  v = warp_reduce(v, op);
  __syncthreads();
  if (lane == 0) warp_partials[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kBlockThreads / kWarpSize ? warp_partials[lane] : identity;
    v = warp_reduce(v, op);
  }
  return v;
}

// Adds a block's spike telemetry to the caller's int64 counters [clipped, nonfinite]:
// one block reduction, then at most one atomic per counter and block, and none when the
// block saw nothing (the common case), so the counters cost no host sync and little traffic.
// Counts are >= 0, so an unsigned 64-bit atomic on the int64 buffer adds correctly.
__device__ __forceinline__ void block_add_counts(int64_t* counters, int clipped, int nonfinite) {
  const int c = block_reduce(clipped, SumOp{}, 0);
  const int n = block_reduce(nonfinite, SumOp{}, 0);
  if (threadIdx.x == 0) {
    auto* out = reinterpret_cast<unsigned long long*>(counters);
    if (c != 0) atomicAdd(out + Counters::kClipped, static_cast<unsigned long long>(c));
    if (n != 0) atomicAdd(out + Counters::kNonFinite, static_cast<unsigned long long>(n));
  }
}

#endif  // __CUDACC__

}  // namespace spam::cuda
