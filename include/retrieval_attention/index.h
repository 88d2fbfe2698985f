// retrieval_attention/index.h -- the one interface every key index implements.
//
// Contract
//   * An index answers maximum-inner-product search over the rows of a shared key store
//     (std::shared_ptr<const VectorStore<T>>); it never copies the key vectors.
//   * search_one(): one float32 query of dim() values -> the best k rows (ids best-first, raw scores q.k).
//     If fewer than k rows are found the tail is (-1, -inf). Returns the number of keys whose score was
//     computed ("visited"), the cost measure reported by last_search_stats.
//     search_one is const and may run concurrently from many threads.
//   * exact(): true for an index whose search_one scores every row (FlatIndex); an owner holding many queries per
//     key store may then scan the rows once for all of them instead.
//   * index_new_rows(): the store has grown; make rows [size(), store.size()) searchable. Needs exclusive
//     access (no concurrent search_one); owners guard this with a shared_mutex.
//   * write_payload()/the type's static load(): persistence inside the common file format (serialize.h).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "serialize.h"
#include "vector_store.h"

namespace retrieval_attention {

struct SearchParams {
  int64_t ef = 128;     // beam width of graph search; ignored by exact indexes
  int64_t min_id = 0;   // rows below this id are excluded from results (e.g. left padding); exact indexes skip them
  // Rows a graph search also starts from (e.g. the previous decode step's best ids of the same head), n_seeds of
  // them; ids outside [0, size()) are skipped. Not owned; ignored by exact indexes.
  const int64_t* seeds = nullptr;
  int64_t n_seeds = 0;
};

template <class T>
class KeyIndex {
 public:
  virtual ~KeyIndex() = default;
  virtual int64_t size() const = 0;
  virtual int64_t dim() const = 0;
  virtual int64_t search_one(const float* query, int64_t k, const SearchParams& params, int64_t* ids, float* scores) const = 0;
  virtual void index_new_rows() = 0;
  // True when search_one scores every row (the exact index): owners may scan the rows themselves instead.
  virtual bool exact() const { return false; }
  virtual std::string type_name() const = 0;
  // Bytes of index structure (graph edges etc.), not counting the shared key store.
  virtual int64_t structure_bytes() const = 0;
  virtual void write_payload(PayloadWriter& w) const = 0;
};

}  // namespace retrieval_attention
