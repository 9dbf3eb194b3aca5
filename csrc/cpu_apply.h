// CPU kernel of the pass over the weights (the `cpp` backend). See cpu_apply.cpp; the paths: cpu_isa.h.
#pragma once

#include <cstdint>

#include "job_table.h"

namespace lorarar {

// dst = round(float32(src) + up @ (down * S)) for every job on CPU path `path` (cpu_isa.h; -1: the best
// one here; the caller checks that the path runs: cpu_path_unsupported). fp32 accumulation in a fixed
// order (bits do not depend on n_threads); jobs must have been validated (see module.cpp). Returns the
// index of the first job that wrote a non-finite value (+-Inf or NaN after rounding), -1 when none.
int64_t cpu_apply(const Job* jobs, int64_t n_jobs, int n_threads, int path = -1);

}  // namespace lorarar
