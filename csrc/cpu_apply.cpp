// CPU kernel of the `cpp` backend: W_dst = round(float32(W_src) + up @ (down * S)) for a table of layers.
//
// Layout (the classic packed-GEMM blocking of Goto & van de Geijn, "Anatomy of high-performance matrix
// multiplication", TOMS 2008, with the whole rank as one K block): a task is (layer, NC columns, up to
// TASK_ROWS rows). It packs `down * S` columns once into NR-column strips [K][NR] (the column
// coefficients are folded in here, one fp32 multiply, exactly as the torch reference forms down * S),
// then, per MC rows, `up` rows into MR-row strips [K][MR] (L2), and runs an MR x NR register tile (12 ymm
// accumulators, AVX2 FMA) over the full rank from zero, adds the
// fp32 source tile once and rounds once on write-back (round-to-nearest-even, NaN -> quiet NaN, like
// torch's `.to(dtype)`). Every output element is summed over k = 0..rank-1 in order by exactly one thread,
// and the tiling does not depend on the thread count, so the bits do not either.
//
// Compiled with -mavx2 -mfma -mf16c (x86-64-v3) when the target is x86-64; module.cpp checks the CPU at
// run time before calling in. Elsewhere the same blocking runs with portable scalar code.
#include "cpu_apply.h"
#include "cpu_convert.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace lorarar {
namespace {

using namespace convert;

constexpr int MR = 6;        // rows of the register tile
constexpr int NR = 16;       // columns of the register tile (two 8-float vectors)
constexpr int MC = 240;      // rows packed at a time: up block (MC x rank fp32, 120 KiB at rank 128) in L2
constexpr int NC_MAX = 512;  // columns per task: the packed down block (rank x NC fp32) <= 256 KiB
constexpr int TASK_ROWS = 2 * MC;  // rows per task (the packed down block is reused over them)

// Columns per task for a given rank (depends on the rank only, never on the thread count).
int64_t block_cols(int64_t rank) {
  int64_t nc = (65536 / std::max<int64_t>(rank, 1)) / NR * NR;
  return std::min<int64_t>(NC_MAX, std::max<int64_t>(4 * NR, nc));
}

// Tile epilogue, any size: dst[r+i, c+j] = round(src[r+i, c+j] + acc[i][j]) for i < mr, j < nr.
template <int DT>
void epilogue_scalar(const Job& job, int64_t r, int64_t c, int mr, int nr, const float* acc) {
  const char* src = reinterpret_cast<const char*>(job.src);
  char* dst = reinterpret_cast<char*>(job.dst);
  for (int i = 0; i < mr; ++i) {
    for (int j = 0; j < nr; ++j) {
      const float v = load1<DT>(src, (r + i) * job.ld_src + c + j) + acc[i * NR + j];
      store1<DT>(dst, (r + i) * job.ld_dst + c + j, v);
    }
  }
}

// ---- packing -------------------------------------------------------------------------------------------
// Where rank row k of up and down lives: packed fp32, or one of the two LoRAs' own factors (Job::sources).
struct Part {
  const char* up;
  const char* down;
  int64_t ld_up, ld_down, dt_up, dt_down;
  float scale;
  bool scaled;
};

Part part_of(const Job& job, bool second) {
  if (!job.sources) {  // packed: up [rows, rank] and down [rank, cols], fp32, scales folded in
    return {reinterpret_cast<const char*>(job.up), reinterpret_cast<const char*>(job.down), job.ld_up,
            job.ld_down, kFloat32, kFloat32, 1.0f, false};
  }
  const int sh = second ? 8 : 0;
  const uint32_t bits = static_cast<uint32_t>(static_cast<uint64_t>(job.lora_scales) >> (second ? 32 : 0));
  return {reinterpret_cast<const char*>(second ? job.up2 : job.up),
          reinterpret_cast<const char*>(second ? job.down2 : job.down),
          second ? job.ld_up2 : job.ld_up,
          second ? job.ld_down2 : job.ld_down,
          (job.dtypes >> sh) & 15,
          (job.dtypes >> (sh + 4)) & 15,
          float_of(bits),
          true};
}

int64_t element_size(int64_t dtype) { return dtype == kFloat32 ? 4 : 2; }

// up rows [r0, r0 + mc_pad) -> ap[strip][k][MR]; rows past the layer are zero.
void pack_up(const Job& job, int64_t r0, int64_t mc_pad, float* ap) {
  const int64_t K = job.rank;
  // the rank is split in two column blocks at `split` only when reading the LoRAs' own factors
  const int64_t k_split = job.sources ? job.split : K;
  const Part parts[2] = {part_of(job, false), part_of(job, true)};
  float row[NC_MAX];  // up to NC_MAX values of one row of one part, converted and scaled
  for (int64_t s = 0; s < mc_pad; s += MR) {
    float* strip = ap + s * K;
    for (int i = 0; i < MR; ++i) {
      const int64_t r = r0 + s + i;
      if (r >= job.rows) {
        for (int64_t k = 0; k < K; ++k) strip[k * MR + i] = 0.0f;
        continue;
      }
      for (int h = 0; h < 2; ++h) {
        const Part& p = parts[h];
        const int64_t k0 = h == 0 ? 0 : k_split, n = (h == 0 ? k_split : K) - k0;
        if (n <= 0) continue;
        if (p.dt_up == kFloat32 && !p.scaled) {
          const float* src = reinterpret_cast<const float*>(p.up) + r * p.ld_up;
          for (int64_t k = 0; k < n; ++k) strip[(k0 + k) * MR + i] = src[k];
          continue;
        }
        const char* base = p.up + r * p.ld_up * element_size(p.dt_up);
        for (int64_t c = 0; c < n; c += NC_MAX) {
          const int64_t m = std::min<int64_t>(NC_MAX, n - c);
          to_float(p.dt_up, base + c * element_size(p.dt_up), m, p.scale, p.scaled, row);
          for (int64_t k = 0; k < m; ++k) strip[(k0 + c + k) * MR + i] = row[k];
        }
      }
    }
  }
}

// (down * S) columns [c0, c0 + nc_pad) -> bp[strip][k][NR]; columns past the layer are zero.
void pack_down(const Job& job, int64_t c0, int64_t nc_pad, float* bp) {
  const int64_t K = job.rank;
  const int64_t k_split = job.sources ? job.split : K;
  const Part parts[2] = {part_of(job, false), part_of(job, true)};
  const float* scale = reinterpret_cast<const float*>(job.col_scale);
  const int64_t valid = std::min<int64_t>(nc_pad, job.cols - c0);
  float row_buf[NC_MAX];
  for (int64_t k = 0; k < K; ++k) {
    const Part& p = parts[k < k_split ? 0 : 1];
    const int64_t kk = k < k_split ? k : k - k_split;
    const float* drow;
    if (p.dt_down == kFloat32) {
      drow = reinterpret_cast<const float*>(p.down) + kk * p.ld_down + c0;
    } else {  // 16-bit LoRA factors: converted once per row of the block
      to_float(p.dt_down, p.down + (kk * p.ld_down + c0) * 2, valid, 1.0f, false, row_buf);
      drow = row_buf;
    }
    const float* srow = scale ? scale + (k < job.split ? 0 : job.ld_col_scale) + c0 : nullptr;
    for (int64_t t = 0; t < nc_pad; t += NR) {
      float* out = bp + t * K + k * NR;
      const int64_t n = std::min<int64_t>(NR, valid - t);
      if (n == NR) {
        if (srow) {
          for (int j = 0; j < NR; ++j) out[j] = drow[t + j] * srow[t + j];
        } else {
          for (int j = 0; j < NR; ++j) out[j] = drow[t + j];
        }
      } else {
        for (int j = 0; j < NR; ++j) {
          out[j] = j < n ? (srow ? drow[t + j] * srow[t + j] : drow[t + j]) : 0.0f;
        }
      }
    }
  }
}

// ---- the register tile ---------------------------------------------------------------------------------
#ifdef LORARAR_CPU_AVX2

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

// Ask for the source rows of the next tile down (same columns) while this one computes.
template <int DT>
inline void prefetch_next(const Job& job, int64_t r, int64_t c) {
  constexpr int64_t es = DT == kFloat32 ? 4 : 2;
  const char* src = reinterpret_cast<const char*>(job.src);
  const int64_t last = std::min<int64_t>(r + 2 * MR, job.rows);
  for (int64_t i = r + MR; i < last; ++i) {
    const char* p = src + (i * job.ld_src + c) * es;
    _mm_prefetch(p, _MM_HINT_T0);
    _mm_prefetch(p + NR * es - 1, _MM_HINT_T0);
  }
}

template <int DT>
void run_tile(const Job& job, int64_t r, int64_t c, int mr, int nr, const float* a, const float* b) {
  __m256 acc[2 * MR];
  prefetch_next<DT>(job, r, c);
  tile_6x16(job.rank, a, b, acc);
  if (mr == MR && nr == NR) {
    constexpr int64_t es = DT == kFloat32 ? 4 : 2;
    const char* src = reinterpret_cast<const char*>(job.src);
    char* dst = reinterpret_cast<char*>(job.dst);
    for (int i = 0; i < MR; ++i) {
      __m256 lo, hi;
      load16<DT>(src + ((r + i) * job.ld_src + c) * es, lo, hi);
      store16<DT>(dst + ((r + i) * job.ld_dst + c) * es, _mm256_add_ps(lo, acc[2 * i]),
                  _mm256_add_ps(hi, acc[2 * i + 1]));
    }
    return;
  }
  alignas(32) float tmp[MR * NR];
  for (int i = 0; i < MR; ++i) {
    _mm256_store_ps(tmp + i * NR, acc[2 * i]);
    _mm256_store_ps(tmp + i * NR + 8, acc[2 * i + 1]);
  }
  epilogue_scalar<DT>(job, r, c, mr, nr, tmp);
}

#else  // portable

template <int DT>
void run_tile(const Job& job, int64_t r, int64_t c, int mr, int nr, const float* a, const float* b) {
  float acc[MR * NR] = {};
  for (int64_t k = 0; k < job.rank; ++k, a += MR, b += NR) {
    for (int i = 0; i < MR; ++i) {
      const float x = a[i];
      for (int j = 0; j < NR; ++j) acc[i * NR + j] = std::fma(x, b[j], acc[i * NR + j]);
    }
  }
  epilogue_scalar<DT>(job, r, c, mr, nr, acc);
}

#endif

struct Task {
  int64_t job, r0, c0;
};

// A task: one NC-column block of a layer and up to TASK_ROWS rows; down * S is packed once per task.
template <int DT>
void run_task(const Job& job, const Task& t, float* ap, float* bp) {
  const int64_t K = job.rank;
  const int64_t nc = std::min<int64_t>(block_cols(K), job.cols - t.c0);
  const int64_t nc_pad = (nc + NR - 1) / NR * NR;
  pack_down(job, t.c0, nc_pad, bp);
  const int64_t r_end = std::min<int64_t>(job.rows, t.r0 + TASK_ROWS);
  for (int64_t r0 = t.r0; r0 < r_end; r0 += MC) {
    const int64_t mc = std::min<int64_t>(MC, r_end - r0);
    const int64_t mc_pad = (mc + MR - 1) / MR * MR;
    pack_up(job, r0, mc_pad, ap);
    for (int64_t j = 0; j < nc_pad; j += NR) {  // one down strip (K x NR) stays in L1 ...
      const int nr = static_cast<int>(std::min<int64_t>(NR, nc - j));
      for (int64_t i = 0; i < mc_pad; i += MR) {  // ... while the up strips stream from L2
        const int mr = static_cast<int>(std::min<int64_t>(MR, mc - i));
        run_tile<DT>(job, r0 + i, t.c0 + j, mr, nr, ap + i * K, bp + j * K);
      }
    }
  }
}

float* alloc_floats(int64_t n) {
  const size_t bytes = (static_cast<size_t>(std::max<int64_t>(n, 16)) * sizeof(float) + 63) / 64 * 64;
  return static_cast<float*>(std::aligned_alloc(64, bytes));
}

}  // namespace

const char* cpu_kernel_isa() {
#ifdef LORARAR_CPU_AVX2
  return "avx2+fma+f16c";
#else
  return "portable";
#endif
}

void cpu_apply(const Job* jobs, int64_t n_jobs, int n_threads) {
  std::vector<Task> tasks;
  int64_t max_rank = 0, max_down = 0;
  for (int64_t n = 0; n < n_jobs; ++n) {
    const Job& job = jobs[n];
    const int64_t nc = block_cols(job.rank);
    max_rank = std::max(max_rank, job.rank);
    max_down = std::max(max_down, nc * job.rank);
    for (int64_t c0 = 0; c0 < job.cols; c0 += nc) {
      for (int64_t r0 = 0; r0 < job.rows; r0 += TASK_ROWS) tasks.push_back({n, r0, c0});
    }
  }
  const int64_t n_tasks = static_cast<int64_t>(tasks.size());
  bool failed = false;
#ifndef _OPENMP
  (void)n_threads;
#else
  if (n_threads <= 0) n_threads = omp_get_max_threads();
  n_threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n_threads, n_tasks)));
#pragma omp parallel num_threads(n_threads) reduction(|| : failed)
#endif
  {
    // Both packed blocks are per thread: MC x rank and rank x NC floats (120 KiB + 256 KiB at rank 128).
    float* ap = alloc_floats(static_cast<int64_t>(MC) * max_rank);
    float* bp = alloc_floats(max_down);
    if (ap == nullptr || bp == nullptr) failed = true;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t n = 0; n < n_tasks; ++n) {
      if (ap == nullptr || bp == nullptr) continue;
      const Task& t = tasks[n];
      const Job& job = jobs[t.job];
      switch (job.dtype) {
        case kFloat32: run_task<kFloat32>(job, t, ap, bp); break;
        case kFloat16: run_task<kFloat16>(job, t, ap, bp); break;
        default: run_task<kBFloat16>(job, t, ap, bp); break;
      }
    }
    std::free(ap);
    std::free(bp);
  }
  if (failed) throw std::bad_alloc();
}

}  // namespace lorarar
