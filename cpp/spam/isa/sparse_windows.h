// isa/sparse_windows.h — gather / scatter of the selected fp32 entries of one compact block in
// windows of 8 lanes (AVX2: permutes from lane tables) or 16 lanes (AVX-512: vcompressps /
// vexpandps), for isa/sparse_spam_step.cpp.
//
// Why: the portable path collects the selected indices into an int64 array and then gathers
// and scatters p and g one scalar at a time; at d = 0.25 that bookkeeping costs more than the
// moments it saves. Here each window of 8 consecutive indices is hashed in one vector, the
// selected lanes of p and g are packed to the front with one permute (table `compress`) and
// stored at the running compact position, and the window's offset and lane mask are kept.
// After the update, each window's results are unpacked with the inverse permute (`expand`),
// blended into p under the lane mask and stored whole. Same membership rule (sparse_subset.h)
// and same element values, so results are bit-identical to the portable path.
//
// Ownership: a block's windows start at its first selected index and, except the last one,
// end before its n-th selected index, so the whole-vector stores only rewrite unselected
// entries of the block's own span with their own values. The last window (which may reach
// into the next block, owned by another thread) and any window that would cross the end of
// the parameter are written lane by lane.
#pragma once

#if defined(__AVX2__)

#include <immintrin.h>

#include <cstdint>

#include "../quant8.h"
#include "../sparse_subset.h"

namespace spam {
namespace SPAM_CPU_ISA {
namespace {

struct LaneTables {
  uint8_t compress[256][8];  // [mask][k]: lane of the k-th selected lane
  uint8_t expand[256][8];    // [mask][lane]: rank of a selected lane among the selected
  constexpr LaneTables() : compress{}, expand{} {
    for (int mask = 0; mask < 256; ++mask) {
      int rank = 0;
      for (int lane = 0; lane < 8; ++lane)
        if (mask & (1 << lane)) {
          compress[mask][rank] = static_cast<uint8_t>(lane);
          expand[mask][lane] = static_cast<uint8_t>(rank);
          ++rank;
        }
    }
  }
};
constexpr LaneTables kLaneTables{};

inline __m256i lane_order(const uint8_t (&row)[8]) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row)));
}

#if defined(__AVX512F__)
constexpr int kWindowLanes = 16;
using WindowMask = uint16_t;
#else
constexpr int kWindowLanes = 8;
using WindowMask = uint8_t;
#endif

// The windows of one compact block: offset from the block's first index and lane mask. Every
// recorded window holds a selected entry, so a block has at most kQuantBlock of them.
struct BlockWindows {
  uint32_t offset[kQuantBlock];
  WindowMask mask[kQuantBlock];
  int count = 0;
};

// Floats of slack the packed arrays need past n: whole windows are stored at the running end.
constexpr int kWindowSlack = kWindowLanes;

// The rare window of gather_windows: the parameter ends in it (never load past it) or the
// block does (keep its first n - found lanes). Lane by lane; returns the lanes taken.
inline unsigned gather_lanes(unsigned mask, int64_t i, int64_t numel, int n, int& found,
                             const float* __restrict p, const float* __restrict g,
                             float* __restrict pv, float* __restrict gv) {
  if (numel - i < kWindowLanes) mask &= (1u << (numel - i)) - 1u;
  unsigned kept = 0;
  for (int q = 0; q < kWindowLanes && found < n; ++q)
    if (mask & (1u << q)) {
      pv[found] = p[i + q];
      gv[found] = g[i + q];
      ++found;
      kept |= 1u << q;
    }
  return kept;
}

// Keeps the window's record only if it is non-empty (branch-free: an empty window is ~10% of
// them at d = 0.25, too many to predict).
inline void record_window(BlockWindows& w, int64_t i, int64_t start, unsigned mask) {
  w.offset[w.count] = static_cast<uint32_t>(i - start);
  w.mask[w.count] = static_cast<WindowMask>(mask);
  w.count += mask != 0;
}

// The last window of a block, or one at the end of the parameter: it may share its lanes with
// the next block (another thread), so only its selected lanes are written.
inline void scatter_lanes(unsigned mask, int64_t i, const float* __restrict pv, int& pos,
                          float* __restrict p) {
  for (int q = 0; q < kWindowLanes; ++q)
    if (mask & (1u << q)) p[i + q] = pv[pos++];
}

#if defined(__AVX512F__)
// Packs p[i], g[i] of the n selected entries from `start` into pv, gv (each with kWindowSlack
// floats of slack past n). False when the parameter ends first or `start` is not selected.
inline bool gather_windows(const SubsetRule& r, int64_t start, int64_t numel, int n,
                           const float* __restrict p, const float* __restrict g,
                           float* __restrict pv, float* __restrict gv, BlockWindows& w) {
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i lane_golden =
      _mm512_mullo_epi32(lanes, _mm512_set1_epi32(static_cast<int>(kSubsetGolden)));
  const __m512i c1 = _mm512_set1_epi32(static_cast<int>(0x85EBCA6Bu));
  const __m512i c2 = _mm512_set1_epi32(static_cast<int>(0xC2B2AE35u));
  const __m512i th = _mm512_set1_epi32(static_cast<int>(r.t_hash));
  const __m512i step = _mm512_set1_epi32(static_cast<int>(16u * kSubsetGolden));
  // x = i * golden + seed (mod 2^32) for the 16 lanes, advanced by 16 * golden per window.
  __m512i x = _mm512_add_epi32(
      _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(start) * kSubsetGolden + r.seed)),
      lane_golden);
  int found = 0;
  w.count = 0;
  for (int64_t i = start; found < n && i < numel; i += 16, x = _mm512_add_epi32(x, step)) {
    __m512i h = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));  // subset_fmix32, lane-wise
    h = _mm512_mullo_epi32(h, c1);
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 13));
    h = _mm512_mullo_epi32(h, c2);
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
    unsigned mask = _mm512_cmplt_epu32_mask(h, th);
    const __mmask16 tied = _mm512_cmpeq_epi32_mask(h, th);
    // The exact rule's tie-break (h == t_hash, index <= t_index), tested only when a lane ties.
    if (__builtin_expect(tied != 0, 0) && r.t_index >= i) {
      const int64_t tie = r.t_index - i < 16 ? r.t_index - i : 16;
      mask |= tied & ((1u << (tie + 1)) - 1u);
    }
    const int cnt = __builtin_popcount(mask);
    if (__builtin_expect(numel - i < 16 || cnt > n - found, 0)) {
      mask = gather_lanes(mask, i, numel, n, found, p, g, pv, gv);
    } else {  // branch-free in the mask: pack and store anyway
      const __mmask16 k = static_cast<__mmask16>(mask);
      _mm512_storeu_ps(pv + found, _mm512_maskz_compress_ps(k, _mm512_loadu_ps(p + i)));
      _mm512_storeu_ps(gv + found, _mm512_maskz_compress_ps(k, _mm512_loadu_ps(g + i)));
      found += cnt;
    }
    record_window(w, i, start, mask);
  }
  return found >= n && w.count > 0 && w.offset[0] == 0 && (w.mask[0] & 1u);
}

// One whole window: the next popcount(mask) packed values go to the mask's lanes of p.
inline void expand_window(unsigned mask, const float* __restrict packed, float* __restrict p) {
  _mm512_storeu_ps(p, _mm512_mask_expand_ps(_mm512_loadu_ps(p), static_cast<__mmask16>(mask),
                                            _mm512_loadu_ps(packed)));
}
#else
// Packs p[i], g[i] of the n selected entries from `start` into pv, gv (each with 8 floats of
// slack past n). False when the parameter ends first or `start` is not selected.
inline bool gather_windows(const SubsetRule& r, int64_t start, int64_t numel, int n,
                           const float* __restrict p, const float* __restrict g,
                           float* __restrict pv, float* __restrict gv, BlockWindows& w) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i lane_golden =
      _mm256_mullo_epi32(lanes, _mm256_set1_epi32(static_cast<int>(kSubsetGolden)));
  const __m256i c1 = _mm256_set1_epi32(static_cast<int>(0x85EBCA6Bu));
  const __m256i c2 = _mm256_set1_epi32(static_cast<int>(0xC2B2AE35u));
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  // h < t_hash unsigned == (h ^ sign) < (t_hash ^ sign) signed.
  const __m256i th_s = _mm256_set1_epi32(static_cast<int>(r.t_hash ^ 0x80000000u));
  const __m256i th = _mm256_set1_epi32(static_cast<int>(r.t_hash));
  const __m256i step = _mm256_set1_epi32(static_cast<int>(8u * kSubsetGolden));
  // x = i * golden + seed (mod 2^32) for the 8 lanes, advanced by 8 * golden per window.
  __m256i x = _mm256_add_epi32(
      _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(start) * kSubsetGolden + r.seed)),
      lane_golden);
  int found = 0;
  w.count = 0;
  for (int64_t i = start; found < n && i < numel; i += 8, x = _mm256_add_epi32(x, step)) {
    __m256i h = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    h = _mm256_mullo_epi32(h, c1);
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 13));
    h = _mm256_mullo_epi32(h, c2);
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
    __m256i sel = _mm256_cmpgt_epi32(th_s, _mm256_xor_si256(h, sign));
    const __m256i tied = _mm256_cmpeq_epi32(h, th);
    // The exact rule's tie-break (h == t_hash, index <= t_index): tested only when a lane ties,
    // which almost never happens, instead of masking every window before t_index.
    if (__builtin_expect(!_mm256_testz_si256(tied, tied), 0) && r.t_index >= i) {
      const int64_t tie = r.t_index - i < 8 ? r.t_index - i : 8;
      const __m256i lane_ok =
          _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(tie) + 1), lanes);
      sel = _mm256_or_si256(sel, _mm256_and_si256(tied, lane_ok));
    }
    unsigned mask = static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(sel)));
    const int cnt = __builtin_popcount(mask);
    if (__builtin_expect(numel - i < 8 || cnt > n - found, 0)) {
      mask = gather_lanes(mask, i, numel, n, found, p, g, pv, gv);
    } else {  // branch-free in the mask: pack and store anyway
      const __m256i perm = lane_order(kLaneTables.compress[mask]);
      _mm256_storeu_ps(pv + found, _mm256_permutevar8x32_ps(_mm256_loadu_ps(p + i), perm));
      _mm256_storeu_ps(gv + found, _mm256_permutevar8x32_ps(_mm256_loadu_ps(g + i), perm));
      found += cnt;
    }
    record_window(w, i, start, mask);
  }
  return found >= n && w.count > 0 && w.offset[0] == 0 && (w.mask[0] & 1u);
}

// One whole window: the next popcount(mask) packed values go to the mask's lanes of p.
inline void expand_window(unsigned mask, const float* __restrict packed, float* __restrict p) {
  const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256 e =
      _mm256_permutevar8x32_ps(_mm256_loadu_ps(packed), lane_order(kLaneTables.expand[mask]));
  const __m256i m =
      _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(mask)), bits), bits);
  _mm256_storeu_ps(p, _mm256_blendv_ps(_mm256_loadu_ps(p), e, _mm256_castsi256_ps(m)));
}
#endif  // __AVX512F__

// Writes pv (the updated values, in compact order) back to the selected entries of p.
inline void scatter_windows(const BlockWindows& w, int64_t start, int64_t numel,
                            const float* __restrict pv, float* __restrict p) {
  int pos = 0;
  for (int k = 0; k < w.count; ++k) {
    const int64_t i = start + w.offset[k];
    const unsigned mask = w.mask[k];
    if (k + 1 == w.count || numel - i < kWindowLanes) {
      scatter_lanes(mask, i, pv, pos, p);
    } else {
      expand_window(mask, pv + pos, p + i);
      pos += __builtin_popcount(mask);
    }
  }
}

}  // namespace
}  // namespace SPAM_CPU_ISA
}  // namespace spam

#endif  // __AVX2__
