// cuda_sparse_api.h — host-callable entry point of the CUDA sparse-momentum SPAM step
// (docs/algorithms.md §3; implemented in cuda/sparse_spam_step.cu). Plain C++, like cuda_api.h,
// whose launcher contract applies: device pointers only, work enqueued on the caller's stream,
// no host sync, no allocation, errors thrown as spam::Error.
#pragma once

#include <cstdint>
#include <vector>

#include "cuda_api.h"  // CudaContext
#include "math.h"
#include "step_tensors.h"  // Quant8Moments, QuantMaps

namespace spam {

// One tensor of a sparse group on the GPU. The same layout as SparseSpamTensor (compact
// moments in flat-index order, 8-bit blocks of 256 compact values), except that the subset
// rule stays in device memory: reading it on the host would cost a sync per step.
struct CudaSparseSpamTensor {
  TensorRef param, grad;          // full size (numel N), same dtype
  TensorRef exp_avg, exp_avg_sq;  // compact, parameter dtype (unused if q8 is active)
  int64_t compact;                // K = number of selected entries (host-known: the buffer size)
  const int64_t* block_starts;    // device int64 [ceil(K/256)]
  const int64_t* subset;          // device int64 [4]: seed, t_hash, t_index, numel
  float update_scale;             // lr * s * sqrt(bc2) / bc1
  Quant8Moments q8;               // K codes, ceil(K/256) absmax (device)
};

// Same semantics as cpu_sparse_spam_step on consistent state. The device-resident subset and
// block starts cannot be checked on the host without a sync; the kernel instead never reads or
// writes outside the buffers whatever they hold, and leaves a tensor whose subset was drawn for
// another element count untouched (the Python layer checks both when it installs or loads them).
void cuda_sparse_spam_step(const std::vector<CudaSparseSpamTensor>& tensors, const SpamHyper& hyper,
                           const QuantMaps& maps, int64_t* counters, const CudaContext& ctx);

}  // namespace spam
