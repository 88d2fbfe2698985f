// retrieval_attention/offloaded_layer.h -- the CPU half of one attention layer during decoding.
//
// Contract
//   * Holds, for each of Hkv key/value heads, a key store (n x d) and a value store (n x dv) of scalar T; the GQA
//     group of query head h is kv head h / (Hq / Hkv). The group's vectors are stored once and shared by its indexes.
//     Row i of every head is the same token: the i-th token moved to the CPU (ids are CPU-local).
//   * Index sharing (constructor):
//       IndexSharing::PerQueryHead (default, the paper's): one KeyIndex per query head, trained on that head's queries.
//       IndexSharing::PerKvHead: one KeyIndex per kv head, trained on the pooled queries of all Hq / Hkv query heads
//       of its group (group * n_train training queries); every query head of the group searches that one index, and
//       appended rows are inserted once per kv head instead of once per query head.
//     Callers that fold a batch into the heads (Hq = batch * q_heads, Hkv = batch * kv_heads) get one index per
//     (batch row, head) either way: a group never spans two batch rows.
//   * build(): first tokens plus the training queries (the layer's prefill queries) -> the indexes, made by the
//     IndexFactory. With no tokens yet, the training queries are kept and the indexes are made when the first tokens
//     arrive through append(). build(..., index_now = false) stores the rows only: they are searchable at once (every
//     row scanned exactly) and build_indexes() makes the indexes later under the shared lock, so decoding need not
//     wait for it; append() and save() wait (save refuses a layer whose build has not run). Optional key lists
//     (each row's nearest rows of its kv head, Hkv x t x k, e.g. from a GPU) go to the factory for the graphs' weak-key
//     links; they cover the t rows build() got, so if rows were appended before a pending build runs, none are used.
//   * append(): tokens evicted from the GPU window; stored at once. They join the indexes in batches: while at most
//     `max_unindexed` rows are not yet indexed, searches scan those rows exactly and merge them with the index's
//     results (exact for them), so inserting into the graphs costs nothing per decode step.
//   * retrieve_attend(): for each (query head, query) finds the top-k keys with its index and attends
//     them exactly (attention.h); k is clamped to the number of CPU tokens, so top_k >= n is exact. Rows scored
//     exactly (all of them with the flat index or before a pending build, else those not yet inserted) are read once
//     per kv head for all queries of its GQA group, in a loop of their own over the threads; up to kItemScanRows of
//     them (a decode step's newest rows) are scanned by each search item for its query instead. Given a
//     RetrievePhaseTimes, it adds the thread time its items spent finding keys (search, exact scan, merge) and
//     attending them (for a benchmark's breakdown of the fused call).
//     Items start in the order of their head's cost at the previous call (keys scored, largest first), so that the
//     slowest searches do not start last and keep the team waiting (32 searches on 16 threads; heads' costs differ
//     up to 3.5x on the bundled model's vectors).
//   * Warm start (set_warm_start(true), off by default): each query head's graph search also starts from the keys it
//     retrieved for its newest query at the previous call (consecutive decode queries share most of their top-k), so a
//     search depends on that head's previous call; clear_warm_start() forgets them. Not saved.
//   * save()/load_state(): one file in the serialize.h format (type name "offloaded_layer"): payload = shape, sharing,
//     row counts, min_ids, pending training queries, every kv head's key and value rows, then each index's own
//     payload (length-prefixed). Loading checks the stored shape and sharing against this (empty) layer's and every
//     count against the payload; problems are std::runtime_error naming the file. A loaded layer searches, appends
//     and saves exactly like the one that was saved (rows that were not yet indexed stay in the exact-scan tail).
//   * Layouts: keys (Hkv, t, d), values (Hkv, t, dv), queries (Hq, m, d) float32; all row-major contiguous.
//   * Threads: retrieve_attend and save may run concurrently with themselves and each other (shared lock);
//     build/append/set_min_ids/load_state take the lock exclusively, so a search never sees a half-inserted token.
//     Work inside each call is parallel over heads: retrieve_attend on BlockingPool (parallel.h: threads that block
//     when idle, on the decode path), the rest through OpenMP; the caller should not hold the Python GIL.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <numeric>
#include <shared_mutex>
#include <string>
#include <vector>

#include "attention.h"
#include "index.h"
#include "parallel.h"
#include "projection_prune.h"
#include "serialize.h"
#include "simd_dot.h"
#include "topk.h"

namespace retrieval_attention {

enum class IndexSharing : uint32_t { PerQueryHead = 0, PerKvHead = 1 };

// Thread time of retrieve_attend's (head, query) items, summed over the threads, in nanoseconds.
struct RetrievePhaseTimes {
  std::atomic<int64_t> search_ns{0};  // finding the top-k: index search, the exact scan's share, the merge
  std::atomic<int64_t> attend_ns{0};  // attending the selected keys and values
};

template <class T>
class OffloadedLayer {
 public:
  using Scalar = T;
  // (shared keys of the group, training queries (n_train x d float32), n_train, optional precomputed exact
  // neighbours of the training queries (n_train x knn_k int64, or null), knn_k, optional nearest other keys of each
  // key (n x key_knn_k int64, or null), key_knn_k, optional projection lists of a query-guided graph (n x projection_k
  // int32, or null), projection_k) -> index over the keys
  using IndexFactory = std::function<std::unique_ptr<KeyIndex<T>>(std::shared_ptr<const VectorStore<T>>, const float*, int64_t, const int64_t*,
                                                                  int64_t, const int64_t*, int64_t, const int32_t*, int64_t)>;
  // (index type name, keys, payload reader positioned at that index's payload) -> the index (see index_registry.h)
  using IndexLoader = std::function<std::unique_ptr<KeyIndex<T>>(const std::string&, std::shared_ptr<const VectorStore<T>>, PayloadReader&)>;

  static constexpr const char* kFileType = "offloaded_layer";
  static constexpr uint32_t kPayloadVersion = 1;

  OffloadedLayer(int64_t hq, int64_t hkv, int64_t d, int64_t dv, IndexFactory factory, int64_t max_unindexed = 0,
                 IndexSharing sharing = IndexSharing::PerQueryHead)
      : hq_(hq), hkv_(hkv), d_(d), dv_(dv), max_unindexed_(max_unindexed), sharing_(sharing), factory_(std::move(factory)),
        head_cost_(static_cast<size_t>(std::max<int64_t>(hq, 0))), head_seeds_(static_cast<size_t>(std::max<int64_t>(hq, 0))) {
    check_gqa(hq, hkv);
    require(max_unindexed >= 0, "max_unindexed must be non-negative");
    require(d > 0 && dv > 0, "head dimensions must be positive");
    require(sharing == IndexSharing::PerQueryHead || sharing == IndexSharing::PerKvHead, "unknown index sharing mode");
    for (int64_t h = 0; h < hkv; ++h) {
      keys_.push_back(std::make_shared<VectorStore<T>>(d));
      values_.push_back(std::make_shared<VectorStore<T>>(dv));
    }
    indexes_.resize(static_cast<size_t>(index_count()));
  }

  // Warm start of the graph searches from each head's previous results (see the contract); off by default.
  void set_warm_start(bool on) {
    warm_start_.store(on);
    if (!on) clear_warm_start();
  }
  bool warm_start() const { return warm_start_.load(); }
  void clear_warm_start() const {
    std::lock_guard<std::mutex> lock(seeds_mu_);
    for (auto& ids : head_seeds_) ids.clear();
  }

  int64_t q_heads() const { return hq_; }
  int64_t kv_heads() const { return hkv_; }
  IndexSharing sharing() const { return sharing_; }
  // Number of indexes: Hq per query head, Hkv per kv head.
  int64_t index_count() const { return sharing_ == IndexSharing::PerKvHead ? hkv_ : hq_; }
  int64_t size() const {
    std::shared_lock<std::shared_mutex> lock(mu_);
    return keys_[0]->size();
  }
  bool indexed() const { return indexes_[0] != nullptr; }

  // knn (Hq, m, knn_k) optional: exact neighbours (row ids of this layer's first t tokens) of each training query.
  // index_now = false stores the rows (searchable at once, by exact scans) and leaves the indexes to a later
  // build_indexes() call, during which searches keep running.
  // key_knn (optional, Hkv x t x key_knn_k): each key's nearest other keys of its kv head, for the graphs' weak-key links.
  // projection (optional, index_count() x t x projection_k int32, with knn): each graph's projection lists made from knn.
  void build(const T* keys, const T* values, int64_t t, const float* train_q, int64_t m, const int64_t* knn = nullptr, int64_t knn_k = 0,
             bool index_now = true, const int64_t* key_knn = nullptr, int64_t key_knn_k = 0, const int32_t* projection = nullptr,
             int64_t projection_k = 0) {
    // Every input is checked here, once per layer (on a GPU prefill this runs on the store thread), and the factory's
    // builds trust it (make_layer_factory): per graph, the same checks took a fifth of an 8B layer's build.
    require(rows_finite(keys, t) && all_finite(train_q, hq_ * m * d_), "keys or training queries contain NaN or Inf");
    require(m >= 0 && t >= 0 && knn_k >= 0, "counts must be non-negative");
    if (knn != nullptr) require(ids_in_range(knn, hq_ * m * knn_k, t), "knn ids must be in [-1, tokens)");
    if (key_knn != nullptr) require(ids_in_range(key_knn, hkv_ * t * key_knn_k, t), "key_knn ids must be in [-1, tokens)");
    if (projection != nullptr && projection_k > 0 && knn_k > 0)
      require(projection_rows_valid(projection, index_count() * t, projection_k, t),
              "projection id out of range [-1, tokens), a self-loop, or repeated within a row");
    {
      std::unique_lock<std::shared_mutex> lock(mu_);
      require(!indexed() && !build_pending_ && keys_[0]->size() == 0, "layer already built");
      train_q_.assign(train_q, train_q + hq_ * m * d_);
      n_train_ = m;
      if (knn != nullptr && knn_k > 0) parallel_assign(knn_, knn, hq_ * m * knn_k);
      knn_k_ = knn != nullptr ? knn_k : 0;
      if (key_knn != nullptr && key_knn_k > 0) parallel_assign(key_knn_, key_knn, hkv_ * t * key_knn_k);
      key_knn_k_ = key_knn != nullptr ? key_knn_k : 0;
      key_knn_rows_ = t;
      if (projection != nullptr && projection_k > 0 && knn_k > 0) parallel_assign(projection_, projection, index_count() * t * projection_k);
      projection_k_ = projection_.empty() ? 0 : projection_k;
      append_rows(keys, values, t);
      build_pending_ = t > 0;
    }
    if (index_now) build_indexes();
  }

  // Makes the indexes a build(..., index_now = false) left pending (no-op if none is). The indexes are built under
  // the shared lock, so retrieve_attend runs meanwhile (scanning the rows exactly); append() waits for it.
  void build_indexes() {
    std::vector<std::unique_ptr<KeyIndex<T>>> made;
    {
      std::shared_lock<std::shared_mutex> lock(mu_);
      if (!build_pending_) return;
      require(!building_.exchange(true), "build_indexes is already running");
      try {
        made = create_indexes(knn_.empty() ? nullptr : knn_.data(), knn_k_, key_knn_.empty() ? nullptr : key_knn_.data(), key_knn_k_,
                              projection_.empty() ? nullptr : projection_.data(), projection_k_);
      } catch (...) {
        building_ = false;
        throw;
      }
    }
    std::unique_lock<std::shared_mutex> lock(mu_);
    install_indexes(std::move(made));
    build_pending_ = false;
    building_ = false;
    insert_if_due();  // rows appended before the build started
  }
  bool build_pending() const {
    std::shared_lock<std::shared_mutex> lock(mu_);
    return build_pending_;
  }

  void append(const T* keys, const T* values, int64_t t) {
    require(rows_finite(keys, t), "keys contain NaN or Inf");
    std::unique_lock<std::shared_mutex> lock(mu_);
    require(t >= 0, "token count must be non-negative");
    if (t == 0) return;
    append_rows(keys, values, t);
    if (!indexed()) {
      if (!build_pending_) install_indexes(create_indexes());  // a layer whose first tokens arrive now
    } else {
      insert_if_due();
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
                       int64_t* visited, int64_t* ids_out, RetrievePhaseTimes* times = nullptr) const {
    using Clock = std::chrono::steady_clock;
    const auto ns_between = [](Clock::time_point a, Clock::time_point b) { return std::chrono::duration_cast<std::chrono::nanoseconds>(b - a).count(); };
    std::shared_lock<std::shared_mutex> lock(mu_);
    require(top_k > 0, "top_k must be positive");
    require(all_finite(q, hq_ * m * d_), "queries contain NaN or Inf");
    const int64_t n = keys_[0]->size(), k = std::min(top_k, n), group = hq_ / hkv_;
    // Rows a query head scores exactly: from its min_id on, all of them with an exact index (flat) or before its index
    // exists (a pending build), else those appended since the index's last insert.
    std::vector<int64_t> exact_from(static_cast<size_t>(hq_));
    for (int64_t h = 0; h < hq_; ++h) {
      const KeyIndex<T>* index = index_of(h);
      const int64_t min_id = min_ids_.empty() ? 0 : min_ids_[static_cast<size_t>(h / group)];
      exact_from[static_cast<size_t>(h)] = std::max(index == nullptr || index->exact() ? 0 : index->size(), min_id);
    }
    // A long exact part (a flat index, a pending build, many appended rows) is one scan over the threads that reads
    // each row once for its GQA group; a short one (the rows appended since the last insert, during decode) is scanned
    // by each item for its own query, which saves a loop over the threads (its wake-up and its end) per call.
    const int64_t lowest_exact = *std::min_element(exact_from.begin(), exact_from.end());
    const bool batched_scan = k > 0 && n - lowest_exact > kItemScanRows;
    const Clock::time_point scan_start = times ? Clock::now() : Clock::time_point{};
    const ExactScan scan = batched_scan ? scan_exactly(q, m, k, exact_from, lowest_exact) : ExactScan{};
    if (times && batched_scan) times->search_ns += ns_between(scan_start, Clock::now()) * max_threads();  // on all threads
    // Largest previous cost first (stable: equal costs keep head order). Dynamic scheduling then hands the cheap
    // searches to the threads that finish first.
    std::vector<int64_t> order(static_cast<size_t>(hq_ * m));
    std::iota(order.begin(), order.end(), int64_t{0});
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      return head_cost_[static_cast<size_t>(a / m)].load(std::memory_order_relaxed) >
             head_cost_[static_cast<size_t>(b / m)].load(std::memory_order_relaxed);
    });
    const bool warm = warm_start_.load();
    std::vector<std::vector<int64_t>> start_ids;  // warm start: each head's ids from the previous call, read by all its queries
    if (warm) {
      std::lock_guard<std::mutex> lock(seeds_mu_);
      start_ids = head_seeds_;
    }
    BlockingPool::shared().run(hq_ * m, [&](int64_t item) {
      const int64_t hm = order[static_cast<size_t>(item)];
      const int64_t h = hm / m, kv = h / group;
      thread_local std::vector<int64_t> ids;
      thread_local std::vector<float> scores, sc;
      thread_local std::vector<int64_t> rows;
      if (k == 0) {
        std::fill(out + hm * dv_, out + (hm + 1) * dv_, 0.f);
        lse[hm] = kNegInf;
        if (visited) visited[hm] = 0;
      } else {
        const Clock::time_point item_start = times ? Clock::now() : Clock::time_point{};
        ids.assign(static_cast<size_t>(k), -1);
        scores.assign(static_cast<size_t>(k), kNegInf);
        SearchParams p = params;
        p.min_id = min_ids_.empty() ? 0 : min_ids_[static_cast<size_t>(kv)];
        p.ef = std::min(p.ef, n);  // a beam wider than the store changes nothing
        const KeyIndex<T>* index = index_of(h);
        const bool graph = index && !index->exact();
        if (graph && warm) {
          const std::vector<int64_t>& seeds = start_ids[static_cast<size_t>(h)];
          p.seeds = seeds.data();
          p.n_seeds = static_cast<int64_t>(seeds.size());
        }
        int64_t vis = graph ? index->search_one(q + hm * d_, k, p, ids.data(), scores.data()) : 0;
        const int64_t from = exact_from[static_cast<size_t>(h)];
        if (from < n) {  // merge the exact scan's best rows (disjoint from the index's: rows >= its size)
          TopK best(k);
          for (int64_t j = 0; j < k; ++j)
            if (ids[static_cast<size_t>(j)] >= 0) best.push(scores[static_cast<size_t>(j)], ids[static_cast<size_t>(j)]);
          if (batched_scan) {
            scan.merge_into(best, kv, hm - kv * group * m, k);
          } else {
            const float* qh = q + hm * d_;
            for (int64_t i = from; i < n; ++i) {
              const float s = simd::dot(qh, keys_[kv]->row(i), d_);
              if (!best.full() || s >= best.threshold()) best.push(s, i);
            }
          }
          best.sorted_into(ids.data(), scores.data());
          vis += n - from;
        }
        for (auto& id : ids)
          if (id >= 0 && id < p.min_id) id = -1;
        if (visited) visited[hm] = vis;
        head_cost_[static_cast<size_t>(h)].store(vis, std::memory_order_relaxed);
        if (graph && warm && hm % m == m - 1) {  // the head's newest query: the next call's starting points
          std::lock_guard<std::mutex> lock(seeds_mu_);
          auto& next = head_seeds_[static_cast<size_t>(h)];
          next.clear();
          for (int64_t id : ids)
            if (id >= 0) next.push_back(id);
        }
        const Clock::time_point attend_start = times ? Clock::now() : Clock::time_point{};
        lse[hm] = attend_selected(q + hm * d_, d_, keys_[kv]->data(), values_[kv]->data(), dv_, n, ids.data(), k, scale, out + hm * dv_, sc, rows);
        if (times) {
          times->attend_ns += ns_between(attend_start, Clock::now());
          times->search_ns += ns_between(item_start, attend_start);
        }
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
  // The index query head h searches (shared by its group under PerKvHead); null before the first tokens arrive.
  const KeyIndex<T>* index(int64_t h) const {
    require(h >= 0 && h < hq_, "query head out of range");
    return index_of(h);
  }
  std::shared_ptr<const VectorStore<T>> key_store(int64_t kv) const { return keys_.at(static_cast<size_t>(kv)); }

  // Writes the whole layer (vectors, indexes, pending training queries, min_ids) to `path` atomically (serialize.h).
  void save(const std::string& path) const {
    std::shared_lock<std::shared_mutex> lock(mu_);
    require(!build_pending_, "save: the layer's indexes are not built yet (build_indexes)");
    const int64_t n = keys_[0]->size(), n_indexed = indexed() ? indexes_[0]->size() : 0;
    PayloadWriter w;
    w.put<uint32_t>(kPayloadVersion);
    for (int64_t v : {hq_, hkv_, d_, dv_}) w.put<int64_t>(v);
    w.put<uint32_t>(static_cast<uint32_t>(sharing_));
    w.put<int64_t>(n);
    w.put<uint8_t>(indexed() ? 1 : 0);
    w.put<int64_t>(n_indexed);
    w.put_vector(min_ids_);
    w.put<int64_t>(n_train_);
    w.put_vector(train_q_);
    for (int64_t h = 0; h < hkv_; ++h) {
      w.put_bytes(keys_[h]->data(), static_cast<size_t>(keys_[h]->bytes()));
      w.put_bytes(values_[h]->data(), static_cast<size_t>(values_[h]->bytes()));
    }
    if (indexed()) {
      for (const auto& idx : indexes_) {
        const std::string type = idx->type_name();
        w.put_vector(std::vector<char>(type.begin(), type.end()));
        PayloadWriter sub;
        idx->write_payload(sub);
        w.put_vector(sub.bytes());
      }
    }
    save_index_file(path, kFileType, ScalarTraits<T>::kind, w.bytes());
  }

  // Restores a file written by save() into this layer, which must be freshly constructed (no tokens, not built) with
  // the same Hq, Hkv, d, dv, scalar type and sharing as the saved one.
  void load_state(const IndexFile& file, const std::string& source, const IndexLoader& loader) {
    std::unique_lock<std::shared_mutex> lock(mu_);
    require(!indexed() && keys_[0]->size() == 0 && n_train_ == 0, "load_state needs an empty layer");
    PayloadReader r(file.payload.data(), file.payload.size(), source);
    if (file.type_name != kFileType) r.fail("not an offloaded layer file (type '" + file.type_name + "')");
    if (file.kind != ScalarTraits<T>::kind) r.fail("stored scalar type differs from this layer's CPU dtype");
    if (r.get<uint32_t>() != kPayloadVersion) r.fail("unsupported offloaded layer payload version");
    const int64_t hq = r.get<int64_t>(), hkv = r.get<int64_t>(), d = r.get<int64_t>(), dv = r.get<int64_t>();
    if (hq != hq_ || hkv != hkv_ || d != d_ || dv != dv_)
      r.fail("stored shape (q_heads " + std::to_string(hq) + ", kv_heads " + std::to_string(hkv) + ", head_dim " + std::to_string(d) +
             ", value_dim " + std::to_string(dv) + ") differs from this layer's (" + std::to_string(hq_) + ", " + std::to_string(hkv_) + ", " +
             std::to_string(d_) + ", " + std::to_string(dv_) + ")");
    if (r.get<uint32_t>() != static_cast<uint32_t>(sharing_)) r.fail("stored index sharing differs from this layer's");
    const int64_t n = r.get<int64_t>();
    const uint8_t has_indexes = r.get<uint8_t>();
    const int64_t n_indexed = r.get<int64_t>();
    const uint64_t row_bytes = static_cast<uint64_t>(hkv_) * static_cast<uint64_t>(d_ + dv_) * sizeof(T);
    if (n < 0 || static_cast<uint64_t>(n) > file.payload.size() / row_bytes) r.fail("implausible token count");
    if (has_indexes > 1 || n_indexed < 0 || n_indexed > n || (!has_indexes && n_indexed != 0)) r.fail("inconsistent indexed row count");
    std::vector<int64_t> min_ids = r.get_vector<int64_t>(hkv_);
    if (!min_ids.empty() && static_cast<int64_t>(min_ids.size()) != hkv_) r.fail("min_ids length differs from kv_heads");
    for (int64_t v : min_ids)
      if (v < 0) r.fail("negative min_id");
    const int64_t n_train = r.get<int64_t>();
    std::vector<float> train_q = r.get_vector<float>(static_cast<int64_t>(file.payload.size() / sizeof(float)));
    if (n_train < 0 || static_cast<int64_t>(train_q.size()) != hq_ * n_train * d_) r.fail("pending training queries have the wrong size");
    if (has_indexes && n_train != 0) r.fail("pending training queries next to built indexes");
    std::vector<T> k_rows(static_cast<size_t>(n * d_)), v_rows(static_cast<size_t>(n * dv_));
    std::vector<std::vector<T>> k_all, v_all;
    for (int64_t h = 0; h < hkv_; ++h) {
      r.get_bytes(k_rows.data(), k_rows.size() * sizeof(T));
      r.get_bytes(v_rows.data(), v_rows.size() * sizeof(T));
      if (!all_finite(k_rows.data(), n * d_)) r.fail("non-finite key values");
      k_all.push_back(k_rows);
      v_all.push_back(v_rows);
    }
    // The indexes were saved over the first n_indexed rows: load them against stores of exactly that size, then add
    // the rest (the exact-scan tail), so every loader's row-count check sees what the index saw.
    for (int64_t h = 0; h < hkv_; ++h) {
      keys_[h]->append(k_all[h].data(), n_indexed);
      values_[h]->append(v_all[h].data(), n_indexed);
    }
    std::vector<std::unique_ptr<KeyIndex<T>>> loaded;
    if (has_indexes) {
      const int64_t group_count = index_count(), per_store = index_count() / hkv_;
      for (int64_t i = 0; i < group_count; ++i) {
        const std::vector<char> type_chars = r.get_vector<char>(64);
        const std::vector<uint8_t> sub = r.get_vector<uint8_t>(static_cast<int64_t>(file.payload.size()));
        PayloadReader sr(sub.data(), sub.size(), source + " (index " + std::to_string(i) + ")");
        auto idx = loader(std::string(type_chars.begin(), type_chars.end()), keys_[static_cast<size_t>(i / per_store)], sr);
        if (!idx || idx->size() != n_indexed) r.fail("index " + std::to_string(i) + " row count differs from the stored one");
        loaded.push_back(std::move(idx));
      }
    }
    if (!r.at_end()) r.fail("trailing bytes after the offloaded layer payload");
    for (int64_t h = 0; h < hkv_; ++h) {
      keys_[h]->append(k_all[h].data() + n_indexed * d_, n - n_indexed);
      values_[h]->append(v_all[h].data() + n_indexed * dv_, n - n_indexed);
    }
    if (has_indexes)
      for (size_t i = 0; i < loaded.size(); ++i) indexes_[i] = std::move(loaded[i]);
    min_ids_ = std::move(min_ids);
    train_q_ = std::move(train_q);
    n_train_ = n_train;
  }

 private:
  // Per (kv head, row block, query of the group) the best k rows of that block, best first ((-1, -inf) padded).
  struct ExactScan {
    int64_t blocks = 0, queries = 0;  // blocks per kv head; queries per kv head (group * m)
    std::vector<int64_t> ids;
    std::vector<float> scores;
    // pushes query `local` (of kv head kv's group * m) candidates into best
    void merge_into(TopK& best, int64_t kv, int64_t local, int64_t k) const {
      for (int64_t b = 0; b < blocks; ++b) {
        const size_t at = static_cast<size_t>(((kv * blocks + b) * queries + local) * k);
        for (int64_t j = 0; j < k && ids[at + static_cast<size_t>(j)] >= 0; ++j) best.push(scores[at + static_cast<size_t>(j)], ids[at + static_cast<size_t>(j)]);
      }
    }
  };

  // The exact part of retrieve_attend: query head h scores rows [exact_from[h], n). Each kv head's rows are read once
  // for all group * m queries of its group (GQA: group times fewer bytes than a scan per query head), in row blocks
  // spread over the threads. Ties go to the smaller id in every block and in the merge, so the result is the exact
  // top-k of one scan.
  static constexpr int64_t kItemScanRows = 256;  // exact parts up to this many rows are scanned inside the search items
  // lowest: the smallest exact_from (the first row any head scans).
  ExactScan scan_exactly(const float* q, int64_t m, int64_t k, const std::vector<int64_t>& exact_from, int64_t lowest) const {
    const int64_t n = keys_[0]->size(), group = hq_ / hkv_;
    ExactScan scan;
    scan.queries = group * m;
    if (lowest >= n) return scan;
    constexpr int64_t kMinBlockRows = 1024;
    scan.blocks = std::clamp<int64_t>((2 * max_threads() + hkv_ - 1) / hkv_, 1, (n - lowest + kMinBlockRows - 1) / kMinBlockRows);
    scan.ids.assign(static_cast<size_t>(hkv_ * scan.blocks * scan.queries * k), -1);
    scan.scores.assign(scan.ids.size(), kNegInf);
    BlockingPool::shared().run(hkv_ * scan.blocks, [&](int64_t item) {
      const int64_t kv = item / scan.blocks, b = item % scan.blocks;
      int64_t from = n;
      for (int64_t g = 0; g < group; ++g) from = std::min(from, exact_from[static_cast<size_t>(kv * group + g)]);
      const int64_t per = (n - from + scan.blocks - 1) / scan.blocks;
      const int64_t r0 = from + b * per, r1 = std::min(n, r0 + per);
      thread_local std::vector<TopK> best;
      thread_local std::vector<float> s4;
      best.assign(static_cast<size_t>(scan.queries), TopK(k));
      s4.resize(static_cast<size_t>((scan.queries + 3) / 4 * 4));
      const float* qg = q + kv * group * m * d_;  // the group's queries: consecutive heads, m each
      const int64_t quads = scan.queries / 4;
      for (int64_t i = r0; i < r1; ++i) {
        const T* row = keys_[kv]->row(i);
        for (int64_t u = 0; u < quads; ++u) simd::dot4(qg + 4 * u * d_, row, d_, s4.data() + 4 * u);  // the row is read once per 4
        for (int64_t l = 4 * quads; l < scan.queries; ++l) s4[static_cast<size_t>(l)] = simd::dot(qg + l * d_, row, d_);
        for (int64_t l = 0; l < scan.queries; ++l) {
          if (i < exact_from[static_cast<size_t>(kv * group + l / m)]) continue;
          const float s = s4[static_cast<size_t>(l)];
          TopK& t = best[static_cast<size_t>(l)];
          if (!t.full() || s >= t.threshold()) t.push(s, i);
        }
      }
      for (int64_t l = 0; l < scan.queries; ++l) {
        const size_t at = static_cast<size_t>((item * scan.queries + l) * k);
        best[static_cast<size_t>(l)].sorted_into(scan.ids.data() + at, scan.scores.data() + at);
      }
    });
    return scan;
  }

  const KeyIndex<T>* index_of(int64_t h) const {
    return indexes_[static_cast<size_t>(sharing_ == IndexSharing::PerKvHead ? h / (hq_ / hkv_) : h)].get();
  }
  // A prompt's rows are hundreds of MB that land in fresh pages; the page faults and copies of the 2 x hkv stores
  // go faster on several threads than on one. Decode appends (a few tokens) stay on the calling thread.
  static constexpr int64_t kParallelRows = 4096;
  void append_rows(const T* keys, const T* values, int64_t t) {
    auto store_one = [&](int64_t j) {
      const int64_t h = j / 2;
      if (j % 2 == 0)
        keys_[h]->append(keys + h * t * d_, t);
      else
        values_[h]->append(values + h * t * dv_, t);
    };
    if (t >= kParallelRows) {
      parallel_for(2 * hkv_, store_one);
    } else {
      for (int64_t j = 0; j < 2 * hkv_; ++j) store_one(j);
    }
  }
  // Whether every id of ids[0, count) lies in [-1, n): blocks of ids over the threads.
  static bool ids_in_range(const int64_t* ids, int64_t count, int64_t n) {
    constexpr int64_t kBlock = 1 << 16;
    return parallel_all_of((count + kBlock - 1) / kBlock, [&](int64_t b) {
      bool good = true;
      for (int64_t i = b * kBlock; i < std::min(count, (b + 1) * kBlock); ++i) good &= ids[i] >= -1 && ids[i] < n;
      return good;
    });
  }
  // all_finite over the hkv heads' t x d key rows (contiguous), in blocks over the threads for a prompt.
  bool rows_finite(const T* keys, int64_t t) const {
    const int64_t count = hkv_ * t * d_;
    if (t < kParallelRows) return all_finite(keys, count);
    constexpr int64_t kBlock = int64_t{1} << 20;
    return parallel_all_of((count + kBlock - 1) / kBlock,
                           [&](int64_t b) { return all_finite(keys + b * kBlock, std::min(kBlock, count - b * kBlock)); });
  }
  // One index per query head or per kv head over the stores, from the kept training queries; reads only.
  std::vector<std::unique_ptr<KeyIndex<T>>> create_indexes(const int64_t* knn = nullptr, int64_t knn_k = 0, const int64_t* key_knn = nullptr,
                                                           int64_t key_knn_k = 0, const int32_t* projection = nullptr,
                                                           int64_t projection_k = 0) const {
    // The key lists and projections cover the rows build() got; rows appended before a pending build ran have none, so
    // then the graphs search for their weak keys and make their projections themselves.
    const int64_t group = hq_ / hkv_;
    if (keys_[0]->size() != key_knn_rows_) key_knn = nullptr, projection = nullptr;
    auto key_lists = [&](int64_t kv) { return key_knn ? key_knn + kv * key_knn_rows_ * key_knn_k : nullptr; };
    auto projection_of = [&](int64_t i) { return projection ? projection + i * key_knn_rows_ * projection_k : nullptr; };
    std::vector<std::unique_ptr<KeyIndex<T>>> made(static_cast<size_t>(index_count()));
    if (sharing_ == IndexSharing::PerKvHead) {
      // The group's query heads are consecutive, so its pooled training queries (group * n_train rows) and their
      // neighbour lists are one contiguous block of the (Hq, n_train, .) layout.
      parallel_for_split(hkv_, [&](int64_t kv) {
        const int64_t first = kv * group * n_train_;
        made[static_cast<size_t>(kv)] =
            factory_(keys_[kv], train_q_.data() + first * d_, group * n_train_, knn ? knn + first * knn_k : nullptr, knn_k, key_lists(kv),
                     key_knn_k, projection_of(kv), projection_k);
      });
    } else {
      parallel_for_split(hq_, [&](int64_t h) {
        made[static_cast<size_t>(h)] =
            factory_(keys_[h / group], train_q_.data() + h * n_train_ * d_, n_train_, knn ? knn + h * n_train_ * knn_k : nullptr, knn_k,
                     key_lists(h / group), key_knn_k, projection_of(h), projection_k);
      });
    }
    return made;
  }
  // More than max_unindexed rows are not in the indexes yet: insert them (caller holds the exclusive lock).
  void insert_if_due() {
    if (keys_[0]->size() - indexes_[0]->size() > max_unindexed_)
      parallel_for_split(index_count(), [&](int64_t i) { indexes_[static_cast<size_t>(i)]->index_new_rows(); });
  }
  void install_indexes(std::vector<std::unique_ptr<KeyIndex<T>>> made) {
    indexes_ = std::move(made);
    std::vector<float>().swap(train_q_);  // the graphs keep no query vectors
    UninitVector<int64_t>().swap(knn_);
    UninitVector<int64_t>().swap(key_knn_);
    UninitVector<int32_t>().swap(projection_);
    projection_k_ = 0;
    n_train_ = 0;
    knn_k_ = 0;
    key_knn_k_ = 0;
    key_knn_rows_ = 0;
  }

  int64_t hq_, hkv_, d_, dv_, max_unindexed_;
  IndexSharing sharing_;
  IndexFactory factory_;
  std::vector<std::shared_ptr<VectorStore<T>>> keys_, values_;
  std::vector<std::unique_ptr<KeyIndex<T>>> indexes_;
  std::vector<float> train_q_;
  int64_t n_train_ = 0;
  UninitVector<int64_t> knn_;  // the training queries' neighbour lists, kept for a pending build
  int64_t knn_k_ = 0;
  UninitVector<int64_t> key_knn_;  // each key's nearest keys (Hkv x t x key_knn_k), kept for a pending build
  int64_t key_knn_k_ = 0;
  UninitVector<int32_t> projection_;  // each index's projection lists (index_count() x t x projection_k), for a pending build
  int64_t projection_k_ = 0;
  int64_t key_knn_rows_ = 0;  // t of the build() that gave them
  bool build_pending_ = false;  // rows stored by build(..., index_now = false), indexes not made yet
  std::atomic<bool> building_{false};
  std::vector<int64_t> min_ids_;
  mutable std::shared_mutex mu_;
  mutable std::vector<std::atomic<int64_t>> head_cost_;  // each query head's keys scored at its last search (item order)
  std::atomic<bool> warm_start_{false};
  mutable std::mutex seeds_mu_;                           // guards head_seeds_
  mutable std::vector<std::vector<int64_t>> head_seeds_;  // warm start: each query head's previous retrieved ids
};

}  // namespace retrieval_attention
