// cpu_ops.h — host entry points of the CPU core. Each call covers every tensor of one
// parameter group (multi-tensor, like the CUDA launchers), runs OpenMP over fixed-size
// chunks, and writes only into the buffers it is given.
#pragma once

#include <vector>

#include "common.h"
#include "math.h"

namespace spam {

// Spike telemetry, accumulated into a caller-owned int64 buffer [clipped, nonfinite].
struct Counters { enum : int { kClipped = 0, kNonFinite = 1, kCount = 2 }; };

struct SpamTensor {
  TensorRef param, grad, exp_avg, exp_avg_sq;  // same numel and dtype
  float update_scale;                          // lr * s * sqrt(bc2) / bc1, per tensor
};

// One SPAM step (ALGORITHMS.md §2.4) over all tensors of a group.
void cpu_spam_step(const std::vector<SpamTensor>& tensors, const SpamHyper& hyper,
                   int64_t* counters);

struct StableSpamTensor {
  TensorRef param, grad, exp_avg, exp_avg_sq;
  float* grad_stats;  // 3 floats: [M, mu, nu], see GradStatsIndex
  StableStatHyper stat;
  StableAdamTensor adam;
};

// One Stable-SPAM step (ALGORITHMS.md §4.4) over all tensors of a group: per-tensor
// max|g| and ||g|| reductions, AdaClip, AdaGN, then the Adam update, all here.
void cpu_stable_spam_step(const std::vector<StableSpamTensor>& tensors,
                          const StableAdamHyper& hyper, int64_t* counters);

// Number of OpenMP threads the core will use, and the kernel build chosen for this CPU
// (for benchmarks and diagnostics).
const char* cpu_isa_name();
int cpu_num_threads();

}  // namespace spam
