// element_entry.h — the `step` overload of the element algorithms (cpp/spam/algorithms.h),
// generated from SPAM_ELEMENT_ALGORITHMS:
//
//   step(StepBatch, algorithm: str, hyper: dict[str, float], scalars: dict[str, list[float]],
//        skip_nonfinite: bool)
//
// `algorithm` is a descriptor's kName; `hyper` holds exactly its kHyperNames (doubles, made into
// its Hyper by make_hyper, 1 - beta included) and `scalars` exactly its kScalarNames, one value
// per tensor of the batch. A missing or unknown keyword, or a list of another length, is a
// ValueError naming it; nothing is launched then. element_algorithms() lists the names.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <array>
#include <string>
#include <vector>

#include "../spam/algorithms.h"
#include "convert.h"
#include "step_batch.h"

namespace spam::bind {

template <size_t N>
std::string join_names(const std::array<const char*, N>& names) {
  std::string out;
  for (const char* n : names) out += (out.empty() ? "" : ", ") + std::string(n);
  return out;
}

// The entries of `d` named `names`, in that order, converted to T; `d` must hold exactly them.
template <class T, size_t N>
std::array<T, N> named_entries(const nb::dict& d, const std::array<const char*, N>& names,
                               const char* algorithm, const char* what) {
  const std::string where = std::string("spam_lowmem: ") + algorithm + " " + what;
  const std::string expected = " (expects " + join_names(names) + ")";
  std::array<T, N> out{};
  for (size_t k = 0; k < N; ++k) {
    PyObject* item = PyDict_GetItemString(d.ptr(), names[k]);  // borrowed, or null
    if (item == nullptr)
      throw nb::value_error((where + ": missing '" + names[k] + "'" + expected).c_str());
    if (!nb::try_cast<T>(nb::handle(item), out[k]))
      throw nb::type_error((where + ": '" + names[k] + "' has the wrong type").c_str());
  }
  if (d.size() != N) {
    for (const auto& [key, value] : d) {
      bool known = false;
      for (const char* n : names) known = known || nb::str(n).equal(key);
      if (!known)
        throw nb::value_error(
            (where + ": unknown '" + nb::str(key).c_str() + "'" + expected).c_str());
    }
  }
  return out;
}

template <class Backend, class A>
void element_step_of(const StepBatch<Backend>& b, const nb::dict& hyper, const nb::dict& scalars,
                     bool skip_nonfinite) {
  constexpr size_t kScalars = A::kScalarNames.size();
  const auto values = named_entries<double>(hyper, A::kHyperNames, A::kName, "hyper");
  const auto lists =
      named_entries<std::vector<double>>(scalars, A::kScalarNames, A::kName, "scalars");
  for (size_t k = 0; k < kScalars; ++k)
    check_lengths(b.size(), lists[k].size(), A::kScalarNames[k]);
  const typename A::Hyper h = A::make_hyper(values, NonFinite{skip_nonfinite});
  std::vector<ElementTensor<A>> tensors;
  tensors.reserve(b.size());
  for (size_t i = 0; i < b.size(); ++i) {
    std::array<double, kScalars> row;
    for (size_t k = 0; k < kScalars; ++k) row[k] = lists[k][i];
    tensors.push_back(
        {b.b.p[i], b.b.g[i], b.b.m[i], b.b.v[i], A::make_scalars(row), b.b.q8[i], b.q4[i]});
  }
  nb::gil_scoped_release release;
  Backend::call(Backend::template element_step<A>, b.target.ctx, tensors, h, b.target.maps,
                b.target.counters);
}

template <class Backend>
void element_step(const StepBatch<Backend>& b, const std::string& algorithm, const nb::dict& hyper,
                  const nb::dict& scalars, bool skip_nonfinite) {
#define SPAM_ELEMENT_CASE(A) \
  if (algorithm == A::kName) return element_step_of<Backend, A>(b, hyper, scalars, skip_nonfinite);
  SPAM_ELEMENT_ALGORITHMS(SPAM_ELEMENT_CASE)
#undef SPAM_ELEMENT_CASE
  std::string known;
#define SPAM_ELEMENT_NAME(A) known += (known.empty() ? "" : ", ") + std::string(A::kName);
  SPAM_ELEMENT_ALGORITHMS(SPAM_ELEMENT_NAME)
#undef SPAM_ELEMENT_NAME
  throw nb::value_error(
      ("spam_lowmem: unknown element algorithm '" + algorithm + "' (known: " + known + ")")
          .c_str());
}

// {name: {"hyper": [...], "scalars": [...]}} of every element algorithm.
inline nb::dict element_algorithms() {
  nb::dict out;
  const auto names = [](const auto& list) {
    nb::list l;
    for (const char* n : list) l.append(nb::str(n));
    return l;
  };
#define SPAM_ELEMENT_ENTRY(A)              \
  {                                        \
    nb::dict d;                            \
    d["hyper"] = names(A::kHyperNames);    \
    d["scalars"] = names(A::kScalarNames); \
    out[A::kName] = d;                     \
  }
  SPAM_ELEMENT_ALGORITHMS(SPAM_ELEMENT_ENTRY)
#undef SPAM_ELEMENT_ENTRY
  return out;
}

template <class Backend>
void bind_element_steps(nb::module_& m) {
  using namespace nb::literals;
  m.def("step", &element_step<Backend>, "batch"_a, "algorithm"_a, "hyper"_a, "scalars"_a,
        "skip_nonfinite"_a,
        "Step of an element algorithm (element_algorithms()) over all tensors of one group, in "
        "place: `hyper` and `scalars` hold exactly the algorithm's keywords.");
  m.def("element_algorithms", &element_algorithms,
        "The element algorithms and the keywords of their hyper and per-tensor scalars.");
}

}  // namespace spam::bind
