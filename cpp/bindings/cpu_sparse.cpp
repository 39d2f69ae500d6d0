// cpu_sparse.cpp — the sparse-momentum SPAM step of the CPU module _C (ALGORITHMS.md §3) and
// the subset hash exposed for tests. Converts and checks arguments, then calls cpp/spam with
// the GIL released. No arithmetic lives here beyond reading the per-tensor subset scalars.
//
// Per tensor: the full-size parameter and gradient; compact moments (K values in the
// parameter dtype, or K uint8 codes plus ceil(K/256) float32 absmax); block_starts
// (int64 [ceil(K/256)]); subset (int64 [4]: seed, t_hash, t_index, numel; sparse_subset.h).
#include <nanobind/stl/vector.h>

#include <limits>

#include "../spam/cpu_ops.h"
#include "../spam/sparse_subset.h"
#include "convert.h"

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
  const size_t n = params.size();
  check_lengths(n, grads.size(), "grads");
  check_lengths(n, exp_avgs.size(), "exp_avgs");
  check_lengths(n, exp_avg_sqs.size(), "exp_avg_sqs");
  check_lengths(n, absmax_m.size(), "absmax_m");
  check_lengths(n, absmax_v.size(), "absmax_v");
  check_lengths(n, block_starts.size(), "block_starts");
  check_lengths(n, subsets.size(), "subsets");
  check_lengths(n, update_scales.size(), "update_scales");
  int64_t* ctr = typed_buffer<int64_t>(counters, kCpu, spam::Counters::kCount, "counters");
  std::vector<spam::SparseSpamTensor> tensors;
  bool any_q8 = false;
  for (size_t i = 0; i < n; ++i) {
    spam::SparseSpamTensor t{};
    t.param = float_ref(params[i], kCpu, describe("params", i));
    t.grad = float_ref(grads[i], kCpu, describe("grads", i));
    check_same(t.param, t.grad, describe("grads", i));
    if (t.param.numel > std::numeric_limits<uint32_t>::max())
      throw nb::value_error((describe("params", i) + ": sparse momentum supports parameters "
                             "of fewer than 2^32 elements").c_str());
    t.subset = read_subset(subsets[i], t.param.numel, i);
    const int64_t k = static_cast<int64_t>(exp_avgs[i].size());
    if (k > t.param.numel)
      throw nb::value_error((describe("exp_avgs", i) + ": more compact values than elements").c_str());
    const int64_t blocks = (k + spam::kQuantBlock - 1) / spam::kQuantBlock;
    t.compact = k;
    t.block_starts = typed_buffer<int64_t>(block_starts[i], kCpu, blocks, describe("block_starts", i));
    if (static_cast<int64_t>(block_starts[i].size()) != blocks)
      throw nb::value_error((describe("block_starts", i) + ": need one entry per 256 compact "
                             "values").c_str());
    for (int64_t b = 0; b < blocks; ++b)
      if (t.block_starts[b] < 0 || t.block_starts[b] >= t.param.numel)
        throw nb::value_error((describe("block_starts", i) + ": index out of range").c_str());
    t.update_scale = static_cast<float>(update_scales[i]);
    if (exp_avgs[i].dtype() == nb::dtype<uint8_t>()) {
      SameDevice dev;
      t.q8 = convert_q8_moments(exp_avgs[i], exp_avg_sqs[i], absmax_m[i], absmax_v[i], k, kCpu, dev, i);
      any_q8 = true;
    } else {
      t.exp_avg = float_ref(exp_avgs[i], kCpu, describe("exp_avgs", i));
      t.exp_avg_sq = float_ref(exp_avg_sqs[i], kCpu, describe("exp_avg_sqs", i));
      if (t.exp_avg.dtype != t.param.dtype || t.exp_avg_sq.dtype != t.param.dtype)
        throw nb::type_error((describe("exp_avgs", i) + ": compact moments must have the "
                              "parameter's dtype").c_str());
      if (t.exp_avg_sq.numel != k)
        throw nb::value_error((describe("exp_avg_sqs", i) + ": m and v differ in length").c_str());
    }
    tensors.push_back(t);
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
