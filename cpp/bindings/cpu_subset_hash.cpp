// cpu_subset_hash.cpp — the sparse-momentum subset hash h(seed, i) (sparse_subset.h) of the CPU
// module _C, exposed so tests can hold it against the Python definition.
#include "../spam/sparse_subset.h"
#include "convert.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

void subset_hash(int64_t seed, const nb::ndarray<>& indices, const nb::ndarray<>& out) {
  constexpr int kCpu = nb::device::cpu::value;
  const int64_t n = static_cast<int64_t>(indices.size());
  const int64_t* idx = spam::bind::typed_buffer<int64_t>(indices, kCpu, n, "indices");
  int64_t* o = spam::bind::typed_buffer<int64_t>(out, kCpu, n, "out");
  for (int64_t k = 0; k < n; ++k)
    o[k] = static_cast<int64_t>(spam::subset_hash(static_cast<uint32_t>(seed), idx[k]));
}

}  // namespace

void bind_cpu_subset_hash(nb::module_& m) {
  m.def("subset_hash", &subset_hash, "seed"_a, "indices"_a, "out"_a,
        "h(seed, i) of the sparse-momentum subset (sparse_subset.h) for int64 indices into int64 "
        "out.");
}
