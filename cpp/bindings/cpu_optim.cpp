// cpu_optim.cpp — the optimizer steps of the CPU module _C. Converts and checks
// arguments (convert.h), assembles the hyper-parameter structs from named keywords, and
// calls cpp/spam with the GIL released. No arithmetic lives here.
#include <nanobind/stl/vector.h>

#include "../spam/cpu_ops.h"
#include "convert.h"

namespace nb = nanobind;
using namespace nb::literals;
using namespace spam::bind;  // NOLINT: binding helpers (convert.h)

namespace {

constexpr int kCpu = nb::device::cpu::value;

void spam_step(const ArrayList& params, const ArrayList& grads, const ArrayList& exp_avgs,
               const ArrayList& exp_avg_sqs, const std::vector<double>& update_scales,
               const nb::ndarray<>& counters, double beta1, double one_minus_beta1, double beta2,
               double one_minus_beta2, double eps, double clip_threshold,
               double weight_decay_scale, int reset, bool skip_nonfinite) {
  using namespace spam::bind;
  SameDevice dev;
  Quad q = convert_quad(params, grads, exp_avgs, exp_avg_sqs, kCpu, dev);
  check_lengths(params.size(), update_scales.size(), "update_scales");
  int64_t* cnt = typed_buffer<int64_t>(counters, kCpu, spam::Counters::kCount, "counters");
  spam::SpamHyper h{static_cast<float>(beta1),        static_cast<float>(one_minus_beta1),
                    static_cast<float>(beta2),        static_cast<float>(one_minus_beta2),
                    static_cast<float>(eps),          static_cast<float>(clip_threshold),
                    static_cast<float>(weight_decay_scale), spam::bind::to_reset(reset),
                    spam::NonFinite{skip_nonfinite}};
  std::vector<spam::SpamTensor> tensors;
  for (size_t i = 0; i < q.p.size(); ++i)
    tensors.push_back({q.p[i], q.g[i], q.m[i], q.v[i], static_cast<float>(update_scales[i])});
  nb::gil_scoped_release release;
  spam::cpu_spam_step(tensors, h, cnt);
}

void stable_spam_step(const ArrayList& params, const ArrayList& grads, const ArrayList& exp_avgs,
                      const ArrayList& exp_avg_sqs, const ArrayList& grad_stats,
                      const std::vector<double>& stat_bias_corrections,
                      const std::vector<double>& step_sizes, const std::vector<double>& sqrt_bc2s,
                      const nb::ndarray<>& counters, double gamma1, double one_minus_gamma1,
                      double gamma2, double one_minus_gamma2, double gamma3,
                      double one_minus_gamma3, double beta1, double one_minus_beta1, double beta2,
                      double one_minus_beta2, double eps, double weight_keep, int reset,
                      bool skip_nonfinite) {
  using namespace spam::bind;
  SameDevice dev;
  Quad q = convert_quad(params, grads, exp_avgs, exp_avg_sqs, kCpu, dev);
  const size_t n = params.size();
  check_lengths(n, grad_stats.size(), "grad_stats");
  check_lengths(3 * n, stat_bias_corrections.size(), "stat_bias_corrections (3 per tensor)");
  check_lengths(n, step_sizes.size(), "step_sizes");
  check_lengths(n, sqrt_bc2s.size(), "sqrt_bc2s");
  int64_t* cnt = typed_buffer<int64_t>(counters, kCpu, spam::Counters::kCount, "counters");
  spam::StableAdamHyper h{static_cast<float>(beta1), static_cast<float>(one_minus_beta1),
                          static_cast<float>(beta2), static_cast<float>(one_minus_beta2),
                          static_cast<float>(eps),   static_cast<float>(weight_keep),
                          spam::bind::to_reset(reset),           spam::NonFinite{skip_nonfinite}};
  std::vector<spam::StableSpamTensor> tensors;
  for (size_t i = 0; i < n; ++i) {
    float* stats = typed_buffer<float>(grad_stats[i], kCpu, spam::GradStatsIndex::kCount,
                                       describe("grad_stats", i));
    spam::StableStatHyper sh{static_cast<float>(gamma1), static_cast<float>(one_minus_gamma1),
                             static_cast<float>(gamma2), static_cast<float>(one_minus_gamma2),
                             static_cast<float>(gamma3), static_cast<float>(one_minus_gamma3),
                             static_cast<float>(stat_bias_corrections[3 * i]),
                             static_cast<float>(stat_bias_corrections[3 * i + 1]),
                             static_cast<float>(stat_bias_corrections[3 * i + 2]),
                             static_cast<float>(eps)};
    spam::StableAdamTensor at{static_cast<float>(step_sizes[i]), static_cast<float>(sqrt_bc2s[i])};
    tensors.push_back({q.p[i], q.g[i], q.m[i], q.v[i], stats, sh, at});
  }
  nb::gil_scoped_release release;
  spam::cpu_stable_spam_step(tensors, h, cnt);
}

}  // namespace

void bind_cpu_optim(nb::module_& m) {
  m.def("spam_step", &spam_step, "params"_a, "grads"_a, "exp_avgs"_a, "exp_avg_sqs"_a,
        "update_scales"_a, "counters"_a, nb::kw_only(), "beta1"_a, "one_minus_beta1"_a,
        "beta2"_a, "one_minus_beta2"_a, "eps"_a, "clip_threshold"_a, "weight_decay_scale"_a,
        "reset"_a, "skip_nonfinite"_a,
        "SPAM step (ALGORITHMS.md §2.4) over all tensors of one group, in place.");
  m.def("stable_spam_step", &stable_spam_step, "params"_a, "grads"_a, "exp_avgs"_a,
        "exp_avg_sqs"_a, "grad_stats"_a, "stat_bias_corrections"_a, "step_sizes"_a,
        "sqrt_bc2s"_a, "counters"_a, nb::kw_only(), "gamma1"_a, "one_minus_gamma1"_a,
        "gamma2"_a, "one_minus_gamma2"_a, "gamma3"_a, "one_minus_gamma3"_a, "beta1"_a,
        "one_minus_beta1"_a, "beta2"_a, "one_minus_beta2"_a, "eps"_a, "weight_keep"_a,
        "reset"_a, "skip_nonfinite"_a,
        "Stable-SPAM step (ALGORITHMS.md §4.4) over all tensors of one group, in place.");
  m.def("num_threads", &spam::cpu_num_threads, "OpenMP threads used by the CPU core.");
  m.def("isa", &spam::cpu_isa_name, "Instruction set of the CPU kernels chosen at run time.");
}
