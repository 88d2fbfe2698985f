// retrieval_attention/query_guided_graph.h -- the query-guided proximity graph (RoarGraph-style) of
// RetrievalAttention: maximum-inner-product search for out-of-distribution queries.
//
// Contract
//   * QueryGuidedGraph<T> indexes rows [0, size()) of a shared key store (std::shared_ptr<const
//     VectorStore<T>>, n x d, T = float/Half/BFloat16, never copied) under the inner product q.k.
//   * build(keys, train_queries (m x d float32 row-major), m, params): exact bipartite kNN query -> key
//     (exact_topk, k_train per query), projection onto the keys (each of a query's first n_pivots = 4 keys is
//     a pivot that gets the query's other neighbours as candidates, RNG-pruned), reverse edges, k->k linking of
//     keys the projection left with few out-edges ("weak" keys: a beam-ef_weak search from the entry point and
//     the kWeakSeeds nearest of kHubs sampled well-linked keys; kWeakReverse reverse edges each), in-degree
//     balancing (every key gets up to degree/2 in-edges from its own out-neighbours), and a connectivity pass.
//     build_from_neighbors() takes the kNN lists precomputed by the caller (m x knn_k int64 row-major,
//     best-first, -1 = padding; e.g. from a GPU) and skips the kNN; it may also take each key's nearest other
//     keys (n x key_knn_k, L2), which then replace the weak keys' searches (a weak key links to its list
//     and its own out-edges, pruned only where they exceed the degree), and the projection's result made elsewhere
//     from the same lists (n x degree int32, projection_prune.h: e.g. on the GPU), which then replaces that phase.
//     m = 0 is allowed (the graph is then a plain k->k graph). Every key is reachable from the entry point after
//     build() and after load() of a graph that was (checked by reachable_count()). Deterministic for given inputs and params. RA_QG_PROFILE=1 in the
//     environment prints the time of each build phase to stderr. Non-finite keys or training queries are
//     rejected (std::invalid_argument) by build(), build_from_neighbors() and index_new_rows().
//   * Graph: each key has at most max_degree() = degree + slack out-neighbours (ids uint32), stored in one
//     fixed-stride array (n x (max_degree + 1) uint32; slot 0 of a row holds its count) for locality. Pruned
//     neighbour lists hold at most `degree`; the slack slots only take connectivity edges.
//   * search_one(): best-first beam search with beam max(ef, k) from the entry point and the caller's seeds
//     (SearchParams::seeds; scored first, ids outside [0, size()) skipped); returns the number of keys whose score was
//     computed, seeds included. Fewer than k keys -> the tail is (-1, -inf). const and thread-safe:
//     scratch (visited epochs, beam) lives in thread_local buffers, nothing O(n) is allocated per query
//     once a thread's buffers have grown.
//   * index_new_rows(): inserts rows appended to the store since the last call (also from an empty graph):
//     each new key searches the graph for itself, links to the pruned result, and gets reverse edges (with
//     re-pruning) plus, if none survived, one slack edge from its best neighbour so it is reachable at once.
//     Re-pruning may rarely cut an older key off; a full repair (repair_connectivity()) runs whenever the
//     graph has grown by 1/8 since the last one, so the cost stays amortised O(degree) per row. Exclusive
//     access as in index.h.
//   * Payload: u32 version | params (degree, k_train, ef_build, seed; the build-only ef_weak and n_pivots are
//     not stored) | n, dim, stride, entry | adjacency; load() validates all of it against
//     the key store and fails with std::runtime_error (PayloadReader::fail) on any inconsistency.
//   * Build and insert are OpenMP-parallel through parallel_for (exceptions reach the caller).
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "huge_page_allocator.h"
#include "index.h"
#include "parallel.h"
#include "projection_prune.h"
#include "simd_dot.h"
#include "topk.h"

namespace retrieval_attention {

namespace qg_detail {
using simd::dot;  // simd_dot.h: AVX+FMA when the CPU has it (checked once at run time), else dot_row
#ifdef RA_X86_SIMD
using simd::dot_avx_inl;
using simd::have_avx_fma;
using simd::hsum256;
using simd::load8;
// dot_avx(q, row) that also writes the row, widened to float32, to out (the same sums, bit for bit): prune
// scores each candidate against p once and keeps the float copy contiguous for its RNG pass.
template <class T>
__attribute__((target("avx,fma,f16c"))) float dot_copy_avx(const float* q, const T* row, float* out, int64_t d) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= d; i += 32) {
    const __m256 r0 = load8(row + i), r1 = load8(row + i + 8), r2 = load8(row + i + 16), r3 = load8(row + i + 24);
    _mm256_storeu_ps(out + i, r0);
    _mm256_storeu_ps(out + i + 8, r1);
    _mm256_storeu_ps(out + i + 16, r2);
    _mm256_storeu_ps(out + i + 24, r3);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), r0, a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), r1, a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 16), r2, a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 24), r3, a3);
  }
  for (; i + 8 <= d; i += 8) {
    const __m256 r0 = load8(row + i);
    _mm256_storeu_ps(out + i, r0);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), r0, a0);
  }
  float s = hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; i < d; ++i) {
    out[i] = to_float(row[i]);
    s += q[i] * out[i];
  }
  return s;
}
// RNG occlusion test of prune: is c.r > half + khalf[r] for some of the nk kept rows r (rows of `kept`, d floats
// each)? Four rows at a time with no branch in between, so their dot chains overlap (one dot's latency is
// several times its arithmetic); the per-row sums are those of dot_avx, bit for bit.
__attribute__((target("avx,fma,f16c"))) inline bool occluded_avx(const float* c, const float* kept, const float* khalf, int64_t nk, float half, int64_t d) {
  int64_t r = 0;
  for (; r + 4 <= nk; r += 4) {
    const float s0 = dot_avx_inl(c, kept + r * d, d), s1 = dot_avx_inl(c, kept + (r + 1) * d, d);
    const float s2 = dot_avx_inl(c, kept + (r + 2) * d, d), s3 = dot_avx_inl(c, kept + (r + 3) * d, d);
    if ((s0 > half + khalf[r]) | (s1 > half + khalf[r + 1]) | (s2 > half + khalf[r + 2]) | (s3 > half + khalf[r + 3])) return true;
  }
  for (; r < nk; ++r)
    if (dot_avx_inl(c, kept + r * d, d) > half + khalf[r]) return true;
  return false;
}
#endif

// Phase timer of the build, printed to stderr when the environment variable RA_QG_PROFILE is set: the phase's
// milliseconds, its count (-1: none), and when it ended (steady clock, ms), which lines up the graphs built at once.
class PhaseTimer {
 public:
  PhaseTimer() : on_(std::getenv("RA_QG_PROFILE") != nullptr), t_(std::chrono::steady_clock::now()) {}
  void lap(const char* what, long count = -1) {
    if (!on_) return;
    const auto now = std::chrono::steady_clock::now();
    std::fprintf(stderr, "[qg] %-10s %8.1f ms  %ld  at %.1f\n", what, std::chrono::duration<double, std::milli>(now - t_).count(), count,
                 std::chrono::duration<double, std::milli>(now.time_since_epoch()).count());
    t_ = now;
  }

 private:
  bool on_;
  std::chrono::steady_clock::time_point t_;
};

inline bool occluded(const float* c, const float* kept, const float* khalf, int64_t nk, float half, int64_t d) {
#ifdef RA_X86_SIMD
  if (have_avx_fma()) return occluded_avx(c, kept, khalf, nk, half, d);
#endif
  for (int64_t r = 0; r < nk; ++r)
    if (dot(c, kept + r * d, d) > half + khalf[r]) return true;
  return false;
}

// The smallest min(want, n) of n unique 64-bit keys, ascending (the order std::sort gives), at the front of
// `keys`; the rest of `keys` is unspecified. vals[i] is a float that orders like keys[i] (v < w implies key
// order; the key breaks ties): keys are bucketed by vals scaled linearly between their min and max (monotone,
// so buckets come out in order, and spread like the values, unlike float bits) and only the buckets up to
// the want-th key are scattered and sorted. About twice as fast as nth_element + std::sort on the few
// hundred keys of a prune.
inline void smallest_sorted(std::vector<uint64_t>& keys, const float* vals, size_t want, std::vector<uint64_t>& tmp,
                            std::vector<uint32_t>& count) {
  const size_t n = keys.size();
  want = std::min(want, n);
  float lo = std::numeric_limits<float>::infinity(), hi = -lo;
  bool nan = false;
  for (size_t i = 0; i < n; ++i) lo = std::min(lo, vals[i]), hi = std::max(hi, vals[i]), nan |= vals[i] != vals[i];
  const float scale = static_cast<float>(n) / (hi - lo);
  if (n <= 48 || nan || !std::isfinite(scale) || !std::isfinite(lo) || !std::isfinite(hi)) {  // small, constant or not finite
    if (want < n) std::nth_element(keys.begin(), keys.begin() + static_cast<std::ptrdiff_t>(want), keys.end());
    std::sort(keys.begin(), keys.begin() + static_cast<std::ptrdiff_t>(want));
    return;
  }
  const uint32_t nb = static_cast<uint32_t>(n);
  count.assign(static_cast<size_t>(nb) + 1 + n, 0u);  // nb + 1 counters, then each key's bucket
  uint32_t* cnt = count.data();
  uint32_t* bkt = cnt + nb + 1;
  for (size_t i = 0; i < n; ++i) {
    // int32 conversion (the unsigned 64-bit one is slow on x86); the clamp takes the top's rounding
    const uint32_t b = std::min(nb - 1, static_cast<uint32_t>(static_cast<int32_t>((vals[i] - lo) * scale)));
    bkt[i] = b;
    cnt[b + 1]++;
  }
  uint32_t last = 0;  // last bucket needed: buckets [0, last] hold at least `want` keys
  for (uint32_t b = 0; b < nb; ++b) {
    cnt[b + 1] += cnt[b];
    if (cnt[b] < want) last = b;
  }
  tmp.resize(cnt[last + 1]);
  for (size_t i = 0; i < n; ++i)
    if (bkt[i] <= last) tmp[cnt[bkt[i]]++] = keys[i];  // cnt[b] ends at the start of bucket b + 1
  size_t start = 0;
  for (uint32_t b = 0; b <= last; ++b) {
    const size_t end = cnt[b];
    if (end - start > 24) {
      std::sort(tmp.begin() + static_cast<std::ptrdiff_t>(start), tmp.begin() + static_cast<std::ptrdiff_t>(end));
    } else {
      for (size_t i = start + 1; i < end; ++i) {  // insertion sort
        const uint64_t v = tmp[i];
        size_t j = i;
        for (; j > start && tmp[j - 1] > v; --j) tmp[j] = tmp[j - 1];
        tmp[j] = v;
      }
    }
    start = end;
  }
  std::copy(tmp.begin(), tmp.begin() + static_cast<std::ptrdiff_t>(want), keys.begin());
}

template <class T>
inline float dot_copy(const float* q, const T* row, float* out, int64_t d) {
#ifdef RA_X86_SIMD
  if (have_avx_fma()) return dot_copy_avx(q, row, out, d);
#endif
  for (int64_t i = 0; i < d; ++i) out[i] = to_float(row[i]);
  return dot(q, out, d);
}
}  // namespace qg_detail

struct QueryGuidedParams {
  int64_t degree = 32;     // max out-degree of a pruned neighbour list (the graph adds degree/8 slack slots)
  int64_t k_train = 100;   // exact key neighbours per training query (bipartite kNN)
  int64_t ef_build = 64;   // beam width of the k->k searches in build and insert (128: same recall, 2x time)
  uint64_t seed = 0x5eed;  // order of insertions; the build is deterministic for a given seed
  int64_t ef_weak = 16;    // beam of the searches that link keys the projection left with few out-edges
  int64_t n_pivots = 4;    // leading keys of each training query's list that act as pivots in the projection

  void validate() const {
    require(degree >= 2 && degree <= 1024, "query_guided: degree must be in [2, 1024]");
    require(k_train >= 1 && k_train <= 100000, "query_guided: k_train must be in [1, 100000]");
    require(ef_build >= 1 && ef_build <= 100000, "query_guided: ef_build must be in [1, 100000]");
    require(ef_weak >= 1 && ef_weak <= 100000, "query_guided: ef_weak must be in [1, 100000]");
    require(n_pivots >= 1 && n_pivots <= 100, "query_guided: n_pivots must be in [1, 100]");
  }
};

template <class T>
class QueryGuidedGraph final : public KeyIndex<T> {
 public:
  // An empty graph over `keys`; index_new_rows() inserts the rows already in the store.
  QueryGuidedGraph(std::shared_ptr<const VectorStore<T>> keys, const QueryGuidedParams& params) : keys_(std::move(keys)), p_(params) {
    require(keys_ != nullptr, "query_guided: key store is null");
    p_.validate();
    stride_ = max_degree() + 1;
  }

  // key_knn (optional, n x key_knn_k, -1 = padding): each key's nearest other keys in L2, computed by the caller
  // (e.g. on a GPU); the keys the projection leaves weak then link from these lists instead of searching the graph
  // (4.7x faster at 64K keys with 2,048 training queries, same recall: scripts/dev/weak_lists_recall.py).
  // inputs_checked: the caller has validated the keys, training queries and id lists as build() and
  // build_from_neighbors() would (OffloadedLayer does, once per layer, off its build thread); they are then not
  // checked again by each graph, where the checks were a fifth of an 8B layer's build on a 16-core host.
  static std::unique_ptr<QueryGuidedGraph> build(std::shared_ptr<const VectorStore<T>> keys, const float* train_queries, int64_t m,
                                                  const QueryGuidedParams& params = {}, const int64_t* key_knn = nullptr,
                                                  int64_t key_knn_k = 0, bool inputs_checked = false) {
    return assemble(std::move(keys), train_queries, m, nullptr, 0, params, key_knn, key_knn_k, nullptr, 0, inputs_checked);
  }

  // Same as build() with the bipartite kNN given: knn_ids (m x knn_k), each row best-first, -1 = padding.
  // projection (optional, n x projection_k int32, -1 = padding, projection_k = degree): the projection phase's result
  // computed by the caller from the same knn_ids (e.g. on a GPU: retrieval_attention.index.projection_lists), each
  // key's pruned list; the build then skips that phase. Ids must be in [-1, n), not the row's own key, and not repeated
  // within a row.
  static std::unique_ptr<QueryGuidedGraph> build_from_neighbors(std::shared_ptr<const VectorStore<T>> keys, const float* train_queries,
                                                                int64_t m, const int64_t* knn_ids, int64_t knn_k,
                                                                const QueryGuidedParams& params = {}, const int64_t* key_knn = nullptr,
                                                                int64_t key_knn_k = 0, const int32_t* projection = nullptr,
                                                                int64_t projection_k = 0, bool inputs_checked = false) {
    require(m == 0 || (knn_ids != nullptr && knn_k > 0), "query_guided: neighbour lists must be (m x knn_k) with knn_k > 0");
    return assemble(std::move(keys), train_queries, m, knn_ids, knn_k, params, key_knn, key_knn_k, projection, projection_k,
                    inputs_checked);
  }

 private:
  // build() and build_from_neighbors(): knn_ids null = compute the bipartite kNN here.
  static std::unique_ptr<QueryGuidedGraph> assemble(std::shared_ptr<const VectorStore<T>> keys, const float* train_queries, int64_t m,
                                                    const int64_t* knn_ids, int64_t knn_k, const QueryGuidedParams& params,
                                                    const int64_t* key_knn, int64_t key_knn_k, const int32_t* projection,
                                                    int64_t projection_k, bool inputs_checked) {
    auto g = std::make_unique<QueryGuidedGraph>(std::move(keys), params);
    require(m >= 0 && (m == 0 || train_queries != nullptr), "query_guided: training queries must be (m x d) with m >= 0");
    if (!inputs_checked) {
      check_queries(train_queries, m, g->keys_->dim());
      g->check_keys(0);
    }
    const int64_t n = g->keys_->size();
    std::vector<int64_t> own_knn;
    qg_detail::PhaseTimer timer;
    if (knn_ids == nullptr) {
      knn_k = std::min<int64_t>(g->p_.k_train, n);
      if (m > 0 && n > 0) {
        own_knn.resize(static_cast<size_t>(m * knn_k));
        exact_topk(train_queries, m, *g->keys_, n, knn_k, own_knn.data(), nullptr);
      }
      knn_ids = own_knn.data();
      timer.lap("knn");
    } else if (!inputs_checked) {
      for (int64_t i = 0; i < m * knn_k; ++i)
        require(knn_ids[i] >= -1 && knn_ids[i] < n, "query_guided: neighbour id out of range [-1, n)");
    }
    require(key_knn == nullptr || key_knn_k > 0, "query_guided: key neighbour lists must be (n x k) with k > 0");
    if (key_knn && !inputs_checked)
      for (int64_t i = 0; i < n * key_knn_k; ++i)
        require(key_knn[i] >= -1 && key_knn[i] < n, "query_guided: key neighbour id out of range [-1, n)");
    if (projection) {
      require(projection_k == g->p_.degree, "query_guided: projection lists must be (n x degree)");
      require(inputs_checked || projection_rows_valid(projection, n, projection_k, n),
              "query_guided: projection id out of range [-1, n), a self-loop, or repeated within a row");
    }
    timer.lap("checks");
    g->build_graph(train_queries, m, knn_ids, knn_k, key_knn, key_knn_k, projection);
    return g;
  }

 public:
  int64_t size() const override { return n_; }
  int64_t dim() const override { return keys_->dim(); }
  std::string type_name() const override { return "query_guided"; }
  int64_t structure_bytes() const override { return static_cast<int64_t>(adj_.size() * sizeof(uint32_t) + sq_.size() * sizeof(float)); }
  const QueryGuidedParams& params() const { return p_; }
  int64_t max_degree() const { return p_.degree + std::max<int64_t>(2, p_.degree / 8); }
  int64_t entry_point() const { return entry_; }
  int64_t out_degree(int64_t i) const { return adj_[static_cast<size_t>(i * stride_)]; }
  const uint32_t* neighbors(int64_t i) const { return adj_.data() + i * stride_ + 1; }
  int64_t edge_count() const {
    int64_t e = 0;
    for (int64_t i = 0; i < n_; ++i) e += out_degree(i);
    return e;
  }

  // Number of keys reachable from the entry point along out-edges (== size() for a healthy graph).
  int64_t reachable_count() const {
    std::vector<uint8_t> seen;
    return bfs_mark(seen);
  }
  bool is_connected() const { return reachable_count() == n_; }

  int64_t search_one(const float* q, int64_t k, const SearchParams& params, int64_t* ids, float* scores) const override {
    require(k > 0, "k must be positive");
    require(params.ef > 0, "ef must be positive");
    Scratch& s = scratch();
    const T* base = keys_->data();
    int64_t n_scored = 0;
    if (params.n_seeds > 0) {  // score the caller's starting rows; beam_search counts only its own scores
      const int64_t d = keys_->dim();
      s.seeds.clear();
      for (int64_t i = 0; i < params.n_seeds; ++i)
        if (params.seeds[i] >= 0 && params.seeds[i] < n_) prefetch_bytes(base + params.seeds[i] * d, d * static_cast<int64_t>(sizeof(T)));
      for (int64_t i = 0; i < params.n_seeds; ++i) {
        const int64_t id = params.seeds[i];
        if (id < 0 || id >= n_) continue;
        const float sc = qg_detail::dot(q, base + id * d, d);
        s.seeds.push_back({sc == sc ? sc : -std::numeric_limits<float>::infinity(), static_cast<uint32_t>(id), false});
      }
      n_scored = static_cast<int64_t>(s.seeds.size());
    }
    const int64_t visited = n_scored + beam_search(base, q, std::max(params.ef, k), s, false, s.seeds.data(), n_scored);
    const int64_t found = std::min<int64_t>(k, static_cast<int64_t>(s.beam.size()));
    for (int64_t j = 0; j < k; ++j) {
      ids[j] = j < found ? static_cast<int64_t>(s.beam[static_cast<size_t>(j)].id) : -1;
      if (scores) scores[j] = j < found ? s.beam[static_cast<size_t>(j)].score : -std::numeric_limits<float>::infinity();
    }
    return visited;
  }

  void index_new_rows() override {
    const int64_t n_new = keys_->size();
    if (n_new <= n_) return;
    require(n_new < static_cast<int64_t>(std::numeric_limits<uint32_t>::max()), "query_guided: too many keys for 32-bit ids");
    check_keys(n_);
    const int64_t first = n_;
    grow(n_new);
    if (first == 0) entry_ = 0;  // empty start: the first row is the entry until a build picks a better one
    std::vector<uint32_t> order(static_cast<size_t>(n_new - first));
    std::iota(order.begin(), order.end(), static_cast<uint32_t>(first));
    if (first == 0) order.erase(order.begin());
    insert_batched(keys_->data(), order, /*guarantee_in_edge=*/true);
    if (n_ - repaired_at_ >= std::max<int64_t>(64, repaired_at_ / 8)) repair_connectivity();
  }

  // Makes every key reachable from the entry point again (links each unreached key from a reached key
  // found by searching for it, using slack slots). Called by build and periodically by index_new_rows.
  void repair_connectivity() { repair_with(keys_->data()); }

  void write_payload(PayloadWriter& w) const override {
    w.put<uint32_t>(kPayloadVersion);
    w.put<int64_t>(p_.degree);
    w.put<int64_t>(p_.k_train);
    w.put<int64_t>(p_.ef_build);
    w.put<uint64_t>(p_.seed);
    w.put<int64_t>(n_);
    w.put<int64_t>(keys_->dim());
    w.put<int64_t>(stride_);
    w.put<int64_t>(entry_);
    w.put<int64_t>(repaired_at_);
    w.put_vector(adj_);
  }

  static std::unique_ptr<QueryGuidedGraph> load(std::shared_ptr<const VectorStore<T>> keys, PayloadReader& r) {
    if (r.get<uint32_t>() != kPayloadVersion) r.fail("unsupported query_guided payload version");
    QueryGuidedParams p;
    p.degree = r.get<int64_t>();
    p.k_train = r.get<int64_t>();
    p.ef_build = r.get<int64_t>();
    p.seed = r.get<uint64_t>();
    try {
      p.validate();
    } catch (const std::invalid_argument& e) {
      r.fail(e.what());
    }
    auto g = std::make_unique<QueryGuidedGraph>(std::move(keys), p);
    const int64_t n = r.get<int64_t>(), d = r.get<int64_t>(), stride = r.get<int64_t>(), entry = r.get<int64_t>();
    const int64_t repaired_at = r.get<int64_t>();
    if (n != g->keys_->size()) r.fail("query_guided row count does not match the stored keys");
    if (d != g->keys_->dim()) r.fail("query_guided dimension does not match the stored keys");
    if (stride != g->stride_) r.fail("query_guided adjacency stride does not match its degree");
    if (n == 0 ? entry != -1 : (entry < 0 || entry >= n)) r.fail("query_guided entry point out of range");
    if (repaired_at < 0 || repaired_at > n) r.fail("query_guided repair counter out of range");
    HugePageVector<uint32_t> adj = r.get_vector<uint32_t, HugePageAllocator<uint32_t>>(n * stride);
    if (static_cast<int64_t>(adj.size()) != n * stride) r.fail("query_guided adjacency size does not match the row count");
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t* row = adj.data() + i * stride;
      if (row[0] > static_cast<uint32_t>(stride - 1)) r.fail("query_guided neighbour count out of range at row " + std::to_string(i));
      for (uint32_t j = 1; j <= row[0]; ++j)
        if (row[j] >= static_cast<uint64_t>(n) || row[j] == static_cast<uint32_t>(i))
          r.fail("query_guided neighbour id out of range at row " + std::to_string(i));
    }
    if (!r.at_end()) r.fail("trailing bytes after the query_guided payload");
    g->grow(n);
    g->adj_ = std::move(adj);
    g->entry_ = entry;
    g->repaired_at_ = repaired_at;
    return g;
  }

 private:
  static constexpr uint32_t kPayloadVersion = 1;
  static constexpr int64_t kPruneScan = 32;    // the RNG pass of a prune looks at the kPruneScan * max_keep nearest candidates
  static constexpr int64_t kHubs = 256;        // hub sample scored by each weak-key search
  static constexpr int64_t kWeakSeeds = 4;     // nearest hubs a weak-key search also starts from
  static constexpr int64_t kWeakReverse = 4;   // reverse edges per weak key (to its nearest kept neighbours)
  static constexpr int kMergeWalk = 8;          // beam entries a merge moves one by one before it binary-searches
  struct Cand {
    float score;
    uint32_t id;
    bool expanded;
  };
  struct Scratch {
    // visited epochs, grown to the largest graph this thread searched; one byte per key (cleared every 255
    // searches) keeps the array a quarter of 32-bit epochs' size, so more of it stays in cache between searches
    std::vector<uint8_t> mark;
    uint8_t epoch = 0;
    std::vector<Cand> beam;
    std::vector<uint32_t> fresh;
    std::vector<Cand> accepted;  // one expansion's scored new neighbours that may enter the beam
    std::vector<float> qf;
    std::vector<Cand> seeds;  // search_one's scored starting rows (SearchParams::seeds)
  };
  // A sample of well-linked keys with their rows copied contiguously: a weak key's search first scores them
  // all (cheap: they stay in cache) and also starts from the nearest few, so a narrow beam is enough.
  struct HubSet {
    int64_t d = 0;
    std::vector<uint32_t> ids;
    std::vector<float> rows, half_sq;
    // the `want` hubs nearest to x (by x.h - |h|^2/2, i.e. Euclidean), best first, as already-scored seeds
    int64_t nearest(const float* x, int64_t want, std::vector<Cand>& out) const {
      out.clear();
      const auto worse = [](const Cand& a, const Cand& b) { return a.score > b.score; };
      for (size_t h = 0; h < ids.size(); ++h) {
        const float sc = qg_detail::dot(x, rows.data() + h * static_cast<size_t>(d), d) - half_sq[h];
        if (static_cast<int64_t>(out.size()) < want) {
          out.push_back({sc, ids[h], false});
          std::push_heap(out.begin(), out.end(), worse);
        } else if (sc > out.front().score) {
          std::pop_heap(out.begin(), out.end(), worse);
          out.back() = {sc, ids[h], false};
          std::push_heap(out.begin(), out.end(), worse);
        }
      }
      std::sort_heap(out.begin(), out.end(), worse);
      return static_cast<int64_t>(out.size());
    }
  };

  static Scratch& scratch() {
    thread_local Scratch s;
    return s;
  }

  // Rows [from, size) of the store must be finite: a NaN/Inf key has no place in the graph's geometry.
  void check_keys(int64_t from) const {
    const int64_t n = keys_->size(), d = keys_->dim();
    if (n > from) require(all_finite(keys_->row(from), (n - from) * d), "query_guided: keys contain NaN or Inf");
  }
  static void check_queries(const float* q, int64_t m, int64_t d) {
    require(m >= 0, "query_guided: number of training queries must be non-negative");
    require(m == 0 || q != nullptr, "query_guided: training queries are null");
    for (int64_t i = 0; i < m * d; ++i) require(std::isfinite(q[i]), "query_guided: training queries must be finite");
  }

  void grow(int64_t n_new) {
    const int64_t d = keys_->dim();
    adj_.resize(static_cast<size_t>(n_new * stride_), 0u);
    sq_.resize(static_cast<size_t>(n_new));
    // squared norms in blocks of rows: a build's n rows go over the threads, an insert's few stay on this one
    constexpr int64_t kBlock = 4096;
    const int64_t first = n_;
    parallel_for((n_new - first + kBlock - 1) / kBlock, [&](int64_t b) {
      std::vector<float> row(static_cast<size_t>(d));
      for (int64_t i = first + b * kBlock; i < std::min(n_new, first + (b + 1) * kBlock); ++i) {
        const T* src = keys_->row(i);
        for (int64_t c = 0; c < d; ++c) row[static_cast<size_t>(c)] = to_float(src[c]);
        sq_[static_cast<size_t>(i)] = qg_detail::dot(row.data(), row.data(), d);
      }
    });
    n_ = n_new;
  }

  // Beam search over rows of `base` (the store's T rows). Leaves the best
  // `beam` candidates best-first in s.beam. Returns the number of scores computed. l2: rank by
  // q.k - |k|^2/2, i.e. by Euclidean nearness to q, used when a key searches for its own neighbours
  // (measured on real Q/K: slightly better graphs than linking keys by inner product).
  template <class R>
  int64_t beam_search(const R* base, const float* q, int64_t beam, Scratch& s, bool l2 = false, const Cand* seeds = nullptr,
                      int64_t n_seeds = 0) const {
    s.beam.clear();
    if (n_ == 0) return 0;
    const int64_t d = keys_->dim();
    if (static_cast<int64_t>(s.mark.size()) < n_) s.mark.resize(static_cast<size_t>(n_), uint8_t{0});
    if (++s.epoch == 0) {  // wrapped: old marks could collide with new epochs
      std::fill(s.mark.begin(), s.mark.end(), uint8_t{0});
      s.epoch = 1;
    }
    const uint8_t ep = s.epoch;
    uint8_t* mark = s.mark.data();
    const uint32_t* adj = adj_.data();
    s.beam.reserve(static_cast<size_t>(beam + 1));
    mark[entry_] = ep;
    // A NaN score (e.g. huge finite vectors whose products overflow) would break the beam's ordering: rank it last.
    const auto ordered = [](float x) { return x == x ? x : -std::numeric_limits<float>::infinity(); };
    s.beam.push_back({ordered(qg_detail::dot(q, base + entry_ * d, d) - (l2 ? 0.5f * sq_[entry_] : 0.f)), static_cast<uint32_t>(entry_), false});
    int64_t visited = 1;
    for (int64_t i = 0; i < n_seeds; ++i) {  // extra starting points, already scored by the caller
      const Cand& c = seeds[i];
      if (mark[c.id] == ep) continue;
      mark[c.id] = ep;
      s.beam.push_back({ordered(c.score), c.id, false});
    }
    if (n_seeds > 0) {
      std::sort(s.beam.begin(), s.beam.end(), [](const Cand& a, const Cand& b) { return a.score > b.score; });
      if (static_cast<int64_t>(s.beam.size()) > beam) s.beam.resize(static_cast<size_t>(beam));
    }
    // one row's unvisited neighbours; a plain array (the vector's push_back reached the thread-local scratch
    // through a call per element)
    if (static_cast<int64_t>(s.fresh.size()) < stride_) s.fresh.resize(static_cast<size_t>(stride_));
    if (static_cast<int64_t>(s.accepted.size()) < stride_) s.accepted.resize(static_cast<size_t>(stride_));
    uint32_t* fresh = s.fresh.data();
    size_t next = 0;  // first candidate that may be unexpanded
    while (next < s.beam.size()) {
      if (s.beam[next].expanded) {
        ++next;
        continue;
      }
      s.beam[next].expanded = true;
      const uint32_t* row = adj + static_cast<int64_t>(s.beam[next].id) * stride_;
      const uint32_t cnt = row[0];
      // Whether a neighbour was already visited is a coin flip for the branch predictor: collect the unvisited
      // ones without a branch (each id is written, the count advances only for new ones), then prefetch their rows.
      uint32_t n_fresh = 0;
      for (uint32_t j = 1; j <= cnt; ++j) {
        const uint32_t v = row[j];
        const uint32_t is_new = mark[v] != ep ? 1u : 0u;
        mark[v] = ep;
        fresh[n_fresh] = v;
        n_fresh += is_new;
      }
      for (uint32_t f = 0; f < n_fresh; ++f)
        prefetch_bytes(base + static_cast<int64_t>(fresh[f]) * d, d * static_cast<int64_t>(sizeof(R)));
      // Score them all; those that may enter the beam go to `acc`, sorted best-first (arrival order on ties), and
      // are merged into the beam from its end in one pass, keeping its best `beam`. This is what inserting them one
      // by one gives (an equal score ranks after those already in the beam), without a search per insertion.
      Cand* acc = s.accepted.data();
      const bool was_full = static_cast<int64_t>(s.beam.size()) >= beam;
      const float bar = was_full ? s.beam.back().score : 0.f;
      uint32_t n_acc = 0;
      for (uint32_t f = 0; f < n_fresh; ++f) {
        const uint32_t v = fresh[f];
        const float sc = ordered(qg_detail::dot(q, base + static_cast<int64_t>(v) * d, d) - (l2 ? 0.5f * sq_[v] : 0.f));
        acc[n_acc] = Cand{sc, v, false};
        n_acc += (!was_full || sc > bar) ? 1u : 0u;
      }
      visited += n_fresh;
      if (n_acc == 0) continue;
      for (uint32_t a = 1; a < n_acc; ++a) {  // insertion sort, stable
        const Cand x = acc[a];
        uint32_t b = a;
        for (; b > 0 && acc[b - 1].score < x.score; --b) acc[b] = acc[b - 1];
        acc[b] = x;
      }
      const int64_t size = static_cast<int64_t>(s.beam.size());
      const int64_t kept = std::min<int64_t>(size + n_acc, beam);
      if (kept > size) s.beam.resize(static_cast<size_t>(kept));
      Cand* bm = s.beam.data();
      int64_t i = size - 1, j = static_cast<int64_t>(n_acc) - 1;
      for (int64_t drop = size + n_acc - kept; drop > 0; --drop) {  // the merged order's last entries fall out
        if (j >= 0 && (i < 0 || acc[j].score <= bm[i].score)) --j;
        else --i;
      }
      size_t lowest = next;  // smallest position a new candidate landed at
      for (; j >= 0; --j) {
        // beam entries that rank after acc[j] (strictly lower score) move up by j + 1: the first few one by one,
        // a longer run (wide beams) as one block found by a branchless binary search
        const float sc = acc[j].score;
        for (int step = 0; step < kMergeWalk && i >= 0 && bm[i].score < sc; ++step, --i) bm[i + j + 1] = bm[i];
        if (i >= 0 && bm[i].score < sc) {
          const Cand* first = bm;  // the first of bm[0, i] with a lower score than sc (bm[i] is one)
          for (int64_t len = i + 1; len > 1;) {
            const int64_t half = len / 2;
            first = first[half - 1].score >= sc ? first + half : first;
            len -= half;
          }
          const int64_t p = first - bm;
          std::memmove(bm + p + j + 1, bm + p, static_cast<size_t>(i - p + 1) * sizeof(Cand));
          i = p - 1;
        }
        bm[i + j + 1] = acc[j];
        lowest = static_cast<size_t>(i + j + 1);
        // a candidate for expansion now: start loading its neighbour list, so that expanding it does not begin with
        // a dependent cache miss (the largest stall of the search with the key rows prefetched)
        prefetch_bytes(adj + static_cast<int64_t>(acc[j].id) * stride_, stride_ * static_cast<int64_t>(sizeof(uint32_t)));
      }
      s.beam.resize(static_cast<size_t>(kept));
      if (lowest < next) next = lowest;
    }
    return visited;
  }

  // Float view of key i for pruning: the row itself (float32 keys) or a widened copy in `buf`.
  template <class R>
  const float* row_f(const R* base, int64_t i, std::vector<float>& buf) const {
    const int64_t d = keys_->dim();
    if constexpr (std::is_same<R, float>::value) {
      (void)buf;
      return base + i * d;
    } else {
      buf.resize(static_cast<size_t>(d));
      for (int64_t c = 0; c < d; ++c) buf[static_cast<size_t>(c)] = to_float(base[i * d + c]);
      return buf.data();
    }
  }

  // Starts loading what prune() reads of candidate c: its row and its squared norm.
  template <class R>
  void prefetch_key(const R* base, int64_t c) const {
    const int64_t d = keys_->dim();
    prefetch_bytes(base + c * d, d * static_cast<int64_t>(sizeof(R)));
    prefetch_bytes(sq_.data() + c, sizeof(float));
  }

  // RNG-style pruning of p's candidate set down to max_keep neighbours, written to out.
  // Inner product is not a metric, so the pruning geometry is Euclidean between keys (|a|^2 + |b|^2 - 2 a.b
  // from cached squared norms): candidates are taken nearest-first and c is dropped when an already kept r is
  // closer to c than p is. This keeps edges spread over directions around p (what navigation needs); the
  // MIPS ranking itself is left to the search, which scores by q.k.
  template <class R>
  void prune(const R* base, uint32_t p, std::vector<uint32_t>& cand, int64_t max_keep, std::vector<uint32_t>& out) const {
    struct Scored {
      float dist, ip;
      uint32_t id;
    };
    thread_local std::vector<Scored> scored;
    thread_local std::vector<float> pbuf, cbuf, kbuf, khalf;
    thread_local std::vector<uint32_t> kept, seen;
    thread_local uint32_t epoch = 0;
    const int64_t d = keys_->dim();
    // duplicates (a candidate proposed by several training queries) are dropped with per-thread epoch marks
    if (seen.size() < static_cast<size_t>(n_)) seen.assign(static_cast<size_t>(n_), 0u), epoch = 0;
    if (++epoch == 0) std::fill(seen.begin(), seen.end(), 0u), epoch = 1;
    seen[p] = epoch;
    size_t w = 0;
    for (uint32_t c : cand)
      if (seen[c] != epoch) seen[c] = epoch, cand[w++] = c;
    cand.resize(w);
    const float* pf = row_f(base, p, pbuf);
    const float sp = sq_[p];
    scored.resize(cand.size());
    // every candidate row is read from the (large, randomly accessed) base once: scored against p and copied
    // to one contiguous float block that the RNG pass below reads from cache
    cbuf.resize(cand.size() * static_cast<size_t>(d));
    for (size_t i = 0; i < cand.size(); ++i) {
      const uint32_t c = cand[i];
      if (i + 4 < cand.size()) prefetch_bytes(base + static_cast<int64_t>(cand[i + 4]) * d, d * static_cast<int64_t>(sizeof(R)));
      const float ip = qg_detail::dot_copy(pf, base + static_cast<int64_t>(c) * d, cbuf.data() + i * static_cast<size_t>(d), d);
      scored[i] = {sp + sq_[c] - 2.f * ip, ip, c};
    }
    kept.clear();
    const int64_t n_ip = std::min<int64_t>(static_cast<int64_t>(scored.size()), max_keep / 4), n_rng = max_keep - n_ip;
    // RNG pass over the nearest candidates only: beyond a few times the budget nearly every candidate is
    // occluded by a kept one, and scanning (and sorting) them all dominated the build on hub keys
    const size_t cap = std::min(scored.size(), static_cast<size_t>(std::max<int64_t>(kPruneScan * max_keep, 64)));
    // nearest-first order by one 64-bit key per candidate (distance bits, then position): the sort is a large
    // share of the build, and integer keys sort about twice as fast as the structs
    thread_local std::vector<uint64_t> order;
    thread_local std::vector<float> vals;  // the keys' values, for smallest_sorted's buckets
    order.resize(scored.size());
    vals.resize(scored.size());
    for (size_t i = 0; i < scored.size(); ++i) {
      const float dd = std::max(scored[i].dist, 0.f);  // >= 0, so its bits order like the value (NaN is not expected)
      uint32_t bits;
      std::memcpy(&bits, &dd, sizeof(bits));
      order[i] = (static_cast<uint64_t>(bits) << 32) | static_cast<uint64_t>(i);
      vals[i] = dd;
    }
    // the cap nearest in full order: the RNG pass rarely fills its budget, so it examines nearly all of them
    thread_local std::vector<uint64_t> sort_tmp;
    thread_local std::vector<uint32_t> sort_count;
    qg_detail::smallest_sorted(order, vals.data(), cap, sort_tmp, sort_count);
    // kept rows are copied into one small contiguous float block (stays in L1 across the candidates)
    kbuf.resize(static_cast<size_t>(n_rng * d));
    khalf.resize(static_cast<size_t>(n_rng));
    for (size_t i = 0; i < cap; ++i) {
      const size_t ci = static_cast<size_t>(order[i] & 0xffffffffu);
      const Scored& e = scored[ci];
      if (static_cast<int64_t>(kept.size()) >= n_rng) break;
      const float* cf = cbuf.data() + ci * static_cast<size_t>(d);
      const float half = 0.5f * (sq_[e.id] - e.dist);  // drc < dist  <=>  c.r > (|r|^2 + |c|^2 - dist) / 2
      if (!qg_detail::occluded(cf, kbuf.data(), khalf.data(), static_cast<int64_t>(kept.size()), half, d)) {
        std::copy(cf, cf + d, kbuf.data() + kept.size() * static_cast<size_t>(d));
        khalf[kept.size()] = 0.5f * sq_[e.id];
        kept.push_back(e.id);
      }
    }
    // MIPS edges: the rest of the budget goes to the candidates with the largest p.c (those further out in
    // p's direction). L2-RNG alone cuts the edges towards large-norm keys, which MIPS answers are made of.
    if (static_cast<int64_t>(kept.size()) < max_keep && kept.size() < scored.size()) {
      // largest p.c first, as 64-bit keys (order-preserving bits of -ip, then position); the first max_keep
      // hold every pick (at most kept.size() of them are kept already)
      const size_t top = std::min(scored.size(), static_cast<size_t>(max_keep));
      for (size_t i = 0; i < scored.size(); ++i) {
        uint32_t bits;
        const float neg = -scored[i].ip;
        std::memcpy(&bits, &neg, sizeof(bits));
        bits = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
        order[i] = (static_cast<uint64_t>(bits) << 32) | static_cast<uint64_t>(i);
        vals[i] = neg;
      }
      qg_detail::smallest_sorted(order, vals.data(), top, sort_tmp, sort_count);
      for (size_t i = 0; i < top && static_cast<int64_t>(kept.size()) < max_keep; ++i) {
        const uint32_t id = scored[static_cast<size_t>(order[i] & 0xffffffffu)].id;
        if (std::find(kept.begin(), kept.end(), id) == kept.end()) kept.push_back(id);
      }
    }
    out.assign(kept.begin(), kept.end());
  }

  void set_row(uint32_t i, const std::vector<uint32_t>& nb) {
    uint32_t* row = adj_.data() + static_cast<int64_t>(i) * stride_;
    const size_t cnt = std::min<size_t>(nb.size(), static_cast<size_t>(stride_ - 1));
    row[0] = static_cast<uint32_t>(cnt);
    std::copy(nb.begin(), nb.begin() + static_cast<std::ptrdiff_t>(cnt), row + 1);
  }

  // Adds the edges (src -> dst) of `edges`; rows that overflow `degree` are re-pruned. Parallel by source.
  template <class R>
  void add_edges(const R* base, std::vector<std::pair<uint32_t, uint32_t>>& edges) {
    // group the edges by source: a counting sort when there are many (O(E + n)), else a comparison sort
    // (one-row inserts must not pay O(n)); within a source the destinations keep their order in `edges`
    std::vector<size_t> starts;
    std::vector<uint32_t> dsts;
    std::vector<uint32_t> srcs;
    if (static_cast<int64_t>(edges.size()) * 4 >= n_) {
      std::vector<uint32_t> count(static_cast<size_t>(n_) + 1, 0u);
      for (const auto& e : edges) count[e.first + 1]++;
      for (int64_t i = 0; i < n_; ++i) count[static_cast<size_t>(i) + 1] += count[static_cast<size_t>(i)];
      dsts.resize(edges.size());
      std::vector<uint32_t> fill(count.begin(), count.end() - 1);
      for (const auto& e : edges) dsts[fill[e.first]++] = e.second;
      for (int64_t i = 0; i < n_; ++i)
        if (count[static_cast<size_t>(i) + 1] > count[static_cast<size_t>(i)]) {
          srcs.push_back(static_cast<uint32_t>(i));
          starts.push_back(count[static_cast<size_t>(i)]);
        }
    } else {
      std::sort(edges.begin(), edges.end());
      dsts.resize(edges.size());
      for (size_t i = 0; i < edges.size(); ++i) {
        dsts[i] = edges[i].second;
        if (i == 0 || edges[i].first != edges[i - 1].first) srcs.push_back(edges[i].first), starts.push_back(i);
      }
    }
    starts.push_back(edges.size());
    parallel_for(static_cast<int64_t>(srcs.size()), [&](int64_t g) {
      thread_local std::vector<uint32_t> cand, out, seen;
      thread_local uint32_t epoch = 0;
      if (seen.size() < static_cast<size_t>(n_)) seen.assign(static_cast<size_t>(n_), 0u), epoch = 0;
      if (++epoch == 0) std::fill(seen.begin(), seen.end(), 0u), epoch = 1;
      const uint32_t src = srcs[static_cast<size_t>(g)];
      const uint32_t* row = adj_.data() + static_cast<int64_t>(src) * stride_;
      cand.assign(row + 1, row + 1 + row[0]);
      seen[src] = epoch;
      for (uint32_t c : cand) seen[c] = epoch;
      for (size_t e = starts[static_cast<size_t>(g)]; e < starts[static_cast<size_t>(g) + 1]; ++e) {
        const uint32_t dst = dsts[e];
        if (seen[dst] != epoch) seen[dst] = epoch, cand.push_back(dst);
      }
      if (static_cast<int64_t>(cand.size()) > p_.degree) {
        prune(base, src, cand, p_.degree, out);
        set_row(src, out);
      } else {
        set_row(src, cand);
      }
    });
  }

  // Links keys `order` to the union of their current out-edges and their given neighbour lists (lists: n x kk,
  // -1 = padding), all at once (no search, so no key waits for another), then adds n_rev reverse edges per key, from
  // the first n_rev entries of its new list. A union that fits the degree is taken as it is, the given list first
  // (nearest first), and no candidate row is read: weak keys have fewer than degree/2 out-edges, so with lists of up to
  // degree/2 keys every union fits. Pruning such a union kept every candidate and only reordered them; without it the
  // weak-key phase took a third of the time for equal recall (benchmarks/RESULTS.md, thirteenth session). A longer
  // union is pruned.
  template <class R>
  void link_from_lists(const R* base, const std::vector<uint32_t>& order, const int64_t* lists_in, int64_t kk, int64_t n_rev) {
    std::vector<std::vector<uint32_t>> lists(order.size());
    const int64_t n_order = static_cast<int64_t>(order.size());
    const auto may_prune = [&](uint32_t x) { return adj_[static_cast<size_t>(x) * static_cast<size_t>(stride_)] + kk > p_.degree; };
    // Prefetches the rows of key x's candidates (its out-edges and its given list) and their squared norms when x may
    // be pruned. The keys go to the threads in blocks, and each key's candidates load while the key before it is
    // pruned: on a host running 8 builds at once the phase waits on memory latency (10-16% less time per phase on the
    // H200 host; benchmarks/RESULTS.md).
    auto prefetch_candidates = [&](uint32_t x) {
      if (!may_prune(x)) return;
      const uint32_t* row = adj_.data() + static_cast<int64_t>(x) * stride_;
      for (uint32_t j = 1; j <= row[0]; ++j) prefetch_key(base, row[j]);
      const int64_t* given = lists_in + static_cast<int64_t>(x) * kk;
      for (int64_t j = 0; j < kk; ++j)
        if (given[j] >= 0) prefetch_key(base, given[j]);
    };
    const int64_t blk = 32;
    parallel_for((n_order + blk - 1) / blk, [&](int64_t c) {
      thread_local std::vector<uint32_t> cand;
      const int64_t hi = std::min(n_order, (c + 1) * blk);
      for (int64_t b = c * blk; b < hi; ++b) {
        if (b + 1 < hi) prefetch_candidates(order[static_cast<size_t>(b) + 1]);
        const uint32_t x = order[static_cast<size_t>(b)];
        const uint32_t* row = adj_.data() + static_cast<int64_t>(x) * stride_;
        const int64_t* given = lists_in + static_cast<int64_t>(x) * kk;
        std::vector<uint32_t>& out = lists[static_cast<size_t>(b)];
        const auto add = [&](uint32_t v) {
          if (v != x && std::find(out.begin(), out.end(), v) == out.end()) out.push_back(v);
        };
        for (int64_t j = 0; j < kk; ++j)
          if (given[j] >= 0) add(static_cast<uint32_t>(given[j]));
        for (uint32_t j = 1; j <= row[0]; ++j) add(row[j]);
        if (static_cast<int64_t>(out.size()) <= p_.degree) continue;
        cand.assign(out.begin(), out.end());
        prune(base, x, cand, p_.degree, out);
      }
    });
    std::vector<std::pair<uint32_t, uint32_t>> edges;
    for (size_t b = 0; b < order.size(); ++b) {
      set_row(order[b], lists[b]);
      for (size_t r = 0; r < lists[b].size() && static_cast<int64_t>(r) < n_rev; ++r) edges.emplace_back(lists[b][r], order[b]);
    }
    add_edges(base, edges);
  }

  // Inserts keys `order` (already counted in n_) in batches: each batch searches the graph as it stood
  // before the batch (read-only, in parallel), sets the new keys' pruned lists, then adds reverse edges.
  // Batches grow with the graph so a batch never outnumbers the keys it can link to.
  template <class R>
  // ef: beam (0: ef_build); n_rev: reverse edges per inserted key, to its nearest kept neighbours (0: all);
  // hubs (optional): each search also starts from the kWeakSeeds hubs nearest to the key.
  void insert_batched(const R* base, const std::vector<uint32_t>& order, bool guarantee_in_edge, int64_t ef = 0, int64_t n_rev = 0,
                      const HubSet* hubs = nullptr) {
    const int64_t d = keys_->dim();
    if (ef <= 0) ef = p_.ef_build;
    std::vector<std::vector<uint32_t>> lists;
    std::vector<std::pair<uint32_t, uint32_t>> edges;
    std::vector<Cand> seeds;  // with hubs: kWeakSeeds nearest hubs per key of the batch
    std::vector<int64_t> n_seeds;
    std::vector<uint32_t> perm;
    size_t done = 0;
    int64_t linked = std::max<int64_t>(1, n_ - static_cast<int64_t>(order.size()));
    while (done < order.size()) {
      const size_t batch = std::min(order.size() - done, static_cast<size_t>(std::clamp<int64_t>(linked / 2, 1, 4096)));
      lists.assign(batch, {});
      // With hubs, the batch's keys are searched grouped by their nearest hub, so that consecutive searches on a
      // thread walk the same part of the graph while it is still in cache. Each search reads the graph as it
      // stood before the batch, so the order changes nothing but the speed.
      if (hubs) {
        seeds.resize(batch * kWeakSeeds);
        n_seeds.resize(batch);
        perm.resize(batch);
        parallel_for(static_cast<int64_t>(batch), [&](int64_t b) {
          thread_local std::vector<float> xbuf;
          thread_local std::vector<Cand> sd;
          const float* xf = row_f(base, order[done + static_cast<size_t>(b)], xbuf);
          const int64_t ns = hubs->nearest(xf, kWeakSeeds, sd);
          std::copy(sd.begin(), sd.begin() + ns, seeds.begin() + b * kWeakSeeds);
          n_seeds[static_cast<size_t>(b)] = ns;
        }, false);
        std::iota(perm.begin(), perm.end(), 0u);
        std::stable_sort(perm.begin(), perm.end(), [&](uint32_t a, uint32_t b) {
          const uint32_t ha = n_seeds[a] ? seeds[a * kWeakSeeds].id : 0u, hb = n_seeds[b] ? seeds[b * kWeakSeeds].id : 0u;
          return ha < hb;
        });
      }
      parallel_for(static_cast<int64_t>(batch), [&](int64_t i) {
        const int64_t b = hubs ? static_cast<int64_t>(perm[static_cast<size_t>(i)]) : i;
        Scratch& s = scratch();
        const uint32_t x = order[done + static_cast<size_t>(b)];
        thread_local std::vector<float> xbuf;
        thread_local std::vector<uint32_t> cand;
        const float* xf = row_f(base, x, xbuf);
        s.qf.assign(xf, xf + d);  // the search may reuse row_f's buffer through prune, so copy the query
        const Cand* sd = hubs ? seeds.data() + b * kWeakSeeds : nullptr;
        const int64_t ns = hubs ? n_seeds[static_cast<size_t>(b)] : 0;
        beam_search(base, s.qf.data(), ef, s, /*l2=*/true, sd, ns);
        const uint32_t* row = adj_.data() + static_cast<int64_t>(x) * stride_;
        cand.assign(row + 1, row + 1 + row[0]);
        for (const Cand& c : s.beam) cand.push_back(c.id);
        prune(base, x, cand, p_.degree, lists[static_cast<size_t>(b)]);
      });
      edges.clear();
      for (size_t b = 0; b < batch; ++b) {
        const uint32_t x = order[done + b];
        set_row(x, lists[b]);
        size_t nr = 0;
        for (uint32_t y : lists[b]) {
          if (n_rev > 0 && nr++ >= static_cast<size_t>(n_rev)) break;
          edges.emplace_back(y, x);
        }
      }
      add_edges(base, edges);
      if (guarantee_in_edge) {
        // a new key whose reverse edges were all pruned away gets one slack edge from its nearest neighbour
        for (size_t b = 0; b < batch; ++b) {
          const uint32_t x = order[done + b];
          bool has_in = false;
          for (uint32_t y : lists[b]) {
            const uint32_t* row = adj_.data() + static_cast<int64_t>(y) * stride_;
            if (std::find(row + 1, row + 1 + row[0], x) != row + 1 + row[0]) {
              has_in = true;
              break;
            }
          }
          if (has_in) continue;
          for (uint32_t y : lists[b]) {
            uint32_t* row = adj_.data() + static_cast<int64_t>(y) * stride_;
            if (row[0] < static_cast<uint32_t>(stride_ - 1)) {
              row[1 + row[0]++] = x;
              break;
            }
          }
        }
      }
      done += batch;
      linked += static_cast<int64_t>(batch);
    }
  }

  int64_t bfs_mark(std::vector<uint8_t>& seen) const {
    seen.assign(static_cast<size_t>(n_), 0);
    if (n_ == 0) return 0;
    std::vector<uint32_t> stack = {static_cast<uint32_t>(entry_)};
    seen[static_cast<size_t>(entry_)] = 1;
    return 1 + bfs_from(stack, seen);
  }
  int64_t bfs_from(std::vector<uint32_t>& stack, std::vector<uint8_t>& seen) const {
    int64_t count = 0;
    while (!stack.empty()) {
      const uint32_t u = stack.back();
      stack.pop_back();
      const uint32_t* row = adj_.data() + static_cast<int64_t>(u) * stride_;
      for (uint32_t j = 1; j <= row[0]; ++j)
        if (!seen[row[j]]) {
          seen[row[j]] = 1;
          ++count;
          stack.push_back(row[j]);
          prefetch_bytes(adj_.data() + static_cast<int64_t>(row[j]) * stride_, 64);  // read when popped, soon (LIFO)
        }
    }
    return count;
  }

  template <class R>
  void repair_with(const R* base) {
    repaired_at_ = n_;
    if (n_ == 0) return;
    const int64_t d = keys_->dim();
    std::vector<uint8_t> seen;
    int64_t reached = bfs_mark(seen);
    if (reached == n_) return;
    Scratch& s = scratch();
    std::vector<float> xbuf;
    std::vector<uint32_t> stack;
    for (int64_t x = 0; x < n_ && reached < n_; ++x) {
      if (seen[static_cast<size_t>(x)]) continue;
      const float* xf = row_f(base, x, xbuf);
      s.qf.assign(xf, xf + d);
      beam_search(base, s.qf.data(), p_.ef_build, s, /*l2=*/true);  // only reaches reached keys
      int64_t from = -1;
      for (const Cand& c : s.beam)
        if (adj_[static_cast<size_t>(c.id * stride_)] < static_cast<uint32_t>(stride_ - 1)) {
          from = c.id;
          break;
        }
      for (int64_t y = 0; from < 0 && y < n_; ++y)  // rare: every key the search found is full
        if (seen[static_cast<size_t>(y)] && adj_[static_cast<size_t>(y * stride_)] < static_cast<uint32_t>(stride_ - 1)) from = y;
      if (from < 0) from = entry_;  // cannot happen while any reached key has a free slot; overwrite one
      uint32_t* row = adj_.data() + from * stride_;
      if (row[0] < static_cast<uint32_t>(stride_ - 1)) row[0]++;
      row[row[0]] = static_cast<uint32_t>(x);
      seen[static_cast<size_t>(x)] = 1;
      stack.assign(1, static_cast<uint32_t>(x));
      reached += 1 + bfs_from(stack, seen);
    }
    // an overwrite in the fallback above could in principle cut something off; verify
    if (bfs_mark(seen) != n_) repair_with(base);
  }

  // Keys with few in-edges are hard to reach: give each key up to min_in in-edges from its own out-neighbours
  // (which are near it), taking a free slot or replacing that neighbour's edge to its most popular target.
  void balance_in_degree() {
    const int32_t min_in = static_cast<int32_t>(p_.degree / 2);
    std::vector<int32_t> indeg(static_cast<size_t>(n_), 0);
    for (int64_t i = 0; i < n_; ++i)
      for (int64_t j = 0; j < out_degree(i); ++j) indeg[neighbors(i)[j]]++;
    const int32_t hub = static_cast<int32_t>(2 * p_.degree);
    // The pass is serial (each change moves the in-degrees the next keys see) and waits on the rows of x's
    // out-neighbours, read at random: those of the key kAhead places on load while x is handled.
    constexpr int64_t kAhead = 4;
    const int64_t row_bytes = stride_ * static_cast<int64_t>(sizeof(uint32_t)) + 63;
    auto prefetch_targets = [&](int64_t x) {
      if (x >= n_ || indeg[static_cast<size_t>(x)] >= min_in) return;
      for (int64_t j = 0; j < out_degree(x); ++j) prefetch_bytes(adj_.data() + static_cast<int64_t>(neighbors(x)[j]) * stride_, row_bytes);
    };
    // A full row that holds no hub (in-degree >= hub) never will: in-degrees only grow for keys below min_in, which
    // stop at min_in < hub, and a row only gains such keys. So a row scanned without finding one is not scanned again
    // (two thirds of the full-row scans with stride-2 key lists; the same graph).
    std::vector<uint8_t> no_hub(static_cast<size_t>(n_), 0);
    std::vector<uint32_t> outs;
    for (int64_t x = 0; x < n_; ++x) {
      prefetch_targets(x + kAhead);
      if (indeg[static_cast<size_t>(x)] >= min_in) continue;
      outs.assign(neighbors(x), neighbors(x) + out_degree(x));
      for (uint32_t y : outs) {
        if (indeg[static_cast<size_t>(x)] >= min_in) break;
        uint32_t* row = adj_.data() + static_cast<int64_t>(y) * stride_;
        if (std::find(row + 1, row + 1 + row[0], static_cast<uint32_t>(x)) != row + 1 + row[0]) continue;
        if (row[0] < static_cast<uint32_t>(p_.degree)) {
          row[1 + row[0]++] = static_cast<uint32_t>(x);
          indeg[static_cast<size_t>(x)]++;
          continue;
        }
        if (no_hub[y]) continue;
        uint32_t best = 0;
        int32_t best_in = hub - 1;
        for (uint32_t j = 1; j <= row[0]; ++j)
          if (indeg[row[j]] > best_in) best_in = indeg[row[j]], best = j;
        if (best == 0) {
          no_hub[y] = 1;
          continue;
        }
        indeg[row[best]]--;
        row[best] = static_cast<uint32_t>(x);
        indeg[static_cast<size_t>(x)]++;
      }
    }
  }

  void build_graph(const float* train_queries, int64_t m, const int64_t* knn, int64_t kk, const int64_t* key_knn = nullptr,
                   int64_t key_knn_k = 0, const int32_t* projection = nullptr) {
    const int64_t n = keys_->size(), d = keys_->dim();
    require(n < static_cast<int64_t>(std::numeric_limits<uint32_t>::max()), "query_guided: too many keys for 32-bit ids");
    if (n == 0) return;
    qg_detail::PhaseTimer timer;
    grow(n);
    // The build reads the stored rows in place. A float32 copy gave the same graph (16-bit rows widen exactly) for
    // 4 more bytes per dimension per key and twice the bytes per random row read, and was not faster (128K bf16
    // keys, 2 threads: 1.22 s with the copy, 1.17 s without).
    const T* base = keys_->data();
    // entry point: the key scoring best against the mean training query (the largest norm without queries)
    std::vector<float> mean(static_cast<size_t>(d), 0.f);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t c = 0; c < d; ++c) mean[static_cast<size_t>(c)] += train_queries[i * d + c] / static_cast<float>(m);
    // the first key of the largest score: each block's first best, then the blocks in order
    constexpr int64_t kBlock = 4096;
    const int64_t blocks = (n + kBlock - 1) / kBlock;
    std::vector<std::pair<float, int64_t>> block_best(static_cast<size_t>(blocks), {-std::numeric_limits<float>::infinity(), 0});
    parallel_for(blocks, [&](int64_t b) {
      auto& [best, at] = block_best[static_cast<size_t>(b)];
      at = b * kBlock;
      for (int64_t i = b * kBlock; i < std::min(n, (b + 1) * kBlock); ++i) {
        const float s = m > 0 ? qg_detail::dot(mean.data(), base + i * d, d) : sq_[static_cast<size_t>(i)];
        if (s > best) best = s, at = i;
      }
    });
    entry_ = 0;
    float best = -std::numeric_limits<float>::infinity();
    for (const auto& [s, at] : block_best)
      if (s > best) best = s, entry_ = at;

    timer.lap("prep");
    std::vector<std::pair<uint32_t, uint32_t>> edges;
    if (projection) {
      std::vector<uint32_t> row;
      for (int64_t p = 0; p < n; ++p) {
        row.clear();
        for (int64_t j = 0; j < p_.degree; ++j)
          if (projection[p * p_.degree + j] >= 0) row.push_back(static_cast<uint32_t>(projection[p * p_.degree + j]));
        set_row(static_cast<uint32_t>(p), row);
        for (uint32_t c : row) edges.emplace_back(c, static_cast<uint32_t>(p));
      }
    } else {
      project(base, m, knn, kk, edges);
    }
    timer.lap("project");
    add_edges(base, edges);  // reverse edges, re-pruned where a list overflows
    timer.lap("reverse");
    finish_build(base, key_knn, key_knn_k);
  }

  // The projection: each training query's nearest n_pivots keys (pivots) get the query's other neighbours as candidates,
  // pruned (prune()); sets those rows and appends each kept edge p -> c to `edges` as (c, p), for the reverse edges.
  void project(const T* base, int64_t m, const int64_t* knn, int64_t kk, std::vector<std::pair<uint32_t, uint32_t>>& edges) {
    const int64_t n = keys_->size();
    // Inverted lists (CSR): for key p, the training queries that have p among their first pivots.
    const int64_t n_piv = p_.n_pivots;
    std::vector<int64_t> first(static_cast<size_t>(m), kk);
    std::vector<uint32_t> inv_start(static_cast<size_t>(n) + 1, 0u), inv;
    for (int64_t i = 0; i < m; ++i) {
      const int64_t* row = knn + i * kk;
      int64_t j = 0;
      while (j < kk && row[j] < 0) ++j;
      first[static_cast<size_t>(i)] = j;
      for (int64_t r = j; r < std::min(kk, j + n_piv); ++r)
        if (row[r] >= 0) inv_start[static_cast<size_t>(row[r]) + 1]++;
    }
    for (int64_t p = 0; p < n; ++p) inv_start[static_cast<size_t>(p) + 1] += inv_start[static_cast<size_t>(p)];
    inv.resize(inv_start[static_cast<size_t>(n)]);
    {
      std::vector<uint32_t> fill(inv_start.begin(), inv_start.end() - 1);
      for (int64_t i = 0; i < m; ++i) {
        const int64_t* row = knn + i * kk;
        const int64_t j = first[static_cast<size_t>(i)];
        for (int64_t r = j; r < std::min(kk, j + n_piv); ++r)
          if (row[r] >= 0) inv[fill[static_cast<size_t>(row[r])]++] = static_cast<uint32_t>(i);
      }
    }
    {
      std::vector<std::vector<uint32_t>> lists(static_cast<size_t>(n));
      // key p's candidates: the other neighbours of the training queries that have p among their pivots
      auto gather = [&](int64_t p, std::vector<uint32_t>& pl) {
        pl.clear();
        for (uint32_t e = inv_start[static_cast<size_t>(p)]; e < inv_start[static_cast<size_t>(p) + 1]; ++e) {
          const int64_t i = inv[e];
          const int64_t* row = knn + i * kk;
          for (int64_t t = first[static_cast<size_t>(i)]; t < kk; ++t)
            if (row[t] >= 0 && row[t] != p) pl.push_back(static_cast<uint32_t>(row[t]));
        }
      };
      // As in link_from_lists: threads take blocks of keys, and the next key's candidates (the first 64) load while
      // this key is pruned.
      const int64_t blk = 32;
      parallel_for((n + blk - 1) / blk, [&](int64_t c) {
        thread_local std::vector<uint32_t> pl, next;
        const int64_t hi = std::min(n, (c + 1) * blk);
        gather(c * blk, pl);
        for (int64_t p = c * blk; p < hi; ++p) {
          if (p + 1 < hi) {
            gather(p + 1, next);
            for (size_t j = 0; j < std::min<size_t>(next.size(), 64); ++j) prefetch_key(base, next[j]);
          }
          if (!pl.empty()) prune(base, static_cast<uint32_t>(p), pl, p_.degree, lists[static_cast<size_t>(p)]);
          pl.swap(next);
        }
      });
      for (int64_t p = 0; p < n; ++p) {
        set_row(static_cast<uint32_t>(p), lists[static_cast<size_t>(p)]);
        for (uint32_t c : lists[static_cast<size_t>(p)]) edges.emplace_back(c, static_cast<uint32_t>(p));
      }
    }
  }

  // Weak keys, in-degree balancing, connectivity: the build's phases after the reverse edges.
  void finish_build(const T* base, const int64_t* key_knn, int64_t key_knn_k) {
    const int64_t n = keys_->size(), d = keys_->dim();
    qg_detail::PhaseTimer timer;
    // keys the projection left with few out-edges (untouched by the training queries) link to keys found
    // by searching the graph for themselves; without this many keys are unreachable and recall stalls
    std::vector<uint32_t> weak;
    for (int64_t i = 0; i < n; ++i)
      if (out_degree(i) < p_.degree / 2 && i != entry_) weak.push_back(static_cast<uint32_t>(i));
    std::mt19937_64 rng(p_.seed);
    // hubs: a random sample of the keys the projection linked well
    HubSet hubs;
    {
      std::vector<uint32_t> strong;
      for (int64_t i = 0; i < n; ++i)
        if (out_degree(i) >= p_.degree / 2) strong.push_back(static_cast<uint32_t>(i));
      std::shuffle(strong.begin(), strong.end(), rng);
      strong.resize(std::min<size_t>(strong.size(), static_cast<size_t>(kHubs)));
      hubs.d = d;
      hubs.ids = strong;
      hubs.rows.resize(strong.size() * static_cast<size_t>(d));
      hubs.half_sq.resize(strong.size());
      for (size_t h = 0; h < strong.size(); ++h) {
        for (int64_t c = 0; c < d; ++c) hubs.rows[h * static_cast<size_t>(d) + static_cast<size_t>(c)] = to_float(base[static_cast<int64_t>(strong[h]) * d + c]);
        hubs.half_sq[h] = 0.5f * sq_[strong[h]];
      }
    }
    std::shuffle(weak.begin(), weak.end(), rng);
    if (key_knn)
      link_from_lists(base, weak, key_knn, key_knn_k, kWeakReverse);
    else
      insert_batched(base, weak, /*guarantee_in_edge=*/false, p_.ef_weak, kWeakReverse, hubs.ids.empty() ? nullptr : &hubs);
    timer.lap("weak", static_cast<long>(weak.size()));
    balance_in_degree();
    timer.lap("balance");
    repair_with(base);
    timer.lap("repair");
  }


  std::shared_ptr<const VectorStore<T>> keys_;
  QueryGuidedParams p_;
  int64_t stride_ = 0;
  int64_t n_ = 0;
  int64_t entry_ = -1;
  int64_t repaired_at_ = 0;
  HugePageVector<uint32_t> adj_;  // n x stride: [count, ids...]; read at random by searches
  std::vector<float> sq_;      // squared key norms (pruning geometry); recomputed on load
};

}  // namespace retrieval_attention
