// cpu_backend.h — CpuBackend, the policy bind_steps (step_entry.h) and bind_quant4
// (quant4_entry.h) are instantiated with for the CPU module _C: host arrays, no stream, and the
// spam::cpu_* entry points (cpu_ops.h, quant4_ops.h).
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <string>
#include <vector>

#include "../spam/cpu_ops.h"
#include "../spam/quant4_ops.h"
#include "../spam/sparse_subset.h"
#include "convert.h"
#include "sparse_convert.h"

namespace spam::bind {

struct CpuBackend {
  static constexpr int kDeviceType = nb::device::cpu::value;

  struct Context {};
  // A stream here means the caller took a CUDA path by mistake: say so instead of ignoring it.
  static Context context(int /*device*/, uintptr_t stream) {
    if (stream != 0) throw nb::value_error("stream: the CPU core has no streams (pass 0)");
    return {};
  }

  // The CPU kernel walks from the block starts and reads the subset rule on the host: both are
  // checked here (the CUDA kernel clamps them instead).
  using SparseTensor = SparseSpamTensor;
  static SparseTensor sparse_tensor(const SparseBuffers& b, const nb::ndarray<>& subset, size_t i,
                                    SameDevice& /*dev*/) {
    for (int64_t c = 0; c * kQuantBlock < b.compact; ++c)
      if (b.block_starts[c] < 0 || b.block_starts[c] >= b.param.numel)
        throw nb::value_error((describe("block_starts", i) + ": index out of range").c_str());
    return SparseSpamTensor{b.param,
                            b.grad,
                            b.exp_avg,
                            b.exp_avg_sq,
                            b.compact,
                            b.block_starts,
                            read_subset(subset, b.param.numel, b.offset, i),
                            b.offset,
                            0.0f,
                            b.q8};
  }

  // The rule of the whole parameter: its numel is the global one, and the tensor (local
  // numel elements from global index `offset`) must lie inside it (docs/algorithms.md §13.3).
  static SubsetRule read_subset(const nb::ndarray<>& a, int64_t numel, int64_t offset, size_t i) {
    const int64_t* s = typed_buffer<int64_t>(a, kDeviceType, 4, describe("subsets", i));
    if (s[0] < 0 || s[0] > 0xFFFFFFFFll || s[1] < 0 || s[1] > 0xFFFFFFFFll || s[2] < -1)
      throw nb::value_error((describe("subsets", i) + ": seed/t_hash must lie in [0, 2^32), "
                                                      "t_index >= -1")
                                .c_str());
    if (s[3] < 0 || s[3] > kMaxSparseNumel)
      throw nb::value_error(
          (describe("subsets", i) + ": numel " + std::to_string(s[3]) + " must lie in [0, 2^32)")
              .c_str());
    if (offset + numel > s[3])
      throw nb::value_error((describe("subsets", i) + ": subset was drawn for " +
                             std::to_string(s[3]) + " elements; the tensor holds " +
                             std::to_string(numel) + " from global index " + std::to_string(offset))
                                .c_str());
    return SubsetRule{static_cast<uint32_t>(s[0]), static_cast<uint32_t>(s[1]), s[2]};
  }

  // Stable-SPAM's reductions need no device scratch on the CPU.
  struct Scratch {};
  static Scratch scratch(const nb::object& s, const StepBuffers& /*b*/, SameDevice /*dev*/) {
    if (!s.is_none()) throw nb::value_error("scratch: the CPU core takes none (pass None)");
    return {};
  }

  // The kernels (cpu_ops.h), called through `call`: the CPU entry points take no context.
  static constexpr auto spam_step = &cpu_spam_step;
  static constexpr auto sparse_spam_step = &cpu_sparse_spam_step;
  template <class A>  // an element algorithm (algorithms.h)
  static constexpr auto element_step = &cpu_element_step<A>;
  static void stable_spam_step(const std::vector<StableSpamTensor>& t, const AdamHyper& h,
                               const QuantMaps& maps, int64_t* counters, const Scratch& /*s*/,
                               const StatsReduce& reduce) {
    cpu_stable_spam_step(t, h, maps, counters, reduce);
  }
  static constexpr auto quantize = &cpu_quantize_blockwise;
  static constexpr auto dequantize = &cpu_dequantize_blockwise;
  // The 4-bit quantisers (quant4_ops.h); the packers' non-finite group counts are added into
  // the caller's counter, as the CUDA launchers do.
  static constexpr auto q4_fake_weight_int4 = &q4::cpu_fake_weight_int4;
  static constexpr auto q4_fake_act_int4 = &q4::cpu_fake_act_int4;
  static constexpr auto q4_fake_fp4 = &q4::cpu_fake_fp4;
  static constexpr auto q4_unpack = &q4::cpu_unpack;
  static void q4_pack(const TensorRef& w, const q4::Packed& p, q4::Format f, int64_t group,
                      int64_t* bad) {
    *bad += q4::cpu_pack(w, p, f, group);
  }
  static void q4_requant_sr(const TensorRef& w, const q4::Packed& p, q4::Format f, int64_t group,
                            uint64_t seed, uint64_t step, int64_t* bad) {
    *bad += q4::cpu_requant_sr(w, p, f, group, seed, step);
  }

  template <class Kernel, class... Args>
  static void call(Kernel kernel, const Context& /*ctx*/, const Args&... args) {
    kernel(args...);
  }

  static void bind_extras(nb::module_& m) {
    m.def("num_threads", &cpu_num_threads, "OpenMP threads used by the CPU core.");
    m.def("isa", &cpu_isa_name, "Instruction set of the CPU kernels chosen at run time.");
  }
};

}  // namespace spam::bind
