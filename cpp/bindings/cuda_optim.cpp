// cuda_optim.cpp — the optimizer steps and 8-bit quantisers of the CUDA module _C_cuda. Same
// Python signatures as _C (cpu_optim.cpp) plus `stream` (and `scratch` for Stable-SPAM).
// Compiled by the host compiler: it includes cuda_api.h only, never a CUDA header, so the
// module imports (and stable_spam_scratch_bytes works) on a machine without a GPU.
//
// Checks argument devices, dtypes, sizes and contiguity (convert.h), that every tensor — the
// code maps included — lives on the same CUDA device, assembles the hyper-parameter structs
// from named keywords, and enqueues the work with the GIL released. Nothing here waits for
// the GPU. As on the CPU, each tensor's moments are dense or 8-bit (uint8 codes in
// exp_avgs/exp_avg_sqs plus absmax_m/absmax_v), mixed freely within a call, and a tensor may
// be a packed 4-bit weight (optional `packed` / `packed_bad`, packed_convert.h).
#include <nanobind/stl/vector.h>

#include <string>

#include "../spam/cuda_api.h"
#include "convert.h"
#include "packed_convert.h"

namespace nb = nanobind;
using namespace nb::literals;
using namespace spam::bind;  // NOLINT: binding helpers (convert.h)

namespace {

constexpr int kCuda = nb::device::cuda::value;

// A code map on the device of the call (a kernel cannot read another GPU's table).
spam::QuantMap device_map(const ArrayList& parts, const char* name, SameDevice& dev) {
  const spam::QuantMap q = convert_map(parts, kCuda, name);
  for (size_t k = 0; k < parts.size(); ++k) dev.check(parts[k], describe(name, k));
  return q;
}

struct Common {
  StepBuffers b;
  spam::QuantMaps maps{};
  int64_t* counters;
  std::vector<spam::PackedParam> q4;  // one per tensor; inactive for dense parameters
};

// Converts what every step takes. The maps are converted (and checked) only when some tensor
// has 8-bit moments, as on the CPU: a dense-only call never reads them.
Common convert_common(const ArrayList& params, const ArrayList& grads, const ArrayList& exp_avgs,
                      const ArrayList& exp_avg_sqs, const ArrayList& absmax_m,
                      const ArrayList& absmax_v, const nb::ndarray<>& counters,
                      const ArrayList& m_map, const ArrayList& v_map, const nb::object& packed,
                      const nb::object& packed_bad, SameDevice& dev) {
  const std::vector<char> mask = packed_mask(packed, params.size());
  Common c{convert_step_buffers(params, grads, exp_avgs, exp_avg_sqs, absmax_m, absmax_v, kCuda,
                                dev, mask.empty() ? nullptr : &mask),
           {}, typed_buffer<int64_t>(counters, kCuda, spam::Counters::kCount, "counters"), {}};
  dev.check(counters, "counters");
  if (c.b.any_q8) c.maps = spam::QuantMaps{device_map(m_map, "m_map", dev),
                                           device_map(v_map, "v_map", dev)};
  c.q4 = convert_packed_params(packed, packed_bad, mask, c.b, kCuda, dev);
  return c;
}

void spam_step(const ArrayList& params, const ArrayList& grads, const ArrayList& exp_avgs,
               const ArrayList& exp_avg_sqs, const ArrayList& absmax_m, const ArrayList& absmax_v,
               const std::vector<double>& update_scales, const nb::ndarray<>& counters,
               const ArrayList& m_map, const ArrayList& v_map, double beta1,
               double one_minus_beta1, double beta2, double one_minus_beta2, double eps,
               double clip_threshold, double weight_decay_scale, int reset, bool skip_nonfinite,
               uintptr_t stream, const nb::object& packed, const nb::object& packed_bad) {
  SameDevice dev;
  const Common c = convert_common(params, grads, exp_avgs, exp_avg_sqs, absmax_m, absmax_v,
                                  counters, m_map, v_map, packed, packed_bad, dev);
  check_lengths(params.size(), update_scales.size(), "update_scales");
  const spam::SpamHyper h = spam_hyper(beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                                         clip_threshold, weight_decay_scale, reset, skip_nonfinite);
  std::vector<spam::SpamTensor> tensors;
  tensors.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i)
    tensors.push_back({c.b.p[i], c.b.g[i], c.b.m[i], c.b.v[i],
                       static_cast<float>(update_scales[i]), c.b.q8[i], c.q4[i]});
  const spam::CudaContext ctx{dev.device(), stream};
  nb::gil_scoped_release release;
  spam::cuda_spam_step(tensors, h, c.maps, c.counters, ctx);
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
                      const nb::ndarray<>& scratch, uintptr_t stream, const nb::object& packed,
                      const nb::object& packed_bad) {
  SameDevice dev;
  const Common c = convert_common(params, grads, exp_avgs, exp_avg_sqs, absmax_m, absmax_v,
                                  counters, m_map, v_map, packed, packed_bad, dev);
  const size_t n = params.size();
  check_lengths(n, grad_stats.size(), "grad_stats");
  check_lengths(3 * n, stat_bias_corrections.size(), "stat_bias_corrections (3 per tensor)");
  check_lengths(n, step_sizes.size(), "step_sizes");
  check_lengths(n, sqrt_bc2s.size(), "sqrt_bc2s");

  std::vector<int64_t> numels;
  numels.reserve(n);
  for (const auto& p : c.b.p) numels.push_back(p.numel);
  const int64_t need = spam::cuda_stable_spam_scratch_bytes(numels);
  uint8_t* scratch_ptr = typed_buffer<uint8_t>(scratch, kCuda, need, "scratch");
  dev.check(scratch, "scratch");
  if (reinterpret_cast<uintptr_t>(scratch_ptr) % 16 != 0)
    throw nb::value_error("scratch: buffer must be 16-byte aligned (allocate it fresh)");

  const spam::StableAdamHyper h = adam_hyper(beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                                             weight_keep, reset, skip_nonfinite);
  std::vector<spam::StableSpamTensor> tensors;
  tensors.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const std::string name = describe("grad_stats", i);
    float* stats = typed_buffer<float>(grad_stats[i], kCuda, spam::GradStatsIndex::kCount, name);
    dev.check(grad_stats[i], name);
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
  const spam::CudaContext ctx{dev.device(), stream};
  const int64_t scratch_bytes = static_cast<int64_t>(scratch.size());
  nb::gil_scoped_release release;
  spam::cuda_stable_spam_step(tensors, h, c.maps, c.counters, scratch_ptr, scratch_bytes, ctx);
}

void adamw_step(const ArrayList& params, const ArrayList& grads, const ArrayList& exp_avgs,
                const ArrayList& exp_avg_sqs, const ArrayList& absmax_m, const ArrayList& absmax_v,
                const std::vector<double>& step_sizes, const std::vector<double>& sqrt_bc2s,
                const nb::ndarray<>& counters, const ArrayList& m_map, const ArrayList& v_map,
                double beta1, double one_minus_beta1, double beta2, double one_minus_beta2,
                double eps, double weight_keep, bool skip_nonfinite, uintptr_t stream,
                const nb::object& packed, const nb::object& packed_bad) {
  SameDevice dev;
  const Common c = convert_common(params, grads, exp_avgs, exp_avg_sqs, absmax_m, absmax_v,
                                  counters, m_map, v_map, packed, packed_bad, dev);
  check_lengths(params.size(), step_sizes.size(), "step_sizes");
  check_lengths(params.size(), sqrt_bc2s.size(), "sqrt_bc2s");
  const spam::StableAdamHyper h = adam_hyper(beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                                             weight_keep, 0, skip_nonfinite);
  std::vector<spam::AdamTensor> tensors;
  tensors.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i)
    tensors.push_back({c.b.p[i], c.b.g[i], c.b.m[i], c.b.v[i],
                       spam::StableAdamTensor{static_cast<float>(step_sizes[i]),
                                              static_cast<float>(sqrt_bc2s[i])},
                       c.b.q8[i], c.q4[i]});
  const spam::CudaContext ctx{dev.device(), stream};
  nb::gil_scoped_release release;
  spam::cuda_adamw_step(tensors, h, c.maps, c.counters, ctx);
}

void quantize_blockwise(const nb::ndarray<>& x, const nb::ndarray<>& codes,
                        const nb::ndarray<>& absmax, const ArrayList& map, uintptr_t stream) {
  SameDevice dev;
  const spam::TensorRef ref = float_ref(x, kCuda, "x");
  dev.check(x, "x");
  const int64_t blocks = spam::num_blocks(ref.numel);
  uint8_t* c = typed_buffer<uint8_t>(codes, kCuda, ref.numel, "codes");
  dev.check(codes, "codes");
  float* a = typed_buffer<float>(absmax, kCuda, blocks, "absmax");
  dev.check(absmax, "absmax");
  const spam::QuantMap q = device_map(map, "map", dev);
  const spam::CudaContext ctx{dev.device(), stream};
  nb::gil_scoped_release release;
  spam::cuda_quantize_blockwise(ref, c, a, q, ctx);
}

void dequantize_blockwise(const nb::ndarray<>& codes, const nb::ndarray<>& absmax,
                          const nb::ndarray<>& out, const ArrayList& map, uintptr_t stream) {
  SameDevice dev;
  const spam::TensorRef ref = float_ref(out, kCuda, "out");
  dev.check(out, "out");
  const int64_t blocks = spam::num_blocks(ref.numel);
  const uint8_t* c = typed_buffer<uint8_t>(codes, kCuda, ref.numel, "codes");
  dev.check(codes, "codes");
  const float* a = typed_buffer<float>(absmax, kCuda, blocks, "absmax");
  dev.check(absmax, "absmax");
  const spam::QuantMap q = device_map(map, "map", dev);
  const spam::CudaContext ctx{dev.device(), stream};
  nb::gil_scoped_release release;
  spam::cuda_dequantize_blockwise(c, a, ref, q, ctx);
}

int64_t stable_spam_scratch_bytes(const std::vector<int64_t>& numels) {
  for (const int64_t n : numels)
    if (n < 0) throw nb::value_error("spam_lowmem: numels must be >= 0");
  return spam::cuda_stable_spam_scratch_bytes(numels);
}

}  // namespace

void bind_cuda_optim(nb::module_& m) {
  m.def("spam_step", &spam_step, "params"_a, "grads"_a, "exp_avgs"_a, "exp_avg_sqs"_a,
        "absmax_m"_a, "absmax_v"_a, "update_scales"_a, "counters"_a, "m_map"_a, "v_map"_a,
        nb::kw_only(), "beta1"_a, "one_minus_beta1"_a,
        "beta2"_a, "one_minus_beta2"_a, "eps"_a, "clip_threshold"_a, "weight_decay_scale"_a,
        "reset"_a, "skip_nonfinite"_a, "stream"_a, "packed"_a = nb::none(),
        "packed_bad"_a = nb::none(),
        "SPAM step (ALGORITHMS.md §2.4) over all tensors of one group, in place, enqueued on "
        "`stream` (an int cudaStream_t). `counters` (int64 CUDA [clipped, nonfinite]) is added "
        "into on the device; nothing synchronises.");
  m.def("stable_spam_step", &stable_spam_step, "params"_a, "grads"_a, "exp_avgs"_a,
        "exp_avg_sqs"_a, "absmax_m"_a, "absmax_v"_a, "grad_stats"_a,
        "stat_bias_corrections"_a, "step_sizes"_a, "sqrt_bc2s"_a, "counters"_a, "m_map"_a,
        "v_map"_a, nb::kw_only(), "gamma1"_a, "one_minus_gamma1"_a,
        "gamma2"_a, "one_minus_gamma2"_a, "gamma3"_a, "one_minus_gamma3"_a, "beta1"_a,
        "one_minus_beta1"_a, "beta2"_a, "one_minus_beta2"_a, "eps"_a, "weight_keep"_a,
        "reset"_a, "skip_nonfinite"_a, "scratch"_a, "stream"_a, "packed"_a = nb::none(),
        "packed_bad"_a = nb::none(),
        "Stable-SPAM step (ALGORITHMS.md §4.4) over all tensors of one group, in place, "
        "enqueued on `stream`. `scratch` is a uint8 CUDA buffer of at least "
        "stable_spam_scratch_bytes(numels) bytes, free for the step's duration (stream order).");
  m.def("adamw_step", &adamw_step, "params"_a, "grads"_a, "exp_avgs"_a, "exp_avg_sqs"_a,
        "absmax_m"_a, "absmax_v"_a, "step_sizes"_a, "sqrt_bc2s"_a, "counters"_a, "m_map"_a,
        "v_map"_a, nb::kw_only(), "beta1"_a, "one_minus_beta1"_a, "beta2"_a,
        "one_minus_beta2"_a, "eps"_a, "weight_keep"_a, "skip_nonfinite"_a, "stream"_a,
        "packed"_a = nb::none(), "packed_bad"_a = nb::none(),
        "AdamW step with torch.optim.AdamW's conventions, in place, enqueued on `stream`.");
  m.def("quantize_blockwise", &quantize_blockwise, "x"_a, "codes"_a, "absmax"_a, "map"_a,
        nb::kw_only(), "stream"_a,
        "Blockwise (256) 8-bit quantisation of x into codes and absmax (quant8.h), enqueued "
        "on `stream`.");
  m.def("dequantize_blockwise", &dequantize_blockwise, "codes"_a, "absmax"_a, "out"_a, "map"_a,
        nb::kw_only(), "stream"_a, "Inverse of quantize_blockwise, written into out, enqueued "
        "on `stream`.");
  m.def("stable_spam_scratch_bytes", &stable_spam_scratch_bytes, "numels"_a,
        "Bytes of device scratch stable_spam_step needs for tensors of these sizes.");
}
