// The AVX2 path of the CPU kernel (x86-64-v3: AVX2, FMA, F16C): the blocking of cpu_blocking.h with a
// 6 x 16 register tile (12 ymm accumulators) run over the full rank from zero, k ascending; the fp32
// source tile added once and rounded once on write-back (round-to-nearest-even, NaN -> quiet NaN, like
// torch's `.to(dtype)`). Compiled with -mavx2 -mfma -mf16c (this file only, CMakeLists.txt); cpu_apply.cpp
// calls in only when cpu_isa.cpp found those on this CPU.
#include <immintrin.h>

#include "cpu_blocking.h"
#include "cpu_isa.h"

namespace lorarar {
namespace {

constexpr int MR = 6, NR = 16;

template <int DT>
inline void load16(const char* p, __m256& lo, __m256& hi) {
  if constexpr (DT == kFloat32) {
    lo = _mm256_loadu_ps(reinterpret_cast<const float*>(p));
    hi = _mm256_loadu_ps(reinterpret_cast<const float*>(p) + 8);
  } else {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if constexpr (DT == kFloat16) {
      lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
      hi = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
    } else {
      lo = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(h)), 16));
      hi = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(h, 1)), 16));
    }
  }
}

// fp32 -> bf16 bits in the low half of each 32-bit lane: (u + 0x7FFF + lsb) >> 16, NaN -> 0x7FC0.
inline __m256i bf16_bits(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i bias = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
  const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  return _mm256_castps_si256(
      _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC0)), nan));
}

template <int DT>
inline void store16(char* p, __m256 lo, __m256 hi) {
  if constexpr (DT == kFloat32) {
    _mm256_storeu_ps(reinterpret_cast<float*>(p), lo);
    _mm256_storeu_ps(reinterpret_cast<float*>(p) + 8, hi);
  } else if constexpr (DT == kFloat16) {
    const __m128i a = _mm256_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m128i b = _mm256_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_set_m128i(b, a));
  } else {
    // packus interleaves 128-bit lanes: [lo0-3 hi0-3 lo4-7 hi4-7]; the permute restores the order.
    const __m256i packed = _mm256_packus_epi32(bf16_bits(lo), bf16_bits(hi));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permute4x64_epi64(packed, 0xD8));
  }
}

// All-ones lanes where round_DT(v) is non-finite (the test of cpu_blocking.h; |bits| fits a signed int).
template <int DT>
inline __m256i nonfinite8(__m256 v) {
  const __m256i a = _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(0x7FFFFFFF));
  return _mm256_cmpgt_epi32(a, _mm256_set1_epi32(static_cast<int>(nonfinite_from<DT>() - 1)));
}

// acc[6][16] = sum_k a[k][i] * b[k][j], k ascending, from zero (12 ymm accumulators).
inline void tile_6x16(int64_t K, const float* __restrict a, const float* __restrict b, __m256* acc) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
#pragma GCC unroll 4
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
    __m256 x = _mm256_broadcast_ss(a);
    c00 = _mm256_fmadd_ps(x, b0, c00);
    c01 = _mm256_fmadd_ps(x, b1, c01);
    x = _mm256_broadcast_ss(a + 1);
    c10 = _mm256_fmadd_ps(x, b0, c10);
    c11 = _mm256_fmadd_ps(x, b1, c11);
    x = _mm256_broadcast_ss(a + 2);
    c20 = _mm256_fmadd_ps(x, b0, c20);
    c21 = _mm256_fmadd_ps(x, b1, c21);
    x = _mm256_broadcast_ss(a + 3);
    c30 = _mm256_fmadd_ps(x, b0, c30);
    c31 = _mm256_fmadd_ps(x, b1, c31);
    x = _mm256_broadcast_ss(a + 4);
    c40 = _mm256_fmadd_ps(x, b0, c40);
    c41 = _mm256_fmadd_ps(x, b1, c41);
    x = _mm256_broadcast_ss(a + 5);
    c50 = _mm256_fmadd_ps(x, b0, c50);
    c51 = _mm256_fmadd_ps(x, b1, c51);
    a += MR;
    b += NR;
  }
  acc[0] = c00, acc[1] = c01, acc[2] = c10, acc[3] = c11, acc[4] = c20, acc[5] = c21;
  acc[6] = c30, acc[7] = c31, acc[8] = c40, acc[9] = c41, acc[10] = c50, acc[11] = c51;
}

// Ask for the source of the next tile along the rows (same rows, the next NR columns) while this one
// computes.
template <int DT>
inline void prefetch_next(const Job& job, int64_t r, int64_t c) {
  constexpr int64_t es = DT == kFloat32 ? 4 : 2;
  const char* src = reinterpret_cast<const char*>(job.src);
  if (c + NR >= job.cols) return;
  const int64_t last = lmin(r + MR, job.rows);
  for (int64_t i = r; i < last; ++i) {
    const char* p = src + (i * job.ld_src + c + NR) * es;
    _mm_prefetch(p, _MM_HINT_T0);
    _mm_prefetch(p + NR * es - 1, _MM_HINT_T0);
  }
}

struct Avx2Tile {
  static constexpr int MR = 6, NR = 16;
  template <int DT>
  static bool run(const Job& job, int64_t r, int64_t c, int mr, int nr, const float* a, const float* b);
};

template <int DT>
bool Avx2Tile::run(const Job& job, int64_t r, int64_t c, int mr, int nr, const float* a, const float* b) {
  __m256 acc[2 * MR];
  prefetch_next<DT>(job, r, c);
  tile_6x16(job.rank, a, b, acc);
  if (mr == MR && nr == NR) {
    constexpr int64_t es = DT == kFloat32 ? 4 : 2;
    const char* src = reinterpret_cast<const char*>(job.src);
    char* dst = reinterpret_cast<char*>(job.dst);
    __m256i bad = _mm256_setzero_si256();
    for (int i = 0; i < MR; ++i) {
      __m256 lo, hi;
      load16<DT>(src + ((r + i) * job.ld_src + c) * es, lo, hi);
      lo = _mm256_add_ps(lo, acc[2 * i]);
      hi = _mm256_add_ps(hi, acc[2 * i + 1]);
      bad = _mm256_or_si256(bad, _mm256_or_si256(nonfinite8<DT>(lo), nonfinite8<DT>(hi)));
      store16<DT>(dst + ((r + i) * job.ld_dst + c) * es, lo, hi);
    }
    return !_mm256_testz_si256(bad, bad);
  }
  alignas(32) float tmp[MR * NR];
  for (int i = 0; i < MR; ++i) {
    _mm256_store_ps(tmp + i * NR, acc[2 * i]);
    _mm256_store_ps(tmp + i * NR + 8, acc[2 * i + 1]);
  }
  return epilogue_scalar<DT>(job, r, c, mr, nr, tmp, NR);
}

}  // namespace

bool cpu_task_avx2(const Job& job, int64_t r0, int64_t c0, float* ap, float* bp) {
  return run_task_any<Avx2Tile>(job, r0, c0, ap, bp);
}

}  // namespace lorarar
