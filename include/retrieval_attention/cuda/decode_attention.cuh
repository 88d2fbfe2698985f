// retrieval_attention/cuda/decode_attention.cuh -- torch-free CUDA kernels: attention with log-sum-exp
// over a dense key set (the GPU "static set", optionally causal), over gathered ids (sparse), and the
// exact LSE merge of two partial results.
//
// Contract (same semantics as include/retrieval_attention/attention.h, float32 math, natural-log LSE)
//   * Layout: all buffers are device pointers, row-major. q, ids, out, lse, the workspace and the merge
//     buffers are contiguous. keys / values need unit stride only in the last dim: element (h, j, c) is at
//     keys[h * k_head_stride + j * k_row_stride + c] (likewise v_*), so a slice of a larger cache buffer
//     can be passed without a copy. Strides are in elements, >= 0.
//       q       (Hq, m, d)   float32, float16 or bfloat16 (q_type), widened to float32 as it is read
//       keys    (Hkv, n, d)  T in {float, __half, __nv_bfloat16}
//       values  (Hkv, n, dv) T (same T as keys)
//       ids     (Hq, m, k)   int64, -1 = padding (sparse only)
//       out     (Hq, m, dv)  float32, written completely (the merge can write float16 / bfloat16 instead)
//       lse     (Hq, m)      float32, written completely
//     Row r = h * m + i is query i of query head h; it reads kv head h / (Hq / Hkv) (GQA; Hq % Hkv == 0).
//   * For each row, with S its key set:
//       lse = log sum_{j in S} exp(scale * q.k_j),   out = sum_{j in S} exp(scale * q.k_j - lse) * v_j.
//     Empty S gives out = 0 and lse = -inf.
//       dense:        S = [0, n); with causal, S = [0, n - m + i] (queries are the last m positions; needs m <= n).
//       sparse:       S = the ids of the row, -1 skipped, duplicates counted as written. Ids outside [0, n)
//                     other than -1 are skipped too (never read), but the caller is expected to reject them
//                     first: the CPU reference throws on them.
//       merge:        lse = logaddexp(lse_a, lse_b); out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b;
//                     both -inf gives out 0, lse -inf.
//   * Algorithm (flash-decoding): one thread block per (row, key split). Inside a block the keys are shared
//     round-robin among "key groups" of lanes (a group holds one key row across its lanes: 16-byte loads
//     for d = dv in {64, 128}, else a whole warp with scalar loads for any d, dv <= 256); each group keeps
//     its own online softmax (running max, sum, dv accumulators in registers) over mini-batches of
//     keys whose K and V loads are all issued before use; the groups are merged through shared memory at
//     the end. With more than one split, each split writes a normalised partial (out, lse) to a float32
//     workspace and a second kernel merges the splits by log-sum-exp. With one split the first kernel
//     writes out/lse directly and no workspace is used.
//   * Ownership: nothing is allocated here. The caller owns every buffer, including the workspace of
//     workspace_floats() floats (unused and may be null when splits == 1). Inputs are only read.
//   * Streams: every launch goes to the stream passed in, asynchronously; nothing synchronises. Launch
//     functions return cudaGetLastError() after their launches (launch-configuration errors only).
//   * Threads: the host functions touch no global state and are safe to call from several host threads
//     (device_sm_count() queries the runtime). Kernels write disjoint outputs; no atomics.
//   * Limits: d, dv <= kMaxHeadDim (256) (check with supports_dims()); sizes are int64 on the host, rows and
//     blocks must fit the grid (rows * splits < 2^31).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace retrieval_attention {
namespace cuda {

constexpr int kMaxHeadDim = 256;  // largest d / dv the generic kernel supports
constexpr int kThreads = 128;     // threads per attention block (4 warps)
constexpr int kMaxSplits = 64;    // upper bound on key splits per row
constexpr int kMinKeysPerSplit = 128;

// ------------------------------------------------------------------------------------------------
// Host-side parameters
// ------------------------------------------------------------------------------------------------
// Element type of the queries and of the merge's output: a decode query arrives in the model's dtype, and widening
// it (or narrowing the merged output) in the kernel saves a launch per layer and token.
enum class Elem : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

template <class T>
struct AttentionParams {
  const void* q = nullptr;           // (Hq, m, d) of q_type
  Elem q_type = Elem::kFloat32;
  const T* keys = nullptr;           // (Hkv, n, d)
  const T* values = nullptr;         // (Hkv, n, dv)
  const int64_t* ids = nullptr;      // (Hq, m, k); null for dense
  int64_t hq = 0, m = 0, d = 0, hkv = 0, n = 0, dv = 0, k = 0;
  int64_t k_head_stride = 0, k_row_stride = 0;  // keys element strides (dims 0 and 1)
  int64_t v_head_stride = 0, v_row_stride = 0;  // values element strides (dims 0 and 1)
  float scale = 1.f;
  bool causal = false;               // dense only
  float* out = nullptr;              // (Hq, m, dv)
  float* lse = nullptr;              // (Hq, m)
};

inline bool supports_dims(int64_t d, int64_t dv) { return d >= 0 && dv >= 0 && d <= kMaxHeadDim && dv <= kMaxHeadDim; }

// Number of key splits per row: enough blocks to fill the GPU (about 4 blocks per SM), each split holding at
// least kMinKeysPerSplit keys, at most kMaxSplits. keys_per_row = n (dense) or k (sparse).
inline int choose_splits(int64_t rows, int64_t keys_per_row, int num_sms) {
  if (rows <= 0 || keys_per_row <= kMinKeysPerSplit) return 1;
  const int64_t target_blocks = 4 * static_cast<int64_t>(num_sms > 0 ? num_sms : 1);
  int64_t s = (target_blocks + rows - 1) / rows;
  const int64_t by_keys = keys_per_row / kMinKeysPerSplit;
  if (s > by_keys) s = by_keys;
  if (s > kMaxSplits) s = kMaxSplits;
  if (s < 1) s = 1;
  return static_cast<int>(s);
}

// Floats of workspace the attention launch needs for `splits` (0 when splits == 1).
inline int64_t workspace_floats(int64_t rows, int64_t dv, int splits) {
  return splits > 1 ? rows * static_cast<int64_t>(splits) * (dv + 1) : 0;
}

inline int device_sm_count(int device) {
  int v = 0;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    (void)cudaGetLastError();  // clear this (non-sticky) error so the caller's next launch check does not see it
    return 1;
  }
  return v;
}

// ------------------------------------------------------------------------------------------------
// Device helpers
// ------------------------------------------------------------------------------------------------
namespace detail {

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }

__device__ __forceinline__ float load_elem(const void* p, Elem type, int64_t i) {
  switch (type) {
    case Elem::kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    case Elem::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}
__device__ __forceinline__ void store_elem(void* p, Elem type, int64_t i, float v) {
  switch (type) {
    case Elem::kFloat16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    case Elem::kBFloat16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

template <class T>
__device__ __forceinline__ T zero_of();
template <>
__device__ __forceinline__ float zero_of<float>() { return 0.f; }
template <>
__device__ __forceinline__ __half zero_of<__half>() { return __float2half(0.f); }
template <>
__device__ __forceinline__ __nv_bfloat16 zero_of<__nv_bfloat16>() { return __float2bfloat16(0.f); }

// EPL elements of type T held by one lane. When kVec, the elements are contiguous and 16 bytes in total.
template <class T, int EPL, bool kVec>
struct alignas(kVec ? 16 : alignof(T)) Frag {
  T v[EPL];
};

// Kernel-shape policy.
//   kVec = true : LPK lanes hold one row of D = LPK * EPL contiguous elements, 16-byte loads, d == dv == D.
//   kVec = false: a warp (LPK = 32) holds one row; lane l has elements l + 32 e (e < EPL), bounds-checked
//                 against the run-time d / dv (<= 32 * EPL).
template <class T, int LPK, int EPL, bool kVec>
struct Shape {
  static_assert(LPK >= 1 && LPK <= 32 && (LPK & (LPK - 1)) == 0, "lanes per key must be a power of two <= 32");
  static_assert(!kVec || EPL * sizeof(T) == 16, "vector fragments are 16 bytes");
  static_assert(kVec || LPK == 32, "the generic shape uses a whole warp per key");
  static constexpr int kLanesPerKey = LPK;
  static constexpr int kElemsPerLane = EPL;
  static constexpr int kGroups = kThreads / LPK;  // key groups per block
  static constexpr int kRowWidth = LPK * EPL;     // register-held width of one row (>= d, dv)
  static constexpr int kBatch = 4;                // keys per group per mini-batch (loads in flight)
  using F = Frag<T, EPL, kVec>;

  __device__ __forceinline__ static int elem(int lane_in_group, int e) {
    return kVec ? lane_in_group * EPL + e : lane_in_group + LPK * e;
  }
  // Load the lane's fragment of one row of width `dim` (run-time width used only when !kVec).
  __device__ __forceinline__ static void load(const T* __restrict__ row, int lane_in_group, int dim, F& f) {
    if constexpr (kVec) {
      f = *reinterpret_cast<const F*>(row + lane_in_group * EPL);
    } else {
#pragma unroll
      for (int e = 0; e < EPL; ++e) {
        const int c = lane_in_group + LPK * e;
        f.v[e] = c < dim ? row[c] : zero_of<T>();
      }
    }
  }
};

template <int LPK>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int o = LPK / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// One block = one (row, split). Writes a normalised (out, lse) for its key range to
// out_p[(row * splits + split) * dv .. +dv), lse_p[row * splits + split]. With splits == 1 these are the
// final out / lse arrays.
template <class T, class SH, bool kSparse>
__global__ void __launch_bounds__(kThreads) attention_split_kernel(AttentionParams<T> p, int splits, int64_t chunk, float* __restrict__ out_p,
                                                                   float* __restrict__ lse_p) {
  constexpr int LPK = SH::kLanesPerKey;
  constexpr int EPL = SH::kElemsPerLane;
  constexpr int G = SH::kGroups;
  constexpr int B = SH::kBatch;
  constexpr int W = SH::kRowWidth;
  using F = typename SH::F;

  __shared__ float sm_acc[G][W];
  __shared__ float sm_m[G];
  __shared__ float sm_s[G];

  const int64_t block = static_cast<int64_t>(blockIdx.x);
  const int64_t row = block / splits;
  const int split = static_cast<int>(block - row * splits);
  const int64_t h = row / p.m, i = row - h * p.m;
  const int64_t kvh = h / (p.hq / p.hkv);
  const int d = static_cast<int>(p.d), dv = static_cast<int>(p.dv);

  const int tid = threadIdx.x;
  const int group = tid / LPK;
  const int lig = tid % LPK;  // lane in group

  // Key range of this split, in "key slots": dense slot j = key j; sparse slot j = ids[row, j].
  const int64_t total = kSparse ? p.k : (p.causal ? p.n - p.m + i + 1 : p.n);
  const int64_t lo = static_cast<int64_t>(split) * chunk;
  int64_t hi = lo + chunk;
  if (hi > total) hi = total;

  const T* __restrict__ kbase = p.keys + kvh * p.k_head_stride;
  const T* __restrict__ vbase = p.values + kvh * p.v_head_stride;
  const int64_t* __restrict__ ids = kSparse ? p.ids + row * p.k : nullptr;

  float qf[EPL];
#pragma unroll
  for (int e = 0; e < EPL; ++e) {
    const int c = SH::elem(lig, e);
    qf[e] = c < d ? load_elem(p.q, p.q_type, row * p.d + c) : 0.f;
  }

  float acc[EPL];
#pragma unroll
  for (int e = 0; e < EPL; ++e) acc[e] = 0.f;
  float m_run = neg_inf(), s_run = 0.f;

  // Block-uniform trip count: every lane runs every iteration (shuffles need the full warp).
  for (int64_t base = lo; base < hi; base += static_cast<int64_t>(G) * B) {
    int64_t key[B];
    bool valid[B];
#pragma unroll
    for (int b = 0; b < B; ++b) {
      const int64_t slot = base + static_cast<int64_t>(b) * G + group;
      bool ok = slot < hi;
      int64_t kk = slot;
      if constexpr (kSparse) {
        kk = ok ? ids[slot] : -1;
        ok = ok && kk >= 0 && kk < p.n;
      }
      key[b] = kk;
      valid[b] = ok;
    }
    F kf[B], vf[B];
#pragma unroll
    for (int b = 0; b < B; ++b)
      if (valid[b]) SH::load(kbase + key[b] * p.k_row_stride, lig, d, kf[b]);
#pragma unroll
    for (int b = 0; b < B; ++b)
      if (valid[b]) SH::load(vbase + key[b] * p.v_row_stride, lig, dv, vf[b]);

    float sc[B];
    float bm = neg_inf();
#pragma unroll
    for (int b = 0; b < B; ++b) {
      float part = 0.f;
      if (valid[b]) {
#pragma unroll
        for (int e = 0; e < EPL; ++e) part = fmaf(qf[e], to_f(kf[b].v[e]), part);
      }
      const float dot = group_sum<LPK>(part);  // identical in every lane of the group
      sc[b] = valid[b] ? p.scale * dot : neg_inf();
      bm = fmaxf(bm, sc[b]);
    }
    const float m_new = fmaxf(m_run, bm);
    if (m_new != neg_inf()) {  // uniform within the group; no shuffles inside
      const float alpha = expf(m_run - m_new);  // m_run = -inf gives 0
      s_run *= alpha;
#pragma unroll
      for (int e = 0; e < EPL; ++e) acc[e] *= alpha;
#pragma unroll
      for (int b = 0; b < B; ++b) {
        if (!valid[b]) continue;
        const float w = expf(sc[b] - m_new);
        s_run += w;
#pragma unroll
        for (int e = 0; e < EPL; ++e) acc[e] = fmaf(w, to_f(vf[b].v[e]), acc[e]);
      }
      m_run = m_new;
    }
  }

  // Merge the G groups of the block.
#pragma unroll
  for (int e = 0; e < EPL; ++e) sm_acc[group][SH::elem(lig, e)] = acc[e];
  if (lig == 0) {
    sm_m[group] = m_run;
    sm_s[group] = s_run;
  }
  __syncthreads();

  float mx = neg_inf();
#pragma unroll
  for (int g = 0; g < G; ++g) mx = fmaxf(mx, sm_m[g]);
  float wg[G];
  float tot = 0.f;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    wg[g] = mx == neg_inf() ? 0.f : expf(sm_m[g] - mx);  // a group with m = -inf has s = 0, acc = 0
    tot += wg[g] * sm_s[g];
  }
  const int64_t orow = row * splits + split;
  float* __restrict__ o = out_p + orow * p.dv;
  const bool empty = !(tot > 0.f);  // no key (or all scores -inf)
  const float inv = empty ? 0.f : 1.f / tot;
  for (int c = tid; c < dv; c += kThreads) {
    float a = 0.f;
#pragma unroll
    for (int g = 0; g < G; ++g) a = fmaf(wg[g], sm_acc[g][c], a);
    o[c] = a * inv;
  }
  if (tid == 0) lse_p[orow] = empty ? neg_inf() : mx + logf(tot);
}

// Merge `splits` normalised partials per row: one block per row.
__global__ void __launch_bounds__(kThreads) combine_splits_kernel(const float* __restrict__ out_p, const float* __restrict__ lse_p, int64_t dv, int splits,
                                                                  float* __restrict__ out, float* __restrict__ lse) {
  const int64_t row = blockIdx.x;
  const float* __restrict__ l = lse_p + row * splits;
  float mx = neg_inf();
  for (int s = 0; s < splits; ++s) mx = fmaxf(mx, l[s]);
  if (mx == neg_inf()) {
    for (int64_t c = threadIdx.x; c < dv; c += blockDim.x) out[row * dv + c] = 0.f;
    if (threadIdx.x == 0) lse[row] = neg_inf();
    return;
  }
  float tot = 0.f;
  for (int s = 0; s < splits; ++s) tot += expf(l[s] - mx);
  const float inv = 1.f / tot;
  for (int64_t c = threadIdx.x; c < dv; c += blockDim.x) {
    float a = 0.f;
    for (int s = 0; s < splits; ++s) {
      const float w = expf(l[s] - mx);
      if (w != 0.f) a = fmaf(w, out_p[(row * splits + s) * dv + c], a);  // skip 0 * (maybe 0) partials of empty splits
    }
    out[row * dv + c] = a * inv;
  }
  if (threadIdx.x == 0) lse[row] = mx + logf(tot);
}

// Elementwise exact LSE merge; grid-stride over rows * dv elements (+ rows lse values).
__global__ void merge_kernel(const float* __restrict__ out_a, const float* __restrict__ lse_a, const float* __restrict__ out_b,
                             const float* __restrict__ lse_b, int64_t rows, int64_t dv, void* __restrict__ out, Elem out_type,
                             float* __restrict__ lse) {
  const int64_t total = rows * dv;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += stride) {
    const int64_t r = t / dv;
    const float la = lse_a[r], lb = lse_b[r];
    const float mx = fmaxf(la, lb);
    if (mx == neg_inf()) {
      store_elem(out, out_type, t, 0.f);
      continue;
    }
    const float wa = expf(la - mx), wb = expf(lb - mx);
    store_elem(out, out_type, t, (wa * out_a[t] + wb * out_b[t]) / (wa + wb));
  }
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < rows; r += stride) {
    const float la = lse_a[r], lb = lse_b[r];
    const float mx = fmaxf(la, lb);
    lse[r] = mx == neg_inf() ? neg_inf() : mx + logf(expf(la - mx) + expf(lb - mx));
  }
}

template <class T, class SH, bool kSparse>
cudaError_t launch_shape(const AttentionParams<T>& p, int splits, float* workspace, cudaStream_t stream) {
  const int64_t rows = p.hq * p.m;
  const int64_t keys = kSparse ? p.k : p.n;
  if (splits < 1) splits = 1;
  const int64_t chunk = splits > 1 ? (keys + splits - 1) / splits : (keys > 0 ? keys : 1);
  const dim3 grid(static_cast<unsigned>(rows * splits));
  if (splits == 1) {
    attention_split_kernel<T, SH, kSparse><<<grid, kThreads, 0, stream>>>(p, 1, chunk, p.out, p.lse);
    return cudaGetLastError();
  }
  float* out_p = workspace;
  float* lse_p = workspace + rows * splits * p.dv;
  attention_split_kernel<T, SH, kSparse><<<grid, kThreads, 0, stream>>>(p, splits, chunk, out_p, lse_p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  combine_splits_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(out_p, lse_p, p.dv, splits, p.out, p.lse);
  return cudaGetLastError();
}

inline bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

template <class T, bool kSparse>
cudaError_t launch_attention(const AttentionParams<T>& p, int splits, float* workspace, cudaStream_t stream) {
  if (p.hq <= 0 || p.hkv <= 0 || p.hq % p.hkv != 0 || p.m < 0 || p.n < 0 || p.k < 0 || !supports_dims(p.d, p.dv)) return cudaErrorInvalidValue;
  if (p.k_head_stride < 0 || p.k_row_stride < 0 || p.v_head_stride < 0 || p.v_row_stride < 0) return cudaErrorInvalidValue;
  if (!kSparse && p.causal && p.m > p.n) return cudaErrorInvalidValue;
  const int64_t rows = p.hq * p.m;
  if (rows == 0) return cudaSuccess;
  if (splits < 1) splits = 1;
  if (splits > 1 && workspace == nullptr) return cudaErrorInvalidValue;
  if (rows * static_cast<int64_t>(splits) > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  constexpr int kVecElems = static_cast<int>(16 / sizeof(T));
  const int64_t bytes = static_cast<int64_t>(sizeof(T));
  const bool strides16 = (p.k_head_stride * bytes) % 16 == 0 && (p.k_row_stride * bytes) % 16 == 0 && (p.v_head_stride * bytes) % 16 == 0 &&
                         (p.v_row_stride * bytes) % 16 == 0;
  const bool vec_ok = p.d == p.dv && strides16 && aligned16(p.keys) && aligned16(p.values);
  if (vec_ok && p.d == 64) return launch_shape<T, Shape<T, 64 / kVecElems, kVecElems, true>, kSparse>(p, splits, workspace, stream);
  if (vec_ok && p.d == 128) return launch_shape<T, Shape<T, 128 / kVecElems, kVecElems, true>, kSparse>(p, splits, workspace, stream);
  return launch_shape<T, Shape<T, 32, kMaxHeadDim / 32, false>, kSparse>(p, splits, workspace, stream);
}

}  // namespace detail

// ------------------------------------------------------------------------------------------------
// Public host API (enqueue on `stream`, return the launch error, if any)
// ------------------------------------------------------------------------------------------------

// Dense (optionally causal) attention. p.ids is ignored. `splits` from choose_splits(Hq * m, n, sms);
// `workspace` holds workspace_floats(Hq * m, dv, splits) floats (may be null when splits == 1).
template <class T>
cudaError_t dense_attention(const AttentionParams<T>& p, int splits, float* workspace, cudaStream_t stream) {
  return detail::launch_attention<T, false>(p, splits, workspace, stream);
}

// Sparse attention over p.ids (Hq, m, k); p.causal is ignored. `splits` from choose_splits(Hq * m, k, sms).
template <class T>
cudaError_t sparse_attention(const AttentionParams<T>& p, int splits, float* workspace, cudaStream_t stream) {
  if (p.k > 0 && p.ids == nullptr) return cudaErrorInvalidValue;
  return detail::launch_attention<T, true>(p, splits, workspace, stream);
}

// Exact merge of two partial results, rows = number of (out, lse) pairs, out_* rows x dv float32; out (rows x dv) is
// written in out_type (rounded to nearest even from the float32 result), lse in float32.
inline cudaError_t merge_attention(const float* out_a, const float* lse_a, const float* out_b, const float* lse_b, int64_t rows, int64_t dv,
                                   void* out, Elem out_type, float* lse, cudaStream_t stream) {
  if (rows < 0 || dv < 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  constexpr int kMergeThreads = 256;
  const int64_t work = rows * (dv > 0 ? dv : 1);
  int64_t blocks = (work + kMergeThreads - 1) / kMergeThreads;
  if (blocks > 65535) blocks = 65535;  // grid-stride loop covers the rest
  detail::merge_kernel<<<static_cast<unsigned>(blocks), kMergeThreads, 0, stream>>>(out_a, lse_a, out_b, lse_b, rows, dv, out, out_type, lse);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace retrieval_attention
