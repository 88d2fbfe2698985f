// csrc/ops.cpp -- TORCH_LIBRARY schemas of the retrieval_attention ops and their CPU kernels.
// Algorithms live in include/retrieval_attention/attention.h; this file checks tensors and calls them.
// torch.ops calls reach these kernels with the GIL already released by torch's Python binding.
// The CUDA kernels are registered in csrc/cuda/ops_cuda.cu; fake (meta) impls in python/.../ops.py.
#include <torch/extension.h>

#include "retrieval_attention/attention.h"
#include "retrieval_attention/chunk_top.h"
#include "retrieval_attention/projection_prune.h"
#include "chunk_top_checks.h"
#include "tensor_checks.h"

namespace ra = retrieval_attention;
using namespace ra_ext;

namespace {

struct AttnShapes {
  int64_t hq, m, d, hkv, n, dv;
};

AttnShapes check_attention_args(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values) {
  check_dim(q, 3, "q", "(q_heads, queries, head_dim)");
  check_dim(keys, 3, "keys", "(kv_heads, n_keys, head_dim)");
  check_dim(values, 3, "values", "(kv_heads, n_keys, value_dim)");
  TORCH_CHECK_TYPE(at::isFloatingType(q.scalar_type()), "q must be a floating tensor, got ", q.scalar_type());
  check_float_storage(keys, "keys");
  TORCH_CHECK_TYPE(values.scalar_type() == keys.scalar_type(), "values dtype ", values.scalar_type(), " differs from keys dtype ",
                   keys.scalar_type());
  AttnShapes s{q.size(0), q.size(1), q.size(2), keys.size(0), keys.size(1), values.size(2)};
  TORCH_CHECK_VALUE(keys.size(2) == s.d, "keys head_dim ", keys.size(2), " != q head_dim ", s.d);
  TORCH_CHECK_VALUE(values.size(0) == s.hkv && values.size(1) == s.n, "values shape ", values.sizes(), " does not match keys ", keys.sizes());
  TORCH_CHECK_VALUE(s.hkv > 0 && s.hq % s.hkv == 0, "q_heads (", s.hq, ") must be a positive multiple of kv_heads (", s.hkv, ")");
  TORCH_CHECK_VALUE(s.d > 0 && s.dv > 0, "head dims must be positive");
  TORCH_CHECK_VALUE(q.device() == keys.device() && keys.device() == values.device(), "q, keys and values must be on one device");
  return s;
}

std::tuple<at::Tensor, at::Tensor> sparse_attention_cpu(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, const at::Tensor& ids,
                                                        double scale) {
  const AttnShapes s = check_attention_args(q, keys, values);
  check_cpu(q, "q");
  check_dim(ids, 3, "ids", "(q_heads, queries, k)");
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong, "ids must be int64, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(ids.size(0) == s.hq && ids.size(1) == s.m, "ids shape ", ids.sizes(), " does not match q ", q.sizes());
  check_cpu(ids, "ids");
  const auto qf = q.to(at::kFloat).contiguous();
  const auto kc = keys.contiguous(), vc = values.contiguous(), ic = ids.contiguous();
  auto out = at::empty({s.hq, s.m, s.dv}, q.options().dtype(at::kFloat));
  auto lse = at::empty({s.hq, s.m}, q.options().dtype(at::kFloat));
  const int64_t k = ids.size(2);
  translate_errors([&] {
    dispatch_storage(keys.scalar_type(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      ra::sparse_attention_batch<T>(qf.data_ptr<float>(), s.hq, s.m, s.d, reinterpret_cast<const T*>(kc.data_ptr()),
                                    reinterpret_cast<const T*>(vc.data_ptr()), s.hkv, s.n, s.dv, ic.data_ptr<int64_t>(), k,
                                    static_cast<float>(scale), out.data_ptr<float>(), lse.data_ptr<float>());
    });
  });
  return {out, lse};
}

// (heads, rows, dim) whose rows are contiguous inside each head (heads may lie apart): returned as is, else a copy.
at::Tensor heads_of_contiguous_rows(const at::Tensor& t) {
  const bool rows_ok = (t.size(2) <= 1 || t.stride(2) == 1) && (t.size(1) <= 1 || t.stride(1) == t.size(2));
  return rows_ok ? t : t.contiguous();
}

// Elements between consecutive heads of such a tensor (a single head's stride is arbitrary: report the packed one).
int64_t head_stride(const at::Tensor& t) { return t.size(0) > 1 ? t.stride(0) : t.size(1) * t.size(2); }

std::tuple<at::Tensor, at::Tensor> dense_attention_cpu(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, double scale,
                                                       bool causal) {
  const AttnShapes s = check_attention_args(q, keys, values);
  check_cpu(q, "q");
  TORCH_CHECK_VALUE(!causal || s.m <= s.n, "causal attention needs at least as many keys (", s.n, ") as queries (", s.m, ")");
  const auto qf = q.to(at::kFloat).contiguous();
  // a cache's static set is the first n rows of a larger buffer: read it in place rather than copy it every step
  const auto kc = heads_of_contiguous_rows(keys), vc = heads_of_contiguous_rows(values);
  auto out = at::empty({s.hq, s.m, s.dv}, q.options().dtype(at::kFloat));
  auto lse = at::empty({s.hq, s.m}, q.options().dtype(at::kFloat));
  translate_errors([&] {
    dispatch_storage(keys.scalar_type(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      ra::dense_attention_batch<T>(qf.data_ptr<float>(), s.hq, s.m, s.d, reinterpret_cast<const T*>(kc.data_ptr()),
                                   reinterpret_cast<const T*>(vc.data_ptr()), s.hkv, s.n, s.dv, static_cast<float>(scale), causal,
                                   out.data_ptr<float>(), lse.data_ptr<float>(), head_stride(kc), head_stride(vc));
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> merge_attention_cpu(const at::Tensor& out_a, const at::Tensor& lse_a, const at::Tensor& out_b,
                                                       const at::Tensor& lse_b, std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK_VALUE(out_a.dim() >= 1 && out_a.sizes() == out_b.sizes(), "out_a ", out_a.sizes(), " and out_b ", out_b.sizes(),
                    " must have the same shape (..., value_dim)");
  TORCH_CHECK_VALUE(lse_a.sizes() == lse_b.sizes() && lse_a.sizes() == out_a.sizes().slice(0, out_a.dim() - 1), "lse_a ", lse_a.sizes(),
                    " and lse_b ", lse_b.sizes(), " must have shape out.shape[:-1] = ", out_a.sizes().slice(0, out_a.dim() - 1));
  for (const auto* t : {&out_a, &lse_a, &out_b, &lse_b}) {
    TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), "merge_attention inputs must be floating tensors");
    check_cpu(*t, "merge_attention inputs");
  }
  const bool out_dtype_ok = !out_dtype || *out_dtype == at::kFloat || *out_dtype == at::kHalf || *out_dtype == at::kBFloat16;
  TORCH_CHECK_TYPE(out_dtype_ok, "out_dtype must be float32, float16 or bfloat16, got ", *out_dtype);
  const auto oa = out_a.to(at::kFloat).contiguous(), ob = out_b.to(at::kFloat).contiguous();
  const auto la = lse_a.to(at::kFloat).contiguous(), lb = lse_b.to(at::kFloat).contiguous();
  auto out = at::empty(out_a.sizes(), out_a.options().dtype(at::kFloat));
  auto lse = at::empty(lse_a.sizes(), lse_a.options().dtype(at::kFloat));
  const int64_t dv = out_a.size(-1), rows = lse_a.numel();
  {
    ra::merge_batch(oa.data_ptr<float>(), la.data_ptr<float>(), ob.data_ptr<float>(), lb.data_ptr<float>(), rows, dv, out.data_ptr<float>(),
                    lse.data_ptr<float>());
  }
  if (out_dtype && *out_dtype != at::kFloat) return {out.to(*out_dtype), lse};
  return {out, lse};
}

at::Tensor chunk_top_candidates_cpu(const at::Tensor& scores, int64_t chunk, int64_t kc, int64_t m) {
  check_chunk_top_args(scores, chunk, kc, m);
  check_cpu(scores, "scores");
  const auto st = scores.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, "scores must be float32, float16 or bfloat16, got ", st);
  const auto sc = scores.contiguous();
  const int64_t rows = sc.size(0), cols = sc.size(1);
  auto out = at::empty({rows, m}, sc.options().dtype(at::kLong));
  if (rows == 0) return out;
  translate_errors([&] {
    if (st == at::kFloat)
      ra::chunk_top_candidates<float>(sc.data_ptr<float>(), rows, cols, chunk, kc, m, out.data_ptr<int64_t>());
    else if (st == at::kHalf)
      ra::chunk_top_candidates<ra::Half>(reinterpret_cast<const ra::Half*>(sc.data_ptr()), rows, cols, chunk, kc, m, out.data_ptr<int64_t>());
    else
      ra::chunk_top_candidates<ra::BFloat16>(reinterpret_cast<const ra::BFloat16*>(sc.data_ptr()), rows, cols, chunk, kc, m,
                                             out.data_ptr<int64_t>());
  });
  return out;
}

at::Tensor rerank_l2_cpu(const at::Tensor& keys, int64_t row_start, const at::Tensor& cand, int64_t k, bool check_ids) {
  check_rerank_l2_args(keys, row_start, cand, k);
  check_cpu(keys, "keys");
  const int64_t groups = keys.size(0), n = keys.size(1), d = keys.size(2), b = cand.size(1), m = cand.size(2);
  if (check_ids) check_candidate_ids(cand, n);
  const auto kc = keys.contiguous();
  const auto cc = cand.contiguous();
  auto out = at::empty({groups, b, k}, cand.options());
  if (groups * b == 0) return out;
  translate_errors([&] {
    dispatch_storage(keys.scalar_type(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      ra::rerank_l2<T>(reinterpret_cast<const T*>(kc.data_ptr()), groups, n, d, row_start, cc.data_ptr<int64_t>(), b, m, k,
                       out.data_ptr<int64_t>());
    });
  });
  return out;
}

at::Tensor projection_prune_cpu(const at::Tensor& keys, int64_t per, const at::Tensor& begin, const at::Tensor& counts, const at::Tensor& pivot,
                                const at::Tensor& near, const at::Tensor& near_dist, const at::Tensor& mips, int64_t degree, int64_t cap,
                                bool check_ids) {
  check_projection_prune_args(keys, per, begin, counts, pivot, near, near_dist, mips, degree, cap);
  check_cpu(keys, "keys");
  const int64_t groups = keys.size(0), n = keys.size(1), d = keys.size(2);
  if (check_ids) check_projection_segments(groups, n, per, begin, counts, pivot, near, mips);
  const auto kc = keys.contiguous(), bc = begin.contiguous(), pc = pivot.contiguous(), nc = near.contiguous(), dc = near_dist.contiguous(),
             mc = mips.contiguous();
  const int64_t n_seg = counts[0].item<int64_t>(), n_valid = counts[1].item<int64_t>();
  TORCH_CHECK_VALUE(n_seg >= 0 && n_seg <= begin.numel() && n_valid >= 0 && n_valid <= near.numel(), "counts out of range");
  const int64_t* b = bc.data_ptr<int64_t>();
  auto out = at::full({groups * per, n, degree}, -1, keys.options().dtype(at::kInt));
  translate_errors([&] {
    dispatch_storage(keys.scalar_type(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      ra::projection_prune<T>(reinterpret_cast<const T*>(kc.data_ptr()), n, d, per, b, n_seg, n_valid, pc.data_ptr<int64_t>(),
                              nc.data_ptr<int64_t>(), dc.data_ptr<float>(), mc.data_ptr<int64_t>(), degree, cap, out.data_ptr<int32_t>());
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(retrieval_attention, m) {
  m.def("sparse_attention(Tensor q, Tensor keys, Tensor values, Tensor ids, float scale) -> (Tensor, Tensor)");
  m.def("dense_attention(Tensor q, Tensor keys, Tensor values, float scale, bool causal=False) -> (Tensor, Tensor)");
  m.def("merge_attention(Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b, ScalarType? out_dtype=None) -> (Tensor, Tensor)");
  m.def("chunk_top_candidates(Tensor scores, int chunk, int kc, int m) -> Tensor");
  // CUDA only (csrc/cuda): on the CPU, exact_key_knn scores in float32 through a matmul instead
  m.def("score_top_candidates(Tensor left, Tensor right, Tensor? bias, int row_start, int rows, int self_stride, int m) -> Tensor");
  m.def("rerank_l2(Tensor keys, int row_start, Tensor cand, int k, bool check_ids=True) -> Tensor");
  m.def("projection_prune(Tensor keys, int per, Tensor begin, Tensor counts, Tensor pivot, Tensor near, Tensor near_dist, Tensor mips, int degree, int cap, bool check_ids=True) -> Tensor");
}

TORCH_LIBRARY_IMPL(retrieval_attention, CPU, m) {
  m.impl("sparse_attention", &sparse_attention_cpu);
  m.impl("dense_attention", &dense_attention_cpu);
  m.impl("merge_attention", &merge_attention_cpu);
  m.impl("chunk_top_candidates", &chunk_top_candidates_cpu);
  m.impl("rerank_l2", &rerank_l2_cpu);
  m.impl("projection_prune", &projection_prune_cpu);
}
