// The AVX-512 path of the CPU kernel (F/BW/VL): the blocking of cpu_blocking.h with a 12 x 32 register
// tile (24 zmm accumulators, the `up` values broadcast from memory) run over the full rank from zero, k
// ascending, fused multiply-adds; the fp32 source tile added once and rounded once on write-back with
// masked loads/stores at the edges. Rounding: fp16 with VCVTPS2PH (round-to-nearest-even), bf16 with the
// integer round-to-nearest-even of cpu_convert.h (NaN -> 0x7FC0), i.e. torch's `.to(dtype)` bits; the
// AVX512-BF16 VCVTNEPS2BF16 is not used for weights because it flushes subnormals to zero.
// The same bits as the portable and AVX2 paths (same sums in the same order), for any thread count.
//
// Compiled with -mavx512f -mavx512bw -mavx512vl -mfma -mf16c (this file only, CMakeLists.txt);
// cpu_apply.cpp calls in only when cpu_isa.cpp found AVX-512 F/BW/VL usable on this CPU.
#include <immintrin.h>

#include "cpu_avx512_io.h"
#include "cpu_blocking.h"
#include "cpu_isa.h"

namespace lorarar {
namespace {

constexpr int MR = 12, NR = 32;

// acc[i][0..1] = sum_k a[k][i] * b[k][0..31], k ascending, from zero.
inline void tile_12x32(int64_t K, const float* __restrict a, const float* __restrict b, __m512* acc) {
  __m512 c[2 * MR];
#pragma GCC unroll 24
  for (int i = 0; i < 2 * MR; ++i) c[i] = _mm512_setzero_ps();
#pragma GCC unroll 2
  for (int64_t k = 0; k < K; ++k) {
    const __m512 b0 = _mm512_load_ps(b), b1 = _mm512_load_ps(b + 16);
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      const __m512 x = _mm512_set1_ps(a[i]);
      c[2 * i] = _mm512_fmadd_ps(x, b0, c[2 * i]);
      c[2 * i + 1] = _mm512_fmadd_ps(x, b1, c[2 * i + 1]);
    }
    a += MR;
    b += NR;
  }
#pragma GCC unroll 24
  for (int i = 0; i < 2 * MR; ++i) acc[i] = c[i];
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

struct Avx512Tile {
  static constexpr int MR = 12, NR = 32;  // = the namespace constants
  template <int DT>
  static bool run(const Job& job, int64_t r, int64_t c, int mr, int nr, const float* a, const float* b) {
    constexpr int64_t es = DT == kFloat32 ? 4 : 2;
    __m512 acc[2 * MR];
    prefetch_next<DT>(job, r, c);
    tile_12x32(job.rank, a, b, acc);
    const __mmask16 m0 = nr >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << nr) - 1);
    const __mmask16 m1 = nr >= 32 ? 0xFFFF : nr <= 16 ? 0 : static_cast<__mmask16>((1u << (nr - 16)) - 1);
    const char* src = reinterpret_cast<const char*>(job.src);
    char* dst = reinterpret_cast<char*>(job.dst);
    __mmask16 bad = 0;  // lanes written non-finite (masked to the lanes written)
    if (nr == NR && can_stream(job, es)) {  // c is a multiple of NR: every row write is whole lines
      for (int i = 0; i < mr; ++i) {
        const char* s = src + ((r + i) * job.ld_src + c) * es;
        const __m512 lo = _mm512_add_ps(load_n<DT>(s, 0xFFFF), acc[2 * i]);
        const __m512 hi = _mm512_add_ps(load_n<DT>(s + 16 * es, 0xFFFF), acc[2 * i + 1]);
        bad |= nonfinite16<DT>(0xFFFF, lo) | nonfinite16<DT>(0xFFFF, hi);
        stream32<DT>(dst + ((r + i) * job.ld_dst + c) * es, lo, hi);
      }
      return bad != 0;
    }
    for (int i = 0; i < mr; ++i) {
      const char* s = src + ((r + i) * job.ld_src + c) * es;
      char* d = dst + ((r + i) * job.ld_dst + c) * es;
      const __m512 lo = _mm512_add_ps(load_n<DT>(s, m0), acc[2 * i]);
      const __m512 hi = _mm512_add_ps(load_n<DT>(s + 16 * es, m1), acc[2 * i + 1]);
      bad |= nonfinite16<DT>(m0, lo) | nonfinite16<DT>(m1, hi);
      store_n<DT>(d, lo, m0);
      store_n<DT>(d + 16 * es, hi, m1);
    }
    return bad != 0;
  }
};

}  // namespace

bool cpu_task_avx512(const Job& job, int64_t r0, int64_t c0, float* ap, float* bp) {
  const bool bad = run_task_any<Avx512Tile>(job, r0, c0, ap, bp);
  _mm_sfence();  // the task's streaming stores are globally visible before the pass returns
  return bad;
}

}  // namespace lorarar
