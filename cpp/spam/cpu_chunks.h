// cpu_chunks.h — split a list of tensors into fixed-size chunks so one OpenMP loop
// balances a group whose tensors range from 512 to 16M elements.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "common.h"
#include "dtype_dispatch.h"  // dispatch_dtype: CPU loops over chunks dispatch on dtype

namespace spam {

// 16Ki elements: 64 KiB of fp32 per buffer, large enough to amortise scheduling and
// small enough that a 2-core machine splits even a single 512x512 matrix.
constexpr int64_t kCpuChunk = int64_t{1} << 14;
// A group smaller than one chunk runs on the calling thread: waking an OpenMP team costs
// more than stepping 16Ki elements, and far more when the machine is oversubscribed.

// Below this many elements in a whole call the work stays on the calling thread.
constexpr int64_t kCpuParallelMin = int64_t{1} << 16;

struct Chunk {
  int32_t tensor;  // index into the caller's tensor list
  int64_t begin, end;
};

struct ChunkPlan {
  std::vector<Chunk> chunks;
  bool parallel;  // worth waking the OpenMP team
};

// `aligns` (optional, one per tensor, >= 1): chunk boundaries of tensor t fall on multiples
// of aligns[t] (packed 4-bit weights are stepped in whole quantisation groups); the chunk
// length is kCpuChunk rounded up to such a multiple.
inline ChunkPlan make_chunks(const std::vector<int64_t>& numels,
                             const std::vector<int64_t>* aligns = nullptr) {
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (int64_t n : numels) total += n;
  for (size_t t = 0; t < numels.size(); ++t) {
    const int64_t a = aligns ? (*aligns)[t] : 1;
    const int64_t len = (kCpuChunk + a - 1) / a * a;
    for (int64_t b = 0; b < numels[t]; b += len)
      chunks.push_back(
          Chunk{static_cast<int32_t>(t), b, b + len < numels[t] ? b + len : numels[t]});
  }
  return ChunkPlan{std::move(chunks), total >= kCpuParallelMin};
}

}  // namespace spam
