// cuda_backend.h — CudaBackend, the policy bind_steps (step_entry.h) and bind_quant4
// (quant4_entry.h) are instantiated with for the CUDA module _C_cuda: device arrays, work
// enqueued on the caller's stream with nothing waiting for it, and the spam::cuda_* and
// spam::q4::launch_* launchers. Includes the plain-C++ launcher headers only (cuda_api.h,
// cuda_quant4_api.h, cuda_sparse_api.h), never a CUDA header: _C_cuda is compiled by the host
// compiler and imports on a machine without a GPU.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/vector.h>

#include <vector>

#include "../spam/cuda_api.h"
#include "../spam/cuda_quant4_api.h"
#include "../spam/cuda_sparse_api.h"
#include "convert.h"
#include "sparse_convert.h"

namespace spam::bind {

struct CudaBackend {
  static constexpr int kDeviceType = nb::device::cuda::value;

  using Context = CudaContext;
  static Context context(int device, uintptr_t stream) { return CudaContext{device, stream}; }

  // The subset rule and the block starts stay on the device: reading them here would cost a
  // sync per step (cuda_sparse_api.h says what the kernel does with inconsistent ones).
  using SparseTensor = CudaSparseSpamTensor;
  static SparseTensor sparse_tensor(const SparseBuffers& b, const nb::ndarray<>& subset, size_t i,
                                    SameDevice& dev) {
    const int64_t* rule = typed_buffer<int64_t>(subset, kDeviceType, 4, describe("subsets", i));
    dev.check(subset, describe("subsets", i));
    return CudaSparseSpamTensor{b.param,        b.grad, b.exp_avg, b.exp_avg_sq, b.compact,
                                b.block_starts, rule,   b.offset,  0.0f,         b.q8};
  }

  // Stable-SPAM's device scratch (cuda_api.h), held for the call so its memory stays the
  // step's until the launch is enqueued.
  struct Scratch {
    nb::ndarray<> array;
    uint8_t* ptr = nullptr;
    int64_t bytes = 0;
  };
  static Scratch scratch(const nb::object& s, const StepBuffers& b, SameDevice dev) {
    if (s.is_none())
      throw nb::value_error(
          "scratch: the CUDA Stable-SPAM step needs a uint8 buffer of "
          "stable_spam_scratch_bytes(numels) bytes");
    Scratch out{nb::cast<nb::ndarray<>>(s)};
    std::vector<int64_t> numels;
    numels.reserve(b.p.size());
    for (const TensorRef& p : b.p) numels.push_back(p.numel);
    out.ptr = typed_buffer<uint8_t>(out.array, kDeviceType, cuda_stable_spam_scratch_bytes(numels),
                                    "scratch");
    dev.check(out.array, "scratch");
    if (reinterpret_cast<uintptr_t>(out.ptr) % 16 != 0)
      throw nb::value_error("scratch: buffer must be 16-byte aligned (allocate it fresh)");
    out.bytes = static_cast<int64_t>(out.array.size());
    return out;
  }

  // The launchers (cuda_api.h), called through `call` with the context last.
  static constexpr auto spam_step = &cuda_spam_step;
  static constexpr auto sparse_spam_step = &cuda_sparse_spam_step;
  template <class A>  // an element algorithm (algorithms.h)
  static constexpr auto element_step = &cuda_element_step<A>;
  static void stable_spam_step(const std::vector<StableSpamTensor>& t, const AdamHyper& h,
                               const QuantMaps& maps, int64_t* counters, const Scratch& s,
                               const StatsReduce& reduce, const Context& ctx) {
    cuda_stable_spam_step(t, h, maps, counters, s.ptr, s.bytes, reduce, ctx);
  }
  static constexpr auto quantize = &cuda_quantize_blockwise;
  static constexpr auto dequantize = &cuda_dequantize_blockwise;
  // The 4-bit quantisers (cuda_quant4_api.h), which take the device and stream apart.
  using FakeLauncher = void (*)(const TensorRef&, const TensorRef&, int64_t, int, uintptr_t);
  template <FakeLauncher Launch>
  static void q4_fake(const TensorRef& in, const TensorRef& out, int64_t group,
                      const Context& ctx) {
    Launch(in, out, group, ctx.device, ctx.stream);
  }
  static constexpr auto q4_fake_weight_int4 = &q4_fake<q4::launch_fake_weight_int4>;
  static constexpr auto q4_fake_act_int4 = &q4_fake<q4::launch_fake_act_int4>;
  static constexpr auto q4_fake_fp4 = &q4_fake<q4::launch_fake_fp4>;
  static void q4_pack(const TensorRef& w, const q4::Packed& p, q4::Format f, int64_t group,
                      int64_t* bad, const Context& ctx) {
    q4::launch_pack(w, p, f, group, bad, ctx.device, ctx.stream);
  }
  static void q4_unpack(const q4::Packed& p, const TensorRef& out, q4::Format f, int64_t group,
                        const Context& ctx) {
    q4::launch_unpack(p, out, f, group, ctx.device, ctx.stream);
  }
  static void q4_requant_sr(const TensorRef& w, const q4::Packed& p, q4::Format f, int64_t group,
                            uint64_t seed, uint64_t step, int64_t* bad, const Context& ctx) {
    q4::launch_requant_sr(w, p, f, group, seed, step, bad, ctx.device, ctx.stream);
  }

  template <class Kernel, class... Args>
  static void call(Kernel kernel, const Context& ctx, const Args&... args) {
    kernel(args..., ctx);
  }

  static void bind_extras(nb::module_& m) {
    using namespace nb::literals;
    m.def(
        "stable_spam_scratch_bytes",
        [](const std::vector<int64_t>& numels) {
          for (const int64_t n : numels)
            if (n < 0) throw nb::value_error("spam_lowmem: numels must be >= 0");
          return cuda_stable_spam_scratch_bytes(numels);
        },
        "numels"_a, "Bytes of device scratch a Stable-SPAM step needs for tensors of these sizes.");
  }
};

}  // namespace spam::bind
