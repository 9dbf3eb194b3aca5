// The blocking shared by the CPU kernels' fp32-FMA paths (cpu_apply_portable.cpp, cpu_apply_avx2.cpp,
// cpu_apply_avx512.cpp): one task = (layer, up to kBlockCols columns, up to kTaskRows rows); `down * S`
// packed once per task into NR-column strips [K][NR], `up` packed per kMC rows into MR-row strips [K][MR],
// and an MR x NR register tile run over the whole rank from zero (the classic packed-GEMM blocking of
// Goto & van de Geijn, "Anatomy of high-performance matrix multiplication", TOMS 2008, with the rank as
// one K block). The tasks are the same for every path (cpu_apply.cpp makes them); only MR/NR and the tile
// differ, and every path sums each output over k = 0..rank-1 in order with fused multiply-adds from zero,
// so all fp32-FMA paths give the same bits.
//
// Internal linkage only (an unnamed namespace): each including file is compiled with its own instruction
// set, and nothing here may become a symbol shared between them.
#pragma once

#include <cstdint>

#include "cpu_convert.h"
#include "job_table.h"

namespace lorarar {
namespace {

constexpr int64_t kMC = 240;         // rows packed at a time: up block (kMC x rank fp32, 120 KiB at rank 128)
constexpr int64_t kNCMax = 512;      // columns per task: the packed down block (rank x NC fp32) <= 256 KiB
constexpr int64_t kTaskRows = 2 * kMC;  // rows per task (the packed down block is reused over them)

inline int64_t lmin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t lmax(int64_t a, int64_t b) { return a > b ? a : b; }

// Columns per task for a given rank: a multiple of 32 (every path's NR divides it), from the rank only.
inline int64_t block_cols(int64_t rank) {
  const int64_t nc = (65536 / lmax(rank, 1)) / 32 * 32;
  return lmin(kNCMax, lmax(128, nc));
}

inline int64_t element_size(int64_t dtype) { return dtype == kFloat32 ? 4 : 2; }

// Where rank row k of up and down lives: packed fp32, or one of the two LoRAs' own factors (Job::sources).
struct Part {
  const char* up;
  const char* down;
  int64_t ld_up, ld_down, dt_up, dt_down;
  float scale;
  bool scaled;
};

inline Part part_of(const Job& job, bool second) {
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
          convert::float_of(bits),
          true};
}

// fp32 values of up row r, rank entries [0, K), into out[k * stride] (the packed-or-sources split applied,
// the LoRA scale multiplied in once). `row` is scratch of kNCMax floats.
inline void up_row(const Job& job, const Part* parts, int64_t r, float* out, int64_t stride, float* row) {
  const int64_t K = job.rank;
  const int64_t k_split = job.sources ? job.split : K;
  for (int h = 0; h < 2; ++h) {
    const Part& p = parts[h];
    const int64_t k0 = h == 0 ? 0 : k_split, n = (h == 0 ? k_split : K) - k0;
    if (n <= 0) continue;
    if (p.dt_up == kFloat32 && !p.scaled) {
      const float* src = reinterpret_cast<const float*>(p.up) + r * p.ld_up;
      for (int64_t k = 0; k < n; ++k) out[(k0 + k) * stride] = src[k];
      continue;
    }
    const char* base = p.up + r * p.ld_up * element_size(p.dt_up);
    for (int64_t c = 0; c < n; c += kNCMax) {
      const int64_t m = lmin(kNCMax, n - c);
      convert::to_float(p.dt_up, base + c * element_size(p.dt_up), m, p.scale, p.scaled, row);
      for (int64_t k = 0; k < m; ++k) out[(k0 + c + k) * stride] = row[k];
    }
  }
}

// up rows [r0, r0 + mc_pad) -> ap[strip][k][MR]; rows past the layer are zero.
template <int MR>
void pack_up(const Job& job, int64_t r0, int64_t mc_pad, float* ap) {
  const int64_t K = job.rank;
  const Part parts[2] = {part_of(job, false), part_of(job, true)};
  float row[kNCMax];
  for (int64_t s = 0; s < mc_pad; s += MR) {
    float* strip = ap + s * K;
    for (int i = 0; i < MR; ++i) {
      const int64_t r = r0 + s + i;
      if (r >= job.rows) {
        for (int64_t k = 0; k < K; ++k) strip[k * MR + i] = 0.0f;
      } else {
        up_row(job, parts, r, strip + i, MR, row);
      }
    }
  }
}

// fp32 row k of (down * S), columns [c0, c0 + n): a pointer to it (in place, or converted into `buf`).
// `scaled` receives whether S still has to be applied (srow != nullptr).
inline const float* down_row(const Job& job, const Part* parts, int64_t k, int64_t c0, int64_t n,
                             float* buf, const float** srow) {
  const int64_t k_split = job.sources ? job.split : job.rank;
  const Part& p = parts[k < k_split ? 0 : 1];
  const int64_t kk = k < k_split ? k : k - k_split;
  const float* scale = reinterpret_cast<const float*>(job.col_scale);
  *srow = scale ? scale + (k < job.split ? 0 : job.ld_col_scale) + c0 : nullptr;
  if (p.dt_down == kFloat32) return reinterpret_cast<const float*>(p.down) + kk * p.ld_down + c0;
  convert::to_float(p.dt_down, p.down + (kk * p.ld_down + c0) * 2, n, 1.0f, false, buf);
  return buf;
}

// (down * S) columns [c0, c0 + nc_pad) -> bp[strip][k][NR]; columns past the layer are zero. S is folded
// in with one fp32 multiply, exactly as the torch reference forms down * S.
template <int NR>
void pack_down(const Job& job, int64_t c0, int64_t nc_pad, float* bp) {
  const int64_t K = job.rank;
  const Part parts[2] = {part_of(job, false), part_of(job, true)};
  const int64_t valid = lmin(nc_pad, job.cols - c0);
  float row_buf[kNCMax];
  for (int64_t k = 0; k < K; ++k) {
    const float* srow;
    const float* drow = down_row(job, parts, k, c0, valid, row_buf, &srow);
    for (int64_t t = 0; t < nc_pad; t += NR) {
      float* out = bp + t * K + k * NR;
      const int64_t n = lmin(NR, valid - t);
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

// The non-finite test of the write-back, on the fp32 value v before its one rounding: round_DT(v) is
// +-Inf or NaN exactly when (bits(v) & 0x7FFFFFFF) >= nonfinite_from<DT>() (rounding is monotone): fp32
// Inf/NaN themselves; fp16 from 65520 (the tie between 65504 and 2^16 rounds to even, i.e. to Inf); bf16
// from 0x7F7F8000 (the tie above the largest bf16, 0x7F7F, whose last bit is odd). Every path ORs this
// test over the values it writes, in registers, and returns it per task: no second pass over the weights.
template <int DT>
constexpr uint32_t nonfinite_from() {
  return DT == kFloat32 ? 0x7F800000u : DT == kFloat16 ? 0x477FF000u : 0x7F7F8000u;
}
template <int DT>
inline bool nonfinite1(float v) {
  return (convert::bits_of(v) & 0x7FFFFFFFu) >= nonfinite_from<DT>();
}

// Tile epilogue, any size: dst[r+i, c+j] = round(src[r+i, c+j] + acc[i * ld + j]) for i < mr, j < nr.
// Returns whether any written value is non-finite.
template <int DT>
bool epilogue_scalar(const Job& job, int64_t r, int64_t c, int mr, int nr, const float* acc, int ld) {
  const char* src = reinterpret_cast<const char*>(job.src);
  char* dst = reinterpret_cast<char*>(job.dst);
  bool bad = false;
  for (int i = 0; i < mr; ++i) {
    for (int j = 0; j < nr; ++j) {
      const float v = convert::load1<DT>(src, (r + i) * job.ld_src + c + j) + acc[i * ld + j];
      bad |= nonfinite1<DT>(v);
      convert::store1<DT>(dst, (r + i) * job.ld_dst + c + j, v);
    }
  }
  return bad;
}

// One task with register tile `Tile` (static MR, NR, template run<DT>(job, r, c, mr, nr, a, b), which
// returns whether it wrote a non-finite value). ap: kMC x rank floats, bp: block_cols(rank) x rank floats
// (64-byte aligned). Returns whether any value the task wrote is non-finite.
template <class Tile, int DT>
bool run_task_blocked(const Job& job, int64_t r_task, int64_t c_task, float* ap, float* bp) {
  constexpr int MR = Tile::MR, NR = Tile::NR;
  const int64_t K = job.rank;
  const int64_t nc = lmin(block_cols(K), job.cols - c_task);
  const int64_t nc_pad = (nc + NR - 1) / NR * NR;
  pack_down<NR>(job, c_task, nc_pad, bp);
  const int64_t r_end = lmin(job.rows, r_task + kTaskRows);
  bool bad = false;
  for (int64_t r0 = r_task; r0 < r_end; r0 += kMC) {
    const int64_t mc = lmin(kMC, r_end - r0);
    const int64_t mc_pad = (mc + MR - 1) / MR * MR;
    pack_up<MR>(job, r0, mc_pad, ap);
    // One up strip (K x MR) stays in L1 while the down strips stream from L2, and the tiles walk along
    // MR rows of the weights: MR sequential streams the hardware prefetchers follow (the pass is close to
    // memory-bound for fp32 weights on a 2-FMA-port core).
    for (int64_t i = 0; i < mc_pad; i += MR) {
      const int mr = static_cast<int>(lmin(MR, mc - i));
      for (int64_t j = 0; j < nc_pad; j += NR) {
        const int nr = static_cast<int>(lmin(NR, nc - j));
        bad |= Tile::template run<DT>(job, r0 + i, c_task + j, mr, nr, ap + i * K, bp + j * K);
      }
    }
  }
  return bad;
}

template <class Tile>
bool run_task_any(const Job& job, int64_t r0, int64_t c0, float* ap, float* bp) {
  switch (job.dtype) {
    case kFloat32: return run_task_blocked<Tile, kFloat32>(job, r0, c0, ap, bp);
    case kFloat16: return run_task_blocked<Tile, kFloat16>(job, r0, c0, ap, bp);
    default: return run_task_blocked<Tile, kBFloat16>(job, r0, c0, ap, bp);
  }
}

}  // namespace
}  // namespace lorarar
