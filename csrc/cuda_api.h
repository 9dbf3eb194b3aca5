// Host-side entry points of the CUDA kernels (cuda_apply.cu, cuda_coefficients.cu). Plain C++ types only,
// so module.cpp compiles without the CUDA headers. Every function throws std::runtime_error on a CUDA
// error; none synchronises.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "job_table.h"

namespace lorarar {

// Tile of W one thread block of the grouped apply covers.
inline constexpr int64_t kCudaTileRows = 128;
inline constexpr int64_t kCudaTileCols = 128;
// Columns one thread block of the coefficient kernel covers; the largest hidden width it supports.
inline constexpr int64_t kCoeffTileCols = 32;
inline constexpr int64_t kCoeffMaxHidden = 256;

// "" when `device` can run the kernels compiled into this module, else why not.
std::string cuda_unavailable(int device);

// Grouped apply: one launch over every tile of every layer. `table` is a device buffer holding the n_jobs
// Job rows (tile_start filled) followed by `total_tiles` int32 layer indices (see native.py's planner).
// All jobs share `dtype`. Runs on `stream` (a cudaStream_t as an integer) of `device`. `first_bad`: the
// device address of an int32 the caller set to INT32_MAX; the kernel atomicMin's into it the index of any
// job it wrote +-Inf or NaN into (tested on the write-back), so afterwards it holds the first such job.
void cuda_apply(int64_t table, int64_t n_jobs, int64_t total_tiles, int64_t dtype, int device,
                int64_t stream, int64_t first_bad);

// Batched hypernetwork coefficients for layers of one width: out = b2 + W2 relu(P A + b1), one launch.
// `table` is a device buffer of CoeffJob rows followed by `total_tiles` int32 layer indices.
// b1 [hidden], w2 [2, hidden] (contiguous), b2 [2]: device fp32 addresses.
void cuda_coefficients(int64_t table, int64_t n_jobs, int64_t total_tiles, int64_t hidden, int64_t b1,
                       int64_t w2, int64_t b2, int device, int64_t stream);

}  // namespace lorarar
