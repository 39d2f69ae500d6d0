// stable_spam_step.cu — CUDA Stable-SPAM step (docs/algorithms.md §4.4), all tensors of a group,
// enqueued as five stream-ordered phases with no host sync in between:
//
//   1 reduce    (per chunk)   max|g|, sum g^2 (under "skip" finite entries only) -> partial[chunk]
//   2 adaclip   (per tensor)  combine the tensor's partials in a fixed tree, M EMA, threshold
//                             M_hat (stable_adaclip); flag whether the tensor clips
//   3 reduce    (per chunk)   sum of squares of the *clipped* g -> partial[chunk]; blocks of
//                             tensors that do not clip return at once
//   4 adagn     (per tensor)  ||g|| = sqrt(clipped or unclipped sum), mu/nu EMAs, target c
//   5 update    (per chunk)   fused clip / normalise / Adam / decay (stable_spam_element),
//                             dense or 8-bit moments (adam_update.cu, shared with AdamW)
//
// With a cross-shard reduction (StatsReduce, step_tensors.h; FSDP2 shards of one tensor),
// phases 2 and 4 are each split around a host callback that enqueues the caller's collectives
// on the same stream, so the host never waits for the device:
//   2a export  (per tensor)   combined local max|g|, sum g^2 -> reduced[tensor][0..1]
//      callback(1)            the caller replaces every row with the global values
//   2b adaclip (per tensor)   stable_adaclip from the global max; clips flag; global sum kept
//   4a export  (per tensor)   local clipped sum g^2 of a tensor that clips, else 0 -> reduced[.][1]
//      callback(2)            called on every such step: whether a tensor clips is decided on
//                             the device and never read by the host
//   4b adagn   (per tensor)   ||g|| from the global clipped sum (clipping tensors) or phase 2's
//                             global sum (the others)
// Phase 2 keeps this call's M in TensorState and phase 4 stores [M, mu, nu] into grad_stats,
// so a callback that throws leaves grad_stats, parameters and moments as they were (only
// scratch and the reduction buffer were written).
//
// This mirrors cpp/spam/isa/stable_spam_step.cpp step by step, with the same math.h functions.
// Non-finite gradient entries: under "skip" they are left out of every reduction; under
// "propagate" they enter as written, and a NaN anywhere makes max|g| NaN (torch's amax, as in
// spam_lowmem/reference). Squares are summed in double, so the result differs from the CPU
// only through summation order (below fp32 rounding of ||g||), and it is reproducible run to
// run because no reduction uses atomics.
//
// Scratch layout (caller-owned device bytes, 16-byte aligned):
//   [ TensorState x n_tensors ][ ChunkPartial x total_chunks ]
// where the chunks of tensor i start at chunk_base[i] = sum of ceil(numel/kChunk) over the
// tensors before it (call order, all dtypes). Phase 3 reuses the partials of phase 1: phase 2
// has already folded them into TensorState::sum_sq, and stream order separates the phases.
#include <cmath>

#include "../cpp/spam/dtype_dispatch.h"
#include "../cpp/spam/cuda_api.h"
#include "../cpp/spam/half.h"
#include "../cpp/spam/math.h"
#include "common.cuh"
#include "adam_update.cuh"
#include "multi_tensor.cuh"
#include "step8.cuh"  // check_maps

namespace spam::cuda {
namespace {

// TensorState (per tensor, in scratch) is declared in element_ops.cuh: phase 5 reads it.
struct alignas(16) ChunkPartial {
  double sum_sq;
  float max_abs;
  float pad;
};
static_assert(sizeof(ChunkPartial) == 16, "scratch layout");

int64_t chunks_of(int64_t numel) { return numel > 0 ? (numel + kChunk - 1) / kChunk : 0; }

// ---------------------------------------------------------------- phases 1 and 3: reduce
struct ReduceExtra {
  int64_t chunk_base;  // index of this tensor's first ChunkPartial
  int32_t tensor;      // index of this tensor's TensorState
};
using ReduceArgs = MultiTensorArgs<1, ReduceExtra>;  // ptr: 0 grad

// Call-wide arguments of the reduce and per-tensor kernels.
struct ScratchPtrs {
  TensorState* state;
  ChunkPartial* partials;
  double* reduced;         // StatsReduce::stats, [n_tensors][2]; null without a reduction
  int32_t skip_nonfinite;  // NonFinite::skip of this call
};

template <typename T, bool kClipped>
__global__ void __launch_bounds__(kBlockThreads)
    grad_reduce_kernel(const __grid_constant__ ReduceArgs args, const ScratchPtrs scratch) {
  const ChunkRange r = chunk_range(args);
  const ReduceExtra e = args.extra[r.slot];
  StableTensorScalars s{};
  if constexpr (kClipped) {
    if (!scratch.state[e.tensor].clips) return;  // same value for the whole block
    s = scratch.state[e.tensor].scalars;
  }
  const T* __restrict__ g = static_cast<const T*>(args.ptr[0][r.slot]);
  float max_abs = 0.0f;
  double sum_sq = 0.0;
  for (int64_t base = r.begin; base < r.end; base += int64_t{kBlockThreads} * kIlp) {
    float x[kIlp];
#pragma unroll
    for (int j = 0; j < kIlp; ++j) {
      const int64_t i = base + j * kBlockThreads + threadIdx.x;
      x[j] = i < r.end ? Storage<T>::load(g, i) : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < kIlp; ++j) {
      float xj = x[j];
      if (scratch.skip_nonfinite && !is_finite(xj)) continue;  // "skip": left out
      if constexpr (kClipped) xj = stable_clip(xj, s);
      max_abs = fmaxf(max_abs, fabsf(xj));  // drops a NaN; phase 2 restores it from the sum
      // The square of an fp32 value is exact in double, and a double sum keeps ||g|| within
      // fp32 rounding whatever the order (the CPU folds fp32 block sums into a double, which
      // is within the tests' tolerance of this). FP64 rate only matters on consumer GPUs,
      // and this pass reads one array out of the step's seven.
      sum_sq += static_cast<double>(xj) * static_cast<double>(xj);
    }
  }
  max_abs = block_reduce(max_abs, MaxOp{}, 0.0f);
  sum_sq = block_reduce(sum_sq, SumOp{}, 0.0);
  if (threadIdx.x == 0)
    scratch.partials[e.chunk_base + r.chunk] = ChunkPartial{sum_sq, max_abs, 0.0f};
}

// ------------------------------------------------------------ phases 2 and 4: per tensor
// One block per tensor. Kernel-argument layout (kStatSlots = 56 tensors per launch):
//   hyper[56]       StableStatHyper  40 B each: gammas, bias corrections, eps
//   stats[56]       float*           the tensor's grad_stats [M, mu, nu] on the device
//   chunk_base[56]  int64            first ChunkPartial of the tensor
//   n_chunks[56]    int32            its number of chunks
//   first_tensor    int32            TensorState index of block 0 (tensors are consecutive)
constexpr int kStatSlots = 56;
struct StatArgs {
  StableStatHyper hyper[kStatSlots];
  float* stats[kStatSlots];
  int64_t chunk_base[kStatSlots];
  int32_t n_chunks[kStatSlots];
  int32_t first_tensor;
};
static_assert(sizeof(StatArgs) + sizeof(ScratchPtrs) <= 4096, "kernel arguments exceed 4 KB");
static_assert(sizeof(ScratchPtrs) <= kSharedBudget, "kernel arguments exceed 4 KB");

// Combines one tensor's chunk partials: each thread folds a strided subset in order, then a
// fixed block tree; deterministic for a given tensor size.
__device__ __forceinline__ void combine_partials(const ChunkPartial* part, int32_t n,
                                                 float& max_abs, double& sum_sq) {
  float mx = 0.0f;
  double sum = 0.0;
  for (int32_t c = threadIdx.x; c < n; c += kBlockThreads) {
    mx = fmaxf(mx, part[c].max_abs);
    sum += part[c].sum_sq;
  }
  max_abs = block_reduce(mx, MaxOp{}, 0.0f);
  sum_sq = block_reduce(sum, SumOp{}, 0.0);
}

// One tensor's max|g| and sum g^2 over its chunk partials (valid in thread 0). Under
// "propagate" a NaN entry must make max|g| NaN, as torch's amax does. fmaxf dropped it, but it
// always reaches the sum of squares (squares are >= 0, so infinities alone cannot make the sum
// NaN), which makes the test exact and order-independent.
__device__ __forceinline__ void combine_raw(const StatArgs& args, const ScratchPtrs& scratch, int k,
                                            float& max_abs, double& sum_sq) {
  combine_partials(scratch.partials + args.chunk_base[k], args.n_chunks[k], max_abs, sum_sq);
  if (!scratch.skip_nonfinite && isnan(sum_sq)) max_abs = NAN;
}

// AdaClip (§4.4 step 3) of tensor k from its (local or global) max|g|, in thread 0. M goes to
// TensorState, not yet to grad_stats (phase 4 stores it).
__device__ __forceinline__ void adaclip_tensor(const StatArgs& args, const ScratchPtrs& scratch,
                                               int k, float max_abs, double sum_sq) {
  TensorState& st = scratch.state[args.first_tensor + k];
  const float* g = args.stats[k];
  float ema[GradStatsIndex::kCount] = {g[0], g[1], g[2]};
  StableTensorScalars s{};
  stable_adaclip(ema, max_abs, args.hyper[k], s);
  st.max_ema = ema[GradStatsIndex::kMaxEma];
  st.scalars = s;
  st.sum_sq = sum_sq;
  st.clips = stable_clips(s, max_abs) ? 1 : 0;
}

// AdaGN (§4.4 step 4) of tensor k from the sum of squares of its (clipped) gradient, in
// thread 0; stores this call's [M, mu, nu] into grad_stats.
__device__ __forceinline__ void adagn_tensor(const StatArgs& args, const ScratchPtrs& scratch,
                                             int k, double sum_sq) {
  TensorState& st = scratch.state[args.first_tensor + k];
  float* g = args.stats[k];
  float ema[GradStatsIndex::kCount] = {st.max_ema, g[1], g[2]};
  StableTensorScalars s = st.scalars;
  stable_adagn(ema, static_cast<float>(sqrt(sum_sq)), args.hyper[k], s);
  st.scalars = s;
  for (int j = 0; j < GradStatsIndex::kCount; ++j) g[j] = ema[j];
}

// Phase 2 without a reduction.
__global__ void __launch_bounds__(kBlockThreads)
    adaclip_kernel(const __grid_constant__ StatArgs args, const ScratchPtrs scratch) {
  const int k = blockIdx.x;
  float max_abs;
  double sum_sq;
  combine_raw(args, scratch, k, max_abs, sum_sq);
  if (threadIdx.x != 0) return;
  adaclip_tensor(args, scratch, k, max_abs, sum_sq);
}

// Phase 2a: the local values the caller reduces across shards (row = call-order index).
__global__ void __launch_bounds__(kBlockThreads)
    export_raw_kernel(const __grid_constant__ StatArgs args, const ScratchPtrs scratch) {
  const int k = blockIdx.x;
  float max_abs;
  double sum_sq;
  combine_raw(args, scratch, k, max_abs, sum_sq);
  if (threadIdx.x != 0) return;
  double* row = scratch.reduced + 2 * int64_t{args.first_tensor + k};
  row[0] = static_cast<double>(max_abs);  // a float in a double: read back exactly
  row[1] = sum_sq;
}

// Phase 2b: AdaClip from the global values, identical on every shard.
__global__ void __launch_bounds__(kBlockThreads)
    adaclip_reduced_kernel(const __grid_constant__ StatArgs args, const ScratchPtrs scratch) {
  if (threadIdx.x != 0) return;
  const int k = blockIdx.x;
  const double* row = scratch.reduced + 2 * int64_t{args.first_tensor + k};
  float max_abs = static_cast<float>(row[0]);
  const double sum_sq = row[1];
  // As for a local reduction (combine_raw); the sum carries a NaN reliably across shards
  // whatever the collective does with a NaN under max.
  if (!scratch.skip_nonfinite && isnan(sum_sq)) max_abs = NAN;
  adaclip_tensor(args, scratch, k, max_abs, sum_sq);
}

// Phase 4 without a reduction.
__global__ void __launch_bounds__(kBlockThreads)
    adagn_kernel(const __grid_constant__ StatArgs args, const ScratchPtrs scratch) {
  const int k = blockIdx.x;
  const TensorState& st = scratch.state[args.first_tensor + k];
  double sum_sq = st.sum_sq;
  if (st.clips) {  // same value for the whole block, so the barriers inside are safe
    float unused;
    combine_partials(scratch.partials + args.chunk_base[k], args.n_chunks[k], unused, sum_sq);
  }
  if (threadIdx.x != 0) return;
  adagn_tensor(args, scratch, k, sum_sq);
}

// Phase 4a: the local clipped sum of a tensor that clips, 0 for the others (their global sum
// from phase 2 stays in TensorState); column 0 keeps phase 2's global max.
__global__ void __launch_bounds__(kBlockThreads)
    export_clipped_kernel(const __grid_constant__ StatArgs args, const ScratchPtrs scratch) {
  const int k = blockIdx.x;
  const TensorState& st = scratch.state[args.first_tensor + k];
  double sum_sq = 0.0;
  if (st.clips) {  // uniform over the block
    float unused;
    combine_partials(scratch.partials + args.chunk_base[k], args.n_chunks[k], unused, sum_sq);
  }
  if (threadIdx.x != 0) return;
  scratch.reduced[2 * int64_t{args.first_tensor + k} + 1] = st.clips ? sum_sq : 0.0;
}

// Phase 4b: AdaGN from the global sums.
__global__ void __launch_bounds__(kBlockThreads)
    adagn_reduced_kernel(const __grid_constant__ StatArgs args, const ScratchPtrs scratch) {
  if (threadIdx.x != 0) return;
  const int k = blockIdx.x;
  const TensorState& st = scratch.state[args.first_tensor + k];
  const double sum_sq =
      st.clips ? scratch.reduced[2 * int64_t{args.first_tensor + k} + 1] : st.sum_sq;
  adagn_tensor(args, scratch, k, sum_sq);
}

// Phase 5, the fused update (dense or 8-bit moments), lives in adam_update.cu, shared with
// AdamW.

// ------------------------------------------------------------------------- launchers
struct Plan {
  std::vector<int64_t> chunk_base;  // per tensor, call order
  int64_t total_chunks = 0;
};

Plan make_plan(const std::vector<int64_t>& numels) {
  Plan plan;
  plan.chunk_base.reserve(numels.size());
  for (const int64_t n : numels) {
    plan.chunk_base.push_back(plan.total_chunks);
    plan.total_chunks += chunks_of(n);
  }
  return plan;
}

template <typename T, bool kClipped>
void launch_reduce(const std::vector<StableSpamTensor>& tensors, const std::vector<int>& order,
                   const Plan& plan, const ScratchPtrs& scratch, cudaStream_t stream) {
  multi_tensor_apply<ReduceArgs>(
      order, [&](int i) { return tensors[i].grad.numel; },
      [&](ReduceArgs& a, int slot, int i) {
        a.ptr[0][slot] = tensors[i].grad.data;
        a.extra[slot] = ReduceExtra{plan.chunk_base[i], static_cast<int32_t>(i)};
      },
      [&](const ReduceArgs& a, int blocks) {
        grad_reduce_kernel<T, kClipped><<<blocks, kBlockThreads, 0, stream>>>(a, scratch);
        check_launch();
      });
}

// Phases 2 and 4 cover every tensor of the call (zero-size ones too: their statistics
// still advance, as on the CPU), kStatSlots consecutive tensors per launch.
template <typename Kernel>
void launch_per_tensor(Kernel kernel, const std::vector<StableSpamTensor>& tensors,
                       const Plan& plan, const ScratchPtrs& scratch, cudaStream_t stream) {
  const int n = static_cast<int>(tensors.size());
  StatArgs args{};
  for (int first = 0; first < n; first += kStatSlots) {
    const int count = n - first < kStatSlots ? n - first : kStatSlots;
    args.first_tensor = first;
    for (int k = 0; k < count; ++k) {
      const StableSpamTensor& t = tensors[first + k];
      args.hyper[k] = t.stat;
      args.stats[k] = t.grad_stats;
      args.chunk_base[k] = plan.chunk_base[first + k];
      args.n_chunks[k] = static_cast<int32_t>(chunks_of(t.grad.numel));
    }
    kernel<<<count, kBlockThreads, 0, stream>>>(args, scratch);
    check_launch();
  }
}

// Runs the caller's reduction of `phase` between two launches. The callback enqueues work
// (torch collectives) on the current stream and returns; it may leave another device
// current, and the launches that follow must go to the step's device.
void call_reduce(const StatsReduce& reduce, int phase, int device) {
  reduce.reduce(phase);
  int current = device;
  SPAM_CUDA_CHECK(cudaGetDevice(&current));
  if (current != device) SPAM_CUDA_CHECK(cudaSetDevice(device));
}

template <typename Fn>
void for_each_dtype(const std::vector<std::vector<int>>& groups, Fn&& fn) {
  for (int d = 0; d < static_cast<int>(groups.size()); ++d) {
    if (groups[d].empty()) continue;
    dispatch_dtype(static_cast<DType>(d), [&](auto tag) { fn(tag, groups[d]); });
  }
}

}  // namespace
}  // namespace spam::cuda

namespace spam {

int64_t cuda_stable_spam_scratch_bytes(const std::vector<int64_t>& numels) {
  const cuda::Plan plan = cuda::make_plan(numels);
  return static_cast<int64_t>(numels.size()) * int64_t{sizeof(cuda::TensorState)} +
         plan.total_chunks * int64_t{sizeof(cuda::ChunkPartial)};
}

void cuda_stable_spam_step(const std::vector<StableSpamTensor>& tensors, const AdamHyper& hyper,
                           const QuantMaps& maps, int64_t* counters, void* scratch,
                           int64_t scratch_bytes, const StatsReduce& reduce,
                           const CudaContext& ctx) {
  using namespace spam::cuda;
  if (tensors.empty()) return;
  const int n = static_cast<int>(tensors.size());
  std::vector<int64_t> numels;
  numels.reserve(tensors.size());
  for (const auto& t : tensors) numels.push_back(t.param.numel);
  SPAM_CHECK(scratch_bytes >= cuda_stable_spam_scratch_bytes(numels),
             "scratch buffer is smaller than stable_spam_scratch_bytes(numels)");
  SPAM_CHECK(reinterpret_cast<uintptr_t>(scratch) % 16 == 0, "scratch must be 16-byte aligned");
  SPAM_CHECK(counters != nullptr, "counters must be a device buffer");
  // Checked before anything is enqueued: a failure after phase 2 would leave grad_stats
  // advanced with the parameters not stepped.
  for (const StableSpamTensor& t : tensors)
    if (t.q8.active()) check_maps(maps);
  const Plan plan = make_plan(numels);
  std::vector<AdamTensor> items;  // phase 5's view of the tensors; item i reads state[i]
  items.reserve(tensors.size());
  for (const StableSpamTensor& t : tensors)
    items.push_back({t.param, t.grad, t.exp_avg, t.exp_avg_sq, t.adam, t.q8, t.q4});

  DeviceGuard guard(ctx.device);
  const cudaStream_t stream = to_stream(ctx.stream);
  auto* state = static_cast<TensorState*>(scratch);
  const ScratchPtrs ptrs{state, reinterpret_cast<ChunkPartial*>(state + n), reduce.stats,
                         hyper.nonfinite.skip ? 1 : 0};
  const auto groups = group_by_dtype(n, [&](int i) { return tensors[i].param.dtype; });

  for_each_dtype(groups, [&](auto tag, const std::vector<int>& order) {  // phase 1
    launch_reduce<typename decltype(tag)::type, false>(tensors, order, plan, ptrs, stream);
  });
  if (!reduce.active()) {  // phase 2
    launch_per_tensor(adaclip_kernel, tensors, plan, ptrs, stream);
  } else {
    launch_per_tensor(export_raw_kernel, tensors, plan, ptrs, stream);  // 2a
    call_reduce(reduce, 1, ctx.device);
    launch_per_tensor(adaclip_reduced_kernel, tensors, plan, ptrs, stream);  // 2b
  }
  for_each_dtype(groups, [&](auto tag, const std::vector<int>& order) {  // phase 3
    launch_reduce<typename decltype(tag)::type, true>(tensors, order, plan, ptrs, stream);
  });
  if (!reduce.active()) {  // phase 4
    launch_per_tensor(adagn_kernel, tensors, plan, ptrs, stream);
  } else {
    launch_per_tensor(export_clipped_kernel, tensors, plan, ptrs, stream);  // 4a
    call_reduce(reduce, 2, ctx.device);
    launch_per_tensor(adagn_reduced_kernel, tensors, plan, ptrs, stream);  // 4b
  }
  launch_adam_update(items, hyper, state, maps, counters, stream);  // phase 5
}

}  // namespace spam
