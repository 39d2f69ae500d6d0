// cpu_ops.h — host entry points of the CPU core. Each call covers every tensor of one
// parameter group (multi-tensor, like the CUDA launchers), runs OpenMP over fixed-size
// chunks, and writes only into the buffers it is given.
#pragma once

#include <vector>

#include "common.h"
#include "math.h"
#include "quant8.h"
#include "sparse_subset.h"
#include "step_tensors.h"  // SpamTensor, StableSpamTensor, ElementTensor, QuantMaps, Counters

namespace spam {

// One SPAM step (docs/algorithms.md §2.4) over all tensors of a group.
void cpu_spam_step(const std::vector<SpamTensor>& tensors, const SpamHyper& hyper,
                   const QuantMaps& maps, int64_t* counters);

// A parameter of a sparse-momentum group (docs/algorithms.md §3): moments exist only for the
// entries selected by `subset` (sparse_subset.h), stored compactly in index order. The tensor
// may be a shard of the parameter: its element i is the global flat index offset + i
// (§13.3); compact moments and block starts are local. CPU only: the CUDA step keeps the rule
// on the device (CudaSparseSpamTensor, cuda_sparse_api.h).
struct SparseSpamTensor {
  TensorRef param, grad;          // local (numel N, the whole parameter unless sharded), same dtype
  TensorRef exp_avg, exp_avg_sq;  // compact: `compact` values in the parameter dtype (unused if q8)
  int64_t compact;                // K = number of selected entries
  const int64_t* block_starts;    // [ceil(K/256)]: local index of the first selected entry
                                  // of each compact block of 256
  SubsetRule subset;              // the rule of the whole (global) parameter
  int64_t offset;                 // global flat index of param's element 0 (a shard; else 0)
  float update_scale;             // lr * s * sqrt(bc2) / bc1
  Quant8Moments q8;               // over the compact array (K codes, ceil(K/256) absmax)
};

// One sparse SPAM step over all tensors of a group: OpenMP over compact blocks; each block
// walks parameter indices from its start, testing membership with the hash, and runs
// spam_element on the selected entries. Unselected entries are never written; nothing
// full-size is allocated. Throws if a tensor's block_starts / K disagree with its subset.
void cpu_sparse_spam_step(const std::vector<SparseSpamTensor>& tensors, const SpamHyper& hyper,
                          const QuantMaps& maps, int64_t* counters);

// One Stable-SPAM step (docs/algorithms.md §4.4) over all tensors of a group: per-tensor
// max|g| and ||g|| reductions, AdaClip, AdaGN, then the Adam update, all here. With `reduce`
// active the statistics are reduced across shards by the caller between the passes
// (StatsReduce, step_tensors.h); grad_stats are written only after its last call returned.
void cpu_stable_spam_step(const std::vector<StableSpamTensor>& tensors, const AdamHyper& hyper,
                          const QuantMaps& maps, int64_t* counters, const StatsReduce& reduce);

// One step of element algorithm A (algorithms.h: AdamW, ...) over all tensors of a group: A's
// element function on every entry, dense or 8-bit moments or packed 4-bit weights. Defined
// for every entry of SPAM_ELEMENT_ALGORITHMS (cpu_dispatch.cpp).
template <class A>
void cpu_element_step(const std::vector<ElementTensor<A>>& tensors, const typename A::Hyper& hyper,
                      const QuantMaps& maps, int64_t* counters);

// Blockwise quantisation of whole tensors (functional.quantize_blockwise and friends): codes
// [numel], absmax [rows.total(numel)], blocks laid out by `rows` (quant8.h).
void cpu_quantize_blockwise(const TensorRef& x, uint8_t* codes, float* absmax,
                            const BlockRows& rows, const QuantMap& map);
void cpu_dequantize_blockwise(const uint8_t* codes, const float* absmax, const BlockRows& rows,
                              const TensorRef& out, const QuantMap& map);

// Number of OpenMP threads the core will use, and the kernel build chosen for this CPU
// (for benchmarks and diagnostics).
const char* cpu_isa_name();
int cpu_num_threads();

}  // namespace spam
