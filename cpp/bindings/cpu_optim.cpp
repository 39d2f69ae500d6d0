// cpu_optim.cpp — the optimizer steps and 8-bit quantisers of the CPU module _C. Converts and
// checks arguments (convert.h), assembles the hyper-parameter structs from named keywords,
// and calls cpp/spam with the GIL released. No arithmetic lives here.
//
// Every step takes, per tensor, either dense moments (exp_avg/exp_avg_sq in the parameter
// dtype) or 8-bit moments (uint8 codes in exp_avg/exp_avg_sq plus absmax_m/absmax_v), so one
// call — one OpenMP region — covers a whole group whatever its mix. A tensor may also be a
// packed 4-bit weight (optional `packed` / `packed_bad`, packed_convert.h), stepped and
// re-quantised in the same fused pass.
#include <nanobind/stl/vector.h>

#include "../spam/cpu_ops.h"
#include "convert.h"
#include "packed_convert.h"

namespace nb = nanobind;
using namespace nb::literals;
using namespace spam::bind;  // NOLINT: binding helpers (convert.h)

namespace {

constexpr int kCpu = nb::device::cpu::value;

struct Common {
  StepBuffers b;
  spam::QuantMaps maps{};
  int64_t* counters;
  std::vector<spam::PackedParam> q4;  // one per tensor; inactive for dense parameters
};

Common convert_common(const ArrayList& params, const ArrayList& grads, const ArrayList& exp_avgs,
                      const ArrayList& exp_avg_sqs, const ArrayList& absmax_m,
                      const ArrayList& absmax_v, const nb::ndarray<>& counters,
                      const ArrayList& m_map, const ArrayList& v_map, const nb::object& packed,
                      const nb::object& packed_bad) {
  SameDevice dev;
  const std::vector<char> mask = packed_mask(packed, params.size());
  Common c{convert_step_buffers(params, grads, exp_avgs, exp_avg_sqs, absmax_m, absmax_v, kCpu, dev,
                                mask.empty() ? nullptr : &mask),
           {}, typed_buffer<int64_t>(counters, kCpu, spam::Counters::kCount, "counters"), {}};
  if (c.b.any_q8) c.maps = spam::QuantMaps{convert_map(m_map, kCpu, "m_map"), convert_map(v_map, kCpu, "v_map")};
  c.q4 = convert_packed_params(packed, packed_bad, mask, c.b, kCpu, dev);
  return c;
}

void spam_step(const ArrayList& params, const ArrayList& grads, const ArrayList& exp_avgs,
               const ArrayList& exp_avg_sqs, const ArrayList& absmax_m, const ArrayList& absmax_v,
               const std::vector<double>& update_scales, const nb::ndarray<>& counters,
               const ArrayList& m_map, const ArrayList& v_map, double beta1,
               double one_minus_beta1, double beta2, double one_minus_beta2, double eps,
               double clip_threshold, double weight_decay_scale, int reset, bool skip_nonfinite,
               const nb::object& packed, const nb::object& packed_bad) {
  Common c = convert_common(params, grads, exp_avgs, exp_avg_sqs, absmax_m, absmax_v, counters,
                            m_map, v_map, packed, packed_bad);
  check_lengths(params.size(), update_scales.size(), "update_scales");
  const spam::SpamHyper h = spam_hyper(beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                                         clip_threshold, weight_decay_scale, reset, skip_nonfinite);
  std::vector<spam::SpamTensor> tensors;
  for (size_t i = 0; i < params.size(); ++i)
    tensors.push_back({c.b.p[i], c.b.g[i], c.b.m[i], c.b.v[i],
                       static_cast<float>(update_scales[i]), c.b.q8[i], c.q4[i]});
  nb::gil_scoped_release release;
  spam::cpu_spam_step(tensors, h, c.maps, c.counters);
}

void stable_spam_step(const ArrayList& params, const ArrayList& grads, const ArrayList& exp_avgs,
                      const ArrayList& exp_avg_sqs, const ArrayList& absmax_m,
                      const ArrayList& absmax_v, const ArrayList& grad_stats,
                      const std::vector<double>& stat_bias_corrections,
                      const std::vector<double>& step_sizes, const std::vector<double>& sqrt_bc2s,
                      const nb::ndarray<>& counters, const ArrayList& m_map, const ArrayList& v_map,
                      double gamma1, double one_minus_gamma1, double gamma2,
                      double one_minus_gamma2, double gamma3, double one_minus_gamma3,
                      double beta1, double one_minus_beta1, double beta2, double one_minus_beta2,
                      double eps, double weight_keep, int reset, bool skip_nonfinite,
                      const nb::object& packed, const nb::object& packed_bad) {
  Common c = convert_common(params, grads, exp_avgs, exp_avg_sqs, absmax_m, absmax_v, counters,
                            m_map, v_map, packed, packed_bad);
  const size_t n = params.size();
  check_lengths(n, grad_stats.size(), "grad_stats");
  check_lengths(3 * n, stat_bias_corrections.size(), "stat_bias_corrections (3 per tensor)");
  check_lengths(n, step_sizes.size(), "step_sizes");
  check_lengths(n, sqrt_bc2s.size(), "sqrt_bc2s");
  const spam::StableAdamHyper h = adam_hyper(beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                                             weight_keep, reset, skip_nonfinite);
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
    tensors.push_back({c.b.p[i], c.b.g[i], c.b.m[i], c.b.v[i], stats, sh, at, c.b.q8[i], c.q4[i]});
  }
  nb::gil_scoped_release release;
  spam::cpu_stable_spam_step(tensors, h, c.maps, c.counters);
}

void adamw_step(const ArrayList& params, const ArrayList& grads, const ArrayList& exp_avgs,
                const ArrayList& exp_avg_sqs, const ArrayList& absmax_m, const ArrayList& absmax_v,
                const std::vector<double>& step_sizes, const std::vector<double>& sqrt_bc2s,
                const nb::ndarray<>& counters, const ArrayList& m_map, const ArrayList& v_map,
                double beta1, double one_minus_beta1, double beta2, double one_minus_beta2,
                double eps, double weight_keep, bool skip_nonfinite, const nb::object& packed,
                const nb::object& packed_bad) {
  Common c = convert_common(params, grads, exp_avgs, exp_avg_sqs, absmax_m, absmax_v, counters,
                            m_map, v_map, packed, packed_bad);
  check_lengths(params.size(), step_sizes.size(), "step_sizes");
  check_lengths(params.size(), sqrt_bc2s.size(), "sqrt_bc2s");
  const spam::StableAdamHyper h = adam_hyper(beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                                             weight_keep, 0, skip_nonfinite);
  std::vector<spam::AdamTensor> tensors;
  for (size_t i = 0; i < params.size(); ++i)
    tensors.push_back({c.b.p[i], c.b.g[i], c.b.m[i], c.b.v[i],
                       spam::StableAdamTensor{static_cast<float>(step_sizes[i]),
                                              static_cast<float>(sqrt_bc2s[i])},
                       c.b.q8[i], c.q4[i]});
  nb::gil_scoped_release release;
  spam::cpu_adamw_step(tensors, h, c.maps, c.counters);
}

void quantize_blockwise(const nb::ndarray<>& x, const nb::ndarray<>& codes,
                        const nb::ndarray<>& absmax, const ArrayList& map) {
  const spam::TensorRef ref = float_ref(x, kCpu, "x");
  const int64_t blocks = spam::num_blocks(ref.numel);
  uint8_t* c = typed_buffer<uint8_t>(codes, kCpu, ref.numel, "codes");
  float* a = typed_buffer<float>(absmax, kCpu, blocks, "absmax");
  const spam::QuantMap q = convert_map(map, kCpu, "map");
  nb::gil_scoped_release release;
  spam::cpu_quantize_blockwise(ref, c, a, q);
}

void dequantize_blockwise(const nb::ndarray<>& codes, const nb::ndarray<>& absmax,
                          const nb::ndarray<>& out, const ArrayList& map) {
  const spam::TensorRef ref = float_ref(out, kCpu, "out");
  const int64_t blocks = spam::num_blocks(ref.numel);
  const uint8_t* c = typed_buffer<uint8_t>(codes, kCpu, ref.numel, "codes");
  const float* a = typed_buffer<float>(absmax, kCpu, blocks, "absmax");
  const spam::QuantMap q = convert_map(map, kCpu, "map");
  nb::gil_scoped_release release;
  spam::cpu_dequantize_blockwise(c, a, ref, q);
}

}  // namespace

void bind_cpu_optim(nb::module_& m) {
  m.def("spam_step", &spam_step, "params"_a, "grads"_a, "exp_avgs"_a, "exp_avg_sqs"_a,
        "absmax_m"_a, "absmax_v"_a, "update_scales"_a, "counters"_a, "m_map"_a, "v_map"_a,
        nb::kw_only(), "beta1"_a, "one_minus_beta1"_a, "beta2"_a, "one_minus_beta2"_a, "eps"_a,
        "clip_threshold"_a, "weight_decay_scale"_a, "reset"_a, "skip_nonfinite"_a,
        "packed"_a = nb::none(), "packed_bad"_a = nb::none(),
        "SPAM step (ALGORITHMS.md §2.4) over all tensors of one group, in place.");
  m.def("stable_spam_step", &stable_spam_step, "params"_a, "grads"_a, "exp_avgs"_a,
        "exp_avg_sqs"_a, "absmax_m"_a, "absmax_v"_a, "grad_stats"_a, "stat_bias_corrections"_a,
        "step_sizes"_a, "sqrt_bc2s"_a, "counters"_a, "m_map"_a, "v_map"_a, nb::kw_only(),
        "gamma1"_a, "one_minus_gamma1"_a, "gamma2"_a, "one_minus_gamma2"_a, "gamma3"_a,
        "one_minus_gamma3"_a, "beta1"_a, "one_minus_beta1"_a, "beta2"_a, "one_minus_beta2"_a,
        "eps"_a, "weight_keep"_a, "reset"_a, "skip_nonfinite"_a, "packed"_a = nb::none(),
        "packed_bad"_a = nb::none(),
        "Stable-SPAM step (ALGORITHMS.md §4.4) over all tensors of one group, in place.");
  m.def("adamw_step", &adamw_step, "params"_a, "grads"_a, "exp_avgs"_a, "exp_avg_sqs"_a,
        "absmax_m"_a, "absmax_v"_a, "step_sizes"_a, "sqrt_bc2s"_a, "counters"_a, "m_map"_a,
        "v_map"_a, nb::kw_only(), "beta1"_a, "one_minus_beta1"_a, "beta2"_a,
        "one_minus_beta2"_a, "eps"_a, "weight_keep"_a, "skip_nonfinite"_a,
        "packed"_a = nb::none(), "packed_bad"_a = nb::none(),
        "AdamW step with torch.optim.AdamW's conventions, in place.");
  m.def("quantize_blockwise", &quantize_blockwise, "x"_a, "codes"_a, "absmax"_a, "map"_a,
        "Blockwise (256) 8-bit quantisation of x into codes and absmax (quant8.h).");
  m.def("dequantize_blockwise", &dequantize_blockwise, "codes"_a, "absmax"_a, "out"_a, "map"_a,
        "Inverse of quantize_blockwise, written into out.");
  m.def("num_threads", &spam::cpu_num_threads, "OpenMP threads used by the CPU core.");
  m.def("isa", &spam::cpu_isa_name, "Instruction set of the CPU kernels chosen at run time.");
}
