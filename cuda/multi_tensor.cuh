// multi_tensor.cuh — one launch covers many tensors: each CUDA block owns one fixed-size
// chunk of one tensor, found through a small table passed by value as a kernel argument
// (the multi-tensor idea of apex, written for raw pointers and int64 sizes).
//
// Why kernel arguments and not a device tensor: the table changes with every call that
// changes a pointer, and building it on the device or copying it from pageable host memory
// would cost a sync or an allocation per step. Kernel arguments travel with the launch, are
// ordered on the stream for free and read through the constant cache.
//
// Kernel-argument layout of MultiTensorArgs<Depth = 4, Extra> (SPAM update, Extra = 4 B):
//
//   offset 0      ptr[0][0..T)   void*   parameter of each tensor slot      8 B x T
//                 ptr[1][0..T)   void*   gradient                            8 B x T
//                 ptr[2][0..T)   void*   exp_avg                             8 B x T
//                 ptr[3][0..T)   void*   exp_avg_sq                          8 B x T
//                 numel[0..T)    int64   element count of each slot          8 B x T
//                 extra[0..T)    Extra   per-tensor scalars (scale, index)   sizeof(Extra) x T
//                 block_chunk[0..B) int32  chunk of the tensor block b works on   4 B x B
//                 block_slot[0..B)  uint8  tensor slot of block b               1 B x B
//
// B = kMaxBlocks = 320 and T = as many slots as fit in kArgBudget (3584 B), so the struct
// plus a small call-wide struct (hyper-parameters, scratch pointers; at most kSharedBudget)
// stays within the classic 4 KB kernel-parameter limit on every CUDA version.
// Block b processes elements [block_chunk[b] * kChunk, min(+kChunk, numel[slot])) of
// tensor slot block_slot[b]. All offsets are int64; chunk indices fit int32 up to
// 2^31 * 2^16 = 2^47 elements per tensor.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "common.cuh"

namespace spam::cuda {

constexpr int64_t kChunk = int64_t{1} << 16;  // elements per block: 256 per thread
constexpr int kIlp = 4;                       // elements in flight per thread and array
constexpr int kMaxBlocks = 320;               // table rows per launch
constexpr size_t kArgBudget = 3584;           // bytes for one MultiTensorArgs
constexpr size_t kSharedBudget = 4096 - kArgBudget;

// Tensor slots that fit the budget once the block table is paid for; uint8 slots cap it.
template <int Depth, typename Extra>
constexpr int max_slots() {
  constexpr size_t table = kMaxBlocks * (sizeof(int32_t) + sizeof(uint8_t));
  constexpr size_t per_slot = Depth * sizeof(void*) + sizeof(int64_t) + sizeof(Extra);
  constexpr size_t n = (kArgBudget - table - 8) / per_slot;  // 8: tail padding
  return n > 255 ? 255 : static_cast<int>(n);
}

template <int Depth, typename Extra>
struct MultiTensorArgs {
  static constexpr int kDepth = Depth;
  static constexpr int kSlots = max_slots<Depth, Extra>();
  void* ptr[Depth][kSlots];
  int64_t numel[kSlots];
  Extra extra[kSlots];
  int32_t block_chunk[kMaxBlocks];
  uint8_t block_slot[kMaxBlocks];
};

// The elements one block works on.
struct ChunkRange {
  int slot;
  int64_t chunk;
  int64_t begin, end;
};

#if defined(__CUDACC__)
template <typename Args>
__device__ __forceinline__ ChunkRange chunk_range(const Args& a) {
  ChunkRange r;
  r.slot = a.block_slot[blockIdx.x];
  r.chunk = a.block_chunk[blockIdx.x];
  r.begin = r.chunk * kChunk;
  const int64_t n = a.numel[r.slot];
  r.end = n - r.begin < kChunk ? n : r.begin + kChunk;
  return r;
}
#endif

// Host side: walks the tensors listed in `order` (indices into the caller's list), fills
// slots and table rows, and calls launch(args, n_blocks) whenever the table or the slots run
// out. A tensor whose chunks do not all fit is carried into the next launch in slot 0, so a
// tensor of any size and a list of any length work. Zero-size tensors get no block.
//   numel(i)             -> int64 element count of tensor i
//   fill(args, slot, i)  -> writes ptr[*][slot] and extra[slot] for tensor i
//   launch(args, blocks) -> launches the kernel (by value) and checks the launch
template <typename Args, typename NumelFn, typename FillFn, typename LaunchFn>
void multi_tensor_apply(const std::vector<int>& order, NumelFn&& numel, FillFn&& fill,
                        LaunchFn&& launch) {
  static_assert(sizeof(Args) <= kArgBudget, "multi-tensor kernel arguments exceed the budget");
  Args args;
  std::memset(&args, 0, sizeof(args));
  int slot = 0;
  int blocks = 0;
  for (const int i : order) {
    const int64_t n = numel(i);
    if (n <= 0) continue;
    fill(args, slot, i);
    args.numel[slot] = n;
    const int64_t n_chunks = (n + kChunk - 1) / kChunk;
    SPAM_CHECK(n_chunks <= INT32_MAX, "tensor too large for the chunk table");
    for (int64_t c = 0; c < n_chunks; ++c) {
      args.block_slot[blocks] = static_cast<uint8_t>(slot);
      args.block_chunk[blocks] = static_cast<int32_t>(c);
      ++blocks;
      const bool last_chunk = c + 1 == n_chunks;
      const bool table_full = blocks == kMaxBlocks;
      const bool slots_full = last_chunk && slot + 1 == Args::kSlots;
      if (!table_full && !slots_full) continue;
      launch(args, blocks);
      blocks = 0;
      if (last_chunk) {
        slot = -1;  // this tensor is done; the next one starts at slot 0
      } else {
        // The rest of this tensor goes into the next launch, in slot 0.
        for (int d = 0; d < Args::kDepth; ++d) args.ptr[d][0] = args.ptr[d][slot];
        args.numel[0] = args.numel[slot];
        args.extra[0] = args.extra[slot];
        slot = 0;
      }
    }
    ++slot;
  }
  if (blocks > 0) launch(args, blocks);
}

// Splits `tensors` by storage dtype, preserving order within a dtype, so each group can be
// launched with its own template instantiation (mixed fp32/bf16/fp16 in one call).
template <typename DTypeOf>
std::vector<std::vector<int>> group_by_dtype(int n, DTypeOf&& dtype_of) {
  std::vector<std::vector<int>> groups(3);
  for (int i = 0; i < n; ++i) groups[static_cast<int>(dtype_of(i))].push_back(i);
  return groups;
}

}  // namespace spam::cuda
