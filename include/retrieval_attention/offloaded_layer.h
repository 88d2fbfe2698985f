// retrieval_attention/offloaded_layer.h -- the CPU half of one attention layer during decoding.
//
// Contract
//   * Holds, for each of Hkv key/value heads, a key store (n x d) and a value store (n x dv) of scalar T,
//     and for each of Hq query heads one KeyIndex over its GQA group's key store (query head h uses kv
//     head h / (Hq / Hkv)); the group's vectors are stored once and shared by its indexes.
//     Row i of every head is the same token: the i-th token moved to the CPU (ids are CPU-local).
//   * build(): first tokens plus the training queries (the layer's prefill queries) -> one index per query
//     head, made by the IndexFactory. With no tokens yet, the training queries are kept and the indexes
//     are made when the first tokens arrive through append().
//   * append(): tokens evicted from the GPU window; stored at once. They join the indexes in batches: while at most
//     `max_unindexed` rows are not yet indexed, searches scan those rows exactly and merge them with the index's
//     results (exact for them), so inserting into the graphs costs nothing per decode step.
//   * retrieve_attend(): for each (query head, query) finds the top-k keys with its index and attends
//     them exactly (attention.h); k is clamped to the number of CPU tokens, so top_k >= n is exact.
//   * Layouts: keys (Hkv, t, d), values (Hkv, t, dv), queries (Hq, m, d) float32; all row-major contiguous.
//   * Threads: retrieve_attend may run concurrently with itself (shared lock); build/append take the lock
//     exclusively, so a search never sees a half-inserted token. Work inside each call is OpenMP-parallel
//     over heads; the caller should not hold the Python GIL.
#pragma once

#include <functional>
#include <memory>
#include <shared_mutex>
#include <vector>

#include "attention.h"
#include "index.h"
#include "parallel.h"
#include "topk.h"

namespace retrieval_attention {

template <class T>
class OffloadedLayer {
 public:
  using Scalar = T;
  // (shared keys of the group, training queries (n_train x d float32), n_train, optional precomputed exact
  // neighbours of the training queries (n_train x knn_k int64, or null), knn_k) -> index over the keys
  using IndexFactory =
      std::function<std::unique_ptr<KeyIndex<T>>(std::shared_ptr<const VectorStore<T>>, const float*, int64_t, const int64_t*, int64_t)>;

  OffloadedLayer(int64_t hq, int64_t hkv, int64_t d, int64_t dv, IndexFactory factory, int64_t max_unindexed = 0)
      : hq_(hq), hkv_(hkv), d_(d), dv_(dv), max_unindexed_(max_unindexed), factory_(std::move(factory)) {
    check_gqa(hq, hkv);
    require(max_unindexed >= 0, "max_unindexed must be non-negative");
    require(d > 0 && dv > 0, "head dimensions must be positive");
    for (int64_t h = 0; h < hkv; ++h) {
      keys_.push_back(std::make_shared<VectorStore<T>>(d));
      values_.push_back(std::make_shared<VectorStore<T>>(dv));
    }
    indexes_.resize(static_cast<size_t>(hq));
  }

  int64_t q_heads() const { return hq_; }
  int64_t kv_heads() const { return hkv_; }
  int64_t size() const {
    std::shared_lock<std::shared_mutex> lock(mu_);
    return keys_[0]->size();
  }
  bool indexed() const { return indexes_[0] != nullptr; }

  // knn (Hq, m, knn_k) optional: exact neighbours (row ids of this layer's first t tokens) of each training query.
  void build(const T* keys, const T* values, int64_t t, const float* train_q, int64_t m, const int64_t* knn = nullptr, int64_t knn_k = 0) {
    require(all_finite(keys, hkv_ * t * d_) && all_finite(train_q, hq_ * m * d_), "keys or training queries contain NaN or Inf");
    std::unique_lock<std::shared_mutex> lock(mu_);
    require(!indexed() && keys_[0]->size() == 0, "layer already built");
    require(m >= 0 && t >= 0 && knn_k >= 0, "counts must be non-negative");
    train_q_.assign(train_q, train_q + hq_ * m * d_);
    n_train_ = m;
    append_rows(keys, values, t);
    if (t > 0) make_indexes(knn, knn_k);
  }

  void append(const T* keys, const T* values, int64_t t) {
    require(all_finite(keys, hkv_ * t * d_), "keys contain NaN or Inf");
    std::unique_lock<std::shared_mutex> lock(mu_);
    require(t >= 0, "token count must be non-negative");
    if (t == 0) return;
    append_rows(keys, values, t);
    if (!indexed()) {
      make_indexes();
    } else if (keys_[0]->size() - indexes_[0]->size() > max_unindexed_) {
      parallel_for(hq_, [&](int64_t h) { indexes_[static_cast<size_t>(h)]->index_new_rows(); });
    }
  }

  // Rows [0, min_ids[kv]) of kv head kv are never retrieved (left padding of that batch row). Indexes that cannot
  // skip them during search still never return them: such ids are dropped from the results.
  void set_min_ids(const int64_t* min_ids, int64_t count) {
    std::unique_lock<std::shared_mutex> lock(mu_);
    require(count == hkv_, "min_ids needs one entry per kv head");
    for (int64_t i = 0; i < count; ++i) require(min_ids[i] >= 0, "min_ids must be non-negative");
    min_ids_.assign(min_ids, min_ids + count);
  }

  // q (Hq, m, d) -> out (Hq, m, dv), lse (Hq, m); visited (Hq, m) and ids_out (Hq, m, top_k) may be null.
  void retrieve_attend(const float* q, int64_t m, int64_t top_k, const SearchParams& params, float scale, float* out, float* lse,
                       int64_t* visited, int64_t* ids_out) const {
    std::shared_lock<std::shared_mutex> lock(mu_);
    require(top_k > 0, "top_k must be positive");
    require(all_finite(q, hq_ * m * d_), "queries contain NaN or Inf");
    const int64_t n = keys_[0]->size(), k = std::min(top_k, n), group = hq_ / hkv_;
    parallel_for(hq_ * m, [&](int64_t hm) {
      const int64_t h = hm / m, kv = h / group;
      thread_local std::vector<int64_t> ids;
      thread_local std::vector<float> scores, sc;
      thread_local std::vector<int64_t> rows;
      if (k == 0) {
        std::fill(out + hm * dv_, out + (hm + 1) * dv_, 0.f);
        lse[hm] = kNegInf;
        if (visited) visited[hm] = 0;
      } else {
        ids.assign(static_cast<size_t>(k), -1);
        scores.assign(static_cast<size_t>(k), kNegInf);
        SearchParams p = params;
        p.min_id = min_ids_.empty() ? 0 : min_ids_[static_cast<size_t>(kv)];
        p.ef = std::min(p.ef, n);  // a beam wider than the store changes nothing
        const KeyIndex<T>& index = *indexes_[static_cast<size_t>(h)];
        int64_t vis = index.search_one(q + hm * d_, k, p, ids.data(), scores.data());
        if (index.size() < n) {  // rows not indexed yet: scan them exactly and merge
          TopK best(k);
          for (int64_t j = 0; j < k; ++j)
            if (ids[static_cast<size_t>(j)] >= 0) best.push(scores[static_cast<size_t>(j)], ids[static_cast<size_t>(j)]);
          for (int64_t i = std::max(index.size(), p.min_id); i < n; ++i) {
            const float s = dot_row(q + hm * d_, keys_[kv]->row(i), d_);
            if (!best.full() || s >= best.threshold()) best.push(s, i);
          }
          best.sorted_into(ids.data(), scores.data());
          vis += n - index.size();
        }
        for (auto& id : ids)
          if (id >= 0 && id < p.min_id) id = -1;
        if (visited) visited[hm] = vis;
        lse[hm] = attend_selected(q + hm * d_, d_, keys_[kv]->data(), values_[kv]->data(), dv_, n, ids.data(), k, scale, out + hm * dv_, sc, rows);
      }
      if (ids_out) {
        for (int64_t j = 0; j < top_k; ++j) ids_out[hm * top_k + j] = j < k ? ids[static_cast<size_t>(j)] : -1;
      }
    });
  }

  int64_t vector_bytes() const {
    std::shared_lock<std::shared_mutex> lock(mu_);
    int64_t b = 0;
    for (int64_t h = 0; h < hkv_; ++h) b += keys_[h]->bytes() + values_[h]->bytes();
    return b;
  }
  int64_t index_bytes() const {
    std::shared_lock<std::shared_mutex> lock(mu_);
    int64_t b = 0;
    for (const auto& idx : indexes_)
      if (idx) b += idx->structure_bytes();
    return b;
  }
  const KeyIndex<T>* index(int64_t h) const { return indexes_.at(static_cast<size_t>(h)).get(); }
  std::shared_ptr<const VectorStore<T>> key_store(int64_t kv) const { return keys_.at(static_cast<size_t>(kv)); }

 private:
  void append_rows(const T* keys, const T* values, int64_t t) {
    for (int64_t h = 0; h < hkv_; ++h) {
      keys_[h]->append(keys + h * t * d_, t);
      values_[h]->append(values + h * t * dv_, t);
    }
  }
  void make_indexes(const int64_t* knn = nullptr, int64_t knn_k = 0) {
    const int64_t group = hq_ / hkv_;
    parallel_for(hq_, [&](int64_t h) {
      indexes_[static_cast<size_t>(h)] =
          factory_(keys_[h / group], train_q_.data() + h * n_train_ * d_, n_train_, knn ? knn + h * n_train_ * knn_k : nullptr, knn_k);
    });
    std::vector<float>().swap(train_q_);  // the graphs keep no query vectors
    n_train_ = 0;
  }

  int64_t hq_, hkv_, d_, dv_, max_unindexed_;
  IndexFactory factory_;
  std::vector<std::shared_ptr<VectorStore<T>>> keys_, values_;
  std::vector<std::unique_ptr<KeyIndex<T>>> indexes_;
  std::vector<float> train_q_;
  int64_t n_train_ = 0;
  std::vector<int64_t> min_ids_;
  mutable std::shared_mutex mu_;
};

}  // namespace retrieval_attention
