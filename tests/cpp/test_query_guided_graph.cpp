// QueryGuidedGraph: recall against FlatIndex on seeded out-of-distribution data, reachability of every
// key, incremental insert (also from an empty graph), persistence and corrupt payloads, concurrent search,
// and all three storage types.
#include <catch2/catch.hpp>

#include <cstdio>
#include <cstring>
#include <thread>

#include "reference.h"
#include "retrieval_attention/flat_index.h"
#include "retrieval_attention/query_guided_graph.h"

using namespace retrieval_attention;
using ra_test::random_matrix;

namespace {

// Keys: anisotropic Gaussian around a shared offset. Queries: a different distribution (other offset,
// other scales, larger norm), so query->key search is out of distribution as with attention Q/K.
struct OodData {
  int64_t n, d;
  std::vector<float> keys, train, test;
};

OodData make_ood(int64_t n, int64_t d, int64_t m_train, int64_t m_test, uint32_t seed) {
  OodData o{n, d, random_matrix(n, d, seed), random_matrix(m_train, d, seed + 1), random_matrix(m_test, d, seed + 2)};
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < d; ++c) {
      float& x = o.keys[static_cast<size_t>(i * d + c)];
      x = x * (0.3f + 1.5f * float(c % 4) / 3.f) + (c < d / 2 ? 1.0f : -0.5f);
    }
  for (auto* q : {&o.train, &o.test})
    for (size_t i = 0; i < q->size(); ++i) {
      const int64_t c = static_cast<int64_t>(i) % d;
      (*q)[i] = 2.5f * (*q)[i] * (c % 3 == 0 ? 1.5f : 0.5f) + (c % 2 ? 2.0f : -1.0f);
    }
  return o;
}

template <class T>
std::shared_ptr<VectorStore<T>> make_store(const std::vector<float>& rows, int64_t d) {
  auto store = std::make_shared<VectorStore<T>>(d);
  auto conv = ra_test::convert<T>(rows);
  store->append(conv.data(), static_cast<int64_t>(rows.size()) / d);
  return store;
}

struct RecallStats {
  double recall = 0, visited_frac = 0;
};

template <class T>
RecallStats measure(const KeyIndex<T>& g, const KeyIndex<T>& flat, const std::vector<float>& queries, int64_t d, int64_t k, int64_t ef) {
  const int64_t m = static_cast<int64_t>(queries.size()) / d;
  std::vector<int64_t> ids(k), gt(k);
  std::vector<float> sc(k);
  RecallStats r;
  for (int64_t i = 0; i < m; ++i) {
    flat.search_one(queries.data() + i * d, k, {}, gt.data(), sc.data());
    r.visited_frac += double(g.search_one(queries.data() + i * d, k, SearchParams{ef}, ids.data(), sc.data())) / g.size();
    for (int64_t j = 1; j < k; ++j) REQUIRE(sc[j] <= sc[j - 1]);
    std::sort(gt.begin(), gt.end());
    for (auto id : ids) r.recall += std::binary_search(gt.begin(), gt.end(), id) ? 1.0 / k : 0.0;
  }
  r.recall /= m;
  r.visited_frac /= m;
  return r;
}

}  // namespace

TEMPLATE_TEST_CASE("query-guided graph: recall on out-of-distribution queries, every key reachable", "[query_guided]", float, Half, BFloat16) {
  const int64_t n = 4000, d = 32;
  auto data = make_ood(n, d, 800, 60, 11);
  auto store = make_store<TestType>(data.keys, d);
  QueryGuidedParams p;
  p.degree = 24;
  p.k_train = 50;
  auto g = QueryGuidedGraph<TestType>::build(store, data.train.data(), 800, p);
  FlatIndex<TestType> flat(store);
  REQUIRE(g->size() == n);
  CHECK(g->type_name() == "query_guided");
  CHECK(g->reachable_count() == n);
  CHECK(g->structure_bytes() >= n * (p.degree + 1) * 4);
  for (int64_t i = 0; i < n; ++i) {
    REQUIRE(g->out_degree(i) <= g->max_degree());
    // multi-pivot projection and in-degree balancing never add self-loops or duplicate edges
    std::vector<uint32_t> nb(g->neighbors(i), g->neighbors(i) + g->out_degree(i));
    REQUIRE(std::find(nb.begin(), nb.end(), static_cast<uint32_t>(i)) == nb.end());
    std::sort(nb.begin(), nb.end());
    REQUIRE(std::adjacent_find(nb.begin(), nb.end()) == nb.end());
  }
  const RecallStats r = measure(*g, flat, data.test, d, 10, 64);
  INFO("recall@10 " << r.recall << " visited " << r.visited_frac);
  CHECK(r.recall >= 0.9);
  CHECK(r.visited_frac < 0.4);
  // a wider beam never hurts much and reaches near-exact recall
  const RecallStats wide = measure(*g, flat, data.test, d, 10, 400);
  CHECK(wide.recall >= 0.98);
}

TEST_CASE("query-guided graph: connectivity without and with few training queries, on clustered keys", "[query_guided]") {
  const int64_t d = 16, n_per = 300, clusters = 5, n = n_per * clusters;
  // far-apart clusters with very different norms: the case where untouched keys become unreachable
  auto keys = random_matrix(n, d, 5, 0.2f);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = i / n_per;
    keys[static_cast<size_t>(i * d + c)] += 4.f * float(c + 1);
  }
  auto store = make_store<float>(keys, d);
  FlatIndex<float> flat(store);
  for (int64_t m : {0, 1, 3}) {
    auto train = random_matrix(std::max<int64_t>(m, 1), d, 6);
    for (int64_t i = 0; i < m; ++i) train[static_cast<size_t>(i * d)] += 10.f;  // all of them point at cluster 0
    QueryGuidedParams p;
    p.degree = 12;
    p.k_train = 20;
    auto g = QueryGuidedGraph<float>::build(store, train.data(), m, p);
    INFO("m = " << m);
    CHECK(g->reachable_count() == n);
    CHECK(g->is_connected());
    // a beam as wide as the store must see every key, so the search is exact (it would not be if any key
    // were unreachable); queries aimed at each cluster
    auto q = random_matrix(clusters * 4, d, 7, 0.2f);
    for (int64_t i = 0; i < clusters * 4; ++i) q[static_cast<size_t>(i * d + i % clusters)] += 5.f;
    CHECK(measure(*g, flat, q, d, 10, n).recall == Approx(1.0));
  }
}

TEST_CASE("query-guided graph: tiny stores, padding and bad input", "[query_guided]") {
  const int64_t d = 8;
  auto rows = random_matrix(3, d, 1);
  auto store = make_store<float>(rows, d);
  auto train = random_matrix(4, d, 2);
  auto g = QueryGuidedGraph<float>::build(store, train.data(), 4);  // k_train 100 > n is clamped
  CHECK(g->is_connected());
  std::vector<int64_t> ids(5);
  std::vector<float> sc(5);
  CHECK(g->search_one(train.data(), 5, {}, ids.data(), sc.data()) == 3);
  std::vector<int64_t> sorted(ids.begin(), ids.begin() + 3);
  std::sort(sorted.begin(), sorted.end());
  CHECK(sorted == std::vector<int64_t>{0, 1, 2});
  CHECK(ids[3] == -1);
  CHECK(ids[4] == -1);
  CHECK(std::isinf(sc[4]));
  CHECK_THROWS_AS(g->search_one(train.data(), 0, {}, ids.data(), sc.data()), std::invalid_argument);
  CHECK_THROWS_AS(g->search_one(train.data(), 1, SearchParams{0}, ids.data(), sc.data()), std::invalid_argument);

  // an empty store builds an empty graph that searches to padding
  auto empty = std::make_shared<VectorStore<float>>(d);
  auto ge = QueryGuidedGraph<float>::build(empty, train.data(), 4);
  CHECK(ge->size() == 0);
  CHECK(ge->search_one(train.data(), 2, {}, ids.data(), sc.data()) == 0);
  CHECK(ids[0] == -1);

  QueryGuidedParams bad;
  bad.degree = 1;
  CHECK_THROWS_AS(QueryGuidedGraph<float>::build(store, train.data(), 4, bad), std::invalid_argument);
  bad = {};
  bad.k_train = 0;
  CHECK_THROWS_AS(QueryGuidedGraph<float>::build(store, train.data(), 4, bad), std::invalid_argument);
  bad = {};
  bad.ef_build = 0;
  CHECK_THROWS_AS(QueryGuidedGraph<float>::build(store, train.data(), 4, bad), std::invalid_argument);
  auto nan_train = train;
  nan_train[3] = NAN;
  CHECK_THROWS_AS(QueryGuidedGraph<float>::build(store, nan_train.data(), 4), std::invalid_argument);
  std::vector<int64_t> knn = {0, 1, -1, 2, 3, 0, 1, 2};  // id 3 is out of range for 3 keys
  CHECK_THROWS_AS(QueryGuidedGraph<float>::build_from_neighbors(store, train.data(), 4, knn.data(), 2), std::invalid_argument);
}

TEST_CASE("query-guided graph: given projection lists are checked and replace the projection", "[query_guided]") {
  const int64_t n = 400, d = 16, m = 60;
  auto data = make_ood(n, d, m, 4, 23);
  auto store = make_store<float>(data.keys, d);
  QueryGuidedParams p;
  p.degree = 8;
  p.k_train = 20;
  std::vector<int64_t> knn(m * p.k_train);
  exact_topk(data.train.data(), m, *store, n, p.k_train, knn.data(), nullptr);
  // no projected edges at all: the graph still links every key (weak keys, balance, repair)
  std::vector<int32_t> none(n * p.degree, -1);
  auto g = QueryGuidedGraph<float>::build_from_neighbors(store, data.train.data(), m, knn.data(), p.k_train, p, nullptr, 0, none.data(), p.degree);
  CHECK(g->is_connected());
  auto expect_bad = [&](std::vector<int32_t> proj, int64_t k) {
    CHECK_THROWS_AS(QueryGuidedGraph<float>::build_from_neighbors(store, data.train.data(), m, knn.data(), p.k_train, p, nullptr, 0, proj.data(), k),
                    std::invalid_argument);
  };
  auto bad = none;
  bad[5 * p.degree] = 5;  // self-loop
  expect_bad(bad, p.degree);
  bad = none;
  bad[5 * p.degree] = static_cast<int32_t>(n);  // out of range
  expect_bad(bad, p.degree);
  bad = none;
  bad[5 * p.degree] = 7, bad[5 * p.degree + 3] = 7;  // repeated within a row
  expect_bad(bad, p.degree);
  expect_bad(none, p.degree - 1);  // not n x degree
}

TEST_CASE("query-guided graph: precomputed neighbour lists give the same graph as the built-in kNN", "[query_guided]") {
  const int64_t n = 1500, d = 24, m = 300;
  auto data = make_ood(n, d, m, 20, 21);
  auto store = make_store<float>(data.keys, d);
  QueryGuidedParams p;
  p.degree = 16;
  p.k_train = 30;
  auto a = QueryGuidedGraph<float>::build(store, data.train.data(), m, p);
  std::vector<int64_t> knn(m * p.k_train);
  exact_topk(data.train.data(), m, *store, n, p.k_train, knn.data(), nullptr);
  auto b = QueryGuidedGraph<float>::build_from_neighbors(store, data.train.data(), m, knn.data(), p.k_train, p);
  REQUIRE(a->entry_point() == b->entry_point());
  for (int64_t i = 0; i < n; ++i) {
    REQUIRE(a->out_degree(i) == b->out_degree(i));
    REQUIRE(std::equal(a->neighbors(i), a->neighbors(i) + a->out_degree(i), b->neighbors(i)));
  }
}

// Each key's kk nearest other keys in L2 (n x kk, nearest first), by brute force.
static std::vector<int64_t> l2_key_lists(const std::vector<float>& keys, int64_t n, int64_t d, int64_t kk) {
  std::vector<int64_t> lists(static_cast<size_t>(n * kk));
  for (int64_t i = 0; i < n; ++i) {
    std::vector<std::pair<float, int64_t>> dist;
    for (int64_t j = 0; j < n; ++j) {
      if (j == i) continue;
      float s = 0;
      for (int64_t c = 0; c < d; ++c) {
        const float t = keys[static_cast<size_t>(i * d + c)] - keys[static_cast<size_t>(j * d + c)];
        s += t * t;
      }
      dist.emplace_back(s, j);
    }
    std::partial_sort(dist.begin(), dist.begin() + kk, dist.end());
    for (int64_t r = 0; r < kk; ++r) lists[static_cast<size_t>(i * kk + r)] = dist[static_cast<size_t>(r)].second;
  }
  return lists;
}

TEST_CASE("query-guided graph: weak keys linked from given key lists keep recall and reachability", "[query_guided]") {
  const int64_t n = 4000, d = 32, m = 100, kk = 16;  // few training queries: most keys are weak
  auto data = make_ood(n, d, m, 60, 41);
  auto store = make_store<float>(data.keys, d);
  QueryGuidedParams p;
  p.degree = 24;
  p.k_train = 50;
  std::vector<int64_t> knn(m * p.k_train), lists = l2_key_lists(data.keys, n, d, kk);
  exact_topk(data.train.data(), m, *store, n, p.k_train, knn.data(), nullptr);
  for (int64_t i = 0; i < n; ++i) lists[i * kk + 3] = -1;  // a -1 pad is skipped
  auto searched = QueryGuidedGraph<float>::build_from_neighbors(store, data.train.data(), m, knn.data(), p.k_train, p);
  auto linked = QueryGuidedGraph<float>::build_from_neighbors(store, data.train.data(), m, knn.data(), p.k_train, p, lists.data(), kk);
  FlatIndex<float> flat(store);
  CHECK(linked->reachable_count() == n);
  for (int64_t i = 0; i < n; ++i) REQUIRE(linked->out_degree(i) <= linked->max_degree());
  const RecallStats a = measure(*searched, flat, data.test, d, 10, 64), b = measure(*linked, flat, data.test, d, 10, 64);
  INFO("recall@10 searched " << a.recall << " linked " << b.recall);
  CHECK(b.recall >= 0.9);
  CHECK(b.recall >= a.recall - 0.03);
  lists[5] = n;  // out of range
  CHECK_THROWS_AS(QueryGuidedGraph<float>::build_from_neighbors(store, data.train.data(), m, knn.data(), p.k_train, p, lists.data(), kk),
                  std::invalid_argument);
  CHECK_THROWS_AS(QueryGuidedGraph<float>::build(store, data.train.data(), m, p, lists.data(), 0), std::invalid_argument);
}

TEST_CASE("query-guided graph: a weak key's list that fits the degree is linked whole", "[query_guided]") {
  // no training queries: every key but the entry point is weak, and its list (8) plus the reverse edges it gets stays
  // within degree 32, so no list entry may be pruned away
  const int64_t n = 600, d = 16, kk = 8;
  auto keys = random_matrix(n, d, 7, 1.f);
  auto store = make_store<float>(keys, d);
  QueryGuidedParams p;
  p.degree = 32;
  const std::vector<int64_t> lists = l2_key_lists(keys, n, d, kk);
  auto g = QueryGuidedGraph<float>::build_from_neighbors(store, nullptr, 0, nullptr, 0, p, lists.data(), kk);
  CHECK(g->reachable_count() == n);
  int64_t missing = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (i == g->entry_point()) continue;
    const uint32_t* nb = g->neighbors(i);
    for (int64_t r = 0; r < kk; ++r)
      missing += std::find(nb, nb + g->out_degree(i), static_cast<uint32_t>(lists[static_cast<size_t>(i * kk + r)])) == nb + g->out_degree(i);
  }
  CHECK(missing == 0);
}

TEMPLATE_TEST_CASE("query-guided graph: inserted keys are found, also starting from an empty graph", "[query_guided]", float, Half, BFloat16) {
  const int64_t d = 32, n0 = 1200, n_new = 300;
  auto data = make_ood(n0, d, 300, 40, 31);
  auto extra = random_matrix(n_new, d, 32, 3.f);  // large norms: q = 2 x makes x itself the top-1
  for (bool from_empty : {false, true}) {
    INFO("from_empty " << from_empty);
    auto store = std::make_shared<VectorStore<TestType>>(d);
    auto conv0 = ra_test::convert<TestType>(data.keys);
    auto conv1 = ra_test::convert<TestType>(extra);
    QueryGuidedParams p;
    p.degree = 16;
    p.k_train = 30;
    std::unique_ptr<QueryGuidedGraph<TestType>> g;
    if (from_empty) {
      g = std::make_unique<QueryGuidedGraph<TestType>>(store, p);
      g->index_new_rows();  // nothing to do yet
      CHECK(g->size() == 0);
      store->append(conv0.data(), 1);  // a single first row
      g->index_new_rows();
      CHECK(g->size() == 1);
      store->append(conv0.data() + d, n0 - 1);
      g->index_new_rows();
    } else {
      store->append(conv0.data(), n0);
      g = QueryGuidedGraph<TestType>::build(store, data.train.data(), 300, p);
    }
    // tokens leave the GPU window a few at a time
    for (int64_t done = 0; done < n_new;) {
      const int64_t c = std::min<int64_t>(n_new - done, 1 + done % 37);
      store->append(conv1.data() + done * d, c);
      g->index_new_rows();
      done += c;
    }
    REQUIRE(g->size() == n0 + n_new);
    g->repair_connectivity();
    CHECK(g->reachable_count() == n0 + n_new);
    std::vector<int64_t> ids(5);
    std::vector<float> sc(5);
    int64_t found = 0;
    for (int64_t i = 0; i < n_new; ++i) {
      std::vector<float> q(extra.begin() + i * d, extra.begin() + (i + 1) * d);
      for (auto& x : q) x *= 2.f;
      g->search_one(q.data(), 5, SearchParams{32}, ids.data(), sc.data());
      found += ids[0] == n0 + i;
    }
    CHECK(found >= n_new * 98 / 100);
    // OOD queries over the grown store (whose top-10 are now mostly the large inserted keys) still do well;
    // without edges towards large-norm keys this was 0.3
    FlatIndex<TestType> flat(store);
    CHECK(measure(*g, flat, data.test, d, 10, 64).recall >= 0.75);
  }
}

TEST_CASE("query-guided graph: save/load round trip and corrupt payloads", "[query_guided]") {
  const int64_t n = 1000, d = 16;
  auto data = make_ood(n, d, 200, 30, 41);
  auto store = make_store<Half>(data.keys, d);
  QueryGuidedParams p;
  p.degree = 12;
  p.k_train = 20;
  p.seed = 77;
  auto g = QueryGuidedGraph<Half>::build(store, data.train.data(), 200, p);
  PayloadWriter w;
  g->write_payload(w);
  const std::string path = "ra_test_qg.bin";
  save_index_file(path, g->type_name(), ScalarTraits<Half>::kind, w.bytes());
  IndexFile f = read_index_file(path);
  std::remove(path.c_str());
  REQUIRE(f.type_name == "query_guided");
  PayloadReader r(f.payload.data(), f.payload.size(), path);
  auto g2 = QueryGuidedGraph<Half>::load(store, r);
  CHECK(g2->params().degree == 12);
  CHECK(g2->params().seed == 77);
  CHECK(g2->entry_point() == g->entry_point());
  CHECK(g2->is_connected());
  std::vector<int64_t> a(10), b(10);
  std::vector<float> sa(10), sb(10);
  for (int64_t i = 0; i < 30; ++i) {
    const float* q = data.test.data() + i * d;
    CHECK(g->search_one(q, 10, SearchParams{40}, a.data(), sa.data()) == g2->search_one(q, 10, SearchParams{40}, b.data(), sb.data()));
    CHECK(a == b);
    CHECK(sa == sb);
  }

  const std::vector<uint8_t>& good = w.bytes();
  const size_t adj_at = good.size() - static_cast<size_t>(n * (g->max_degree() + 1)) * 4;  // adjacency is last
  auto expect_fail = [&](std::vector<uint8_t> bytes, std::shared_ptr<const VectorStore<Half>> keys) {
    PayloadReader rr(bytes.data(), bytes.size(), "corrupt");
    CHECK_THROWS_AS(QueryGuidedGraph<Half>::load(keys, rr), std::runtime_error);
  };
  auto put_u32 = [](std::vector<uint8_t>& b, size_t at, uint32_t v) { std::memcpy(b.data() + at, &v, 4); };
  {  // neighbour id out of range
    auto bad = good;
    put_u32(bad, adj_at + 4, static_cast<uint32_t>(n + 5));
    if (g->out_degree(0) == 0) put_u32(bad, adj_at, 1);
    expect_fail(bad, store);
  }
  {  // neighbour count larger than the stride
    auto bad = good;
    put_u32(bad, adj_at + 4 * static_cast<size_t>(g->max_degree() + 1) * 7, static_cast<uint32_t>(g->max_degree() + 1));
    expect_fail(bad, store);
  }
  {  // self loop
    auto bad = good;
    put_u32(bad, adj_at, std::max<uint32_t>(1, static_cast<uint32_t>(g->out_degree(0))));
    put_u32(bad, adj_at + 4, 0);
    expect_fail(bad, store);
  }
  {  // entry point out of range: entry is the i64 before the repair counter and the adjacency length
    auto bad = good;
    const int64_t e = n;
    std::memcpy(bad.data() + adj_at - 8 - 8 - 8, &e, 8);
    expect_fail(bad, store);
  }
  expect_fail(std::vector<uint8_t>(good.begin(), good.end() - 4), store);  // truncated
  {
    auto bad = good;
    bad.push_back(0);
    expect_fail(bad, store);  // trailing bytes
  }
  {
    auto bad = good;
    bad[0] ^= 0xff;
    expect_fail(bad, store);  // payload version
  }
  // a key store that does not match the graph
  auto fewer = std::make_shared<VectorStore<Half>>(d);
  fewer->append(store->data(), n - 1);
  expect_fail(good, fewer);
  auto wider = std::make_shared<VectorStore<Half>>(d * 2);
  wider->append(store->data(), n / 2);
  expect_fail(good, wider);
}

TEST_CASE("query-guided graph: concurrent searches equal sequential ones", "[query_guided]") {
  const int64_t n = 2000, d = 32, m = 64, k = 10;
  auto data = make_ood(n, d, 400, m, 51);
  auto store = make_store<BFloat16>(data.keys, d);
  QueryGuidedParams p;
  p.degree = 16;
  p.k_train = 40;
  auto g = QueryGuidedGraph<BFloat16>::build(store, data.train.data(), 400, p);
  std::vector<int64_t> seq_ids(m * k), seq_vis(m);
  std::vector<float> seq_sc(m * k);
  for (int64_t i = 0; i < m; ++i) seq_vis[i] = g->search_one(data.test.data() + i * d, k, SearchParams{48}, seq_ids.data() + i * k, seq_sc.data() + i * k);
  const int n_threads = 4;
  std::vector<std::vector<int64_t>> ids(n_threads, std::vector<int64_t>(m * k)), vis(n_threads, std::vector<int64_t>(m));
  std::vector<std::vector<float>> sc(n_threads, std::vector<float>(m * k));
  std::vector<std::thread> threads;
  for (int t = 0; t < n_threads; ++t)
    threads.emplace_back([&, t] {
      for (int rep = 0; rep < 3; ++rep)
        for (int64_t j = 0; j < m; ++j) {
          const int64_t i = (j * 7 + t * 13) % m;  // different orders per thread
          vis[t][i] = g->search_one(data.test.data() + i * d, k, SearchParams{48}, ids[t].data() + i * k, sc[t].data() + i * k);
        }
    });
  for (auto& th : threads) th.join();
  for (int t = 0; t < n_threads; ++t) {
    CHECK(ids[t] == seq_ids);
    CHECK(sc[t] == seq_sc);
    CHECK(vis[t] == seq_vis);
  }
}

TEST_CASE("query-guided graph: one-row inserts keep every key reachable and O(degree) edges, also after load", "[query_guided]") {
  const int64_t n0 = 1500, n_new = 180, d = 24;  // 180 < n0/8: no periodic repair runs in between
  auto data = make_ood(n0 + n_new, d, 300, 30, 53);
  auto conv = ra_test::convert<BFloat16>(data.keys);
  auto store = std::make_shared<VectorStore<BFloat16>>(d);
  store->append(conv.data(), n0);
  QueryGuidedParams p;
  p.degree = 12;
  p.k_train = 30;
  auto g = QueryGuidedGraph<BFloat16>::build(store, data.train.data(), 300, p);
  for (int64_t i = n0; i < n0 + n_new; ++i) {
    if (i == n0 + n_new / 2) {  // continue on a reloaded graph (in-degrees are rebuilt on first use)
      PayloadWriter w;
      g->write_payload(w);
      PayloadReader r(w.bytes().data(), w.bytes().size(), "mem");
      g = QueryGuidedGraph<BFloat16>::load(store, r);
    }
    store->append(conv.data() + i * d, 1);
    g->index_new_rows();
    if (i % 30 == 0) CHECK(g->reachable_count() == i + 1);
  }
  REQUIRE(g->size() == n0 + n_new);
  CHECK(g->is_connected());
  for (int64_t i = 0; i < g->size(); ++i) REQUIRE(g->out_degree(i) <= g->max_degree());
  int64_t linked = 0;  // every inserted key got out-edges
  for (int64_t i = n0; i < n0 + n_new; ++i) linked += g->out_degree(i) > 0;
  CHECK(linked == n_new);
  FlatIndex<BFloat16> flat(store);
  CHECK(measure(*g, flat, data.test, d, 10, 64).recall >= 0.8);
}

TEST_CASE("query-guided graph: build knobs (n_pivots, ef_weak) keep the graph connected and recall high; bad values rejected", "[query_guided]") {
  const int64_t n = 6000, d = 32;
  auto data = make_ood(n, d, 1500, 60, 23);
  auto store = make_store<float>(data.keys, d);
  FlatIndex<float> flat(store);
  QueryGuidedParams def;
  CHECK(def.n_pivots == 4);
  CHECK(def.ef_weak == 16);
  for (int64_t piv : {int64_t(1), int64_t(3), int64_t(8)})
    for (int64_t efw : {int64_t(4), int64_t(16), int64_t(64)}) {
      QueryGuidedParams p;
      p.k_train = 50;
      p.n_pivots = piv;
      p.ef_weak = efw;
      auto g = QueryGuidedGraph<float>::build(store, data.train.data(), 1500, p);
      INFO("n_pivots " << piv << " ef_weak " << efw);
      CHECK(g->reachable_count() == n);
      for (int64_t i = 0; i < n; ++i) REQUIRE(g->out_degree(i) <= g->max_degree());
    }
}

TEST_CASE("query-guided graph: recall floor of the default build on seeded OOD data", "[query_guided]") {
  // a regression guard for build-speed work: defaults, 8000 keys, recall@10 and @50 at a small scan
  const int64_t n = 8000, d = 32;
  auto data = make_ood(n, d, 4000, 80, 31);
  auto store = make_store<float>(data.keys, d);
  FlatIndex<float> flat(store);
  auto g = QueryGuidedGraph<float>::build(store, data.train.data(), 4000, QueryGuidedParams{});
  CHECK(g->is_connected());
  const RecallStats r10 = measure(*g, flat, data.test, d, 10, 32);
  const RecallStats r50 = measure(*g, flat, data.test, d, 50, 100);
  INFO("recall@10 " << r10.recall << " visited " << r10.visited_frac << "; recall@50 " << r50.recall << " visited " << r50.visited_frac);
  CHECK(r10.recall >= 0.93);
  CHECK(r10.visited_frac < 0.1);
  CHECK(r50.recall >= 0.95);
  CHECK(r50.visited_frac < 0.2);
}

TEST_CASE("query-guided graph: n_pivots and ef_weak are validated", "[query_guided]") {
  auto store = make_store<float>(random_matrix(100, 8, 3), 8);
  auto train = random_matrix(10, 8, 4);
  for (auto bad : {std::make_pair(int64_t(0), int64_t(16)), std::make_pair(int64_t(101), int64_t(16)), std::make_pair(int64_t(3), int64_t(0))}) {
    QueryGuidedParams p;
    p.n_pivots = bad.first;
    p.ef_weak = bad.second;
    CHECK_THROWS_AS(QueryGuidedGraph<float>::build(store, train.data(), 10, p), std::invalid_argument);
  }
}
