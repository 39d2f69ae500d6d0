// cuda_api.h — host-callable entry points of the CUDA core (implemented in cuda/*.cu).
//
// Plain C++ only: this header is included by the nanobind module (host compiler) and by
// the .cu files (nvcc), so it names no CUDA, nanobind or torch type. The stream travels as
// an integer (torch's `Stream.cuda_stream`) and is cast to cudaStream_t inside cuda/.
//
// Contract shared by every launcher (docs/design.md §3):
//   - all pointers are device pointers on `device`; the core never allocates tensor memory;
//   - the launcher makes `device` current and restores the previous device afterwards;
//   - work is enqueued on `stream` and nothing waits for it: no host sync, no host<->device
//     copy; per-call data travels as kernel arguments;
//   - errors (invalid arguments, failed launches) throw spam::Error.
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"
#include "math.h"
#include "quant8.h"
#include "step_tensors.h"  // SpamTensor, StableSpamTensor, ElementTensor, QuantMaps, Counters

namespace spam {

struct CudaContext {
  int device = 0;        // CUDA device ordinal of every tensor of the call
  uintptr_t stream = 0;  // cudaStream_t as an integer; 0 is the legacy default stream
};

// Moments: every tensor has dense moments (exp_avg/exp_avg_sq) or 8-bit blockwise moments
// (q8 active: device codes and absmax, quant8.h); both kinds may be mixed in one call. `maps`
// holds device pointers to the m (signed) and v (unsigned) code maps and is read only when
// some tensor has 8-bit moments. Results equal the CPU core's (same math.h / quant8.h code).

// One SPAM step (docs/algorithms.md §2.4) over all tensors; same semantics as cpu_spam_step.
// `counters` is an int64 device buffer [clipped, nonfinite] that the kernels add into.
void cuda_spam_step(const std::vector<SpamTensor>& tensors, const SpamHyper& hyper,
                    const QuantMaps& maps, int64_t* counters, const CudaContext& ctx);

// Bytes of device scratch that cuda_stable_spam_step needs for tensors of these sizes
// (per-tensor scalars plus one partial per 64Ki-element chunk). Pure host arithmetic.
int64_t cuda_stable_spam_scratch_bytes(const std::vector<int64_t>& numels);

// One Stable-SPAM step (docs/algorithms.md §4.4) over all tensors; same semantics as
// cpu_stable_spam_step. grad_stats pointers are device float[3]; `scratch` is a device
// buffer of at least cuda_stable_spam_scratch_bytes(numels) bytes, 16-byte aligned, that
// must not be used by anything else until the step's kernels have run (stream order).
// `reduce` (StatsReduce, step_tensors.h): inactive, or a device float64 [n][2] buffer and the
// host callback that reduces it across shards, called twice (phases 1 and 2) between
// launches on `ctx.stream`; it must enqueue its work on that stream.
void cuda_stable_spam_step(const std::vector<StableSpamTensor>& tensors, const AdamHyper& hyper,
                           const QuantMaps& maps, int64_t* counters, void* scratch,
                           int64_t scratch_bytes, const StatsReduce& reduce,
                           const CudaContext& ctx);

// One step of element algorithm A (algorithms.h: AdamW, ...); same semantics as
// cpu_element_step<A>: no reductions, no scratch. Defined for every entry of
// SPAM_ELEMENT_ALGORITHMS (cuda/element_step.cu).
template <class A>
void cuda_element_step(const std::vector<ElementTensor<A>>& tensors, const typename A::Hyper& hyper,
                       const QuantMaps& maps, int64_t* counters, const CudaContext& ctx);

// Blockwise 8-bit quantisation of a whole device tensor (cpu_quantize_blockwise): codes
// [x.numel], absmax [rows.total(numel)], blocks laid out by `rows` (quant8.h). Only map.buckets
// is read.
void cuda_quantize_blockwise(const TensorRef& x, uint8_t* codes, float* absmax,
                             const BlockRows& rows, const QuantMap& map, const CudaContext& ctx);

// Inverse of cuda_quantize_blockwise into `out` (any float dtype). Only map.values is read.
void cuda_dequantize_blockwise(const uint8_t* codes, const float* absmax, const BlockRows& rows,
                               const TensorRef& out, const QuantMap& map, const CudaContext& ctx);

}  // namespace spam
