// AVX-512 loads and stores of 16 weights with the one rounding of the write-back, shared by the AVX-512
// and AMX paths (cpu_apply_avx512.cpp, cpu_apply_amx.cpp; both compiled with AVX-512 F/BW/VL). Internal
// linkage only, like cpu_blocking.h.
#pragma once

#include <immintrin.h>

#include "job_table.h"

namespace lorarar {
namespace {

// n (<= 16) values of dtype DT at p as fp32; lanes past n are zero and not read.
template <int DT>
inline __m512 load_n(const char* p, __mmask16 m) {
  if constexpr (DT == kFloat32) {
    return _mm512_maskz_loadu_ps(m, p);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(m, p);
    if constexpr (DT == kFloat16) {
      return _mm512_cvtph_ps(h);
    } else {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
  }
}

// fp32 -> bf16 bits: (u + 0x7FFF + lsb) >> 16, NaN -> 0x7FC0 (as bf16_from_float).
// In the low 16 bits of each 32-bit lane.
inline __m512i bf16_bits32(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
}
inline __m256i bf16_round(__m512 x) { return _mm512_cvtepi32_epi16(bf16_bits32(x)); }

template <int DT>
inline void store_n(char* p, __m512 v, __mmask16 m) {
  if constexpr (DT == kFloat32) {
    _mm512_mask_storeu_ps(p, m, v);
  } else if constexpr (DT == kFloat16) {
    _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    _mm256_mask_storeu_epi16(p, m, bf16_round(v));
  }
}

}  // namespace
}  // namespace lorarar
