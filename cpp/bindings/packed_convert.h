// packed_convert.h — packed 4-bit weights stepped by the fused kernels (PackedParam, cpu_ops.h).
//
// PackedWeightRef is one packed weight as one update reads it: its buffers (quant4_ops.h; zero
// for int4, the outliers for fp4), format, group size, element count and the
// stochastic-rounding counter (seed, step) of requantize_. It is checked when it is built and
// holds its arrays, so its pointers stay valid as long as the batch that refers to it; a step
// batch then only matches it to its gradient and to the call's device.
#pragma once

#include <string>
#include <vector>

#include "../spam/cpu_ops.h"
#include "convert.h"
#include "quant4_convert.h"

namespace spam::bind {

struct PackedWeightRef {
  std::vector<nb::ndarray<>> arrays;  // codes, scale, then zero or the outliers: kept alive
  int64_t numel = 0;
  PackedParam param;  // bad_groups is the batch's counter, set there
};

// zero / outlier_idx / outlier_val: None (an invalid array) where the format has none.
inline PackedWeightRef make_packed_ref(nb::ndarray<> codes, nb::ndarray<> scale, nb::ndarray<> zero,
                                       nb::ndarray<> outlier_idx, nb::ndarray<> outlier_val,
                                       int64_t numel, int fmt, int64_t group, uint64_t seed,
                                       uint64_t step, int device_type) {
  if (numel < 0) throw nb::value_error("spam_lowmem: a packed weight's numel must be >= 0");
  SameDevice dev;
  PackedWeightRef r;
  r.numel = numel;
  r.param.fmt = to_format(fmt);
  r.param.group = group;
  r.param.key = q4::sr_key(seed, step);
  r.param.buf = convert_packed(numel, group, r.param.fmt, codes, scale, zero, outlier_idx,
                               outlier_val, device_type, dev);
  for (nb::ndarray<>* a : {&codes, &scale, &zero, &outlier_idx, &outlier_val})
    if (a->is_valid()) r.arrays.push_back(std::move(*a));
  return r;
}

template <int DeviceType>
void bind_packed_ref(nb::module_& m) {
  using namespace nb::literals;
  nb::class_<PackedWeightRef>(m, "PackedWeightRef",
                              "A packed 4-bit weight and the stochastic-rounding counter of one "
                              "fused update (checked on construction).")
      .def(
          "__init__",
          [](PackedWeightRef* self, nb::ndarray<> codes, nb::ndarray<> scale, nb::ndarray<> zero,
             nb::ndarray<> outlier_idx, nb::ndarray<> outlier_val, int64_t numel, int fmt,
             int64_t group, uint64_t seed, uint64_t step) {
            new (self) PackedWeightRef(make_packed_ref(codes, scale, zero, outlier_idx, outlier_val,
                                                       numel, fmt, group, seed, step, DeviceType));
          },
          "codes"_a, "scale"_a, "zero"_a.none(), "outlier_idx"_a.none(), "outlier_val"_a.none(),
          nb::kw_only(), "numel"_a, "fmt"_a, "group"_a, "seed"_a, "step"_a)
      .def_ro("numel", &PackedWeightRef::numel);
}

// `packed`: None, or one entry per tensor: None (a dense parameter) or a PackedWeightRef.
// Returns one pointer per tensor (null: dense), or none at all when no tensor is packed.
inline std::vector<const PackedWeightRef*> packed_refs(const nb::object& packed, size_t n) {
  std::vector<const PackedWeightRef*> refs;
  if (packed.is_none()) return refs;
  if (!nb::isinstance<nb::list>(packed))
    throw nb::type_error("spam_lowmem: 'packed' must be None or a list (one entry per tensor)");
  const nb::list items = nb::borrow<nb::list>(packed);
  check_lengths(n, items.size(), "packed");
  refs.resize(n, nullptr);
  bool any = false;
  for (size_t i = 0; i < n; ++i) {
    const nb::handle item = items[i];
    if (item.is_none()) continue;
    // try_cast, not inst_ptr: it also refuses an instance whose __init__ never ran.
    const PackedWeightRef* ref = nullptr;
    if (!nb::try_cast<const PackedWeightRef*>(item, ref) || ref == nullptr)
      throw nb::type_error(
          (describe("packed", i) + ": expected None or a PackedWeightRef").c_str());
    refs[i] = ref;
    any = true;
  }
  if (!any) refs.clear();
  return refs;
}

// The PackedParam of every tensor (inactive for dense ones), matched to the gradient's numel
// and the call's device. `refs` as packed_refs returned; call after convert_step_buffers.
inline std::vector<PackedParam> convert_packed_params(
    const std::vector<const PackedWeightRef*>& refs, const nb::object& packed_bad,
    const StepBuffers& b, int device_type, SameDevice& dev) {
  std::vector<PackedParam> out(b.g.size());
  if (refs.empty()) return out;
  if (packed_bad.is_none())
    throw nb::value_error("spam_lowmem: packed weights need the 'packed_bad' int64[1] counter");
  const nb::ndarray<> bad_arr = nb::cast<nb::ndarray<>>(packed_bad);
  int64_t* bad = typed_buffer<int64_t>(bad_arr, device_type, 1, "packed_bad");
  dev.check(bad_arr, "packed_bad");
  for (size_t i = 0; i < refs.size(); ++i) {
    if (!refs[i]) continue;
    const std::string name = describe("packed", i);
    if (refs[i]->numel != b.g[i].numel)
      throw nb::value_error((name + ": the packed weight has " + std::to_string(refs[i]->numel) +
                             " elements, its gradient " + std::to_string(b.g[i].numel))
                                .c_str());
    for (const nb::ndarray<>& a : refs[i]->arrays) dev.check(a, name);
    out[i] = refs[i]->param;
    out[i].bad_groups = bad;
  }
  return out;
}

}  // namespace spam::bind
