// Scalar fp32 <-> fp16/bf16 conversions shared by the CPU kernels (cpu_apply.cpp, cpu_pack.cpp).
// Round-to-nearest-even, NaN -> quiet NaN: the same bits as torch's `.to(dtype)`; the kernels' vector
// paths give the same bits.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "job_table.h"

namespace lorarar {
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

}  // namespace convert
}  // namespace lorarar
