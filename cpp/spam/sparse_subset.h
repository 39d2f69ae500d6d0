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
// Parameters have fewer than 2^32 elements (checked in Python and by the bindings), so
// uint32(i) is exact.
//
// Indices are global (docs/algorithms.md §13.3): a shard holding the flat indices
// [offset, offset + n) of a parameter (the rows an FSDP2 rank steps) selects its local element
// i when selected(offset + i) under the rule of the whole parameter. The kernels walk local
// indices with the shard's rebased rule (shard_rule), which gives the same membership with the
// unchanged hash and compare: offset 0 costs nothing.
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

// Membership of global flat index i.
SPAM_HD bool subset_selected(const SubsetRule& r, int64_t i) {
  const uint32_t h = subset_hash(r.seed, i);
  return (h < r.t_hash) | ((h == r.t_hash) & (i <= r.t_index));
}

// The rule of a shard whose local element 0 is global index `offset`, in local indices:
// subset_selected(shard_rule(r, offset), i) == subset_selected(r, offset + i) for every local
// i >= 0 with offset + i < 2^32, because uint32(offset + i) * G + seed
// == uint32(i) * G + (seed + uint32(offset) * G) mod 2^32, and offset + i <= t_index
// <=> i <= t_index - offset. Every kernel tests membership through this one rebase.
SPAM_HD SubsetRule shard_rule(const SubsetRule& r, int64_t offset) {
  return SubsetRule{r.seed + static_cast<uint32_t>(offset) * kSubsetGolden, r.t_hash,
                    r.t_index - offset};
}

}  // namespace spam
