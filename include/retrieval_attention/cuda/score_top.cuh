// retrieval_attention/cuda/score_top.cuh -- torch-free CUDA kernel: each row's m best columns of the product of two
// float16 matrices, without writing the product out (the GPU prefill's key-to-key lists; twelfth-twentieth sessions
// wrote a float16 score matrix of 8 x 130K x 65K entries per 8B layer at 128K, 136 GB, and read it back).
//
// Contract of score_top_candidates()
//   * left (groups, n_left, dim) and right (groups, n_right, dim) __half, contiguous, 16-byte aligned; dim 64, 128 or
//     256 (pad both with zeros); bias (groups, n_right) float32, contiguous, or null for none.
//   * For each group g and left row r in [row_start, row_start + rows): the m columns c (rows of `right`) with the
//     largest scores s(r, c) = sum_i left[g, r, i] * right[g, c, i] + bias[g, c] (float16 products summed in float32
//     by the tensor cores, mma.sync m16n8k16; the bias added in float32), largest first, equal scores by smaller
//     column: one total order, so the result does not depend on thread timing or on the order of the pass. NaN
//     scores are never returned. Column c is skipped when self_stride > 0 and c * self_stride == r (the row itself,
//     when the columns are every self_stride-th row). out (groups, rows, m) int64, -1 after the columns found when
//     fewer than m qualify.
//   * Limits (score_top_supported()): 1 <= m <= kScoreTopMaxM; dim as above; n_right < 2^31; sm_80 or newer (the
//     kernel is empty below sm_80 and the launch returns cudaErrorNotSupported); score_top_smem_bytes(dim) of shared
//     memory per block (157 / 181 / 196 KiB for dim 64 / 128 / 256: H100 and H200 take all three, A100 only dim 64;
//     otherwise the attribute call fails and its error is returned).
//   * Algorithm: a block of 8 warps owns 128 left rows; each warp keeps its 16 rows' A fragments in registers for
//     the whole pass. The block streams `right` (and the bias) in tiles of 64 columns through a ring of
//     score_top_stages() shared-memory slots (cp.async; one barrier per tile), from the tile of its own rows' columns
//     (with self_stride > 0) around to the one before it. Each
//     warp multiplies its rows by the tile (B fragments by ldmatrix, 8 x dim/16 mma). A score that beats its row's
//     bound (the m-th best 64-bit key kept so far; a key packs the ordered score bits above ~column) is appended to
//     the row's shared-memory buffer; the row's best score of the tile, then each score, are first compared with the
//     bound's score in float. A tile adds at most 64 entries per row, so when a buffer holds more than
//     kScoreTopCap - 64 (>= m + 32) entries the owning warp ranks it (each entry counts the larger keys; keys are
//     distinct), keeps the best m in order and raises the bound. Once the bounds have risen, few tiles pass.
//   * Ownership / streams / threads: nothing is allocated; the launch goes to the given stream, asynchronously; the
//     host function sets the kernel's dynamic shared-memory attribute (per call) and touches no other state.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace retrieval_attention {
namespace cuda {

constexpr int kScoreTopWarps = 8;  // 128 rows per block: each tile read from L2 serves 128 rows (64 were L2-bound)
constexpr int kScoreTopRows = 16 * kScoreTopWarps;  // left rows per block
constexpr int kScoreTopCols = 64;                    // columns per tile
constexpr int kScoreTopMaxM = 32;
// Buffer entries per row: the m kept, one tile's worth and as much again of slack, so that a row is ranked once per
// 33+ entries that beat its bound rather than at every tile (with no slack, keys that drift along positions had
// their buffers ranked at nearly every tile: 6x slower than writing the scores out).
constexpr int kScoreTopCap = 128;
static_assert(kScoreTopCap >= kScoreTopMaxM + kScoreTopCols + 32, "score_top: too little slack in the row buffers");
static_assert(kScoreTopCap % 32 == 0, "score_top: rank_keep gives each lane kScoreTopCap / 32 entries");

// Column tiles in flight: three where shared memory allows (head dim <= 128), else two.
constexpr int score_top_stages(int64_t dim) { return dim <= 128 ? 3 : 2; }

inline bool score_top_supported(int64_t dim, int64_t n_right, int64_t m) {
  return (dim == 64 || dim == 128 || dim == 256) && n_right < (int64_t{1} << 31) && m >= 1 && m <= kScoreTopMaxM;
}

// Mirrored by retrieval_attention.index._score_top_smem_bytes (which decides where the fused path is taken).
inline size_t score_top_smem_bytes(int64_t dim) {
  const size_t lds = static_cast<size_t>(dim) + 8;  // halves per tile row: conflict-free fragment loads
  const size_t stages = score_top_stages(dim);
  const size_t tiles = stages * kScoreTopCols * lds * sizeof(__half);
  const size_t buffers = static_cast<size_t>(kScoreTopRows) * kScoreTopCap * sizeof(uint64_t);
  const size_t per_row = kScoreTopRows * (sizeof(uint64_t) + sizeof(int));   // bounds and counts
  return tiles + buffers + per_row + stages * kScoreTopCols * sizeof(float);  // + the tiles' biases
}

namespace score_top_detail {

// Larger key = larger score, then smaller column. Never 0 (the low word ~col has its top bit set), so 0 is a bound
// below every key; NaN maps to the lowest score bits.
__device__ __forceinline__ uint64_t pack_key(float s, uint32_t col) {
  uint32_t u = __float_as_uint(s);
  u = (s != s) ? 0u : ((u & 0x80000000u) ? ~u : (u | 0x80000000u));
  return (static_cast<uint64_t>(u) << 32) | static_cast<uint32_t>(~col);
}

// The score of a key (pack_key's inverse on the high word; keys of numbers only).
__device__ __forceinline__ float key_score(uint64_t key) {
  const uint32_t u = static_cast<uint32_t>(key >> 32);
  return __uint_as_float((u & 0x80000000u) ? (u & 0x7fffffffu) : ~u);
}

__device__ __forceinline__ int64_t key_column(uint64_t key) { return static_cast<int64_t>(~static_cast<uint32_t>(key)); }

__device__ __forceinline__ uint32_t load_pair(const __half* p) { return *reinterpret_cast<const uint32_t*>(p); }

// The warp ranks buffer `buf` (c distinct keys, c <= kScoreTopCap), keeps the best `keep` in order at its front and
// returns how many it kept.
__device__ __forceinline__ int rank_keep(uint64_t* buf, int c, int keep, int lane) {
  uint64_t own[kScoreTopCap / 32];
  int rank[kScoreTopCap / 32];
#pragma unroll
  for (int t = 0; t < kScoreTopCap / 32; ++t) {
    own[t] = (lane + 32 * t < c) ? buf[lane + 32 * t] : 0;
    rank[t] = 0;
  }
  for (int j = 0; j < c; ++j) {
    const uint64_t v = buf[j];  // the same address for the whole warp: a broadcast
#pragma unroll
    for (int t = 0; t < kScoreTopCap / 32; ++t) rank[t] += v > own[t];
  }
  __syncwarp();
#pragma unroll
  for (int t = 0; t < kScoreTopCap / 32; ++t)
    if (lane + 32 * t < c && rank[t] < keep) buf[rank[t]] = own[t];
  __syncwarp();
  return c < keep ? c : keep;
}

template <int KSTEPS>
__global__ void __launch_bounds__(32 * kScoreTopWarps)
    score_top_kernel(const __half* __restrict__ left, const __half* __restrict__ right, const float* __restrict__ bias,
                     int64_t n_left, int64_t n_right, int64_t row_start, int64_t rows, int64_t self_stride, int m,
                     int64_t* __restrict__ out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int DIM = 16 * KSTEPS;
  constexpr int LDS = DIM + 8;
  constexpr int kStages = score_top_stages(DIM);
  extern __shared__ __align__(16) unsigned char smem[];
  __half* tiles = reinterpret_cast<__half*>(smem);                                // [kStages][kScoreTopCols][LDS]
  uint64_t* buf = reinterpret_cast<uint64_t*>(tiles + kStages * kScoreTopCols * LDS);  // [kScoreTopRows][kScoreTopCap]
  uint64_t* bound = buf + kScoreTopRows * kScoreTopCap;                            // [kScoreTopRows]
  float* tile_bias = reinterpret_cast<float*>(bound + kScoreTopRows);               // [kStages][kScoreTopCols]
  int* count = reinterpret_cast<int*>(tile_bias + kStages * kScoreTopCols);         // [kScoreTopRows]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t g = blockIdx.y;
  const __half* L = left + g * n_left * DIM;
  const __half* R = right + g * n_right * DIM;
  const float* B = bias ? bias + g * n_right : nullptr;
  const int64_t row_end = row_start + rows;
  const int64_t block_row = row_start + static_cast<int64_t>(blockIdx.x) * kScoreTopRows;

  if (threadIdx.x < kScoreTopRows) {
    const int64_t r = block_row + threadIdx.x;
    bound[threadIdx.x] = r < row_end ? 0 : ~uint64_t{0};  // rows past the end take nothing
    count[threadIdx.x] = 0;
  }

  // This thread's two rows of the warp's 16 (mma fragment layout: groupID = lane / 4).
  const int local0 = warp * 16 + lane / 4, local1 = local0 + 8;
  const int64_t r0 = block_row + local0, r1 = block_row + local1;
  uint32_t a[KSTEPS][4];
  {
    const bool ok0 = r0 < row_end, ok1 = r1 < row_end;
    const __half* p0 = L + (ok0 ? r0 : 0) * DIM + (lane % 4) * 2;
    const __half* p1 = L + (ok1 ? r1 : 0) * DIM + (lane % 4) * 2;
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) {
      a[ks][0] = ok0 ? load_pair(p0 + ks * 16) : 0u;
      a[ks][1] = ok1 ? load_pair(p1 + ks * 16) : 0u;
      a[ks][2] = ok0 ? load_pair(p0 + ks * 16 + 8) : 0u;
      a[ks][3] = ok1 ? load_pair(p1 + ks * 16 + 8) : 0u;
    }
  }

  // Tile indices are 32-bit (n_right < 2^31) and advance by a compare: a 64-bit modulo per tile cost more issue slots
  // than the tile's ldmatrix.
  const int n_tiles = static_cast<int>((n_right + kScoreTopCols - 1) / kScoreTopCols);
  // One tile into ring slot `slot`: 16-byte pieces of the columns by cp.async (columns past n_right are zero-filled),
  // the biases by 4-byte cp.async (a plain load would hold its warp until it lands). Columns past n_right get a NaN
  // bias, so their scores are NaN, which no screen passes: nothing else needs to know where the columns end.
  const uint32_t tiles_saddr = static_cast<uint32_t>(__cvta_generic_to_shared(tiles));
  const uint32_t bias_saddr = static_cast<uint32_t>(__cvta_generic_to_shared(tile_bias));
  auto load_tile = [&](int t, int slot) {
    const int64_t col0 = static_cast<int64_t>(t) * kScoreTopCols;
    // the tile's columns before n_right (32-bit compares below)
    const int left_cols = static_cast<int>(n_right - col0 < kScoreTopCols ? n_right - col0 : kScoreTopCols);
    const __half* src0 = R + col0 * DIM;
    const uint32_t dst0 = tiles_saddr + static_cast<uint32_t>(slot * kScoreTopCols * LDS * sizeof(__half));
#pragma unroll
    for (int q = 0; q < kScoreTopCols * DIM / 8 / (32 * kScoreTopWarps); ++q) {
      const int p = threadIdx.x + q * 32 * kScoreTopWarps;
      const int c = p / (DIM / 8), off = (p % (DIM / 8)) * 8;
      const bool in = c < left_cols;
      const __half* src = src0 + (in ? c * DIM + off : 0);  // read nothing from (size 0), but a valid address
      const uint32_t saddr = dst0 + static_cast<uint32_t>((c * LDS + off) * sizeof(__half));
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(saddr), "l"(src), "r"(in ? 16 : 0));
    }
    if (threadIdx.x < kScoreTopCols) {
      const int c = threadIdx.x;
      if (c >= left_cols) {
        tile_bias[slot * kScoreTopCols + c] = __int_as_float(0x7fc00000);  // NaN
      } else if (B) {
        const uint32_t saddr = bias_saddr + static_cast<uint32_t>((slot * kScoreTopCols + c) * sizeof(float));
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(saddr), "l"(B + col0 + c));
      } else {
        tile_bias[slot * kScoreTopCols + c] = 0.f;
      }
    }
  };

  // the column that is the row itself (-1: none)
  const int64_t self0 = (self_stride > 0 && r0 % self_stride == 0) ? r0 / self_stride : -1;
  const int64_t self1 = (self_stride > 0 && r1 % self_stride == 0) ? r1 / self_stride : -1;
  uint64_t bound0 = 0, bound1 = 0;
  float bound_score0 = -INFINITY, bound_score1 = -INFINITY;
  // The pass starts at the tile of the block's own rows and wraps around: keys that drift along positions have their
  // nearest columns there, so the bounds rise at once and few later entries beat them (about 6 rankings per row on
  // drifting keys at 128K instead of 30-70 from column 0; the order of the pass does not change the result).
  const int t_first = (self_stride > 0 && n_tiles > 0)
                          ? static_cast<int>(((block_row + kScoreTopRows / 2) / self_stride / kScoreTopCols) % n_tiles)
                          : 0;
  // A ring of kStages tile slots: the pass's tile i sits in slot i % kStages. Before the loop the first kStages - 1
  // tiles are requested; iteration i requests tile i + kStages - 1 into the slot of tile i - 1, after the barrier
  // that every warp reaches only when done with tile i - 1 (one barrier per tile). One cp.async group is committed
  // per request, empty past the last tile, so "all but the newest kStages - 2 groups done" means tile i is in.
  int t_load = t_first;
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_tiles) {
      load_tile(t_load, s);
      t_load = t_load + 1 == n_tiles ? 0 : t_load + 1;
    }
    asm volatile("cp.async.commit_group;\n" ::);
  }
  __syncthreads();  // bounds and counts initialised
  bound0 = bound[local0];
  bound1 = bound[local1];
  if (bound0 == ~uint64_t{0}) bound_score0 = INFINITY;  // rows past the end
  if (bound1 == ~uint64_t{0}) bound_score1 = INFINITY;
  int t = t_first, slot = 0;
  for (int i = 0; i < n_tiles; ++i) {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(kStages - 2));
    __syncthreads();  // tile i is in shared memory for every thread, and every warp is done with tile i - 1
    if (i + kStages - 1 < n_tiles) {
      load_tile(t_load, slot == 0 ? kStages - 1 : slot - 1);
      t_load = t_load + 1 == n_tiles ? 0 : t_load + 1;
    }
    asm volatile("cp.async.commit_group;\n" ::);
    const __half* tile = tiles + slot * kScoreTopCols * LDS;
    const float* tb = tile_bias + slot * kScoreTopCols;
    float acc[kScoreTopCols / 8][4];
#pragma unroll
    for (int j = 0; j < kScoreTopCols / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    // ldmatrix.x4: lane l gives the address of row l % 8 of 8x8 matrix l / 8 = (column block j + l / 16, k half
    // (l / 8) % 2); register q of the result is matrix q in the B-fragment layout (k pair (lane % 4) * 2, column
    // lane / 4)
    const uint32_t frag_base = static_cast<uint32_t>(__cvta_generic_to_shared(
        tile + ((lane / 16) * 8 + lane % 8) * LDS + ((lane / 8) % 2) * 8));
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) {
#pragma unroll
      for (int j = 0; j < kScoreTopCols / 8; j += 2) {
        uint32_t b[4];
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
                     : "r"(frag_base + static_cast<uint32_t>((j * 8 * LDS + ks * 16) * sizeof(__half))));
#pragma unroll
        for (int h = 0; h < 2; ++h)
          asm volatile(
              "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
              : "+f"(acc[j + h][0]), "+f"(acc[j + h][1]), "+f"(acc[j + h][2]), "+f"(acc[j + h][3])
              : "r"(a[ks][0]), "r"(a[ks][1]), "r"(a[ks][2]), "r"(a[ks][3]), "r"(b[2 * h]), "r"(b[2 * h + 1]));
      }
    }
    // Entries that beat their row's bound go to the row's buffer (acc[j][0..1]: row r0, [2..3]: row r1). Screens:
    // the row's best score of the tile against the bound's score (one compare per row and tile; NaN never passes),
    // then each score, then the 64-bit key. Once the bounds have risen, few tiles pass the first screen.
    float max0[kScoreTopCols / 8], max1[kScoreTopCols / 8];
#pragma unroll
    for (int j = 0; j < kScoreTopCols / 8; ++j) {
      const float2 b = *reinterpret_cast<const float2*>(tb + j * 8 + (lane % 4) * 2);
      acc[j][0] += b.x;
      acc[j][1] += b.y;
      acc[j][2] += b.x;
      acc[j][3] += b.y;
      max0[j] = fmaxf(acc[j][0], acc[j][1]);
      max1[j] = fmaxf(acc[j][2], acc[j][3]);
    }
#pragma unroll
    for (int w = kScoreTopCols / 16; w >= 1; w /= 2)  // a tree, not a chain of dependent maxima
#pragma unroll
      for (int j = 0; j < w; ++j) {
        max0[j] = fmaxf(max0[j], max0[j + w]);
        max1[j] = fmaxf(max1[j], max1[j + w]);
      }
    const float best0 = max0[0], best1 = max1[0];
    bool full = false;  // a buffer of this lane's rows can no longer take a whole tile
    // score v of column col for local row `local`: appended when it beats the row's bound and is not the row itself
    auto offer = [&](float v, int64_t col, float bound_score, uint64_t bound_key, int64_t self, int local) {
      if (!(v >= bound_score)) return;
      const uint64_t key = pack_key(v, static_cast<uint32_t>(col));
      if (key > bound_key && col != self) {
        const int at = atomicAdd(&count[local], 1);
        buf[local * kScoreTopCap + at] = key;
        full |= at >= kScoreTopCap - kScoreTopCols;
      }
    };
    // each row's scores (side 0: acc[j][0..1], row r0; side 1: acc[j][2..3], row r1) only when this lane's best of
    // them passes (most tiles, one row at most)
    const int64_t lane_col0 = static_cast<int64_t>(t) * kScoreTopCols + (lane % 4) * 2;
    auto offer_row = [&](int side, float best, float bound_score, uint64_t bound_key, int64_t self, int local) {
      if (!(best >= bound_score)) return;
#pragma unroll
      for (int j = 0; j < kScoreTopCols / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e)
          offer(acc[j][2 * side + e], lane_col0 + j * 8 + e, bound_score, bound_key, self, local);
    };
    offer_row(0, best0, bound_score0, bound0, self0, local0);
    offer_row(1, best1, bound_score1, bound1, self1, local1);
    // The warp ranks its full buffers (each row's entries come from this warp only).
    if (__any_sync(0xffffffffu, full)) {
      __syncwarp();
      for (int i = 0; i < 16; ++i) {
        const int lr = warp * 16 + i;
        const int c = count[lr];
        if (c > kScoreTopCap - kScoreTopCols) {
          const int kept = rank_keep(buf + lr * kScoreTopCap, c, m, lane);
          if (lane == 0) {
            count[lr] = kept;
            if (kept == m) bound[lr] = buf[lr * kScoreTopCap + m - 1];
          }
          __syncwarp();
        }
      }
      if (bound0 != bound[local0]) {
        bound0 = bound[local0];
        bound_score0 = key_score(bound0);
      }
      if (bound1 != bound[local1]) {
        bound1 = bound[local1];
        bound_score1 = key_score(bound1);
      }
    }
    t = t + 1 == n_tiles ? 0 : t + 1;
    slot = slot + 1 == kStages ? 0 : slot + 1;
  }
  asm volatile("cp.async.wait_group 0;\n" ::);  // nothing in flight at exit (only empty groups are left)

  for (int i = 0; i < 16; ++i) {
    const int lr = warp * 16 + i;
    const int64_t r = block_row + lr;
    if (r >= row_end) break;
    const int kept = rank_keep(buf + lr * kScoreTopCap, count[lr], m, lane);
    int64_t* o = out + (g * rows + (r - row_start)) * m;
    for (int s = lane; s < m; s += 32) o[s] = s < kept ? key_column(buf[lr * kScoreTopCap + s]) : -1;
    __syncwarp();
  }
#endif
}

}  // namespace score_top_detail

// See the contract at the top of this file.
inline cudaError_t score_top_candidates(const __half* left, const __half* right, const float* bias, int64_t groups,
                                        int64_t n_left, int64_t n_right, int64_t dim, int64_t row_start, int64_t rows,
                                        int64_t self_stride, int64_t m, int64_t* out, cudaStream_t stream) {
  if (!score_top_supported(dim, n_right, m)) return cudaErrorInvalidValue;
  int dev = 0, major = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (err != cudaSuccess) return err;
  if (major < 8) return cudaErrorNotSupported;
  if (groups == 0 || rows == 0) return cudaSuccess;
  const size_t smem = score_top_smem_bytes(dim);
  const dim3 grid(static_cast<unsigned>((rows + kScoreTopRows - 1) / kScoreTopRows), static_cast<unsigned>(groups));
  auto launch = [&](auto kernel) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return e;
    kernel<<<grid, 32 * kScoreTopWarps, smem, stream>>>(left, right, bias, n_left, n_right, row_start, rows, self_stride,
                                                         static_cast<int>(m), out);
    return cudaGetLastError();
  };
  switch (dim) {
    case 64:
      return launch(score_top_detail::score_top_kernel<4>);
    case 128:
      return launch(score_top_detail::score_top_kernel<8>);
    default:
      return launch(score_top_detail::score_top_kernel<16>);
  }
}

}  // namespace cuda
}  // namespace retrieval_attention
