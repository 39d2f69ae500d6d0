// sparse_convert.h — SparseBatch: the tensors of one sparse-momentum SPAM call (docs/algorithms.md
// §3), checked once when the batch is built. Per tensor: the full-size parameter and gradient;
// compact moments (K values in the parameter dtype, or K uint8 codes plus ceil(K/256) float32
// absmax); block_starts (int64 [ceil(K/256)]); subsets (int64 [4]: seed, t_hash, t_index,
// numel; sparse_subset.h). What is done with the subset rule and the block starts is the
// backend's (Backend::sparse_tensor): the CPU reads and checks them on the host, the CUDA
// kernel reads them on the device.
//
// A tensor may be a shard of its parameter (docs/algorithms.md §13.3): `offsets[i]` (keyword,
// default 0) is the global flat index of its element 0, the rule's numel is the parameter's
// global element count, and the compact moments and block starts are local.
#pragma once

#include <nanobind/stl/optional.h>
#include <nanobind/stl/vector.h>

#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "../spam/cpu_ops.h"
#include "convert.h"
#include "step_batch.h"

namespace spam {
namespace bind {

struct SparseBuffers {
  TensorRef param, grad;
  TensorRef exp_avg, exp_avg_sq;  // compact, parameter dtype (unused if q8 is active)
  int64_t compact = 0;
  const int64_t* block_starts = nullptr;
  int64_t offset = 0;  // global flat index of param's element 0
  Quant8Moments q8;
};

// Flat indices enter the subset hash as uint32: a parameter has fewer than 2^32 elements.
constexpr int64_t kMaxSparseNumel = std::numeric_limits<uint32_t>::max();

// offsets[i], or 0 when no offsets were given. A shard must lie in [0, 2^32): the rest of the
// range (offset + numel <= the rule's numel) is checked where the rule is read.
inline std::vector<int64_t> convert_offsets(const std::optional<std::vector<int64_t>>& offsets,
                                            size_t n) {
  if (!offsets) return std::vector<int64_t>(n, 0);
  if (offsets->size() != n)
    throw nb::value_error(("offsets: " + std::to_string(offsets->size()) + " entries for " +
                           std::to_string(n) + " tensors")
                              .c_str());
  return *offsets;
}

inline std::vector<SparseBuffers> convert_sparse_buffers(
    const ArrayList& params, const ArrayList& grads, const ArrayList& exp_avgs,
    const ArrayList& exp_avg_sqs, const ArrayList& absmax_m, const ArrayList& absmax_v,
    const ArrayList& block_starts, const ArrayList& subsets,
    const std::optional<std::vector<int64_t>>& offsets, int device_type, SameDevice& dev,
    bool& any_q8) {
  const size_t n = params.size();
  check_columns(n, {{grads, "grads"},
                    {exp_avgs, "exp_avgs"},
                    {exp_avg_sqs, "exp_avg_sqs"},
                    {absmax_m, "absmax_m"},
                    {absmax_v, "absmax_v"},
                    {block_starts, "block_starts"},
                    {subsets, "subsets"}});
  const std::vector<int64_t> offset = convert_offsets(offsets, n);
  auto full = [&](const nb::ndarray<>& a, const char* what, size_t i) {
    return device_float_ref(a, what, i, device_type, dev);
  };
  std::vector<SparseBuffers> out;
  out.reserve(n);
  any_q8 = false;
  for (size_t i = 0; i < n; ++i) {
    SparseBuffers t;
    t.param = full(params[i], "params", i);
    t.grad = full(grads[i], "grads", i);
    check_same(t.param, t.grad, describe("grads", i));
    if (t.param.numel > kMaxSparseNumel)
      throw nb::value_error((describe("params", i) + ": sparse momentum supports parameters "
                                                     "of fewer than 2^32 elements")
                                .c_str());
    if (offset[i] < 0 || offset[i] > kMaxSparseNumel - t.param.numel)
      throw nb::value_error((describe("offsets", i) + ": offset " + std::to_string(offset[i]) +
                             " + " + std::to_string(t.param.numel) +
                             " local elements must lie in [0, 2^32)")
                                .c_str());
    t.offset = offset[i];
    const int64_t k = static_cast<int64_t>(exp_avgs[i].size());
    if (k > t.param.numel)
      throw nb::value_error(
          (describe("exp_avgs", i) + ": more compact values than elements").c_str());
    const int64_t blocks = num_blocks(k);
    t.compact = k;
    t.block_starts =
        typed_buffer<int64_t>(block_starts[i], device_type, blocks, describe("block_starts", i));
    dev.check(block_starts[i], describe("block_starts", i));
    if (static_cast<int64_t>(block_starts[i].size()) != blocks)
      throw nb::value_error((describe("block_starts", i) + ": need one entry per 256 compact "
                                                           "values")
                                .c_str());
    if (exp_avgs[i].dtype() == nb::dtype<uint8_t>()) {
      t.q8 = convert_q8_moments(exp_avgs[i], exp_avg_sqs[i], absmax_m[i], absmax_v[i], k, false,
                                device_type, dev, i);
      any_q8 = true;
    } else {
      t.exp_avg = full(exp_avgs[i], "exp_avgs", i);
      t.exp_avg_sq = full(exp_avg_sqs[i], "exp_avg_sqs", i);
      if (t.exp_avg.dtype != t.param.dtype || t.exp_avg_sq.dtype != t.param.dtype)
        throw nb::type_error((describe("exp_avgs", i) + ": compact moments must have the "
                                                        "parameter's dtype")
                                 .c_str());
      if (t.exp_avg_sq.numel != k)
        throw nb::value_error((describe("exp_avg_sqs", i) + ": m and v differ in length").c_str());
    }
    out.push_back(t);
  }
  return out;
}

// The kernel's tensors carry the per-call update scale, filled in by the step entry.
template <class Backend>
struct SparseBatch {
  ArrayList params, grads, exp_avgs, exp_avg_sqs, absmax_m, absmax_v, block_starts, subsets;
  std::vector<typename Backend::SparseTensor> tensors;
  CallTarget<Backend> target;

  size_t size() const { return tensors.size(); }
};

template <class Backend>
void bind_sparse_batch(nb::module_& m) {
  using namespace nb::literals;
  using Batch = SparseBatch<Backend>;
  nb::class_<Batch>(m, "SparseBatch",
                    "The tensors of one sparse-momentum step call, checked on construction.")
      .def(
          "__init__",
          [](Batch* self, ArrayList params, ArrayList grads, ArrayList exp_avgs,
             ArrayList exp_avg_sqs, ArrayList absmax_m, ArrayList absmax_v, ArrayList block_starts,
             ArrayList subsets, nb::ndarray<> counters, ArrayList m_map, ArrayList v_map,
             uintptr_t stream, const std::optional<std::vector<int64_t>>& offsets) {
            SameDevice dev;
            bool any_q8 = false;
            const std::vector<SparseBuffers> buffers = convert_sparse_buffers(
                params, grads, exp_avgs, exp_avg_sqs, absmax_m, absmax_v, block_starts, subsets,
                offsets, Backend::kDeviceType, dev, any_q8);
            std::vector<typename Backend::SparseTensor> tensors;
            tensors.reserve(buffers.size());
            for (size_t i = 0; i < buffers.size(); ++i)
              tensors.push_back(Backend::sparse_tensor(buffers[i], subsets[i], i, dev));
            CallTarget<Backend> target = convert_target<Backend>(
                std::move(counters), std::move(m_map), std::move(v_map), any_q8, stream, dev);
            new (self) Batch{std::move(params),       std::move(grads),    std::move(exp_avgs),
                             std::move(exp_avg_sqs),  std::move(absmax_m), std::move(absmax_v),
                             std::move(block_starts), std::move(subsets),  std::move(tensors),
                             std::move(target)};
          },
          "params"_a, "grads"_a, "exp_avgs"_a, "exp_avg_sqs"_a, "absmax_m"_a, "absmax_v"_a,
          "block_starts"_a, "subsets"_a, "counters"_a, "m_map"_a, "v_map"_a, nb::kw_only(),
          "stream"_a = 0, "offsets"_a = nb::none())
      .def("__len__", &Batch::size);
}

}  // namespace bind
}  // namespace spam
