// convert.h — DLPack arrays (nb::ndarray) to the core's TensorRef, with the checks that
// keep bad input from reaching a kernel: device, dtype, C-contiguity, sizes.
//
// Arrays are taken as generic nb::ndarray<> (no dtype/order constraints) and checked here,
// so nanobind never makes an implicit converted copy: a copy would silently drop the
// in-place update (DESIGN.md P9). Anything unexpected raises a Python exception.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <string>

#include "../spam/common.h"

namespace spam::bind {

namespace nb = nanobind;

inline std::string describe(const char* what, size_t index) {
  return std::string(what) + "[" + std::to_string(index) + "]";
}

inline DType float_dtype(const nb::ndarray<>& a, const std::string& name) {
  const nb::dlpack::dtype dt = a.dtype();
  if (dt == nb::dtype<float>()) return DType::kFloat32;
  if (dt.lanes == 1 && dt.bits == 16) {
    if (dt.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat)) return DType::kBFloat16;
    if (dt.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Float)) return DType::kFloat16;
  }
  throw nb::type_error((name + ": expected float32, bfloat16 or float16 data").c_str());
}

inline bool is_c_contiguous(const nb::ndarray<>& a) {
  int64_t expected = 1;
  for (size_t d = a.ndim(); d-- > 0;) {
    if (a.shape(d) != 1 && a.stride(d) != expected) return false;
    expected *= static_cast<int64_t>(a.shape(d));
  }
  return true;
}

inline void check_device(const nb::ndarray<>& a, int device_type, const std::string& name) {
  if (a.device_type() != device_type)
    throw nb::type_error((name + ": tensor is on the wrong device for this backend").c_str());
  if (!is_c_contiguous(a))
    throw nb::type_error((name + ": tensor must be C-contiguous (the core writes in place)").c_str());
}

inline TensorRef float_ref(const nb::ndarray<>& a, int device_type, const std::string& name) {
  check_device(a, device_type, name);
  return TensorRef{a.data(), static_cast<int64_t>(a.size()), float_dtype(a, name)};
}

template <typename T>
T* typed_buffer(const nb::ndarray<>& a, int device_type, int64_t min_numel, const std::string& name) {
  check_device(a, device_type, name);
  if (a.dtype() != nb::dtype<T>())
    throw nb::type_error((name + ": wrong dtype for this buffer").c_str());
  if (static_cast<int64_t>(a.size()) < min_numel)
    throw nb::value_error((name + ": buffer too small").c_str());
  return static_cast<T*>(a.data());
}

// p, g, m, v of one tensor must agree in size and dtype; a mismatch is a caller bug.
inline void check_same(const TensorRef& p, const TensorRef& other, const std::string& name) {
  if (other.numel != p.numel)
    throw nb::value_error((name + ": numel differs from the parameter's").c_str());
  if (other.dtype != p.dtype)
    throw nb::type_error((name + ": dtype differs from the parameter's").c_str());
}

inline void check_lengths(size_t n, size_t m, const char* what) {
  if (n != m)
    throw nb::value_error((std::string("spam_lowmem: list '") + what +
                           "' has a different length from 'params'").c_str());
}

using ArrayList = std::vector<nb::ndarray<>>;

}  // namespace spam::bind
