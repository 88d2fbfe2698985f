// retrieval_attention/topk.h -- bounded top-k selection and the exact blocked inner-product kNN.
//
// Contract
//   * TopK keeps the k largest (score, id) pairs seen; ties broken by smaller id so results are
//     deterministic. sorted_into() writes them best-first and pads with (-1, -inf) when fewer than k.
//   * exact_topk(): queries (m x d float32, row-major) against rows [0, n) of a store; writes ids/scores
//     (m x k). Scores are raw inner products q.k. Keys are scored in blocks: each block is widened to
//     float32 once and multiplied with a block of queries, so the cost is one pass over the keys per query
//     block. On x86-64 CPUs with AVX and FMA (checked once at run time, as in simd_dot.h; the library is compiled
//     without -march) the scores come from an AVX kernel and are compared with the queries' thresholds eight at a
//     time (1.6-2.7x faster than Eigen's SSE2 GEMM and a scalar scan); elsewhere from Eigen's GEMM. The two sum
//     in different orders, so lists may differ at near-ties between machines, never on one. Parallel over query
//     blocks with OpenMP; safe to call concurrently as long as nothing appends to the store.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "scalar.h"
#include "simd_dot.h"
#include "vector_store.h"

namespace retrieval_attention {

class TopK {
 public:
  explicit TopK(int64_t k) : k_(k) { heap_.reserve(static_cast<size_t>(k)); }

  float threshold() const {
    return static_cast<int64_t>(heap_.size()) < k_ ? -std::numeric_limits<float>::infinity() : heap_.front().first;
  }
  bool full() const { return static_cast<int64_t>(heap_.size()) >= k_; }

  void push(float score, int64_t id) {
    if (k_ <= 0) return;
    if (static_cast<int64_t>(heap_.size()) < k_) {
      heap_.emplace_back(score, id);
      std::push_heap(heap_.begin(), heap_.end(), worse_first);
    } else if (better(score, id, heap_.front().first, heap_.front().second)) {
      std::pop_heap(heap_.begin(), heap_.end(), worse_first);
      heap_.back() = {score, id};
      std::push_heap(heap_.begin(), heap_.end(), worse_first);
    }
  }

  void sorted_into(int64_t* ids, float* scores) {
    std::sort(heap_.begin(), heap_.end(), [](const Entry& a, const Entry& b) { return better(a.first, a.second, b.first, b.second); });
    for (int64_t i = 0; i < k_; ++i) {
      const bool have = i < static_cast<int64_t>(heap_.size());
      ids[i] = have ? heap_[i].second : -1;
      if (scores) scores[i] = have ? heap_[i].first : -std::numeric_limits<float>::infinity();
    }
  }
  void clear() { heap_.clear(); }

 private:
  using Entry = std::pair<float, int64_t>;
  static bool better(float sa, int64_t ia, float sb, int64_t ib) { return sa > sb || (sa == sb && ia < ib); }
  // heap ordered so that the worst kept entry sits at front()
  static bool worse_first(const Entry& a, const Entry& b) { return better(a.first, a.second, b.first, b.second); }
  int64_t k_;
  std::vector<Entry> heap_;
};

namespace topk_detail {

#ifdef RA_X86_SIMD
// St (nk x 64, row stride 64) = Kf (nk x d, row-major) . Qt (d x 64, row-major: a block of queries transposed, zero
// beyond its mq columns), in tiles of 4 keys x 16 queries held in 8 accumulators: per dimension, two query loads and
// four key broadcasts feed 8 FMAs. Every score sums its d terms in order, one FMA each.
__attribute__((target("avx,fma"))) inline void scores_avx(const float* Kf, int64_t nk, int64_t d, const float* Qt, int64_t mq, float* St) {
  constexpr int64_t ld = 64;
  int64_t j0 = 0;
  for (; j0 + 4 <= nk; j0 += 4) {
    const float* k0 = Kf + j0 * d;
    for (int64_t i0 = 0; i0 < mq; i0 += 16) {
      __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00;
      const float* qt = Qt + i0;
      for (int64_t c = 0; c < d; ++c, qt += ld) {
        const __m256 q0 = _mm256_loadu_ps(qt), q1 = _mm256_loadu_ps(qt + 8);
        __m256 k = _mm256_broadcast_ss(k0 + c);
        a00 = _mm256_fmadd_ps(k, q0, a00), a01 = _mm256_fmadd_ps(k, q1, a01);
        k = _mm256_broadcast_ss(k0 + d + c);
        a10 = _mm256_fmadd_ps(k, q0, a10), a11 = _mm256_fmadd_ps(k, q1, a11);
        k = _mm256_broadcast_ss(k0 + 2 * d + c);
        a20 = _mm256_fmadd_ps(k, q0, a20), a21 = _mm256_fmadd_ps(k, q1, a21);
        k = _mm256_broadcast_ss(k0 + 3 * d + c);
        a30 = _mm256_fmadd_ps(k, q0, a30), a31 = _mm256_fmadd_ps(k, q1, a31);
      }
      float* st = St + j0 * ld + i0;
      _mm256_storeu_ps(st, a00), _mm256_storeu_ps(st + 8, a01);
      _mm256_storeu_ps(st + ld, a10), _mm256_storeu_ps(st + ld + 8, a11);
      _mm256_storeu_ps(st + 2 * ld, a20), _mm256_storeu_ps(st + 2 * ld + 8, a21);
      _mm256_storeu_ps(st + 3 * ld, a30), _mm256_storeu_ps(st + 3 * ld + 8, a31);
    }
  }
  for (; j0 < nk; ++j0)  // the last nk % 4 keys, same order of terms
    for (int64_t i = 0; i < mq; ++i) {
      float acc = 0.f;
      for (int64_t c = 0; c < d; ++c) acc = std::fma(Kf[j0 * d + c], Qt[c * ld + i], acc);
      St[j0 * ld + i] = acc;
    }
}

// Offers row j of St (64 queries' scores of key id0 + j) to the queries' TopKs; thr[i] mirrors best[i].threshold().
// Eight queries are compared at a time and only scores at or above their query's threshold are pushed (once a TopK
// is full, nearly none); the kept sets equal those of pushing every score, since push() rejects what cannot enter.
__attribute__((target("avx"))) inline void offer_avx(const float* St, int64_t nk, int64_t mq, int64_t id0, TopK* best, float* thr) {
  constexpr int64_t ld = 64;
  for (int64_t j = 0; j < nk; ++j) {
    const float* row = St + j * ld;
    for (int64_t i0 = 0; i0 < mq; i0 += 8) {
      int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + i0), _mm256_loadu_ps(thr + i0), _CMP_GE_OQ));
      while (mask) {
        const int64_t i = i0 + __builtin_ctz(static_cast<unsigned>(mask));
        mask &= mask - 1;
        best[i].push(row[i], id0 + j);
        thr[i] = best[i].threshold();
      }
    }
  }
}
#endif

}  // namespace topk_detail

template <class T>
void exact_topk(const float* queries, int64_t m, const VectorStore<T>& keys, int64_t n, int64_t k, int64_t* ids, float* scores) {
  const int64_t d = keys.dim();
  require(n >= 0 && n <= keys.size(), "exact_topk: n exceeds the number of stored keys");
  require(k > 0, "exact_topk: k must be positive");
  using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  constexpr int64_t kQueryBlock = 64, kKeyBlock = 1024;
  const int64_t n_qblocks = (m + kQueryBlock - 1) / kQueryBlock;
#ifdef RA_X86_SIMD
  const bool use_avx = simd::have_avx_fma();
#endif
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t qb = 0; qb < n_qblocks; ++qb) {
    const int64_t q0 = qb * kQueryBlock, mq = std::min(kQueryBlock, m - q0);
    std::vector<TopK> best(static_cast<size_t>(mq), TopK(k));
    RowMat Kf(kKeyBlock, d);
    const auto widen_keys = [&](int64_t k0, int64_t nk) {  // key rows k0 .. k0+nk-1 into Kf as float32
      for (int64_t r = 0; r < nk; ++r) {
        const T* src = keys.row(k0 + r);
        for (int64_t c = 0; c < d; ++c) Kf(r, c) = to_float(src[c]);
      }
    };
#ifdef RA_X86_SIMD
    if (use_avx) {
      // the query block transposed (d x 64, zero-padded) once; key rows widened block by block; scores key-major
      RowMat Qt = RowMat::Zero(d, kQueryBlock), St(kKeyBlock, kQueryBlock);
      for (int64_t i = 0; i < mq; ++i)
        for (int64_t c = 0; c < d; ++c) Qt(c, i) = queries[(q0 + i) * d + c];
      float thr[kQueryBlock];
      for (int64_t i = 0; i < kQueryBlock; ++i) thr[i] = std::numeric_limits<float>::infinity();  // padding never passes
      for (int64_t i = 0; i < mq; ++i) thr[i] = best[static_cast<size_t>(i)].threshold();
      const int64_t mq_pad = (mq + 15) / 16 * 16;
      for (int64_t k0 = 0; k0 < n; k0 += kKeyBlock) {
        const int64_t nk = std::min(kKeyBlock, n - k0);
        widen_keys(k0, nk);
        topk_detail::scores_avx(Kf.data(), nk, d, Qt.data(), mq_pad, St.data());
        topk_detail::offer_avx(St.data(), nk, mq_pad, k0, best.data(), thr);
      }
    } else
#endif
    {
      Eigen::Map<const RowMat> Q(queries + q0 * d, mq, d);
      RowMat S(mq, kKeyBlock);
      for (int64_t k0 = 0; k0 < n; k0 += kKeyBlock) {
        const int64_t nk = std::min(kKeyBlock, n - k0);
        widen_keys(k0, nk);
        S.leftCols(nk).noalias() = Q * Kf.topRows(nk).transpose();
        for (int64_t i = 0; i < mq; ++i) {
          TopK& t = best[static_cast<size_t>(i)];
          for (int64_t j = 0; j < nk; ++j) {
            const float sc = S(i, j);
            if (!t.full() || sc >= t.threshold()) t.push(sc, k0 + j);
          }
        }
      }
    }
    for (int64_t i = 0; i < mq; ++i) best[static_cast<size_t>(i)].sorted_into(ids + (q0 + i) * k, scores ? scores + (q0 + i) * k : nullptr);
  }
}

}  // namespace retrieval_attention
