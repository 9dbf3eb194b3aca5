// The CPU kernel's paths and how one is chosen: cpuid (and the OS's XSAVE state) at run time, never the
// build machine's flags. See cpu_isa.cpp and cpu_apply.cpp.
#pragma once

#include <cstdint>
#include <string>

#include "job_table.h"

namespace lorarar {

// Paths, slowest to fastest. kPathAmx = the AVX-512 path with bf16 weights on AMX tiles.
enum CpuPath : int { kPathPortable = 0, kPathAvx2 = 1, kPathAvx512 = 2, kPathAmx = 3, kNumPaths = 4 };

const char* cpu_path_name(int path);                   // "portable", "avx2", "avx512", "amx"
std::string cpu_path_unsupported(int path);            // "" when this binary and this CPU can run it
int cpu_best_path();                                   // the fastest path that runs here
std::string cpu_model();                               // the CPU's brand string ("" when unknown)

// One task of the pass (see cpu_blocking.h): rows [r0, r0 + kTaskRows) x columns [c0, c0 + block_cols)
// of one job. ap / bp: per-thread scratch of cpu_scratch_floats(rank) floats each, 64-byte aligned.
// Returns whether any value the task wrote is non-finite (tested on the write-back, cpu_blocking.h).
using CpuTaskFn = bool (*)(const Job& job, int64_t r0, int64_t c0, float* ap, float* bp);
bool cpu_task_portable(const Job& job, int64_t r0, int64_t c0, float* ap, float* bp);
#ifdef LORARAR_HAVE_AVX2
bool cpu_task_avx2(const Job& job, int64_t r0, int64_t c0, float* ap, float* bp);
#endif
#ifdef LORARAR_HAVE_AVX512
bool cpu_task_avx512(const Job& job, int64_t r0, int64_t c0, float* ap, float* bp);
#endif
#ifdef LORARAR_HAVE_AMX
// bf16 weights only (the other dtypes take cpu_task_avx512); amx_thread_begin() before a thread's first
// task (loads the tile configuration), amx_thread_end() after its last.
bool cpu_task_amx(const Job& job, int64_t r0, int64_t c0, float* ap, float* bp);
void amx_thread_begin();
void amx_thread_end();
#endif

}  // namespace lorarar
