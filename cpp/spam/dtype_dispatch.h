// dtype_dispatch.h — the one place a runtime DType becomes a storage type, shared by the CPU
// loops and the CUDA launchers (neither core's headers need the other's).
#pragma once

#include "common.h"
#include "half.h"

namespace spam {

// Calls f(type_tag) with the storage type of dtype and returns what f returns.
template <typename T>
struct TypeTag {
  using type = T;
};

template <typename F>
decltype(auto) dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(TypeTag<float>{});
    case DType::kBFloat16:
      return f(TypeTag<bf16_t>{});
    case DType::kFloat16:
      return f(TypeTag<f16_t>{});
  }
  throw Error("spam_lowmem: unsupported dtype");
}

}  // namespace spam
