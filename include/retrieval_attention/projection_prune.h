// retrieval_attention/projection_prune.h -- the pruning step of a query-guided graph's projection, over candidate
// lists prepared elsewhere: retrieval_attention.index.projection_lists gathers, deduplicates and sorts them with torch
// on the device that made the graph's kNN lists, and the graph build then takes the result
// (QueryGuidedGraph::build_from_neighbors(..., projection)) instead of making its projection on the CPU. The CUDA
// version is cuda/projection_prune.cuh; both make the selection of QueryGuidedGraph::prune.
//
// Contract
//   * keys: (groups, n, d) rows of T, row-major; index i (of groups * per) reads key group i / per.
//   * Segments s in [0, n_seg): entries [begin[s], end(s)), end(s) = begin[s + 1] for s + 1 < n_seg, else n_valid.
//     pivot[begin[s]] = i * (n + 1) + p names the segment's index i and key p. Within a segment, near[e] (ids in
//     [0, n), never p, no repeats) and near_dist[e] = |k_p|^2 + |k_c|^2 - 2 k_p.k_c list the candidates nearest first
//     (by max(dist, 0), then first appearance); mips[e] lists the same candidates by k_p.k_c descending, then first
//     appearance.
//   * out (indexes, n, degree) int32, filled with -1 by the caller; row p of index i gets the segment's pruned list.
//   * The selection: n_ip = min(size, degree / 4) and n_rng = degree - n_ip. RNG pass over the first min(size, cap)
//     nearest: c is kept unless an already kept r has c.r > (|k_c|^2 - dist) / 2 + |k_r|^2 / 2 (r is nearer to c than p
//     is), until n_rng are kept. Then the first min(size, degree) of mips that are not kept yet, in order, until degree
//     are kept. Dot products and squared norms are float32 sums of the rows widened to float32.
//   * Pure function; parallel over segments (OpenMP via parallel_for).
//
// projection_rows_valid(): the check a graph build makes of given lists (rows x k int32, row r for key r % n): ids in
// [-1, n), never the row's own key, none twice in a row. Parallel over blocks of rows.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "scalar.h"

namespace retrieval_attention {

inline bool projection_rows_valid(const int32_t* lists, int64_t rows, int64_t k, int64_t n) {
  constexpr int64_t kBlock = 4096;
  return parallel_all_of((rows + kBlock - 1) / kBlock, [&](int64_t b) {
    std::vector<int32_t> row;
    for (int64_t r = b * kBlock; r < std::min(rows, (b + 1) * kBlock); ++r) {
      row.clear();
      for (int64_t j = 0; j < k; ++j) {
        const int32_t c = lists[r * k + j];
        if (c == -1) continue;
        if (c < 0 || c >= n || c == r % n) return false;
        row.push_back(c);
      }
      std::sort(row.begin(), row.end());
      if (std::adjacent_find(row.begin(), row.end()) != row.end()) return false;
    }
    return true;
  });
}

template <class T>
void projection_prune(const T* keys, int64_t n, int64_t d, int64_t per, const int64_t* begin, int64_t n_seg, int64_t n_valid,
                      const int64_t* pivot, const int64_t* near, const float* near_dist, const int64_t* mips, int64_t degree, int64_t cap,
                      int32_t* out) {
  parallel_for(n_seg, [&](int64_t s) {
    const int64_t b = begin[s], e = s + 1 < n_seg ? begin[s + 1] : n_valid, size = e - b;
    const int64_t idx = pivot[b] / (n + 1), p = pivot[b] % (n + 1);
    const T* rows = keys + (idx / per) * n * d;
    const int64_t n_ip = std::min(size, degree / 4), n_rng = degree - n_ip, scan = std::min(size, cap);
    std::vector<float> kept_rows, c(static_cast<size_t>(d));
    std::vector<float> kept_half;
    std::vector<int32_t> kept;
    for (int64_t t = b; t < b + scan && static_cast<int64_t>(kept.size()) < n_rng; ++t) {
      float sq = 0.f;
      for (int64_t k = 0; k < d; ++k) {
        c[static_cast<size_t>(k)] = to_float(rows[near[t] * d + k]);
        sq += c[static_cast<size_t>(k)] * c[static_cast<size_t>(k)];
      }
      const float half = 0.5f * (sq - near_dist[t]);
      bool occluded = false;
      for (size_t r = 0; r < kept.size() && !occluded; ++r) {
        float dot = 0.f;
        for (int64_t k = 0; k < d; ++k) dot += c[static_cast<size_t>(k)] * kept_rows[r * static_cast<size_t>(d) + static_cast<size_t>(k)];
        occluded = dot > half + kept_half[r];
      }
      if (occluded) continue;
      kept_rows.insert(kept_rows.end(), c.begin(), c.end());
      kept_half.push_back(0.5f * sq);
      kept.push_back(static_cast<int32_t>(near[t]));
    }
    for (int64_t t = b; t < b + std::min(size, degree) && static_cast<int64_t>(kept.size()) < degree; ++t)
      if (std::find(kept.begin(), kept.end(), static_cast<int32_t>(mips[t])) == kept.end()) kept.push_back(static_cast<int32_t>(mips[t]));
    std::copy(kept.begin(), kept.end(), out + (idx * n + p) * degree);
  });
}

}  // namespace retrieval_attention
