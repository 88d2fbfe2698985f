// retrieval_attention/cuda/projection_prune.cuh -- torch-free CUDA kernel of the pruning step of a query-guided
// graph's projection: the GPU twin of ../projection_prune.h (same inputs, same selection, same output).
//
// Contract: as projection_prune() of ../projection_prune.h, with these differences:
//   * n_seg and n_valid are device scalars (int64) that the kernel reads: the caller need not wait for the device to
//     learn them; seg_capacity (host) bounds n_seg and sizes the grid.
//   * Dot products and squared norms are float32 sums in another order than the CPU's: equal results for keys whose
//     products and sums are exact in float32 (e.g. small integers), else near-ties may break differently.
//   * Limits (projection_prune_supported()): 1 <= d <= kProjectionMaxDim, 1 <= degree <= kProjectionMaxDegree.
//   * One warp per segment: the kept rows sit in shared memory (float32, padded rows: lane r reads row r without bank
//     conflicts); each candidate's row is loaded by the warp (the next one's loads issued before the current one is
//     scored), then lane r scores it against kept row r and one vote decides. Segments past n_seg return at once.
//   * Ownership / streams: nothing is allocated; the launch goes to the given stream, asynchronously.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace retrieval_attention {
namespace cuda {

constexpr int64_t kProjectionMaxDim = 256;
constexpr int64_t kProjectionMaxDegree = 64;
constexpr int kProjectionWarps = 2;  // warps per block

inline bool projection_prune_supported(int64_t d, int64_t degree) {
  return d >= 1 && d <= kProjectionMaxDim && degree >= 1 && degree <= kProjectionMaxDegree;
}

__device__ __forceinline__ float projection_to_float(float x) { return x; }
__device__ __forceinline__ float projection_to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float projection_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// shared floats of one warp: the kept rows (degree x (d + 1)), the candidate's row (d), the kept rows' halves (degree)
__host__ __device__ inline int64_t projection_warp_floats(int64_t d, int64_t degree) { return degree * (d + 1) + d + degree; }

template <class T>
__global__ void projection_prune_kernel(const T* __restrict__ keys, int64_t n, int d, int64_t per, const int64_t* __restrict__ begin,
                                        const int64_t* __restrict__ n_seg_p, const int64_t* __restrict__ n_valid_p,
                                        const int64_t* __restrict__ pivot, const int64_t* __restrict__ near,
                                        const float* __restrict__ near_dist, const int64_t* __restrict__ mips, int degree, int64_t cap,
                                        int32_t* __restrict__ out) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t s = static_cast<int64_t>(blockIdx.x) * kProjectionWarps + warp;
  const int64_t n_seg = *n_seg_p;
  if (s >= n_seg) return;
  float* kept_rows = smem + static_cast<int64_t>(warp) * projection_warp_floats(d, degree);
  float* c = kept_rows + static_cast<int64_t>(degree) * (d + 1);
  float* kept_half = c + d;
  __shared__ int32_t kept_ids[kProjectionWarps][kProjectionMaxDegree];
  int32_t* kept = kept_ids[warp];
  const int64_t b = begin[s], e = s + 1 < n_seg ? begin[s + 1] : *n_valid_p, size = e - b;
  const int64_t idx = pivot[b] / (n + 1), p = pivot[b] % (n + 1);
  const T* rows = keys + (idx / per) * n * d;
  const int64_t n_ip = min(size, static_cast<int64_t>(degree / 4)), n_rng = degree - n_ip, scan = min(size, cap);
  int count = 0;
  // Each lane holds its elements of the next candidate's row: that row's loads are in flight while the warp scores the
  // current one (a candidate's scoring otherwise starts with a full global-memory latency).
  constexpr int kPerLane = kProjectionMaxDim / 32;
  float next[kPerLane];
  const auto load = [&](int64_t t) {
    const T* row = rows + near[t] * d;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) next[j] = lane + 32 * j < d ? projection_to_float(row[lane + 32 * j]) : 0.f;
  };
  if (scan > 0) load(b);
  for (int64_t t = b; t < b + scan && count < n_rng; ++t) {
    const int64_t id = near[t];
    float sq = 0.f;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j)
      if (lane + 32 * j < d) {
        c[lane + 32 * j] = next[j];
        sq += next[j] * next[j];
      }
    if (t + 1 < b + scan) load(t + 1);
    for (int off = 16; off > 0; off >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, off);
    __syncwarp();
    const float half = 0.5f * (sq - near_dist[t]);
    bool occluded = false;
    for (int r = lane; r < count; r += 32) {
      const float* kr = kept_rows + static_cast<int64_t>(r) * (d + 1);
      float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;  // four chains: the sum's latency, not its arithmetic, bounds it
      int k = 0;
      for (; k + 4 <= d; k += 4) {
        a0 += c[k] * kr[k];
        a1 += c[k + 1] * kr[k + 1];
        a2 += c[k + 2] * kr[k + 2];
        a3 += c[k + 3] * kr[k + 3];
      }
      for (; k < d; ++k) a0 += c[k] * kr[k];
      occluded = occluded || (a0 + a1) + (a2 + a3) > half + kept_half[r];
    }
    if (!__any_sync(0xffffffffu, occluded)) {
      float* dst = kept_rows + static_cast<int64_t>(count) * (d + 1);
      for (int k = lane; k < d; k += 32) dst[k] = c[k];
      if (lane == 0) {
        kept_half[count] = 0.5f * sq;
        kept[count] = static_cast<int32_t>(id);
      }
      ++count;
    }
    __syncwarp();
  }
  const int64_t top = min(size, static_cast<int64_t>(degree));
  for (int64_t t = b; t < b + top && count < degree; ++t) {
    const int32_t id = static_cast<int32_t>(mips[t]);
    bool seen = false;
    for (int r = lane; r < count; r += 32) seen = seen || kept[r] == id;
    if (!__any_sync(0xffffffffu, seen)) {
      if (lane == 0) kept[count] = id;
      ++count;
    }
    __syncwarp();
  }
  int32_t* dst = out + (idx * n + p) * degree;
  for (int r = lane; r < count; r += 32) dst[r] = kept[r];
}

template <class T>
cudaError_t projection_prune(const T* keys, int64_t n, int64_t d, int64_t per, const int64_t* begin, const int64_t* n_seg,
                             const int64_t* n_valid, int64_t seg_capacity, const int64_t* pivot, const int64_t* near, const float* near_dist,
                             const int64_t* mips, int64_t degree, int64_t cap, int32_t* out, cudaStream_t stream) {
  if (seg_capacity <= 0) return cudaSuccess;
  const size_t smem = sizeof(float) * static_cast<size_t>(kProjectionWarps * projection_warp_floats(d, degree));
  cudaError_t err = cudaFuncSetAttribute(projection_prune_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const int64_t blocks = (seg_capacity + kProjectionWarps - 1) / kProjectionWarps;
  projection_prune_kernel<T><<<static_cast<unsigned>(blocks), kProjectionWarps * 32, smem, stream>>>(
      keys, n, static_cast<int>(d), per, begin, n_seg, n_valid, pivot, near, near_dist, mips, static_cast<int>(degree), cap, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace retrieval_attention
