// retrieval_attention/attention.h -- exact softmax attention over a subset of keys, with log-sum-exp.
//
// Contract (all float32 math, natural-log LSE)
//   * For one query q (d floats) and a set S of key rows, attend computes
//       lse = log sum_{j in S} exp(scale * q.k_j),   out = sum_j exp(scale * q.k_j - lse) * v_j   (dv floats).
//     An empty S gives out = 0 and lse = -inf, which merge() treats as "contributes nothing".
//   * attend_selected(): S = the ids in `ids[0..k)`, skipping -1 entries (padding). Any other id outside
//     [0, n) throws std::invalid_argument before anything is read. Duplicate ids count twice (as written).
//   * attend_prefix(): S = rows [0, n_visible).
//   * merge(): the exact combination of two partial results over disjoint key sets:
//       lse = logaddexp(lse_a, lse_b); out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b.
//   * Batched forms: q (Hq, m, d), keys (Hkv, n, d), values (Hkv, n, dv), all row-major contiguous; query head h
//     uses kv head h / (Hq / Hkv) (GQA). Outputs out (Hq, m, dv) and lse (Hq, m), float32.
//     dense_attention_batch also takes kv heads that lie apart in memory (key_head_stride / value_head_stride
//     elements between heads; rows inside a head contiguous), e.g. the first n rows of a larger buffer.
//     They run in parallel over (head, query) with OpenMP and touch no shared mutable state.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "scalar.h"

namespace retrieval_attention {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

namespace detail {
// Finish softmax-weighted sum given raw scaled scores; rows addressed through `row_of(j)`.
template <class T, class RowOf>
float softmax_weighted_sum(const float* scores, int64_t count, RowOf row_of, const T* values, int64_t dv, float* out) {
  std::fill(out, out + dv, 0.f);
  if (count == 0) return kNegInf;
  float mx = kNegInf;
  for (int64_t j = 0; j < count; ++j) {
    if (std::isnan(scores[j])) {  // a NaN query or key: propagate it rather than hide it
      std::fill(out, out + dv, std::numeric_limits<float>::quiet_NaN());
      return std::numeric_limits<float>::quiet_NaN();
    }
    mx = std::max(mx, scores[j]);
  }
  if (mx == kNegInf) return kNegInf;  // all scores -inf: nothing to attend
  double sum = 0.0;
  for (int64_t j = 0; j < count; ++j) {
    const float w = std::exp(scores[j] - mx);
    sum += w;
    axpy_row(w, values + row_of(j) * dv, out, dv);
  }
  const float inv = static_cast<float>(1.0 / sum);
  for (int64_t i = 0; i < dv; ++i) out[i] *= inv;
  return mx + static_cast<float>(std::log(sum));
}
}  // namespace detail

template <class T>
float attend_selected(const float* q, int64_t d, const T* keys, const T* values, int64_t dv, int64_t n, const int64_t* ids, int64_t k,
                      float scale, float* out, std::vector<float>& scratch_scores, std::vector<int64_t>& scratch_rows) {
  scratch_scores.clear();
  scratch_rows.clear();
  for (int64_t j = 0; j < k; ++j) {
    const int64_t id = ids[j];
    if (id == -1) continue;
    if (id < 0 || id >= n) throw std::invalid_argument("ids: key id " + std::to_string(id) + " is out of range [0, " + std::to_string(n) + ")");
    scratch_rows.push_back(id);
    // The selected rows are scattered over a store far larger than the caches: request all of them (keys and
    // values) before the first is used, so their memory latencies overlap instead of adding up row by row.
    prefetch_bytes(keys + id * d, d * static_cast<int64_t>(sizeof(T)));
    prefetch_bytes(values + id * dv, dv * static_cast<int64_t>(sizeof(T)));
  }
  for (const int64_t id : scratch_rows) scratch_scores.push_back(scale * dot_row(q, keys + id * d, d));
  const int64_t* rows = scratch_rows.data();
  return detail::softmax_weighted_sum(scratch_scores.data(), static_cast<int64_t>(scratch_rows.size()),
                                      [rows](int64_t j) { return rows[j]; }, values, dv, out);
}

template <class T>
float attend_prefix(const float* q, int64_t d, const T* keys, const T* values, int64_t dv, int64_t n_visible, float scale, float* out,
                    std::vector<float>& scratch_scores) {
  scratch_scores.resize(static_cast<size_t>(n_visible));
  for (int64_t j = 0; j < n_visible; ++j) scratch_scores[static_cast<size_t>(j)] = scale * dot_row(q, keys + j * d, d);
  return detail::softmax_weighted_sum(scratch_scores.data(), n_visible, [](int64_t j) { return j; }, values, dv, out);
}

inline void merge_one(const float* out_a, float lse_a, const float* out_b, float lse_b, int64_t dv, float* out, float* lse) {
  const float m = std::max(lse_a, lse_b);
  if (m == kNegInf) {  // both empty
    std::fill(out, out + dv, 0.f);
    *lse = kNegInf;
    return;
  }
  const float wa = std::exp(lse_a - m), wb = std::exp(lse_b - m);
  const float total = wa + wb;
  for (int64_t i = 0; i < dv; ++i) out[i] = (wa * out_a[i] + wb * out_b[i]) / total;
  *lse = m + std::log(total);
}

inline void check_gqa(int64_t hq, int64_t hkv) {
  require(hq > 0 && hkv > 0, "number of heads must be positive");
  require(hq % hkv == 0, "query heads (" + std::to_string(hq) + ") must be a multiple of key/value heads (" + std::to_string(hkv) + ")");
}

// Sparse attention: ids (Hq, m, k).
template <class T>
void sparse_attention_batch(const float* q, int64_t hq, int64_t m, int64_t d, const T* keys, const T* values, int64_t hkv, int64_t n,
                            int64_t dv, const int64_t* ids, int64_t k, float scale, float* out, float* lse) {
  check_gqa(hq, hkv);
  // Validate every id up front so a bad id is reported before any work and never read.
  for (int64_t i = 0; i < hq * m * k; ++i)
    if (ids[i] != -1 && (ids[i] < 0 || ids[i] >= n))
      throw std::invalid_argument("ids: key id " + std::to_string(ids[i]) + " is out of range [0, " + std::to_string(n) + ")");
  const int64_t group = hq / hkv;
#pragma omp parallel
  {
    std::vector<float> sc;
    std::vector<int64_t> rows;
#pragma omp for schedule(static)
    for (int64_t hm = 0; hm < hq * m; ++hm) {
      const int64_t h = hm / m, kv = h / group;
      lse[hm] = attend_selected(q + hm * d, d, keys + kv * n * d, values + kv * n * dv, dv, n, ids + hm * k, k, scale, out + hm * dv, sc, rows);
    }
  }
}

// Dense attention over all n keys. With `causal`, queries are the last m positions of the key sequence
// (bottom-right aligned): query i sees keys [0, n - m + i].
template <class T>
void dense_attention_batch(const float* q, int64_t hq, int64_t m, int64_t d, const T* keys, const T* values, int64_t hkv, int64_t n,
                           int64_t dv, float scale, bool causal, float* out, float* lse, int64_t key_head_stride = -1,
                           int64_t value_head_stride = -1) {
  check_gqa(hq, hkv);
  const int64_t ks = key_head_stride < 0 ? n * d : key_head_stride, vs = value_head_stride < 0 ? n * dv : value_head_stride;
  require(!causal || m <= n, "causal attention needs at least as many keys as queries");
  const int64_t group = hq / hkv;
#pragma omp parallel
  {
    std::vector<float> sc;
#pragma omp for schedule(static)
    for (int64_t hm = 0; hm < hq * m; ++hm) {
      const int64_t h = hm / m, i = hm % m, kv = h / group;
      const int64_t visible = causal ? n - m + i + 1 : n;
      lse[hm] = attend_prefix(q + hm * d, d, keys + kv * ks, values + kv * vs, dv, visible, scale, out + hm * dv, sc);
    }
  }
}

// rows = number of (out, lse) pairs; out_* are rows x dv.
inline void merge_batch(const float* out_a, const float* lse_a, const float* out_b, const float* lse_b, int64_t rows, int64_t dv, float* out,
                        float* lse) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) merge_one(out_a + r * dv, lse_a[r], out_b + r * dv, lse_b[r], dv, out + r * dv, lse + r);
}

}  // namespace retrieval_attention
