// retrieval_attention/flat_index.h -- the exact index: every key is scored.
//
// Contract
//   * FlatIndex<T> scores all rows [0, size()) of its shared key store with float32 accumulation (simd::dot) and
//     returns the exact top-k by inner product (ties: smaller id first). visited == size().
//   * It is the reference every approximate index is tested against, and the "flat" baseline.
//   * Thread safety as in index.h: search_one is const/concurrent; index_new_rows is exclusive.
//   * Payload: just the number of indexed rows; the key store is saved by the owner next to it.
#pragma once

#include <memory>

#include "index.h"
#include "simd_dot.h"
#include "topk.h"

namespace retrieval_attention {

template <class T>
class FlatIndex final : public KeyIndex<T> {
 public:
  explicit FlatIndex(std::shared_ptr<const VectorStore<T>> keys) : keys_(std::move(keys)), n_(keys_->size()) {}

  int64_t size() const override { return n_; }
  int64_t dim() const override { return keys_->dim(); }
  std::string type_name() const override { return "flat"; }
  bool exact() const override { return true; }
  int64_t structure_bytes() const override { return 0; }
  void index_new_rows() override { n_ = keys_->size(); }
  void write_payload(PayloadWriter& w) const override { w.put<int64_t>(n_); }

  static std::unique_ptr<FlatIndex> load(std::shared_ptr<const VectorStore<T>> keys, PayloadReader& r) {
    auto idx = std::make_unique<FlatIndex>(keys);
    const int64_t n = r.get<int64_t>();
    if (n != keys->size()) r.fail("flat index row count does not match the stored keys");
    return idx;
  }

  int64_t search_one(const float* q, int64_t k, const SearchParams& params, int64_t* ids, float* scores) const override {
    require(k > 0, "k must be positive");
    const int64_t d = keys_->dim(), first = std::max<int64_t>(0, params.min_id);
    TopK best(k);
    for (int64_t i = first; i < n_; ++i) {
      const float s = simd::dot(q, keys_->row(i), d);
      if (!best.full() || s >= best.threshold()) best.push(s, i);
    }
    best.sorted_into(ids, scores);
    return std::max<int64_t>(0, n_ - first);
  }

 private:
  std::shared_ptr<const VectorStore<T>> keys_;
  int64_t n_;
};

}  // namespace retrieval_attention
