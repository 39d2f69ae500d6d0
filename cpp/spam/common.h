// common.h — types shared by every translation unit of the core (CPU and CUDA).
//
// The core never sees torch or nanobind: bindings turn DLPack arrays into the
// plain views below, and kernels work on those. Sizes are int64 end to end.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#define SPAM_HD __host__ __device__ __forceinline__
#else
#define SPAM_HD inline
#endif

namespace spam {

// Storage dtype of a parameter / gradient / moment buffer. Math is always fp32.
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::kFloat32:
      return "float32";
    case DType::kBFloat16:
      return "bfloat16";
    case DType::kFloat16:
      return "float16";
  }
  return "unknown";
}

// A contiguous buffer handed over by the caller. The core never allocates or
// frees tensor memory (torch owns all allocation, so its allocator stats stay honest).
struct TensorRef {
  void* data = nullptr;
  int64_t numel = 0;
  DType dtype = DType::kFloat32;
};

// Errors are exceptions (nanobind turns them into Python exceptions); never exit().
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

#define SPAM_CHECK(cond, msg)                                               \
  do {                                                                      \
    if (!(cond)) throw ::spam::Error(std::string("spam_lowmem: ") + (msg)); \
  } while (0)

}  // namespace spam
