// retrieval_attention/simd_dot.h -- the inner products of float32 queries with stored rows that searches and exact
// scans spend their time in.
//
// Contract
//   * simd::dot(q, row, d): q (d float32) . row (d values of T = float/Half/BFloat16), accumulated in float32.
//     simd::dot4(q, row, d, out): out[j] = dot(q + j * d, row, d) for j < 4, bit for bit, with the row read and widened
//     once (exact scans score a GQA group's queries against each row).
//   * The library is compiled without -march: on x86-64 with AVX and FMA (and F16C for Half), checked once at run time,
//     rows are widened 8 values at a time and accumulated with FMA in four 8-lane accumulators; elsewhere the portable
//     dot_row / dot_row4 of scalar.h. The two paths round differently, so results are reproducible on one machine, and
//     every caller on that machine gets the same sums.
//   * Pure functions; no state but the cached CPU check.
#pragma once

#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define RA_X86_SIMD 1
#endif

#include "scalar.h"

namespace retrieval_attention {
namespace simd {

#ifdef RA_X86_SIMD
__attribute__((target("avx,fma"), always_inline)) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
__attribute__((target("avx,fma"), always_inline)) inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx,fma"), always_inline)) inline __m256 load8(const BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i z = _mm_setzero_si128();
  return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_castsi128_ps(_mm_unpacklo_epi16(z, h))), _mm_castsi128_ps(_mm_unpackhi_epi16(z, h)), 1);
}
__attribute__((target("avx,fma,f16c"), always_inline)) inline __m256 load8(const Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
// always_inline so that the loops of AVX callers (the graph's occlusion test) inline it; dot_avx is the out-of-line entry
template <class T>
__attribute__((target("avx,fma,f16c"), always_inline)) inline float dot_avx_inl(const float* q, const T* row, int64_t d) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= d; i += 32) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(row + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), load8(row + i + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 16), load8(row + i + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 24), load8(row + i + 24), a3);
  }
  for (; i + 8 <= d; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(row + i), a0);
  float s = hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; i < d; ++i) s += q[i] * to_float(row[i]);
  return s;
}
template <class T>
__attribute__((target("avx,fma,f16c"))) float dot_avx(const float* q, const T* row, int64_t d) {
  return dot_avx_inl(q, row, d);
}
// dot_avx_inl of four queries: the same accumulators per query, each 8 row values loaded and widened once
template <class T>
__attribute__((target("avx,fma,f16c"))) void dot4_avx(const float* q, const T* row, int64_t d, float* out) {
  __m256 a[4][4];
  for (auto& per : a)
    for (auto& x : per) x = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= d; i += 32)
    for (int c = 0; c < 4; ++c) {
      const __m256 r = load8(row + i + 8 * c);
      for (int j = 0; j < 4; ++j) a[j][c] = _mm256_fmadd_ps(_mm256_loadu_ps(q + j * d + i + 8 * c), r, a[j][c]);
    }
  for (; i + 8 <= d; i += 8) {
    const __m256 r = load8(row + i);
    for (int j = 0; j < 4; ++j) a[j][0] = _mm256_fmadd_ps(_mm256_loadu_ps(q + j * d + i), r, a[j][0]);
  }
  for (int j = 0; j < 4; ++j) {
    float s = hsum256(_mm256_add_ps(_mm256_add_ps(a[j][0], a[j][1]), _mm256_add_ps(a[j][2], a[j][3])));
    for (int64_t t = i; t < d; ++t) s += q[j * d + t] * to_float(row[t]);
    out[j] = s;
  }
}
inline bool have_avx_fma() {
  static const bool ok = __builtin_cpu_supports("avx") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return ok;
}
#endif

template <class T>
inline float dot(const float* q, const T* row, int64_t d) {
#ifdef RA_X86_SIMD
  if (have_avx_fma()) return dot_avx(q, row, d);
#endif
  return dot_row(q, row, d);
}

template <class T>
inline void dot4(const float* q, const T* row, int64_t d, float* out) {
#ifdef RA_X86_SIMD
  if (have_avx_fma()) return dot4_avx(q, row, d, out);
#endif
  dot_row4(q, row, d, out);
}

}  // namespace simd
}  // namespace retrieval_attention
