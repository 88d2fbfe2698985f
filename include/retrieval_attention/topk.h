// retrieval_attention/topk.h -- bounded top-k selection and the exact blocked inner-product kNN.
//
// Contract
//   * TopK keeps the k largest (score, id) pairs seen; ties broken by smaller id so results are
//     deterministic. sorted_into() writes them best-first and pads with (-1, -inf) when fewer than k.
//   * exact_topk(): queries (m x d float32, row-major) against rows [0, n) of a store; writes ids/scores
//     (m x k). Scores are raw inner products q.k. Keys are scored in blocks: each block is widened to
//     float32 once and multiplied with a block of queries by Eigen's GEMM, so the cost is one pass over the
//     keys per query block. Parallel over query blocks with OpenMP; safe to call concurrently as long as
//     nothing appends to the store.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "scalar.h"
#include "vector_store.h"

namespace retrieval_attention {

class TopK {
 public:
  explicit TopK(int64_t k) : k_(k) { heap_.reserve(static_cast<size_t>(k)); }

  float threshold() const {
    return static_cast<int64_t>(heap_.size()) < k_ ? -std::numeric_limits<float>::infinity() : heap_.front().first;
  }
  bool full() const { return static_cast<int64_t>(heap_.size()) >= k_; }

  void push(float score, int64_t id) {
    if (k_ <= 0) return;
    if (static_cast<int64_t>(heap_.size()) < k_) {
      heap_.emplace_back(score, id);
      std::push_heap(heap_.begin(), heap_.end(), worse_first);
    } else if (better(score, id, heap_.front().first, heap_.front().second)) {
      std::pop_heap(heap_.begin(), heap_.end(), worse_first);
      heap_.back() = {score, id};
      std::push_heap(heap_.begin(), heap_.end(), worse_first);
    }
  }

  void sorted_into(int64_t* ids, float* scores) {
    std::sort(heap_.begin(), heap_.end(), [](const Entry& a, const Entry& b) { return better(a.first, a.second, b.first, b.second); });
    for (int64_t i = 0; i < k_; ++i) {
      const bool have = i < static_cast<int64_t>(heap_.size());
      ids[i] = have ? heap_[i].second : -1;
      if (scores) scores[i] = have ? heap_[i].first : -std::numeric_limits<float>::infinity();
    }
  }
  void clear() { heap_.clear(); }

 private:
  using Entry = std::pair<float, int64_t>;
  static bool better(float sa, int64_t ia, float sb, int64_t ib) { return sa > sb || (sa == sb && ia < ib); }
  // heap ordered so that the worst kept entry sits at front()
  static bool worse_first(const Entry& a, const Entry& b) { return better(a.first, a.second, b.first, b.second); }
  int64_t k_;
  std::vector<Entry> heap_;
};

template <class T>
void exact_topk(const float* queries, int64_t m, const VectorStore<T>& keys, int64_t n, int64_t k, int64_t* ids, float* scores) {
  const int64_t d = keys.dim();
  require(n >= 0 && n <= keys.size(), "exact_topk: n exceeds the number of stored keys");
  require(k > 0, "exact_topk: k must be positive");
  using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  constexpr int64_t kQueryBlock = 64, kKeyBlock = 1024;
  const int64_t n_qblocks = (m + kQueryBlock - 1) / kQueryBlock;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t qb = 0; qb < n_qblocks; ++qb) {
    const int64_t q0 = qb * kQueryBlock, mq = std::min(kQueryBlock, m - q0);
    Eigen::Map<const RowMat> Q(queries + q0 * d, mq, d);
    std::vector<TopK> best(static_cast<size_t>(mq), TopK(k));
    RowMat Kf(kKeyBlock, d), S(mq, kKeyBlock);
    for (int64_t k0 = 0; k0 < n; k0 += kKeyBlock) {
      const int64_t nk = std::min(kKeyBlock, n - k0);
      for (int64_t r = 0; r < nk; ++r) {
        const T* src = keys.row(k0 + r);
        for (int64_t c = 0; c < d; ++c) Kf(r, c) = to_float(src[c]);
      }
      S.leftCols(nk).noalias() = Q * Kf.topRows(nk).transpose();
      for (int64_t i = 0; i < mq; ++i) {
        TopK& t = best[static_cast<size_t>(i)];
        for (int64_t j = 0; j < nk; ++j) {
          const float s = S(i, j);
          if (!t.full() || s >= t.threshold()) t.push(s, k0 + j);
        }
      }
    }
    for (int64_t i = 0; i < mq; ++i) best[static_cast<size_t>(i)].sorted_into(ids + (q0 + i) * k, scores ? scores + (q0 + i) * k : nullptr);
  }
}

}  // namespace retrieval_attention
