// cuda_quant4.cpp — 4-bit quantisers of the CUDA module _C_cuda: the same functions and
// keywords as the CPU module (cpu_quant4.cpp) plus `stream`. Conversion and checks only;
// the kernels are in cuda/quant4.cu. Compiled by the host compiler: no CUDA header here.
#include "../spam/cuda_quant4_api.h"
#include "quant4_convert.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

constexpr int kCuda = nb::device::cuda::value;
using spam::bind::SameDevice;

using FakeLauncher = void (*)(const spam::TensorRef&, const spam::TensorRef&, int64_t, int, uintptr_t);

template <FakeLauncher Launch>
void fake(const nb::ndarray<>& in, const nb::ndarray<>& out, int64_t group, uintptr_t stream) {
  SameDevice dev;
  auto [a, b] = spam::bind::convert_in_out(in, out, kCuda, dev);
  spam::bind::check_group_size(a.numel, group, false);
  Launch(a, b, group, dev.device(), stream);
}

int64_t* counter(const nb::ndarray<>& bad, SameDevice& dev) {
  int64_t* p = spam::bind::typed_buffer<int64_t>(bad, kCuda, 1, "bad");
  dev.check(bad, "bad");
  return p;
}

void pack(const nb::ndarray<>& w, const nb::ndarray<>& codes, const nb::ndarray<>& scale,
          const nb::ndarray<>& zero, const nb::ndarray<>& outlier_idx, const nb::ndarray<>& outlier_val,
          const nb::ndarray<>& bad, int fmt, int64_t group, uintptr_t stream) {
  SameDevice dev;
  const auto [wr, f, p] = spam::bind::convert_dense_and_packed(
      w, "w", fmt, group, codes, scale, zero, outlier_idx, outlier_val, kCuda, dev);
  spam::q4::launch_pack(wr, p, f, group, counter(bad, dev), dev.device(), stream);
}

void unpack(const nb::ndarray<>& codes, const nb::ndarray<>& scale, const nb::ndarray<>& zero,
            const nb::ndarray<>& outlier_idx, const nb::ndarray<>& outlier_val,
            const nb::ndarray<>& out, int fmt, int64_t group, uintptr_t stream) {
  SameDevice dev;
  const auto [o, f, p] = spam::bind::convert_dense_and_packed(
      out, "out", fmt, group, codes, scale, zero, outlier_idx, outlier_val, kCuda, dev);
  spam::q4::launch_unpack(p, o, f, group, dev.device(), stream);
}

void requant_sr(const nb::ndarray<>& w, const nb::ndarray<>& codes, const nb::ndarray<>& scale,
                const nb::ndarray<>& zero, const nb::ndarray<>& outlier_idx,
                const nb::ndarray<>& outlier_val, const nb::ndarray<>& bad, int fmt, int64_t group,
                uint64_t seed, uint64_t step, uintptr_t stream) {
  SameDevice dev;
  const auto [wr, f, p] = spam::bind::convert_dense_and_packed(
      w, "w", fmt, group, codes, scale, zero, outlier_idx, outlier_val, kCuda, dev);
  spam::q4::launch_requant_sr(wr, p, f, group, seed, step, counter(bad, dev), dev.device(), stream);
}

}  // namespace

void bind_cuda_quant4(nb::module_& m) {
  m.def("q4_fake_weight_int4", &fake<spam::q4::launch_fake_weight_int4>, "input"_a, "out"_a,
        "group"_a, nb::kw_only(), "stream"_a = 0, "INT4 min-max fake quantisation per group.");
  m.def("q4_fake_act_int4", &fake<spam::q4::launch_fake_act_int4>, "input"_a, "out"_a, "group"_a,
        nb::kw_only(), "stream"_a = 0, "INT4 top-2 activation fake quantisation per group.");
  m.def("q4_fake_fp4", &fake<spam::q4::launch_fake_fp4>, "input"_a, "out"_a, "group"_a,
        nb::kw_only(), "stream"_a = 0, "9-level 'FP4' top-2 fake quantisation per group.");
  m.def("q4_pack", &pack, "w"_a, "codes"_a, "scale"_a, "zero"_a.none(), "outlier_idx"_a.none(),
        "outlier_val"_a.none(), "bad"_a, nb::kw_only(), "fmt"_a, "group"_a, "stream"_a = 0,
        "Round-to-nearest packing; non-finite groups are left unwritten and counted in bad[0].");
  m.def("q4_unpack", &unpack, "codes"_a, "scale"_a, "zero"_a.none(), "outlier_idx"_a.none(),
        "outlier_val"_a.none(), "out"_a, nb::kw_only(), "fmt"_a, "group"_a, "stream"_a = 0,
        "Dequantise packed 4-bit codes into out.");
  m.def("q4_requant_sr", &requant_sr, "w"_a, "codes"_a, "scale"_a, "zero"_a.none(),
        "outlier_idx"_a.none(), "outlier_val"_a.none(), "bad"_a, nb::kw_only(), "fmt"_a,
        "group"_a, "seed"_a, "step"_a, "stream"_a = 0,
        "Stochastic-rounding re-quantisation into the packed buffers; non-finite groups keep "
        "their old data and are counted in bad[0].");
}
