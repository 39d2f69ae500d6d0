// isa/stable_spam_step.cpp — CPU Stable-SPAM step (§4.4), all tensors of a group:
//   pass 1  per-chunk max|g| and sum g^2 (finite entries), combined per tensor in chunk order
//           so the result does not depend on the thread count;
//   scalar  AdaClip: M <- g3 M + (1-g3) max|g|, threshold M_hat (math.h);
//   pass 2  only for tensors that clip: sum of squares of the clipped gradient;
//   scalar  AdaGN: mu, nu EMAs and the target norm c;
//   pass 3  the fused element update (clip, normalise, Adam, decay; dense or 8-bit moments).
// With a cross-shard reduction (StatsReduce, step_tensors.h) the caller's callback turns the
// local per-tensor values into global ones after pass 1 (phase 1) and after pass 2 (phase 2,
// on every such step), so every shard of a tensor takes the same AdaClip and AdaGN decisions.
// The statistics EMAs are computed into a copy and stored in grad_stats only after the last
// callback returned: a callback that throws leaves every buffer of the step as it was.
// (Plain AdamW, the same element with clipping and normalisation off, is an element algorithm:
// algorithms.h, isa/element_step.cpp.)
#include <algorithm>
#include <array>
#include <cmath>

#include "../cpu_chunks.h"
#include "../cpu_isa.h"
#include "../half.h"
#include "../math.h"
#include "moment_loops.h"

namespace spam {
namespace SPAM_CPU_ISA {
namespace {

// The identity scalars (no clip, no normalisation, math.h no_clip()): pass 1 reduces the raw
// gradient with them.
constexpr StableTensorScalars kNoClip{INFINITY, 1.0f, 0.0f, 0.0f};

struct Partial {
  float max_abs = 0.0f;
  double sum_sq = 0.0;
};

// Sum of squares of [b, e) in double: the fallback of reduce_chunk for blocks whose fp32 sum
// left the range where it is accurate. The square of a float is exact in double.
template <typename T>
double sum_sq_double(const T* __restrict g, int64_t b, int64_t e, const StableTensorScalars& c,
                     bool keep_nonfinite) {
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = b; i < e; ++i) {
    float x = Storage<T>::load(g, i);
    x = (is_finite(x) | keep_nonfinite) ? stable_clip(x, c) : 0.0f;
    sum += static_cast<double>(x) * static_cast<double>(x);
  }
  return sum;
}

// Max |g| and sum g^2 over [begin, end) of the (optionally clipped) gradient, leaving out
// non-finite entries under the "skip" policy. `omp simd` reductions vectorise without
// -ffast-math; fp32 partial sums are folded into a double every kBlock elements, which bounds
// their rounding error, and the fixed block order keeps the result independent of the thread
// count. A block whose fp32 sum overflowed (a finite |g| >= 1.8e19 squares to inf: the norm
// became inf, AdaGN's target inf / inf and the whole tensor NaN) or may have underflowed
// (|g| < 1e-22 squares below the fp32 range) is summed again in double, as the reference and
// the CUDA kernel sum every square; other blocks keep the fast fp32 sum.
template <typename T>
Partial reduce_chunk(const TensorRef& grad, int64_t begin, int64_t end,
                     const StableTensorScalars& clip, bool skip_nonfinite) {
  constexpr int64_t kBlock = 1024;
  constexpr float kAccurateLow = 1e-30f;  // a sum below this may have lost underflowed squares
  const T* __restrict g = static_cast<const T*>(grad.data);
  // Local copies: read through `clip` (a reference), the scalars were reloaded and branched
  // on every element, and GCC ran this loop scalar.
  const StableTensorScalars c = clip;
  const bool keep_nonfinite = !skip_nonfinite;
  float max_abs = 0.0f;
  double sum_sq = 0.0;
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t e = b + kBlock < end ? b + kBlock : end;
    float block_sq = 0.0f, block_max = 0.0f;
#pragma omp simd reduction(+ : block_sq) reduction(max : block_max)
    for (int64_t i = b; i < e; ++i) {
      float x = Storage<T>::load(g, i);
      x = (is_finite(x) | keep_nonfinite) ? stable_clip(x, c) : 0.0f;
      block_sq += x * x;
      block_max = block_max > fabsf(x) ? block_max : fabsf(x);
    }
    const bool overflowed = !(block_sq <= kFloatMax);  // inf, or NaN under "propagate"
    const bool underflowed = block_sq < kAccurateLow && block_max > 0.0f;
    sum_sq += (overflowed | underflowed) ? sum_sq_double(g, b, e, c, keep_nonfinite)
                                         : static_cast<double>(block_sq);
    max_abs = max_abs > block_max ? max_abs : block_max;
  }
  // Under "propagate" a NaN entry must poison max|g| as it does in torch; the simd max
  // reduction may drop it, but it always reaches the sum of squares.
  if (!skip_nonfinite && std::isnan(sum_sq)) max_abs = NAN;
  return Partial{max_abs, sum_sq};
}

// Runs reduce_chunk over the chunks whose tensor is selected and combines per tensor.
void reduce_tensors(const std::vector<StableSpamTensor>& tensors, const ChunkPlan& plan,
                    const std::vector<StableTensorScalars>* clip, const std::vector<char>& selected,
                    bool skip_nonfinite, std::vector<Partial>& per_tensor) {
  const std::vector<Chunk>& chunks = plan.chunks;
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  std::vector<Partial> partials(chunks.size());
#pragma omp parallel for schedule(static) if (plan.parallel)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const Chunk& ch = chunks[c];
    if (!selected[ch.tensor]) continue;
    const StableSpamTensor& t = tensors[ch.tensor];
    const StableTensorScalars& s = clip ? (*clip)[ch.tensor] : kNoClip;
    partials[c] = dispatch_dtype(t.grad.dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      return reduce_chunk<T>(t.grad, ch.begin, ch.end, s, skip_nonfinite);
    });
  }
  per_tensor.assign(tensors.size(), Partial{});
  for (int64_t c = 0; c < n_chunks; ++c) {
    Partial& acc = per_tensor[chunks[c].tensor];
    // NaN-propagating max (std::max would drop a NaN partial under "propagate").
    const float part = partials[c].max_abs;
    acc.max_abs = (std::isnan(part) || part > acc.max_abs) ? part : acc.max_abs;
    acc.sum_sq += partials[c].sum_sq;
  }
}

// This call's [M, mu, nu] of one tensor (GradStatsIndex), a copy of its grad_stats.
using StatCopy = std::array<float, GradStatsIndex::kCount>;

// Phase 1 of a cross-shard reduction (docs/algorithms.md §4.4 step 3 over all shards): hands
// the caller every tensor's local max|g| and sum g^2 (pass 1, already combined in chunk order)
// and takes back the global values. The max travels as a double and returns to float exactly.
void reduce_raw_stats(const StatsReduce& r, bool skip_nonfinite, std::vector<Partial>& stats) {
  const size_t n = stats.size();
  for (size_t i = 0; i < n; ++i) {
    r.stats[2 * i] = static_cast<double>(stats[i].max_abs);
    r.stats[2 * i + 1] = stats[i].sum_sq;
  }
  r.reduce(1);
  for (size_t i = 0; i < n; ++i) {
    stats[i].max_abs = static_cast<float>(r.stats[2 * i]);
    stats[i].sum_sq = r.stats[2 * i + 1];
    // As for a local reduction: under "propagate" a NaN anywhere in the tensor makes max|g|
    // NaN. The sum carries it reliably across shards whatever the collective does with a NaN
    // under max.
    if (!skip_nonfinite && std::isnan(stats[i].sum_sq)) stats[i].max_abs = NAN;
  }
}

// Phase 2 (§4.4 step 4 over all shards): the local sums of squares of the clipped gradient
// of the tensors that clip, 0 for the others (whose phase-1 global sums stay in `stats`), and
// back the global ones. Called on every step with a reduction, even when no tensor clips
// (`clipped` is then empty and never read).
void reduce_clipped_sums(const StatsReduce& r, const std::vector<char>& clips,
                         const std::vector<Partial>& clipped, std::vector<Partial>& stats) {
  const size_t n = stats.size();
  for (size_t i = 0; i < n; ++i) r.stats[2 * i + 1] = clips[i] ? clipped[i].sum_sq : 0.0;
  r.reduce(2);
  for (size_t i = 0; i < n; ++i)
    if (clips[i]) stats[i].sum_sq = r.stats[2 * i + 1];
}

}  // namespace

void cpu_stable_spam_step(const std::vector<StableSpamTensor>& tensors, const AdamHyper& hyper,
                          const QuantMaps& maps, int64_t* counters, const StatsReduce& reduce) {
  const size_t n = tensors.size();
  std::vector<int64_t> numels;
  numels.reserve(n);
  for (const auto& t : tensors) numels.push_back(t.param.numel);
  const ChunkPlan plan = make_chunks(numels);

  // Pass 1 (§4.4 step 3: max|g|; step 4: ||g|| of a tensor that will not clip). The callbacks
  // run here, on the calling thread, between the OpenMP regions.
  std::vector<Partial> stats;
  reduce_tensors(tensors, plan, nullptr, std::vector<char>(n, 1), hyper.nonfinite.skip, stats);
  if (reduce.active()) reduce_raw_stats(reduce, hyper.nonfinite.skip, stats);

  std::vector<StatCopy> ema(n);
  for (size_t i = 0; i < n; ++i)
    std::copy(tensors[i].grad_stats, tensors[i].grad_stats + GradStatsIndex::kCount,
              ema[i].begin());

  // AdaClip (§4.4 step 3). With a reduction the max is global and M is equal on every shard,
  // so every shard decides alike whether the tensor clips.
  std::vector<StableTensorScalars> scalars(n);
  std::vector<char> clips(n, 0);
  bool any_clip = false;
  for (size_t i = 0; i < n; ++i) {
    stable_adaclip(ema[i].data(), stats[i].max_abs, tensors[i].stat, scalars[i]);
    clips[i] = stable_clips(scalars[i], stats[i].max_abs);
    any_clip = any_clip || clips[i];
  }
  // Pass 2: ||clipped g|| (§4.4 step 4) of the tensors that clip.
  std::vector<Partial> clipped_stats;  // filled only if some tensor clips
  if (any_clip) {
    reduce_tensors(tensors, plan, &scalars, clips, hyper.nonfinite.skip, clipped_stats);
    if (!reduce.active())
      for (size_t i = 0; i < n; ++i)
        if (clips[i]) stats[i].sum_sq = clipped_stats[i].sum_sq;
  }
  if (reduce.active()) reduce_clipped_sums(reduce, clips, clipped_stats, stats);
  // AdaGN (§4.4 step 4).
  for (size_t i = 0; i < n; ++i)
    stable_adagn(ema[i].data(), static_cast<float>(std::sqrt(stats[i].sum_sq)), tensors[i].stat,
                 scalars[i]);
  // Every callback has returned: store this call's statistics ahead of the update pass, as a
  // step without a reduction does.
  for (size_t i = 0; i < n; ++i) std::copy(ema[i].begin(), ema[i].end(), tensors[i].grad_stats);

  run_group(
      tensors, maps,
      [&](int i) {
        const AdamHyper h = hyper;
        const AdamBiasCorrection adam = tensors[i].adam;
        const StableTensorScalars sc = scalars[i];
        return [h, adam, sc](float& p, float g, float& m, float& v) {
          return stable_spam_element(p, g, m, v, h, adam, sc);
        };
      },
      counters);
}

}  // namespace SPAM_CPU_ISA
}  // namespace spam
