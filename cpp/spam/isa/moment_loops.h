// isa/moment_loops.h — the loops every Adam-family step shares, for dense and 8-bit moments.
// Included only by cpp/spam/isa/*.cpp (one copy per instruction set).
//
// An optimizer supplies an element function fn(p, g, m, v) -> ElementFlags (math.h) per
// tensor; these loops load and store the storage types around it:
//   dense moments: one pass, p/g/m/v in the parameter dtype;
//   8-bit moments: per block of <= 256 elements (blocks restart at each row, quant8.h
//                  BlockRows), dequantise m and v into registers/stack, run fn, take the new
//                  per-block absmax, requantise — one pass over memory;
//   packed 4-bit parameter (dense moments): per quantisation group, unpack, run fn,
//                  re-quantise with stochastic rounding (packed_loop.h) — one pass as well.
#pragma once

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "../cpu_chunks.h"
#include "../cpu_ops.h"
#include "../half.h"
#include "../quant8.h"
#include "packed_loop.h"
#include "quant8_runs.h"

namespace spam {
namespace SPAM_CPU_ISA {
namespace {

// Max that keeps a NaN once seen ("propagate" policy must not hide a NaN moment).
inline float sticky_max(float acc, float x) { return (x > acc || x != x) ? x : acc; }

// An element function whose update has a costly branch with a cheap test (SPAM's spike clip)
// comes as three lambdas: `full`, `fast` (valid where the test is false) and `needs_full(g, v)`.
// The loops below test each run of kFastPathRun elements first and run `fast` on the (usual)
// runs without a spike. Plain element functions are called as fn(p, g, m, v). (Lambdas
// capturing their scalars by value, not member functions: GCC vectorises only the former.)
template <typename Full, typename Fast, typename Test>
struct WithFastPath {
  Full full;
  Fast fast;
  Test needs_full;
  // Loops without a block test (the packed 4-bit one) call the full function.
  ElementFlags operator()(float& p, float g, float& m, float& v) const { return full(p, g, m, v); }
};

template <typename Full, typename Fast, typename Test>
WithFastPath<Full, Fast, Test> with_fast_path(Full full, Fast fast, Test needs_full) {
  return {full, fast, needs_full};
}

template <typename Fn>
struct HasFastPath : std::false_type {};
template <typename Full, typename Fast, typename Test>
struct HasFastPath<WithFastPath<Full, Fast, Test>> : std::true_type {};

// Running maxima of updated 8-bit moments as int32 float bits: for floats >= +0 the integer
// order is the float order, and every NaN's |bits| lies above +inf's. (A float max with a NaN
// test, the obvious form, is not vectorised by GCC and cost as much as the requantisation.)
struct MomentMaxima {
  int32_t m_bits = 0;       // max |m|
  int32_t v_bits = 0;       // max(0, v): a v < 0 (int32 < 0) never wins, as with floats
  int32_t v_magnitude = 0;  // max |v|, only to see a NaN of either sign
};

// fn over n elements: p, g in the parameter dtype T, m, v in MT (T for dense moments, float
// for the dequantised block of 8-bit moments), and with `maxima` the updated moments' maxima
// in the same pass. Block-local int counters: int64 lanes would cost the vectorised loop a
// widening per element.
template <typename T, typename MT, typename Call>
inline void element_run(T* __restrict p, const T* __restrict g, MT* __restrict m, MT* __restrict v,
                        int n, const Call call, int64_t& clipped, int64_t& nonfinite,
                        MomentMaxima* maxima = nullptr) {
  // `call` is taken by value: read through a reference, its scalars would be reloaded every
  // element (the stores to p, m, v might alias them) and the loop would not vectorise.
  const auto loop = [&](auto track) {
    int n_clip = 0, n_bad = 0;
    int32_t m_max = 0, v_max = 0, v_mag = 0;
    for (int i = 0; i < n; ++i) {
      float pi = Storage<T>::load(p, i), mi = Storage<MT>::load(m, i), vi = Storage<MT>::load(v, i);
      const ElementFlags f = call(pi, Storage<T>::load(g, i), mi, vi);
      Storage<T>::store(p, i, pi);
      Storage<MT>::store(m, i, mi);
      Storage<MT>::store(v, i, vi);
      n_clip += f.clipped;
      n_bad += f.nonfinite;
      if constexpr (decltype(track)::value) {
        const int32_t v_i = static_cast<int32_t>(float_bits(vi));
        m_max = std::max(m_max, static_cast<int32_t>(float_bits(mi) & 0x7fffffffu));
        v_max = std::max(v_max, v_i);
        v_mag = std::max(v_mag, v_i & 0x7fffffff);
      }
    }
    clipped += n_clip;
    nonfinite += n_bad;
    if constexpr (decltype(track)::value) {
      maxima->m_bits = std::max(maxima->m_bits, m_max);
      maxima->v_bits = std::max(maxima->v_bits, v_max);
      maxima->v_magnitude = std::max(maxima->v_magnitude, v_mag);
    }
  };
  if (maxima != nullptr)
    loop(std::true_type{});
  else
    loop(std::false_type{});
}

// Elements per spike test of a fast-path function. In 8-bit SPAM about 1 element in 1000 has
// its v quantised to 0 and "spikes" (clipped to 0), so a 256-element test would send a quarter
// of all blocks down the full path; at 64 it is about 6%.
constexpr int kFastPathRun = 64;

template <typename T, typename MT, typename Fn>
inline void element_block(T* p, const T* g, MT* m, MT* v, int n, const Fn& fn, int64_t& clipped,
                          int64_t& nonfinite, MomentMaxima* maxima = nullptr) {
  if constexpr (HasFastPath<Fn>::value) {
    // Test every run, then call each function once over each stretch of consecutive runs of
    // its kind (usually one call for the whole block: each call pays its reductions).
    int i0 = 0;
    bool stretch_full = false;
    for (int r0 = 0; r0 < n; r0 += kFastPathRun) {
      const int k = std::min(kFastPathRun, n - r0);
      int full = 0;
      for (int i = r0; i < r0 + k; ++i)
        full |= fn.needs_full(Storage<T>::load(g, i), Storage<MT>::load(v, i));
      if (r0 > i0 && (full != 0) != stretch_full) {  // close the stretch [i0, r0)
        if (stretch_full)
          element_run(p + i0, g + i0, m + i0, v + i0, r0 - i0, fn.full, clipped, nonfinite, maxima);
        else
          element_run(p + i0, g + i0, m + i0, v + i0, r0 - i0, fn.fast, clipped, nonfinite, maxima);
        i0 = r0;
      }
      stretch_full = full != 0;
    }
    if (stretch_full)
      element_run(p + i0, g + i0, m + i0, v + i0, n - i0, fn.full, clipped, nonfinite, maxima);
    else
      element_run(p + i0, g + i0, m + i0, v + i0, n - i0, fn.fast, clipped, nonfinite, maxima);
  } else {
    element_run(p, g, m, v, n, fn, clipped, nonfinite, maxima);
  }
}

// Software prefetch of one block of kQuantBlock elements (prefetchw where it will be
// written). The loops below ask for block b+1 while they work on block b. Why: an 8-bit
// block alternates a memory phase (loads of p, g, codes) with a compute phase that issues
// no loads (the requantisation), and the hardware prefetchers, which follow demand misses,
// leave the memory idle during it; the dense loop gains a little too. On a 2-vCPU Xeon
// (bench_step, LLaMA-60M set, builds alternated; benchmarks/README.md, 2026-12-02) SPAM 8-bit
// went from 73.6-74.1 to 62.8-65.5 ms, SPAM 32-bit from 47.0-52.6 to 45.8-47.3 ms; two blocks
// ahead was no better than one (a single-tensor harness, not a benchmarks/ script).
template <typename E>
inline void prefetch_block(const E* block, bool for_write) {
  constexpr int kLine = 64;
  const char* bytes = reinterpret_cast<const char*>(block);
  for (int k = 0; k < kQuantBlock * static_cast<int>(sizeof(E)); k += kLine) {
    if (for_write)
      __builtin_prefetch(bytes + k, 1, 3);
    else
      __builtin_prefetch(bytes + k, 0, 3);
  }
}

// One block of a step's streams: p, g (read only) and the moments or their codes.
template <typename T, typename M>
inline void prefetch_step_block(const T* p, const T* g, const M* m, const M* v) {
  prefetch_block(p, true);
  prefetch_block(g, false);
  prefetch_block(m, true);
  prefetch_block(v, true);
}

template <typename T, typename Fn>
void run_dense(const TensorRef& param, const TensorRef& grad, const TensorRef& exp_avg,
               const TensorRef& exp_avg_sq, int64_t begin, int64_t end, const Fn& fn,
               int64_t& clipped, int64_t& nonfinite) {
  T* p = static_cast<T*>(param.data);
  const T* g = static_cast<const T*>(grad.data);
  T* m = static_cast<T*>(exp_avg.data);
  T* v = static_cast<T*>(exp_avg_sq.data);
  for (int64_t b0 = begin; b0 < end; b0 += kQuantBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kQuantBlock, end - b0));
    const int64_t next = b0 + kQuantBlock;
    if (next + kQuantBlock <= end) prefetch_step_block(p + next, g + next, m + next, v + next);
    element_block(p + b0, g + b0, m + b0, v + b0, n, fn, clipped, nonfinite);
  }
}

// The new absmax of a block from the maxima its update pass took. A NaN moment ("propagate"
// policy) must poison its block, not vanish: then both are taken again, NaN-sticky.
inline void block_absmax(const MomentMaxima& maxima, const float* m, const float* v, int n,
                         float& m_absmax, float& v_absmax) {
  constexpr int32_t kInfBits = 0x7f800000;
  float new_m = bits_float(static_cast<uint32_t>(maxima.m_bits));
  float new_v = bits_float(static_cast<uint32_t>(maxima.v_bits));
  if (maxima.m_bits > kInfBits || maxima.v_magnitude > kInfBits) {
    new_m = new_v = 0.0f;
    for (int i = 0; i < n; ++i) {
      new_m = sticky_max(new_m, std::fabs(m[i]));
      new_v = sticky_max(new_v, v[i]);
    }
  }
  m_absmax = new_m;
  v_absmax = new_v;
}

// One block of 8-bit moments, dense or sparse: dequantise m and v into registers/stack, run
// fn over the block's p and g (n <= kQuantBlock values, already in T), take the new absmax
// in the same pass, requantise.
template <typename T, typename Fn>
inline void quant8_block(T* p, const T* g, int n, uint8_t* __restrict m_codes,
                         uint8_t* __restrict v_codes, float& m_absmax, float& v_absmax,
                         const QuantMaps& maps, const Fn& fn, int64_t& clipped,
                         int64_t& nonfinite) {
  float m[kQuantBlock], v[kQuantBlock];
  dequantize_run(m_codes, m, n, m_absmax, maps.m);
  dequantize_run(v_codes, v, n, v_absmax, maps.v);
  MomentMaxima maxima;
  element_block(p, g, m, v, n, fn, clipped, nonfinite, &maxima);
  block_absmax(maxima, m, v, n, m_absmax, v_absmax);
  quantize_run(m, m_codes, n, m_absmax, maps.m);
  quantize_run(v, v_codes, n, v_absmax, maps.v);
}

// The blocks whose start lies in [begin, end) (q.rows: flat, or restarting at each row;
// quant8.h). Chunks are cut in element space, so with rows whose length is no multiple of 256 a
// block may start before `begin` (the previous chunk's) or run past `end` (this chunk's). For
// flat blocks begin is a multiple of 256 and these are the blocks [begin/256, ceil(end/256)).
template <typename T, typename Fn>
void run_quant8(const TensorRef& param, const TensorRef& grad, const Quant8Moments& q,
                const QuantMaps& maps, int64_t begin, int64_t end, const Fn& fn, int64_t& clipped,
                int64_t& nonfinite) {
  T* __restrict p = static_cast<T*>(param.data);
  const T* __restrict g = static_cast<const T*>(grad.data);
  // Local copies and restrict pointers: uint8 stores may alias anything, and without these
  // the compiler reloads the map pointers every element and gives up vectorising.
  uint8_t* __restrict m_codes = q.m_codes;
  uint8_t* __restrict v_codes = q.v_codes;
  float* __restrict m_absmax = q.m_absmax;
  float* __restrict v_absmax = q.v_absmax;
  const BlockRows rows = q.rows;
  const int64_t last = rows.first_block_at_or_after(end);
  BlockWalk w = walk_at(rows, rows.first_block_at_or_after(begin));
  while (w.block < last) {
    BlockWalk next = w;
    walk_next(rows, next);
    if (next.start + kQuantBlock <= end)
      prefetch_step_block(p + next.start, g + next.start, m_codes + next.start,
                          v_codes + next.start);
    quant8_block(p + w.start, g + w.start, w.len, m_codes + w.start, v_codes + w.start,
                 m_absmax[w.block], v_absmax[w.block], maps, fn, clipped, nonfinite);
    w = next;
  }
}

// One OpenMP loop over the chunks of every tensor of a group. element_fn(i) returns the
// element function of tensor i (capturing its per-tensor scalars by value).
template <typename Tensor, typename MakeFn>
void run_group(const std::vector<Tensor>& tensors, const QuantMaps& maps, const MakeFn& element_fn,
               int64_t* counters) {
  std::vector<int64_t> numels, aligns;
  numels.reserve(tensors.size());
  aligns.reserve(tensors.size());
  for (const auto& t : tensors) {
    numels.push_back(t.param.numel);
    aligns.push_back(t.q4.active() ? t.q4.group : 1);  // packed: chunks of whole groups
  }
  const ChunkPlan plan = make_chunks(numels, &aligns);
  const int64_t n_chunks = static_cast<int64_t>(plan.chunks.size());
  int64_t clipped = 0, nonfinite = 0;
#pragma omp parallel for schedule(static) reduction(+ : clipped, nonfinite) if (plan.parallel)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const Chunk& ch = plan.chunks[c];
    const Tensor& t = tensors[ch.tensor];
    const auto fn = element_fn(ch.tensor);
    dispatch_dtype(t.param.dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      if (t.q4.active())
        run_packed<T>(t.q4, t.grad, t.exp_avg, t.exp_avg_sq, ch.begin, ch.end, fn, clipped,
                      nonfinite);
      else if (t.q8.active())
        run_quant8<T>(t.param, t.grad, t.q8, maps, ch.begin, ch.end, fn, clipped, nonfinite);
      else
        run_dense<T>(t.param, t.grad, t.exp_avg, t.exp_avg_sq, ch.begin, ch.end, fn, clipped,
                     nonfinite);
    });
  }
  counters[Counters::kClipped] += clipped;
  counters[Counters::kNonFinite] += nonfinite;
}

}  // namespace
}  // namespace SPAM_CPU_ISA
}  // namespace spam
