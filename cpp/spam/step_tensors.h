// step_tensors.h — what an optimizer step is handed, per tensor and per call, by both cores:
// the structs that cpu_ops.h (CPU entry points) and cuda_api.h (CUDA launchers) take, and the
// layout of the telemetry buffer their kernels add into. Plain C++, no CPU or CUDA code, so
// either core includes it without the other's headers.
#pragma once

#include <functional>

#include "common.h"
#include "math.h"
#include "quant4.h"
#include "quant8.h"

namespace spam {

// Spike telemetry, accumulated into a caller-owned int64 buffer [clipped, nonfinite].
struct Counters {
  enum : int { kClipped = 0, kNonFinite = 1, kCount = 2 };
};

// 8-bit blockwise moments of one tensor (quant8.h): codes [numel] and one absmax per block,
// the blocks laid out by `rows` (restarting at each row of a dense moment of a matrix; flat for
// 1-D tensors and sparse compact arrays). Pointers null when the tensor keeps dense moments
// (exp_avg/exp_avg_sq).
struct Quant8Moments {
  uint8_t* m_codes = nullptr;
  float* m_absmax = nullptr;
  uint8_t* v_codes = nullptr;
  float* v_absmax = nullptr;
  BlockRows rows;
  bool active() const { return m_codes != nullptr; }
};

// A parameter kept as packed 4-bit codes (quant4_ops.h) instead of a dense buffer; `param`
// then carries only numel and the working dtype T (its data pointer is null). The step runs
// the optimizer's element function on the dequantised group, rounded to T exactly as a
// materialised working copy would hold it, and re-quantises the group with stochastic rounding
// (sr_target / requant grid of quant4.h, uniforms of sr_key(seed, step)) in the same pass:
// the result equals unpack -> dense step -> requantize_ bit for bit. Moments stay dense in T.
// A group whose updated values are not all finite keeps its old packed data (its moments are
// still updated, as in the unfused path) and is counted in *bad_groups.
struct PackedParam {
  q4::Packed buf;
  q4::Format fmt = q4::Format::kInt4;
  int64_t group = 0;  // elements per quantisation group; 0: not packed
  uint64_t key = 0;   // q4::sr_key(seed, step)
  int64_t* bad_groups = nullptr;
  bool active() const { return group > 0; }
};

// Signed map for m, unsigned map for v; only read for tensors with 8-bit moments.
struct QuantMaps {
  QuantMap m, v;
};

// One tensor of a SPAM step (cpu_spam_step, cuda_spam_step).
struct SpamTensor {
  TensorRef param, grad, exp_avg, exp_avg_sq;  // same numel and dtype (moments unused if q8)
  float update_scale;                          // lr * s * sqrt(bc2) / bc1, per tensor
  Quant8Moments q8;
  PackedParam q4;  // active: param has no data (see PackedParam)
};

// One tensor of a Stable-SPAM step (cpu_stable_spam_step, cuda_stable_spam_step).
struct StableSpamTensor {
  TensorRef param, grad, exp_avg, exp_avg_sq;
  float* grad_stats;  // 3 floats: [M, mu, nu], see GradStatsIndex
  StableStatHyper stat;
  AdamBiasCorrection adam;
  Quant8Moments q8;
  PackedParam q4;
};

// The cross-shard reduction of a Stable-SPAM step's per-tensor statistics (docs/algorithms.md
// §4.4 steps 3-4 over a sharded tensor, e.g. FSDP2): the caller owns both the buffer and the
// communication. `stats` is a float64 [n_tensors][2] buffer on the step's device (host memory
// for the CPU core, device memory for the CUDA core): column 0 max|g|, column 1 sum g^2. The
// core writes the local values of phase `phase` there, calls `reduce(phase)` (which replaces
// every row with the global values: max over shards, sum over shards) and reads them back:
//   phase 1  after the reduction of the raw gradient: the local max and sum of every tensor;
//   phase 2  after the reduction of the clipped gradient: column 1 holds the local clipped sum
//            of every tensor that clips and 0 for the others (column 0 still holds the phase-1
//            global max, unread afterwards). Called on every step that has phase 1, whether or
//            not a tensor clips, so no rank ever needs to know whether another one clips, and
//            the CUDA core needs no host read of its device-side decision.
// The core calls `reduce` outside any parallel region, with no other work of the step pending
// on the host; on CUDA the local values are enqueued on the step's stream before the call, and
// the values read back after it are read by kernels enqueued after it on that stream (the
// callback enqueues its collectives there). An exception thrown by `reduce` propagates out of
// the step before any parameter, moment or grad_stats is written. Inactive (null `stats`): the
// single-shard step, unchanged.
struct StatsReduce {
  double* stats = nullptr;
  std::function<void(int phase)> reduce;
  bool active() const { return stats != nullptr; }
};

// One tensor of an element algorithm's step (algorithms.h; cpu_element_step, cuda_element_step):
// the algorithm's per-tensor scalars.
template <class Algorithm>
struct ElementTensor {
  TensorRef param, grad, exp_avg, exp_avg_sq;
  typename Algorithm::TensorScalars scalars;
  Quant8Moments q8;
  PackedParam q4;
};

// One tensor of the CUDA Stable-SPAM step's fused update (its phase 5, cuda/adam_update.cuh).
struct AdamTensor {
  TensorRef param, grad, exp_avg, exp_avg_sq;
  AdamBiasCorrection adam;
  Quant8Moments q8;
  PackedParam q4;
};

}  // namespace spam
