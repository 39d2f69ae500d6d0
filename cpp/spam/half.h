// half.h — 16-bit float storage types and their fp32 conversions, for host and device.
//
// bf16: the upper 16 bits of an IEEE fp32.  fp16: IEEE binary16.
// float -> 16-bit rounds to nearest, ties to even (the rounding torch's .to() uses),
// so a state written by the core equals the state torch would write from the same fp32.
#pragma once

#include <cstdint>
#include <cstring>

#include "common.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace spam {

struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};

SPAM_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  return __builtin_bit_cast(uint32_t, f);  // a register move; memcpy here can defeat vectorising
#endif
}

SPAM_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  return __builtin_bit_cast(float, u);
#endif
}

SPAM_HD float to_float(bf16_t h) { return bits_float(static_cast<uint32_t>(h.bits) << 16); }

SPAM_HD bf16_t to_bf16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u)
    return bf16_t{static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet NaN
  const uint32_t rounding_bias = 0x7fffu + ((u >> 16) & 1u);  // ties to even
  return bf16_t{static_cast<uint16_t>((u + rounding_bias) >> 16)};
}

// The host fp16 conversions compute every case and select (no branches), so loops that
// load or store fp16 still auto-vectorise.
SPAM_HD float to_float(f16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h.bits));
#else
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t exp = (h.bits >> 10) & 0x1fu;
  const uint32_t mant = h.bits & 0x3ffu;
  const uint32_t normal = sign | ((exp + 112u) << 23) | (mant << 13);
  const uint32_t inf_nan = sign | 0x7f800000u | (mant << 13);
  // subnormal or zero: value = mant * 2^-24, exact in fp32
  const uint32_t tiny = sign | float_bits(static_cast<float>(mant) * 5.9604644775390625e-08f);
  return bits_float(exp == 0x1fu ? inf_nan : (exp == 0 ? tiny : normal));
#endif
}

SPAM_HD f16_t to_f16(float f) {
#if defined(__CUDA_ARCH__)
  return f16_t{__half_as_ushort(__float2half_rn(f))};
#else
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  // normal result: rebias the exponent (-112 << 23) and round to nearest even
  const uint32_t normal = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;
  // subnormal result: adding 0.5f (2^-1) makes the FPU round away the low bits, ties to even
  const uint32_t tiny = float_bits(bits_float(a) + 0.5f) - 0x3f000000u;
  const uint32_t inf_nan = a > 0x7f800000u ? 0x7e00u : 0x7c00u;  // >= 65536 rounds to inf
  const uint32_t r = a >= 0x47800000u ? inf_nan : (a < 0x38800000u ? tiny : normal);
  return f16_t{static_cast<uint16_t>(sign | r)};
#endif
}

// Typed load/store used by every kernel: storage type T, arithmetic in fp32.
template <typename T>
struct Storage;
template <>
struct Storage<float> {
  SPAM_HD static float load(const float* p, int64_t i) { return p[i]; }
  SPAM_HD static void store(float* p, int64_t i, float v) { p[i] = v; }
};
template <>
struct Storage<bf16_t> {
  SPAM_HD static float load(const bf16_t* p, int64_t i) { return to_float(p[i]); }
  SPAM_HD static void store(bf16_t* p, int64_t i, float v) { p[i] = to_bf16(v); }
};
template <>
struct Storage<f16_t> {
  SPAM_HD static float load(const f16_t* p, int64_t i) { return to_float(p[i]); }
  SPAM_HD static void store(f16_t* p, int64_t i, float v) { p[i] = to_f16(v); }
};

}  // namespace spam
