// quant4_entry.h — the 4-bit quantisers of a core module (fake quantisation, nibble
// pack/unpack, stochastic re-quantisation), written once and instantiated per backend like
// step_entry.h: bind_quant4<CpuBackend> in _C, bind_quant4<CudaBackend> in _C_cuda. Conversion
// and checks only (quant4_convert.h); the kernels are the Backend's q4_* members. Every
// function takes `stream` (CUDA: the stream it is enqueued on; CPU: 0).
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include "convert.h"
#include "quant4_convert.h"

namespace spam::bind {

template <class Backend, auto Kernel>
void q4_fake(const nb::ndarray<>& in, const nb::ndarray<>& out, int64_t group, uintptr_t stream) {
  SameDevice dev;
  const auto [a, b] = convert_in_out(in, out, Backend::kDeviceType, dev);
  check_group_size(a.numel, group, false);
  const auto ctx = Backend::context(dev.device(), stream);
  nb::gil_scoped_release release;
  Backend::call(Kernel, ctx, a, b, group);
}

// What a packer gets: the dense weight, the packed buffers it writes, the int64[1] counter it
// adds the number of non-finite groups to, and where it runs.
template <class Backend>
struct PackCall {
  DenseAndPacked w;
  int64_t* bad;
  typename Backend::Context ctx;
};

template <class Backend>
PackCall<Backend> convert_pack_call(const nb::ndarray<>& w, const nb::ndarray<>& codes,
                                    const nb::ndarray<>& scale, const nb::ndarray<>& zero,
                                    const nb::ndarray<>& outlier_idx,
                                    const nb::ndarray<>& outlier_val, const nb::ndarray<>& bad,
                                    int fmt, int64_t group, uintptr_t stream) {
  constexpr int kDev = Backend::kDeviceType;
  SameDevice dev;
  DenseAndPacked d = convert_dense_and_packed(w, "w", fmt, group, codes, scale, zero, outlier_idx,
                                              outlier_val, kDev, dev);
  int64_t* b = typed_buffer<int64_t>(bad, kDev, 1, "bad");
  dev.check(bad, "bad");
  return {d, b, Backend::context(dev.device(), stream)};
}

template <class Backend>
void q4_pack(const nb::ndarray<>& w, const nb::ndarray<>& codes, const nb::ndarray<>& scale,
             const nb::ndarray<>& zero, const nb::ndarray<>& outlier_idx,
             const nb::ndarray<>& outlier_val, const nb::ndarray<>& bad, int fmt, int64_t group,
             uintptr_t stream) {
  const PackCall<Backend> c = convert_pack_call<Backend>(w, codes, scale, zero, outlier_idx,
                                                         outlier_val, bad, fmt, group, stream);
  nb::gil_scoped_release release;
  Backend::call(Backend::q4_pack, c.ctx, c.w.dense, c.w.packed, c.w.fmt, group, c.bad);
}

template <class Backend>
void q4_unpack(const nb::ndarray<>& codes, const nb::ndarray<>& scale, const nb::ndarray<>& zero,
               const nb::ndarray<>& outlier_idx, const nb::ndarray<>& outlier_val,
               const nb::ndarray<>& out, int fmt, int64_t group, uintptr_t stream) {
  SameDevice dev;
  const auto [o, f, p] =
      convert_dense_and_packed(out, "out", fmt, group, codes, scale, zero, outlier_idx, outlier_val,
                               Backend::kDeviceType, dev);
  const auto ctx = Backend::context(dev.device(), stream);
  nb::gil_scoped_release release;
  Backend::call(Backend::q4_unpack, ctx, p, o, f, group);
}

template <class Backend>
void q4_requant_sr(const nb::ndarray<>& w, const nb::ndarray<>& codes, const nb::ndarray<>& scale,
                   const nb::ndarray<>& zero, const nb::ndarray<>& outlier_idx,
                   const nb::ndarray<>& outlier_val, const nb::ndarray<>& bad, int fmt,
                   int64_t group, uint64_t seed, uint64_t step, uintptr_t stream) {
  const PackCall<Backend> c = convert_pack_call<Backend>(w, codes, scale, zero, outlier_idx,
                                                         outlier_val, bad, fmt, group, stream);
  nb::gil_scoped_release release;
  Backend::call(Backend::q4_requant_sr, c.ctx, c.w.dense, c.w.packed, c.w.fmt, group, seed, step,
                c.bad);
}

template <class Backend>
void bind_quant4(nb::module_& m) {
  using namespace nb::literals;
  m.def("q4_fake_weight_int4", &q4_fake<Backend, Backend::q4_fake_weight_int4>, "input"_a, "out"_a,
        "group"_a, nb::kw_only(), "stream"_a = 0,
        "INT4 asymmetric min-max fake quantisation per group (docs/algorithms.md §5.2).");
  m.def("q4_fake_act_int4", &q4_fake<Backend, Backend::q4_fake_act_int4>, "input"_a, "out"_a,
        "group"_a, nb::kw_only(), "stream"_a = 0,
        "INT4 symmetric fake quantisation per group, top-2 |x| kept exact (docs/algorithms.md "
        "§5.2).");
  m.def(
      "q4_fake_fp4", &q4_fake<Backend, Backend::q4_fake_fp4>, "input"_a, "out"_a, "group"_a,
      nb::kw_only(), "stream"_a = 0,
      "9-level 'FP4' fake quantisation per group, top-2 |x| kept exact (docs/algorithms.md §5.3).");
  m.def(
      "q4_pack", &q4_pack<Backend>, "w"_a, "codes"_a, "scale"_a, "zero"_a.none(),
      "outlier_idx"_a.none(), "outlier_val"_a.none(), "bad"_a, nb::kw_only(), "fmt"_a, "group"_a,
      "stream"_a = 0,
      "Round-to-nearest packing; adds the number of non-finite groups (left unwritten) to bad[0].");
  m.def("q4_unpack", &q4_unpack<Backend>, "codes"_a, "scale"_a, "zero"_a.none(),
        "outlier_idx"_a.none(), "outlier_val"_a.none(), "out"_a, nb::kw_only(), "fmt"_a, "group"_a,
        "stream"_a = 0, "Dequantise packed 4-bit codes into out.");
  m.def("q4_requant_sr", &q4_requant_sr<Backend>, "w"_a, "codes"_a, "scale"_a, "zero"_a.none(),
        "outlier_idx"_a.none(), "outlier_val"_a.none(), "bad"_a, nb::kw_only(), "fmt"_a, "group"_a,
        "seed"_a, "step"_a, "stream"_a = 0,
        "Stochastic-rounding re-quantisation of w into the packed buffers; non-finite groups "
        "keep their old data and are added to bad[0].");
}

}  // namespace spam::bind
