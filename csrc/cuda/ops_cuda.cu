// csrc/cuda/ops_cuda.cu -- CUDA implementations of the retrieval_attention ops (schemas live in csrc/ops.cpp).
//
// Thin launchers only: validate tensors (device, dtype, rank, shape, dims), make the small inputs contiguous
// (queries in float32/16/bf16 as given, ids int64, merge inputs float32), pass keys / values with their strides (copied
// only when the last dim is not unit-stride), allocate outputs and the split-K workspace with the caching
// allocator, and enqueue the kernels of include/retrieval_attention/cuda/decode_attention.cuh on the current
// CUDA stream of the inputs' device. The algorithms live in that header.
//
//   sparse_attention(q, keys, values, ids, scale) -> (out, lse)   [validates ids: one device->host sync]
//   dense_attention(q, keys, values, scale, causal) -> (out, lse)
//   merge_attention(out_a, lse_a, out_b, lse_b, out_dtype) -> (out in out_dtype (float32 by default), lse)
//       [out_b / lse_b may be CPU tensors: read in place from page-locked memory, else copied]
//   chunk_top_candidates(scores, chunk, kc, m)    -> cols (rows, m) int64   [16-bit scores; chunk_top.cuh]
//   score_top_candidates(left, right, bias, row_start, rows, self_stride, m) -> cols (groups, rows, m) int64
//       [float16 operands; the product is never written out; score_top.cuh]
//   rerank_l2(keys, row_start, cand, k, check_ids) -> ids (groups, rows, k) int64   [check_ids: one sync]
//   projection_prune(keys, per, begin, counts, ..., check_ids) -> lists (groups * per, n, degree) int32   [check_ids:
//       a few syncs; projection_lists, which makes the segments, passes False; projection_prune.cuh]
//
// Headers: c10/cuda (stream, guard, launch check) rather than ATen/cuda/CUDAContext.h, which pulls in the
// cuBLAS/cuSPARSE/cuSOLVER headers; c10::cuda::getCurrentCUDAStream is the function at::cuda re-exports.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "../chunk_top_checks.h"
#include "retrieval_attention/cuda/chunk_top.cuh"
#include "retrieval_attention/cuda/decode_attention.cuh"
#include "retrieval_attention/cuda/projection_prune.cuh"
#include "retrieval_attention/cuda/score_top.cuh"

namespace {

namespace rac = retrieval_attention::cuda;
using at::Tensor;

// Errors use the Python exception types of the CPU impls (csrc/ops.cpp): TypeError for dtypes, ValueError
// for everything else, each message naming the argument.
void check_on_device_of(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.defined(), name, ": expected a tensor, got None");
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor (on ", ref.device(), " like ", ref_name, "), got device ", t.device());
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " must be on ", ref.device(), " like ", ref_name, ", got device ", t.device());
}

void check_rank(const Tensor& t, const char* name, int64_t rank, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == rank, name, " must have shape ", layout, " (", rank, " dims), got ", t.sizes());
}

void check_kv_dtype(const Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, name, " must be float32, float16 or bfloat16, got ", s);
}

// keys / values: the kernels take any head and row strides but need a unit-stride last dim; anything else is
// copied (as the CPU impl does), so a slice of a larger cache buffer is read in place.
Tensor unit_last_stride(const Tensor& t) {
  return (t.size(2) <= 1 || t.stride(2) == 1) ? t : t.contiguous();
}

// Shared validation of q / keys / values (same rules as the CPU impl, plus device and dim-limit checks).
void check_qkv(const Tensor& q, const Tensor& keys, const Tensor& values) {
  check_on_device_of(keys, "keys", q, "q");
  check_on_device_of(values, "values", q, "q");
  check_rank(q, "q", 3, "(q_heads, queries, head_dim)");
  check_rank(keys, "keys", 3, "(kv_heads, n_keys, head_dim)");
  check_rank(values, "values", 3, "(kv_heads, n_keys, value_dim)");
  TORCH_CHECK_TYPE(at::isFloatingType(q.scalar_type()), "q must be a floating tensor, got ", q.scalar_type());
  check_kv_dtype(keys, "keys");
  TORCH_CHECK_TYPE(values.scalar_type() == keys.scalar_type(), "values dtype ", values.scalar_type(), " differs from keys dtype ",
                   keys.scalar_type());
  const int64_t hq = q.size(0), hkv = keys.size(0);
  TORCH_CHECK_VALUE(keys.size(2) == q.size(2), "keys head_dim ", keys.size(2), " != q head_dim ", q.size(2));
  TORCH_CHECK_VALUE(values.size(0) == hkv && values.size(1) == keys.size(1), "values shape ", values.sizes(), " does not match keys ",
                    keys.sizes());
  TORCH_CHECK_VALUE(hkv > 0 && hq % hkv == 0, "q_heads (", hq, ") must be a positive multiple of kv_heads (", hkv, ")");
  TORCH_CHECK_VALUE(q.size(2) > 0 && values.size(2) > 0, "head dims must be positive, got head_dim ", q.size(2), ", value_dim ",
                    values.size(2));
  TORCH_CHECK_VALUE(rac::supports_dims(keys.size(2), values.size(2)), "keys, values: the CUDA kernels support head_dim and value_dim <= ",
                    rac::kMaxHeadDim, ", got ", keys.size(2), " and ", values.size(2));
}

// Element stride of dim `dim`, replaced by the contiguous value for a size-1 dim (whose stride is arbitrary).
int64_t stride_of(const Tensor& t, int64_t dim) {
  if (t.size(dim) > 1) return t.stride(dim);
  int64_t s = 1;
  for (int64_t i = dim + 1; i < t.dim(); ++i) s *= t.size(i);
  return s;
}

// The kernels read float32, float16 and bfloat16 queries as they are (widened as read): one launch fewer per call.
Tensor queries_for_kernel(const Tensor& q) {
  const auto s = q.scalar_type();
  return (s == at::kFloat || s == at::kHalf || s == at::kBFloat16) ? q.contiguous() : q.to(at::kFloat).contiguous();
}

// what: the argument named in the error for any other dtype
rac::Elem elem_of(at::ScalarType s, const char* what) {
  switch (s) {
    case at::kHalf: return rac::Elem::kFloat16;
    case at::kBFloat16: return rac::Elem::kBFloat16;
    case at::kFloat: return rac::Elem::kFloat32;
    default: TORCH_CHECK_TYPE(false, what, " must be float32, float16 or bfloat16, got ", s);
  }
  return rac::Elem::kFloat32;
}

template <class T>
rac::AttentionParams<T> make_params(const Tensor& q, const Tensor& keys, const Tensor& values, double scale, Tensor& out, Tensor& lse) {
  rac::AttentionParams<T> p;
  p.q = q.data_ptr();
  p.q_type = elem_of(q.scalar_type(), "q");
  p.keys = reinterpret_cast<const T*>(keys.data_ptr());
  p.values = reinterpret_cast<const T*>(values.data_ptr());
  p.hq = q.size(0);
  p.m = q.size(1);
  p.d = q.size(2);
  p.hkv = keys.size(0);
  p.n = keys.size(1);
  p.dv = values.size(2);
  p.k_head_stride = stride_of(keys, 0);
  p.k_row_stride = stride_of(keys, 1);
  p.v_head_stride = stride_of(values, 0);
  p.v_row_stride = stride_of(values, 1);
  p.scale = static_cast<float>(scale);
  p.out = out.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  return p;
}

template <class T>
void run_attention(rac::AttentionParams<T>& p, bool sparse, const Tensor& like) {
  const int64_t rows = p.hq * p.m;
  if (rows == 0) return;
  const int device = like.get_device();
  const int splits = rac::choose_splits(rows, sparse ? p.k : p.n, rac::device_sm_count(device));
  const int64_t ws_floats = rac::workspace_floats(rows, p.dv, splits);
  Tensor ws;
  float* ws_ptr = nullptr;
  if (ws_floats > 0) {
    ws = at::empty({ws_floats}, like.options().dtype(at::kFloat));
    ws_ptr = ws.data_ptr<float>();
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const cudaError_t err = sparse ? rac::sparse_attention<T>(p, splits, ws_ptr, stream) : rac::dense_attention<T>(p, splits, ws_ptr, stream);
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class T>
std::tuple<Tensor, Tensor> dense_typed(const Tensor& q, const Tensor& keys, const Tensor& values, double scale, bool causal) {
  Tensor out = at::empty({q.size(0), q.size(1), values.size(2)}, q.options().dtype(at::kFloat));
  Tensor lse = at::empty({q.size(0), q.size(1)}, q.options().dtype(at::kFloat));
  auto p = make_params<T>(q, keys, values, scale, out, lse);
  p.causal = causal;
  run_attention<T>(p, /*sparse=*/false, q);
  return {out, lse};
}

template <class T>
std::tuple<Tensor, Tensor> sparse_typed(const Tensor& q, const Tensor& keys, const Tensor& values, const Tensor& ids, double scale) {
  Tensor out = at::empty({q.size(0), q.size(1), values.size(2)}, q.options().dtype(at::kFloat));
  Tensor lse = at::empty({q.size(0), q.size(1)}, q.options().dtype(at::kFloat));
  auto p = make_params<T>(q, keys, values, scale, out, lse);
  p.ids = ids.numel() > 0 ? ids.data_ptr<int64_t>() : nullptr;
  p.k = ids.size(2);
  run_attention<T>(p, /*sparse=*/true, q);
  return {out, lse};
}

std::tuple<Tensor, Tensor> dense_attention_cuda(const Tensor& q, const Tensor& keys_in, const Tensor& values_in, double scale, bool causal) {
  TORCH_CHECK_VALUE(q.defined() && q.is_cuda(), "q must be a CUDA tensor, got device ", q.device());
  const c10::cuda::CUDAGuard guard(q.device());
  check_qkv(q, keys_in, values_in);
  TORCH_CHECK_VALUE(!causal || q.size(1) <= keys_in.size(1), "causal attention needs at least as many keys (", keys_in.size(1),
                    ") as queries (", q.size(1), ")");
  const Tensor qk = queries_for_kernel(q);
  const Tensor keys = unit_last_stride(keys_in), values = unit_last_stride(values_in);
  switch (keys.scalar_type()) {
    case at::kFloat: return dense_typed<float>(qk, keys, values, scale, causal);
    case at::kHalf: return dense_typed<__half>(qk, keys, values, scale, causal);
    case at::kBFloat16: return dense_typed<__nv_bfloat16>(qk, keys, values, scale, causal);
    default: break;
  }
  TORCH_CHECK_TYPE(false, "keys: unsupported dtype ", keys.scalar_type());
  return {};
}

std::tuple<Tensor, Tensor> sparse_attention_cuda(const Tensor& q, const Tensor& keys_in, const Tensor& values_in, const Tensor& ids_in,
                                                 double scale) {
  TORCH_CHECK_VALUE(q.defined() && q.is_cuda(), "q must be a CUDA tensor, got device ", q.device());
  const c10::cuda::CUDAGuard guard(q.device());
  check_qkv(q, keys_in, values_in);
  check_on_device_of(ids_in, "ids", q, "q");
  check_rank(ids_in, "ids", 3, "(q_heads, queries, k)");
  TORCH_CHECK_TYPE(ids_in.scalar_type() == at::kLong, "ids must be int64, got ", ids_in.scalar_type());
  TORCH_CHECK_VALUE(ids_in.size(0) == q.size(0) && ids_in.size(1) == q.size(1), "ids shape ", ids_in.sizes(), " does not match q ",
                    q.sizes());
  const Tensor ids = ids_in.contiguous();
  const int64_t n = keys_in.size(1);
  if (ids.numel() > 0) {
    // Same contract as the CPU op: any id other than -1 outside [0, n) is an error (costs one device sync).
    const Tensor bad = at::logical_or(ids.lt(-1), ids.ge(n));
    if (bad.any().item<bool>()) {
      const int64_t first = ids.masked_select(bad)[0].item<int64_t>();
      TORCH_CHECK_VALUE(false, "ids: key id ", first, " is out of range [0, ", n, ")");
    }
  }
  const Tensor qk = queries_for_kernel(q);
  const Tensor keys = unit_last_stride(keys_in), values = unit_last_stride(values_in);
  switch (keys.scalar_type()) {
    case at::kFloat: return sparse_typed<float>(qk, keys, values, ids, scale);
    case at::kHalf: return sparse_typed<__half>(qk, keys, values, ids, scale);
    case at::kBFloat16: return sparse_typed<__nv_bfloat16>(qk, keys, values, ids, scale);
    default: break;
  }
  TORCH_CHECK_TYPE(false, "keys: unsupported dtype ", keys.scalar_type());
  return {};
}

// A float32 contiguous form of t that a kernel on `ref`'s device reads: t's own memory when t is on that device or in
// page-locked CPU memory (mapped into the device's address space: the kernel reads it over the bus, no copy is queued;
// the caller keeps it unchanged until the kernel has run), else a copy on the device.
std::pair<Tensor, const float*> readable_on_device(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.defined(), name, ": expected a tensor, got None");
  if (t.is_cpu()) {
    const Tensor c = t.to(at::kFloat).contiguous();
    void* mapped = nullptr;
    if (c.numel() > 0 && cudaHostGetDevicePointer(&mapped, c.data_ptr(), 0) == cudaSuccess) return {c, static_cast<const float*>(mapped)};
    (void)cudaGetLastError();  // not page-locked (cudaErrorInvalidValue, not sticky): copy it
    const Tensor d = c.to(ref.device());
    return {d, d.data_ptr<float>()};
  }
  check_on_device_of(t, name, ref, ref_name);
  const Tensor c = t.to(at::kFloat).contiguous();
  return {c, c.data_ptr<float>()};
}

std::tuple<Tensor, Tensor> merge_attention_cuda(const Tensor& out_a, const Tensor& lse_a, const Tensor& out_b, const Tensor& lse_b,
                                                std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK_VALUE(out_a.defined() && out_a.is_cuda(), "out_a must be a CUDA tensor, got device ", out_a.device());
  const c10::cuda::CUDAGuard guard(out_a.device());
  check_on_device_of(lse_a, "lse_a", out_a, "out_a");
  TORCH_CHECK_VALUE(out_a.dim() >= 1 && out_a.sizes() == out_b.sizes(), "out_a ", out_a.sizes(), " and out_b ", out_b.sizes(),
                    " must have the same shape (..., value_dim)");
  const auto lead = out_a.sizes().slice(0, out_a.dim() - 1);
  TORCH_CHECK_VALUE(lse_a.sizes() == lse_b.sizes() && lse_a.sizes() == lead, "lse_a ", lse_a.sizes(), " and lse_b ", lse_b.sizes(),
                    " must have shape out.shape[:-1] = ", lead);
  const struct {
    const Tensor* t;
    const char* name;
  } all[] = {{&out_a, "out_a"}, {&lse_a, "lse_a"}, {&out_b, "out_b"}, {&lse_b, "lse_b"}};
  for (const auto& e : all)
    TORCH_CHECK_TYPE(at::isFloatingType(e.t->scalar_type()), "merge_attention inputs must be floating tensors; ", e.name, " is ",
                     e.t->scalar_type());

  const Tensor oa = out_a.to(at::kFloat).contiguous(), la = lse_a.to(at::kFloat).contiguous();
  const auto ob = readable_on_device(out_b, "out_b", out_a, "out_a"), lb = readable_on_device(lse_b, "lse_b", out_a, "out_a");
  const at::ScalarType out_type = out_dtype.value_or(at::kFloat);
  const rac::Elem out_elem = elem_of(out_type, "out_dtype");  // the merged output is written in this dtype (lse stays float32)
  Tensor out = at::empty(out_a.sizes(), oa.options().dtype(out_type));
  Tensor lse = at::empty(lead, la.options());
  const int64_t dv = out_a.size(-1);
  const int64_t rows = lse.numel();
  if (rows == 0) return {out, lse};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(out_a.get_device()).stream();
  C10_CUDA_CHECK(rac::merge_attention(oa.data_ptr<float>(), la.data_ptr<float>(), ob.second, lb.second, rows, dv,
                                      out.data_ptr(), out_elem, lse.data_ptr<float>(), stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

Tensor chunk_top_candidates_cuda(const Tensor& scores_in, int64_t chunk, int64_t kc, int64_t m) {
  ra_ext::check_chunk_top_args(scores_in, chunk, kc, m);
  TORCH_CHECK_VALUE(scores_in.is_cuda(), "scores must be a CUDA tensor, got device ", scores_in.device());
  const auto st = scores_in.scalar_type();
  TORCH_CHECK_TYPE(st == at::kHalf || st == at::kBFloat16, "scores must be float16 or bfloat16 on a GPU, got ", st);
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const int64_t rows = scores_in.size(0), cols = scores_in.size(1);
  TORCH_CHECK_VALUE(rac::chunk_top_supported(cols, chunk, kc, m), "chunk_top_candidates on a GPU needs chunk a power of two in [8, 256] and at most ",
                    rac::kChunkTopMaxEntries, " chunks per row and kept entries (kc * chunk); got cols ", cols, ", chunk ", chunk, ", kc ", kc);
  TORCH_CHECK_VALUE(rows < (int64_t{1} << 31), "scores: at most 2^31 - 1 rows, got ", rows);
  // rows of cols float16 (a multiple of 8) are 16-byte aligned once the first one is
  Tensor scores = scores_in.contiguous();
  if (reinterpret_cast<uintptr_t>(scores.data_ptr()) % 16 != 0) scores = scores.clone();
  Tensor out = at::empty({rows, m}, scores.options().dtype(at::kLong));
  if (rows == 0) return out;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(scores.get_device()).stream();
  if (st == at::kHalf)
    C10_CUDA_CHECK(rac::chunk_top_candidates(reinterpret_cast<const __half*>(scores.data_ptr()), rows, cols, chunk, kc, m,
                                             out.data_ptr<int64_t>(), stream));
  else
    C10_CUDA_CHECK(rac::chunk_top_candidates(reinterpret_cast<const __nv_bfloat16*>(scores.data_ptr()), rows, cols, chunk, kc, m,
                                             out.data_ptr<int64_t>(), stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

Tensor score_top_candidates_cuda(const Tensor& left_in, const Tensor& right_in, const std::optional<Tensor>& bias_in, int64_t row_start, int64_t rows, int64_t self_stride,
                                 int64_t m) {
  TORCH_CHECK_VALUE(left_in.is_cuda() && right_in.is_cuda() && left_in.device() == right_in.device(),
                    "score_top_candidates: left and right must be CUDA tensors on one device, got ", left_in.device(), " and ", right_in.device());
  TORCH_CHECK_TYPE(left_in.scalar_type() == at::kHalf && right_in.scalar_type() == at::kHalf,
                   "score_top_candidates: left and right must be float16, got ", left_in.scalar_type(), " and ", right_in.scalar_type());
  TORCH_CHECK_VALUE(left_in.dim() == 3 && right_in.dim() == 3 && left_in.size(0) == right_in.size(0) && left_in.size(2) == right_in.size(2),
                    "score_top_candidates: left (groups, n_left, dim) and right (groups, n_right, dim) expected, got ", left_in.sizes(), " and ",
                    right_in.sizes());
  const int64_t groups = left_in.size(0), n_left = left_in.size(1), n_right = right_in.size(1), dim = left_in.size(2);
  TORCH_CHECK_VALUE(row_start >= 0 && rows >= 0 && row_start + rows <= n_left, "score_top_candidates: rows [", row_start, ", ", row_start + rows,
                    ") outside the ", n_left, " rows of left");
  TORCH_CHECK_VALUE(self_stride >= 0, "score_top_candidates: self_stride must be >= 0, got ", self_stride);
  TORCH_CHECK_VALUE(rac::score_top_supported(dim, n_right, m), "score_top_candidates needs dim 64, 128 or 256, 1 <= m <= ", rac::kScoreTopMaxM, " and n_right < 2^31; got dim ", dim, ", m ", m, ", n_right ", n_right);
  Tensor bias;
  if (bias_in.has_value()) {
    TORCH_CHECK_TYPE(bias_in->scalar_type() == at::kFloat, "score_top_candidates: bias must be float32, got ", bias_in->scalar_type());
    TORCH_CHECK_VALUE(bias_in->device() == left_in.device() && bias_in->dim() == 2 && bias_in->size(0) == groups && bias_in->size(1) == n_right,
                      "score_top_candidates: bias (groups, n_right) on the operands' device expected, got ", bias_in->sizes(), " on ", bias_in->device());
    bias = bias_in->contiguous();
  }
  const c10::cuda::CUDAGuard guard(left_in.device());
  Tensor left = left_in.contiguous(), right = right_in.contiguous();
  if (reinterpret_cast<uintptr_t>(left.data_ptr()) % 16 != 0) left = left.clone();
  if (reinterpret_cast<uintptr_t>(right.data_ptr()) % 16 != 0) right = right.clone();
  Tensor out = at::empty({groups, rows, m}, left.options().dtype(at::kLong));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(left.get_device()).stream();
  const cudaError_t err = rac::score_top_candidates(reinterpret_cast<const __half*>(left.data_ptr()), reinterpret_cast<const __half*>(right.data_ptr()),
                                                    bias.defined() ? bias.data_ptr<float>() : nullptr, groups, n_left, n_right, dim, row_start, rows, self_stride, m, out.data_ptr<int64_t>(), stream);
  TORCH_CHECK_VALUE(err != cudaErrorNotSupported, "score_top_candidates needs a GPU of compute capability 8.0 or newer");
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

Tensor rerank_l2_cuda(const Tensor& keys_in, int64_t row_start, const Tensor& cand_in, int64_t k, bool check_ids) {
  ra_ext::check_rerank_l2_args(keys_in, row_start, cand_in, k);
  TORCH_CHECK_VALUE(keys_in.is_cuda(), "keys must be a CUDA tensor, got device ", keys_in.device());
  const c10::cuda::CUDAGuard guard(keys_in.device());
  const int64_t groups = keys_in.size(0), n = keys_in.size(1), d = keys_in.size(2), b = cand_in.size(1), m = cand_in.size(2);
  TORCH_CHECK_VALUE(rac::rerank_l2_supported(n, d, m, k), "rerank_l2 on a GPU needs d <= 256, k <= m <= 256 and n < 2^31; got n ", n,
                    ", d ", d, ", m ", m, ", k ", k);
  if (check_ids) ra_ext::check_candidate_ids(cand_in, n);  // without it, ids outside [0, n) count as none (never read)
  const Tensor keys = keys_in.contiguous(), cand = cand_in.contiguous();
  Tensor out = at::empty({groups, b, k}, cand.options());
  if (groups * b == 0) return out;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(keys.get_device()).stream();
  cudaError_t err = cudaSuccess;
  switch (keys.scalar_type()) {
    case at::kFloat:
      err = rac::rerank_l2<float>(keys.data_ptr<float>(), groups, n, d, row_start, cand.data_ptr<int64_t>(), b, m, k, out.data_ptr<int64_t>(), stream);
      break;
    case at::kHalf:
      err = rac::rerank_l2<__half>(reinterpret_cast<const __half*>(keys.data_ptr()), groups, n, d, row_start, cand.data_ptr<int64_t>(), b, m, k,
                                   out.data_ptr<int64_t>(), stream);
      break;
    default:
      err = rac::rerank_l2<__nv_bfloat16>(reinterpret_cast<const __nv_bfloat16*>(keys.data_ptr()), groups, n, d, row_start,
                                          cand.data_ptr<int64_t>(), b, m, k, out.data_ptr<int64_t>(), stream);
  }
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

Tensor projection_prune_cuda(const Tensor& keys_in, int64_t per, const Tensor& begin, const Tensor& counts, const Tensor& pivot, const Tensor& near,
                             const Tensor& near_dist, const Tensor& mips, int64_t degree, int64_t cap, bool check_ids) {
  ra_ext::check_projection_prune_args(keys_in, per, begin, counts, pivot, near, near_dist, mips, degree, cap);
  TORCH_CHECK_VALUE(keys_in.is_cuda(), "keys must be a CUDA tensor, got device ", keys_in.device());
  const c10::cuda::CUDAGuard guard(keys_in.device());
  const int64_t groups = keys_in.size(0), n = keys_in.size(1), d = keys_in.size(2);
  if (check_ids) ra_ext::check_projection_segments(groups, n, per, begin, counts, pivot, near, mips);  // without it they are trusted
  TORCH_CHECK_VALUE(rac::projection_prune_supported(d, degree), "projection_prune on a GPU needs d <= ", rac::kProjectionMaxDim, " and degree <= ",
                    rac::kProjectionMaxDegree, "; got d ", d, ", degree ", degree);
  const Tensor keys = keys_in.contiguous(), bc = begin.contiguous(), cc = counts.contiguous(), pc = pivot.contiguous(), nc = near.contiguous(),
               dc = near_dist.contiguous(), mc = mips.contiguous();
  Tensor out = at::full({groups * per, n, degree}, -1, keys.options().dtype(at::kInt));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(keys.get_device()).stream();
  const int64_t* nseg = cc.data_ptr<int64_t>();
  cudaError_t err = cudaSuccess;
  switch (keys.scalar_type()) {
    case at::kFloat:
      err = rac::projection_prune<float>(keys.data_ptr<float>(), n, d, per, bc.data_ptr<int64_t>(), nseg, nseg + 1, bc.numel(), pc.data_ptr<int64_t>(),
                                         nc.data_ptr<int64_t>(), dc.data_ptr<float>(), mc.data_ptr<int64_t>(), degree, cap, out.data_ptr<int32_t>(), stream);
      break;
    case at::kHalf:
      err = rac::projection_prune<__half>(reinterpret_cast<const __half*>(keys.data_ptr()), n, d, per, bc.data_ptr<int64_t>(), nseg, nseg + 1, bc.numel(),
                                          pc.data_ptr<int64_t>(), nc.data_ptr<int64_t>(), dc.data_ptr<float>(), mc.data_ptr<int64_t>(), degree, cap,
                                          out.data_ptr<int32_t>(), stream);
      break;
    default:
      err = rac::projection_prune<__nv_bfloat16>(reinterpret_cast<const __nv_bfloat16*>(keys.data_ptr()), n, d, per, bc.data_ptr<int64_t>(), nseg,
                                                 nseg + 1, bc.numel(), pc.data_ptr<int64_t>(), nc.data_ptr<int64_t>(), dc.data_ptr<float>(),
                                                 mc.data_ptr<int64_t>(), degree, cap, out.data_ptr<int32_t>(), stream);
  }
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(retrieval_attention, CUDA, m) {
  m.impl("sparse_attention", &sparse_attention_cuda);
  m.impl("dense_attention", &dense_attention_cuda);
  m.impl("merge_attention", &merge_attention_cuda);
  m.impl("chunk_top_candidates", &chunk_top_candidates_cuda);
  m.impl("score_top_candidates", &score_top_candidates_cuda);
  m.impl("rerank_l2", &rerank_l2_cuda);
  m.impl("projection_prune", &projection_prune_cuda);
}
