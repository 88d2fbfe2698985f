// retrieval_attention/index.h -- the one interface every key index implements.
//
// Contract
//   * An index answers maximum-inner-product search over the rows of a shared key store
//     (std::shared_ptr<const VectorStore<T>>); it never copies the key vectors.
//   * search_one(): one float32 query of dim() values -> the best k rows (ids best-first, raw scores q.k).
//     If fewer than k rows are found the tail is (-1, -inf). Returns the number of keys whose score was
//     computed ("visited"), the cost measure reported by last_search_stats.
//     search_one is const and may run concurrently from many threads.
//   * begin_search(): the same search as a cursor (SearchCursor below) that an owner holding several queries per
//     thread steps together with others (run_interleaved), so that their memory stalls overlap. Its result equals
//     search_one's bit for bit. The default cursor runs search_one in result().
//   * exact(): true for an index whose search_one scores every row (FlatIndex); an owner holding many queries per
//     key store may then scan the rows once for all of them instead.
//   * index_new_rows(): the store has grown; make rows [size(), store.size()) searchable. Needs exclusive
//     access (no concurrent search_one); owners guard this with a shared_mutex.
//   * write_payload()/the type's static load(): persistence inside the common file format (serialize.h).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>

#include "serialize.h"
#include "vector_store.h"

namespace retrieval_attention {

struct SearchParams {
  int64_t ef = 128;     // beam width of graph search; ignored by exact indexes
  int64_t min_id = 0;   // rows below this id are excluded from results (e.g. left padding); exact indexes skip them
};

// A search in progress. step_begin() starts the next unit of work (a graph search: picks the node to expand and starts
// loading its neighbours' rows) and returns false once there is none; step_end() completes that unit. result() takes
// any steps left, writes what search_one would have and returns the number of keys scored. A cursor reads the query and the index until it
// is destroyed (the index must not change meanwhile), and is used and destroyed on the thread that began it.
class SearchCursor {
 public:
  virtual ~SearchCursor() = default;
  virtual bool step_begin() = 0;
  virtual void step_end() = 0;
  virtual int64_t result(int64_t* ids, float* scores) = 0;
};

// Steps every cursor until all are done: one step begun on each before any is completed, so that while one search
// waits for its rows the others have work (graph searches spend most of their time waiting on memory). Null entries
// are skipped.
inline void run_interleaved(SearchCursor* const* cursors, int64_t count) {
  SearchCursor* live[16];
  int64_t at = 0;
  while (at < count) {  // in groups of at most 16
    int64_t n = 0;
    for (; at < count && n < 16; ++at)
      if (cursors[at]) live[n++] = cursors[at];
    while (n > 0) {
      int64_t w = 0;
      for (int64_t i = 0; i < n; ++i)
        if (live[i]->step_begin()) live[w++] = live[i];
      n = w;
      for (int64_t i = 0; i < n; ++i) live[i]->step_end();
    }
  }
}

// Searches that one thread interleaves: up to RA_SEARCH_INTERLEAVE (environment, read once; 1..kMaxInterleaved,
// default 4; 1 = one search at a time), and fewer when `items` searches would otherwise leave some of `threads` idle.
constexpr int64_t kMaxInterleaved = 8;
inline int64_t searches_per_task(int64_t items, int64_t threads) {
  static const int64_t limit = [] {
    const char* v = std::getenv("RA_SEARCH_INTERLEAVE");
    const long x = v ? std::strtol(v, nullptr, 10) : 4;
    return static_cast<int64_t>(std::min<long>(std::max<long>(x, 1), kMaxInterleaved));
  }();
  return std::max<int64_t>(1, std::min<int64_t>(limit, items / std::max<int64_t>(1, threads)));
}

template <class T>
class KeyIndex {
 public:
  virtual ~KeyIndex() = default;
  virtual int64_t size() const = 0;
  virtual int64_t dim() const = 0;
  virtual int64_t search_one(const float* query, int64_t k, const SearchParams& params, int64_t* ids, float* scores) const = 0;
  virtual std::unique_ptr<SearchCursor> begin_search(const float* query, int64_t k, const SearchParams& params) const {
    return std::make_unique<DeferredSearch>(*this, query, k, params);
  }
  virtual void index_new_rows() = 0;
  // True when search_one scores every row (the exact index): owners may scan the rows themselves instead.
  virtual bool exact() const { return false; }
  virtual std::string type_name() const = 0;
  // Bytes of index structure (graph edges etc.), not counting the shared key store.
  virtual int64_t structure_bytes() const = 0;
  virtual void write_payload(PayloadWriter& w) const = 0;

 private:
  // The default cursor: no steps; result() is search_one.
  class DeferredSearch final : public SearchCursor {
   public:
    DeferredSearch(const KeyIndex& index, const float* query, int64_t k, const SearchParams& params)
        : index_(index), query_(query), k_(k), params_(params) {}
    bool step_begin() override { return false; }
    void step_end() override {}
    int64_t result(int64_t* ids, float* scores) override { return index_.search_one(query_, k_, params_, ids, scores); }

   private:
    const KeyIndex& index_;
    const float* query_;
    int64_t k_;
    SearchParams params_;
  };
};

}  // namespace retrieval_attention
