// cpu_quant4.cpp — 4-bit quantisers of the CPU module _C (fake quantisation, nibble
// pack/unpack, stochastic re-quantisation). Conversion and checks only (quant4_convert.h);
// the arithmetic is in cpp/spam/quant4_cpu.cpp. The GIL is released around every kernel.
#include "../spam/quant4_ops.h"
#include "quant4_convert.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

constexpr int kCpu = nb::device::cpu::value;
using spam::bind::SameDevice;

template <void (*Kernel)(const spam::TensorRef&, const spam::TensorRef&, int64_t)>
void fake(const nb::ndarray<>& in, const nb::ndarray<>& out, int64_t group) {
  SameDevice dev;
  auto [a, b] = spam::bind::convert_in_out(in, out, kCpu, dev);
  spam::bind::check_group_size(a.numel, group, false);
  nb::gil_scoped_release release;
  Kernel(a, b, group);
}

int64_t* counter(const nb::ndarray<>& bad) { return spam::bind::typed_buffer<int64_t>(bad, kCpu, 1, "bad"); }

void pack(const nb::ndarray<>& w, const nb::ndarray<>& codes, const nb::ndarray<>& scale,
          const nb::ndarray<>& zero, const nb::ndarray<>& outlier_idx, const nb::ndarray<>& outlier_val,
          const nb::ndarray<>& bad, int fmt, int64_t group) {
  SameDevice dev;
  const auto [wr, f, p] = spam::bind::convert_dense_and_packed(
      w, "w", fmt, group, codes, scale, zero, outlier_idx, outlier_val, kCpu, dev);
  int64_t* b = counter(bad);
  nb::gil_scoped_release release;
  *b += spam::q4::cpu_pack(wr, p, f, group);
}

void unpack(const nb::ndarray<>& codes, const nb::ndarray<>& scale, const nb::ndarray<>& zero,
            const nb::ndarray<>& outlier_idx, const nb::ndarray<>& outlier_val,
            const nb::ndarray<>& out, int fmt, int64_t group) {
  SameDevice dev;
  const auto [o, f, p] = spam::bind::convert_dense_and_packed(
      out, "out", fmt, group, codes, scale, zero, outlier_idx, outlier_val, kCpu, dev);
  nb::gil_scoped_release release;
  spam::q4::cpu_unpack(p, o, f, group);
}

void requant_sr(const nb::ndarray<>& w, const nb::ndarray<>& codes, const nb::ndarray<>& scale,
                const nb::ndarray<>& zero, const nb::ndarray<>& outlier_idx,
                const nb::ndarray<>& outlier_val, const nb::ndarray<>& bad, int fmt, int64_t group,
                uint64_t seed, uint64_t step) {
  SameDevice dev;
  const auto [wr, f, p] = spam::bind::convert_dense_and_packed(
      w, "w", fmt, group, codes, scale, zero, outlier_idx, outlier_val, kCpu, dev);
  int64_t* b = counter(bad);
  nb::gil_scoped_release release;
  *b += spam::q4::cpu_requant_sr(wr, p, f, group, seed, step);
}

}  // namespace

void bind_cpu_quant4(nb::module_& m) {
  m.def("q4_fake_weight_int4", &fake<spam::q4::cpu_fake_weight_int4>, "input"_a, "out"_a,
        "group"_a, "INT4 asymmetric min-max fake quantisation per group (ALGORITHMS.md §5.2).");
  m.def("q4_fake_act_int4", &fake<spam::q4::cpu_fake_act_int4>, "input"_a, "out"_a, "group"_a,
        "INT4 symmetric fake quantisation per group, top-2 |x| kept exact (ALGORITHMS.md §5.2).");
  m.def("q4_fake_fp4", &fake<spam::q4::cpu_fake_fp4>, "input"_a, "out"_a, "group"_a,
        "9-level 'FP4' fake quantisation per group, top-2 |x| kept exact (ALGORITHMS.md §5.3).");
  m.def("q4_pack", &pack, "w"_a, "codes"_a, "scale"_a, "zero"_a.none(), "outlier_idx"_a.none(),
        "outlier_val"_a.none(), "bad"_a, nb::kw_only(), "fmt"_a, "group"_a,
        "Round-to-nearest packing; adds the number of non-finite groups (left unwritten) to bad[0].");
  m.def("q4_unpack", &unpack, "codes"_a, "scale"_a, "zero"_a.none(), "outlier_idx"_a.none(),
        "outlier_val"_a.none(), "out"_a, nb::kw_only(), "fmt"_a, "group"_a,
        "Dequantise packed 4-bit codes into out.");
  m.def("q4_requant_sr", &requant_sr, "w"_a, "codes"_a, "scale"_a, "zero"_a.none(),
        "outlier_idx"_a.none(), "outlier_val"_a.none(), "bad"_a, nb::kw_only(), "fmt"_a,
        "group"_a, "seed"_a, "step"_a,
        "Stochastic-rounding re-quantisation of w into the packed buffers; non-finite groups "
        "keep their old data and are added to bad[0].");
}
