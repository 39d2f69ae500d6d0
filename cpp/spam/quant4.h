// quant4.h — scalar rules of 4-bit weight/activation quantisation (docs/algorithms.md §5), shared
// by the CPU loops (quant4_cpu.cpp) and the CUDA kernels (cuda/quant4.cu). Everything here is
// SPAM_HD and branch-light, so the two backends compute the same bits: math in fp32, no FMA
// contraction (both builds disable it), IEEE division, and one rounding rule.
//
// Rounding: round half to even (RNE), the rule of torch.round used by the authors' code.
//
// Formats (one group = `group_size` consecutive elements of the row-major flattened tensor;
// groups may straddle rows, as in the authors' code):
//   int4 weights  asymmetric min-max:  scale = max(max-min, 1e-5)/15,
//                 zero = clamp(-rne(min/scale), 0, 15), q = clamp(rne(w/scale)+zero, 0, 15),
//                 w^ = sat((q - zero)*scale)                                   q in [0, 15]
//   int4 act      symmetric, top-2 |x| kept exact: scale = max(max|rest|, 1e-6),
//                 q = clamp(rne((x*7)/scale), -8, 7), x^ = (q*scale)/7
//   fp4 (9-level) top-2 |x| kept exact, alpha = max(max|rest|, 1e-6), step = alpha/4,
//                 q = clamp(rne(x/step), -4, 4), x^ = q*step      grid {0,±.25,±.5,±.75,±1}·alpha
// "Top-2" ties go to the lower index (the first seen in a forward scan).
//
// Edge rules (the torch reference implements the same ones):
//   * non-finite entries (NaN, +-Inf) of a fake-quantised group pass through unchanged, and the
//     group's statistics (min/max, top-2, max|rest|) are taken over its finite entries only:
//     one overflowed value neither poisons nor rescales the rest of its group. (Packing
//     refuses such groups instead: a code cannot hold them.)
//   * finite data whose plain formula overflows fp32 is computed in an equivalent order that
//     does not: max-min > FLT_MAX gives scale = max/15 - min/15; x*7 or q*scale beyond FLT_MAX
//     gives rne(7*(x/scale)) or q*(scale/7). Where the plain formula is finite it is used, so
//     ordinary data keeps its bits.
//   * sat(): a dequantised int4/fp4 code is clamped to +-FLT_MAX. The rounded zero point can put
//     the top level up to scale/2 beyond the group's range, which for data near FLT_MAX would
//     otherwise round to Inf; NaN passes through sat().
//
// Packed storage shares one dequantisation rule: w = (code - zero) * scale, with zero per
// group for int4 and zero = 4 (implicit) for fp4, whose two outliers per group are stored
// exactly (int16 index within the group + fp32 value) and override their code.
//
// Nibble order (pinned here, docs/design.md T12): element 2i of the flattened tensor lives in the
// LOW nibble of byte i, element 2i+1 in the HIGH nibble.
//
//        byte i:   bit 7 ... 4 | 3 ... 0
//                  [ elem 2i+1 ][ elem 2i ]
//   e.g. codes (1, 2, 15, 0) pack to bytes {0x21, 0x0F}.
#pragma once

#include <cstdint>

#include "common.h"
#include "half.h"

namespace spam::q4 {

enum class Format : int { kInt4 = 0, kFp4 = 1 };

constexpr float kWeightScaleMin = 1e-5f;  // clamp on (max - min) before /15
constexpr float kActScaleMin = 1e-6f;     // clamp on max|rest|
constexpr int kTopK = 2;                  // outliers kept exact per group (act int4, fp4)
constexpr int kFp4Zero = 4;               // fp4 codes 0..8 stand for -4..4 steps
constexpr float kFloatMax = 3.40282346638528859812e+38f;

// ------------------------------------------------------------------ rounding and clamps
// Round half to even. |x| >= 2^23 is already an integer; below that, adding 2^23 makes the
// FPU round the fraction away under the default mode (RNE) and subtracting it back is exact.
// Branch-free so the CPU loops vectorise. NaN stays NaN, -0 stays -0 (copysign).
SPAM_HD float rne(float x) {
#if defined(__CUDA_ARCH__)
  return rintf(x);
#else
  const float a = x < 0.f ? -x : x;
  const float r = (a + 8388608.f) - 8388608.f;
  const float s = bits_float((float_bits(r) & 0x7fffffffu) | (float_bits(x) & 0x80000000u));
  return a < 8388608.f ? s : x;
#endif
}

SPAM_HD float floor_f(float x) {
#if defined(__CUDA_ARCH__)
  return floorf(x);
#else
  const float r = rne(x);
  return r > x ? r - 1.f : r;  // exact for |x| < 2^23; larger values are integers already
#endif
}

// select(c, a, b) = c ? a : b through bit masks: no branch, so a data-dependent condition
// (a stochastic-rounding coin flip, a clamp that bites at random) costs no misprediction.
SPAM_HD float select(bool c, float a, float b) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return bits_float((float_bits(a) & m) | (float_bits(b) & ~m));
}

// Clamp in which NaN falls through unchanged (fminf/fmaxf would replace it by a bound).
SPAM_HD float clampf(float v, float lo, float hi) {
  return select(v < lo, lo, select(v > hi, hi, v));
}
SPAM_HD float maxf(float a, float b) { return a > b ? a : b; }
SPAM_HD float minf(float a, float b) { return a < b ? a : b; }
SPAM_HD float absf(float x) { return bits_float(float_bits(x) & 0x7fffffffu); }
SPAM_HD bool finite(float x) { return (float_bits(x) & 0x7f800000u) != 0x7f800000u; }

// ------------------------------------------------------------------ int4 weights (RTN)
struct Int4Grid {
  float scale;
  float zero;  // an integer in [0, 15], kept as float for the arithmetic
};

// lo, hi: min and max of the group's finite entries. Two finite values of opposite sign can be
// more than FLT_MAX apart; then (hi - lo)/15 would be Inf and every output NaN, so the scale is
// taken as hi/15 - lo/15 (<= 2*FLT_MAX/15, finite). Above 1e-5 the clamp cannot bite there.
SPAM_HD Int4Grid int4_weight_grid(float lo, float hi) {
  const float range = hi - lo;
  const float scale = finite(range) ? maxf(range, kWeightScaleMin) / 15.f : hi / 15.f - lo / 15.f;
  const float zero = clampf(-rne(lo / scale), 0.f, 15.f);
  return Int4Grid{scale, zero};
}

SPAM_HD float int4_weight_code(float w, Int4Grid g) {
  return clampf(rne(w / g.scale) + g.zero, 0.f, 15.f);
}

// Saturating (sat() in the header comment, "Edge rules").
SPAM_HD float int4_dequant(float code, float zero, float scale) {
  return clampf((code - zero) * scale, -kFloatMax, kFloatMax);
}

// Fake-quantised int4 weight element; non-finite entries pass through.
SPAM_HD float int4_weight_fake(float w, Int4Grid g) {
  return finite(w) ? int4_dequant(int4_weight_code(w, g), g.zero, g.scale) : w;
}

// ------------------------------------------------------------------ int4 activations
SPAM_HD float act_scale(float rest_absmax) { return maxf(rest_absmax, kActScaleMin); }
// x*7 overflows for |x| > FLT_MAX/7 although x/scale is in [-1, 1]: the reordered forms are
// used only where the plain one is not finite ("Edge rules"). Non-finite x passes through.
SPAM_HD float int4_act_fake(float x, float scale) {
  const float x7 = x * 7.f;
  const float q = clampf(rne(finite(x7) ? x7 / scale : 7.f * (x / scale)), -8.f, 7.f);
  const float qs = q * scale;
  const float r = finite(qs) ? qs / 7.f : q * (scale / 7.f);
  return finite(x) ? r : x;
}

// ------------------------------------------------------------------ fp4 (9-level grid)
SPAM_HD float fp4_step(float rest_absmax) { return maxf(rest_absmax, kActScaleMin) * 0.25f; }
SPAM_HD float fp4_level(float x, float step) { return clampf(rne(x / step), -4.f, 4.f); }
SPAM_HD float fp4_fake(float x, float step) { return finite(x) ? fp4_level(x, step) * step : x; }

// ------------------------------------------------------------------ top-2 selection
// Running top-3 of |x| in one forward scan: indices of the two largest (the outliers kept
// exact) and the third-largest magnitude (= max|rest|). Strict '>' keeps the earlier index
// on ties, so the scan order defines the tie rule. Non-finite entries are never chosen nor
// counted in max|rest| ("Edge rules"): push key(x), which is -1 (below every |x|) for them.
struct Top3 {
  float v0 = -1.f, v1 = -1.f, v2 = -1.f;  // magnitudes, v0 >= v1 >= v2; -1 = empty
  int64_t i0 = -1, i1 = -1;

  SPAM_HD static float key(float x) { return finite(x) ? absf(x) : -1.f; }

  SPAM_HD void push(float a, int64_t i) {
    if (a > v0) {
      v2 = v1;
      v1 = v0;
      i1 = i0;
      v0 = a;
      i0 = i;
    } else if (a > v1) {
      v2 = v1;
      v1 = a;
      i1 = i;
    } else if (a > v2) {
      v2 = a;
    }
  }
  // Order used when merging partial results (CUDA): larger magnitude first, then lower index.
  SPAM_HD static bool before(float a, int64_t ia, float b, int64_t ib) {
    return a > b || (a == b && ia >= 0 && (ib < 0 || ia < ib));
  }
  SPAM_HD float rest_max() const { return v2 < 0.f ? 0.f : v2; }
  SPAM_HD bool is_outlier(int64_t i) const { return i == i0 || i == i1; }
};

// ------------------------------------------------------------------ nibbles
SPAM_HD uint8_t pack_nibbles(uint32_t even_code, uint32_t odd_code) {
  return static_cast<uint8_t>((even_code & 0xfu) | ((odd_code & 0xfu) << 4));
}
SPAM_HD uint32_t nibble(const uint8_t* codes, int64_t i) {
  return (codes[i >> 1] >> ((i & 1) * 4)) & 0xfu;
}

// The packed form of one weight of `numel` elements in numel/group groups (device or host
// pointers). Buffer layout and sizes: quant4_ops.h.
struct Packed {
  uint8_t* codes = nullptr;        // [numel/2]
  float* scale = nullptr;          // [groups]   int4: scale; fp4: step = alpha/4
  uint8_t* zero = nullptr;         // [groups]   int4 only
  int16_t* outlier_idx = nullptr;  // [groups*2] fp4 only: position within the group
  float* outlier_val = nullptr;    // [groups*2] fp4 only: exact value
};

// Exact value of element j of group g as stored (what unpack produces before any rounding
// to the output dtype).
SPAM_HD float packed_value(const Packed& p, Format fmt, int64_t group, int64_t g, int64_t j) {
  const float code = static_cast<float>(nibble(p.codes, g * group + j));
  if (fmt == Format::kInt4) return int4_dequant(code, static_cast<float>(p.zero[g]), p.scale[g]);
  if (j == p.outlier_idx[2 * g + 1]) return p.outlier_val[2 * g + 1];  // unpack writes i1 last
  if (j == p.outlier_idx[2 * g]) return p.outlier_val[2 * g];
  return int4_dequant(code, static_cast<float>(kFp4Zero), p.scale[g]);
}

// What the stochastic re-quantisation rounds: the updated working copy w (dtype T). A bf16 or
// fp16 working copy was materialised as round_T(old), so the target is old + (w - round_T(old)):
// the optimizer's change added to the exact stored value. An element the optimizer did not
// touch then comes back exactly (no re-rounding noise from the copy's own rounding error).
// For fp32 copies the target is w itself.
template <typename T>
SPAM_HD float sr_target(float w, float old) {
  T t;
  Storage<T>::store(&t, 0, old);
  return old + (w - Storage<T>::load(&t, 0));
}
template <>
SPAM_HD float sr_target<float>(float w, float) {
  return w;
}

// ------------------------------------------------------------------ counter-based RNG
// splitmix64 finaliser: a bijective 64-bit mixer. The uniform for element i of a requant
// call is a pure function of (seed, step, i), so CPU, CUDA and the torch reference draw the
// same numbers in any order and any thread layout.
SPAM_HD uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
SPAM_HD uint64_t sr_key(uint64_t seed, uint64_t step) { return mix64(seed ^ mix64(step)); }
// 24-bit uniform in [0, 1): exact in fp32.
SPAM_HD float sr_uniform(uint64_t key, int64_t i) {
  return static_cast<float>(static_cast<uint32_t>(mix64(key ^ static_cast<uint64_t>(i)) >> 40)) *
         5.9604644775390625e-08f;
}
// Values this close to an integer (in levels) count as on the lattice: a weight the optimizer
// did not move comes back from dequantise/divide within ~2^-18 of its integer code (fp32
// rounding of (code-zero)*scale/scale), and must not be re-rounded by chance. The bias this
// snap allows (< 2^-16 of a step) is far below any statistical resolution.
constexpr float kLevelTol = 1.52587890625e-05f;  // 2^-16

// Stochastic rounding: floor(v) + [u < frac(v)]. frac is exact (|v| < 2^23), so
// P(round up) = frac up to the 2^-24 resolution of u: E[result] = v.
// Branch-free (select): the "round up" test is a coin flip.
SPAM_HD float sr_round(float v, float u) {
  const float r = rne(v);
  const float f = floor_f(v);
  const float up = bits_float(0x3f800000u & (0u - static_cast<uint32_t>(u < v - f)));  // 1.f or 0.f
  return select(absf(v - r) <= kLevelTol, r, f + up);
}

// ------------------------------------------------------------------ requant grid choice
// After an optimizer step the packed weights are re-quantised with stochastic rounding. To
// keep weights the optimizer did not move exactly where they were (re-gridding every step
// would add fresh rounding noise to every weight and random-walk them away), a group's scale
// only changes by powers of two: the lattice k*scale of the old grid is a subset of the
// lattice of any finer grid scale/2^e, so old values stay exactly representable, and the int4
// window (the 16 lattice points from -zero to 15-zero) can slide by changing `zero` for free.
//   grow:   double the scale until every value of the group fits the window (no clamping,
//           which is what makes the rounding unbiased);
//   shrink: halve it (one octave per call) when the values would still leave >= 4 spare
//           levels in the finer window: hysteresis, so a group does not flip every step.
constexpr int kMaxScaleMoves = 320;  // more than the fp32 exponent range: always terminates
constexpr float kInt4MinScale = kWeightScaleMin / 15.f;
constexpr float kFp4MinStep = kActScaleMin * 0.25f;

// Window of integer zero points that cover [lo, hi] (lo <= 0 <= hi) at `scale`.
// The same tolerance keeps a group whose extreme weights sit exactly on the window's edge
// from counting as "outside" because of that rounding.
SPAM_HD void int4_zero_range(float lo, float hi, float scale, float* zlo, float* zhi) {
  *zlo = -floor_f(lo / scale + kLevelTol);  // ceil(-lo/scale - tol)
  *zhi = floor_f((15.f - hi / scale) + kLevelTol);
}

// Chooses the new (scale, zero) of an int4 group from the old grid and the group's new
// range [lo, hi]; lo and hi finite.
SPAM_HD Int4Grid int4_requant_grid(float old_scale, float old_zero, float lo, float hi) {
  lo = minf(lo, 0.f);
  hi = maxf(hi, 0.f);
  float s = (old_scale > 0.f && finite(old_scale)) ? old_scale : kInt4MinScale;
  float zlo, zhi;
  int moves = 0;
  int4_zero_range(lo, hi, s, &zlo, &zhi);
  while (!(zlo <= zhi) && moves++ < kMaxScaleMoves) {
    s *= 2.f;
    int4_zero_range(lo, hi, s, &zlo, &zhi);
  }
  bool same = s == old_scale;
  if (same && s * 0.5f >= kInt4MinScale) {
    float hlo, hhi;
    int4_zero_range(lo, hi, s * 0.5f, &hlo, &hhi);
    if (hhi - hlo >= 4.f) {
      s *= 0.5f;
      zlo = hlo;
      zhi = hhi;
      same = false;
    }
  }
  zlo = clampf(zlo, 0.f, 15.f);
  zhi = clampf(zhi, 0.f, 15.f);
  const float z =
      (same && old_zero >= zlo && old_zero <= zhi) ? old_zero : floor_f((zlo + zhi) * 0.5f);
  return Int4Grid{s, z};
}

// fp4: the window is symmetric, [-4, 4] steps; `rest` = max|x| over the non-outliers.
SPAM_HD float fp4_requant_step(float old_step, float rest) {
  float s = (old_step > 0.f && finite(old_step)) ? old_step : kFp4MinStep;
  int moves = 0;
  while (!(rest / s <= 4.f) && moves++ < kMaxScaleMoves) s *= 2.f;
  if (s == old_step && s * 0.5f >= kFp4MinStep && rest / (s * 0.5f) <= 3.f) s *= 0.5f;
  return s;
}

SPAM_HD float int4_sr_code(float w, Int4Grid g, float u) {
  return clampf(sr_round(w / g.scale + g.zero, u), 0.f, 15.f);
}
SPAM_HD float fp4_sr_level(float w, float step, float u) {
  return clampf(sr_round(w / step, u), -4.f, 4.f);
}

}  // namespace spam::q4
