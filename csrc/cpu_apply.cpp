// CPU kernel of the `cpp` backend: W_dst = round(float32(W_src) + up @ (down * S)) for a table of layers.
//
// This file is the driver, compiled without instruction-set flags: it cuts the table into tasks (layer,
// up to kTaskRows rows, block_cols(rank) columns: cpu_blocking.h; the cut depends on the shapes only,
// never on the thread count or the path), runs them on OpenMP threads (dynamic schedule, each output
// element written by exactly one task) and calls the register-tile code of one path per task:
//   portable  cpu_apply_portable.cpp  scalar fp32 FMA                               same bits as avx2/avx512
//   avx2      cpu_apply_avx2.cpp      6 x 16 ymm tile, fp32 FMA                     same bits
//   avx512    cpu_apply_avx512.cpp    12 x 32 zmm tile, fp32 FMA                    same bits
//   amx       cpu_apply_amx.cpp       bf16 weights on AMX tiles (operands rounded to bf16 once, fp32
//                                     accumulation); fp32/fp16 weights take the avx512 code
// Every path tests the values it writes for Inf/NaN on the write-back itself (cpu_blocking.h:
// nonfinite_from), one flag per task, so the caller learns the first layer written non-finite without a
// second pass; the pass still writes every task (the caller rolls the swap back).
// The path comes from cpuid at run time (cpu_isa.cpp) or from the caller (LORARAR_CPU_PATH in Python).
#include "cpu_apply.h"

#include <algorithm>
#include <cstdlib>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_blocking.h"
#include "cpu_isa.h"

namespace lorarar {
namespace {

struct Task {
  int64_t job, r0, c0;
};

// Floats of each per-thread scratch block for a given rank (packed up rows / packed down * S; the AMX
// path pads the rank to 32 and keeps bf16 pairs, which fits in the same size).
int64_t scratch_floats(int64_t rank) { return std::max(kMC, block_cols(rank)) * (rank + 32); }

float* alloc_floats(int64_t n) {
  const size_t bytes = (static_cast<size_t>(std::max<int64_t>(n, 16)) * sizeof(float) + 63) / 64 * 64;
  return static_cast<float*>(std::aligned_alloc(64, bytes));
}

CpuTaskFn task_fn(int path, int64_t dtype) {
  switch (path) {
#ifdef LORARAR_HAVE_AMX
    case kPathAmx: return dtype == kBFloat16 ? cpu_task_amx : cpu_task_avx512;
#endif
#ifdef LORARAR_HAVE_AVX512
    case kPathAvx512: return cpu_task_avx512;
#endif
#ifdef LORARAR_HAVE_AVX2
    case kPathAvx2: return cpu_task_avx2;
#endif
    default: (void)dtype; return cpu_task_portable;
  }
}

}  // namespace

int64_t cpu_apply(const Job* jobs, int64_t n_jobs, int n_threads, int path) {
  if (path < 0) path = cpu_best_path();
  const std::string why = cpu_path_unsupported(path);
  if (!why.empty()) throw std::runtime_error(std::string("CPU path ") + cpu_path_name(path) + ": " + why);
  std::vector<Task> tasks;
  int64_t max_rank = 0;
  bool amx = false;
  for (int64_t n = 0; n < n_jobs; ++n) {
    const Job& job = jobs[n];
    const int64_t nc = block_cols(job.rank);
    max_rank = std::max(max_rank, job.rank);
    amx |= path == kPathAmx && job.dtype == kBFloat16;
    for (int64_t c0 = 0; c0 < job.cols; c0 += nc) {
      for (int64_t r0 = 0; r0 < job.rows; r0 += kTaskRows) tasks.push_back({n, r0, c0});
    }
  }
  const int64_t n_tasks = static_cast<int64_t>(tasks.size());
  const int64_t scratch = scratch_floats(max_rank);
  std::vector<uint8_t> task_bad(static_cast<size_t>(n_tasks), 0);  // each written by its task's thread
  bool failed = false;
#ifndef _OPENMP
  (void)n_threads;
#else
  if (n_threads <= 0) n_threads = omp_get_max_threads();
  n_threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n_threads, n_tasks)));
#pragma omp parallel num_threads(n_threads) reduction(|| : failed)
#endif
  {
    float* ap = alloc_floats(scratch);
    float* bp = alloc_floats(scratch);
    if (ap == nullptr || bp == nullptr) failed = true;
#ifdef LORARAR_HAVE_AMX
    if (amx) amx_thread_begin();
#endif
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t n = 0; n < n_tasks; ++n) {
      if (ap == nullptr || bp == nullptr) continue;
      const Task& t = tasks[n];
      const Job& job = jobs[t.job];
      task_bad[n] = task_fn(path, job.dtype)(job, t.r0, t.c0, ap, bp) ? 1 : 0;
    }
#ifdef LORARAR_HAVE_AMX
    if (amx) amx_thread_end();
#endif
    std::free(ap);
    std::free(bp);
  }
  (void)amx;
  if (failed) throw std::bad_alloc();
  for (int64_t n = 0; n < n_tasks; ++n) {  // tasks are in job order: the first flagged is the first job
    if (task_bad[n]) return tasks[n].job;
  }
  return -1;
}

}  // namespace lorarar
