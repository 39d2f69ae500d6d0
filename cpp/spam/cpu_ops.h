// cpu_ops.h — host entry points of the CPU core. Each call covers every tensor of one
// parameter group (multi-tensor, like the CUDA launchers), runs OpenMP over fixed-size
// chunks, and writes only into the buffers it is given.
#pragma once

#include <vector>

#include "common.h"
#include "math.h"
#include "quant4.h"
#include "quant8.h"
#include "sparse_subset.h"

namespace spam {

// Spike telemetry, accumulated into a caller-owned int64 buffer [clipped, nonfinite].
struct Counters { enum : int { kClipped = 0, kNonFinite = 1, kCount = 2 }; };

// 8-bit blockwise moments of one tensor (quant8.h): codes [numel] and one absmax per
// 256-element block. All null when the tensor keeps dense moments (exp_avg/exp_avg_sq).
struct Quant8Moments {
  uint8_t* m_codes = nullptr;
  float* m_absmax = nullptr;
  uint8_t* v_codes = nullptr;
  float* v_absmax = nullptr;
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

struct SpamTensor {
  TensorRef param, grad, exp_avg, exp_avg_sq;  // same numel and dtype (moments unused if q8)
  float update_scale;                          // lr * s * sqrt(bc2) / bc1, per tensor
  Quant8Moments q8;
  PackedParam q4;                              // active: param has no data (see PackedParam)
};

// One SPAM step (ALGORITHMS.md §2.4) over all tensors of a group.
void cpu_spam_step(const std::vector<SpamTensor>& tensors, const SpamHyper& hyper,
                   const QuantMaps& maps, int64_t* counters);

// A parameter of a sparse-momentum group (ALGORITHMS.md §3): moments exist only for the
// entries selected by `subset` (sparse_subset.h), stored compactly in index order.
struct SparseSpamTensor {
  TensorRef param, grad;          // full size (numel N), same dtype
  TensorRef exp_avg, exp_avg_sq;  // compact: `compact` values in the parameter dtype (unused if q8)
  int64_t compact;                // K = number of selected entries
  const int64_t* block_starts;    // [ceil(K/256)]: parameter index of the first selected entry
                                  // of each compact block of 256
  SubsetRule subset;
  float update_scale;             // lr * s * sqrt(bc2) / bc1
  Quant8Moments q8;               // over the compact array (K codes, ceil(K/256) absmax)
};

// One sparse SPAM step over all tensors of a group: OpenMP over compact blocks; each block
// walks parameter indices from its start, testing membership with the hash, and runs
// spam_element on the selected entries. Unselected entries are never written; nothing
// full-size is allocated. Throws if a tensor's block_starts / K disagree with its subset.
void cpu_sparse_spam_step(const std::vector<SparseSpamTensor>& tensors, const SpamHyper& hyper,
                          const QuantMaps& maps, int64_t* counters);

struct StableSpamTensor {
  TensorRef param, grad, exp_avg, exp_avg_sq;
  float* grad_stats;  // 3 floats: [M, mu, nu], see GradStatsIndex
  StableStatHyper stat;
  StableAdamTensor adam;
  Quant8Moments q8;
  PackedParam q4;
};

// One Stable-SPAM step (ALGORITHMS.md §4.4) over all tensors of a group: per-tensor
// max|g| and ||g|| reductions, AdaClip, AdaGN, then the Adam update, all here.
void cpu_stable_spam_step(const std::vector<StableSpamTensor>& tensors,
                          const StableAdamHyper& hyper, const QuantMaps& maps, int64_t* counters);

struct AdamTensor {
  TensorRef param, grad, exp_avg, exp_avg_sq;
  StableAdamTensor adam;
  Quant8Moments q8;
  PackedParam q4;
};

// Plain AdamW with torch.optim.AdamW's conventions (decay first, eps after bias correction):
// the Stable-SPAM element with clipping and normalisation off.
void cpu_adamw_step(const std::vector<AdamTensor>& tensors, const StableAdamHyper& hyper,
                    const QuantMaps& maps, int64_t* counters);

// Blockwise quantisation of whole tensors (functional.quantize_blockwise and friends).
void cpu_quantize_blockwise(const TensorRef& x, uint8_t* codes, float* absmax, const QuantMap& map);
void cpu_dequantize_blockwise(const uint8_t* codes, const float* absmax, const TensorRef& out,
                              const QuantMap& map);

// Number of OpenMP threads the core will use, and the kernel build chosen for this CPU
// (for benchmarks and diagnostics).
const char* cpu_isa_name();
int cpu_num_threads();

}  // namespace spam
