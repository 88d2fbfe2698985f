// csrc/chunk_top_checks.h -- argument checks of the chunk_top_candidates and rerank_l2 ops, shared by its CPU (csrc/ops.cpp) and
// CUDA (csrc/cuda/ops_cuda.cu) impls. Every failure is a ValueError naming the argument.
#pragma once

#include <ATen/ATen.h>

#include <utility>

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

// keys (groups, n, d) float32/float16/bfloat16; cand (groups, b, m) int64 on keys' device; rows row_start ..
// row_start + b - 1 exist; 1 <= k <= m. The ids' range [-1, n) is checked by the impls when asked (check_ids).
inline void check_rerank_l2_args(const at::Tensor& keys, int64_t row_start, const at::Tensor& cand, int64_t k) {
  TORCH_CHECK_VALUE(keys.defined() && cand.defined(), "rerank_l2: expected tensors, got None");
  TORCH_CHECK_VALUE(keys.dim() == 3, "keys must have shape (groups, n, d) (3 dims), got ", keys.sizes());
  TORCH_CHECK_VALUE(cand.dim() == 3, "cand must have shape (groups, rows, m) (3 dims), got ", cand.sizes());
  const auto s = keys.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, "keys must be float32, float16 or bfloat16, got ", s);
  TORCH_CHECK_TYPE(cand.scalar_type() == at::kLong, "cand must be int64, got ", cand.scalar_type());
  TORCH_CHECK_VALUE(cand.device() == keys.device(), "cand must be on ", keys.device(), " like keys, got ", cand.device());
  TORCH_CHECK_VALUE(cand.size(0) == keys.size(0), "cand has ", cand.size(0), " groups, keys ", keys.size(0));
  TORCH_CHECK_VALUE(keys.size(2) >= 1, "keys: d must be >= 1");
  TORCH_CHECK_VALUE(row_start >= 0 && row_start + cand.size(1) <= keys.size(1), "rows [", row_start, ", ", row_start + cand.size(1),
                    ") must lie in the ", keys.size(1), " keys");
  TORCH_CHECK_VALUE(k >= 1 && k <= cand.size(2), "k must be in [1, ", cand.size(2), "] (the candidates per row), got ", k);
}

// Any id outside [-1, n) is an error (on a GPU this costs one device sync).
inline void check_candidate_ids(const at::Tensor& cand, int64_t n) {
  if (cand.numel() == 0) return;
  const int64_t lo = cand.min().item<int64_t>(), hi = cand.max().item<int64_t>();
  TORCH_CHECK_VALUE(lo >= -1 && hi < n, "cand: key id ", lo < -1 ? lo : hi, " is out of range [0, ", n, ") (-1 marks none)");
}

}  // namespace ra_ext

namespace ra_ext {

// projection_prune: keys (groups, n, d) float32/float16/bfloat16; begin, pivot, near, mips int64 and near_dist float32,
// 1-D on keys' device, the last four of one length; counts int64 (2,) = (segments, valid entries); per >= 1; degree >= 1.
inline void check_projection_prune_args(const at::Tensor& keys, int64_t per, const at::Tensor& begin, const at::Tensor& counts,
                                        const at::Tensor& pivot, const at::Tensor& near, const at::Tensor& near_dist,
                                        const at::Tensor& mips, int64_t degree, int64_t cap) {
  TORCH_CHECK_VALUE(keys.defined() && begin.defined() && counts.defined() && pivot.defined() && near.defined() && near_dist.defined() && mips.defined(),
                    "projection_prune: expected tensors, got None");
  TORCH_CHECK_VALUE(keys.dim() == 3, "keys must have shape (groups, n, d) (3 dims), got ", keys.sizes());
  const auto s = keys.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, "keys must be float32, float16 or bfloat16, got ", s);
  const std::pair<const at::Tensor*, const char*> longs[] = {{&begin, "begin"}, {&counts, "counts"}, {&pivot, "pivot"}, {&near, "near"}, {&mips, "mips"}};
  for (const auto& [t, name] : longs) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kLong, name, " must be int64, got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->dim() == 1, name, " must be 1-D, got ", t->sizes());
    TORCH_CHECK_VALUE(t->device() == keys.device(), name, " must be on ", keys.device(), " like keys, got ", t->device());
  }
  TORCH_CHECK_TYPE(near_dist.scalar_type() == at::kFloat, "near_dist must be float32, got ", near_dist.scalar_type());
  TORCH_CHECK_VALUE(near_dist.dim() == 1 && near_dist.device() == keys.device(), "near_dist must be 1-D on ", keys.device());
  TORCH_CHECK_VALUE(counts.numel() == 2, "counts must hold (segments, valid entries), got ", counts.numel(), " values");
  const int64_t len = near.numel();
  TORCH_CHECK_VALUE(pivot.numel() == len && near_dist.numel() == len && mips.numel() == len, "pivot, near, near_dist and mips must have one length");
  TORCH_CHECK_VALUE(begin.numel() >= 1, "begin must have room for the segments");
  TORCH_CHECK_VALUE(per >= 1 && degree >= 1 && cap >= 1, "per, degree and cap must be >= 1");
}

// projection_prune's segments and ids (check_ids): counts within the arrays, segments non-empty and in order, each
// naming an (index, key) of keys (groups * per indexes of n keys), candidate ids in [0, n). Torch ops on the tensors'
// device: on a GPU a few device -> host syncs.
inline void check_projection_segments(int64_t groups, int64_t n, int64_t per, const at::Tensor& begin, const at::Tensor& counts,
                                      const at::Tensor& pivot, const at::Tensor& near, const at::Tensor& mips) {
  const at::Tensor c = counts.cpu();
  const int64_t n_seg = c[0].item<int64_t>(), n_valid = c[1].item<int64_t>();
  TORCH_CHECK_VALUE(n_seg >= 0 && n_seg <= begin.numel() && n_valid >= 0 && n_valid <= near.numel(), "counts out of range");
  if (n_seg == 0) return;
  const at::Tensor b = begin.slice(0, 0, n_seg);
  const bool ordered = n_seg == 1 || (b.slice(0, 1) > b.slice(0, 0, n_seg - 1)).all().item<bool>();
  TORCH_CHECK_VALUE(b[0].item<int64_t>() >= 0 && b[n_seg - 1].item<int64_t>() < n_valid && ordered, "segments are empty or out of order");
  const at::Tensor pv = pivot.index_select(0, b);
  TORCH_CHECK_VALUE(pv.min().item<int64_t>() >= 0 && pv.div(n + 1, "floor").max().item<int64_t>() < groups * per &&
                        pv.remainder(n + 1).max().item<int64_t>() < n,
                    "a segment names no (index, key)");
  for (const at::Tensor* ids : {&near, &mips}) {
    const at::Tensor v = ids->slice(0, 0, n_valid);
    TORCH_CHECK_VALUE(v.min().item<int64_t>() >= 0 && v.max().item<int64_t>() < n, "candidate id out of range [0, ", n, ")");
  }
}

}  // namespace ra_ext
