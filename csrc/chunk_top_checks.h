// csrc/chunk_top_checks.h -- argument checks of the chunk_top_candidates op, shared by its CPU (csrc/ops.cpp) and
// CUDA (csrc/cuda/ops_cuda.cu) impls. Every failure is a ValueError naming the argument.
#pragma once

#include <ATen/ATen.h>

namespace ra_ext {

// scores (rows, cols) with cols a multiple of chunk; 1 <= kc <= cols / chunk; 1 <= m <= kc * chunk.
inline void check_chunk_top_args(const at::Tensor& scores, int64_t chunk, int64_t kc, int64_t m) {
  TORCH_CHECK_VALUE(scores.defined(), "scores: expected a tensor, got None");
  TORCH_CHECK_VALUE(scores.dim() == 2, "scores must have shape (rows, cols) (2 dims), got ", scores.sizes());
  TORCH_CHECK_VALUE(chunk >= 1, "chunk must be >= 1, got ", chunk);
  const int64_t cols = scores.size(1);
  TORCH_CHECK_VALUE(cols >= chunk && cols % chunk == 0, "scores: cols (", cols, ") must be a positive multiple of chunk (", chunk, ")");
  TORCH_CHECK_VALUE(kc >= 1 && kc <= cols / chunk, "kc must be in [1, ", cols / chunk, "] (the chunks of a row), got ", kc);
  TORCH_CHECK_VALUE(m >= 1 && m <= kc * chunk, "m must be in [1, ", kc * chunk, "] (the entries of kc chunks), got ", m);
}

}  // namespace ra_ext
