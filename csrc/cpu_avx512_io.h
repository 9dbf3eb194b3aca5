// AVX-512 loads and stores of 16 weights with the one rounding of the write-back, shared by the AVX-512
// and AMX paths (cpu_apply_avx512.cpp, cpu_apply_amx.cpp; both compiled with AVX-512 F/BW/VL). Internal
// linkage only, like cpu_blocking.h.
#pragma once

#include <immintrin.h>

#include "cpu_blocking.h"
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

// Lanes of m where round_DT(v) is non-finite (the write-back test of cpu_blocking.h, in registers).
template <int DT>
inline __mmask16 nonfinite16(__mmask16 m, __m512 v) {
  const __m512i a = _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7FFFFFFF));
  return _mm512_mask_cmpge_epu32_mask(m, a, _mm512_set1_epi32(static_cast<int>(nonfinite_from<DT>())));
}

// 32 weights (lo: the first 16) to a 64-byte-aligned p with non-temporal stores: whole cache lines written
// without reading them first (a swap from a snapshot writes W without needing its old contents). The
// caller issues _mm_sfence() before the pass returns.
template <int DT>
inline void stream32(char* p, __m512 lo, __m512 hi) {
  if constexpr (DT == kFloat32) {
    _mm512_stream_ps(reinterpret_cast<float*>(p), lo);
    _mm512_stream_ps(reinterpret_cast<float*>(p) + 16, hi);
  } else {
    __m256i a, b;
    if constexpr (DT == kFloat16) {
      a = _mm512_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      b = _mm512_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
      a = bf16_round(lo);
      b = bf16_round(hi);
    }
    _mm512_stream_si512(reinterpret_cast<__m512i*>(p), _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1));
  }
}

// Whether row writes of 32 weights at dst + (row * ld + c) can stream: a separate output (not in place)
// whose rows and column blocks start on 64-byte boundaries.
inline bool can_stream(const Job& job, int64_t es) {
  return job.dst != job.src && job.dst % 64 == 0 && (job.ld_dst * es) % 64 == 0;
}

}  // namespace
}  // namespace lorarar
