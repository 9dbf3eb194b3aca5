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

// The rule behind the paths, from the registers alone (a pure function, so that tests can feed it any CPU):
// ecx1 = cpuid(1).ecx, ebx7 / edx7 = cpuid(7, 0).ebx / .edx, xcr0_bits = XGETBV(0) (ignored without OSXSAVE).
// amx_tiles_os: the OS saves tile state (XCR0 bits 17-18); amx also needs Linux's permission (cpu_isa.cpp).
struct CpuFeatures {
  bool avx2 = false, avx512 = false, amx_cpu = false, amx_tiles_os = false;
};
CpuFeatures cpu_features_from(uint32_t ecx1, uint32_t ebx7, uint32_t edx7, uint64_t xcr0_bits);

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
