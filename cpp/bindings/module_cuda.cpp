// module_cuda.cpp — NB_MODULE(_C_cuda): the private CUDA module. Compiled by the host
// compiler and including no CUDA header, so it imports on a machine without a GPU (the
// runtime is linked statically); each cuda_*.cpp binding file registers one family.
#include <nanobind/nanobind.h>

namespace nb = nanobind;

void bind_cuda_optim(nb::module_& m);
void bind_cuda_quant4(nb::module_& m);

NB_MODULE(_C_cuda, m) {
  m.doc() = "spam_lowmem CUDA core (private; use spam_lowmem.functional / spam_lowmem.optim)";
  bind_cuda_optim(m);
  bind_cuda_quant4(m);
  void bind_cuda_sparse(nb::module_&); bind_cuda_sparse(m);  // cuda_sparse.cpp
}
