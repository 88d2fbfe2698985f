// csrc/tensor_checks.h -- argument checks shared by the ops and the index bindings.
// Every failure is a c10::ValueError / c10::TypeError (Python ValueError / TypeError) naming the argument.
#pragma once

#include <torch/extension.h>

#include <string>

#include "retrieval_attention/scalar.h"

namespace ra_ext {

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got device ", t.device());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must have shape ", layout, " (", dim, " dims), got ", t.sizes());
}

inline void check_float_storage(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, name,
                   " must be float32, float16 or bfloat16, got ", s);
}

inline retrieval_attention::ScalarKind kind_of(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return retrieval_attention::ScalarKind::Float32;
    case at::kHalf: return retrieval_attention::ScalarKind::Float16;
    case at::kBFloat16: return retrieval_attention::ScalarKind::BFloat16;
    default: TORCH_CHECK_TYPE(false, "unsupported storage dtype ", s);
  }
}

inline at::ScalarType dtype_of(retrieval_attention::ScalarKind k) {
  switch (k) {
    case retrieval_attention::ScalarKind::Float32: return at::kFloat;
    case retrieval_attention::ScalarKind::Float16: return at::kHalf;
    case retrieval_attention::ScalarKind::BFloat16: return at::kBFloat16;
  }
  return at::kFloat;
}

// Calls fn with a null pointer of the core scalar type matching `s` (float, Half or BFloat16).
template <class Fn>
decltype(auto) dispatch_storage(at::ScalarType s, Fn&& fn) {
  switch (s) {
    case at::kHalf: return fn(static_cast<retrieval_attention::Half*>(nullptr));
    case at::kBFloat16: return fn(static_cast<retrieval_attention::BFloat16*>(nullptr));
    case at::kFloat: return fn(static_cast<float*>(nullptr));
    default: TORCH_CHECK_TYPE(false, "unsupported storage dtype ", s);
  }
}

// Translate core exceptions (std::invalid_argument -> ValueError) at the torch op boundary.
template <class Fn>
decltype(auto) translate_errors(Fn&& fn) {
  try {
    return fn();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
}

}  // namespace ra_ext
