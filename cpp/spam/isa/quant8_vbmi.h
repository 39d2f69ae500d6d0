// isa/quant8_vbmi.h — the 8-bit code lookups of a block with AVX-512 VBMI, 64 values at a time.
// Included by quant8_runs.h in the build compiled with -mavx512vbmi (Cannon Lake, Ice Lake,
// Zen 4 and later).
//
// Why: the AVX2 runs read each code's table entry with a scalar load (vpgatherdd is no faster),
// about 1 ns per value for dequantise + requantise of m and v — most of an 8-bit step. VBMI's
// vpermt2b looks up 64 bytes at once in a 128-byte table held in two registers, so with the
// tables cut into bytes (quant8.h "Tables for CPUs with AVX-512 VBMI") no lookup touches memory.
//
// Byte order. Four byte planes P0..P3 (byte j of 64 fp32 entries) become 16-lane dwords by
// unpacking, and the unpacks interleave inside 128-bit lanes. So the 64 indices are held
// transposed, in 4x4 groups of 4 bytes: value n = 16 q + 4 L + i sits at byte 16 L + 4 q + i,
//
//   natural  | q0: 0..15        | q1: 16..31       | q2: 32..47       | q3: 48..63       |
//   held     | 0-3 16-19 32-35 48-51 | 4-7 20-23 36-39 52-55 | 8-11 ... | 12-15 ... 60-63 |
//             \____ 128-bit lane L = 0 ____/
//
// and then unpack_lo/hi_epi8 followed by unpack_lo/hi_epi16 yield the dwords of q = 0..3 in
// natural order. The transpose is its own inverse: one vpermb each way.
//
// Every function here writes exactly what the scalar quantize_code / dequantize_code write
// (tests/test_cpu_isa.py compares the builds; tests/test_quant8.py checks the tables).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "../quant8.h"

namespace spam {
namespace SPAM_CPU_ISA {
namespace {

constexpr int kVbmiRun = 64;  // values per step of the loops below

// The byte selectors, built at compile time (a loop filling them per call costs more than a
// block's lookups):
//   transpose[k]: the natural index held at byte k (and vice versa);
//   high_words[j] (vpermt2w): the top 16 bits of the dwords of (a, b) in natural order, j < 16
//            from a, then b;
//   pack_words[k]: vpermt2b selector taking the low byte of words (q0 q1 | q2 q3), natural
//            order in two registers, to transposed byte k.
struct VbmiSelectors {
  alignas(64) uint8_t transpose[64];
  alignas(64) uint16_t high_words[32];
  alignas(64) uint8_t pack_words[64];
};

constexpr VbmiSelectors make_vbmi_selectors() {
  VbmiSelectors s{};
  for (int q = 0; q < 4; ++q)
    for (int l = 0; l < 4; ++l)
      for (int i = 0; i < 4; ++i) {
        s.transpose[16 * l + 4 * q + i] = static_cast<uint8_t>(16 * q + 4 * l + i);
        s.pack_words[16 * l + 4 * q + i] =
            static_cast<uint8_t>(64 * (q >> 1) + 2 * (16 * (q & 1) + 4 * l + i));
      }
  for (int j = 0; j < 32; ++j) s.high_words[j] = static_cast<uint16_t>(2 * j + 1);
  return s;
}

inline constexpr VbmiSelectors kVbmiSelectors = make_vbmi_selectors();

inline __m512i vbmi_load(const void* selector) { return _mm512_load_si512(selector); }
inline __m512i vbmi_transpose() { return vbmi_load(kVbmiSelectors.transpose); }

// Four 16-lane masks (natural order, q = 0..3) as one 64-lane mask in transposed order: the
// 16 bits of q go to bits 16 L + 4 q + i. pdep runs on the integer ports, beside the shuffles.
inline __mmask64 vbmi_transpose_masks(__mmask16 m0, __mmask16 m1, __mmask16 m2, __mmask16 m3) {
  constexpr uint64_t kGroups = 0x000F000F000F000Full;
  return _pdep_u64(m0, kGroups) | _pdep_u64(m1, kGroups << 4) | _pdep_u64(m2, kGroups << 8) |
         _pdep_u64(m3, kGroups << 12);
}

// A 256-entry table of 32-bit values as 4 byte planes, each in 4 registers.
struct BytePlanes {
  __m512i part[4][4];
  explicit BytePlanes(const uint8_t* planes) {
    for (int j = 0; j < 4; ++j)
      for (int k = 0; k < 4; ++k) part[j][k] = _mm512_loadu_si512(planes + 256 * j + 64 * k);
  }
  // 256-entry byte lookup of plane j: bit 7 of each index picks one of two 128-entry halves.
  __m512i plane(int j, __m512i idx, __mmask64 upper_half) const {
    return _mm512_mask_blend_epi8(upper_half, _mm512_permutex2var_epi8(part[j][0], idx, part[j][1]),
                                  _mm512_permutex2var_epi8(part[j][2], idx, part[j][3]));
  }
  // The entries at 64 transposed byte indices, as 4 x 16 dwords in natural order.
  void lookup(__m512i idx, __m512i out[4]) const {
    const __mmask64 upper = _mm512_movepi8_mask(idx);
    const __m512i p0 = plane(0, idx, upper), p1 = plane(1, idx, upper);
    const __m512i p2 = plane(2, idx, upper), p3 = plane(3, idx, upper);
    const __m512i w0 = _mm512_unpacklo_epi8(p0, p1), w1 = _mm512_unpackhi_epi8(p0, p1);
    const __m512i w2 = _mm512_unpacklo_epi8(p2, p3), w3 = _mm512_unpackhi_epi8(p2, p3);
    out[0] = _mm512_unpacklo_epi16(w0, w2);
    out[1] = _mm512_unpackhi_epi16(w0, w2);
    out[2] = _mm512_unpacklo_epi16(w1, w3);
    out[3] = _mm512_unpackhi_epi16(w1, w3);
  }
};

// out[i] = values[codes[i]] * absmax for the first n / 64 * 64 values; returns that count.
inline int dequantize_run_vbmi(const uint8_t* __restrict codes, float* __restrict out, int n,
                               float absmax, const uint8_t* simd) {
  const BytePlanes values(simd + kQuantSimdValuePlanes);
  const __m512i transpose = vbmi_transpose();
  const __m512 scale = _mm512_set1_ps(absmax);
  int i = 0;
  for (; i + kVbmiRun <= n; i += kVbmiRun) {
    __m512i v[4];
    values.lookup(_mm512_permutexvar_epi8(transpose, _mm512_loadu_si512(codes + i)), v);
    for (int q = 0; q < 4; ++q)
      _mm512_storeu_ps(out + i + 16 * q, _mm512_mul_ps(_mm512_castsi512_ps(v[q]), scale));
  }
  return i;
}

// The requantisation tables of one map, loaded into registers once per block.
template <bool kSigned>
struct VbmiQuantizer {
  BytePlanes midpoints;
  __m512i base_table[8];
  __m512i shifts, deltas, transpose, high_words, pack_words;

  explicit VbmiQuantizer(const uint8_t* simd)
      : midpoints(simd + kQuantSimdMidPlanes),
        shifts(_mm512_loadu_si512(simd)),
        deltas(_mm512_loadu_si512(simd + kQuantSimdDeltas)),
        transpose(vbmi_transpose()),
        high_words(vbmi_load(kVbmiSelectors.high_words)),
        pack_words(vbmi_load(kVbmiSelectors.pack_words)) {
    for (int k = 0; k < 8; ++k) base_table[k] = _mm512_loadu_si512(simd + kQuantSimdBase + 64 * k);
  }

  // The codes of 64 normalised values xn (4 x 16, natural order), transposed (see the top of
  // this file); mid[q] receives midpoints[base] of each lane, the one midpoint compared.
  __m512i codes(const __m512 xn[4], __m512i mid[4]) const {
    // Buckets (quant8.h) need only the top 16 bits of x: 32 lanes per register. pair 0 holds
    // q0 q1, pair 1 q2 q3, in natural order. e = clamp(exponent, 96, 127) (x * (1 / absmax)
    // may exceed 1 by a rounding step; blocks with a NaN or inf absmax never come here,
    // quantize_run); vpermw reads e & 31.
    __m512i bucket[2];
    __mmask32 negative[2], high[2];  // bit 8 of a bucket, which the byte lookups take as a mask
    for (int h = 0; h < 2; ++h) {
      const __m512i top = _mm512_permutex2var_epi16(_mm512_castps_si512(xn[2 * h]), high_words,
                                                    _mm512_castps_si512(xn[2 * h + 1]));
      const __m512i magnitude = _mm512_and_si512(top, _mm512_set1_epi16(0x7fff));
      const __m512i e = _mm512_min_epi16(
          _mm512_max_epi16(_mm512_srli_epi16(magnitude, 7), _mm512_set1_epi16(kQuantSimdBinadeLow)),
          _mm512_set1_epi16(127));
      bucket[h] =
          _mm512_add_epi16(_mm512_srlv_epi16(magnitude, _mm512_permutexvar_epi16(e, shifts)),
                           _mm512_permutexvar_epi16(e, deltas));
      negative[h] = _mm512_movepi16_mask(top);
      high[h] = kSigned ? negative[h] : _mm512_test_epi16_mask(bucket[h], _mm512_set1_epi16(256));
    }
    // Low bytes of the 64 buckets, transposed; then base[bucket] over 512 entries (bit 7 and
    // bit 8 select among four 128-entry quarters).
    const __m512i low = _mm512_permutex2var_epi8(bucket[0], pack_words, bucket[1]);
    const __mmask64 bit7 = _mm512_movepi8_mask(low);
    const __mmask64 bit8 = vbmi_transpose_masks(high[0], high[0] >> 16, high[1], high[1] >> 16);
    const __m512i lower =
        _mm512_mask_blend_epi8(bit7, _mm512_permutex2var_epi8(base_table[0], low, base_table[1]),
                               _mm512_permutex2var_epi8(base_table[2], low, base_table[3]));
    const __m512i upper =
        _mm512_mask_blend_epi8(bit7, _mm512_permutex2var_epi8(base_table[4], low, base_table[5]),
                               _mm512_permutex2var_epi8(base_table[6], low, base_table[7]));
    const __m512i base = _mm512_mask_blend_epi8(bit8, lower, upper);
    // code = base + (midpoints[base] <= x); a NaN x compares false.
    midpoints.lookup(base, mid);
    const __mmask64 reached =
        vbmi_transpose_masks(_mm512_cmp_ps_mask(_mm512_castsi512_ps(mid[0]), xn[0], _CMP_LE_OQ),
                             _mm512_cmp_ps_mask(_mm512_castsi512_ps(mid[1]), xn[1], _CMP_LE_OQ),
                             _mm512_cmp_ps_mask(_mm512_castsi512_ps(mid[2]), xn[2], _CMP_LE_OQ),
                             _mm512_cmp_ps_mask(_mm512_castsi512_ps(mid[3]), xn[3], _CMP_LE_OQ));
    __m512i code = _mm512_mask_sub_epi8(base, reached, base, _mm512_set1_epi8(-1));
    if (!kSigned)  // x < 0 (only -0.0 or a NaN in practice): code 0, below every midpoint
      code = _mm512_maskz_mov_epi8(
          ~vbmi_transpose_masks(negative[0], negative[0] >> 16, negative[1], negative[1] >> 16),
          code);
    return code;
  }
};

// Lanes where x * (1 / d) may get another code than x / d. With r = 1 / d rounded to the
// nearest float, x * r is within 2 float steps (ulps, counted as bit patterns) of the
// quotient: two roundings of relative error <= 2^-24 each. The codes differ only where a
// midpoint lies within 2 steps of x * r, and the one midpoint that can is the one the lookup
// compared (mid): qmap._check_edge_margins asserts that every other midpoint keeps more than
// 8 steps away from the edges of x's bucket. A margin of 4 steps is tested.
inline bool vbmi_near_decision(const __m512 xn[4], const __m512i mid[4]) {
  __mmask16 near = 0;
  for (int q = 0; q < 4; ++q) {
    const __m512i gap = _mm512_abs_epi32(_mm512_sub_epi32(_mm512_castps_si512(xn[q]), mid[q]));
    near |= _mm512_cmple_epu32_mask(gap, _mm512_set1_epi32(4));
  }
  return near != 0;
}

// A block's divisor as the quantiser takes it. A division costs ~9 cycles per 16 lanes on the
// one divider of Zen 4, which the update's sqrt and division need too, so x is multiplied by
// 1 / divisor, and the rare 64 values with a lane near a decision (vbmi_near_decision) are
// divided after all: the codes are those of the quotient, bit for bit. A divisor whose
// reciprocal is not a normal float (never an 8-bit moment's absmax in practice) always divides.
struct VbmiDivisor {
  __m512 divisor, reciprocal;
  bool multiply;
  explicit VbmiDivisor(float d)
      : divisor(_mm512_set1_ps(d)),
        reciprocal(_mm512_set1_ps(1.0f / d)),
        multiply(d >= 0x1p-125f && d <= 0x1p125f) {}
};

// codes[0..64) = quantize_code(x[i] / divisor).
template <bool kSigned>
inline void quantize64_vbmi(const VbmiQuantizer<kSigned>& quantizer, const float* __restrict x,
                            uint8_t* __restrict codes, const VbmiDivisor& d) {
  __m512 xn[4];
  __m512i mid[4];
  __m512i code;
  const auto divide = [&] {
    for (int q = 0; q < 4; ++q) xn[q] = _mm512_div_ps(_mm512_loadu_ps(x + 16 * q), d.divisor);
    code = quantizer.codes(xn, mid);
  };
  if (d.multiply) {
    for (int q = 0; q < 4; ++q) xn[q] = _mm512_mul_ps(_mm512_loadu_ps(x + 16 * q), d.reciprocal);
    code = quantizer.codes(xn, mid);
    if (__builtin_expect(vbmi_near_decision(xn, mid), 0)) divide();
  } else {
    divide();
  }
  _mm512_storeu_si512(codes, _mm512_permutexvar_epi8(quantizer.transpose, code));
}

// codes[i] = quantize_code(x[i] / divisor) for the first n / 64 * 64 values; returns that count.
// kSigned: the map's negative buckets are bucket(|x|) + 256, so bit 8 of a bucket is the sign;
// otherwise (the unsigned map) buckets reach 511 and every x < 0 gets code 0.
template <bool kSigned>
inline int quantize_run_vbmi(const float* __restrict x, uint8_t* __restrict codes, int n,
                             float divisor, const uint8_t* simd) {
  const VbmiQuantizer<kSigned> quantizer(simd);
  const VbmiDivisor d(divisor);
  int i = 0;
  for (; i + kVbmiRun <= n; i += kVbmiRun) quantize64_vbmi(quantizer, x + i, codes + i, d);
  return i;
}

inline int quantize_run_vbmi(const float* __restrict x, uint8_t* __restrict codes, int n,
                             float divisor, const uint8_t* simd) {
  int16_t negative_or;
  std::memcpy(&negative_or, simd + kQuantSimdNegativeOr, sizeof negative_or);
  const bool is_signed = negative_or == 256;
  return is_signed ? quantize_run_vbmi<true>(x, codes, n, divisor, simd)
                   : quantize_run_vbmi<false>(x, codes, n, divisor, simd);
}

}  // namespace
}  // namespace SPAM_CPU_ISA
}  // namespace spam
