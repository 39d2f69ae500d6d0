// quant4_convert.h — argument conversion of the 4-bit quantisers (quant4_entry.h) and of the
// packed weights of a fused step (packed_convert.h): DLPack arrays -> spam::q4::Packed,
// with the size/dtype/device checks that keep a malformed buffer away from a kernel.
#pragma once

#include <string>

#include "../spam/quant4_ops.h"
#include "convert.h"

namespace spam::bind {

inline q4::Format to_format(int fmt) {
  if (fmt != 0 && fmt != 1) throw nb::value_error("spam_lowmem: fmt must be 0 (int4) or 1 (fp4)");
  return static_cast<q4::Format>(fmt);
}

inline void check_group_size(int64_t numel, int64_t group, bool packed) {
  if (group <= 0) throw nb::value_error("spam_lowmem: group_size must be positive");
  if (packed && (group % 2 != 0 || numel % group != 0))
    throw nb::value_error("spam_lowmem: packed storage needs an even group_size dividing numel");
}

// The packed buffers of one weight of `numel` elements; `zero` is required for int4 and the
// outlier buffers for fp4 (None otherwise). `dev` checks all arrays share one device.
inline q4::Packed convert_packed(int64_t numel, int64_t group, q4::Format fmt,
                                 const nb::ndarray<>& codes, const nb::ndarray<>& scale,
                                 const nb::ndarray<>& zero, const nb::ndarray<>& outlier_idx,
                                 const nb::ndarray<>& outlier_val, int device_type,
                                 SameDevice& dev) {
  check_group_size(numel, group, true);
  const int64_t groups = numel / group;
  q4::Packed p;
  p.codes = typed_buffer<uint8_t>(codes, device_type, numel / 2, "codes");
  dev.check(codes, "codes");
  p.scale = typed_buffer<float>(scale, device_type, groups, "scale");
  dev.check(scale, "scale");
  if (fmt == q4::Format::kInt4) {
    if (!zero.is_valid()) throw nb::value_error("spam_lowmem: int4 packing needs 'zero'");
    p.zero = typed_buffer<uint8_t>(zero, device_type, groups, "zero");
    dev.check(zero, "zero");
  } else {
    if (!outlier_idx.is_valid() || !outlier_val.is_valid())
      throw nb::value_error("spam_lowmem: fp4 packing needs 'outlier_idx' and 'outlier_val'");
    if (group > 32767) throw nb::value_error("spam_lowmem: fp4 packing needs group_size <= 32767");
    p.outlier_idx = typed_buffer<int16_t>(outlier_idx, device_type, 2 * groups, "outlier_idx");
    dev.check(outlier_idx, "outlier_idx");
    p.outlier_val = typed_buffer<float>(outlier_val, device_type, 2 * groups, "outlier_val");
    dev.check(outlier_val, "outlier_val");
  }
  return p;
}

// A dense weight (the source or destination of packing) with its format and packed buffers,
// all checked: the argument block every pack/unpack/requant binding starts with.
struct DenseAndPacked {
  TensorRef dense;
  q4::Format fmt;
  q4::Packed packed;
};

inline DenseAndPacked convert_dense_and_packed(const nb::ndarray<>& dense, const char* name,
                                               int fmt, int64_t group, const nb::ndarray<>& codes,
                                               const nb::ndarray<>& scale,
                                               const nb::ndarray<>& zero,
                                               const nb::ndarray<>& outlier_idx,
                                               const nb::ndarray<>& outlier_val, int device_type,
                                               SameDevice& dev) {
  const TensorRef d = float_ref(dense, device_type, name);
  dev.check(dense, name);
  const q4::Format f = to_format(fmt);
  return {d, f,
          convert_packed(d.numel, group, f, codes, scale, zero, outlier_idx, outlier_val,
                         device_type, dev)};
}

// Input and output of a fake quantiser: same numel and dtype (they may be the same array).
inline std::pair<TensorRef, TensorRef> convert_in_out(const nb::ndarray<>& in,
                                                      const nb::ndarray<>& out, int device_type,
                                                      SameDevice& dev) {
  TensorRef a = float_ref(in, device_type, "input");
  dev.check(in, "input");
  TensorRef b = float_ref(out, device_type, "out");
  dev.check(out, "out");
  check_same(a, b, "out");
  return {a, b};
}

}  // namespace spam::bind
