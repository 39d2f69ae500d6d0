// packed_convert.h — the optional `packed` / `packed_bad` arguments of the optimizer steps
// (CPU cpu_optim.cpp, CUDA cuda_optim.cpp): which tensors are packed 4-bit weights stepped by
// the fused kernels (PackedParam, cpu_ops.h), and their buffers.
//
// `packed` is None or a list with one entry per tensor: None (a dense parameter) or the tuple
//   (codes, scale, zero, outlier_idx, outlier_val, fmt, group, seed, step)
// with the buffers of quant4_ops.h (zero: int4 only; outliers: fp4 only; the others None),
// fmt 0 (int4) / 1 (fp4), and the stochastic-rounding counter of requantize_. `packed_bad` is
// an int64[1] buffer the kernels add the number of non-finite groups (left unchanged) to.
#pragma once

#include <string>
#include <vector>

#include "../spam/cpu_ops.h"
#include "convert.h"
#include "quant4_convert.h"

namespace spam::bind {

constexpr size_t kPackedFields = 9;

inline nb::ndarray<> optional_array(const nb::handle& h) {
  return h.is_none() ? nb::ndarray<>() : nb::cast<nb::ndarray<>>(h);
}

// One flag per tensor (empty when `packed` is None); checks the list's shape.
inline std::vector<char> packed_mask(const nb::object& packed, size_t n) {
  std::vector<char> mask;
  if (packed.is_none()) return mask;
  if (!nb::isinstance<nb::list>(packed))
    throw nb::type_error("spam_lowmem: 'packed' must be None or a list (one entry per tensor)");
  const nb::list items = nb::borrow<nb::list>(packed);
  check_lengths(n, items.size(), "packed");
  mask.resize(n, 0);
  for (size_t i = 0; i < n; ++i) {
    const nb::handle item = items[i];
    if (item.is_none()) continue;
    if (!nb::isinstance<nb::tuple>(item) || nb::len(item) != kPackedFields)
      throw nb::type_error((describe("packed", i) + ": expected None or (codes, scale, zero, "
                            "outlier_idx, outlier_val, fmt, group, seed, step)").c_str());
    mask[i] = 1;
  }
  return mask;
}

// The PackedParam of every tensor (inactive for dense ones), checked against the gradient's
// numel. Call after convert_step_buffers(..., &mask).
inline std::vector<PackedParam> convert_packed_params(const nb::object& packed,
                                                      const nb::object& packed_bad,
                                                      const std::vector<char>& mask,
                                                      const StepBuffers& b, int device_type,
                                                      SameDevice& dev) {
  std::vector<PackedParam> out(b.g.size());
  bool any = false;
  for (char m : mask) any = any || m;
  if (!any) return out;
  if (packed_bad.is_none())
    throw nb::value_error("spam_lowmem: packed weights need the 'packed_bad' int64[1] counter");
  const nb::ndarray<> bad_arr = nb::cast<nb::ndarray<>>(packed_bad);
  int64_t* bad = typed_buffer<int64_t>(bad_arr, device_type, 1, "packed_bad");
  dev.check(bad_arr, "packed_bad");
  const nb::list items = nb::borrow<nb::list>(packed);
  for (size_t i = 0; i < mask.size(); ++i) {
    if (!mask[i]) continue;
    const nb::tuple t = nb::borrow<nb::tuple>(items[i]);
    PackedParam& q = out[i];
    q.fmt = to_format(nb::cast<int>(t[5]));
    q.group = nb::cast<int64_t>(t[6]);
    q.key = q4::sr_key(nb::cast<uint64_t>(t[7]), nb::cast<uint64_t>(t[8]));
    q.bad_groups = bad;
    if (q.group <= 0) throw nb::value_error((describe("packed", i) + ": group must be positive").c_str());
    q.buf = convert_packed(b.g[i].numel, q.group, q.fmt, nb::cast<nb::ndarray<>>(t[0]),
                           nb::cast<nb::ndarray<>>(t[1]), optional_array(t[2]),
                           optional_array(t[3]), optional_array(t[4]), device_type, dev);
  }
  return out;
}

}  // namespace spam::bind
