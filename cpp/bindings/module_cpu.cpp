// module_cpu.cpp — NB_MODULE(_C): the private CPU module. Each cpu_*.cpp binding file
// registers one family of functions; no arithmetic lives in cpp/bindings.
#include <nanobind/nanobind.h>

namespace nb = nanobind;

void bind_cpu_optim(nb::module_& m);
void bind_cpu_quant4(nb::module_& m);
void bind_cpu_sparse(nb::module_& m);

NB_MODULE(_C, m) {
  m.doc() = "spam_lowmem CPU core (private; use spam_lowmem.functional / spam_lowmem.optim)";
  bind_cpu_optim(m);
  bind_cpu_quant4(m);
  bind_cpu_sparse(m);
}
