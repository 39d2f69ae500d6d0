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
// moments in flat-index order, 8-bit blocks of 256 compact values; possibly a shard of its
// parameter, whose element i is global index offset + i), except that the subset rule stays in
// device memory: reading it on the host would cost a sync per step.
struct CudaSparseSpamTensor {
  TensorRef param, grad;          // local (numel N, the whole parameter unless sharded), same dtype
  TensorRef exp_avg, exp_avg_sq;  // compact, parameter dtype (unused if q8 is active)
  int64_t compact;                // K = number of selected entries (host-known: the buffer size)
  const int64_t* block_starts;    // device int64 [ceil(K/256)], local indices
  const int64_t* subset;          // device int64 [4]: seed, t_hash, t_index, global numel
  int64_t offset;                 // global flat index of param's element 0 (host, checked >= 0)
  float update_scale;             // lr * s * sqrt(bc2) / bc1
  Quant8Moments q8;               // K codes, ceil(K/256) absmax (device)
};

// Same semantics as cpu_sparse_spam_step on consistent state. The device-resident subset and
// block starts cannot be checked on the host without a sync; the kernel instead never reads or
// writes outside the buffers whatever they hold, and leaves a tensor untouched whose subset
// cannot be its parameter's (the tensor's global range [offset, offset + N) is not inside
// [0, numel), numel >= 2^32, or fields out of range; the Python layer checks all of it when it
// installs or loads them).
void cuda_sparse_spam_step(const std::vector<CudaSparseSpamTensor>& tensors, const SpamHyper& hyper,
                           const QuantMaps& maps, int64_t* counters, const CudaContext& ctx);

}  // namespace spam
