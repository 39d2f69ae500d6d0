// quant4_ops.h — host entry points of the 4-bit quantisers (CPU: quant4_cpu.cpp; the CUDA
// launchers in cuda_quant4_api.h take the same structs). Scalar rules: quant4.h.
//
// Every function works on whole groups of `group` consecutive elements of a flattened,
// contiguous tensor, runs OpenMP over groups, and writes only into the buffers it is given.
#pragma once

#include <cstdint>

#include "common.h"
#include "quant4.h"

namespace spam::q4 {

// Buffers of the packed form (struct Packed, quant4.h), `numel / group` groups:
//
//   codes        uint8  [numel/2]      two 4-bit codes per byte (nibble order: quant4.h)
//   scale        fp32   [groups]       int4: scale; fp4: step = alpha/4
//   zero         uint8  [groups]       int4 only (zero point, 0..15); nullptr for fp4
//   outlier_idx  int16  [groups, 2]    fp4 only: positions within the group of the two
//   outlier_val  fp32   [groups, 2]    elements kept exact, and their values
//
//   flattened weight:  | group 0 (G elems) | group 1 | ... |   (groups may straddle rows)
//   codes:             | G/2 bytes         | G/2     | ... |   byte j of a group = elems 2j, 2j+1

// Fake quantisation (quantise -> dequantise) of `in` into `out` (same numel and dtype;
// out may alias in). Groups: numel / group, plus one shorter tail group for activations.
void cpu_fake_weight_int4(const TensorRef& in, const TensorRef& out, int64_t group);
void cpu_fake_act_int4(const TensorRef& in, const TensorRef& out, int64_t group);
void cpu_fake_fp4(const TensorRef& in, const TensorRef& out, int64_t group);

// Round-to-nearest packing with the formats' own grids (so unpack(pack(w)) equals the fake
// quantiser bit for bit). Groups containing a non-finite value are left unwritten; their
// number is returned.
int64_t cpu_pack(const TensorRef& w, const Packed& p, Format fmt, int64_t group);

// Dequantise packed codes into `out` (any float dtype).
void cpu_unpack(const Packed& p, const TensorRef& out, Format fmt, int64_t group);

// Re-quantise the updated working copy `w` into `p` with stochastic rounding (target:
// sr_target), keeping each group's lattice where possible (quant4.h, "requant grid choice").
// Uniforms come from
// sr_key(seed, step). Groups with a non-finite value keep their old packed data and are
// counted in the return value.
int64_t cpu_requant_sr(const TensorRef& w, const Packed& p, Format fmt, int64_t group,
                       uint64_t seed, uint64_t step);

}  // namespace spam::q4
