// CPU kernel of the pass over the weights (the `cpp` backend). See cpu_apply.cpp.
#pragma once

#include <cstdint>

#include "job_table.h"

namespace lorarar {

// Instruction set the CPU kernel was compiled for: "avx2+fma+f16c" (x86-64-v3) or "portable".
const char* cpu_kernel_isa();

// dst = round(float32(src) + up @ (down * S)) for every job; fp32 accumulation in a fixed order (bits do
// not depend on n_threads); jobs must have been validated (see module.cpp).
void cpu_apply(const Job* jobs, int64_t n_jobs, int n_threads);

}  // namespace lorarar
