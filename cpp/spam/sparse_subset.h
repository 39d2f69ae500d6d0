// sparse_subset.h — the random coordinate subset of SPAM's sparse momentum (docs/algorithms.md §3),
// encoded without stored indices: element i of a parameter is selected when a counter-based
// hash h(seed, i) passes a per-tensor threshold. One definition for the CPU loops, the CUDA
// kernels and (written identically in torch int64 arithmetic) spam_lowmem/sparse_subset.py.
//
//   h(seed, i) = fmix32((uint32(i) * 0x9E3779B1 + seed) mod 2^32)    (murmur3's finaliser)
//
//   selected(i) = h < t_hash  or  (h == t_hash and i <= t_index)
//
// * Initial subset (exactly k = floor(d * numel) entries): the k smallest (h, i) pairs in
//   lexicographic order; (t_hash, t_index) is the k-th smallest pair (k = 0: t_hash = 0,
//   t_index = -1, nothing selected).
// * Subsets drawn at momentum resets (Bernoulli(d) per entry, as the authors' `rand < d`):
//   t_hash = floor(d * 2^32), t_index = -1.
// Parameters have fewer than 2^32 elements (checked in Python), so uint32(i) is exact.
#pragma once

#include <cstdint>

#include "common.h"

namespace spam {

struct SubsetRule {
  uint32_t seed;
  uint32_t t_hash;
  int64_t t_index;  // -1: no tie-break (Bernoulli periods)
};

constexpr uint32_t kSubsetGolden = 0x9E3779B1u;

SPAM_HD uint32_t subset_fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

SPAM_HD uint32_t subset_hash(uint32_t seed, int64_t i) {
  return subset_fmix32(static_cast<uint32_t>(i) * kSubsetGolden + seed);
}

SPAM_HD bool subset_selected(const SubsetRule& r, int64_t i) {
  const uint32_t h = subset_hash(r.seed, i);
  return (h < r.t_hash) | ((h == r.t_hash) & (i <= r.t_index));
}

}  // namespace spam
