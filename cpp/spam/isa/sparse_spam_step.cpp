// isa/sparse_spam_step.cpp — CPU SPAM step for a sparse-momentum group (docs/algorithms.md §3).
//
// Moments exist only for the entries of a hash-defined subset (sparse_subset.h), stored in
// index order as a compact array of K values (dense in the parameter dtype, or 8-bit codes
// with one absmax per 256 compact values). The work unit is one compact block c of <= 256
// values: starting at the parameter index block_starts[c] (its first selected entry), walk
// the parameter in windows, hash every index (vectorised; a shard of a parameter hashes its
// global indices through shard_rule, docs/algorithms.md §13.3), pack p and g of the selected
// entries until the block's values are consumed (fp32 on x86: 8-lane windows, sparse_windows.h;
// else an index list and scalar gathers), run spam_element on the packed (p, g, m, v), write p back
// and (8-bit) requantise the block. One pass, nothing full-size allocated, unselected entries
// never written. OpenMP over runs of compact blocks of every tensor of the group.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>
#include <type_traits>

#include "../cpu_isa.h"
#include "../math.h"
#include "../sparse_subset.h"
#include "moment_loops.h"
#include "spam_fn.h"
#include "sparse_windows.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace spam {
namespace SPAM_CPU_ISA {
namespace {

constexpr int kWalkMax = 512;  // indices hashed per window at most
constexpr int kWalkMin = 64;

// sel[k] = 1 when index base + k is selected (k < w). tie_limit = t_index - base clamped to
// [-1, kWalkMax], so the tie-break is a 32-bit compare. Out of line so it vectorises on its own.
#if defined(__GNUC__)
__attribute__((noinline))
#endif
void select_window(uint32_t seed, uint32_t t_hash, int32_t tie_limit, uint32_t base, int w,
                   uint8_t* __restrict sel) {
  for (int k = 0; k < w; ++k) {
    const uint32_t h = subset_fmix32((base + static_cast<uint32_t>(k)) * kSubsetGolden + seed);
    sel[k] = static_cast<uint8_t>((h < t_hash) | ((h == t_hash) & (k <= tie_limit)));
  }
}

#if defined(__AVX512F__)
// AVX-512 build: hash 16 indices per step and compress-store the selected ones (same
// membership rule, so every build selects the same entries).
bool collect_indices_avx512(const SubsetRule& r, int64_t start, int64_t numel, int n,
                            int64_t* __restrict idx) {
  alignas(64) uint32_t off[kQuantBlock + 32];
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i golden = _mm512_set1_epi32(static_cast<int>(kSubsetGolden));
  const __m512i c1 = _mm512_set1_epi32(static_cast<int>(0x85EBCA6Bu));
  const __m512i c2 = _mm512_set1_epi32(static_cast<int>(0xC2B2AE35u));
  const __m512i seed = _mm512_set1_epi32(static_cast<int>(r.seed));
  const __m512i th = _mm512_set1_epi32(static_cast<int>(r.t_hash));
  int found = 0;
  for (int64_t i = start; found < n && i < numel; i += 16) {
    const __m512i k =
        _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(i))), lane);
    __m512i h = _mm512_add_epi32(_mm512_mullo_epi32(k, golden), seed);
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
    h = _mm512_mullo_epi32(h, c1);
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 13));
    h = _mm512_mullo_epi32(h, c2);
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
    const int64_t tie = std::max<int64_t>(-1, std::min<int64_t>(r.t_index - i, 16));
    __mmask16 sel = _mm512_cmplt_epu32_mask(h, th) |
                    (_mm512_cmpeq_epi32_mask(h, th) &
                     _mm512_cmple_epi32_mask(lane, _mm512_set1_epi32(static_cast<int>(tie))));
    const int64_t left = numel - i;
    if (left < 16) sel &= static_cast<__mmask16>((1u << left) - 1u);
    if (sel == 0) continue;
    // Register compress + full store (the memory form of vpcompressd is microcoded on Zen 4);
    // off has 16 entries of slack for the lanes past `found + popcount`.
    const __m512i rel = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(i - start)), lane);
    _mm512_storeu_si512(off + found, _mm512_maskz_compress_epi32(sel, rel));
    found += __builtin_popcount(static_cast<unsigned>(sel));
  }
  if (found < n || off[0] != 0) return false;
  for (int j = 0; j < n; ++j) idx[j] = start + static_cast<int64_t>(off[j]);
  return true;
}
#endif

// Parameter indices of the n selected entries starting at `start` (which must be selected).
// Returns false when the parameter ends first or `start` is not selected (inconsistent state).
bool collect_indices(const SubsetRule& r, int64_t start, int64_t numel, int n,
                     int64_t expected_span, int64_t* __restrict idx) {
  alignas(64) uint8_t sel[kWalkMax];
  int found = 0;
  int64_t i = start;
  while (found < n && i < numel) {
    const int64_t want = (static_cast<int64_t>(n - found) * expected_span + 255) / 256;
    int64_t w =
        std::min<int64_t>(kWalkMax, std::max<int64_t>(kWalkMin, (want + 63) & ~int64_t{63}));
    w = std::min<int64_t>(w, numel - i);
    const int64_t tie = std::max<int64_t>(-1, std::min<int64_t>(r.t_index - i, kWalkMax));
    select_window(r.seed, r.t_hash, static_cast<int32_t>(tie), static_cast<uint32_t>(i),
                  static_cast<int>(w), sel);
    int k = 0;
    for (; k + 8 <= w; k += 8) {  // most 8-index words hold nothing at low density
      uint64_t word;
      std::memcpy(&word, sel + k, 8);
      if (word == 0) continue;
      for (int q = 0; q < 8; ++q) {
        idx[found] = i + k + q;
        found += sel[k + q];
      }
    }
    for (; k < w; ++k) {
      idx[found] = i + k;
      found += sel[k];
    }
    i += w;
  }
  return found >= n && idx[0] == start;
}

// Local indices of the block's n selected entries (portable path, and bf16/fp16); `rule` is
// the tensor's rule rebased to local indices (shard_rule).
bool block_indices(const SparseSpamTensor& t, const SubsetRule& rule, int64_t c, int n,
                   int64_t* __restrict idx) {
#if defined(__AVX512F__)
  return collect_indices_avx512(rule, t.block_starts[c], t.param.numel, n, idx);
#else
  const int64_t span = t.compact > 0 ? (t.param.numel * kQuantBlock) / t.compact : kQuantBlock;
  return collect_indices(rule, t.block_starts[c], t.param.numel, n, span, idx);
#endif
}

// x86 builds with fp32 parameters gather and scatter p in 8- or 16-lane windows
// (sparse_windows.h).
template <typename T>
constexpr bool kUseWindows =
#if defined(__AVX2__)
    std::is_same_v<T, float>;
#else
    false;
#endif

template <typename T>
bool sparse_block(const SparseSpamTensor& t, int64_t c, const SpamHyper& h, const QuantMaps& maps,
                  int64_t& clipped, int64_t& nonfinite) {
  const int64_t j0 = c * kQuantBlock;
  const int n = static_cast<int>(std::min<int64_t>(kQuantBlock, t.compact - j0));
  T* __restrict p = static_cast<T*>(t.param.data);
  const T* __restrict g = static_cast<const T*>(t.grad.data);
  // p and g of the selected entries, packed into contiguous fp32 arrays so the element loop
  // below runs on unit-stride data and vectorises like the dense loop; p is written back after.
  // Slack: the window path stores whole vectors at the running position.
#if defined(__AVX2__)
  float pv[kQuantBlock + kWindowSlack], gv[kQuantBlock + kWindowSlack];
  BlockWindows windows;
#else
  float pv[kQuantBlock], gv[kQuantBlock];
#endif
  int64_t idx[kQuantBlock + kWalkMax];  // 256 values plus one window of overshoot
  // The walk runs over local indices: a shard's rule is rebased once (§13.3; offset 0 leaves
  // it as it is), so the hash loops below are those of an unsharded tensor.
  const SubsetRule rule = shard_rule(t.subset, t.offset);
  if constexpr (kUseWindows<T>) {
#if defined(__AVX2__)
    if (!gather_windows(rule, t.block_starts[c], t.param.numel, n, p, g, pv, gv, windows))
      return false;
#endif
  } else {
    if (!block_indices(t, rule, c, n, idx)) return false;
    for (int j = 0; j < n; ++j) {
      pv[j] = Storage<T>::load(p, idx[j]);
      gv[j] = Storage<T>::load(g, idx[j]);
    }
  }

  const auto fn = spam_fn(h, t.update_scale);
  if (t.q8.active()) {
    quant8_block(pv, gv, n, t.q8.m_codes + j0, t.q8.v_codes + j0, t.q8.m_absmax[c],
                 t.q8.v_absmax[c], maps, fn, clipped, nonfinite);
  } else {  // compact moments in the parameter dtype, updated in place
    element_block(pv, gv, static_cast<T*>(t.exp_avg.data) + j0,
                  static_cast<T*>(t.exp_avg_sq.data) + j0, n, fn, clipped, nonfinite);
  }
  if constexpr (kUseWindows<T>) {
#if defined(__AVX2__)
    scatter_windows(windows, t.block_starts[c], t.param.numel, pv, reinterpret_cast<float*>(p));
#endif
  } else {
    for (int j = 0; j < n; ++j) Storage<T>::store(p, idx[j], pv[j]);
  }
  return true;
}

struct BlockRun {
  int32_t tensor;
  int64_t begin, end;  // compact blocks
};

}  // namespace

void cpu_sparse_spam_step(const std::vector<SparseSpamTensor>& tensors, const SpamHyper& hyper,
                          const QuantMaps& maps, int64_t* counters) {
  // Runs of compact blocks spanning about kCpuChunk parameter elements each.
  std::vector<BlockRun> runs;
  int64_t walked = 0;
  for (size_t ti = 0; ti < tensors.size(); ++ti) {
    const SparseSpamTensor& t = tensors[ti];
    const int64_t blocks = num_blocks(t.compact);
    if (blocks == 0) continue;
    walked += t.param.numel;
    const int64_t per_run = std::max<int64_t>(
        1, (kCpuChunk * t.compact) / (std::max<int64_t>(t.param.numel, 1) * kQuantBlock));
    for (int64_t b = 0; b < blocks; b += per_run)
      runs.push_back(BlockRun{static_cast<int32_t>(ti), b, std::min(blocks, b + per_run)});
  }
  const int64_t n_runs = static_cast<int64_t>(runs.size());
  int64_t clipped = 0, nonfinite = 0;
  std::atomic<int> bad_tensor{-1};
#pragma omp parallel for schedule(dynamic, 4) \
    reduction(+ : clipped, nonfinite) if (walked >= kCpuParallelMin)
  for (int64_t r = 0; r < n_runs; ++r) {
    const BlockRun& run = runs[r];
    const SparseSpamTensor& t = tensors[run.tensor];
    dispatch_dtype(t.param.dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      for (int64_t c = run.begin; c < run.end; ++c)
        if (!sparse_block<T>(t, c, hyper, maps, clipped, nonfinite)) {
          bad_tensor.store(run.tensor);
          break;
        }
    });
  }
  counters[Counters::kClipped] += clipped;
  counters[Counters::kNonFinite] += nonfinite;
  SPAM_CHECK(bad_tensor.load() < 0,
             "sparse momentum state of tensor " + std::to_string(bad_tensor.load()) +
                 " is inconsistent: its compact_block_starts / length do not match its subset");
}

}  // namespace SPAM_CPU_ISA
}  // namespace spam
