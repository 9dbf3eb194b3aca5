// The portable path of the CPU kernel: the blocking of cpu_blocking.h with a scalar 6 x 16 register tile
// (std::fma, k ascending from zero, the same bits as the vector paths). Compiled without instruction-set
// flags: it runs on any CPU and is what a non-x86 build or a pre-AVX2 CPU gets.
#include <cmath>

#include "cpu_blocking.h"
#include "cpu_isa.h"

namespace lorarar {
namespace {

struct PortableTile {
  static constexpr int MR = 6, NR = 16;
  template <int DT>
  static bool run(const Job& job, int64_t r, int64_t c, int mr, int nr, const float* a, const float* b) {
    float acc[MR * NR] = {};
    for (int64_t k = 0; k < job.rank; ++k, a += MR, b += NR) {
      for (int i = 0; i < MR; ++i) {
        const float x = a[i];
        for (int j = 0; j < NR; ++j) acc[i * NR + j] = std::fma(x, b[j], acc[i * NR + j]);
      }
    }
    return epilogue_scalar<DT>(job, r, c, mr, nr, acc, NR);
  }
};

}  // namespace

bool cpu_task_portable(const Job& job, int64_t r0, int64_t c0, float* ap, float* bp) {
  return run_task_any<PortableTile>(job, r0, c0, ap, bp);
}

}  // namespace lorarar
