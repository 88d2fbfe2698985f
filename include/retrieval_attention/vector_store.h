// retrieval_attention/vector_store.h -- where key and value vectors live on the CPU.
//
// Contract
//   * VectorStore<T> owns `size() x dim()` vectors of scalar T (float, Half, BFloat16), row-major and
//     contiguous: row i starts at data() + i * dim(). Rows are only ever appended, never changed or removed,
//     so a row id is stable for the lifetime of the store.
//   * append() may reallocate: pointers from data()/row() are invalidated by it. Readers and the appender
//     must not overlap; the owners (FlatIndex handle, OffloadedLayer) serialise them with a shared_mutex.
//   * Indexes hold a std::shared_ptr<const VectorStore<T>>, so the query heads of one GQA group share
//     one copy of the group's keys.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "huge_page_allocator.h"
#include "scalar.h"

namespace retrieval_attention {

template <class T>
class VectorStore {
 public:
  explicit VectorStore(int64_t dim) : dim_(dim) { require(dim > 0, "vector dimension must be positive"); }

  int64_t size() const { return static_cast<int64_t>(data_.size()) / dim_; }
  int64_t dim() const { return dim_; }
  const T* data() const { return data_.data(); }
  const T* row(int64_t i) const { return data_.data() + i * dim_; }
  int64_t bytes() const { return static_cast<int64_t>(data_.size() * sizeof(T)); }

  // Append `count` rows read from `rows` (count x dim, row-major, contiguous).
  void append(const T* rows, int64_t count) {
    require(count >= 0, "row count must be non-negative");
    if (count == 0) return;
    const size_t need = data_.size() + static_cast<size_t>(count * dim_);
    if (need > data_.capacity()) data_.reserve(std::max(need, data_.capacity() + data_.capacity() / 2));
    data_.insert(data_.end(), rows, rows + count * dim_);
  }

  void reserve_rows(int64_t rows) { data_.reserve(static_cast<size_t>(rows * dim_)); }

 private:
  int64_t dim_;
  HugePageVector<T> data_;  // random row reads during search: huge pages keep them within the TLB's reach
};

}  // namespace retrieval_attention
