// retrieval_attention/index_registry.h -- index types by name: construction parameters, builders, loaders.
//
// Contract
//   * IndexSpec names an index type ("flat" or "query_guided") and carries its build parameters.
//   * make_layer_factory(spec) gives the OffloadedLayer factory (keys + training queries -> index).
//   * load_index_payload(type, keys, reader) restores an index of any registered type from a file payload.
//   Adding an index type = its header + one branch in each function here + its binding + its test.
#pragma once

#include <memory>
#include <string>

#include "flat_index.h"
#include "offloaded_layer.h"
#include "query_guided_graph.h"

namespace retrieval_attention {

struct IndexSpec {
  std::string type = "flat";
  QueryGuidedParams query_guided;
};

// Visits every integer build parameter of the spec as (name, reference) so bindings can fill them by name.
template <class Fn>
void apply_index_params(IndexSpec& spec, Fn&& fn) {
  if (spec.type == "query_guided") {
    fn("degree", spec.query_guided.degree);
    fn("k_train", spec.query_guided.k_train);
    fn("ef_build", spec.query_guided.ef_build);
    fn("ef_weak", spec.query_guided.ef_weak);
    fn("n_pivots", spec.query_guided.n_pivots);
  }
}

inline bool index_param_known(const IndexSpec& spec, const std::string& name) {
  bool known = false;
  IndexSpec copy = spec;
  apply_index_params(copy, [&](const char* key, int64_t&) { known = known || name == key; });
  return known;
}

// knn_ids (n_train x knn_k, best-first, -1 padding) may carry the training queries' exact neighbours computed
// elsewhere (e.g. on a GPU); null means the index computes them itself if it needs them.
// key_knn (n x key_knn_k) may carry each key's nearest keys for the graph's weak-key links (query_guided only).
// projection (n x projection_k int32) may carry the graph's projection made elsewhere from knn_ids (query_guided only;
// ignored without knn_ids).
// inputs_checked: the caller has validated the keys, queries and lists (see QueryGuidedGraph::build).
template <class T>
std::unique_ptr<KeyIndex<T>> build_index(const IndexSpec& spec, std::shared_ptr<const VectorStore<T>> keys, const float* train_queries,
                                         int64_t n_train, const int64_t* knn_ids = nullptr, int64_t knn_k = 0,
                                         const int64_t* key_knn = nullptr, int64_t key_knn_k = 0, const int32_t* projection = nullptr,
                                         int64_t projection_k = 0, bool inputs_checked = false) {
  if (spec.type == "flat") return std::make_unique<FlatIndex<T>>(std::move(keys));
  if (spec.type == "query_guided") {
    if (knn_ids)
      return QueryGuidedGraph<T>::build_from_neighbors(std::move(keys), train_queries, n_train, knn_ids, knn_k, spec.query_guided, key_knn,
                                                       key_knn_k, projection, projection_k, inputs_checked);
    return QueryGuidedGraph<T>::build(std::move(keys), train_queries, n_train, spec.query_guided, key_knn, key_knn_k, inputs_checked);
  }
  throw std::invalid_argument("unknown index type '" + spec.type + "'");
}

// The layer checks every input of its builds once (OffloadedLayer::build), so its indexes do not check them again.
template <class T>
typename OffloadedLayer<T>::IndexFactory make_layer_factory(const IndexSpec& spec) {
  return [spec](std::shared_ptr<const VectorStore<T>> keys, const float* train, int64_t n_train, const int64_t* knn, int64_t knn_k,
                const int64_t* key_knn, int64_t key_knn_k, const int32_t* projection, int64_t projection_k) {
    return build_index<T>(spec, std::move(keys), train, n_train, knn, knn_k, key_knn, key_knn_k, projection, projection_k,
                          /*inputs_checked=*/true);
  };
}

template <class T>
std::unique_ptr<KeyIndex<T>> load_index_payload(const std::string& type, std::shared_ptr<const VectorStore<T>> keys, PayloadReader& r) {
  if (type == "flat") return FlatIndex<T>::load(std::move(keys), r);
  if (type == "query_guided") return QueryGuidedGraph<T>::load(std::move(keys), r);
  r.fail("unknown index type '" + type + "'");
}

}  // namespace retrieval_attention
