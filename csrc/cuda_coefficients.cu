// Batched low-rank hypernetwork coefficients (docs/design.md section 2), one launch for all layers of a width:
//   out[:, j] = b2 + W2 relu(P @ A[:, j] + b1),  P [hidden, R] = [s_c W1c B_c | s_s W1s B_s], A [R, in]
// (= [A_c; A_s]), out [2, in] = (m_c; m_s). fp32 FMA throughout (the coefficients feed every weight).
//
// Block = 256 threads and 32 columns of one layer; thread h owns hidden unit h (hidden <= 256) and keeps
// 32 column sums in registers while P and A stream through shared memory in rank chunks of 32. The head
// then sums over h = 0..hidden-1 in order for each (output, column): deterministic, no atomics.
#include <cuda_runtime.h>

#include "cuda_api.h"
#include "cuda_common.cuh"

namespace lorarar {
namespace {

constexpr int CT = static_cast<int>(kCoeffTileCols);
constexpr int HMAX = static_cast<int>(kCoeffMaxHidden);
constexpr int KC = 32;  // rank chunk
constexpr int THREADS = 256;
static_assert(THREADS == HMAX, "one thread per hidden unit");
static_assert(KC == CT, "P chunk and hidden-activation buffers share one shared-memory array");

__global__ void __launch_bounds__(THREADS)
    coefficients_kernel(const CoeffJob* __restrict__ jobs, const int32_t* __restrict__ tile_map, int hidden,
                        const float* __restrict__ b1, const float* __restrict__ w2,
                        const float* __restrict__ b2) {
  __shared__ float Ps[HMAX][KC + 1];  // P chunk; later the activations relu(h) [hidden][CT]
  __shared__ float As[KC][CT];

  const CoeffJob job = jobs[tile_map[blockIdx.x]];
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) - job.tile_start) * CT;
  const float* P = reinterpret_cast<const float*>(job.p);
  const float* A = reinterpret_cast<const float*>(job.a);
  const int h = threadIdx.x;

  float acc[CT];
#pragma unroll
  for (int c = 0; c < CT; ++c) acc[c] = 0.0f;

  for (int64_t k0 = 0; k0 < job.rank; k0 += KC) {
    for (int e = threadIdx.x; e < hidden * KC; e += THREADS) {  // a warp reads 32 k of one row of P
      const int hh = e / KC, kk = e % KC;
      Ps[hh][kk] = k0 + kk < job.rank ? P[hh * job.ld_p + k0 + kk] : 0.0f;
    }
    for (int e = threadIdx.x; e < KC * CT; e += THREADS) {
      const int kk = e / CT, c = e % CT;
      As[kk][c] = (k0 + kk < job.rank && c0 + c < job.cols) ? A[(k0 + kk) * job.ld_a + c0 + c] : 0.0f;
    }
    __syncthreads();
    if (h < hidden) {
      for (int kk = 0; kk < KC; ++kk) {
        const float p = Ps[h][kk];
#pragma unroll
        for (int c = 0; c < CT; ++c) acc[c] = fmaf(p, As[kk][c], acc[c]);
      }
    }
    __syncthreads();
  }

  const float bias = h < hidden ? b1[h] : 0.0f;
#pragma unroll
  for (int c = 0; c < CT; ++c) Ps[h][c] = h < hidden ? fmaxf(acc[c] + bias, 0.0f) : 0.0f;
  __syncthreads();

  if (threadIdx.x < 2 * CT) {
    const int o = threadIdx.x / CT, c = threadIdx.x % CT;
    float s = 0.0f;
    for (int hh = 0; hh < hidden; ++hh) s = fmaf(w2[o * hidden + hh], Ps[hh][c], s);
    if (c0 + c < job.cols) reinterpret_cast<float*>(job.out)[o * job.ld_out + c0 + c] = s + b2[o];
  }
}

}  // namespace

void cuda_coefficients(int64_t table, int64_t n_jobs, int64_t total_tiles, int64_t hidden, int64_t b1,
                       int64_t w2, int64_t b2, int device, int64_t stream) {
  DeviceGuard guard(device);
  const CoeffJob* jobs = reinterpret_cast<const CoeffJob*>(table);
  const int32_t* tile_map =
      reinterpret_cast<const int32_t*>(table + n_jobs * static_cast<int64_t>(sizeof(CoeffJob)));
  const unsigned grid = static_cast<unsigned>(total_tiles);
  coefficients_kernel<<<grid, THREADS, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      jobs, tile_map, static_cast<int>(hidden), reinterpret_cast<const float*>(b1),
      reinterpret_cast<const float*>(w2), reinterpret_cast<const float*>(b2));
  cuda_check(cudaGetLastError(), "coefficients_kernel launch");
}

}  // namespace lorarar
