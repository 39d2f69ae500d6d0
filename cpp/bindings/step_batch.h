// step_batch.h — StepBatch: the tensors of one optimizer step call (SPAM, Stable-SPAM, AdamW),
// converted and checked once when the batch is built (convert.h), so the step entries
// (step_entry.h) only add the per-call constants. The batch holds every array it points into;
// as with any DLPack export, those tensors must not be resized while it refers to them
// (functional.py builds a batch and steps it in one go).
//
// Per tensor the moments are dense (exp_avgs/exp_avg_sqs in the parameter dtype) or 8-bit
// (uint8 codes plus absmax_m/absmax_v), mixed freely within a call, and a tensor may be a
// packed 4-bit weight (packed / packed_bad, packed_convert.h). All arrays of a call, the code
// maps included, live on one device, on which the work is ordered by `stream` (CUDA).
#pragma once

#include <nanobind/stl/vector.h>

#include <vector>

#include "../spam/cpu_ops.h"
#include "convert.h"
#include "packed_convert.h"

namespace spam::bind {

// What every step call has beside its tensors: the [clipped, nonfinite] counters, the code
// maps (converted only when some tensor has 8-bit moments: a dense-only call never reads
// them) and where the work runs. Converted after the tensors, so `dev` knows the device.
template <class Backend>
struct CallTarget {
  nb::ndarray<> counters_array;
  ArrayList m_map, v_map;  // kept alive for the pointers in `maps`
  int64_t* counters = nullptr;
  QuantMaps maps{};
  typename Backend::Context ctx{};
  SameDevice dev;  // the call's device, for arguments of the entry (StableStats, scratch)
};

template <class Backend>
CallTarget<Backend> convert_target(nb::ndarray<> counters, ArrayList m_map, ArrayList v_map,
                                   bool any_q8, uintptr_t stream, SameDevice& dev) {
  CallTarget<Backend> t;
  t.counters = typed_buffer<int64_t>(counters, Backend::kDeviceType, Counters::kCount, "counters");
  dev.check(counters, "counters");
  if (any_q8) t.maps = convert_maps(m_map, v_map, Backend::kDeviceType, dev);
  t.counters_array = std::move(counters);
  t.m_map = std::move(m_map);
  t.v_map = std::move(v_map);
  t.ctx = Backend::context(dev.device(), stream);
  t.dev = dev;
  return t;
}

template <class Backend>
struct StepBatch {
  ArrayList params, grads, exp_avgs, exp_avg_sqs, absmax_m, absmax_v;  // kept alive
  nb::object packed, packed_bad;
  StepBuffers b;
  std::vector<PackedParam> q4;  // one per tensor; inactive for dense parameters
  CallTarget<Backend> target;

  size_t size() const { return b.p.size(); }
};

template <class Backend>
void bind_step_batch(nb::module_& m) {
  using namespace nb::literals;
  using Batch = StepBatch<Backend>;
  nb::class_<Batch>(m, "StepBatch", "The tensors of one step call, checked on construction.")
      .def(
          "__init__",
          [](Batch* self, ArrayList params, ArrayList grads, ArrayList exp_avgs,
             ArrayList exp_avg_sqs, ArrayList absmax_m, ArrayList absmax_v, nb::ndarray<> counters,
             ArrayList m_map, ArrayList v_map, nb::object packed, nb::object packed_bad,
             uintptr_t stream) {
            constexpr int kDev = Backend::kDeviceType;
            SameDevice dev;
            const std::vector<const PackedWeightRef*> refs = packed_refs(packed, params.size());
            std::vector<char> mask(refs.size());
            for (size_t i = 0; i < refs.size(); ++i) mask[i] = refs[i] != nullptr;
            StepBuffers b =
                convert_step_buffers(params, grads, exp_avgs, exp_avg_sqs, absmax_m, absmax_v, kDev,
                                     dev, mask.empty() ? nullptr : &mask);
            CallTarget<Backend> target = convert_target<Backend>(
                std::move(counters), std::move(m_map), std::move(v_map), b.any_q8, stream, dev);
            std::vector<PackedParam> q4 = convert_packed_params(refs, packed_bad, b, kDev, dev);
            new (self) Batch{std::move(params),      std::move(grads),      std::move(exp_avgs),
                             std::move(exp_avg_sqs), std::move(absmax_m),   std::move(absmax_v),
                             std::move(packed),      std::move(packed_bad), std::move(b),
                             std::move(q4),          std::move(target)};
          },
          "params"_a, "grads"_a, "exp_avgs"_a, "exp_avg_sqs"_a, "absmax_m"_a, "absmax_v"_a,
          "counters"_a, "m_map"_a, "v_map"_a, nb::kw_only(), "packed"_a = nb::none(),
          "packed_bad"_a = nb::none(), "stream"_a = 0)
      .def("__len__", &Batch::size);
}

}  // namespace spam::bind
