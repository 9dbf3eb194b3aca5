// The job table shared by Python (lorarar_kernels/ops/native.py), the CPU kernel and the CUDA kernels.
//
// One row per layer of a swap, all int64 (raw addresses and sizes; no libtorch):
//   dst = round_to_dtype(float32(src) + up @ (down * S)),  S[k, j] = col_scale[(k < split ? 0 : 1), j]
// with dst/src [rows, cols] (row stride ld_dst / ld_src elements, unit column stride), up [rows, rank]
// fp32 (row stride ld_up), down [rank, cols] fp32 (row stride ld_down), col_scale [2, cols] fp32 (row stride
// ld_col_scale) or 0 for S = 1. `tile_start` is filled by the CUDA planner (first tile of the layer in the
// grouped launch); the CPU kernel ignores it.
//
// `sources` = 1 (CPU kernel only; the CUDA planner refuses it): the factors are read where the two LoRAs
// keep them instead of from packed fp32 copies. Rank rows k < split come from `up` [rows, split] and
// `down` [split, cols], the others from `up2` [rows, rank - split] and `down2` [rank - split, cols], each
// with its own row stride and dtype code (`dtypes`: 4 bits each, up | down << 4 | up2 << 8 | down2 << 12)
// and the up factors times their LoRA scale (`lora_scales`: fp32 bits, up's in the low and up2's in the high
// 32 bits): up[r, k] = float32(up_src[r, k]) * scale, one fp32 multiply, as the packed copies are made.
#pragma once

#include <cstdint>

namespace lorarar {

enum DType : int64_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct Job {
  int64_t dst, src, up, down, col_scale;
  int64_t rows, cols, rank, split;
  int64_t ld_dst, ld_src, ld_up, ld_down, ld_col_scale;
  int64_t dtype, tile_start;
  int64_t sources, up2, down2, ld_up2, ld_down2, dtypes, lora_scales, pad0;
};
static_assert(sizeof(Job) == 24 * sizeof(int64_t), "Job must be 24 packed int64 fields");

// Field order of Job, exported to Python as _C.JOB_FIELDS so that native.py fills rows by name.
inline constexpr const char* kJobFields[24] = {
    "dst",     "src",    "up",    "down",    "col_scale", "rows",  "cols",      "rank",
    "split",   "ld_dst", "ld_src", "ld_up", "ld_down", "ld_col_scale", "dtype", "tile_start",
    "sources", "up2",    "down2", "ld_up2", "ld_down2", "dtypes", "lora_scales", "pad0"};

// One layer of the batched hypernetwork coefficient kernel (all layers of one width share the head):
//   out[:, j] = b2 + W2 relu(P @ A[:, j] + b1),   P [hidden, rank], A [rank, cols], out [2, cols], fp32.
struct CoeffJob {
  int64_t p, a, out;
  int64_t cols, rank, ld_p, ld_a, ld_out;
  int64_t tile_start, pad0, pad1, pad2;
};
static_assert(sizeof(CoeffJob) == 12 * sizeof(int64_t), "CoeffJob must be 12 packed int64 fields");

inline constexpr const char* kCoeffFields[12] = {"p",    "a",    "out",   "cols",       "rank", "ld_p",
                                                 "ld_a", "ld_out", "tile_start", "pad0", "pad1", "pad2"};

// One LoRA's factors copied into a swap's packed fp32 factors (csrc/cpu_pack.cpp):
//   up_dst[r, k] = float32(up_src[r, k]) * scale,   down_dst[k, j] = float32(down_src[k, j])
// up [rows, rank], down [rank, cols], each with its own row stride and dtype code (unit column stride);
// `scale_bits` holds the fp32 bits of the LoRA scale. The kernel reports whether every written value is
// finite, so a plan needs no second pass over its factors. up_dst = down_dst = 0: check only (the values
// up_dst/down_dst would get are checked, nothing is written).
struct PackJob {
  int64_t up_src, down_src, up_dst, down_dst;
  int64_t rows, cols, rank;
  int64_t ld_up_src, ld_down_src, ld_up_dst, ld_down_dst;
  int64_t dtype_up, dtype_down, scale_bits, pad0, pad1;
};
static_assert(sizeof(PackJob) == 16 * sizeof(int64_t), "PackJob must be 16 packed int64 fields");

inline constexpr const char* kPackFields[16] = {
    "up_src",      "down_src",    "up_dst",   "down_dst",   "rows",       "cols", "rank", "ld_up_src",
    "ld_down_src", "ld_up_dst", "ld_down_dst", "dtype_up", "dtype_down", "scale_bits", "pad0", "pad1"};

}  // namespace lorarar
