// retrieval_attention/cuda/chunk_top.cuh -- torch-free CUDA kernels of the GPU prefill's key-to-key lists (the GPU
// twins of ../chunk_top.h): candidate columns of a 16-bit score matrix from its best column chunks (the bipartite
// lists' top-k and the key-to-key lists' candidates), and the candidates re-ranked by their float32 L2 distance.
//
// Contract of chunk_top_candidates() (identical outputs to chunk_top_candidates<Half / BFloat16> of ../chunk_top.h)
//   * scores (rows, cols) S in {__half, __nv_bfloat16}, row-major, contiguous, 16-byte aligned; cols = n_chunks * chunk.
//   * out (rows, m) int64: per row, the columns of the m largest entries among the entries of the kc chunks with
//     the largest maxima, largest first. Entries and chunk maxima compare by value (NaN as -inf), equal values by
//     smaller column (chunk) first (-0 equals +0): one total order, so the result does not depend on thread timing.
//   * Limits (chunk_top_supported()): chunk a power of two in [8, 256]; cols % chunk == 0; the chunks of a row and
//     the kept entries kc * chunk each at most kChunkTopMaxEntries; 1 <= kc <= n_chunks; 1 <= m <= kc * chunk.
//   * Algorithm: one block of kChunkTopThreads per row. (1) Chunk maxima: 16-byte loads, several in flight per
//     thread, a chunk's lanes reduced by warp shuffles; each maximum becomes a 64-bit rank key in shared memory.
//     (2) block_top() picks the kc best keys. (3) The kept chunks' entries are loaded (16-byte loads, issued before
//     use) as rank keys and block_top() picks the m best. block_top() bounds the answer from below with warp
//     shuffles over the threads' own maxima (at least `want` distinct entries reach the bound), keeps the entries
//     at or above it (usually a few times `want`) and ranks them by counting; when more than kRankSelectMax
//     survive, it sorts all the candidates instead (bitonic, in shared memory).
//
// Contract of rerank_l2() (as rerank_l2 of ../chunk_top.h, up to float32 summation order)
//   * keys (groups, n, d) T in {float, __half, __nv_bfloat16}, contiguous; cand (groups, b, m) int64, entries in
//     [0, n) or -1 for none (any other entry counts as none and is never read); out (groups, b, k) int64: for row
//     r of group g, the k candidates nearest to key row_start + r of g by float32 squared distance, nearest first, smaller id first on equal distances, -1 last.
//   * Limits (rerank_l2_supported()): 1 <= d <= 256, 1 <= k <= m <= 256, n < 2^31.
//   * One warp per (group, row): the key's elements sit in the lanes' registers, eight candidates' rows are loaded
//     at a time (coalesced across the warp), partial sums meet by shuffles, and k rounds of a warp-wide minimum
//     over 64-bit (distance, id) keys pick the list.
//
// Both: ownership / streams / threads: nothing is allocated; the launch goes to the given stream, asynchronously;
//     the host function touches no global state except the kernel's shared-memory attribute (set per call).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace retrieval_attention {
namespace cuda {

constexpr int kChunkTopThreads = 256;
constexpr int64_t kChunkTopMaxEntries = 8192;
constexpr int kRankSelectMax = 1024;  // survivors ranked by counting (one barrier); with more, all are sorted (bitonic)

__host__ __device__ inline int64_t chunk_top_pow2(int64_t x) {
  int64_t p = 1;
  while (p < x) p <<= 1;
  return p;
}

inline bool chunk_top_supported(int64_t cols, int64_t chunk, int64_t kc, int64_t m) {
  const bool chunk_ok = chunk >= 8 && chunk <= 256 && (chunk & (chunk - 1)) == 0;
  if (!chunk_ok || cols <= 0 || cols % chunk != 0) return false;
  const int64_t n_chunks = cols / chunk;
  return n_chunks <= kChunkTopMaxEntries && kc >= 1 && kc <= n_chunks && kc * chunk <= kChunkTopMaxEntries && m >= 1 && m <= kc * chunk;
}

// Shared memory of one block: the candidates (chunk keys, then entry keys), the survivors of the bound (at most
// kRankSelectMax are kept), the warps' bounds, the kept chunk ids and a counter.
inline size_t chunk_top_smem_bytes(int64_t cols, int64_t chunk, int64_t kc) {
  const int64_t n_chunks = cols / chunk, e = kc * chunk;
  const int64_t cand = chunk_top_pow2(n_chunks > e ? n_chunks : e);
  return sizeof(uint64_t) * (cand + kRankSelectMax + kChunkTopThreads / 32) + sizeof(int) * (kc + 1);
}

namespace detail {

__device__ __forceinline__ uint64_t rank_key(float v, uint32_t index) {
  if (v != v) v = -__int_as_float(0x7f800000);  // NaN ranks as -inf
  if (v == 0.f) v = 0.f;                          // -0 ranks as +0 (fmaxf may return either)
  const uint32_t u = __float_as_uint(v);
  const uint32_t ordered = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (static_cast<uint64_t>(ordered) << 32) | static_cast<uint64_t>(0xFFFFFFFFu - index);
}

__device__ __forceinline__ uint32_t rank_index(uint64_t key) { return 0xFFFFFFFFu - static_cast<uint32_t>(key & 0xFFFFFFFFu); }

// Bitonic sort of s[0, p) into descending order (p a power of two). Every thread of the block calls it.
__device__ inline void sort_desc(uint64_t* s, int p) {
  for (int k = 2; k <= p; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = threadIdx.x; i < p; i += blockDim.x) {
        const int x = i ^ j;
        if (x > i) {
          const uint64_t a = s[i], b = s[x];
          if (((i & k) == 0) ? (a < b) : (a > b)) {
            s[i] = b;
            s[x] = a;
          }
        }
      }
      __syncthreads();
    }
  }
}

constexpr int kChunkTopWarps = kChunkTopThreads / 32;

// The `want` largest of cand[0, count) (shared memory with room for chunk_top_pow2(count) keys, count >= want >= 1),
// best first, into cand[0, want). survivors: kRankSelectMax keys; warp_bound: kChunkTopWarps keys; counter: one int.
// A lower bound first: each warp's t-th best thread maximum (t = ceil(want / warps)), the least of them over the
// warps, is reached by t x warps >= want distinct entries, so the want-th best entry is at least that. Only the
// entries at or above the bound are kept and ranked.
__device__ inline void block_top(uint64_t* cand, int count, int want, uint64_t* survivors, uint64_t* warp_bound, int* counter) {
  constexpr unsigned kFull = 0xffffffffu;
  const int per = (count + kChunkTopThreads - 1) / kChunkTopThreads;
  const int lo = threadIdx.x * per, hi = min(count, lo + per);
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
  uint64_t mine = 0;  // below every rank key (the lowest, -inf at the largest index, is 0x007FFFFF00000000)
  for (int i = lo; i < hi; ++i) mine = cand[i] > mine ? cand[i] : mine;
  const int t = (want + kChunkTopWarps - 1) / kChunkTopWarps;
  uint64_t tth = 0;  // the warp's t-th best thread maximum (0 when t > 32: no bound)
  if (t <= 32) {
    uint64_t left = mine;
    for (int round = 0; round < t; ++round) {
      uint64_t best = left;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        const uint64_t other = __shfl_xor_sync(kFull, best, off);
        best = other > best ? other : best;
      }
      tth = best;
      if (left == best) left = 0;  // keys are distinct but for 0, which stays 0
    }
  }
  if (lane == 0) warp_bound[warp] = tth;
  if (threadIdx.x == 0) *counter = 0;
  __syncthreads();
  uint64_t bound = warp_bound[0];
#pragma unroll
  for (int w = 1; w < kChunkTopWarps; ++w) bound = warp_bound[w] < bound ? warp_bound[w] : bound;
  for (int i = lo; i < hi; ++i) {
    if (cand[i] >= bound) {
      const int slot = atomicAdd(counter, 1);
      if (slot < kRankSelectMax) survivors[slot] = cand[i];
    }
  }
  __syncthreads();
  const int n = *counter;
  if (n <= kRankSelectMax) {
    // rank = how many survivors beat it; the keys are distinct, so the ranks below `want` fill cand[0, want) once each
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const uint64_t key = survivors[i];
      int rank = 0;
      for (int j = 0; j < n; ++j) rank += survivors[j] > key;
      if (rank < want) cand[rank] = key;
    }
  } else {  // too many survivors (a weak bound): sort all candidates in place (cand has room for chunk_top_pow2(count))
    const int p = static_cast<int>(chunk_top_pow2(count));
    for (int i = count + threadIdx.x; i < p; i += blockDim.x) cand[i] = 0;
    __syncthreads();
    sort_desc(cand, p);
  }
  __syncthreads();
}

__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ float widen(__half x) { return __half2float(x); }
__device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float2 widen2(const __half& x) { return __half22float2(*reinterpret_cast<const __half2*>(&x)); }
__device__ __forceinline__ float2 widen2(const __nv_bfloat16& x) { return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&x)); }

template <class S, int kChunkVecs>  // S: __half or __nv_bfloat16; 16-byte vectors (8 entries) per chunk, a power of two in [1, 32]
__global__ void __launch_bounds__(kChunkTopThreads) chunk_top_kernel(const S* __restrict__ scores, int64_t cols, int kc, int m,
                                                                     int64_t* __restrict__ out) {
  constexpr int chunk = 8 * kChunkVecs;
  extern __shared__ uint64_t smem[];
  const int n_chunks = static_cast<int>(cols / chunk), e = kc * chunk;
  const int cap = static_cast<int>(chunk_top_pow2(n_chunks > e ? n_chunks : e));
  uint64_t* cand = smem;
  uint64_t* survivors = smem + cap;
  uint64_t* warp_bound = survivors + kRankSelectMax;
  int* kept_chunks = reinterpret_cast<int*>(warp_bound + kChunkTopWarps);
  int* counter = kept_chunks + kc;
  const int64_t r = blockIdx.x;
  const S* row = scores + r * cols;
  const uint4* vrow = reinterpret_cast<const uint4*>(row);
  const int n_vec = static_cast<int>(cols / 8);

  // (1) chunk maxima. A chunk's vectors are consecutive lanes of one warp (vector i sits on thread i % 256).
  constexpr int kUnroll = 8;  // 16-byte loads in flight per thread
  for (int base = 0; base < n_vec; base += kChunkTopThreads * kUnroll) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * kChunkTopThreads + threadIdx.x;
      if (i < n_vec) v[u] = __ldcs(vrow + i);  // read once: stream past the caches
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * kChunkTopThreads + threadIdx.x;
      float best = -__int_as_float(0x7f800000);
      if (i < n_vec) {
        const S* h = reinterpret_cast<const S*>(&v[u]);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const float2 f = widen2(h[2 * q]);
          best = fmaxf(best, fmaxf(f.x, f.y));  // fmaxf drops NaN, as the CPU's `v > best`
        }
      }
#pragma unroll
      for (int off = kChunkVecs / 2; off > 0; off >>= 1) best = fmaxf(best, __shfl_xor_sync(0xffffffffu, best, off));
      if (i < n_vec && i % kChunkVecs == 0) cand[i / kChunkVecs] = rank_key(best, static_cast<uint32_t>(i / kChunkVecs));
    }
  }
  __syncthreads();

  // (2) the kc best chunks
  block_top(cand, n_chunks, kc, survivors, warp_bound, counter);
  for (int s = threadIdx.x; s < kc; s += blockDim.x) kept_chunks[s] = static_cast<int>(rank_index(cand[s]));
  __syncthreads();

  // (3) their entries, 16-byte vectors (8 consecutive columns of one chunk) with all of a thread's loads issued
  // first, then the m best
  const int e_vec = e / 8;
  for (int base = 0; base < e_vec; base += kChunkTopThreads * kUnroll) {
    uint4 v[kUnroll];
    int col0[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int w = base + u * kChunkTopThreads + threadIdx.x;
      if (w < e_vec) {
        const int s = w / kChunkVecs;
        col0[u] = kept_chunks[s] * chunk + (w - s * kChunkVecs) * 8;
        v[u] = __ldg(vrow + col0[u] / 8);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int w = base + u * kChunkTopThreads + threadIdx.x;
      if (w < e_vec) {
        const S* h = reinterpret_cast<const S*>(&v[u]);
#pragma unroll
        for (int q = 0; q < 8; ++q) cand[w * 8 + q] = rank_key(widen(h[q]), static_cast<uint32_t>(col0[u] + q));
      }
    }
  }
  __syncthreads();
  block_top(cand, e, m, survivors, warp_bound, counter);
  for (int i = threadIdx.x; i < m; i += blockDim.x) out[r * m + i] = static_cast<int64_t>(rank_index(cand[i]));
}

template <class S, int kChunkVecs>
cudaError_t launch_chunk_top(const S* scores, int64_t rows, int64_t cols, int kc, int m, int64_t* out, cudaStream_t stream) {
  const size_t smem = chunk_top_smem_bytes(cols, 8 * kChunkVecs, kc);
  cudaError_t err = cudaFuncSetAttribute(chunk_top_kernel<S, kChunkVecs>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  chunk_top_kernel<S, kChunkVecs><<<static_cast<unsigned>(rows), kChunkTopThreads, smem, stream>>>(scores, cols, kc, m, out);
  return cudaGetLastError();
}

constexpr int kRerankWarps = 8;  // (group, row) pairs per block, one per warp

template <class T>
__global__ void __launch_bounds__(kRerankWarps * 32) rerank_l2_kernel(const T* __restrict__ keys, int64_t n, int d, int64_t row_start,
                                                                     const int64_t* __restrict__ cand, int64_t pairs, int64_t b, int m,
                                                                     int k, int64_t* __restrict__ out) {
  constexpr unsigned kFull = 0xffffffffu;
  constexpr uint64_t kNone = ~uint64_t{0};
  const int lane = threadIdx.x & 31;
  const int64_t gr = static_cast<int64_t>(blockIdx.x) * kRerankWarps + threadIdx.x / 32;
  if (gr >= pairs) return;  // the whole warp
  const int64_t g = gr / b, r = gr % b;
  const T* x = keys + (g * n + row_start + r) * d;
  float xq[8];  // element lane + 32 t of the key
#pragma unroll
  for (int t = 0; t < 8; ++t) xq[t] = lane + 32 * t < d ? widen(x[lane + 32 * t]) : 0.f;
  const int64_t* cl = cand + gr * m;
  uint64_t held[8];  // this lane's candidates j = lane + 32 h, as (distance, id) keys
#pragma unroll
  for (int h = 0; h < 8; ++h) held[h] = kNone;
#pragma unroll
  for (int h = 0; h < 8; ++h) {  // candidates [32 h, 32 h + 32): held[h] of their lanes (h a compile-time index)
    for (int j0 = 32 * h; j0 < m && j0 < 32 * h + 32; j0 += 8) {
      int id[8];  // -1: none (ids < 2^31 here: n < 2^31)
      float part[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const int64_t c = j0 + u < m ? cl[j0 + u] : -1;
        id[u] = c >= 0 && c < n ? static_cast<int>(c) : -1;  // outside [0, n): none, never read
        part[u] = 0.f;
      }
#pragma unroll
      for (int t = 0; t < 8; ++t) {
        const int c = lane + 32 * t;
        if (32 * t < d) {  // the same for the whole warp
#pragma unroll
          for (int u = 0; u < 8; ++u) {
            if (id[u] >= 0 && c < d) {
              const float diff = xq[t] - widen(keys[(g * n + id[u]) * static_cast<int64_t>(d) + c]);
              part[u] = fmaf(diff, diff, part[u]);
            }
          }
        }
      }
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        float dist = part[u];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) dist += __shfl_xor_sync(kFull, dist, off);
        if (dist != dist) dist = __int_as_float(0x7f800000);  // NaN ranks as +inf
        const uint64_t key = id[u] < 0 ? kNone : (static_cast<uint64_t>(__float_as_uint(dist)) << 32) | static_cast<uint32_t>(id[u]);
        if (((j0 + u) & 31) == lane) held[h] = key;
      }
    }
  }
  for (int i = 0; i < k; ++i) {
    uint64_t best = kNone;
#pragma unroll
    for (int h = 0; h < 8; ++h) best = held[h] < best ? held[h] : best;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const uint64_t other = __shfl_xor_sync(kFull, best, off);
      best = other < best ? other : best;
    }
#pragma unroll
    for (int h = 0; h < 8; ++h)
      if (held[h] == best) held[h] = kNone;
    if (lane == 0) out[gr * k + i] = best == kNone ? -1 : static_cast<int64_t>(best & 0xFFFFFFFFu);
  }
}

}  // namespace detail

inline bool rerank_l2_supported(int64_t n, int64_t d, int64_t m, int64_t k) {
  return n < (int64_t{1} << 31) && d >= 1 && d <= 256 && m >= 1 && m <= 256 && k >= 1 && k <= m;
}

// Enqueues the kernel for groups * b >= 1 pairs on `stream`. Check rerank_l2_supported() first.
template <class T>
cudaError_t rerank_l2(const T* keys, int64_t groups, int64_t n, int64_t d, int64_t row_start, const int64_t* cand, int64_t b, int64_t m,
                      int64_t k, int64_t* out, cudaStream_t stream) {
  const int64_t pairs = groups * b;
  const int64_t blocks = (pairs + detail::kRerankWarps - 1) / detail::kRerankWarps;
  detail::rerank_l2_kernel<T><<<static_cast<unsigned>(blocks), detail::kRerankWarps * 32, 0, stream>>>(
      keys, n, static_cast<int>(d), row_start, cand, pairs, b, static_cast<int>(m), static_cast<int>(k), out);
  return cudaGetLastError();
}

// Enqueues the kernel for rows >= 1 (rows < 2^31) on `stream`. Check chunk_top_supported() first. S: __half or
// __nv_bfloat16.
template <class S>
cudaError_t chunk_top_candidates(const S* scores, int64_t rows, int64_t cols, int64_t chunk, int64_t kc, int64_t m, int64_t* out,
                                 cudaStream_t stream) {
  const int k = static_cast<int>(kc), mm = static_cast<int>(m);
  switch (chunk) {
    case 8: return detail::launch_chunk_top<S, 1>(scores, rows, cols, k, mm, out, stream);
    case 16: return detail::launch_chunk_top<S, 2>(scores, rows, cols, k, mm, out, stream);
    case 32: return detail::launch_chunk_top<S, 4>(scores, rows, cols, k, mm, out, stream);
    case 64: return detail::launch_chunk_top<S, 8>(scores, rows, cols, k, mm, out, stream);
    case 128: return detail::launch_chunk_top<S, 16>(scores, rows, cols, k, mm, out, stream);
    case 256: return detail::launch_chunk_top<S, 32>(scores, rows, cols, k, mm, out, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace retrieval_attention
