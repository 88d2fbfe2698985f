// retrieval_attention/indexed_keys.h -- a standalone searchable key set: key store + one index.
//
// Contract
//   * IndexedKeys<T> owns its VectorStore<T> (n x d) and one KeyIndex<T> over it. It is what the Python
//     classes ra.FlatIndex / ra.QueryGuidedIndex wrap.
//   * search(): m float32 queries (m x d) -> ids (m x k int64), scores (m x k float32), visited (m int64);
//     parallel over queries with OpenMP. k must be in [1, size()].
//   * add(): appends rows (count x d of T) and indexes them.
//   * Threads: search() takes a shared lock and add() an exclusive one, so adding while other threads search
//     is safe: each search sees the set either before or after the add, never half of it.
//   * save()/load_indexed_keys(): one file in the serialize.h format: payload = n, d, the key rows, then the
//     index's own payload. The index type is dispatched by name through the IndexLoader given to load.
#pragma once

#include <algorithm>
#include <functional>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>

#include "index.h"
#include "parallel.h"

namespace retrieval_attention {

template <class T>
class IndexedKeys {
 public:
  using Scalar = T;
  using IndexBuilder = std::function<std::unique_ptr<KeyIndex<T>>(std::shared_ptr<const VectorStore<T>>)>;
  using IndexLoader = std::function<std::unique_ptr<KeyIndex<T>>(const std::string& type, std::shared_ptr<const VectorStore<T>>, PayloadReader&)>;

  IndexedKeys(const T* keys, int64_t n, int64_t d, const IndexBuilder& build) : store_(std::make_shared<VectorStore<T>>(d)) {
    require(n > 0, "keys must not be empty");
    require(all_finite(keys, n * d), "keys contain NaN or Inf");
    store_->append(keys, n);
    index_ = build(store_);
  }

  int64_t size() const {
    std::shared_lock<std::shared_mutex> lock(mu_);
    return index_->size();
  }
  int64_t dim() const { return store_->dim(); }
  std::string type_name() const { return index_->type_name(); }
  int64_t vector_bytes() const {
    std::shared_lock<std::shared_mutex> lock(mu_);
    return store_->bytes();
  }
  int64_t structure_bytes() const {
    std::shared_lock<std::shared_mutex> lock(mu_);
    return index_->structure_bytes();
  }
  const KeyIndex<T>& index() const { return *index_; }

  // seeds: null, or m x n_seeds row ids each query's search also starts from (SearchParams::seeds).
  void search(const float* queries, int64_t m, int64_t k, const SearchParams& params, int64_t* ids, float* scores, int64_t* visited,
              const int64_t* seeds = nullptr, int64_t n_seeds = 0) const {
    std::shared_lock<std::shared_mutex> lock(mu_);
    const int64_t n = index_->size(), d = store_->dim();
    require(k >= 1 && k <= n, "k must be in [1, " + std::to_string(n) + "] (the number of indexed keys), got " + std::to_string(k));
    require(params.ef >= 1, "ef must be positive");
    require(all_finite(queries, m * d), "queries contain NaN or Inf");
    SearchParams p = params;
    p.ef = std::min(p.ef, n);  // a beam wider than the index changes nothing
    parallel_for(m, [&](int64_t i) {
      SearchParams pi = p;
      if (seeds != nullptr) pi.seeds = seeds + i * n_seeds, pi.n_seeds = n_seeds;
      visited[i] = index_->search_one(queries + i * d, k, pi, ids + i * k, scores + i * k);
    });
  }

  void add(const T* rows, int64_t count) {
    require(all_finite(rows, count * store_->dim()), "new keys contain NaN or Inf");
    std::unique_lock<std::shared_mutex> lock(mu_);
    store_->append(rows, count);
    index_->index_new_rows();
  }

  void save(const std::string& path) const {
    std::shared_lock<std::shared_mutex> lock(mu_);
    PayloadWriter w;
    w.put<int64_t>(store_->size());
    w.put<int64_t>(store_->dim());
    w.put_bytes(store_->data(), static_cast<size_t>(store_->bytes()));
    index_->write_payload(w);
    save_index_file(path, index_->type_name(), ScalarTraits<T>::kind, w.bytes());
  }

  static std::unique_ptr<IndexedKeys> load(const IndexFile& file, const std::string& source, const IndexLoader& loader) {
    PayloadReader r(file.payload.data(), file.payload.size(), source);
    const int64_t n = r.get<int64_t>(), d = r.get<int64_t>();
    // compare by division so a huge n cannot overflow n * d
    if (n <= 0 || d <= 0 || d > (1 << 20) || static_cast<uint64_t>(n) > file.payload.size() / (static_cast<uint64_t>(d) * sizeof(T)))
      r.fail("implausible key count or dimension");
    std::vector<T> rows(static_cast<size_t>(n * d));
    r.get_bytes(rows.data(), rows.size() * sizeof(T));
    if (!all_finite(rows.data(), static_cast<int64_t>(rows.size()))) r.fail("non-finite key values");
    std::unique_ptr<IndexedKeys> out(new IndexedKeys(d));
    out->store_->append(rows.data(), n);
    out->index_ = loader(file.type_name, out->store_, r);
    if (!r.at_end()) r.fail("trailing bytes after the index payload");
    return out;
  }

 private:
  explicit IndexedKeys(int64_t d) : store_(std::make_shared<VectorStore<T>>(d)) {}
  std::shared_ptr<VectorStore<T>> store_;
  std::unique_ptr<KeyIndex<T>> index_;
  mutable std::shared_mutex mu_;
};

}  // namespace retrieval_attention
