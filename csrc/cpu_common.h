// Shared helpers for the CPU kernels: dtype tags, fp16/bf16 <-> fp32 conversion and a vectorisable expf.
//
// The kernel translation units include no torch headers (they compile in seconds); only cpu_bindings.cpp
// touches torch. Half-precision values travel as raw 16-bit words so every loop stays plain arithmetic the
// compiler can vectorise under -O3 (with `#pragma omp simd` for reductions).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "dtype.h"

namespace mki {

struct bf16_t {
  uint16_t x;
};
struct fp16_t {
  uint16_t x;
};

inline float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// bf16 is the top half of an fp32 word; rounding to nearest even, NaN kept quiet.
inline float to_float(bf16_t v) { return bits_to_f32(static_cast<uint32_t>(v.x) << 16); }
inline bf16_t from_float_bf16(float f) {
  uint32_t u = f32_to_bits(f);
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  uint16_t out = (f != f) ? static_cast<uint16_t>(0x7FC0u) : static_cast<uint16_t>(rounded);
  return bf16_t{out};
}

// IEEE half conversions, branch-free (the classic bit-manipulation formulation, same results as c10::Half).
inline float to_float(fp16_t v) {
  const uint32_t w = static_cast<uint32_t>(v.x) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_to_f32((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_to_f32((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t bits = two_w < (1u << 27) ? f32_to_bits(denormalized) : f32_to_bits(normalized);
  return bits_to_f32(sign | bits);
}
inline fp16_t from_float_fp16(float f) {
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = f32_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = bits_to_f32((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return fp16_t{static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign))};
}

inline float to_float(float v) { return v; }
inline double to_float(double v) { return v; }

// Accumulation type: fp32 for 16/32-bit inputs, fp64 for fp64 inputs (used by gradcheck).
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

template <typename T>
inline T from_acc(typename Acc<T>::type v);
template <>
inline float from_acc<float>(float v) {
  return v;
}
template <>
inline double from_acc<double>(double v) {
  return v;
}
template <>
inline bf16_t from_acc<bf16_t>(float v) {
  return from_float_bf16(v);
}
template <>
inline fp16_t from_acc<fp16_t>(float v) {
  return from_float_fp16(v);
}

// exp(x) in fp32, about 2 ulp, written without calls or branches so loops over it vectorise.
// exp(-inf) and anything below the normal range give exactly 0, x > 88 gives inf; NaN propagates.
inline float fast_exp(float x) {
  constexpr float kHi = 88.0f;  // keeps 2^n encodable; callers only pass x <= 0
  constexpr float kLo = -87.3365479f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting rounds to an integer
  float xc = x < kLo ? kLo : x;
  xc = xc > kHi ? kHi : xc;
  const float fx = (xc * 1.44269504088896341f + kRound) - kRound;
  float r = xc - fx * 0.693359375f;
  r = r + fx * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t n = static_cast<int32_t>(fx);
  const float pow2 = bits_to_f32(static_cast<uint32_t>(n + 127) << 23);
  float out = y * pow2;
  out = x < kLo ? 0.0f : out;
  out = x > kHi ? std::numeric_limits<float>::infinity() : out;
  out = (x != x) ? x : out;
  return out;
}
inline double fast_exp(double x) { return std::exp(x); }

template <typename A>
inline A neg_inf() {
  return -std::numeric_limits<A>::infinity();
}

}  // namespace mki
