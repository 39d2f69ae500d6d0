// quant8.h — blockwise 8-bit quantisation of optimizer state, one definition for CPU and CUDA.
//
// Format (the numerics of bitsandbytes' and torchao's 8-bit optimizers, so results compare):
//   * blocks of kQuantBlock = 256 consecutive elements that restart at each row of a matrix
//     (BlockRows below; the last block of a row may be partial), one fp32 absmax per block;
//   * a code is an index into a sorted 256-entry map of values in [-1, 1] (signed "dynamic"
//     map, first moment) or [1e-7, 1] (unsigned, second moment); x = map[code] * absmax.
//     The unsigned map has no zero: a tiny v reads back as 1e-7 * absmax, never as 0 under a
//     non-zero m (which would make the step lr * m / eps; spam_lowmem/qmap.py says more).
//
// The maps are built once, in Python (spam_lowmem/qmap.py), and handed to the core as
// buffers, so the reference and the kernels share one definition:
//   values[256]      the sorted map (dequantisation)
//   midpoints[256]   (values[c] + values[c+1]) / 2 for c < 255, then +inf (kept for checks and
//                    the reference; the core's lookup below does not read it)
//   buckets[2][kQuantBuckets] (int32, packed) per sign of x and per bucket of |x| (the float's
//                    exponent and top 8 mantissa bits):
//
//      bit 31 ................ 16 | 15 ............. 0
//      mid: midpoint's low 15 bits | base + 1
//           (mirrored for x < 0),  |
//           0x8000 if none         |
//
//     base = #{midpoints below the bucket}; a bucket is narrower than any gap between
//     midpoints (checked when the map is built), so at most one midpoint lies inside it, and
//     it shares the bucket's sign/exponent/top mantissa bits. Whether x has reached it is one
//     compare of the low 15 bits; for x < 0 both sides are mirrored (0x7fff - bits), so that
//     "reached" reads the same for either sign: code = base + 1 - (mid > low). No midpoint
//     (0x8000 > any low) gives base. One table read per value, no branch.
//
// Tie rule: round to the nearest code; a value exactly on a midpoint goes to the larger code.
// Equivalently code = #{midpoints <= x} (searchsorted(midpoints, x, right=True)).
// NaN, of either sign, gets the last code (255), as searchsorted puts NaN last: a NaN's sign
// bit is not portable (x86 makes inf / inf a negative NaN, CUDA a positive one, and CUDA's
// fp16 -> fp32 conversion drops it), and the code must not depend on it. Values reach the
// code through quantize_value (x / divisor), which takes an infinite x in a block whose absmax
// is inf as +-1, not inf / inf: an infinite moment keeps its sign (its finite neighbours read
// back as NaN, 0 * inf, on the signed map, and as +inf on the unsigned one). So normalised values
// are NaN only in a block whose absmax is NaN; the SIMD runs leave blocks with a NaN or inf absmax
// to the scalar code (isa/quant8_runs.h).
//
//   |x| bits:  s eeeeeeee mmmmmmmm mmmmmmmmmmmmmmm
//                \______ bucket ______/ \_ low 15 _/
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"
#include "half.h"

namespace spam {

constexpr int64_t kQuantBlock = 256;
// Blocks of kQuantBlock covering n elements (the last one may be partial): one absmax each.
SPAM_HD constexpr int64_t num_blocks(int64_t n) { return (n + kQuantBlock - 1) / kQuantBlock; }

// Where the blocks of one tensor's 8-bit moments lie (docs/algorithms.md §13.2). Blocks restart
// at every row of the parameter (dim 0), so that any split of the rows between ranks (FSDP2's
// Shard(0): 129 rows = 65 + 64) cuts between blocks and each shard's state is a slice of the
// whole's. A [3, 600] tensor, row length L = 600:
//
//   row 0:  | block 0: 0..255   | block 1: 256..511   | block 2: 512..599 (88)   |
//   row 1:  | block 3: 600..855 | block 4: 856..1111  | block 5: 1112..1199 (88) |
//   row 2:  | block 6 ...       | block 7 ...         | block 8 ... (88)         |
//   absmax [3, 3]: row r holds blocks 3r .. 3r + 2;  codes [3, 600], element i has code i
//
// The flat layout (1-D tensors, sparse compact arrays) is one row of the whole tensor. A row
// length that is a multiple of kQuantBlock gives the flat blocks, so it is stored as flat
// (rows_of_blocks), and the step loops see exactly the blocks they always did. The binding
// derives the layout from the absmax shape and checks it against numel (convert.h q8_layout);
// the functions below assume a tensor with numel > 0 (so blocks_per_row > 0).
struct BlockRows {
  int64_t row_len = 0;         // elements per row (L)
  int64_t blocks_per_row = 0;  // num_blocks(row_len); the last block of a row may be partial

  // One row of the whole tensor (as flat_blocks and rows_of_blocks make it for 1-D tensors and
  // rows of whole blocks): its blocks are the 256-element pieces of the flattened tensor.
  SPAM_HD bool flat(int64_t numel) const { return row_len >= numel; }
  // Blocks (absmax entries) of a tensor of numel elements laid out this way.
  SPAM_HD int64_t total(int64_t numel) const {
    return row_len > 0 ? numel / row_len * blocks_per_row : 0;
  }
  // First element of block b, and its length (<= kQuantBlock).
  SPAM_HD int64_t block_start(int64_t b) const {
    const int64_t row = b / blocks_per_row;
    return row * row_len + (b - row * blocks_per_row) * kQuantBlock;
  }
  SPAM_HD int64_t block_len(int64_t b) const {
    const int64_t col = (b % blocks_per_row) * kQuantBlock;
    return row_len - col < kQuantBlock ? row_len - col : kQuantBlock;
  }
  // The block holding element i.
  SPAM_HD int64_t block_of(int64_t i) const {
    const int64_t row = i / row_len;
    return row * blocks_per_row + (i - row * row_len) / kQuantBlock;
  }
  // The first block whose start is >= element i (total() when there is none). A worker given
  // the elements [begin, end) processes the blocks whose start lies in them, from
  // first_block_at_or_after(begin) up to first_block_at_or_after(end): consecutive ranges then
  // share no block and miss none, wherever their edges fall (a block may run past end).
  SPAM_HD int64_t first_block_at_or_after(int64_t i) const {
    if (row_len <= 0) return 0;
    const int64_t row = i / row_len;
    const int64_t col = i - row * row_len;
    // col < row_len <= blocks_per_row * kQuantBlock, so this is at most blocks_per_row (the
    // next row's first block)
    return row * blocks_per_row + num_blocks(col);
  }
};

// One row of n elements: the flat layout.
SPAM_HD BlockRows flat_blocks(int64_t n) { return BlockRows{n, num_blocks(n)}; }

// `rows` rows of row_len elements each; stored flat when the rows hold whole blocks (the same
// blocks either way, and the loops' cheapest case).
SPAM_HD BlockRows rows_of_blocks(int64_t rows, int64_t row_len) {
  if (row_len % kQuantBlock == 0) return flat_blocks(rows * row_len);
  return BlockRows{row_len, num_blocks(row_len)};
}

// A walk over consecutive blocks (the CPU loop, and each CUDA warp's stride) without a division
// per block: blocks tile the tensor, so the next one starts where this one ends.
struct BlockWalk {
  int64_t block;  // index into absmax
  int64_t start;  // first element
  int64_t col;    // start's offset in its row
  int len;        // elements, <= kQuantBlock
};

SPAM_HD BlockWalk walk_at(const BlockRows& rows, int64_t b) {
  const int64_t start = rows.block_start(b);
  const int64_t col = (b % rows.blocks_per_row) * kQuantBlock;
  return BlockWalk{b, start, col, static_cast<int>(rows.block_len(b))};
}

SPAM_HD void walk_next(const BlockRows& rows, BlockWalk& w) {
  ++w.block;
  w.start += w.len;
  w.col += w.len;
  if (w.col >= rows.row_len) w.col = 0;
  const int64_t left = rows.row_len - w.col;
  w.len = static_cast<int>(left < kQuantBlock ? left : kQuantBlock);
}

constexpr int kQuantCodes = 256;
// Buckets cover |x| in [2^-24, 1]; everything below 2^-24 shares bucket 0 (all maps have no
// midpoint below 1e-7), everything above 1 (only NaN after normalisation) the last one.
constexpr uint32_t kQuantBucketBase = (127u - 24u) << 8;  // bits(2^-24) >> 15
constexpr int kQuantBuckets = 24 * 256 + 1;               // up to bits(1.0) >> 15

// Tables for CPUs with AVX-512 VBMI (isa/quant8_vbmi.h), built by qmap.py, kQuantSimdBytes
// bytes. VBMI looks up 64 bytes at once in a 128-byte table held in two registers, so these
// tables are bytes, and so small that every lookup stays in registers:
//
//   offset  size  what
//   0       64    int16 shift[32] } for the exponent e of |x| clamped to [96, 127], entry e & 31:
//   64      64    int16 delta[32] } bucket(|x|) = (top16(|x|) >> shift) + delta, top16 = the
//                 float's top 16 bits (exponent and 7 mantissa bits). A binade gets 2^k buckets
//                 (its top k mantissa bits, shift = 7 - k) or, with shift = 15, a single one;
//                 the clamped ends (|x| < 2^-30, and |x| >= 1 with NaN, as the last bucket of
//                 quant_bucket) are single buckets.
//   128     64    int16 negative_or, then padding: bucket(x < 0) = bucket(|x|) | negative_or.
//                 256 for the signed map, whose halves mirror each other (< 256 buckets per
//                 sign, so bit 8 of a bucket is the sign); 511 for the unsigned one, where every
//                 x < 0 has code 0 (the kernels test the sign instead of that bucket).
//   192     512   uint8 base[512]: #{midpoints below the bucket}
//   704     1024  midpoints[255], then NaN (which no x reaches, +inf included), as 4 byte
//                 planes: byte j of entry c at 704 + 256 j + c
//   1728    1024  values[256] as 4 byte planes
//
// Each bucket holds at most one midpoint (checked when the table is built), so
//   code = base[b] + (midpoints[base[b]] <= x)
// — the same code as quantize_code for every x but NaN (which compares false and lands in the
// bucket of 1.0 or of -1.0 by its sign; the SIMD runs never see one, see quantize_value).
constexpr int kQuantSimdBinadeLow = 96;
constexpr int kQuantSimdDeltas = 64;
constexpr int kQuantSimdNegativeOr = 128;
constexpr int kQuantSimdBase = 192;
constexpr int kQuantSimdMidPlanes = 704;
constexpr int kQuantSimdValuePlanes = 1728;
constexpr int kQuantSimdBytes = 2752;

struct QuantMap {
  const float* values;     // [256]
  const float* midpoints;  // [256], last = +inf
  const int32_t* buckets;  // [2 * kQuantBuckets]: x >= 0 first, then x < 0 (int32: AVX2/512
                           // gathers read 32-bit lanes, so a byte table would not vectorise)
  const uint8_t* simd;     // [kQuantSimdBytes], layout above (read by the VBMI build only)
};

SPAM_HD int quant_bucket(float x) {
  const uint32_t key = (float_bits(x) & 0x7fffffffu) >> 15;
  const int64_t b = static_cast<int64_t>(key) - static_cast<int64_t>(kQuantBucketBase);
  return static_cast<int>(b < 0 ? 0 : (b >= kQuantBuckets ? kQuantBuckets - 1 : b));
}

// Code of an already normalised value x (x / absmax), by the tie rule above. Branch-free so
// CPU loops vectorise; isa/quant8_runs.h has the same steps lane-wise for AVX2.
SPAM_HD uint8_t quantize_code(float x, const QuantMap& q) {
  const uint32_t bits = float_bits(x);
  const uint32_t negative = bits >> 31;
  const uint32_t entry =
      static_cast<uint32_t>(q.buckets[negative * kQuantBuckets + quant_bucket(x)]);
  const uint32_t low = (bits ^ (0u - negative)) & 0x7fffu;  // mirrored for x < 0, as the table
  const uint8_t code =
      static_cast<uint8_t>((entry & 0xffffu) - static_cast<uint32_t>((entry >> 16) > low));
  return x != x ? uint8_t{255} : code;  // NaN of either sign: see the tie rule above
}

// The largest finite float: x <= kFloatMax is false for +inf and NaN alike.
constexpr float kFloatMax = 3.40282347e38f;

// The code of x in a block normalised by divisor = quant_divisor(absmax): quantize_code(x /
// divisor), except that an infinite x in a block whose absmax is inf is taken as +-1 (inf / inf
// would be a NaN, whose code forgets the sign). Every requantisation, CPU and CUDA, goes
// through here; the SIMD runs only see finite divisors, where this is x / divisor.
SPAM_HD uint8_t quantize_value(float x, float divisor, const QuantMap& q) {
  const bool both_infinite = static_cast<bool>((fabsf(x) > kFloatMax) & (divisor > kFloatMax));
  return quantize_code(both_infinite ? copysignf(1.0f, x) : x / divisor, q);
}

// The divisor that normalises a block: its absmax, or 1 for an all-zero block (whose values
// are all 0, so x / 1 = 0 and the block never divides 0 by 0).
SPAM_HD float quant_divisor(float absmax) { return absmax > 0.0f ? absmax : 1.0f; }

SPAM_HD float dequantize_code(uint8_t code, float absmax, const QuantMap& q) {
  return q.values[code] * absmax;
}

}  // namespace spam
