// cuda_quant4_api.h — host-callable launchers of the CUDA 4-bit quantisers (cuda/quant4.cu).
//
// Plain C++: included by the nanobind module (host compiler) and by the .cu file. Semantics,
// formats and buffers are those of the CPU entry points in quant4_ops.h, bit for bit (same
// scalar rules from quant4.h, same RNG, no FMA contraction). Contract of every launcher:
//   - all pointers are device pointers on `device`; nothing is allocated;
//   - `device` is made current for the call and restored afterwards;
//   - the work is enqueued on `stream` (a cudaStream_t as an integer) and nothing waits for
//     it; `bad` (device int64[1]) receives the number of non-finite groups by atomic adds;
//   - errors throw spam::Error.
#pragma once

#include <cstdint>

#include "common.h"
#include "quant4_ops.h"

namespace spam::q4 {

void launch_fake_weight_int4(const TensorRef& in, const TensorRef& out, int64_t group, int device,
                             uintptr_t stream);
void launch_fake_act_int4(const TensorRef& in, const TensorRef& out, int64_t group, int device,
                          uintptr_t stream);
void launch_fake_fp4(const TensorRef& in, const TensorRef& out, int64_t group, int device,
                     uintptr_t stream);

void launch_pack(const TensorRef& w, const Packed& p, Format fmt, int64_t group, int64_t* bad,
                 int device, uintptr_t stream);
void launch_unpack(const Packed& p, const TensorRef& out, Format fmt, int64_t group, int device,
                   uintptr_t stream);
void launch_requant_sr(const TensorRef& w, const Packed& p, Format fmt, int64_t group,
                       uint64_t seed, uint64_t step, int64_t* bad, int device, uintptr_t stream);

}  // namespace spam::q4
