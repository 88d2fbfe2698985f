// fuzz_index: a seeded randomized loop (no libFuzzer needed) over the core's untrusted-input surfaces, run by ctest
// for a bounded time (also in the AddressSanitizer + UndefinedBehaviorSanitizer build).
//
// Each iteration draws, from its own seed (base seed + iteration number), one scenario:
//   * build:  FlatIndex / QueryGuidedGraph over random shapes and scalar types (float, Half, BFloat16), random
//             build parameters (valid and invalid), random training queries (NaN/Inf injected), precomputed kNN lists
//             (out-of-range ids injected); then searches with random k / ef, incremental inserts (also into an empty
//             graph) and connectivity repair.
//   * indexed: IndexedKeys (what ra.FlatIndex / ra.QueryGuidedIndex wrap) with non-finite keys, queries and new rows and
//             k outside [1, n]: each must throw and leave the index unchanged.
//   * file:   IndexedKeys save -> bytes -> mutation -> read_index_file + IndexedKeys<T>::load with load_index_payload:
//             random bit flips, truncation, extension, random bytes and foreign headers (checksum left stale: must be
//             rejected), and structure-aware payload mutations with the checksum recomputed (interesting int64/uint32
//             values at field offsets, byte flips, resized payloads, swapped type names and scalar kinds), so the
//             loaders' own validation is what is exercised.
// Rules checked:
//   * every rejection is a C++ exception (anything else -- a crash, an abort, a sanitizer report -- fails the test);
//   * inputs that are valid by the documented contracts are accepted (an exception there is a failure);
//   * whatever is accepted works: searches return ids in [-1, n) with best-first scores, a freshly built graph reaches
//     every key (k = n, ef = n returns a permutation of [0, n)), a loaded index can be searched, extended and saved.
// Usage: fuzz_index [--seconds S] [--seed N] [--iterations N] [--only I] [--dir PATH] [--verbose]
//   A failure prints "FAIL seed=N iteration=I ..."; rerun that one case with --seed N --only I.
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <fstream>
#include <functional>
#include <limits>
#include <memory>
#include <new>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <unistd.h>

#include "retrieval_attention/flat_index.h"
#include "retrieval_attention/index_registry.h"
#include "retrieval_attention/indexed_keys.h"
#include "retrieval_attention/query_guided_graph.h"
#include "retrieval_attention/serialize.h"

using namespace retrieval_attention;

namespace {

struct Failure : std::exception {
  std::string msg;
  explicit Failure(std::string m) : msg(std::move(m)) {}
  const char* what() const noexcept override { return msg.c_str(); }
};

[[noreturn]] void fail(const std::string& what) { throw Failure(what); }
void check(bool ok, const std::string& what) {
  if (!ok) fail(what);
}

struct Counters {
  int64_t iterations = 0, builds_ok = 0, builds_rejected = 0, searches = 0, inserts = 0, files_loaded = 0, files_rejected = 0;
  int64_t indexed_rejected = 0;  // IndexedKeys calls with bad input (non-finite values, k out of range) that threw
};

// Inputs that once crashed the core are part of every run: non-finite keys straight into the graph class (rejected by
// its build and insert) and finite keys of huge magnitude (|x| ~ 1e20: squared norms and dot products overflow to inf,
// inf - inf = NaN; the beam ranks NaN scores last), also inside loaded index files.

using Rng = std::mt19937_64;

int64_t uniform(Rng& rng, int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); }
bool chance(Rng& rng, double p) { return std::bernoulli_distribution(p)(rng); }

// Random float rows; `bad` injects one NaN, +Inf or -Inf.
std::vector<float> random_rows(Rng& rng, int64_t rows, int64_t d, bool bad) {
  std::vector<float> v(static_cast<size_t>(rows * d));
  std::normal_distribution<float> dist(0.f, 1.f);
  const int style = static_cast<int>(uniform(rng, 0, 5));
  const float scale = style == 0 ? 1e-3f : style == 1 ? 30.f : 1.f;
  for (auto& x : v) x = dist(rng) * scale;
  if (style == 2)  // duplicates: many identical rows (ties everywhere)
    for (int64_t r = 1; r < rows; ++r)
      if (chance(rng, 0.7)) std::copy(v.begin(), v.begin() + d, v.begin() + r * d);
  if (style == 3) std::fill(v.begin(), v.end(), 0.f);  // all-zero scores
  if (style == 4 && !v.empty()) v[static_cast<size_t>(uniform(rng, 0, static_cast<int64_t>(v.size()) - 1))] = 1e20f;
  if (bad && !v.empty()) {
    const float specials[] = {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                              -std::numeric_limits<float>::infinity()};
    v[static_cast<size_t>(uniform(rng, 0, static_cast<int64_t>(v.size()) - 1))] = specials[uniform(rng, 0, 2)];
  }
  return v;
}

template <class T>
bool storage_finite(const std::vector<T>& v) {
  return all_finite(v.data(), static_cast<int64_t>(v.size()));
}

// Finite values stay finite in T (float16 saturates at +-65504 instead of overflowing to Inf, so the huge keys above
// stay huge-but-finite); injected NaN/Inf stay as they are.
template <class T>
std::vector<T> to_storage(const std::vector<float>& v) {
  constexpr float kMax = std::is_same<T, Half>::value ? 65504.f : std::numeric_limits<float>::max();
  std::vector<T> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = from_float<T>(std::isfinite(v[i]) ? std::clamp(v[i], -kMax, kMax) : v[i]);
  return out;
}

// Sanity of one search result row: ids in [-1, n), no duplicate real ids, -1 only as a tail, scores best-first.
void check_result(const int64_t* ids, const float* scores, int64_t k, int64_t n, const char* what) {
  bool tail = false;
  for (int64_t j = 0; j < k; ++j) {
    check(ids[j] >= -1 && ids[j] < n, std::string(what) + ": id out of range");
    if (ids[j] == -1) {
      tail = true;
      continue;
    }
    check(!tail, std::string(what) + ": real id after -1 padding");
    for (int64_t i = 0; i < j; ++i) check(ids[i] != ids[j], std::string(what) + ": duplicate id");
    if (j > 0 && ids[j - 1] >= 0 && std::isfinite(scores[j]) && std::isfinite(scores[j - 1]))
      check(scores[j] <= scores[j - 1], std::string(what) + ": scores not best-first");
  }
}

// Search every query through the KeyIndex interface, checking the rows.
template <class T>
void search_all(const KeyIndex<T>& idx, const std::vector<float>& queries, int64_t d, int64_t k, int64_t ef, Counters& c) {
  const int64_t m = static_cast<int64_t>(queries.size()) / d, n = idx.size();
  std::vector<int64_t> ids(static_cast<size_t>(k));
  std::vector<float> sc(static_cast<size_t>(k));
  for (int64_t i = 0; i < m; ++i) {
    const int64_t visited = idx.search_one(queries.data() + i * d, k, SearchParams{ef}, ids.data(), sc.data());
    check(visited >= 0 && visited <= std::max<int64_t>(n, 1), "visited out of range");
    check_result(ids.data(), sc.data(), k, n, idx.type_name().c_str());
    ++c.searches;
  }
}

// Every key reachable: with k = ef = n the graph search must return each id exactly once.
template <class T>
void check_finds_every_key(const QueryGuidedGraph<T>& g, Rng& rng) {
  const int64_t n = g.size(), d = g.dim();
  if (n == 0) return;
  check(g.is_connected(), "graph not connected after build/repair");
  std::vector<float> q = random_rows(rng, 1, d, false);
  std::vector<int64_t> ids(static_cast<size_t>(n));
  std::vector<float> sc(static_cast<size_t>(n));
  g.search_one(q.data(), n, SearchParams{n}, ids.data(), sc.data());
  std::vector<char> seen(static_cast<size_t>(n), 0);
  for (int64_t id : ids) {
    check(id >= 0 && id < n && !seen[static_cast<size_t>(id)], "k = ef = n search is not a permutation of the keys");
    seen[static_cast<size_t>(id)] = 1;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Scenario 1: build / search / insert on the index classes directly.
template <class T>
void fuzz_build(Rng& rng, Counters& c) {
  const int64_t d = uniform(rng, 1, 24);
  const int64_t n = chance(rng, 0.1) ? uniform(rng, 0, 2) : uniform(rng, 0, 300);
  auto store = std::make_shared<VectorStore<T>>(d);
  bool finite_keys = true;
  {
    auto rows = to_storage<T>(random_rows(rng, n, d, chance(rng, 0.3)));  // NaN/Inf keys: the graph must reject them
    finite_keys = storage_finite(rows);
    store->append(rows.data(), n);
  }
  const bool graph = chance(rng, 0.7);
  std::unique_ptr<KeyIndex<T>> idx;
  QueryGuidedGraph<T>* g = nullptr;
  if (graph) {
    QueryGuidedParams p;
    bool valid = true;
    p.degree = uniform(rng, 2, 40);
    p.k_train = uniform(rng, 1, 120);
    p.ef_build = uniform(rng, 1, 100);
    p.seed = rng();
    switch (uniform(rng, 0, 9)) {  // one invalid parameter now and then
      case 0: p.degree = chance(rng, 0.5) ? uniform(rng, -5, 1) : uniform(rng, 1025, 5000); valid = false; break;
      case 1: p.k_train = chance(rng, 0.5) ? uniform(rng, -5, 0) : uniform(rng, 100001, 1 << 30); valid = false; break;
      case 2: p.ef_build = chance(rng, 0.5) ? std::numeric_limits<int64_t>::min() : uniform(rng, 100001, 1 << 30); valid = false; break;
      default: break;
    }
    const int64_t m = chance(rng, 0.2) ? 0 : uniform(rng, 1, 200);
    const bool bad_queries = chance(rng, 0.1);
    std::vector<float> train = random_rows(rng, m, d, bad_queries);
    valid = valid && !(bad_queries && m > 0) && finite_keys;
    const bool with_knn = m > 0 && chance(rng, 0.3);
    std::vector<int64_t> knn;
    int64_t knn_k = 0;
    if (with_knn) {
      knn_k = chance(rng, 0.05) ? 0 : uniform(rng, 1, 50);
      knn.resize(static_cast<size_t>(m * knn_k));
      for (auto& id : knn) id = chance(rng, 0.1) ? -1 : (n > 0 ? uniform(rng, 0, n - 1) : -1);
      if (knn_k == 0) valid = false;
      if (!knn.empty() && chance(rng, 0.15)) {
        const int64_t bad[] = {n, n + 1, -2, std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max(), 1ll << 32};
        knn[static_cast<size_t>(uniform(rng, 0, static_cast<int64_t>(knn.size()) - 1))] = bad[uniform(rng, 0, 5)];
        valid = false;
      }
    }
    try {
      std::unique_ptr<QueryGuidedGraph<T>> built =
          with_knn ? QueryGuidedGraph<T>::build_from_neighbors(store, train.data(), m, knn.empty() ? nullptr : knn.data(), knn_k, p)
                   : QueryGuidedGraph<T>::build(store, train.data(), m, p);
      check(valid, "invalid build input accepted (query_guided)");
      g = built.get();
      idx = std::move(built);
      ++c.builds_ok;
    } catch (const Failure&) {
      throw;
    } catch (const std::exception& e) {
      if (valid) fail(std::string("valid build rejected: ") + e.what());
      ++c.builds_rejected;
      return;
    }
    check_finds_every_key(*g, rng);
  } else {
    idx = std::make_unique<FlatIndex<T>>(store);
    ++c.builds_ok;
  }

  // searches: k in [1, n + 3] (the interface pads beyond n), ef in [1, 2n]; k <= 0 / ef <= 0 must throw
  for (int rep = 0; rep < 3; ++rep) {
    const int64_t m = uniform(rng, 1, 8);
    auto q = random_rows(rng, m, d, false);
    const int64_t k = uniform(rng, 1, std::min<int64_t>(n + 3, 64)), ef = uniform(rng, 1, std::max<int64_t>(2 * n, 2));
    search_all(*idx, q, d, k, ef, c);
  }
  for (const auto& [k, ef] : {std::pair<int64_t, int64_t>{0, 8}, {-3, 8}, {1, 0}, {1, -1}}) {
    if (!graph && ef <= 0) continue;  // exact indexes ignore ef
    std::vector<int64_t> ids(4);
    std::vector<float> sc(4), q(static_cast<size_t>(d), 1.f);
    try {
      idx->search_one(q.data(), k, SearchParams{ef}, ids.data(), sc.data());
      fail("search with k=" + std::to_string(k) + " ef=" + std::to_string(ef) + " accepted");
    } catch (const std::invalid_argument&) {
    }
  }

  // inserts: append rows to the store, index them (a few rounds; also grows an empty graph from nothing)
  const int rounds = static_cast<int>(uniform(rng, 0, 3));
  for (int r = 0; r < rounds; ++r) {
    const int64_t add = uniform(rng, 0, 80);
    auto rows = to_storage<T>(random_rows(rng, add, d, false));
    const bool rows_finite = storage_finite(rows);
    store->append(rows.data(), add);
    if (g && !rows_finite) {
      try {
        idx->index_new_rows();
      } catch (const std::invalid_argument&) {
        return;  // rejected, as it must be; the store now holds rows the graph will never index
      }
      fail("non-finite new keys accepted (query_guided)");
    }
    idx->index_new_rows();
    check(idx->size() == store->size(), "size after insert");
    ++c.inserts;
    auto q = random_rows(rng, 3, d, false);
    search_all(*idx, q, d, uniform(rng, 1, std::min<int64_t>(idx->size() + 2, 40)), uniform(rng, 1, 64), c);
  }
  if (g && rounds > 0) {
    g->repair_connectivity();
    check_finds_every_key(*g, rng);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Scenario 1b: IndexedKeys (what ra.FlatIndex / ra.QueryGuidedIndex wrap) with non-finite keys, queries and new rows and
// k outside [1, n]: each must throw and leave the index as it was.
template <class T>
void expect_reject(const char* what, Counters& c, const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Failure&) {
    throw;
  } catch (const std::exception&) {
    ++c.indexed_rejected;
    return;
  }
  fail(std::string("IndexedKeys accepted ") + what);
}

template <class T>
void fuzz_indexed(Rng& rng, Counters& c) {
  const int64_t n = uniform(rng, 1, 200), d = uniform(rng, 1, 16);
  const bool graph = chance(rng, 0.6);
  auto rows = to_storage<T>(random_rows(rng, n, d, chance(rng, 0.2)));
  const bool bad_keys = !storage_finite(rows);  // NaN/Inf injected, or huge values that overflowed a 16-bit store
  auto train = random_rows(rng, uniform(rng, 0, 30), d, false);
  IndexSpec spec;
  spec.type = graph ? "query_guided" : "flat";
  spec.query_guided.degree = uniform(rng, 2, 16);
  spec.query_guided.k_train = uniform(rng, 1, 30);
  spec.query_guided.ef_build = uniform(rng, 1, 40);
  auto builder = [&](std::shared_ptr<const VectorStore<T>> st) {
    return build_index<T>(spec, std::move(st), train.data(), static_cast<int64_t>(train.size()) / d);
  };
  if (bad_keys) {
    expect_reject<T>("non-finite keys", c, [&] { IndexedKeys<T>(rows.data(), n, d, builder); });
    return;
  }
  IndexedKeys<T> idx(rows.data(), n, d, builder);
  ++c.builds_ok;
  for (int rep = 0; rep < 4; ++rep) {
    const int64_t m = uniform(rng, 1, 6);
    const int which = static_cast<int>(uniform(rng, 0, 3));
    auto q = random_rows(rng, m, d, which == 0);
    const int64_t size = idx.size();
    int64_t k = uniform(rng, 1, size);
    if (which == 1) k = chance(rng, 0.5) ? uniform(rng, -3, 0) : size + uniform(rng, 1, 5);
    std::vector<int64_t> ids(static_cast<size_t>(m * std::max<int64_t>(k, 1))), visited(static_cast<size_t>(m));
    std::vector<float> sc(ids.size());
    auto search = [&] { idx.search(q.data(), m, k, SearchParams{uniform(rng, 1, 64)}, ids.data(), sc.data(), visited.data()); };
    if (which == 0) {
      expect_reject<T>("non-finite queries", c, search);
    } else if (which == 1) {
      expect_reject<T>("k outside [1, n]", c, search);
    } else {
      search();
      for (int64_t i = 0; i < m; ++i) check_result(ids.data() + i * k, sc.data() + i * k, k, size, "IndexedKeys");
      c.searches += m;
    }
    const int64_t add = uniform(rng, 1, 30);
    auto more = to_storage<T>(random_rows(rng, add, d, chance(rng, 0.3)));
    const bool bad_rows = !storage_finite(more);
    if (bad_rows) {
      expect_reject<T>("non-finite new keys", c, [&] { idx.add(more.data(), add); });
      check(idx.size() == size, "a rejected add changed the index size");
    } else {
      idx.add(more.data(), add);
      ++c.inserts;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Scenario 2: index files.
constexpr size_t kHeader = 8 + 4 + 16 + 4 + 8;

std::vector<uint8_t> read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<uint8_t>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}
void write_bytes(const std::string& path, const std::vector<uint8_t>& b) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
  if (!f) fail("cannot write " + path);
}
void fix_header(std::vector<uint8_t>& b) {  // payload length and checksum made consistent with the bytes
  if (b.size() < kHeader + 8) return;
  const int64_t len = static_cast<int64_t>(b.size() - kHeader - 8);
  std::memcpy(b.data() + 32, &len, 8);
  const uint64_t sum = fnv1a64(b.data(), b.size() - 8);
  std::memcpy(b.data() + b.size() - 8, &sum, 8);
}

template <class T>
std::unique_ptr<IndexedKeys<T>> make_indexed(Rng& rng, int64_t n, int64_t d, bool graph) {
  auto rows = to_storage<T>(random_rows(rng, n, d, false));
  const int64_t m = uniform(rng, 0, 40);
  auto train = random_rows(rng, m, d, false);
  IndexSpec spec;
  spec.type = graph ? "query_guided" : "flat";
  spec.query_guided.degree = uniform(rng, 2, 16);
  spec.query_guided.k_train = uniform(rng, 1, 30);
  spec.query_guided.ef_build = uniform(rng, 1, 40);
  return std::make_unique<IndexedKeys<T>>(rows.data(), n, d, [&](std::shared_ptr<const VectorStore<T>> s) {
    return build_index<T>(spec, std::move(s), train.data(), m);
  });
}

template <class T>
void use_loaded(IndexedKeys<T>& idx, const std::string& path, Rng& rng, Counters& c);

// The IndexedKeys payload starts with n, d and the n x d key rows.
bool payload_dims(const IndexFile& file, int64_t& n, int64_t& d) {
  if (file.payload.size() < 16) return false;
  std::memcpy(&n, file.payload.data(), 8);
  std::memcpy(&d, file.payload.data() + 8, 8);
  return true;
}
template <class T>
bool keys_finite(const IndexFile& file) {
  int64_t n = 0, d = 0;
  if (!payload_dims(file, n, d)) return true;
  const size_t count = static_cast<size_t>(n * d);  // load succeeded, so n * d rows are in the payload
  for (size_t i = 0; i < count; ++i) {
    T x;
    std::memcpy(&x, file.payload.data() + 16 + i * sizeof(T), sizeof(T));
    if (!std::isfinite(to_float(x))) return false;
  }
  return true;
}

// Load `path` the way ra.load_index does; returns whether it loaded. A loaded index must be usable.
template <class T>
bool load_and_use(const IndexFile& file, const std::string& path, Rng& rng, Counters& c) {
  auto idx = IndexedKeys<T>::load(file, path, &load_index_payload<T>);
  check(keys_finite<T>(file), "an index file with non-finite key values was accepted");
  try {  // from here on nothing may throw: the file was accepted, so the index has to work
    use_loaded(*idx, path, rng, c);
  } catch (const Failure&) {
    throw;
  } catch (const std::exception& e) {
    fail(std::string("accepted index file is unusable: ") + e.what());
  }
  return true;
}

template <class T>
void use_loaded(IndexedKeys<T>& idx_ref, const std::string& path, Rng& rng, Counters& c) {
  IndexedKeys<T>* idx = &idx_ref;
  const int64_t n = idx->size(), d = idx->dim();
  check(n > 0 && d > 0, "loaded index with no keys");
  const int64_t m = uniform(rng, 1, 4), k = uniform(rng, 1, std::min<int64_t>(n, 32));
  auto q = random_rows(rng, m, d, false);
  std::vector<int64_t> ids(static_cast<size_t>(m * k)), visited(static_cast<size_t>(m));
  std::vector<float> sc(static_cast<size_t>(m * k));
  idx->search(q.data(), m, k, SearchParams{uniform(rng, 1, 64)}, ids.data(), sc.data(), visited.data());
  for (int64_t i = 0; i < m; ++i) check_result(ids.data() + i * k, sc.data() + i * k, k, n, "loaded index");
  c.searches += m;
  if (chance(rng, 0.5)) {  // a loaded (possibly odd but valid) graph still takes inserts and saves
    auto rows = to_storage<T>(random_rows(rng, uniform(rng, 1, 20), d, false));
    idx->add(rows.data(), static_cast<int64_t>(rows.size()) / d);
    ++c.inserts;
    idx->save(path + ".again");
    auto again = read_index_file(path + ".again");
    IndexedKeys<T>::load(again, path + ".again", &load_index_payload<T>);
    std::remove((path + ".again").c_str());
  }
}

bool load_any(const std::string& path, Rng& rng, Counters& c) {
  const IndexFile file = read_index_file(path);
  switch (file.kind) {
    case ScalarKind::Float32: return load_and_use<float>(file, path, rng, c);
    case ScalarKind::Float16: return load_and_use<Half>(file, path, rng, c);
    case ScalarKind::BFloat16: return load_and_use<BFloat16>(file, path, rng, c);
  }
  fail("unreachable scalar kind");
}

template <class T>
void fuzz_file(Rng& rng, Counters& c, const std::string& dir, int64_t iter) {
  const std::string path = dir + "/fuzz-" + std::to_string(::getpid()) + "-" + std::to_string(iter) + ".raidx";
  const int64_t n = uniform(rng, 1, 120), d = uniform(rng, 1, 16);
  auto idx = make_indexed<T>(rng, n, d, chance(rng, 0.7));
  if (chance(rng, 0.3)) {
    auto rows = to_storage<T>(random_rows(rng, uniform(rng, 1, 30), d, false));
    idx->add(rows.data(), static_cast<int64_t>(rows.size()) / d);
  }
  idx->save(path);
  const std::vector<uint8_t> good = read_bytes(path);
  check(load_any(path, rng, c), "a freshly saved index does not load");

  std::vector<uint8_t> b = good;
  bool must_fail = false;  // checksum left stale or header broken: the file has to be rejected
  const size_t payload = kHeader, payload_len = good.size() - kHeader - 8;
  const int kind = static_cast<int>(uniform(rng, 0, 11));
  static const int64_t interesting64[] = {0, 1, -1, 2, 3, 7, 8, 16, 17, 255, 256, 1 << 20, (1 << 20) + 1, 1ll << 31, 1ll << 32,
                                          (1ll << 32) - 1, 1ll << 40, 1ll << 61, 1ll << 62, (1ll << 62) + 1, 3ll << 61,
                                          std::numeric_limits<int64_t>::max(), std::numeric_limits<int64_t>::min(),
                                          std::numeric_limits<int64_t>::max() / 2 + 1, std::numeric_limits<int64_t>::max() / 4 + 1};
  static const uint32_t interesting32[] = {0, 1, 2, 0x7fffffffu, 0x80000000u, 0xffffffffu, 0xfffffffeu, 1u << 16, 1024, 1025};
  switch (kind) {
    case 0: {  // random bit flips, checksum stale
      const int flips = static_cast<int>(uniform(rng, 1, 8));
      for (int i = 0; i < flips; ++i) b[static_cast<size_t>(uniform(rng, 0, static_cast<int64_t>(b.size()) - 1))] ^= uint8_t(1u << uniform(rng, 0, 7));
      must_fail = b != good;
      break;
    }
    case 1:  // truncated anywhere
      b.resize(static_cast<size_t>(uniform(rng, 0, static_cast<int64_t>(b.size()) - 1)));
      must_fail = true;
      break;
    case 2: {  // extended with junk
      const int64_t extra = uniform(rng, 1, 64);
      for (int64_t i = 0; i < extra; ++i) b.push_back(static_cast<uint8_t>(rng()));
      must_fail = true;
      break;
    }
    case 3: {  // random bytes, sometimes behind a real magic
      b.resize(static_cast<size_t>(uniform(rng, 0, 400)));
      for (auto& x : b) x = static_cast<uint8_t>(rng());
      if (b.size() >= 8 && chance(rng, 0.5)) std::memcpy(b.data(), kIndexMagic, 8);
      must_fail = true;
      break;
    }
    case 4: {  // interesting int64 at an 8-byte field of the payload, checksum fixed
      if (payload_len >= 8) {
        // the payload's int64 fields: IndexedKeys n, d; then the index payload (flat: n; query_guided: u32 version,
        // degree, k_train, ef_build, seed, n, dim, stride, entry, repaired_at, adjacency length)
        const size_t g0 = 16 + static_cast<size_t>(idx->size() * d) * sizeof(T);
        std::vector<size_t> fields = {0, 8, g0};
        if (idx->type_name() == "query_guided")
          for (size_t f = 0; f < 11; ++f) fields.push_back(g0 + 4 + 8 * f);
        const size_t off = payload + fields[static_cast<size_t>(uniform(rng, 0, static_cast<int64_t>(fields.size()) - 1))];
        const size_t at = chance(rng, 0.8) && off + 8 <= payload + payload_len
                              ? off
                              : payload + static_cast<size_t>(uniform(rng, 0, static_cast<int64_t>(payload_len) - 8));
        int64_t v = interesting64[uniform(rng, 0, static_cast<int64_t>(sizeof(interesting64) / 8) - 1)];
        if (chance(rng, 0.3)) {
          int64_t old;
          std::memcpy(&old, b.data() + at, 8);
          v = old + uniform(rng, -2, 2);
        }
        std::memcpy(b.data() + at, &v, 8);
      }
      fix_header(b);
      break;
    }
    case 5: {  // interesting uint32 anywhere in the payload (graph adjacency entries, counts), checksum fixed
      if (payload_len >= 4) {
        const size_t at = payload + static_cast<size_t>(uniform(rng, 0, static_cast<int64_t>(payload_len) - 4));
        uint32_t v = interesting32[uniform(rng, 0, static_cast<int64_t>(sizeof(interesting32) / 4) - 1)];
        if (chance(rng, 0.5)) v = static_cast<uint32_t>(uniform(rng, 0, n + 40));
        std::memcpy(b.data() + at, &v, 4);
      }
      fix_header(b);
      break;
    }
    case 6: {  // random byte flips in the payload, checksum fixed
      const int flips = static_cast<int>(uniform(rng, 1, 16));
      for (int i = 0; i < flips && payload_len > 0; ++i)
        b[payload + static_cast<size_t>(uniform(rng, 0, static_cast<int64_t>(payload_len) - 1))] = static_cast<uint8_t>(rng());
      fix_header(b);
      break;
    }
    case 7: {  // payload cut or grown, length and checksum fixed
      const int64_t new_len = uniform(rng, 0, static_cast<int64_t>(payload_len) + 32);
      std::vector<uint8_t> pl(b.begin() + static_cast<std::ptrdiff_t>(payload), b.begin() + static_cast<std::ptrdiff_t>(payload + payload_len));
      const size_t old = pl.size();
      pl.resize(static_cast<size_t>(new_len));
      for (size_t i = old; i < pl.size(); ++i) pl[i] = static_cast<uint8_t>(rng());
      b.resize(payload);
      b.insert(b.end(), pl.begin(), pl.end());
      b.resize(b.size() + 8);
      fix_header(b);
      break;
    }
    case 8: {  // other index type name (flat <-> query_guided, unknown, unterminated), checksum fixed
      const char* names[] = {"flat", "query_guided", "hnsw", "", "0123456789abcdef"};
      char name[16] = {0};
      const std::string nm = names[uniform(rng, 0, 4)];
      std::memcpy(name, nm.data(), std::min<size_t>(nm.size(), 16));
      std::memcpy(b.data() + 12, name, 16);
      fix_header(b);
      break;
    }
    case 9: {  // other scalar kind (reinterprets the key bytes; row count no longer matches), checksum fixed
      const uint32_t k = static_cast<uint32_t>(uniform(rng, 0, 4));
      std::memcpy(b.data() + 28, &k, 4);
      fix_header(b);
      must_fail = k > 2;
      break;
    }
    case 10: {  // other format version / magic, checksum fixed
      if (chance(rng, 0.5)) {
        const uint32_t v = interesting32[uniform(rng, 0, 9)];
        std::memcpy(b.data() + 8, &v, 4);
        must_fail = v != kIndexFormatVersion;
      } else {
        b[static_cast<size_t>(uniform(rng, 0, 7))] ^= 0x20;
        must_fail = true;
      }
      fix_header(b);
      break;
    }
    default: {  // splice: header of this file, payload bytes of a different index
      Rng other(rng());
      auto idx2 = make_indexed<T>(other, uniform(rng, 1, 60), uniform(rng, 1, 16), chance(rng, 0.5));
      idx2->save(path);
      const auto b2 = read_bytes(path);
      b.resize(payload);
      b.insert(b.end(), b2.begin() + static_cast<std::ptrdiff_t>(payload), b2.end());
      fix_header(b);
      break;
    }
  }
  write_bytes(path, b);
  try {
    load_any(path, rng, c);
    check(!must_fail, "mutated file (kind " + std::to_string(kind) + ") loaded although its header/checksum is wrong");
    ++c.files_loaded;
  } catch (const Failure&) {
    std::remove(path.c_str());
    throw;
  } catch (const std::exception&) {
    ++c.files_rejected;
  }
  if (chance(rng, 0.05)) {  // missing file
    std::remove(path.c_str());
    try {
      read_index_file(path);
      fail("missing file loaded");
    } catch (const std::runtime_error&) {
    }
  }
  std::remove(path.c_str());
}

// ---------------------------------------------------------------------------------------------------------------
template <class Fn>
void with_scalar(int which, Fn&& fn) {
  if (which == 0) fn(static_cast<float*>(nullptr));
  else if (which == 1) fn(static_cast<Half*>(nullptr));
  else fn(static_cast<BFloat16*>(nullptr));
}

void run_iteration(uint64_t seed, int64_t iter, Counters& c, const std::string& dir) {
  Rng rng(seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(iter));
  const int scalar = static_cast<int>(uniform(rng, 0, 2));
  const int scenario = static_cast<int>(uniform(rng, 0, 5));  // 0-1 build, 2 IndexedKeys, 3-5 files
  with_scalar(scalar, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if (scenario <= 1) fuzz_build<T>(rng, c);
    else if (scenario == 2) fuzz_indexed<T>(rng, c);
    else fuzz_file<T>(rng, c, dir, iter);
  });
  ++c.iterations;
}

}  // namespace

int main(int argc, char** argv) {
  double seconds = 20;
  uint64_t seed = 1;
  int64_t max_iterations = -1, only = -1;
  bool verbose = false;
  std::string dir = ".";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "missing value after %s\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--seconds") seconds = std::stod(next());
    else if (a == "--seed") seed = std::stoull(next());
    else if (a == "--iterations") max_iterations = std::stoll(next());
    else if (a == "--only") only = std::stoll(next());
    else if (a == "--dir") dir = next();
    else if (a == "--verbose") verbose = true;
    else {
      std::fprintf(stderr, "usage: %s [--seconds S] [--seed N] [--iterations N] [--only I] [--dir PATH] [--verbose]\n", argv[0]);
      return 2;
    }
  }
  Counters c;
  const auto t0 = std::chrono::steady_clock::now();
  auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
  for (int64_t iter = only >= 0 ? only : 0;; ++iter) {
    if (only >= 0 && iter > only) break;
    if (only < 0 && ((max_iterations >= 0 && iter >= max_iterations) || (max_iterations < 0 && elapsed() >= seconds))) break;
    if (verbose) std::fprintf(stderr, "iteration %lld\n", static_cast<long long>(iter));
    try {
      run_iteration(seed, iter, c, dir);
    } catch (const Failure& f) {
      std::fprintf(stderr, "FAIL seed=%llu iteration=%lld: %s\n  rerun: %s --seed %llu --only %lld\n", static_cast<unsigned long long>(seed),
                   static_cast<long long>(iter), f.what(), argv[0], static_cast<unsigned long long>(seed), static_cast<long long>(iter));
      return 1;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "FAIL seed=%llu iteration=%lld: unexpected exception escaped a scenario: %s\n  rerun: %s --seed %llu --only %lld\n",
                   static_cast<unsigned long long>(seed), static_cast<long long>(iter), e.what(), argv[0],
                   static_cast<unsigned long long>(seed), static_cast<long long>(iter));
      return 1;
    }
  }
  std::printf(
      "fuzz_index: seed=%llu iterations=%lld in %.1f s; builds ok=%lld rejected=%lld; searches=%lld; inserts=%lld; mutated files "
      "loaded=%lld rejected=%lld; bad IndexedKeys calls rejected=%lld; no crash\n",
      static_cast<unsigned long long>(seed), static_cast<long long>(c.iterations), elapsed(), static_cast<long long>(c.builds_ok),
      static_cast<long long>(c.builds_rejected), static_cast<long long>(c.searches), static_cast<long long>(c.inserts),
      static_cast<long long>(c.files_loaded), static_cast<long long>(c.files_rejected),
      static_cast<long long>(c.indexed_rejected));
  return 0;
}
