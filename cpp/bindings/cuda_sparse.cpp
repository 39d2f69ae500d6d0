// cuda_sparse.cpp — the sparse-momentum SPAM step of the CUDA module _C_cuda (ALGORITHMS.md
// §3). Same Python signature as _C.sparse_spam_step (cpu_sparse.cpp) plus `stream`. Compiled
// by the host compiler with no CUDA header, like cuda_optim.cpp.
//
// Checks what the host can see without a sync: devices, dtypes, sizes, contiguity. The subset
// rule and the block starts stay on the device and are read there (cuda_sparse_api.h says what
// the kernel does with inconsistent ones).
#include <nanobind/stl/vector.h>

#include <limits>
#include <string>

#include "../spam/cuda_sparse_api.h"
#include "convert.h"

namespace nb = nanobind;
using namespace nb::literals;
using namespace spam::bind;  // NOLINT: binding helpers (convert.h)

namespace {

constexpr int kCuda = nb::device::cuda::value;

void sparse_spam_step(const ArrayList& params, const ArrayList& grads, const ArrayList& exp_avgs,
                      const ArrayList& exp_avg_sqs, const ArrayList& absmax_m,
                      const ArrayList& absmax_v, const ArrayList& block_starts,
                      const ArrayList& subsets, const std::vector<double>& update_scales,
                      const nb::ndarray<>& counters, const ArrayList& m_map,
                      const ArrayList& v_map, double beta1, double one_minus_beta1, double beta2,
                      double one_minus_beta2, double eps, double clip_threshold,
                      double weight_decay_scale, int reset, bool skip_nonfinite,
                      uintptr_t stream) {
  const size_t n = params.size();
  check_lengths(n, grads.size(), "grads");
  check_lengths(n, exp_avgs.size(), "exp_avgs");
  check_lengths(n, exp_avg_sqs.size(), "exp_avg_sqs");
  check_lengths(n, absmax_m.size(), "absmax_m");
  check_lengths(n, absmax_v.size(), "absmax_v");
  check_lengths(n, block_starts.size(), "block_starts");
  check_lengths(n, subsets.size(), "subsets");
  check_lengths(n, update_scales.size(), "update_scales");
  SameDevice dev;
  int64_t* ctr = typed_buffer<int64_t>(counters, kCuda, spam::Counters::kCount, "counters");
  dev.check(counters, "counters");
  std::vector<spam::CudaSparseSpamTensor> tensors;
  tensors.reserve(n);
  bool any_q8 = false;
  for (size_t i = 0; i < n; ++i) {
    spam::CudaSparseSpamTensor t{};
    t.param = float_ref(params[i], kCuda, describe("params", i));
    t.grad = float_ref(grads[i], kCuda, describe("grads", i));
    dev.check(params[i], describe("params", i));
    dev.check(grads[i], describe("grads", i));
    check_same(t.param, t.grad, describe("grads", i));
    if (t.param.numel > std::numeric_limits<uint32_t>::max())
      throw nb::value_error((describe("params", i) + ": sparse momentum supports parameters "
                             "of fewer than 2^32 elements").c_str());
    t.subset = typed_buffer<int64_t>(subsets[i], kCuda, 4, describe("subsets", i));
    dev.check(subsets[i], describe("subsets", i));
    const int64_t k = static_cast<int64_t>(exp_avgs[i].size());
    if (k > t.param.numel)
      throw nb::value_error((describe("exp_avgs", i) + ": more compact values than elements").c_str());
    const int64_t blocks = (k + spam::kQuantBlock - 1) / spam::kQuantBlock;
    t.compact = k;
    t.block_starts = typed_buffer<int64_t>(block_starts[i], kCuda, blocks, describe("block_starts", i));
    dev.check(block_starts[i], describe("block_starts", i));
    if (static_cast<int64_t>(block_starts[i].size()) != blocks)
      throw nb::value_error((describe("block_starts", i) + ": need one entry per 256 compact "
                             "values").c_str());
    t.update_scale = static_cast<float>(update_scales[i]);
    if (exp_avgs[i].dtype() == nb::dtype<uint8_t>()) {
      t.q8 = convert_q8_moments(exp_avgs[i], exp_avg_sqs[i], absmax_m[i], absmax_v[i], k, kCuda, dev, i);
      any_q8 = true;
    } else {
      t.exp_avg = float_ref(exp_avgs[i], kCuda, describe("exp_avgs", i));
      t.exp_avg_sq = float_ref(exp_avg_sqs[i], kCuda, describe("exp_avg_sqs", i));
      dev.check(exp_avgs[i], describe("exp_avgs", i));
      dev.check(exp_avg_sqs[i], describe("exp_avg_sqs", i));
      if (t.exp_avg.dtype != t.param.dtype || t.exp_avg_sq.dtype != t.param.dtype)
        throw nb::type_error((describe("exp_avgs", i) + ": compact moments must have the "
                              "parameter's dtype").c_str());
      if (t.exp_avg_sq.numel != k)
        throw nb::value_error((describe("exp_avg_sqs", i) + ": m and v differ in length").c_str());
    }
    tensors.push_back(t);
  }
  spam::QuantMaps maps{};
  if (any_q8) {
    maps = spam::QuantMaps{convert_map(m_map, kCuda, "m_map"), convert_map(v_map, kCuda, "v_map")};
    for (size_t k = 0; k < m_map.size(); ++k) dev.check(m_map[k], describe("m_map", k));
    for (size_t k = 0; k < v_map.size(); ++k) dev.check(v_map[k], describe("v_map", k));
  }
  const spam::SpamHyper h = spam_hyper(beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                                       clip_threshold, weight_decay_scale, reset, skip_nonfinite);
  const spam::CudaContext ctx{dev.device(), stream};
  nb::gil_scoped_release release;
  spam::cuda_sparse_spam_step(tensors, h, maps, ctr, ctx);
}

}  // namespace

void bind_cuda_sparse(nb::module_& m) {
  m.def("sparse_spam_step", &sparse_spam_step, "params"_a, "grads"_a, "exp_avgs"_a,
        "exp_avg_sqs"_a, "absmax_m"_a, "absmax_v"_a, "block_starts"_a, "subsets"_a,
        "update_scales"_a, "counters"_a, "m_map"_a, "v_map"_a, nb::kw_only(), "beta1"_a,
        "one_minus_beta1"_a, "beta2"_a, "one_minus_beta2"_a, "eps"_a, "clip_threshold"_a,
        "weight_decay_scale"_a, "reset"_a, "skip_nonfinite"_a, "stream"_a,
        "Sparse-momentum SPAM step (ALGORITHMS.md §3) on the GPU, enqueued on `stream`.");
}
