// The AMX path of the CPU kernel, bf16 weights only (fp32/fp16 weights take the AVX-512 code):
//   dst = round_bf16(float32(src) + bf16(up) @ bf16(down * S)),
// i.e. `up` (times its LoRA scale, in fp32) and `down * S` (formed in fp32, one multiply) are each rounded
// to bf16 once (round-to-nearest-even, as the CUDA kernel does for 16-bit weights), then multiplied on AMX
// tiles (TDPBF16PS: exact bf16 products, fp32 accumulation; the hardware treats subnormal bf16 inputs as
// zero and flushes subnormal fp32 results), in a fixed order: 32 rank values per instruction, the rank
// chunks ascending from a zero accumulator. The fp32 source is added once and rounded once on write-back
// (AVX-512, torch's `.to(bfloat16)` bits). Error against the exact update, per element:
//   |err| <= 1 ulp_bf16 + (2 * 2^-8 + R * 2^-24) * (|up| @ |down * S|)   (R = rank; plus 2^-126-sized
//   terms for flushed subnormals), the documented bound the tests hold this path to.
// Bits depend on the inputs only (not on the thread count: the tasks of cpu_apply.cpp, each output tile
// written by one thread). Blocking per task: down * S packed once in bf16 pairs [rank/2][cols][2] (the
// VNNI layout of the B operand), then per 32 rows `up` packed in bf16 [32][rank] and a 32 x 32 output
// block computed in four accumulator tiles (2 x 2 of 16 x 16), two A and two B tiles per 32 rank values.
//
// Compiled with -mamx-tile -mamx-bf16 and AVX-512 F/BW/VL (this file only, CMakeLists.txt); cpu_apply.cpp
// calls in only when cpu_isa.cpp found AMX usable here (CPU, XCR0, and Linux's tile-data permission).
#include <immintrin.h>

#include "cpu_avx512_io.h"
#include "cpu_blocking.h"
#include "cpu_isa.h"

namespace lorarar {
namespace {

constexpr int64_t kRows = 32, kCols = 32, kKStep = 32;  // output block, rank values per TDPBF16PS

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

inline __mmask16 mask_of(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1);
}

// bf16 pairs of (down * S) rows (2p, 2p + 1), columns [c0, c0 + nc_pad) -> bp[p][n] (low half: row 2p);
// rows past the rank and columns past the layer are zero.
void pack_down_pairs(const Job& job, int64_t c0, int64_t nc, int64_t nc_pad, int64_t k_pad, uint32_t* bp,
                     float* scratch) {
  const Part parts[2] = {part_of(job, false), part_of(job, true)};
  float* buf0 = scratch;
  float* buf1 = scratch + kNCMax;
  for (int64_t p = 0; p < k_pad / 2; ++p) {
    const float* rows[2] = {nullptr, nullptr};
    const float* srows[2] = {nullptr, nullptr};
    for (int h = 0; h < 2; ++h) {
      const int64_t k = 2 * p + h;
      if (k < job.rank) rows[h] = down_row(job, parts, k, c0, nc, h == 0 ? buf0 : buf1, &srows[h]);
    }
    uint32_t* out = bp + p * nc_pad;
    for (int64_t j = 0; j < nc_pad; j += 16) {
      const __mmask16 m = mask_of(nc - j);
      __m512i half[2];
      for (int h = 0; h < 2; ++h) {
        if (rows[h] == nullptr) {
          half[h] = _mm512_setzero_si512();
          continue;
        }
        __m512 v = _mm512_maskz_loadu_ps(m, rows[h] + j);
        if (srows[h]) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, srows[h] + j));
        half[h] = _mm512_maskz_mov_epi32(m, bf16_bits32(v));
      }
      _mm512_store_si512(out + j, _mm512_or_si512(half[0], _mm512_slli_epi32(half[1], 16)));
    }
  }
}

// bf16 of up rows [r0, r0 + 32) -> ap[i][k] (row stride k_pad); rows past the layer and k >= rank zero.
void pack_up_rows(const Job& job, int64_t r0, int64_t k_pad, uint16_t* ap, float* row, float* scratch) {
  const Part parts[2] = {part_of(job, false), part_of(job, true)};
  for (int64_t i = 0; i < kRows; ++i) {
    uint16_t* out = ap + i * k_pad;
    const int64_t r = r0 + i;
    if (r < job.rows) up_row(job, parts, r, row, 1, scratch);
    for (int64_t k = 0; k < k_pad; k += 16) {
      const __mmask16 m = r < job.rows ? mask_of(job.rank - k) : 0;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k),
                          _mm256_maskz_mov_epi16(m, bf16_round(_mm512_maskz_loadu_ps(m, row + k))));
    }
  }
}

// dst rows [r, r + mr) x columns [c, c + nr) = round(src + acc), acc [32][32] fp32. Returns whether any
// written value is non-finite.
bool epilogue(const Job& job, int64_t r, int64_t c, int64_t mr, int64_t nr, const float* acc) {
  const char* src = reinterpret_cast<const char*>(job.src);
  char* dst = reinterpret_cast<char*>(job.dst);
  const __mmask16 m0 = mask_of(nr), m1 = mask_of(nr - 16);
  __mmask16 bad = 0;
  if (nr == kCols && can_stream(job, 2)) {  // c is a multiple of 32: every row write is one whole line
    for (int64_t i = 0; i < mr; ++i) {
      const char* s = src + ((r + i) * job.ld_src + c) * 2;
      const __m512 lo = _mm512_add_ps(load_n<kBFloat16>(s, m0), _mm512_load_ps(acc + i * kCols));
      const __m512 hi = _mm512_add_ps(load_n<kBFloat16>(s + 32, m1), _mm512_load_ps(acc + i * kCols + 16));
      bad |= nonfinite16<kBFloat16>(m0, lo) | nonfinite16<kBFloat16>(m1, hi);
      stream32<kBFloat16>(dst + ((r + i) * job.ld_dst + c) * 2, lo, hi);
    }
    return bad != 0;
  }
  for (int64_t i = 0; i < mr; ++i) {
    const char* s = src + ((r + i) * job.ld_src + c) * 2;
    char* d = dst + ((r + i) * job.ld_dst + c) * 2;
    const __m512 lo = _mm512_add_ps(load_n<kBFloat16>(s, m0), _mm512_load_ps(acc + i * kCols));
    const __m512 hi = _mm512_add_ps(load_n<kBFloat16>(s + 32, m1), _mm512_load_ps(acc + i * kCols + 16));
    bad |= nonfinite16<kBFloat16>(m0, lo) | nonfinite16<kBFloat16>(m1, hi);
    store_n<kBFloat16>(d, lo, m0);
    store_n<kBFloat16>(d + 32, hi, m1);
  }
  return bad != 0;
}

}  // namespace

void amx_thread_begin() {
  TileConfig cfg = {};
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {  // every tile 16 rows x 64 bytes (16 fp32 or 32 bf16 / 16 bf16 pairs)
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  // GCC 12 treats the LDTILECFG builtin as not reading cfg and drops the stores above without this.
  __asm__ __volatile__("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

void amx_thread_end() { _tile_release(); }

bool cpu_task_amx(const Job& job, int64_t r_task, int64_t c_task, float* ap_f, float* bp_f) {
  const int64_t nc = lmin(block_cols(job.rank), job.cols - c_task);
  const int64_t nc_pad = round_up(nc, kCols);
  const int64_t k_pad = round_up(lmax(job.rank, 1), kKStep);
  // scratch (cpu_apply.cpp gives max(kMC, block_cols) * (rank + 32) floats each): ap = A block (32 x k_pad
  // bf16), one fp32 up row, conversion buffers; bp = the bf16 pairs of down * S (k_pad / 2 x nc_pad).
  uint16_t* ap = reinterpret_cast<uint16_t*>(ap_f);
  float* row = ap_f + kRows * k_pad / 2;
  float* scratch = row + k_pad;
  uint32_t* bp = reinterpret_cast<uint32_t*>(bp_f);
  pack_down_pairs(job, c_task, nc, nc_pad, k_pad, bp, scratch);
  alignas(64) float acc[kRows * kCols];
  bool bad = false;
  const int64_t r_end = lmin(job.rows, r_task + kTaskRows);
  const int64_t a_stride = k_pad * 2, b_stride = nc_pad * 4;
  for (int64_t r0 = r_task; r0 < r_end; r0 += kRows) {
    pack_up_rows(job, r0, k_pad, ap, row, scratch);
    for (int64_t j = 0; j < nc_pad; j += kCols) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t k = 0; k < k_pad; k += kKStep) {
        _tile_loadd(4, ap + k, a_stride);
        _tile_loadd(5, ap + 16 * k_pad + k, a_stride);
        const uint32_t* b = bp + (k / 2) * nc_pad + j;
        _tile_loadd(6, b, b_stride);
        _tile_loadd(7, b + 16, b_stride);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, acc, kCols * 4);
      _tile_stored(1, acc + 16, kCols * 4);
      _tile_stored(2, acc + 16 * kCols, kCols * 4);
      _tile_stored(3, acc + 16 * kCols + 16, kCols * 4);
      bad |= epilogue(job, r0, c_task + j, lmin(kRows, r_end - r0), lmin(kCols, nc - j), acc);
    }
  }
  _mm_sfence();  // the task's streaming stores are globally visible before the pass returns
  return bad;
}

}  // namespace lorarar
