// Scalar fp32 <-> fp16/bf16 conversions shared by the CPU kernels (cpu_apply*.cpp, cpu_pack.cpp).
// Round-to-nearest-even, NaN -> quiet NaN: the same bits as torch's `.to(dtype)`; the kernels' vector
// paths give the same bits.
//
// Everything here has internal linkage (an unnamed namespace): the files that include it are compiled
// with different instruction sets (CMakeLists.txt), and an inline function with external linkage would be
// one symbol the linker may take from the AVX-512 file for the portable one.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "job_table.h"

// The CPU kernels' vector paths: x86-64-v3 builds (CMakeLists.txt sets the flags for these files only).
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LORARAR_CPU_AVX2 1
#endif

namespace lorarar {
namespace {
namespace convert {

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t bf16_from_float(float f) {
  if (std::isnan(f)) return 0x7FC0;
  uint32_t u = bits_of(f);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
inline float float_from_bf16(uint16_t h) { return float_of(static_cast<uint32_t>(h) << 16); }

inline uint16_t half_from_float(float f) {
  uint32_t x = bits_of(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7FFFFFFFu;
  if (x > 0x7F800000u) return sign | 0x7E00u;   // NaN
  if (x >= 0x47800000u) return sign | 0x7C00u;  // >= 65536 (and inf): overflow
  if (x < 0x38800000u) {                        // below 2^-14: subnormal, units of 2^-24
    // |f| * 2^24 is exact; nearbyint rounds half to even in the default mode; 1024 encodes 2^-14.
    return sign | static_cast<uint16_t>(std::nearbyint(float_of(x) * 16777216.0f));
  }
  uint32_t h = ((((x >> 23) - 112u) << 10) | ((x >> 13) & 0x3FFu));
  const uint32_t rest = x & 0x1FFFu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is right
  return sign | static_cast<uint16_t>(h);
}
inline float float_from_half(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  if (e == 0) return float_of(sign | bits_of(static_cast<float>(m) * 5.9604644775390625e-8f));
  if (e == 31) return float_of(sign | 0x7F800000u | (m << 13));
  return float_of(sign | ((e + 112u) << 23) | (m << 13));
}

template <int DT>
inline float load1(const char* base, int64_t i) {
  if constexpr (DT == kFloat32) {
    return reinterpret_cast<const float*>(base)[i];
  } else if constexpr (DT == kFloat16) {
    return float_from_half(reinterpret_cast<const uint16_t*>(base)[i]);
  } else {
    return float_from_bf16(reinterpret_cast<const uint16_t*>(base)[i]);
  }
}
template <int DT>
inline void store1(char* base, int64_t i, float v) {
  if constexpr (DT == kFloat32) {
    reinterpret_cast<float*>(base)[i] = v;
  } else if constexpr (DT == kFloat16) {
    reinterpret_cast<uint16_t*>(base)[i] = half_from_float(v);
  } else {
    reinterpret_cast<uint16_t*>(base)[i] = bf16_from_float(v);
  }
}

#ifdef LORARAR_CPU_AVX2
// Eight values of dtype DT from base[i, i + 8) as fp32 (exact widening, like the scalar loads).
template <int DT>
inline __m256 load8(const char* base, int64_t i) {
  if constexpr (DT == kFloat32) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(base) + i);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(base + 2 * i));
    if constexpr (DT == kFloat16) {
      return _mm256_cvtph_ps(h);
    } else {
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
  }
}
#endif

// dst[0, n) = float32(src[0, n)), times `scale` (one fp32 multiply) when `scaled`.
template <int DT>
inline void to_float(const char* src, int64_t n, float scale, bool scaled, float* dst) {
  int64_t j = 0;
#ifdef LORARAR_CPU_AVX2
  const __m256 s = _mm256_set1_ps(scale);
  for (; j + 8 <= n; j += 8) {
    __m256 v = load8<DT>(src, j);
    _mm256_storeu_ps(dst + j, scaled ? _mm256_mul_ps(v, s) : v);
  }
#endif
  for (; j < n; ++j) {
    const float v = load1<DT>(src, j);
    dst[j] = scaled ? v * scale : v;
  }
}

inline void to_float(int64_t dtype, const char* src, int64_t n, float scale, bool scaled, float* dst) {
  switch (dtype) {
    case kFloat32: to_float<kFloat32>(src, n, scale, scaled, dst); break;
    case kFloat16: to_float<kFloat16>(src, n, scale, scaled, dst); break;
    default: to_float<kBFloat16>(src, n, scale, scaled, dst); break;
  }
}

}  // namespace convert
}  // namespace
}  // namespace lorarar
