// csrc/cuda/ops_cuda.cu -- CUDA implementations of the retrieval_attention ops (schemas live in csrc/ops.cpp).
//
// Thin launchers only: validate tensors (device, dtype, rank, shape, contiguity), convert the small inputs
// (queries, merge inputs) to contiguous float32, allocate outputs and split-K workspace with the caching
// allocator, and enqueue the kernels of include/retrieval_attention/cuda/decode_attention.cuh on the current
// CUDA stream of the inputs' device. The algorithms live in that header.
//
//   sparse_attention(q, keys, values, ids, scale) -> (out, lse)   [validates ids: one device->host sync]
//   dense_attention(q, keys, values, scale, causal) -> (out, lse)
//   merge_attention(out_a, lse_a, out_b, lse_b)   -> (out, lse)
//
// Headers: c10/cuda (stream, guard, launch check) rather than ATen/cuda/CUDAContext.h, which pulls in the
// cuBLAS/cuSPARSE/cuSOLVER headers; c10::cuda::getCurrentCUDAStream is the function at::cuda re-exports.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <tuple>

#include "retrieval_attention/cuda/decode_attention.cuh"

namespace {

namespace rac = retrieval_attention::cuda;
using at::Tensor;

void check_cuda(const Tensor& t, const char* name, const Tensor& ref) {
  TORCH_CHECK(t.defined(), name, ": expected a tensor, got None");
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == ref.device(), name, ": expected a tensor on ", ref.device(), " (the device of q / the first input), got one on ",
              t.device());
}

void check_rank(const Tensor& t, const char* name, int64_t rank, const char* layout) {
  TORCH_CHECK(t.dim() == rank, name, ": expected a ", rank, "-D tensor ", layout, ", got shape ", t.sizes());
}

void check_kv_dtype(const Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, name, ": expected float32, float16 or bfloat16, got ", s);
}

void check_contiguous(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous (row-major) tensor; call .contiguous() first");
}

Tensor queries_f32(const Tensor& q) {
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "q: expected a floating-point tensor, got ", q.scalar_type());
  return q.to(at::kFloat).contiguous();
}

// Shared validation of q / keys / values; returns the float32 contiguous queries.
Tensor check_qkv(const Tensor& q, const Tensor& keys, const Tensor& values) {
  TORCH_CHECK(q.defined() && q.is_cuda(), "q: expected a CUDA tensor, got one on ", q.defined() ? q.device() : at::Device(at::kCPU));
  check_cuda(keys, "keys", q);
  check_cuda(values, "values", q);
  check_rank(q, "q", 3, "(Hq, m, d)");
  check_rank(keys, "keys", 3, "(Hkv, n, d)");
  check_rank(values, "values", 3, "(Hkv, n, dv)");
  check_kv_dtype(keys, "keys");
  TORCH_CHECK(values.scalar_type() == keys.scalar_type(), "values: expected the dtype of keys (", keys.scalar_type(), "), got ",
              values.scalar_type());
  check_contiguous(keys, "keys");
  check_contiguous(values, "values");
  const int64_t hq = q.size(0), hkv = keys.size(0);
  TORCH_CHECK(hq > 0 && hkv > 0, "q, keys: the number of heads must be positive, got Hq=", hq, ", Hkv=", hkv);
  TORCH_CHECK(hq % hkv == 0, "q, keys: query heads (", hq, ") must be a multiple of key/value heads (", hkv, ")");
  TORCH_CHECK(q.size(2) == keys.size(2), "q, keys: head dim mismatch: q has d=", q.size(2), ", keys have d=", keys.size(2));
  TORCH_CHECK(values.size(0) == hkv && values.size(1) == keys.size(1), "values: expected shape (", hkv, ", ", keys.size(1),
              ", dv) to match keys ", keys.sizes(), ", got ", values.sizes());
  TORCH_CHECK(rac::supports_dims(keys.size(2), values.size(2)), "keys, values: the CUDA kernels support d, dv <= ", rac::kMaxHeadDim,
              ", got d=", keys.size(2), ", dv=", values.size(2));
  return queries_f32(q);
}

template <class T>
rac::AttentionParams<T> make_params(const Tensor& q32, const Tensor& keys, const Tensor& values, double scale, Tensor& out, Tensor& lse) {
  rac::AttentionParams<T> p;
  p.q = q32.data_ptr<float>();
  p.keys = reinterpret_cast<const T*>(keys.data_ptr());
  p.values = reinterpret_cast<const T*>(values.data_ptr());
  p.hq = q32.size(0);
  p.m = q32.size(1);
  p.d = q32.size(2);
  p.hkv = keys.size(0);
  p.n = keys.size(1);
  p.dv = values.size(2);
  p.scale = static_cast<float>(scale);
  p.out = out.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  return p;
}

// Allocates the split-K workspace (if any) and launches. `sparse` selects the kernel family.
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
std::tuple<Tensor, Tensor> dense_typed(const Tensor& q32, const Tensor& keys, const Tensor& values, double scale, bool causal) {
  Tensor out = at::empty({q32.size(0), q32.size(1), values.size(2)}, q32.options());
  Tensor lse = at::empty({q32.size(0), q32.size(1)}, q32.options());
  auto p = make_params<T>(q32, keys, values, scale, out, lse);
  p.causal = causal;
  run_attention<T>(p, /*sparse=*/false, q32);
  return {out, lse};
}

template <class T>
std::tuple<Tensor, Tensor> sparse_typed(const Tensor& q32, const Tensor& keys, const Tensor& values, const Tensor& ids, double scale) {
  Tensor out = at::empty({q32.size(0), q32.size(1), values.size(2)}, q32.options());
  Tensor lse = at::empty({q32.size(0), q32.size(1)}, q32.options());
  auto p = make_params<T>(q32, keys, values, scale, out, lse);
  p.ids = ids.numel() > 0 ? ids.data_ptr<int64_t>() : nullptr;
  p.k = ids.size(2);
  run_attention<T>(p, /*sparse=*/true, q32);
  return {out, lse};
}

std::tuple<Tensor, Tensor> dense_attention_cuda(const Tensor& q, const Tensor& keys, const Tensor& values, double scale, bool causal) {
  TORCH_CHECK(q.defined() && q.is_cuda(), "q: expected a CUDA tensor");
  const c10::cuda::CUDAGuard guard(q.device());
  const Tensor q32 = check_qkv(q, keys, values);
  TORCH_CHECK(!causal || q32.size(1) <= keys.size(1), "causal attention needs at least as many keys as queries: m=", q32.size(1),
              ", n=", keys.size(1));
  switch (keys.scalar_type()) {
    case at::kFloat: return dense_typed<float>(q32, keys, values, scale, causal);
    case at::kHalf: return dense_typed<__half>(q32, keys, values, scale, causal);
    case at::kBFloat16: return dense_typed<__nv_bfloat16>(q32, keys, values, scale, causal);
    default: break;
  }
  TORCH_CHECK(false, "keys: unsupported dtype ", keys.scalar_type());
  return {};
}

std::tuple<Tensor, Tensor> sparse_attention_cuda(const Tensor& q, const Tensor& keys, const Tensor& values, const Tensor& ids, double scale) {
  TORCH_CHECK(q.defined() && q.is_cuda(), "q: expected a CUDA tensor");
  const c10::cuda::CUDAGuard guard(q.device());
  const Tensor q32 = check_qkv(q, keys, values);
  check_cuda(ids, "ids", q);
  check_rank(ids, "ids", 3, "(Hq, m, k)");
  TORCH_CHECK(ids.scalar_type() == at::kLong, "ids: expected int64, got ", ids.scalar_type());
  check_contiguous(ids, "ids");
  TORCH_CHECK(ids.size(0) == q32.size(0) && ids.size(1) == q32.size(1), "ids: expected shape (", q32.size(0), ", ", q32.size(1),
              ", k) to match q ", q.sizes(), ", got ", ids.sizes());
  const int64_t n = keys.size(1);
  if (ids.numel() > 0) {
    // Same contract as the CPU op: any id other than -1 outside [0, n) is an error (costs one sync).
    const Tensor bad = at::logical_or(ids.lt(-1), ids.ge(n));
    if (bad.any().item<bool>()) {
      const int64_t first = ids.masked_select(bad).flatten()[0].item<int64_t>();
      TORCH_CHECK_INDEX(false, "ids: key id ", first, " is out of range [0, ", n, ")");
    }
  }
  switch (keys.scalar_type()) {
    case at::kFloat: return sparse_typed<float>(q32, keys, values, ids, scale);
    case at::kHalf: return sparse_typed<__half>(q32, keys, values, ids, scale);
    case at::kBFloat16: return sparse_typed<__nv_bfloat16>(q32, keys, values, ids, scale);
    default: break;
  }
  TORCH_CHECK(false, "keys: unsupported dtype ", keys.scalar_type());
  return {};
}

std::tuple<Tensor, Tensor> merge_attention_cuda(const Tensor& out_a, const Tensor& lse_a, const Tensor& out_b, const Tensor& lse_b) {
  TORCH_CHECK(out_a.defined() && out_a.is_cuda(), "out_a: expected a CUDA tensor");
  const c10::cuda::CUDAGuard guard(out_a.device());
  check_cuda(lse_a, "lse_a", out_a);
  check_cuda(out_b, "out_b", out_a);
  check_cuda(lse_b, "lse_b", out_a);
  const struct {
    const Tensor* t;
    const char* name;
  } all[] = {{&out_a, "out_a"}, {&lse_a, "lse_a"}, {&out_b, "out_b"}, {&lse_b, "lse_b"}};
  for (const auto& e : all)
    TORCH_CHECK(at::isFloatingType(e.t->scalar_type()), e.name, ": expected a floating-point tensor, got ", e.t->scalar_type());
  TORCH_CHECK(out_a.dim() >= 1, "out_a: expected shape (..., dv), got a 0-D tensor");
  TORCH_CHECK(out_b.sizes() == out_a.sizes(), "out_b: expected the shape of out_a ", out_a.sizes(), ", got ", out_b.sizes());
  const auto lead = out_a.sizes().slice(0, out_a.dim() - 1);
  TORCH_CHECK(lse_a.sizes() == lead, "lse_a: expected shape ", lead, " (out_a's shape without the last dim), got ", lse_a.sizes());
  TORCH_CHECK(lse_b.sizes() == lead, "lse_b: expected shape ", lead, " (out_a's shape without the last dim), got ", lse_b.sizes());

  const Tensor oa = out_a.to(at::kFloat).contiguous(), ob = out_b.to(at::kFloat).contiguous();
  const Tensor la = lse_a.to(at::kFloat).contiguous(), lb = lse_b.to(at::kFloat).contiguous();
  Tensor out = at::empty(out_a.sizes(), oa.options());
  Tensor lse = at::empty(lead, la.options());
  const int64_t dv = out_a.size(-1);
  const int64_t rows = lse.numel();
  if (rows == 0) return {out, lse};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(out_a.get_device()).stream();
  C10_CUDA_CHECK(rac::merge_attention(oa.data_ptr<float>(), la.data_ptr<float>(), ob.data_ptr<float>(), lb.data_ptr<float>(), rows, dv,
                                      out.data_ptr<float>(), lse.data_ptr<float>(), stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(retrieval_attention, CUDA, m) {
  m.impl("sparse_attention", &sparse_attention_cuda);
  m.impl("dense_attention", &dense_attention_cuda);
  m.impl("merge_attention", &merge_attention_cuda);
}
