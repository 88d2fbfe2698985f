// Test helpers: seeded random data and naive double-precision references.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "retrieval_attention/scalar.h"

namespace ra_test {

inline std::vector<float> random_matrix(int64_t rows, int64_t cols, uint32_t seed, float scale = 1.f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.f, scale);
  std::vector<float> m(static_cast<size_t>(rows * cols));
  for (auto& x : m) x = dist(rng);
  return m;
}

template <class T>
std::vector<T> convert(const std::vector<float>& v) {
  std::vector<T> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = retrieval_attention::from_float<T>(v[i]);
  return out;
}

template <class T>
std::vector<float> widen(const std::vector<T>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = retrieval_attention::to_float(v[i]);
  return out;
}

// Exact top-k ids by double-precision inner product (ties: smaller id).
inline std::vector<int64_t> naive_topk(const float* q, const std::vector<float>& keys, int64_t n, int64_t d, int64_t k) {
  std::vector<double> s(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    double acc = 0;
    for (int64_t c = 0; c < d; ++c) acc += double(q[c]) * keys[static_cast<size_t>(i * d + c)];
    s[static_cast<size_t>(i)] = acc;
  }
  std::vector<int64_t> idx(static_cast<size_t>(n));
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return s[a] > s[b]; });
  idx.resize(static_cast<size_t>(std::min(k, n)));
  return idx;
}

// Attention of q over the given rows in double precision; returns lse, fills out.
inline double naive_attention(const float* q, const std::vector<float>& keys, const std::vector<float>& values, int64_t d, int64_t dv,
                              const std::vector<int64_t>& rows, double scale, std::vector<double>& out) {
  out.assign(static_cast<size_t>(dv), 0.0);
  if (rows.empty()) return -INFINITY;
  std::vector<double> s;
  double mx = -INFINITY;
  for (int64_t r : rows) {
    double acc = 0;
    for (int64_t c = 0; c < d; ++c) acc += double(q[c]) * keys[static_cast<size_t>(r * d + c)];
    s.push_back(acc * scale);
    mx = std::max(mx, acc * scale);
  }
  double sum = 0;
  for (size_t j = 0; j < rows.size(); ++j) {
    const double w = std::exp(s[j] - mx);
    sum += w;
    for (int64_t c = 0; c < dv; ++c) out[static_cast<size_t>(c)] += w * values[static_cast<size_t>(rows[j] * dv + c)];
  }
  for (auto& x : out) x /= sum;
  return mx + std::log(sum);
}

}  // namespace ra_test
