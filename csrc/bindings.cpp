// csrc/bindings.cpp -- pybind11 classes of retrieval_attention._C: standalone indexes and the offloaded
// (CPU) half of an attention layer. Thin: checks tensors, dispatches on dtype, releases the GIL, calls the core.
// Python-side wrappers (python/retrieval_attention/index.py, cache.py) do the user-facing validation.
#include <torch/extension.h>

#include <c10/core/Event.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <chrono>
#include <cstring>
#include <numeric>
#include <optional>
#include <variant>

#include "retrieval_attention/index_registry.h"
#include "retrieval_attention/indexed_keys.h"
#include "tensor_checks.h"

namespace ra = retrieval_attention;
namespace py = pybind11;
using namespace ra_ext;

namespace {

ra::IndexSpec spec_from(const std::string& type, const py::dict& params) {
  ra::IndexSpec spec;
  spec.type = type;
  TORCH_CHECK_VALUE(type == "flat" || type == "query_guided", "unknown index type '", type, "' (choose flat or query_guided)");
  for (auto item : params) {
    TORCH_CHECK_TYPE(py::isinstance<py::str>(item.first), "index parameter names must be strings");
    const auto key = item.first.cast<std::string>();
    TORCH_CHECK_VALUE(ra::index_param_known(spec, key), "unknown parameter '", key, "' for index type '", type, "'");
  }
  ra::apply_index_params(spec, [&](const char* key, int64_t& value) {
    if (!params.contains(key)) return;
    py::handle v = params[key];
    TORCH_CHECK_TYPE(py::isinstance<py::int_>(v) && !py::isinstance<py::bool_>(v), "index parameter '", key, "' must be an int, got ",
                     std::string(py::str(py::type::of(v).attr("__name__"))));
    const py::int_ big = py::reinterpret_borrow<py::int_>(v);
    TORCH_CHECK_VALUE(big.attr("bit_length")().cast<int64_t>() < 63, "index parameter '", key, "' is out of range: ", std::string(py::str(v)));
    value = big.cast<int64_t>();
  });
  return spec;
}

// Raises the error a build with these parameters would raise (unknown name, wrong type, out of range), so
// RetrievalConfig can reject bad index_params when it is made rather than at the first long prompt.
void check_index_params(const std::string& type, const py::dict& params) {
  const ra::IndexSpec spec = spec_from(type, params);
  if (spec.type == "query_guided") spec.query_guided.validate();  // std::invalid_argument -> ValueError
}

// Every integer build parameter of the index type, the given ones over the core's defaults (one place for defaults).
py::dict resolved_index_params(const std::string& type, const py::dict& params) {
  ra::IndexSpec spec = spec_from(type, params);
  py::dict out;
  ra::apply_index_params(spec, [&](const char* key, int64_t& value) { out[key] = value; });
  return out;
}

// A build's optional projection lists (query-guided graphs): int32 on the CPU, `dims` dims, given with the knn lists
// they were made from; the caller checks the sizes, the graph build the ids (range, self-loops, repeats).
at::Tensor projection_arg(const c10::optional<at::Tensor>& p, int64_t dims, const char* layout, bool have_knn) {
  if (!p) return at::Tensor();
  check_cpu(*p, "projection");
  check_dim(*p, dims, "projection", layout);
  TORCH_CHECK_TYPE(p->scalar_type() == at::kInt, "projection must be int32");
  TORCH_CHECK_VALUE(have_knn, "projection needs the knn lists it was made from");
  return p->contiguous();
}

at::Tensor rows_tensor(const at::Tensor& t, int64_t d, const char* name) {
  check_cpu(t, name);
  check_dim(t, 2, name, "(n, dim)");
  TORCH_CHECK_VALUE(t.size(1) == d, name, " has dim ", t.size(1), ", expected ", d);
  return t.contiguous();
}

template <class T>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

class PyIndex {
 public:
  using Variant = std::variant<std::unique_ptr<ra::IndexedKeys<float>>, std::unique_ptr<ra::IndexedKeys<ra::Half>>,
                               std::unique_ptr<ra::IndexedKeys<ra::BFloat16>>>;
  explicit PyIndex(Variant v) : v_(std::move(v)) {}

  static PyIndex build(const at::Tensor& keys, const c10::optional<at::Tensor>& train_queries, const std::string& type, const py::dict& params,
                       const c10::optional<at::Tensor>& knn, const c10::optional<at::Tensor>& key_knn,
                       const c10::optional<at::Tensor>& projection) {
    check_cpu(keys, "keys");
    check_dim(keys, 2, "keys", "(n, dim)");
    check_float_storage(keys, "keys");
    const ra::IndexSpec spec = spec_from(type, params);
    at::Tensor train;
    if (train_queries) train = rows_tensor(train_queries->to(at::kFloat), keys.size(1), "train_queries");
    const auto kc = keys.contiguous();
    at::Tensor knn_c;
    if (knn) {
      TORCH_CHECK_VALUE(train.defined(), "knn needs train_queries");
      check_cpu(*knn, "knn");
      check_dim(*knn, 2, "knn", "(n_train, k)");
      TORCH_CHECK_TYPE(knn->scalar_type() == at::kLong, "knn must be int64");
      TORCH_CHECK_VALUE(knn->size(0) == train.size(0), "knn has ", knn->size(0), " rows, train_queries ", train.size(0));
      knn_c = knn->contiguous();
      TORCH_CHECK_VALUE(knn_c.numel() == 0 || (knn_c.min().item<int64_t>() >= -1 && knn_c.max().item<int64_t>() < keys.size(0)),
                        "knn ids must be in [-1, n_keys)");
    }
    at::Tensor key_knn_c;
    if (key_knn) {
      check_cpu(*key_knn, "key_knn");
      check_dim(*key_knn, 2, "key_knn", "(n_keys, k)");
      TORCH_CHECK_TYPE(key_knn->scalar_type() == at::kLong, "key_knn must be int64");
      TORCH_CHECK_VALUE(key_knn->size(0) == keys.size(0) && key_knn->size(1) > 0, "key_knn must have one row per key and k > 0 columns");
      TORCH_CHECK_VALUE(type == "query_guided", "key_knn is for index type 'query_guided'");
      key_knn_c = key_knn->contiguous();
    }
    const at::Tensor proj_c = projection_arg(projection, 2, "(n_keys, degree)", knn_c.defined());
    if (proj_c.defined()) {
      TORCH_CHECK_VALUE(proj_c.size(0) == keys.size(0), "projection must have one row per key");
      TORCH_CHECK_VALUE(type == "query_guided", "projection is for index type 'query_guided'");
    }
    return dispatch_storage(keys.scalar_type(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      py::gil_scoped_release no_gil;
      auto builder = [&](std::shared_ptr<const ra::VectorStore<T>> store) {
        return ra::build_index<T>(spec, store, train.defined() ? train.data_ptr<float>() : nullptr, train.defined() ? train.size(0) : 0,
                                  knn_c.defined() ? knn_c.data_ptr<int64_t>() : nullptr, knn_c.defined() ? knn_c.size(1) : 0,
                                  key_knn_c.defined() ? key_knn_c.data_ptr<int64_t>() : nullptr, key_knn_c.defined() ? key_knn_c.size(1) : 0,
                                  proj_c.defined() ? proj_c.data_ptr<int32_t>() : nullptr, proj_c.defined() ? proj_c.size(1) : 0);
      };
      return translate_errors([&] { return PyIndex(Variant(std::make_unique<ra::IndexedKeys<T>>(ptr<const T>(kc), kc.size(0), kc.size(1), builder))); });
    });
  }

  static PyIndex load(const std::string& path) {
    py::gil_scoped_release no_gil;
    const ra::IndexFile file = ra::read_index_file(path);
    return dispatch_storage(dtype_of(file.kind), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      return PyIndex(Variant(ra::IndexedKeys<T>::load(file, path, &ra::load_index_payload<T>)));
    });
  }

  py::tuple search(const at::Tensor& queries, int64_t k, int64_t ef, const std::optional<at::Tensor>& seeds) const {
    return std::visit(
        [&](const auto& idx) {
          const at::Tensor q = rows_tensor(queries, idx->dim(), "queries");
          TORCH_CHECK_TYPE(q.scalar_type() == at::kFloat, "queries must be float32 here");
          const int64_t m = q.size(0);
          at::Tensor sd;
          if (seeds.has_value()) {
            sd = seeds->contiguous();
            TORCH_CHECK_TYPE(sd.scalar_type() == at::kLong, "seeds must be int64");
            TORCH_CHECK_VALUE(sd.device().is_cpu() && sd.dim() == 2 && sd.size(0) == m, "seeds must be a CPU tensor (m, s) with one row per query");
          }
          auto ids = at::empty({m, k}, at::kLong);
          auto scores = at::empty({m, k}, at::kFloat);
          auto visited = at::empty({m}, at::kLong);
          {
            py::gil_scoped_release no_gil;
            translate_errors([&] {
              ra::SearchParams p;
              p.ef = ef;
              idx->search(q.data_ptr<float>(), m, k, p, ids.data_ptr<int64_t>(), scores.data_ptr<float>(), visited.data_ptr<int64_t>(),
                          sd.defined() ? sd.data_ptr<int64_t>() : nullptr, sd.defined() ? sd.size(1) : 0);
            });
          }
          return py::make_tuple(ids, scores, visited);
        },
        v_);
  }

  void add(const at::Tensor& rows) {
    std::visit(
        [&](auto& idx) {
          using T = typename std::remove_reference_t<decltype(*idx)>::Scalar;
          const at::Tensor r = rows_tensor(rows, idx->dim(), "new_keys");
          TORCH_CHECK_TYPE(kind_of(r.scalar_type()) == ra::ScalarTraits<T>::kind, "new_keys dtype ", r.scalar_type(), " differs from the index dtype");
          py::gil_scoped_release no_gil;
          idx->add(ptr<const T>(r), r.size(0));
        },
        v_);
  }

  void save(const std::string& path) const {
    std::visit(
        [&](const auto& idx) {
          py::gil_scoped_release no_gil;
          idx->save(path);
        },
        v_);
  }

  int64_t size() const { return std::visit([](const auto& i) { return i->size(); }, v_); }
  int64_t dim() const { return std::visit([](const auto& i) { return i->dim(); }, v_); }
  std::string type_name() const { return std::visit([](const auto& i) { return i->type_name(); }, v_); }
  int64_t vector_bytes() const { return std::visit([](const auto& i) { return i->vector_bytes(); }, v_); }
  int64_t structure_bytes() const { return std::visit([](const auto& i) { return i->structure_bytes(); }, v_); }
  at::ScalarType dtype() const {
    return std::visit([](const auto& i) {
      using T = typename std::remove_reference_t<decltype(*i)>::Scalar;
      return dtype_of(ra::ScalarTraits<T>::kind);
    }, v_);
  }

 private:
  Variant v_;
};

class PyOffloadedLayer {
 public:
  using Variant = std::variant<std::unique_ptr<ra::OffloadedLayer<float>>, std::unique_ptr<ra::OffloadedLayer<ra::Half>>,
                               std::unique_ptr<ra::OffloadedLayer<ra::BFloat16>>>;

  PyOffloadedLayer(at::ScalarType dtype, int64_t hq, int64_t hkv, int64_t d, int64_t dv, const std::string& type, const py::dict& params,
                   int64_t max_unindexed, const std::string& sharing)
      : dtype_(dtype), hq_(hq), hkv_(hkv), d_(d), dv_(dv), sharing_(sharing) {
    const ra::IndexSpec spec = spec_from(type, params);
    const ra::IndexSharing mode = sharing_from(sharing);
    v_ = translate_errors([&] {
      return dispatch_storage(dtype, [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        return Variant(std::make_unique<ra::OffloadedLayer<T>>(hq, hkv, d, dv, ra::make_layer_factory<T>(spec), max_unindexed, mode));
      });
    });
  }

  // A layer constructed like the saved one, filled from `path` (written by save()). The file's dtype, shape and
  // sharing must match the arguments; any problem with the file is a RuntimeError naming it.
  static PyOffloadedLayer load(const std::string& path, at::ScalarType dtype, int64_t hq, int64_t hkv, int64_t d, int64_t dv,
                               const std::string& type, const py::dict& params, int64_t max_unindexed, const std::string& sharing) {
    PyOffloadedLayer layer(dtype, hq, hkv, d, dv, type, params, max_unindexed, sharing);
    std::visit(
        [&](auto& l) {
          using T = typename std::remove_reference_t<decltype(*l)>::Scalar;
          py::gil_scoped_release no_gil;
          const ra::IndexFile file = ra::read_index_file(path);
          TORCH_CHECK(file.kind == ra::ScalarTraits<T>::kind, "offloaded layer file ", path, " stores ", dtype_of(file.kind),
                      " vectors, expected ", dtype);
          translate_errors([&] { l->load_state(file, path, &ra::load_index_payload<T>); });
        },
        layer.v_);
    return layer;
  }

  void save(const std::string& path) const {
    std::visit(
        [&](const auto& l) {
          py::gil_scoped_release no_gil;
          l->save(path);
        },
        v_);
  }

  void build(const at::Tensor& keys, const at::Tensor& values, const at::Tensor& train_queries, const c10::optional<at::Tensor>& knn,
             bool index_now, const c10::optional<at::Tensor>& key_knn, const c10::optional<at::Tensor>& projection) {
    const int64_t t = check_kv(keys, values);
    check_cpu(train_queries, "train_queries");
    check_dim(train_queries, 3, "train_queries", "(q_heads, n_train, head_dim)");
    TORCH_CHECK_VALUE(train_queries.size(0) == hq_ && train_queries.size(2) == d_, "train_queries shape ", train_queries.sizes(),
                      " does not match (", hq_, ", n_train, ", d_, ")");
    const auto tq = train_queries.to(at::kFloat).contiguous();
    const auto kc = keys.contiguous(), vc = values.contiguous();
    at::Tensor knn_c;
    if (knn) {
      check_cpu(*knn, "knn");
      check_dim(*knn, 3, "knn", "(q_heads, n_train, k)");
      TORCH_CHECK_TYPE(knn->scalar_type() == at::kLong, "knn must be int64");
      TORCH_CHECK_VALUE(knn->size(0) == hq_ && knn->size(1) == tq.size(1), "knn shape ", knn->sizes(), " does not match train_queries");
      knn_c = knn->contiguous();  // the layer checks the ids
    }
    at::Tensor key_knn_c;
    if (key_knn) {
      check_cpu(*key_knn, "key_knn");
      check_dim(*key_knn, 3, "key_knn", "(kv_heads, tokens, k)");
      TORCH_CHECK_TYPE(key_knn->scalar_type() == at::kLong, "key_knn must be int64");
      TORCH_CHECK_VALUE(key_knn->size(0) == hkv_ && key_knn->size(1) == t && key_knn->size(2) > 0, "key_knn shape ", key_knn->sizes(),
                        " does not match (", hkv_, ", ", t, ", k > 0)");
      key_knn_c = key_knn->contiguous();
    }
    const at::Tensor proj_c = projection_arg(projection, 3, "(indexes, tokens, degree)", knn_c.defined());
    if (proj_c.defined()) {
      const int64_t n_idx = std::visit([](const auto& l) { return l->index_count(); }, v_);
      TORCH_CHECK_VALUE(proj_c.size(0) == n_idx && proj_c.size(1) == t && proj_c.size(2) > 0, "projection shape ", proj_c.sizes(),
                        " does not match (", n_idx, ", ", t, ", degree)");
    }
    visit_layer([&](auto& layer, auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      layer.build(ptr<const T>(kc), ptr<const T>(vc), t, tq.data_ptr<float>(), tq.size(1), knn_c.defined() ? knn_c.data_ptr<int64_t>() : nullptr,
                  knn_c.defined() ? knn_c.size(2) : 0, index_now, key_knn_c.defined() ? key_knn_c.data_ptr<int64_t>() : nullptr,
                  key_knn_c.defined() ? key_knn_c.size(2) : 0, proj_c.defined() ? proj_c.data_ptr<int32_t>() : nullptr,
                  proj_c.defined() ? proj_c.size(2) : 0);
    });
  }

  void build_indexes() {
    visit_layer([&](auto& layer, auto*) { layer.build_indexes(); });
  }
  bool build_pending() const { return std::visit([](const auto& l) { return l->build_pending(); }, v_); }

  void append(const at::Tensor& keys, const at::Tensor& values) {
    const int64_t t = check_kv(keys, values);
    const auto kc = keys.contiguous(), vc = values.contiguous();
    visit_layer([&](auto& layer, auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      layer.append(ptr<const T>(kc), ptr<const T>(vc), t);
    });
  }

  // Returns (out, lse, visited), plus the retrieved ids (Hq, m, top_k; -1 padded) when return_ids.
  py::tuple retrieve_attend(const at::Tensor& q, int64_t top_k, int64_t ef, double scale, bool return_ids) const {
    check_queries(q);
    const auto qf = q.to(at::kFloat).contiguous();
    const int64_t m = q.size(1);
    auto out = at::empty({hq_, m, dv_}, at::kFloat);
    auto lse = at::empty({hq_, m}, at::kFloat);
    auto visited = at::empty({hq_, m}, at::kLong);
    TORCH_CHECK_VALUE(top_k >= 1, "top_k must be >= 1, got ", top_k);
    at::Tensor ids = return_ids ? at::empty({hq_, m, top_k}, at::kLong) : at::Tensor();
    const_cast<PyOffloadedLayer*>(this)->visit_layer([&](auto& layer, auto*) {
      ra::SearchParams p;
      p.ef = ef;
      layer.retrieve_attend(qf.data_ptr<float>(), m, top_k, p, static_cast<float>(scale), out.data_ptr<float>(), lse.data_ptr<float>(),
                            visited.data_ptr<int64_t>(), return_ids ? ids.data_ptr<int64_t>() : nullptr);
    });
    if (return_ids) return py::make_tuple(out, lse, visited, ids);
    return py::make_tuple(out, lse, visited);
  }

  // One decode step of the layer's attention with the built-in retrieval, on the query's device (CPU or GPU):
  //   query (batch, q_heads, m, head_dim) on the model's device, any float dtype; static_keys / static_values
  //   (kv_rows, n_static, head_dim | value_dim) on that device, kv_rows = batch * kv_heads (slices of larger buffers
  //   are read in place); static_out / static_lse: the static set's attention when the caller computed it (left-padded
  //   batches, whose masking the kernels do not do), else it is computed here by causal dense_attention.
  // On a GPU, in this order: the query is copied in its own dtype to a page-locked buffer kept by this object and an
  // event is recorded; the static attention is queued; then, with the GIL released, the event is awaited, the CPU
  // searches and attends into a second kept page-locked buffer (out then lse), and the merge is queued: its kernel
  // reads that buffer in place and writes the output in the query's dtype. The next step rewrites both buffers safely:
  // its query copy is queued after this step's merge, and its CPU part starts only after that query copy has finished.
  // One C++ call per layer and token instead of a dozen Python-level tensor ops, and two launches fewer than the same
  // ops one at a time (the merge kernel reads the CPU results in place and writes the query's dtype itself).
  // Returns (out (batch, m, q_heads, value_dim) in the query's dtype; the static set's lse, float32 (rows, m) on the
  // device; the CPU part's lse (rows, m) on the CPU and the query on the CPU (rows, m, head_dim) in its dtype, both in
  // the kept buffers, valid until the next call; the keys scored in total), rows = batch * q_heads.
  // timing (optional, int64 CPU tensor of 4, for benchmarks) is set to: the CPU part's [search, attend] thread
  // nanoseconds (RetrievePhaseTimes), then its start and end on the steady clock (CLOCK_MONOTONIC on Linux, the clock
  // of Python's time.perf_counter_ns).
  py::tuple decode_step(const at::Tensor& query, const at::Tensor& static_keys, const at::Tensor& static_values, double scale, int64_t top_k,
                        int64_t ef, const std::optional<at::Tensor>& static_out, const std::optional<at::Tensor>& static_lse,
                        const std::optional<at::Tensor>& timing) {
    check_dim(query, 4, "query", "(batch, q_heads, queries, head_dim)");
    check_dim(static_keys, 3, "static_keys", "(batch * kv_heads, n_static, head_dim)");
    check_dim(static_values, 3, "static_values", "(batch * kv_heads, n_static, value_dim)");
    TORCH_CHECK_TYPE(at::isFloatingType(query.scalar_type()), "query must be a floating tensor, got ", query.scalar_type());
    const int64_t m = query.size(2), rows = query.size(0) * query.size(1);
    TORCH_CHECK_VALUE(rows == hq_ && query.size(3) == d_, "query shape ", query.sizes(), " does not match (batch, q_heads, m, ", d_,
                      ") with batch * q_heads = ", hq_);
    TORCH_CHECK_VALUE(static_keys.size(0) == hkv_ && static_keys.size(2) == d_ && static_values.size(0) == hkv_ && static_values.size(2) == dv_,
                      "static keys/values shapes ", static_keys.sizes(), " / ", static_values.sizes(), " do not match this layer (", hkv_,
                      " kv rows, head_dim ", d_, ", value_dim ", dv_, ")");
    TORCH_CHECK_VALUE(top_k >= 1, "top_k must be >= 1, got ", top_k);
    TORCH_CHECK_VALUE(static_out.has_value() == static_lse.has_value(), "static_out and static_lse go together");
    if (timing) {
      check_cpu(*timing, "timing");
      TORCH_CHECK_TYPE(timing->scalar_type() == at::kLong, "timing must be int64");
      TORCH_CHECK_VALUE(timing->is_contiguous() && timing->numel() == 4, "timing must be a contiguous tensor of 4 elements");
    }
    const at::Device dev = query.device();
    const bool on_gpu = !dev.is_cpu();
    at::Tensor out, lse_static, lse_cpu, q_host;
    int64_t visited_total = 0;
    {
      py::gil_scoped_release no_gil;
      translate_errors([&] {
        const at::Tensor q = query.reshape({rows, m, d_});
        if (on_gpu) {
          const c10::Stream stream = c10::impl::getDeviceGuardImpl(dev.type())->getStream(dev);
          // The previous step's merge may still read the kept buffers; on the same stream this step's copy is queued
          // after it, on another one (the caller switched streams) it must end first.
          if (last_stream_ && *last_stream_ != stream) last_stream_->synchronize();
          last_stream_ = stream;
          q_host = kept_host_buffer(q_staged_, {rows, m, d_}, query.scalar_type());
          q_host.copy_(q, /*non_blocking=*/true);
          if (!query_copied_ || query_copied_on_ != dev) {  // an event records on one device only
            query_copied_.emplace(dev.type());
            query_copied_on_ = dev;
          }
          query_copied_->record(stream);
        } else {
          q_host = q;
        }
        at::Tensor out_s;
        if (static_out) {
          out_s = *static_out, lse_static = *static_lse;
        } else {
          std::tie(out_s, lse_static) = dense_attention_op().call(q, static_keys, static_values, scale, /*causal=*/true);
        }
        if (on_gpu) query_copied_->synchronize();
        const int64_t n_out = rows * m * dv_;
        const at::Tensor results =
            on_gpu ? kept_host_buffer(results_host_, {n_out + rows * m}, at::kFloat) : at::empty({n_out + rows * m}, at::kFloat);
        ra::RetrievePhaseTimes times;
        const int64_t t0 = steady_ns();
        visited_total = retrieve_into(q_host, top_k, ef, scale, results.data_ptr<float>(), timing ? &times : nullptr);
        if (timing) {
          int64_t* acc = timing->data_ptr<int64_t>();
          acc[0] = times.search_ns.load();
          acc[1] = times.attend_ns.load();
          acc[2] = t0;
          acc[3] = steady_ns();
        }
        // On a GPU the merge kernel reads out and lse from the page-locked buffer itself (merge_attention reads mapped
        // CPU memory in place): no copy to queue, and the buffer is not rewritten before the kernel has run (above).
        lse_cpu = results.narrow(0, n_out, rows * m).view({rows, m});
        at::Tensor merged, lse_merged;
        std::tie(merged, lse_merged) = merge_attention_op().call(out_s, lse_static, results.narrow(0, 0, n_out).view({rows, m, dv_}), lse_cpu,
                                                                 merge_output_dtype(query.scalar_type()));
        out = merged.view({query.size(0), query.size(1), m, dv_}).transpose(1, 2);
        if (out.scalar_type() != query.scalar_type()) out = out.to(query.scalar_type());
      });
    }
    return py::make_tuple(out, lse_static, lse_cpu, q_host, visited_total);
  }

  // A copy of every kv head's CPU key rows: (kv_heads, size, head_dim) in the storage dtype (the exact mass probe of
  // RetrievalLayer reads them; not meant to run concurrently with build/append).
  at::Tensor keys() const {
    const int64_t n = size();
    auto out = at::empty({hkv_, n, d_}, at::TensorOptions().dtype(dtype_));
    std::visit(
        [&](const auto& l) {
          using T = typename std::remove_reference_t<decltype(*l)>::Scalar;
          for (int64_t h = 0; h < hkv_; ++h)
            std::memcpy(static_cast<char*>(out.data_ptr()) + h * n * d_ * sizeof(T), l->key_store(h)->data(), n * d_ * sizeof(T));
        },
        v_);
    return out;
  }

  void set_min_ids(const at::Tensor& min_ids) {
    check_cpu(min_ids, "min_ids");
    check_dim(min_ids, 1, "min_ids", "(kv_heads,)");
    TORCH_CHECK_TYPE(min_ids.scalar_type() == at::kLong, "min_ids must be int64");
    const auto c = min_ids.contiguous();
    visit_layer([&](auto& layer, auto*) { layer.set_min_ids(c.data_ptr<int64_t>(), c.numel()); });
  }

  bool warm_start() const { return std::visit([](const auto& l) { return l->warm_start(); }, v_); }
  void set_warm_start(bool on) { std::visit([&](auto& l) { l->set_warm_start(on); }, v_); }
  void clear_warm_start() { std::visit([](const auto& l) { l->clear_warm_start(); }, v_); }

  int64_t size() const { return std::visit([](const auto& l) { return l->size(); }, v_); }
  int64_t vector_bytes() const { return std::visit([](const auto& l) { return l->vector_bytes(); }, v_); }
  int64_t index_bytes() const { return std::visit([](const auto& l) { return l->index_bytes(); }, v_); }
  int64_t index_count() const { return std::visit([](const auto& l) { return l->indexed() ? l->index_count() : int64_t{0}; }, v_); }
  const std::string& sharing() const { return sharing_; }

 private:
  int64_t check_kv(const at::Tensor& keys, const at::Tensor& values) const {
    check_cpu(keys, "keys");
    check_cpu(values, "values");
    check_dim(keys, 3, "keys", "(kv_heads, tokens, head_dim)");
    check_dim(values, 3, "values", "(kv_heads, tokens, value_dim)");
    TORCH_CHECK_TYPE(keys.scalar_type() == dtype_ && values.scalar_type() == dtype_, "keys/values must be ", dtype_, ", got ",
                     keys.scalar_type(), "/", values.scalar_type());
    TORCH_CHECK_VALUE(keys.size(0) == hkv_ && keys.size(2) == d_, "keys shape ", keys.sizes(), " does not match (", hkv_, ", t, ", d_, ")");
    TORCH_CHECK_VALUE(values.size(0) == hkv_ && values.size(1) == keys.size(1) && values.size(2) == dv_, "values shape ", values.sizes(),
                      " does not match keys");
    return keys.size(1);
  }

  // q (q_heads, queries, head_dim) on the CPU, any float dtype
  void check_queries(const at::Tensor& q) const {
    check_cpu(q, "q");
    check_dim(q, 3, "q", "(q_heads, queries, head_dim)");
    TORCH_CHECK_VALUE(q.size(0) == hq_ && q.size(2) == d_, "q shape ", q.sizes(), " does not match (", hq_, ", m, ", d_, ")");
  }

  // The CPU search and attention of decode_step: q (rows, m, head_dim) on the CPU in any float dtype, out then lse
  // written to `results`; called with the GIL released. Returns the keys scored in total.
  int64_t retrieve_into(const at::Tensor& q, int64_t top_k, int64_t ef, double scale, float* results, ra::RetrievePhaseTimes* times) {
    const auto qf = q.to(at::kFloat).contiguous();
    const int64_t m = q.size(1);
    std::vector<int64_t> visited(static_cast<size_t>(hq_ * m));
    std::visit(
        [&](auto& layer) {
          ra::SearchParams p;
          p.ef = ef;
          layer->retrieve_attend(qf.data_ptr<float>(), m, top_k, p, static_cast<float>(scale), results, results + hq_ * m * dv_, visited.data(),
                                 nullptr, times);
        },
        v_);
    return std::accumulate(visited.begin(), visited.end(), int64_t{0});
  }

  static int64_t steady_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
  }

  // The merge writes the output in the query's dtype where the kernels can (float32/16, bfloat16), else float32.
  static std::optional<at::ScalarType> merge_output_dtype(at::ScalarType q) {
    if (q == at::kHalf || q == at::kBFloat16) return q;
    return std::nullopt;
  }

  // A page-locked CPU tensor of this shape and dtype kept in `slot` across steps (made again when either changes).
  static at::Tensor kept_host_buffer(at::Tensor& slot, at::IntArrayRef shape, at::ScalarType dtype) {
    if (!slot.defined() || slot.sizes() != shape || slot.scalar_type() != dtype)
      slot = at::empty(shape, at::TensorOptions().dtype(dtype).pinned_memory(true));
    return slot;
  }

  using AttentionOp = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, bool);
  using MergeOp = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                     std::optional<at::ScalarType>);
  static const c10::TypedOperatorHandle<AttentionOp>& dense_attention_op() {
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("retrieval_attention::dense_attention", "").typed<AttentionOp>();
    return op;
  }
  static const c10::TypedOperatorHandle<MergeOp>& merge_attention_op() {
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("retrieval_attention::merge_attention", "").typed<MergeOp>();
    return op;
  }

  template <class Fn>
  void visit_layer(Fn&& fn) {
    std::visit(
        [&](auto& layer) {
          using T = typename std::remove_reference_t<decltype(*layer)>::Scalar;
          py::gil_scoped_release no_gil;
          translate_errors([&] { fn(*layer, static_cast<T*>(nullptr)); });
        },
        v_);
  }

  static ra::IndexSharing sharing_from(const std::string& s) {
    if (s == "per_query_head") return ra::IndexSharing::PerQueryHead;
    if (s == "per_kv_head") return ra::IndexSharing::PerKvHead;
    TORCH_CHECK_VALUE(false, "index_sharing must be 'per_query_head' or 'per_kv_head', got '", s, "'");
  }

  at::ScalarType dtype_;
  int64_t hq_, hkv_, d_, dv_;
  std::string sharing_;
  Variant v_;
  at::Tensor q_staged_, results_host_;         // decode_step's page-locked buffers (GPU queries only)
  std::optional<c10::Event> query_copied_;     // decode_step: the query's copy to q_staged_ has finished
  std::optional<at::Device> query_copied_on_;  // the device query_copied_ records on
  std::optional<c10::Stream> last_stream_;     // decode_step: the stream of the previous step's merge
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "retrieval_attention C++ core bindings (use the retrieval_attention package, not this module)";
  // pybind11 itself maps std::invalid_argument to ValueError and std::runtime_error to RuntimeError.
  m.def("check_index_params", &check_index_params, py::arg("type"), py::arg("params"));
  m.def("resolved_index_params", &resolved_index_params, py::arg("type"), py::arg("params"));

  py::class_<PyIndex>(m, "KeyIndex")
      .def_static("build", &PyIndex::build, py::arg("keys"), py::arg("train_queries"), py::arg("type"), py::arg("params"), py::arg("knn") = py::none(),
                  py::arg("key_knn") = py::none(), py::arg("projection") = py::none())
      .def_static("load", &PyIndex::load, py::arg("path"))
      .def("search", &PyIndex::search, py::arg("queries"), py::arg("k"), py::arg("ef"), py::arg("seeds") = py::none())
      .def("add", &PyIndex::add, py::arg("new_keys"))
      .def("save", &PyIndex::save, py::arg("path"))
      .def_property_readonly("size", &PyIndex::size)
      .def_property_readonly("dim", &PyIndex::dim)
      .def_property_readonly("type", &PyIndex::type_name)
      .def_property_readonly("dtype", &PyIndex::dtype)
      .def_property_readonly("vector_bytes", &PyIndex::vector_bytes)
      .def_property_readonly("structure_bytes", &PyIndex::structure_bytes);

  py::class_<PyOffloadedLayer>(m, "OffloadedLayer")
      .def(py::init<at::ScalarType, int64_t, int64_t, int64_t, int64_t, const std::string&, const py::dict&, int64_t, const std::string&>(), py::arg("dtype"),
           py::arg("q_heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("value_dim"), py::arg("index_type"), py::arg("params"),
           py::arg("max_unindexed") = 0, py::arg("sharing") = "per_query_head")
      .def_static("load", &PyOffloadedLayer::load, py::arg("path"), py::arg("dtype"), py::arg("q_heads"), py::arg("kv_heads"), py::arg("head_dim"),
                  py::arg("value_dim"), py::arg("index_type"), py::arg("params"), py::arg("max_unindexed") = 0,
                  py::arg("sharing") = "per_query_head")
      .def("save", &PyOffloadedLayer::save, py::arg("path"))
      .def("build", &PyOffloadedLayer::build, py::arg("keys"), py::arg("values"), py::arg("train_queries"), py::arg("knn") = py::none(),
           py::arg("index_now") = true, py::arg("key_knn") = py::none(), py::arg("projection") = py::none())
      .def("build_indexes", &PyOffloadedLayer::build_indexes)
      .def_property_readonly("build_pending", &PyOffloadedLayer::build_pending)
      .def("append", &PyOffloadedLayer::append, py::arg("keys"), py::arg("values"))
      .def("retrieve_attend", &PyOffloadedLayer::retrieve_attend, py::arg("q"), py::arg("top_k"), py::arg("ef"), py::arg("scale"),
           py::arg("return_ids") = false)
      .def("decode_step", &PyOffloadedLayer::decode_step, py::arg("query"), py::arg("static_keys"), py::arg("static_values"), py::arg("scale"),
           py::arg("top_k"), py::arg("ef"), py::arg("static_out") = py::none(), py::arg("static_lse") = py::none(), py::arg("timing") = py::none())
      .def("set_min_ids", &PyOffloadedLayer::set_min_ids, py::arg("min_ids"))
      .def_property("warm_start", &PyOffloadedLayer::warm_start, &PyOffloadedLayer::set_warm_start)
      .def("clear_warm_start", &PyOffloadedLayer::clear_warm_start)
      .def("keys", &PyOffloadedLayer::keys)
      .def_property_readonly("size", &PyOffloadedLayer::size)
      .def_property_readonly("vector_bytes", &PyOffloadedLayer::vector_bytes)
      .def_property_readonly("index_bytes", &PyOffloadedLayer::index_bytes)
      .def_property_readonly("index_count", &PyOffloadedLayer::index_count)
      .def_property_readonly("sharing", &PyOffloadedLayer::sharing);
}
