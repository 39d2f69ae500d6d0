// module_cpu.cpp — NB_MODULE(_C): the private CPU module. The steps, 8-bit and 4-bit quantisers
// are step_entry.h and quant4_entry.h instantiated with CpuBackend; each cpu_*.cpp binding
// file registers one more CPU-only family. No arithmetic lives in cpp/bindings.
#include <nanobind/nanobind.h>

#include "cpu_backend.h"
#include "quant4_entry.h"
#include "step_entry.h"

namespace nb = nanobind;

void bind_cpu_subset_hash(nb::module_& m);

NB_MODULE(_C, m) {
  m.doc() = "spam_lowmem CPU core (private; use spam_lowmem.functional / spam_lowmem.optim)";
  spam::bind::bind_steps<spam::bind::CpuBackend>(m);
  spam::bind::bind_quant4<spam::bind::CpuBackend>(m);
  bind_cpu_subset_hash(m);
}
