// CUDA kernel of the `cuda` backend: W_dst = round(float32(W_src) + up @ (down * S)) for every layer of a
// swap in ONE launch (a grouped GEMM over a device-side layer table; the tile -> layer map is built on the
// host once per plan, so a block finds its layer with one load).
//
// Block = 256 threads, a 128 x 128 tile of W; warps 4 x 2, each 32 x 64 (2 x 4 WMMA fragments).
// Per rank chunk of 32: up[r, k] and down[k, c] * S[k, c] are loaded (fp32, coalesced), the product with
// S is formed in fp32, and both are written to shared memory as the MMA operand type:
//   fp16 weights: operands rounded to fp16 (RNE), m16n16k16 fp16 MMA, fp32 accumulation;
//   bf16 weights: operands rounded to bf16 (RNE), m16n16k16 bf16 MMA, fp32 accumulation;
//   fp32 weights: 3xTF32: x = hi + lo with hi = tf32(x), lo = tf32(x - hi); acc += lo*hi' + hi*lo' + hi*hi'
//                 (m16n16k8 TF32 MMA, fp32 accumulation), error ~ that of fp32 FMA.
// Epilogue: the accumulator tile goes to shared memory; the block then streams its rows: dst = round(
// float32(src) + acc) with one round-to-nearest-even (128-bit loads and stores when aligned; all loads of a
// thread before its stores, since src and dst may alias).
// k runs in ascending chunks and each MMA's internal order is fixed by the hardware, so results are
// deterministic for a given GPU. No host sync, no allocation: the launch is graph-capturable.
// Non-finite outputs: each thread tests the fp32 values it writes (before their one rounding) against its
// dtype's overflow threshold; a warp that saw one lowers a device int32 to its layer's index (atomicMin),
// which the host reads after the launch (ops/native.py: CudaPlan.run, or check_finite after a graph
// replay; the read, a sync, is never inside the captured region).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <atomic>
#include <cstdint>
#include <string>

#include "cuda_api.h"
#include "cuda_common.cuh"

namespace lorarar {
namespace {

using namespace nvcuda;

constexpr int BM = static_cast<int>(kCudaTileRows);
constexpr int BN = static_cast<int>(kCudaTileCols);
constexpr int BK = 32;  // rank chunk staged in shared memory
constexpr int THREADS = 256;
constexpr int WARPS_N = 2;
constexpr int WM = 32, WN = 64;            // warp tile
constexpr int FM = WM / 16, FN = WN / 16;  // fragments per warp tile
constexpr int LDC = BN + 4;                // fp32 accumulator tile row stride (floats)

template <int DT>
struct Traits;
template <>
struct Traits<kFloat16> {
  using W = __half;     // weight element
  using S = __half;     // operand element in shared memory
  using Frag = __half;  // WMMA element type
  static constexpr int KS = 16;
  static constexpr int PAD = 8;
  __device__ static S operand(float x) { return __float2half_rn(x); }
};
template <>
struct Traits<kBFloat16> {
  using W = __nv_bfloat16;
  using S = __nv_bfloat16;
  using Frag = __nv_bfloat16;
  static constexpr int KS = 16;
  static constexpr int PAD = 8;
  __device__ static S operand(float x) { return __float2bfloat16_rn(x); }
};
template <>
struct Traits<kFloat32> {
  using W = float;
  using S = float;
  using Frag = wmma::precision::tf32;
  static constexpr int KS = 8;
  static constexpr int PAD = 4;
  __device__ static S operand(float x) { return x; }  // split into TF32 hi/lo at the fragment
};

template <int DT>
constexpr size_t operand_bytes() {
  using S = typename Traits<DT>::S;
  constexpr size_t a = static_cast<size_t>(BM) * (BK + Traits<DT>::PAD);
  constexpr size_t b = static_cast<size_t>(BK) * (BN + Traits<DT>::PAD);
  return (a + b) * sizeof(S);
}
template <int DT>
constexpr size_t smem_bytes() {
  constexpr size_t c = static_cast<size_t>(BM) * LDC * sizeof(float);
  return operand_bytes<DT>() > c ? operand_bytes<DT>() : c;
}

// Eight consecutive weights <-> floats. `v` is a register copy (by value): reading a reference into global
// memory through __half2* would make the compiler issue four 32-bit loads instead of one 128-bit load.
__device__ inline void unpack8(uint4 v, float* f, __half) {
  const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __half22float2(h[i]);
    f[2 * i] = t.x, f[2 * i + 1] = t.y;
  }
}
__device__ inline void unpack8(uint4 v, float* f, __nv_bfloat16) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __bfloat1622float2(h[i]);
    f[2 * i] = t.x, f[2 * i + 1] = t.y;
  }
}
__device__ inline uint4 pack8(const float* f, __half) {
  uint4 v;
  __half2* h = reinterpret_cast<__half2*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
  return v;
}
__device__ inline uint4 pack8(const float* f, __nv_bfloat16) {
  uint4 v;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
  return v;
}
__device__ inline void unpack8(uint4 lo, uint4 hi, float* f) {
  const uint32_t w[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
  for (int i = 0; i < 8; ++i) f[i] = __uint_as_float(w[i]);
}
__device__ inline float to_float(__half x) { return __half2float(x); }
__device__ inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ inline float to_float(float x) { return x; }
__device__ inline void from_float(float x, __half* p) { *p = __float2half_rn(x); }
__device__ inline void from_float(float x, __nv_bfloat16* p) { *p = __float2bfloat16_rn(x); }
__device__ inline void from_float(float x, float* p) { *p = x; }

// |fp32 bits| from which rounding to DT gives +-Inf or NaN (the test of csrc/cpu_blocking.h).
template <int DT>
__device__ inline bool nonfinite(float x) {
  constexpr uint32_t from = DT == kFloat32 ? 0x7F800000u : DT == kFloat16 ? 0x477FF000u : 0x7F7F8000u;
  return (__float_as_uint(x) & 0x7FFFFFFFu) >= from;
}

template <typename FragT>
__device__ inline void split_tf32(FragT& hi, FragT& lo) {
  for (int t = 0; t < hi.num_elements; ++t) {
    const float x = hi.x[t];
    const float h = wmma::__float_to_tf32(x);
    hi.x[t] = h;
    lo.x[t] = wmma::__float_to_tf32(x - h);
  }
}

// Two blocks per SM for 16-bit weights (<= 128 registers); 3xTF32 needs more registers for one.
template <int DT>
__global__ void __launch_bounds__(THREADS, DT == kFloat32 ? 1 : 2)
    grouped_apply_kernel(const Job* __restrict__ jobs, const int32_t* __restrict__ tile_map,
                         int32_t* __restrict__ first_bad) {
  using T = Traits<DT>;
  using W = typename T::W;
  using S = typename T::S;
  constexpr int KS = T::KS, LDA = BK + T::PAD, LDB = BN + T::PAD;
  extern __shared__ __align__(128) unsigned char smem[];
  S* As = reinterpret_cast<S*>(smem);  // [BM][LDA]
  S* Bs = As + BM * LDA;               // [BK][LDB]
  float* Cs = reinterpret_cast<float*>(smem);  // [BM][LDC], after the rank loop

  const int32_t job_index = tile_map[blockIdx.x];
  const Job job = jobs[job_index];
  const int64_t local = static_cast<int64_t>(blockIdx.x) - job.tile_start;
  const int64_t col_tiles = (job.cols + BN - 1) / BN;
  const int64_t r0 = (local / col_tiles) * BM, c0 = (local % col_tiles) * BN;
  const int warp = threadIdx.x / 32;
  const int wr = (warp / WARPS_N) * WM, wc = (warp % WARPS_N) * WN;
  const float* up = reinterpret_cast<const float*>(job.up);
  const float* down = reinterpret_cast<const float*>(job.down);
  const float* scale = reinterpret_cast<const float*>(job.col_scale);

  wmma::fragment<wmma::accumulator, 16, 16, KS, float> acc[FM][FN];
#pragma unroll
  for (int i = 0; i < FM; ++i) {
#pragma unroll
    for (int j = 0; j < FN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  }

  for (int64_t k0 = 0; k0 < job.rank; k0 += BK) {
    // up chunk: a warp reads 32 consecutive k of one row.
    for (int e = threadIdx.x; e < BM * BK; e += THREADS) {
      const int i = e / BK, kk = e % BK;
      const int64_t r = r0 + i, k = k0 + kk;
      const float v = (r < job.rows && k < job.rank) ? up[r * job.ld_up + k] : 0.0f;
      As[i * LDA + kk] = T::operand(v);
    }
    // down * S chunk (product in fp32, then one rounding to the operand type): 32 consecutive columns.
    for (int e = threadIdx.x; e < BK * BN; e += THREADS) {
      const int kk = e / BN, j = e % BN;
      const int64_t k = k0 + kk, c = c0 + j;
      float v = 0.0f;
      if (k < job.rank && c < job.cols) {
        v = down[k * job.ld_down + c];
        if (scale != nullptr) v *= scale[(k < job.split ? 0 : job.ld_col_scale) + c];
      }
      Bs[kk * LDB + j] = T::operand(v);
    }
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < BK; ks += KS) {
      wmma::fragment<wmma::matrix_a, 16, 16, KS, typename T::Frag, wmma::row_major> a[FM];
#pragma unroll
      for (int i = 0; i < FM; ++i) wmma::load_matrix_sync(a[i], As + (wr + 16 * i) * LDA + ks, LDA);
      if constexpr (DT == kFloat32) {
        wmma::fragment<wmma::matrix_a, 16, 16, KS, typename T::Frag, wmma::row_major> a_lo[FM];
#pragma unroll
        for (int i = 0; i < FM; ++i) split_tf32(a[i], a_lo[i]);
#pragma unroll
        for (int j = 0; j < FN; ++j) {
          wmma::fragment<wmma::matrix_b, 16, 16, KS, typename T::Frag, wmma::row_major> b, b_lo;
          wmma::load_matrix_sync(b, Bs + ks * LDB + wc + 16 * j, LDB);
          split_tf32(b, b_lo);
#pragma unroll
          for (int i = 0; i < FM; ++i) {  // small terms first
            wmma::mma_sync(acc[i][j], a_lo[i], b, acc[i][j]);
            wmma::mma_sync(acc[i][j], a[i], b_lo, acc[i][j]);
            wmma::mma_sync(acc[i][j], a[i], b, acc[i][j]);
          }
        }
      } else {
#pragma unroll
        for (int j = 0; j < FN; ++j) {
          wmma::fragment<wmma::matrix_b, 16, 16, KS, typename T::Frag, wmma::row_major> b;
          wmma::load_matrix_sync(b, Bs + ks * LDB + wc + 16 * j, LDB);
#pragma unroll
          for (int i = 0; i < FM; ++i) wmma::mma_sync(acc[i][j], a[i], b, acc[i][j]);
        }
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < FM; ++i) {
#pragma unroll
    for (int j = 0; j < FN; ++j) {
      wmma::store_matrix_sync(Cs + (wr + 16 * i) * LDC + wc + 16 * j, acc[i][j], LDC, wmma::mem_row_major);
    }
  }
  __syncthreads();

  // Stream the tile: each thread owns 8 consecutive columns of a row per step; 16 threads cover a row.
  // Where the 8 columns are in range and both rows 16-byte aligned (every SDXL layer), all of a thread's
  // source chunks are loaded before any store (src and dst may be the same tensor, so a store would
  // otherwise hold back the next load): 128-bit loads through L2 (`__ldcg`; never `__ldg`, whose
  // read-only path is undefined when dst aliases src) and 128-bit `__stcg` stores. Other chunks (ragged
  // right edge, misaligned rows) go element by element, each chunk's loads before its stores.
  const W* src = reinterpret_cast<const W*>(job.src);
  W* dst = reinterpret_cast<W*>(job.dst);
  constexpr int CHUNKS = BN / 8, STEPS = BM * CHUNKS / THREADS;
  constexpr int VECS = sizeof(W) * 8 / sizeof(uint4);  // 16-byte vectors per 8 weights: 1 (16-bit), 2 (fp32)
  uint4 raw[STEPS][VECS];
  bool bad = false;  // this thread wrote a value that rounds to +-Inf or NaN
  unsigned vec = 0, inside = 0;  // bit s: step s is a full aligned chunk / has a column in the layer
#pragma unroll
  for (int s = 0; s < STEPS; ++s) {
    const int e = s * THREADS + threadIdx.x;
    const int i = e / CHUNKS, j = (e % CHUNKS) * 8;
    const int64_t r = r0 + i, c = c0 + j;
    if (r >= job.rows || c >= job.cols) continue;
    inside |= 1u << s;
    const W* ps = src + r * job.ld_src + c;
    const W* pd = dst + r * job.ld_dst + c;
    const uintptr_t addr_bits = reinterpret_cast<uintptr_t>(ps) | reinterpret_cast<uintptr_t>(pd);
    if (c + 8 <= job.cols && (addr_bits & 15) == 0) {
      vec |= 1u << s;
#pragma unroll
      for (int q = 0; q < VECS; ++q) raw[s][q] = __ldcg(reinterpret_cast<const uint4*>(ps) + q);
    }
  }
#pragma unroll
  for (int s = 0; s < STEPS; ++s) {
    if (!(inside >> s & 1)) continue;
    const int e = s * THREADS + threadIdx.x;
    const int i = e / CHUNKS, j = (e % CHUNKS) * 8;
    const int64_t r = r0 + i, c = c0 + j;
    const float* a = Cs + i * LDC + j;
    W* pd = dst + r * job.ld_dst + c;
    float v[8];
    if (vec >> s & 1) {
      if constexpr (DT == kFloat32) {
        unpack8(raw[s][0], raw[s][VECS - 1], v);
      } else {
        unpack8(raw[s][0], v, W());
      }
#pragma unroll
      for (int t = 0; t < 8; ++t) {
        v[t] += a[t];
        bad |= nonfinite<DT>(v[t]);
      }
      if constexpr (DT == kFloat32) {
        __stcg(reinterpret_cast<float4*>(pd), make_float4(v[0], v[1], v[2], v[3]));
        __stcg(reinterpret_cast<float4*>(pd) + 1, make_float4(v[4], v[5], v[6], v[7]));
      } else {
        __stcg(reinterpret_cast<uint4*>(pd), pack8(v, W()));
      }
    } else {
      const W* ps = src + r * job.ld_src + c;
      const int n = static_cast<int>(job.cols - c < 8 ? job.cols - c : 8);
#pragma unroll
      for (int t = 0; t < 8; ++t) v[t] = t < n ? to_float(ps[t]) : 0.0f;  // unrolled: v stays in registers
#pragma unroll
      for (int t = 0; t < 8; ++t) {
        if (t < n) {
          const float x = v[t] + a[t];
          bad |= nonfinite<DT>(x);
          from_float(x, pd + t);
        }
      }
    }
  }
  // Every thread reaches this point (no early return above): one vote per warp, one atomic per warp
  // that saw a non-finite value (none in the normal case).
  if (__any_sync(0xFFFFFFFFu, bad) && (threadIdx.x & 31) == 0) atomicMin(first_bad, job_index);
}

// The dynamic shared memory (> 48 KiB) must be allowed once per device and kernel: done by
// cuda_unavailable() (which the backend registry calls before any apply) or at the first launch, so a
// CUDA-graph capture only ever records the launch itself.
std::atomic<uint64_t> g_configured[3];

template <int DT>
void configure(int device) {
  const uint64_t bit = uint64_t{1} << (device & 63);
  if (g_configured[DT].load() & bit) return;
  cuda_check(cudaFuncSetAttribute(grouped_apply_kernel<DT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(smem_bytes<DT>())),
             "cudaFuncSetAttribute(grouped_apply_kernel)");
  g_configured[DT].fetch_or(bit);
}

template <int DT>
void launch(const Job* jobs, const int32_t* tile_map, int64_t tiles, int device, cudaStream_t stream,
            int32_t* first_bad) {
  configure<DT>(device);
  const unsigned grid = static_cast<unsigned>(tiles);
  grouped_apply_kernel<DT><<<grid, THREADS, smem_bytes<DT>(), stream>>>(jobs, tile_map, first_bad);
  cuda_check(cudaGetLastError(), "grouped_apply_kernel launch");
}

}  // namespace

std::string cuda_unavailable(int device) {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return std::string("CUDA runtime of lorarar_kernels._C: ") + cudaGetErrorString(err);
  }
  if (device < 0 || device >= count) return "no CUDA device " + std::to_string(device);
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (major < 8) {
    return "compute capability " + std::to_string(major) + "." + std::to_string(minor) +
           " < 8.0 (the kernels need bf16/TF32 tensor cores)";
  }
  try {
    DeviceGuard guard(device);
    cudaFuncAttributes attr;
    err = cudaFuncGetAttributes(&attr, grouped_apply_kernel<kFloat16>);
    if (err == cudaSuccess) {
      configure<kFloat32>(device);
      configure<kFloat16>(device);
      configure<kBFloat16>(device);
    }
  } catch (const std::exception& e) {
    cudaGetLastError();
    return e.what();
  }
  if (err != cudaSuccess) {
    cudaGetLastError();
    return std::string("no usable kernel image for sm_") + std::to_string(major) + std::to_string(minor) +
           " (built for " LORARAR_CUDA_ARCHS "): " + cudaGetErrorString(err);
  }
  return "";
}

void cuda_apply(int64_t table, int64_t n_jobs, int64_t total_tiles, int64_t dtype, int device,
                int64_t stream, int64_t first_bad) {
  DeviceGuard guard(device);
  const Job* jobs = reinterpret_cast<const Job*>(table);
  const int32_t* tile_map =
      reinterpret_cast<const int32_t*>(table + n_jobs * static_cast<int64_t>(sizeof(Job)));
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  int32_t* bad = reinterpret_cast<int32_t*>(first_bad);
  switch (dtype) {
    case kFloat32: launch<kFloat32>(jobs, tile_map, total_tiles, device, s, bad); break;
    case kFloat16: launch<kFloat16>(jobs, tile_map, total_tiles, device, s, bad); break;
    default: launch<kBFloat16>(jobs, tile_map, total_tiles, device, s, bad); break;
  }
}

}  // namespace lorarar
