// sparse_spam_step.cu — CUDA SPAM step of a sparse-momentum group (docs/algorithms.md §3): the
// device twin of cpp/spam/isa/sparse_spam_step.cpp, on the same state, so a CPU state dict
// continues here bit for bit (same hash rule, same compact order, same 8-bit block format,
// same math.h / quant8.h code, --fmad=false).
//
// Work split: one warp owns one compact block c (<= 256 moment values) of one tensor, 8 warps
// a thread block. A tensor may be a shard of its parameter (docs/algorithms.md §13.3): the
// walk runs over local indices with the rule rebased by shard_rule, as on the CPU. The block's
// selected entries lie in the parameter range [block_starts[c], block_starts[c+1]) (the last block:
// up to numel), which the Python layer computes once per subset. The warp walks that range 4 x 32
// indices per iteration: each lane hashes its indices (sparse_subset.h), a ballot plus a popcount
// of the lower lanes gives every selected entry its compact position, so the walk needs no scan
// kernel, no scratch and no host sync; then the selected lanes load p, g, m, v, run spam_element
// and store p (in place; unselected entries are never written) and the moments.
//
// 8-bit values: the warp dequantises its block into shared memory first (coalesced codes),
// updates it there during the walk, then takes the NaN-sticky absmax over the block with a
// warp reduction and requantises, exactly as the CPU's per-block loop.
//
// Multi-tensor: a table of up to kSparseSlots tensors travels as a kernel argument; warp w of
// thread block b works on the launch's compact block 8b + w, and finds its tensor by a scan of
// the slots' first block indices (uniform per warp, a few dozen constant-cache reads).
#include <cstring>
#include <vector>

#include "../cpp/spam/dtype_dispatch.h"
#include "../cpp/spam/cuda_sparse_api.h"
#include "../cpp/spam/half.h"
#include "../cpp/spam/math.h"
#include "../cpp/spam/quant8.h"
#include "../cpp/spam/sparse_subset.h"
#include "common.cuh"
#include "step8.cuh"

namespace spam::cuda {
namespace {

constexpr int kSparseSlots = 32;  // tensors per launch
constexpr int kWalkWindows = 4;   // 32-index windows hashed per warp iteration (loads in flight)

struct SparseSlot {
  void* param;
  const void* grad;
  void* m;  // compact values in the parameter dtype, or the uint8 codes of m
  void* v;
  float* m_absmax;  // 8-bit only
  float* v_absmax;
  const int64_t* block_starts;
  const int64_t* subset;  // [seed, t_hash, t_index, global numel]
  int64_t offset;         // global flat index of the tensor's element 0 (docs/algorithms.md §13.3)
  int64_t numel;          // local
  int64_t compact;
  int64_t first_block;  // launch-wide index of this tensor's compact block 0
  float update_scale;
};

struct SparseArgs {
  SparseSlot slot[kSparseSlots];
  int64_t n_blocks;  // compact blocks of all slots
  int32_t n_slots;
};

struct SparseShared {
  SpamHyper hyper;
  int64_t* counters;
};
static_assert(sizeof(SparseArgs) + sizeof(SparseShared) + sizeof(MapValues) + 2 * sizeof(void*) <=
                  4096,
              "kernel arguments exceed 4 KB");

// The subset rule of a tensor rebased to its local indices (shard_rule, as the CPU walk), or
// false when it cannot be this tensor's (its global range [offset, offset + numel) is not
// inside the rule's numel, numel >= 2^32, or out-of-range fields): then the tensor is left
// untouched.
__device__ __forceinline__ bool read_rule(const SparseSlot& t, SubsetRule& rule) {
  const int64_t seed = t.subset[0], t_hash = t.subset[1], t_index = t.subset[2];
  const int64_t numel = t.subset[3];
  if (numel > 0xFFFFFFFFll || t.offset + t.numel > numel || seed < 0 || seed > 0xFFFFFFFFll ||
      t_hash < 0 || t_hash > 0xFFFFFFFFll || t_index < -1)
    return false;
  rule = shard_rule(SubsetRule{static_cast<uint32_t>(seed), static_cast<uint32_t>(t_hash), t_index},
                    t.offset);
  return true;
}

// Compact block c of tensor t, by one warp. `stage` is this warp's shared scratch (8-bit only).
template <typename T, bool kQ8>
__device__ __forceinline__ void sparse_block(const SparseSlot& t, int64_t c, const SpamHyper& h,
                                             const QuantMap& m_map, const QuantMap& v_map,
                                             float (*stage)[kQuantBlock], int& clipped,
                                             int& nonfinite) {
  SubsetRule rule;
  if (!read_rule(t, rule)) return;
  const int lane = threadIdx.x % kWarpSize;
  const unsigned lower_lanes = (1u << lane) - 1u;
  const int64_t blocks = num_blocks(t.compact);
  const int64_t j0 = c * kQuantBlock;
  const int n = static_cast<int>(min(kQuantBlock, t.compact - j0));
  // Clamped, so arbitrary block starts can only mis-assign entries, never leave the tensor.
  const int64_t start = min(max(t.block_starts[c], int64_t{0}), t.numel);
  const int64_t stop_raw = c + 1 < blocks ? t.block_starts[c + 1] : t.numel;
  const int64_t stop = min(max(stop_raw, start), t.numel);

  T* __restrict__ p = static_cast<T*>(t.param);
  const T* __restrict__ g = static_cast<const T*>(t.grad);
  T* __restrict__ m = static_cast<T*>(t.m) + j0;  // dense values only
  T* __restrict__ v = static_cast<T*>(t.v) + j0;
  // 8-bit only. Not __restrict__: the same codes are rewritten through mc / vc below.
  const uint8_t* m_codes = static_cast<const uint8_t*>(t.m) + j0;
  const uint8_t* v_codes = static_cast<const uint8_t*>(t.v) + j0;
  if constexpr (kQ8) {
    const float m_scale = t.m_absmax[c], v_scale = t.v_absmax[c];
    for (int j = lane; j < n; j += kWarpSize) {
      stage[0][j] = dequantize_code(m_codes[j], m_scale, m_map);
      stage[1][j] = dequantize_code(v_codes[j], v_scale, v_map);
    }
    __syncwarp();
  }

  const float scale = t.update_scale;
  int found = 0;  // warp-uniform: compact position of the next selected entry
  for (int64_t base = start; base < stop && found < n; base += kWalkWindows * kWarpSize) {
    bool sel[kWalkWindows];
    int pos[kWalkWindows];
#pragma unroll
    for (int k = 0; k < kWalkWindows; ++k) {
      const int64_t i = base + k * kWarpSize + lane;
      const bool s = i < stop && subset_selected(rule, i);
      const unsigned ballot = __ballot_sync(0xffffffffu, s);
      pos[k] = found + __popc(ballot & lower_lanes);
      sel[k] = s && pos[k] < n;  // past n: inconsistent state, nothing to write
      found += __popc(ballot);
    }
    float pr[kWalkWindows], gr[kWalkWindows], mr[kWalkWindows], vr[kWalkWindows];
#pragma unroll
    for (int k = 0; k < kWalkWindows; ++k) {  // all loads first: several in flight per lane
      if (!sel[k]) continue;
      const int64_t i = base + k * kWarpSize + lane;
      pr[k] = Storage<T>::load(p, i);
      gr[k] = Storage<T>::load(g, i);
      if constexpr (kQ8) {
        mr[k] = stage[0][pos[k]];
        vr[k] = stage[1][pos[k]];
      } else {
        mr[k] = Storage<T>::load(m, pos[k]);
        vr[k] = Storage<T>::load(v, pos[k]);
      }
    }
#pragma unroll
    for (int k = 0; k < kWalkWindows; ++k) {
      if (!sel[k]) continue;
      const int64_t i = base + k * kWarpSize + lane;
      const ElementFlags f = spam_element(pr[k], gr[k], mr[k], vr[k], h, scale);
      Storage<T>::store(p, i, pr[k]);
      if constexpr (kQ8) {
        stage[0][pos[k]] = mr[k];
        stage[1][pos[k]] = vr[k];
      } else {
        Storage<T>::store(m, pos[k], mr[k]);
        Storage<T>::store(v, pos[k], vr[k]);
      }
      clipped += f.clipped;
      nonfinite += f.nonfinite;
    }
  }

  if constexpr (kQ8) {
    __syncwarp();
    // Max is exact, so the warp tree gives the CPU loop's value; NaN stays sticky as there.
    float m_max = 0.0f, v_max = 0.0f;
    for (int j = lane; j < n; j += kWarpSize) {
      m_max = sticky_max(m_max, fabsf(stage[0][j]));
      v_max = sticky_max(v_max, stage[1][j]);
    }
    m_max = warp_sticky_max(m_max);
    v_max = warp_sticky_max(v_max);
    if (lane == 0) {
      t.m_absmax[c] = m_max;
      t.v_absmax[c] = v_max;
    }
    const float m_div = quant_divisor(m_max), v_div = quant_divisor(v_max);
    uint8_t* mc = static_cast<uint8_t*>(t.m) + j0;
    uint8_t* vc = static_cast<uint8_t*>(t.v) + j0;
    for (int j = lane; j < n; j += kWarpSize) {
      mc[j] = quantize_value(stage[0][j], m_div, m_map);
      vc[j] = quantize_value(stage[1][j], v_div, v_map);
    }
  }
}

template <typename T, bool kQ8>
__global__ void __launch_bounds__(kBlockThreads)
    sparse_spam_kernel(const __grid_constant__ SparseArgs args, const SparseShared shared,
                       const MapValues values, const int32_t* __restrict__ m_buckets,
                       const int32_t* __restrict__ v_buckets) {
  __shared__ float map_values[2][kQuantCodes];
  __shared__ float stage[kQ8 ? kWarps : 1][2][kQuantBlock];
  if constexpr (kQ8) stage_map_values(values, map_values);
  const QuantMap m_map{map_values[0], nullptr, m_buckets};
  const QuantMap v_map{map_values[1], nullptr, v_buckets};
  const int warp = threadIdx.x / kWarpSize;
  const int64_t b = int64_t{blockIdx.x} * kWarps + warp;
  int clipped = 0, nonfinite = 0;
  if (b < args.n_blocks) {
    int s = 0;
    while (s + 1 < args.n_slots && b >= args.slot[s + 1].first_block) ++s;
    const SparseSlot& t = args.slot[s];
    sparse_block<T, kQ8>(t, b - t.first_block, shared.hyper, m_map, v_map, stage[kQ8 ? warp : 0],
                         clipped, nonfinite);
  }
  block_add_counts(shared.counters, clipped, nonfinite);  // every thread: it has barriers
}

template <typename T, bool kQ8>
void launch_sparse_group(const std::vector<CudaSparseSpamTensor>& tensors,
                         const std::vector<int>& order, const SparseShared& shared,
                         const QuantMaps& maps, cudaStream_t stream) {
  const MapValues values{maps.m.values, maps.v.values};
  SparseArgs args;
  std::memset(&args, 0, sizeof(args));
  auto flush = [&] {
    if (args.n_slots == 0) return;
    const int64_t grid = (args.n_blocks + kWarps - 1) / kWarps;
    SPAM_CHECK(grid <= INT32_MAX, "sparse step: too many compact blocks for one launch");
    sparse_spam_kernel<T, kQ8><<<static_cast<unsigned>(grid), kBlockThreads, 0, stream>>>(
        args, shared, values, maps.m.buckets, maps.v.buckets);
    check_launch();
    std::memset(&args, 0, sizeof(args));
  };
  for (const int i : order) {
    const CudaSparseSpamTensor& t = tensors[i];
    const int64_t blocks = num_blocks(t.compact);
    if (blocks == 0) continue;
    SparseSlot& s = args.slot[args.n_slots++];
    s.param = t.param.data;
    s.grad = t.grad.data;
    s.m = kQ8 ? static_cast<void*>(t.q8.m_codes) : t.exp_avg.data;
    s.v = kQ8 ? static_cast<void*>(t.q8.v_codes) : t.exp_avg_sq.data;
    s.m_absmax = t.q8.m_absmax;
    s.v_absmax = t.q8.v_absmax;
    s.block_starts = t.block_starts;
    s.subset = t.subset;
    s.offset = t.offset;
    s.numel = t.param.numel;
    s.compact = t.compact;
    s.first_block = args.n_blocks;
    s.update_scale = t.update_scale;
    args.n_blocks += blocks;
    if (args.n_slots == kSparseSlots) flush();
  }
  flush();
}

}  // namespace
}  // namespace spam::cuda

namespace spam {

void cuda_sparse_spam_step(const std::vector<CudaSparseSpamTensor>& tensors, const SpamHyper& hyper,
                           const QuantMaps& maps, int64_t* counters, const CudaContext& ctx) {
  if (tensors.empty()) return;
  SPAM_CHECK(counters != nullptr, "counters must be a device buffer");
  for (const CudaSparseSpamTensor& t : tensors) {
    SPAM_CHECK(t.subset != nullptr, "sparse step: every tensor needs its device subset rule");
    SPAM_CHECK(t.compact == 0 || t.block_starts != nullptr,
               "sparse step: every tensor needs its device block starts");
    SPAM_CHECK(t.compact <= t.param.numel, "sparse step: more compact values than elements");
    SPAM_CHECK(t.offset >= 0, "sparse step: offsets must be >= 0");
    if (t.q8.active()) cuda::check_maps(maps);
  }
  cuda::DeviceGuard guard(ctx.device);
  const cudaStream_t stream = cuda::to_stream(ctx.stream);
  const cuda::SparseShared shared{hyper, counters};
  cuda::for_each_kind(tensors, [&](auto tag, bool q8, const std::vector<int>& order) {
    using T = typename decltype(tag)::type;
    if (q8)
      cuda::launch_sparse_group<T, true>(tensors, order, shared, maps, stream);
    else
      cuda::launch_sparse_group<T, false>(tensors, order, shared, maps, stream);
  });
}

}  // namespace spam
