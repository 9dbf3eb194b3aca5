// CPU kernel that packs a swap's factors: each LoRA's up (scaled) and down, converted to fp32, into the
// plan's [s_c B_c | s_s B_s] and [A_c ; A_s] buffers in one parallel pass, checking on the way that every
// written value is finite (NaN/Inf in a LoRA, or a scale that overflows fp32).
//
// Destinations are written with streaming stores (the factors are read back once, by the coefficient
// matmuls and the pass over the weights, long after this call evicted them from cache anyway).
//
// The values are those of the torch path in lorarar_kernels/plan.py: float32(x) * float32(scale) for up
// (one fp32 multiply; exact when scale is 1), float32(x) for down. Work is split into chunks of rows of
// about 32 K values; the bits depend on nothing but the inputs.
#include "cpu_pack.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_convert.h"

namespace lorarar {
namespace {

using namespace convert;

constexpr int64_t kChunk = 32768;  // values per task

inline bool non_finite(float v) { return !(std::fabs(v) < INFINITY); }


// dst[0, n) = float(src[0, n)) (* scale when SCALED); true when a value is not finite. dst == nullptr:
// check only, nothing written.
template <int DT, bool SCALED>
bool convert_row(const char* src, float* dst, int64_t n, float scale) {
  int64_t j = 0;
  bool bad = false;
  // Streaming stores where dst is 32-byte aligned: the destination lines are not read first.
  for (; dst != nullptr && j < n && (reinterpret_cast<uintptr_t>(dst + j) & 31) != 0; ++j) {
    float v = load1<DT>(src, j);
    if constexpr (SCALED) v *= scale;
    dst[j] = v;
    bad |= non_finite(v);
  }
#ifdef LORARAR_CPU_AVX2
  const __m256 s = _mm256_set1_ps(scale);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 inf = _mm256_set1_ps(INFINITY);
  __m256 flags = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    __m256 v = load8<DT>(src, j);
    if constexpr (SCALED) v = _mm256_mul_ps(v, s);
    if (dst != nullptr) _mm256_stream_ps(dst + j, v);
    // !(|v| < inf): true for +-Inf and (unordered) NaN
    flags = _mm256_or_ps(flags, _mm256_cmp_ps(_mm256_and_ps(v, abs_mask), inf, _CMP_NLT_UQ));
  }
  bad |= _mm256_movemask_ps(flags) != 0;
#endif
  for (; j < n; ++j) {
    float v = load1<DT>(src, j);
    if constexpr (SCALED) v *= scale;
    if (dst != nullptr) dst[j] = v;
    bad |= non_finite(v);
  }
  return bad;
}

template <bool SCALED>
bool convert_row_any(int64_t dtype, const char* src, float* dst, int64_t n, float scale) {
  switch (dtype) {
    case kFloat32: return convert_row<kFloat32, SCALED>(src, dst, n, scale);
    case kFloat16: return convert_row<kFloat16, SCALED>(src, dst, n, scale);
    default: return convert_row<kBFloat16, SCALED>(src, dst, n, scale);
  }
}

struct Task {
  int64_t job, row0, row1;
  bool up;  // rows of up (else rows of down)
};

int64_t element_size(int64_t dtype) { return dtype == kFloat32 ? 4 : 2; }

bool run_task(const PackJob& job, const Task& t) {
  bool bad = false;
  if (t.up) {
    const float scale = float_of(static_cast<uint32_t>(job.scale_bits));
    const int64_t es = element_size(job.dtype_up);
    for (int64_t r = t.row0; r < t.row1; ++r) {
      const char* src = reinterpret_cast<const char*>(job.up_src) + r * job.ld_up_src * es;
      float* dst = job.up_dst ? reinterpret_cast<float*>(job.up_dst) + r * job.ld_up_dst : nullptr;
      bad |= convert_row_any<true>(job.dtype_up, src, dst, job.rank, scale);
    }
  } else {
    const int64_t es = element_size(job.dtype_down);
    for (int64_t k = t.row0; k < t.row1; ++k) {
      const char* src = reinterpret_cast<const char*>(job.down_src) + k * job.ld_down_src * es;
      float* dst = job.down_dst ? reinterpret_cast<float*>(job.down_dst) + k * job.ld_down_dst : nullptr;
      bad |= convert_row_any<false>(job.dtype_down, src, dst, job.cols, 1.0f);
    }
  }
  return bad;
}

}  // namespace

void cpu_pack(const PackJob* jobs, int64_t n_jobs, int n_threads, uint8_t* finite) {
  std::vector<Task> tasks;
  for (int64_t n = 0; n < n_jobs; ++n) {
    const PackJob& job = jobs[n];
    const int64_t up_rows = std::max<int64_t>(1, kChunk / std::max<int64_t>(job.rank, 1));
    for (int64_t r = 0; r < job.rows && job.rank > 0; r += up_rows) {
      tasks.push_back({n, r, std::min(job.rows, r + up_rows), true});
    }
    const int64_t down_rows = std::max<int64_t>(1, kChunk / std::max<int64_t>(job.cols, 1));
    for (int64_t k = 0; k < job.rank; k += down_rows) {
      tasks.push_back({n, k, std::min(job.rank, k + down_rows), false});
    }
  }
  const int64_t n_tasks = static_cast<int64_t>(tasks.size());
  // not a std::vector<uint8_t>: its out-of-line code would be a symbol shared with baseline files
  std::unique_ptr<uint8_t[]> bad(new uint8_t[static_cast<size_t>(n_tasks) + 1]());
#ifndef _OPENMP
  (void)n_threads;
#else
  if (n_threads <= 0) n_threads = omp_get_max_threads();
  n_threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n_threads, n_tasks)));
#pragma omp parallel num_threads(n_threads)
#endif
  {
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 4)
#endif
    for (int64_t i = 0; i < n_tasks; ++i) {
      bad[static_cast<size_t>(i)] = run_task(jobs[tasks[i].job], tasks[i]) ? 1 : 0;
    }
#ifdef LORARAR_CPU_AVX2
    _mm_sfence();  // this thread's streaming stores are visible before the pass returns
#endif
  }
  for (int64_t n = 0; n < n_jobs; ++n) finite[n] = 1;
  for (int64_t i = 0; i < n_tasks; ++i) {
    if (bad[static_cast<size_t>(i)]) finite[tasks[i].job] = 0;
  }
}

}  // namespace lorarar
