// cpu_sparse.cpp — the sparse-momentum SPAM step of the CPU module _C (ALGORITHMS.md §3) and
// the subset hash exposed for tests. Converts and checks arguments, then calls cpp/spam with
// the GIL released. No arithmetic lives here beyond reading the per-tensor subset scalars.
//
// Per tensor the buffers of sparse_convert.h, and subset (int64 [4]: seed, t_hash, t_index,
// numel; sparse_subset.h), read here on the host.
#include <nanobind/stl/vector.h>

#include <limits>

#include "../spam/cpu_ops.h"
#include "../spam/sparse_subset.h"
#include "convert.h"
#include "sparse_convert.h"

namespace nb = nanobind;
using namespace nb::literals;
using namespace spam::bind;  // NOLINT: binding helpers (convert.h)

namespace {

constexpr int kCpu = nb::device::cpu::value;

spam::SubsetRule read_subset(const nb::ndarray<>& a, int64_t numel, size_t i) {
  const int64_t* s = typed_buffer<int64_t>(a, kCpu, 4, describe("subsets", i));
  if (s[0] < 0 || s[0] > 0xFFFFFFFFll || s[1] < 0 || s[1] > 0xFFFFFFFFll || s[2] < -1)
    throw nb::value_error((describe("subsets", i) + ": seed/t_hash must lie in [0, 2^32), "
                           "t_index >= -1").c_str());
  if (s[3] != numel)
    throw nb::value_error((describe("subsets", i) + ": subset was drawn for " +
                           std::to_string(s[3]) + " elements, the parameter has " +
                           std::to_string(numel)).c_str());
  return spam::SubsetRule{static_cast<uint32_t>(s[0]), static_cast<uint32_t>(s[1]), s[2]};
}

void sparse_spam_step(const ArrayList& params, const ArrayList& grads, const ArrayList& exp_avgs,
                      const ArrayList& exp_avg_sqs, const ArrayList& absmax_m,
                      const ArrayList& absmax_v, const ArrayList& block_starts,
                      const ArrayList& subsets, const std::vector<double>& update_scales,
                      const nb::ndarray<>& counters, const ArrayList& m_map,
                      const ArrayList& v_map, double beta1, double one_minus_beta1, double beta2,
                      double one_minus_beta2, double eps, double clip_threshold,
                      double weight_decay_scale, int reset, bool skip_nonfinite) {
  int64_t* ctr = typed_buffer<int64_t>(counters, kCpu, spam::Counters::kCount, "counters");
  SameDevice dev;
  bool any_q8 = false;
  const std::vector<SparseBuffers> buffers =
      convert_sparse_buffers(params, grads, exp_avgs, exp_avg_sqs, absmax_m, absmax_v, block_starts,
                             subsets, update_scales, kCpu, dev, any_q8);
  std::vector<spam::SparseSpamTensor> tensors;
  tensors.reserve(buffers.size());
  for (size_t i = 0; i < buffers.size(); ++i) {
    const SparseBuffers& b = buffers[i];
    // The CPU kernel walks from these indices: check them here (the CUDA kernel clamps them).
    for (int64_t c = 0; c * spam::kQuantBlock < b.compact; ++c)
      if (b.block_starts[c] < 0 || b.block_starts[c] >= b.param.numel)
        throw nb::value_error((describe("block_starts", i) + ": index out of range").c_str());
    tensors.push_back(spam::SparseSpamTensor{b.param, b.grad, b.exp_avg, b.exp_avg_sq, b.compact,
                                             b.block_starts, read_subset(subsets[i], b.param.numel, i),
                                             b.update_scale, b.q8});
  }
  spam::QuantMaps maps{};
  if (any_q8) maps = spam::QuantMaps{convert_map(m_map, kCpu, "m_map"), convert_map(v_map, kCpu, "v_map")};
  const spam::SpamHyper h = spam_hyper(beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                                       clip_threshold, weight_decay_scale, reset, skip_nonfinite);
  nb::gil_scoped_release release;
  spam::cpu_sparse_spam_step(tensors, h, maps, ctr);
}

// out[k] = h(seed, indices[k]) (sparse_subset.h), for tests against the Python definition.
void subset_hash(int64_t seed, const nb::ndarray<>& indices, const nb::ndarray<>& out) {
  const int64_t n = static_cast<int64_t>(indices.size());
  const int64_t* idx = typed_buffer<int64_t>(indices, kCpu, n, "indices");
  int64_t* o = typed_buffer<int64_t>(out, kCpu, n, "out");
  for (int64_t k = 0; k < n; ++k)
    o[k] = static_cast<int64_t>(spam::subset_hash(static_cast<uint32_t>(seed), idx[k]));
}

}  // namespace

void bind_cpu_sparse(nb::module_& m) {
  m.def("sparse_spam_step", &sparse_spam_step, "params"_a, "grads"_a, "exp_avgs"_a,
        "exp_avg_sqs"_a, "absmax_m"_a, "absmax_v"_a, "block_starts"_a, "subsets"_a,
        "update_scales"_a, "counters"_a, "m_map"_a, "v_map"_a, nb::kw_only(), "beta1"_a,
        "one_minus_beta1"_a, "beta2"_a, "one_minus_beta2"_a, "eps"_a, "clip_threshold"_a,
        "weight_decay_scale"_a, "reset"_a, "skip_nonfinite"_a,
        "Sparse-momentum SPAM step (ALGORITHMS.md §3) over all tensors of one group, in place.");
  m.def("subset_hash", &subset_hash, "seed"_a, "indices"_a, "out"_a,
        "h(seed, i) of the sparse-momentum subset (sparse_subset.h) for int64 indices into int64 out.");
}
