// step_entry.h — the optimizer steps and 8-bit quantisers of a core module, written once and
// instantiated per backend: bind_steps<CpuBackend> in module_cpu.cpp (_C) and
// bind_steps<CudaBackend> in module_cuda.cpp (_C_cuda). A Backend policy (cpu_backend.h,
// cuda_backend.h) supplies the device type, the call context (CUDA: device and stream), what
// is done with the sparse subset rule and the Stable-SPAM scratch, and the kernels.
//
// One entry, `step`, serves every algorithm; the argument types choose it (docs/algorithms.md):
// clang-format off
//   step(StepBatch, SpamHyper, update_scales)                      SPAM (§2.4)
//   step(SparseBatch, SpamHyper, update_scales)                    sparse-momentum SPAM (§3)
//   step(StepBatch, algorithm, hyper, scalars, skip_nonfinite)     element algorithms: AdamW, ...
//                                                                  (element_entry.h)
//   step(StepBatch, AdamHyper, StatHyper, StableStats, step_sizes,
//        sqrt_bc2s, scratch, reduce_buffer, reduce)                Stable-SPAM (§4.4)
// clang-format on
// The batches are checked when built (step_batch.h, sparse_convert.h); an entry checks its
// per-tensor lists against the batch and enqueues (CUDA) or runs (CPU) the kernel with the GIL
// released. No arithmetic lives here.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/vector.h>

#include <vector>

#include "../spam/cpu_ops.h"
#include "convert.h"
#include "element_entry.h"
#include "hyper.h"
#include "packed_convert.h"
#include "sparse_convert.h"
#include "stable_stats.h"
#include "step_batch.h"

namespace spam::bind {

using Scalars = std::vector<double>;  // one per tensor, rounded to fp32 here

template <class Backend, class Kernel, class... Args>
void launch(Kernel kernel, const CallTarget<Backend>& t, const Args&... args) {
  nb::gil_scoped_release release;
  Backend::call(kernel, t.ctx, args..., t.maps, t.counters);
}

template <class Backend>
void spam_step(const StepBatch<Backend>& b, const SpamHyper& h, const Scalars& update_scales) {
  check_lengths(b.size(), update_scales.size(), "update_scales");
  std::vector<SpamTensor> tensors;
  tensors.reserve(b.size());
  for (size_t i = 0; i < b.size(); ++i)
    tensors.push_back(
        {b.b.p[i], b.b.g[i], b.b.m[i], b.b.v[i], f32(update_scales[i]), b.b.q8[i], b.q4[i]});
  launch(Backend::spam_step, b.target, tensors, h);
}

template <class Backend>
void sparse_spam_step(const SparseBatch<Backend>& b, const SpamHyper& h,
                      const Scalars& update_scales) {
  check_lengths(b.size(), update_scales.size(), "update_scales");
  std::vector<typename Backend::SparseTensor> tensors = b.tensors;
  for (size_t i = 0; i < tensors.size(); ++i) tensors[i].update_scale = f32(update_scales[i]);
  launch(Backend::sparse_spam_step, b.target, tensors, h);
}

// Adam's per-tensor bias corrections: step_sizes[i] = lr / (1 - beta1^k_i),
// sqrt_bc2s[i] = sqrt(1 - beta2^k_i).
inline std::vector<AdamBiasCorrection> adam_scalars(size_t n, const Scalars& step_sizes,
                                                    const Scalars& sqrt_bc2s) {
  check_lengths(n, step_sizes.size(), "step_sizes");
  check_lengths(n, sqrt_bc2s.size(), "sqrt_bc2s");
  std::vector<AdamBiasCorrection> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) out.push_back({f32(step_sizes[i]), f32(sqrt_bc2s[i])});
  return out;
}

template <class Backend>
void stable_spam_step(const StepBatch<Backend>& b, const AdamHyper& h, const StatHyper& sh,
                      const StableStats& stats, const Scalars& step_sizes, const Scalars& sqrt_bc2s,
                      const nb::object& scratch, const nb::object& reduce_buffer,
                      const nb::object& reduce) {
  check_lengths(b.size(), stats.size(), "grad_stats");
  check_stats_device(stats, b.target.dev);
  const std::vector<AdamBiasCorrection> adam = adam_scalars(b.size(), step_sizes, sqrt_bc2s);
  const typename Backend::Scratch s = Backend::scratch(scratch, b.b, b.target.dev);
  const StatsReduceArgs r =
      convert_stats_reduce<Backend::kDeviceType>(reduce_buffer, reduce, b.size(), b.target.dev);
  std::vector<StableSpamTensor> tensors;
  tensors.reserve(b.size());
  for (size_t i = 0; i < b.size(); ++i)
    tensors.push_back({b.b.p[i], b.b.g[i], b.b.m[i], b.b.v[i], stats.stats[i],
                       stats.hyper(i, sh, h.eps), adam[i], b.b.q8[i], b.q4[i]});
  nb::gil_scoped_release release;  // r.reduce reacquires it for the callback
  Backend::call(Backend::stable_spam_step, b.target.ctx, tensors, h, b.target.maps,
                b.target.counters, s, r.reduce);
}

// The arrays of one 8-bit (de)quantisation: a float tensor, its codes and block absmax, and the
// code map, all on one device. Codes must cover the float tensor's elements; the absmax shape
// gives the block layout (flat when 1-D, restarting at each row when 2-D; q8_layout).
template <class Backend>
struct Q8Call {
  TensorRef dense;
  uint8_t* codes;
  float* absmax;
  BlockRows rows;
  QuantMap map;
  typename Backend::Context ctx;
};

template <class Backend>
Q8Call<Backend> convert_q8_call(const nb::ndarray<>& dense, const char* dense_name,
                                const nb::ndarray<>& codes, const nb::ndarray<>& absmax,
                                const ArrayList& map, uintptr_t stream) {
  constexpr int kDev = Backend::kDeviceType;
  SameDevice dev;
  const TensorRef ref = float_ref(dense, kDev, dense_name);
  dev.check(dense, dense_name);
  uint8_t* c = typed_buffer<uint8_t>(codes, kDev, ref.numel, "codes");
  dev.check(codes, "codes");
  const BlockRows rows = q8_layout(absmax, ref.numel, true, "absmax");
  float* a = typed_buffer<float>(absmax, kDev, rows.total(ref.numel), "absmax");
  dev.check(absmax, "absmax");
  const QuantMap q = convert_device_map(map, kDev, "map", dev);
  return {ref, c, a, rows, q, Backend::context(dev.device(), stream)};
}

template <class Backend>
void quantize_blockwise(const nb::ndarray<>& x, const nb::ndarray<>& codes,
                        const nb::ndarray<>& absmax, const ArrayList& map, uintptr_t stream) {
  const Q8Call<Backend> q = convert_q8_call<Backend>(x, "x", codes, absmax, map, stream);
  nb::gil_scoped_release release;
  Backend::call(Backend::quantize, q.ctx, q.dense, q.codes, q.absmax, q.rows, q.map);
}

template <class Backend>
void dequantize_blockwise(const nb::ndarray<>& codes, const nb::ndarray<>& absmax,
                          const nb::ndarray<>& out, const ArrayList& map, uintptr_t stream) {
  const Q8Call<Backend> q = convert_q8_call<Backend>(out, "out", codes, absmax, map, stream);
  nb::gil_scoped_release release;
  Backend::call(Backend::dequantize, q.ctx, static_cast<const uint8_t*>(q.codes),
                static_cast<const float*>(q.absmax), q.rows, q.dense, q.map);
}

template <class Backend>
void bind_steps(nb::module_& m) {
  using namespace nb::literals;
  bind_hypers(m);
  bind_packed_ref<Backend::kDeviceType>(m);
  bind_step_batch<Backend>(m);
  bind_sparse_batch<Backend>(m);
  bind_stable_stats<Backend::kDeviceType>(m);
  m.def("step", &spam_step<Backend>, "batch"_a, "hyper"_a, "update_scales"_a,
        "SPAM step over all tensors of one group, in place; update_scales[i] = "
        "lr * s * sqrt(1 - beta2^t_i) / (1 - beta1^t_i).");
  m.def("step", &sparse_spam_step<Backend>, "batch"_a, "hyper"_a, "update_scales"_a,
        "Sparse-momentum SPAM step over all tensors of one group, in place.");
  bind_element_steps<Backend>(m);
  m.def("step", &stable_spam_step<Backend>, "batch"_a, "hyper"_a, "stat_hyper"_a, "stats"_a,
        "step_sizes"_a, "sqrt_bc2s"_a, "scratch"_a = nb::none(), "reduce_buffer"_a = nb::none(),
        "reduce"_a = nb::none(),
        "Stable-SPAM step over all tensors of one group, in place. CUDA: `scratch` is a uint8 "
        "buffer of stable_spam_scratch_bytes(numels) bytes, free for the step (stream order). "
        "`reduce_buffer` (float64 [n, 2] on the step's device) and `reduce(phase)`: the "
        "cross-shard reduction of the per-tensor max|g| and sum g^2 (functional."
        "stable_spam_step's reduce_stats).");
  m.def("quantize_blockwise", &quantize_blockwise<Backend>, "x"_a, "codes"_a, "absmax"_a, "map"_a,
        nb::kw_only(), "stream"_a = 0,
        "Blockwise (256) 8-bit quantisation of x into codes and absmax (quant8.h): a 1-D absmax "
        "[ceil(numel/256)] gives flat blocks, a 2-D one [R, ceil(L/256)] blocks restarting at "
        "each of R rows of L = numel/R elements.");
  m.def("dequantize_blockwise", &dequantize_blockwise<Backend>, "codes"_a, "absmax"_a, "out"_a,
        "map"_a, nb::kw_only(), "stream"_a = 0, "Inverse of quantize_blockwise, written into out.");
  Backend::bind_extras(m);
}

}  // namespace spam::bind
