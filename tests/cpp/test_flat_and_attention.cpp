// Core v0: FlatIndex, exact blocked kNN, sparse/dense attention, LSE merge and the file format,
// each against a naive double-precision reference on seeded random shapes.
#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <mutex>
#include <random>
#include <set>
#include <thread>

#include "reference.h"
#include "retrieval_attention/attention.h"
#include "retrieval_attention/chunk_top.h"
#include "retrieval_attention/flat_index.h"
#include "retrieval_attention/huge_page_allocator.h"
#include "retrieval_attention/offloaded_layer.h"
#include "retrieval_attention/parallel.h"
#include "retrieval_attention/simd_dot.h"
#include "retrieval_attention/topk.h"

using namespace retrieval_attention;
using ra_test::naive_attention;
using ra_test::naive_topk;
using ra_test::random_matrix;

TEST_CASE("half and bfloat16 round trips", "[scalar]") {
  for (float x : {0.f, 1.f, -2.5f, 65504.f, 6.1e-5f, 3e-7f, -1e-3f}) {
    CHECK(to_float(from_float<Half>(x)) == Approx(x).epsilon(1e-3).margin(6e-8));
    CHECK(to_float(from_float<BFloat16>(x)) == Approx(x).epsilon(8e-3).margin(1e-30));
  }
  CHECK(std::isinf(to_float(from_float<Half>(1e6f))));
  CHECK(std::isnan(to_float(from_float<Half>(NAN))));
  // every half bit pattern that is finite survives half -> float -> half
  for (uint32_t b = 0; b < 0x7c00; ++b) REQUIRE(from_float<Half>(to_float(Half{uint16_t(b)})).bits == b);
}

TEMPLATE_TEST_CASE("all_finite agrees with std::isfinite for every 16-bit pattern and float's special values", "[scalar]", Half,
                   BFloat16, float) {
  if constexpr (sizeof(TestType) == 2) {
    for (uint32_t b = 0; b <= 0xffff; ++b) {
      const TestType x{static_cast<uint16_t>(b)};
      REQUIRE(all_finite(&x, 1) == std::isfinite(to_float(x)));
    }
  } else {
    for (float x : {0.f, -0.f, 1e-45f, 3.4e38f, -3.4e38f, INFINITY, -INFINITY, NAN})
      REQUIRE(all_finite(&x, 1) == std::isfinite(x));
  }
  // one bad value anywhere in a long run (past the first blocks, at a block's last slot) is found
  std::vector<TestType> v(20000, from_float<TestType>(1.5f));
  CHECK(all_finite(v.data(), static_cast<int64_t>(v.size())));
  for (size_t at : {size_t{0}, size_t{4095}, size_t{4096}, size_t{19999}}) {
    v[at] = from_float<TestType>(NAN);
    CHECK_FALSE(all_finite(v.data(), static_cast<int64_t>(v.size())));
    CHECK(all_finite(v.data(), static_cast<int64_t>(at)));  // the values before it
    v[at] = from_float<TestType>(1.5f);
  }
}

TEST_CASE("dot_row4 / simd::dot4 score four queries bit for bit as dot_row / simd::dot do", "[scalar]") {
  std::mt19937 rng(5);
  std::normal_distribution<float> nd;
  for (int64_t d : {1, 7, 8, 64, 100, 128}) {
    std::vector<float> q(static_cast<size_t>(4 * d));
    std::vector<BFloat16> row(static_cast<size_t>(d));
    for (auto& x : q) x = nd(rng);
    for (auto& x : row) x = from_float<BFloat16>(nd(rng));
    float four[4];
    dot_row4(q.data(), row.data(), d, four);
    for (int j = 0; j < 4; ++j) CHECK(four[j] == dot_row(q.data() + j * d, row.data(), d));
    simd::dot4(q.data(), row.data(), d, four);  // the dispatched kernels: AVX+FMA on most x86-64 machines
    for (int j = 0; j < 4; ++j) CHECK(four[j] == simd::dot(q.data() + j * d, row.data(), d));
  }
}

TEST_CASE("huge-page vectors: large blocks aligned to 2 MiB, contents kept across growth", "[alloc]") {
  HugePageVector<uint32_t> small(100);  // below one huge page: ordinary aligned memory
  CHECK(reinterpret_cast<uintptr_t>(small.data()) % 64 == 0);
  HugePageVector<uint32_t> v;
  for (uint32_t i = 0; i < (3u << 20); ++i) v.push_back(i * 7u);  // 12 MiB, grown through both kinds of block
  CHECK(reinterpret_cast<uintptr_t>(v.data()) % kHugePage == 0);
  bool same = true;
  for (uint32_t i = 0; i < v.size(); ++i) same = same && v[i] == i * 7u;
  CHECK(same);
  VectorStore<BFloat16> store(128);
  std::vector<BFloat16> rows(8192 * 128, from_float<BFloat16>(1.5f));
  store.append(rows.data(), 8192);  // 2 MiB of keys
  CHECK(reinterpret_cast<uintptr_t>(store.data()) % kHugePage == 0);
  CHECK(to_float(store.row(8191)[127]) == 1.5f);
}

TEMPLATE_TEST_CASE("FlatIndex returns the exact top-k", "[flat]", float, Half, BFloat16) {
  for (uint32_t seed = 1; seed <= 4; ++seed) {
    const int64_t n = 50 + 97 * seed, d = 8 * seed + 3, k = std::min<int64_t>(10 * seed, n);
    // keys are rounded to the storage type first so the reference sees the same values
    auto keys_t = ra_test::convert<TestType>(random_matrix(n, d, seed));
    auto keys_f = ra_test::widen(keys_t);
    auto store = std::make_shared<VectorStore<TestType>>(d);
    store->append(keys_t.data(), n);
    FlatIndex<TestType> idx(store);
    auto q = random_matrix(5, d, 100 + seed);
    std::vector<int64_t> ids(k), blocked_ids(5 * k);
    std::vector<float> scores(k), blocked_scores(5 * k);
    exact_topk(q.data(), 5, *store, n, k, blocked_ids.data(), blocked_scores.data());
    for (int qi = 0; qi < 5; ++qi) {
      CHECK(idx.search_one(q.data() + qi * d, k, {}, ids.data(), scores.data()) == n);
      auto ref = naive_topk(q.data() + qi * d, keys_f, n, d, k);
      // compare as sets plus score order (float vs double rounding may swap near-ties)
      for (int64_t j = 0; j < k; ++j) {
        double s_ref = 0;
        for (int64_t c = 0; c < d; ++c) s_ref += double(q[qi * d + c]) * keys_f[ref[j] * d + c];
        CHECK(scores[j] == Approx(s_ref).epsilon(1e-4).margin(1e-4));
        CHECK(blocked_scores[qi * k + j] == Approx(s_ref).epsilon(1e-4).margin(1e-4));
        if (j) CHECK(scores[j] <= scores[j - 1]);
      }
    }
  }
}

TEST_CASE("exact_topk over several key and query blocks: the exact top-k, ties to the smaller id", "[flat]") {
  // 2,502 keys (3 blocks of 1,024, the last not a multiple of 4), 70 queries (a block of 64 and one of 6), d = 19; every
  // key row appears 3 times (ids r, r + 834, r + 1668, in different key blocks), so equal scores are exact ties
  const int64_t n_base = 834, n = 3 * n_base, m = 70, d = 19, k = 37;
  auto base = ra_test::convert<BFloat16>(random_matrix(n_base, d, 7));
  std::vector<BFloat16> rows;
  for (int rep = 0; rep < 3; ++rep) rows.insert(rows.end(), base.begin(), base.end());
  VectorStore<BFloat16> store(d);
  store.append(rows.data(), n);
  auto q = random_matrix(m, d, 8);
  std::vector<int64_t> ids(m * k);
  std::vector<float> scores(m * k);
  exact_topk(q.data(), m, store, n, k, ids.data(), scores.data());
  auto base_f = ra_test::widen(base);
  for (int64_t i = 0; i < m; ++i) {
    std::vector<double> score_of(n_base);
    std::vector<std::pair<double, int64_t>> ref;  // (score, base row) best-first
    for (int64_t r = 0; r < n_base; ++r) {
      double s = 0;
      for (int64_t c = 0; c < d; ++c) s += double(q[i * d + c]) * base_f[r * d + c];
      score_of[r] = s;
      ref.emplace_back(s, r);
    }
    std::sort(ref.begin(), ref.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
    std::vector<int64_t> want;  // each base row's three ids, smallest first
    for (size_t r = 0; want.size() < static_cast<size_t>(k); ++r)
      for (int rep = 0; rep < 3 && want.size() < static_cast<size_t>(k); ++rep) want.push_back(ref[r].second + rep * n_base);
    for (int64_t j = 0; j < k; ++j) {
      CHECK(ids[i * k + j] == want[static_cast<size_t>(j)]);
      CHECK(scores[i * k + j] == Approx(score_of[want[j] % n_base]).epsilon(1e-4).margin(1e-4));
    }
  }
}

TEST_CASE("FlatIndex pads with -1 when k exceeds n and indexes appended rows", "[flat]") {
  const int64_t d = 4;
  auto store = std::make_shared<VectorStore<float>>(d);
  auto rows = random_matrix(3, d, 7);
  store->append(rows.data(), 3);
  FlatIndex<float> idx(store);
  std::vector<int64_t> ids(5);
  std::vector<float> sc(5);
  idx.search_one(rows.data(), 5, {}, ids.data(), sc.data());
  CHECK(ids[3] == -1);
  CHECK(ids[4] == -1);
  CHECK(std::isinf(sc[4]));
  std::vector<float> big = {100, 100, 100, 100};
  store->append(big.data(), 1);
  idx.index_new_rows();
  std::vector<float> q = {1, 1, 1, 1};
  idx.search_one(q.data(), 1, {}, ids.data(), sc.data());
  CHECK(ids[0] == 3);
}

TEMPLATE_TEST_CASE("sparse and dense attention match the double reference", "[attention]", float, Half, BFloat16) {
  for (uint32_t seed = 1; seed <= 3; ++seed) {
    const int64_t hkv = seed, hq = 2 * seed, m = seed, n = 40 * seed + 5, d = 16 + seed, dv = 8 + 2 * seed, k = 7 * seed;
    auto kt = ra_test::convert<TestType>(random_matrix(hkv * n, d, seed));
    auto vt = ra_test::convert<TestType>(random_matrix(hkv * n, dv, seed + 50));
    auto kf = ra_test::widen(kt), vf = ra_test::widen(vt);
    auto q = random_matrix(hq * m, d, seed + 99);
    std::vector<int64_t> ids(hq * m * k);
    std::mt19937 rng(seed);
    for (auto& id : ids) id = int64_t(rng() % (n + 1)) - 1;  // includes -1 padding
    const float scale = 1.f / std::sqrt(float(d));
    std::vector<float> out(hq * m * dv), lse(hq * m);
    sparse_attention_batch(q.data(), hq, m, d, kt.data(), vt.data(), hkv, n, dv, ids.data(), k, scale, out.data(), lse.data());
    std::vector<float> dout(hq * m * dv), dlse(hq * m);
    dense_attention_batch(q.data(), hq, m, d, kt.data(), vt.data(), hkv, n, dv, scale, true, dout.data(), dlse.data());
    for (int64_t hm = 0; hm < hq * m; ++hm) {
      const int64_t kv = (hm / m) / (hq / hkv), i = hm % m;
      std::vector<float> kh(kf.begin() + kv * n * d, kf.begin() + (kv + 1) * n * d), vh(vf.begin() + kv * n * dv, vf.begin() + (kv + 1) * n * dv);
      std::vector<int64_t> rows;
      for (int64_t j = 0; j < k; ++j)
        if (ids[hm * k + j] >= 0) rows.push_back(ids[hm * k + j]);
      std::vector<double> ref;
      double ref_lse = naive_attention(q.data() + hm * d, kh, vh, d, dv, rows, scale, ref);
      if (rows.empty()) CHECK(std::isinf(lse[hm]));
      else CHECK(lse[hm] == Approx(ref_lse).epsilon(1e-5).margin(1e-5));
      for (int64_t c = 0; c < dv; ++c) CHECK(out[hm * dv + c] == Approx(ref[c]).margin(2e-5));
      std::vector<int64_t> prefix(n - m + i + 1);
      std::iota(prefix.begin(), prefix.end(), 0);
      ref_lse = naive_attention(q.data() + hm * d, kh, vh, d, dv, prefix, scale, ref);
      CHECK(dlse[hm] == Approx(ref_lse).epsilon(1e-5).margin(1e-5));
      for (int64_t c = 0; c < dv; ++c) CHECK(dout[hm * dv + c] == Approx(ref[c]).margin(2e-5));
    }
  }
}

TEST_CASE("sparse attention rejects out-of-range ids before reading", "[attention]") {
  std::vector<float> k(4 * 2, 1.f), v(4 * 2, 1.f), q(2, 1.f), out(2), lse(1);
  std::vector<int64_t> ids = {0, 4};
  CHECK_THROWS_AS(sparse_attention_batch(q.data(), 1, 1, 2, k.data(), v.data(), 1, 4, 2, ids.data(), 2, 1.f, out.data(), lse.data()),
                  std::invalid_argument);
  ids = {-2, 0};
  CHECK_THROWS_AS(sparse_attention_batch(q.data(), 1, 1, 2, k.data(), v.data(), 1, 4, 2, ids.data(), 2, 1.f, out.data(), lse.data()),
                  std::invalid_argument);
}

TEST_CASE("merging two disjoint halves equals attention over the union", "[merge]") {
  const int64_t n = 300, d = 32, dv = 24;
  auto kf = random_matrix(n, d, 3), vf = random_matrix(n, dv, 4), q = random_matrix(1, d, 5, 2.f);
  std::vector<int64_t> a, b, all(n);
  std::iota(all.begin(), all.end(), 0);
  for (int64_t i = 0; i < n; ++i) (i % 3 ? a : b).push_back(i);
  std::vector<float> oa(dv), ob(dv), o(dv);
  float la, lb, l;
  std::vector<float> sc;
  std::vector<int64_t> rows;
  la = attend_selected(q.data(), d, kf.data(), vf.data(), dv, n, a.data(), a.size(), 0.2f, oa.data(), sc, rows);
  lb = attend_selected(q.data(), d, kf.data(), vf.data(), dv, n, b.data(), b.size(), 0.2f, ob.data(), sc, rows);
  merge_batch(oa.data(), &la, ob.data(), &lb, 1, dv, o.data(), &l);
  std::vector<double> ref;
  const double ref_lse = naive_attention(q.data(), kf, vf, d, dv, all, 0.2, ref);
  CHECK(l == Approx(ref_lse).epsilon(1e-5));
  for (int64_t c = 0; c < dv; ++c) CHECK(o[c] == Approx(ref[c]).margin(1e-5));
  // an empty side contributes nothing; two empty sides give zeros and -inf
  const float ninf = kNegInf;
  merge_batch(oa.data(), &la, ob.data(), &ninf, 1, dv, o.data(), &l);
  CHECK(l == la);
  for (int64_t c = 0; c < dv; ++c) CHECK(o[c] == Approx(oa[c]));
  merge_batch(oa.data(), &ninf, ob.data(), &ninf, 1, dv, o.data(), &l);
  CHECK(std::isinf(l));
  CHECK(o[0] == 0.f);
}

TEST_CASE("OffloadedLayer in exactness mode equals dense attention", "[layer]") {
  const int64_t hq = 4, hkv = 2, d = 16, dv = 16, t0 = 37, t1 = 21;
  auto factory = [](std::shared_ptr<const VectorStore<float>> keys, const float*, int64_t, const int64_t*, int64_t, const int64_t*, int64_t, const int32_t*, int64_t) { return std::make_unique<FlatIndex<float>>(keys); };
  OffloadedLayer<float> layer(hq, hkv, d, dv, factory);
  auto k0 = random_matrix(hkv * t0, d, 1), v0 = random_matrix(hkv * t0, dv, 2);
  auto k1 = random_matrix(hkv * t1, d, 3), v1 = random_matrix(hkv * t1, dv, 4);
  auto train = random_matrix(hq * 5, d, 5);
  layer.build(k0.data(), v0.data(), t0, train.data(), 5);
  layer.append(k1.data(), v1.data(), t1);
  REQUIRE(layer.size() == t0 + t1);
  // the reference: per kv head, rows t0 then t1
  std::vector<float> kall, vall;
  for (int64_t h = 0; h < hkv; ++h) {
    kall.insert(kall.end(), k0.begin() + h * t0 * d, k0.begin() + (h + 1) * t0 * d);
    kall.insert(kall.end(), k1.begin() + h * t1 * d, k1.begin() + (h + 1) * t1 * d);
    vall.insert(vall.end(), v0.begin() + h * t0 * dv, v0.begin() + (h + 1) * t0 * dv);
    vall.insert(vall.end(), v1.begin() + h * t1 * dv, v1.begin() + (h + 1) * t1 * dv);
  }
  auto q = random_matrix(hq * 2, d, 6);
  std::vector<float> out(hq * 2 * dv), lse(hq * 2), rout(hq * 2 * dv), rlse(hq * 2);
  std::vector<int64_t> visited(hq * 2);
  layer.retrieve_attend(q.data(), 2, 1000, {}, 0.25f, out.data(), lse.data(), visited.data(), nullptr);
  dense_attention_batch(q.data(), hq, 2, d, kall.data(), vall.data(), hkv, t0 + t1, dv, 0.25f, false, rout.data(), rlse.data());
  for (size_t i = 0; i < lse.size(); ++i) CHECK(lse[i] == Approx(rlse[i]).epsilon(1e-5));
  for (size_t i = 0; i < out.size(); ++i) CHECK(out[i] == Approx(rout[i]).margin(1e-5));
  CHECK(visited[0] == t0 + t1);
}

TEST_CASE("OffloadedLayer: rows waiting to be indexed are scanned exactly and merged", "[layer]") {
  const int64_t hq = 2, hkv = 1, d = 8, t0 = 30;
  // an index that only ever covers the rows present when it was made, so everything appended stays in the tail
  struct FrozenFlat final : KeyIndex<float> {
    explicit FrozenFlat(std::shared_ptr<const VectorStore<float>> k) : inner(k) {}
    FlatIndex<float> inner;
    int64_t size() const override { return inner.size(); }
    int64_t dim() const override { return inner.dim(); }
    int64_t search_one(const float* q, int64_t k, const SearchParams& p, int64_t* ids, float* sc) const override { return inner.search_one(q, k, p, ids, sc); }
    void index_new_rows() override {}
    std::string type_name() const override { return "frozen"; }
    int64_t structure_bytes() const override { return 0; }
    void write_payload(PayloadWriter&) const override {}
  };
  auto factory = [](std::shared_ptr<const VectorStore<float>> keys, const float*, int64_t, const int64_t*, int64_t, const int64_t*, int64_t, const int32_t*, int64_t) { return std::make_unique<FrozenFlat>(keys); };
  OffloadedLayer<float> layer(hq, hkv, d, d, factory, /*max_unindexed=*/1000);
  auto k0 = random_matrix(t0, d, 1), v0 = random_matrix(t0, d, 2);
  layer.build(k0.data(), v0.data(), t0, nullptr, 0);
  std::vector<float> big(d, 5.f), val(d, 1.f);  // a dominant key in the tail must be found
  layer.append(big.data(), val.data(), 1);
  auto q = std::vector<float>(hq * d, 1.f);
  std::vector<float> out(hq * d), lse(hq);
  std::vector<int64_t> visited(hq), ids(hq * 3);
  layer.retrieve_attend(q.data(), 1, 3, {}, 1.f, out.data(), lse.data(), visited.data(), ids.data());
  CHECK(ids[0] == t0);
  CHECK(visited[0] == t0 + 1);
  CHECK(layer.index(0)->size() == t0);
}

TEST_CASE("index files: round trip, corruption, truncation and foreign files are detected", "[serialize]") {
  const std::string path = "ra_test_index.bin";
  PayloadWriter w;
  w.put<int64_t>(42);
  w.put_vector(std::vector<int32_t>{1, 2, 3});
  save_index_file(path, "flat", ScalarKind::Float16, w.bytes());
  IndexFile f = read_index_file(path);
  CHECK(f.type_name == "flat");
  CHECK(f.kind == ScalarKind::Float16);
  PayloadReader r(f.payload.data(), f.payload.size(), path);
  CHECK(r.get<int64_t>() == 42);
  CHECK(r.get_vector<int32_t>(10) == std::vector<int32_t>{1, 2, 3});
  CHECK(r.at_end());
  CHECK_THROWS_AS(r.get<int64_t>(), std::runtime_error);

  std::vector<char> bytes;
  {
    std::ifstream in(path, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  auto write = [&](const std::vector<char>& b) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(b.data(), b.size());
  };
  for (size_t pos : {size_t(0), size_t(9), size_t(40), bytes.size() - 1}) {
    auto flipped = bytes;
    flipped[pos] ^= 0x10;
    write(flipped);
    CHECK_THROWS_AS(read_index_file(path), std::runtime_error);
  }
  write(std::vector<char>(bytes.begin(), bytes.end() - 5));
  CHECK_THROWS_AS(read_index_file(path), std::runtime_error);
  write(std::vector<char>{'h', 'e', 'l', 'l', 'o'});
  CHECK_THROWS_AS(read_index_file(path), std::runtime_error);
  std::remove(path.c_str());
  CHECK_THROWS_AS(read_index_file(path), std::runtime_error);
}

TEST_CASE("parallel_for_split: every item and inner iteration once, idle threads help the slow item", "[parallel]") {
  const int threads = 4;
  omp_set_num_threads(threads);
  for (int64_t n : {1, 2, 3, 4, 9}) {
    std::vector<int> runs(static_cast<size_t>(n), 0);
    std::vector<std::vector<std::atomic<int>>> inner(static_cast<size_t>(n));
    for (auto& v : inner) v = std::vector<std::atomic<int>>(static_cast<size_t>(100 + n));
    parallel_for_split(n, [&](int64_t i) {
      ++runs[static_cast<size_t>(i)];
      auto& it = inner[static_cast<size_t>(i)];
      parallel_for(static_cast<int64_t>(it.size()), [&](int64_t j) { ++it[static_cast<size_t>(j)]; });
    });
    for (int64_t i = 0; i < n; ++i) {
      CHECK(runs[static_cast<size_t>(i)] == 1);
      for (auto& c : inner[static_cast<size_t>(i)]) CHECK(c.load() == 1);
    }
  }
  // item 0's loop is slow and the others end at once: the threads left without an item run its iterations too
  std::mutex mu;
  std::set<std::thread::id> workers;
  parallel_for_split(3, [&](int64_t i) {
    if (i != 0) return;
    parallel_for(200, [&](int64_t) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
      std::lock_guard<std::mutex> lock(mu);
      workers.insert(std::this_thread::get_id());
    });
  });
  CHECK(workers.size() >= 3);  // a team of its own share (4 / 3 threads) would give it 2
  // an exception thrown by one item, or inside an item's loop, reaches the caller after the others ran
  for (bool in_loop : {false, true}) {
    std::vector<int> ran(3, 0);
    CHECK_THROWS_AS(parallel_for_split(3, [&](int64_t i) {
                      ran[static_cast<size_t>(i)] = 1;
                      if (i == 1 && !in_loop) throw std::invalid_argument("item 1");
                      parallel_for(50, [&](int64_t j) {
                        if (i == 1 && in_loop && j == 7) throw std::invalid_argument("item 1, iteration 7");
                      });
                    }),
                    std::invalid_argument);
    CHECK(ran == std::vector<int>{1, 1, 1});
  }
}

TEST_CASE("BlockingPool: every item once on several threads, errors reach the caller, busy or nested calls still run", "[parallel]") {
  omp_set_num_threads(4);
  BlockingPool& pool = BlockingPool::shared();
  for (int round = 0; round < 50; ++round) {  // many back-to-back loops: no item lost or repeated across generations
    const int64_t n = 1 + round % 37;
    std::vector<std::atomic<int>> runs(static_cast<size_t>(n));
    pool.run(n, [&](int64_t i) { runs[static_cast<size_t>(i)].fetch_add(1); });
    for (auto& c : runs) CHECK(c.load() == 1);
  }
  // slow items spread over more than the calling thread
  std::mutex mu;
  std::set<std::thread::id> threads;
  pool.run(16, [&](int64_t) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
    std::lock_guard<std::mutex> lock(mu);
    threads.insert(std::this_thread::get_id());
  });
  CHECK(threads.size() >= 2);
  // the first exception is rethrown on the caller once the other items ran
  std::vector<std::atomic<int>> ran(20);
  CHECK_THROWS_AS(pool.run(20, [&](int64_t i) {
                    ran[static_cast<size_t>(i)] = 1;
                    if (i == 5) throw std::invalid_argument("item 5");
                  }),
                  std::invalid_argument);
  for (auto& r : ran) CHECK(r.load() == 1);
  // a loop inside a loop (the pool is busy) and loops from two threads at once all complete
  std::atomic<int> inner{0};
  pool.run(4, [&](int64_t) { pool.run(10, [&](int64_t) { inner.fetch_add(1); }); });
  CHECK(inner.load() == 40);
  std::atomic<int> total{0};
  std::thread other([&] {
    for (int r = 0; r < 20; ++r) pool.run(8, [&](int64_t) { total.fetch_add(1); });
  });
  for (int r = 0; r < 20; ++r) pool.run(8, [&](int64_t) { total.fetch_add(1); });
  other.join();
  CHECK(total.load() == 320);
}

TEST_CASE("chunk_top_candidates: the best entries of the best chunks, in one total order", "[chunk_top]") {
  std::mt19937 rng(31);
  std::uniform_int_distribution<int> small(-6, 6);  // few distinct values: ties everywhere
  const int64_t rows = 9, chunk = 16, n_chunks = 20, cols = chunk * n_chunks, kc = 5, m = 37;
  std::vector<float> s(static_cast<size_t>(rows * cols));
  for (float& x : s) x = static_cast<float>(small(rng)) / 4.f;
  s[3] = NAN;
  std::vector<int64_t> out(static_cast<size_t>(rows * m));
  chunk_top_candidates(s.data(), rows, cols, chunk, kc, m, out.data());
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = s.data() + r * cols;
    auto val = [&](int64_t j) { return std::isnan(row[j]) ? -INFINITY : row[j]; };
    std::vector<std::pair<float, int64_t>> chunks;  // (max, chunk): best first, smaller chunk on ties
    for (int64_t c = 0; c < n_chunks; ++c) {
      float best = -INFINITY;
      for (int64_t j = c * chunk; j < (c + 1) * chunk; ++j) best = std::max(best, val(j));
      chunks.push_back({best, c});
    }
    std::stable_sort(chunks.begin(), chunks.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
    std::vector<int64_t> kept;
    for (int64_t i = 0; i < kc; ++i)
      for (int64_t j = chunks[i].second * chunk; j < (chunks[i].second + 1) * chunk; ++j) kept.push_back(j);
    std::sort(kept.begin(), kept.end());
    std::stable_sort(kept.begin(), kept.end(), [&](int64_t a, int64_t b) { return val(a) > val(b); });
    for (int64_t i = 0; i < m; ++i) REQUIRE(out[static_cast<size_t>(r * m + i)] == kept[static_cast<size_t>(i)]);
  }
}

TEST_CASE("rerank_l2: the nearest candidates by float32 L2, -1 skipped and padding", "[chunk_top]") {
  const int64_t groups = 2, n = 60, d = 12, b = 5, m = 10, k = 6, row_start = 40;
  auto keys = random_matrix(groups * n, d, 32);
  std::vector<int64_t> cand(static_cast<size_t>(groups * b * m));
  std::mt19937 rng(33);
  for (int64_t gr = 0; gr < groups * b; ++gr) {
    std::vector<int64_t> ids(static_cast<size_t>(n));
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    for (int64_t j = 0; j < m; ++j) cand[static_cast<size_t>(gr * m + j)] = j % 4 == 3 ? -1 : ids[static_cast<size_t>(j)];
  }
  cand[0] = 99;  // out of range: counts as none
  std::vector<int64_t> out(static_cast<size_t>(groups * b * k));
  rerank_l2(keys.data(), groups, n, d, row_start, cand.data(), b, m, k, out.data());
  for (int64_t gr = 0; gr < groups * b; ++gr) {
    const int64_t g = gr / b;
    const float* x = keys.data() + (g * n + row_start + gr % b) * d;
    std::vector<std::pair<double, int64_t>> ref;
    for (int64_t j = 0; j < m; ++j) {
      const int64_t id = cand[static_cast<size_t>(gr * m + j)];
      if (id < 0 || id >= n) continue;
      double dist = 0;
      for (int64_t t = 0; t < d; ++t) dist += std::pow(double(x[t]) - keys[static_cast<size_t>((g * n + id) * d + t)], 2);
      ref.push_back({dist, id});
    }
    std::sort(ref.begin(), ref.end());
    for (int64_t i = 0; i < k; ++i) {
      const int64_t want = i < static_cast<int64_t>(ref.size()) ? ref[static_cast<size_t>(i)].second : -1;
      REQUIRE(out[static_cast<size_t>(gr * k + i)] == want);
    }
  }
}
