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
#include "sparse_convert.h"

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
  SameDevice dev;
  int64_t* ctr = typed_buffer<int64_t>(counters, kCuda, spam::Counters::kCount, "counters");
  dev.check(counters, "counters");
  bool any_q8 = false;
  const std::vector<SparseBuffers> buffers =
      convert_sparse_buffers(params, grads, exp_avgs, exp_avg_sqs, absmax_m, absmax_v, block_starts,
                             subsets, update_scales, kCuda, dev, any_q8);
  std::vector<spam::CudaSparseSpamTensor> tensors;
  tensors.reserve(buffers.size());
  for (size_t i = 0; i < buffers.size(); ++i) {
    const SparseBuffers& b = buffers[i];
    const int64_t* subset = typed_buffer<int64_t>(subsets[i], kCuda, 4, describe("subsets", i));
    dev.check(subsets[i], describe("subsets", i));
    tensors.push_back(spam::CudaSparseSpamTensor{b.param, b.grad, b.exp_avg, b.exp_avg_sq, b.compact,
                                                 b.block_starts, subset, b.update_scale, b.q8});
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
