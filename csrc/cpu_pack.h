// CPU kernel that packs LoRA factors into a swap's fp32 factors and checks them. See cpu_pack.cpp.
#pragma once

#include <cstdint>

#include "job_table.h"

namespace lorarar {

// Runs every job (see PackJob); finite[i] = 1 when every value job i wrote is finite, else 0. Jobs must
// have been validated (module.cpp) and must not overlap one another's destinations.
void cpu_pack(const PackJob* jobs, int64_t n_jobs, int n_threads, uint8_t* finite);

}  // namespace lorarar
