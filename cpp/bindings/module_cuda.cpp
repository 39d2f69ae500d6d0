// module_cuda.cpp — NB_MODULE(_C_cuda): the private CUDA module, step_entry.h and
// quant4_entry.h instantiated with CudaBackend (any cuda_*.cpp binding file is linked in too).
// Compiled by the host compiler and including no CUDA header, so it imports on a machine
// without a GPU (the runtime is linked statically). It has its own nanobind domain
// (CMakeLists.txt): its classes (StepBatch, SpamHyper, ...) are distinct from _C's.
#include <nanobind/nanobind.h>

#include "cuda_backend.h"
#include "quant4_entry.h"
#include "step_entry.h"

NB_MODULE(_C_cuda, m) {
  m.doc() = "spam_lowmem CUDA core (private; use spam_lowmem.functional / spam_lowmem.optim)";
  spam::bind::bind_steps<spam::bind::CudaBackend>(m);
  spam::bind::bind_quant4<spam::bind::CudaBackend>(m);
}
