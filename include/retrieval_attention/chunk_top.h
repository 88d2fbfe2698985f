// retrieval_attention/chunk_top.h -- CPU impls of the GPU prefill's neighbour-list stages: candidate columns of a score
// matrix from its best column chunks (the bipartite lists' top-k, exact_knn, and the key-to-key lists' candidates,
// exact_key_knn, in Python), and the candidates re-ranked by L2 (the key-to-key lists).
//
// Contract of chunk_top_candidates()
//   * scores: rows x cols, row-major, contiguous, T in {float, Half, BFloat16}; cols = n_chunks * chunk. Chunk c of
//     a row is its columns [c * chunk, (c + 1) * chunk).
//   * For each row: rank its chunks by their largest entry, keep the kc best, and write to out (rows x m, int64)
//     the columns of the m largest entries inside the kept chunks, largest first. A row's r largest entries
//     always lie in its r best chunks, so with kc >= r the first r outputs are the row's top r (up to ties).
//   * One total order decides every comparison, so the result is a pure function of the input: entries (and chunk
//     maxima) compare by value, NaN counting as -inf and -0 as +0, and equal values rank the smaller column (chunk) first.
//     cuda/chunk_top.cuh computes the same order on a GPU; the two give identical outputs on identical input.
//   * Requires 1 <= chunk, cols % chunk == 0, 1 <= kc <= n_chunks, 1 <= m <= kc * chunk (the bindings check).
//   * Threads: rows are split over OpenMP threads (parallel_for); the inputs are only read, out rows are disjoint.
//
// Contract of rerank_l2()
//   * keys (groups, n, d) row-major contiguous, T in {float, Half, BFloat16}; cand (groups, b, m) int64 with entries in
//     [0, n), or -1 for none (any other entry counts as none and is never read; the op rejects them unless told
//     not to); out (groups, b, k) int64, k <= m. Row r of group g asks for key row_start + r of g.
//   * out lists the k candidates nearest to that key, nearest first, by the float32 distance sum_c (x_c - y_c)^2
//     (elements widened to float32; NaN ranks as +inf); equal distances rank the smaller id first; -1 pads the list
//     when fewer than k candidates are valid. Candidates should be distinct (a repeated one may be listed twice).
//     cuda/chunk_top.cuh sums in another order, so the two agree up to float32 rounding (near-ties may swap).
//   * Threads: (group, row) pairs are split over OpenMP threads; the inputs are only read.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

#include "parallel.h"
#include "scalar.h"

namespace retrieval_attention {

// A 64-bit key whose unsigned order is (value, then smaller index) best-first order: the value's bits made
// monotone in the high half (NaN as -inf), the complement of the index in the low half.
inline uint64_t chunk_rank_key(float v, uint32_t index) {
  if (std::isnan(v)) v = -INFINITY;
  if (v == 0.f) v = 0.f;  // -0 ranks as +0
  const uint32_t u = float_to_bits(v);
  const uint32_t ordered = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (static_cast<uint64_t>(ordered) << 32) | static_cast<uint64_t>(0xFFFFFFFFu - index);
}

inline uint32_t chunk_rank_index(uint64_t key) { return 0xFFFFFFFFu - static_cast<uint32_t>(key & 0xFFFFFFFFu); }

template <class T>
void chunk_top_candidates(const T* scores, int64_t rows, int64_t cols, int64_t chunk, int64_t kc, int64_t m, int64_t* out) {
  const int64_t n_chunks = cols / chunk;
  parallel_for(rows, [&](int64_t r) {
    const T* row = scores + r * cols;
    thread_local std::vector<uint64_t> chunks, kept;  // per-thread scratch, reused across rows and calls
    chunks.resize(static_cast<size_t>(n_chunks));
    for (int64_t c = 0; c < n_chunks; ++c) {
      float best = -INFINITY;
      for (int64_t j = c * chunk; j < (c + 1) * chunk; ++j) {
        const float v = to_float(row[j]);
        if (v > best) best = v;  // NaN never wins
      }
      chunks[static_cast<size_t>(c)] = chunk_rank_key(best, static_cast<uint32_t>(c));
    }
    std::partial_sort(chunks.begin(), chunks.begin() + kc, chunks.end(), std::greater<uint64_t>());
    kept.clear();
    for (int64_t s = 0; s < kc; ++s) {
      const int64_t c = chunk_rank_index(chunks[static_cast<size_t>(s)]);
      for (int64_t j = c * chunk; j < (c + 1) * chunk; ++j) kept.push_back(chunk_rank_key(to_float(row[j]), static_cast<uint32_t>(j)));
    }
    std::partial_sort(kept.begin(), kept.begin() + m, kept.end(), std::greater<uint64_t>());
    for (int64_t i = 0; i < m; ++i) out[r * m + i] = chunk_rank_index(kept[static_cast<size_t>(i)]);
  }, /*dynamic=*/false);
}

// Ascending order of a non-negative distance (NaN as +inf), then smaller id: one unsigned 64-bit key; none is last.
inline uint64_t distance_rank_key(float dist, int64_t id) {
  if (id < 0) return ~uint64_t{0};
  if (std::isnan(dist)) dist = INFINITY;
  return (static_cast<uint64_t>(float_to_bits(dist)) << 32) | static_cast<uint64_t>(static_cast<uint32_t>(id));
}

template <class T>
void rerank_l2(const T* keys, int64_t groups, int64_t n, int64_t d, int64_t row_start, const int64_t* cand, int64_t b, int64_t m, int64_t k,
               int64_t* out) {
  parallel_for(groups * b, [&](int64_t gr) {
    const int64_t g = gr / b, r = gr % b;
    const T* x = keys + (g * n + row_start + r) * d;
    const int64_t* c = cand + gr * m;
    thread_local std::vector<uint64_t> ranked;
    ranked.resize(static_cast<size_t>(m));
    for (int64_t j = 0; j < m; ++j) {
      float dist = 0.f;
      const bool valid = c[j] >= 0 && c[j] < n;  // any other entry counts as none and is never read
      if (valid) {
        const T* y = keys + (g * n + c[j]) * d;
        for (int64_t t = 0; t < d; ++t) {
          const float diff = to_float(x[t]) - to_float(y[t]);
          dist += diff * diff;
        }
      }
      ranked[static_cast<size_t>(j)] = distance_rank_key(dist, valid ? c[j] : -1);
    }
    std::partial_sort(ranked.begin(), ranked.begin() + k, ranked.end());
    for (int64_t i = 0; i < k; ++i) {
      const uint64_t key = ranked[static_cast<size_t>(i)];
      out[gr * k + i] = key == ~uint64_t{0} ? -1 : static_cast<int64_t>(key & 0xFFFFFFFFu);
    }
  }, /*dynamic=*/false);
}

}  // namespace retrieval_attention
