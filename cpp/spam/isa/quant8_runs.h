// isa/quant8_runs.h — the 8-bit code lookups of one block, vectorised by hand.
// Included only by cpp/spam/isa/*.cpp (one copy per instruction set).
//
// quant8.h defines one code per value (quantize_code / dequantize_code); these runs apply it to
// a block's worth of values. Both lookups are table reads at data-dependent indices: GCC does
// not emit gathers for them under generic tuning (it judges them unprofitable), and the scalar
// loops cost more than the rest of an 8-bit step. The AVX2 paths below do the same arithmetic,
// lane for lane (same float division, same packed-bucket test), so every ISA build writes the
// same codes (tests/test_quant8.py checks them against a brute-force argmin). The VBMI build
// runs whole 64-value steps with register-held byte tables (quant8_vbmi.h) first.
#pragma once

#include <cstdint>
#include <cstring>

#include "../quant8.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AVX512VBMI__)
#include "quant8_vbmi.h"
#endif

namespace spam {
namespace SPAM_CPU_ISA {
namespace {

#if defined(__AVX2__)
// table[idx[k]] for 8 int32 lanes, by scalar loads. Not vpgatherdd: on Zen 3 a gather
// retires at about half the rate of eight scalar loads (0.59 vs 0.31 ns per lookup, measured
// 2026-12-01), and Intel's microcode since 2023 (Downfall) slowed gathers down as well. The
// indices leave the register as 64-bit pairs (a store and reloads would stall forwarding).
template <typename V>
inline __m256i lookup8(const V* table, __m256i idx) {
  static_assert(sizeof(V) == 4, "32-bit table entries");
  const __m128i lo = _mm256_castsi256_si128(idx), hi = _mm256_extracti128_si256(idx, 1);
  const uint64_t a = static_cast<uint64_t>(_mm_cvtsi128_si64(lo));
  const uint64_t b = static_cast<uint64_t>(_mm_extract_epi64(lo, 1));
  const uint64_t c = static_cast<uint64_t>(_mm_cvtsi128_si64(hi));
  const uint64_t d = static_cast<uint64_t>(_mm_extract_epi64(hi, 1));
  const auto at = [table](uint64_t k) {
    int32_t e;
    std::memcpy(&e, table + static_cast<uint32_t>(k), 4);
    return e;
  };
  return _mm256_setr_epi32(at(a), at(a >> 32), at(b), at(b >> 32), at(c), at(c >> 32), at(d),
                           at(d >> 32));
}

// table[codes[k]] for 8 consecutive byte codes, as floats.
inline __m256 lookup8_codes(const float* table, const uint8_t* codes) {
  uint64_t w;
  std::memcpy(&w, codes, 8);
  const __m128 lo = _mm_setr_ps(table[w & 255], table[(w >> 8) & 255], table[(w >> 16) & 255],
                                table[(w >> 24) & 255]);
  const __m128 hi = _mm_setr_ps(table[(w >> 32) & 255], table[(w >> 40) & 255],
                                table[(w >> 48) & 255], table[w >> 56]);
  return _mm256_set_m128(hi, lo);
}

// Eight codes of x / divisor (quantize_code, lane for lane), as int32 lanes.
inline __m256i quantize8_avx2(__m256 x, __m256 divisor, const int32_t* buckets) {
  const __m256i bits = _mm256_castps_si256(_mm256_div_ps(x, divisor));
  const __m256i negative = _mm256_srai_epi32(bits, 31);  // all ones for x < 0
  // quant_bucket: (|bits| >> 15) - base, clamped to [0, kQuantBuckets - 1]. |bits| >> 15 < 2^17,
  // so the signed 32-bit difference is exact.
  __m256i b =
      _mm256_sub_epi32(_mm256_srli_epi32(_mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff)), 15),
                       _mm256_set1_epi32(static_cast<int>(kQuantBucketBase)));
  b = _mm256_min_epi32(_mm256_max_epi32(b, _mm256_setzero_si256()),
                       _mm256_set1_epi32(kQuantBuckets - 1));
  const __m256i entry = lookup8(
      buckets, _mm256_add_epi32(b, _mm256_and_si256(negative, _mm256_set1_epi32(kQuantBuckets))));
  const __m256i low = _mm256_and_si256(_mm256_xor_si256(bits, negative), _mm256_set1_epi32(0x7fff));
  // code = (base + 1) - (mid > low); cmpgt yields -1 for true. Both sides < 2^16: signed is exact.
  return _mm256_add_epi32(_mm256_and_si256(entry, _mm256_set1_epi32(0xffff)),
                          _mm256_cmpgt_epi32(_mm256_srli_epi32(entry, 16), low));
}
#endif

// codes[i] = quantize_value(x[i], quant_divisor(absmax)) for i < n, absmax being the block's
// (NaN-sticky) max |x|. A block whose absmax is NaN or +inf is left to the scalar code: only
// there does quantize_value differ from x / divisor or meet a NaN (quant8.h), cases the SIMD
// runs do not special-case.
inline void quantize_run(const float* __restrict x, uint8_t* __restrict codes, int n, float absmax,
                         const QuantMap map) {
  const float divisor = quant_divisor(absmax);
  int i = 0;
  if (absmax <= kFloatMax) {  // finite (NaN and +inf fail the test)
#if defined(__AVX512VBMI__)
    i = quantize_run_vbmi(x, codes, n, divisor, map.simd);
#endif
#if defined(__AVX2__)
    const __m256 div = _mm256_set1_ps(divisor);
    // 32 codes per step: 4 x 8 int32 lanes -> packus to 16-bit -> to 8-bit. The packs work per
    // 128-bit half, leaving dwords in the order (a0 b0 c0 d0 | a1 b1 c1 d1) of 4-code groups;
    // one cross-lane permute puts them back in index order.
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (; i + 32 <= n; i += 32) {
      const __m256i a = quantize8_avx2(_mm256_loadu_ps(x + i), div, map.buckets);
      const __m256i b = quantize8_avx2(_mm256_loadu_ps(x + i + 8), div, map.buckets);
      const __m256i c = quantize8_avx2(_mm256_loadu_ps(x + i + 16), div, map.buckets);
      const __m256i d = quantize8_avx2(_mm256_loadu_ps(x + i + 24), div, map.buckets);
      const __m256i packed =
          _mm256_packus_epi16(_mm256_packus_epi32(a, b), _mm256_packus_epi32(c, d));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + i),
                          _mm256_permutevar8x32_epi32(packed, order));
    }
#endif
  }
  for (; i < n; ++i) codes[i] = quantize_value(x[i], divisor, map);
}

// out[i] = dequantize_code(codes[i], absmax) for i < n.
inline void dequantize_run(const uint8_t* __restrict codes, float* __restrict out, int n,
                           float absmax, const QuantMap map) {
  int i = 0;
#if defined(__AVX512VBMI__)
  i = dequantize_run_vbmi(codes, out, n, absmax, map.simd);
#endif
#if defined(__AVX2__)
  const __m256 scale = _mm256_set1_ps(absmax);
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(out + i, _mm256_mul_ps(lookup8_codes(map.values, codes + i), scale));
  }
#endif
  for (; i < n; ++i) out[i] = dequantize_code(codes[i], absmax, map);
}

}  // namespace
}  // namespace SPAM_CPU_ISA
}  // namespace spam
