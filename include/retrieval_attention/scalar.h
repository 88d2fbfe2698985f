// retrieval_attention/scalar.h -- storage scalar types of the core.
//
// Contract
//   * Vectors are stored as float (float32), Half (IEEE float16) or BFloat16; all arithmetic is float32.
//   * Half and BFloat16 are 16-bit trivially-copyable wrappers with the same bit layout as torch's
//     at::Half / at::BFloat16 and numpy's float16, so buffers can be shared by pointer without copies.
//   * to_float / from_float are exact for the 16-bit -> float direction; float -> 16-bit rounds to nearest even.
//   * Everything here is pure, header-only and thread-safe.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace retrieval_attention {

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

// Tag stored in index files and used by the bindings to dispatch on dtype.
enum class ScalarKind : uint32_t { Float32 = 0, Float16 = 1, BFloat16 = 2 };

inline const char* scalar_kind_name(ScalarKind k) {
  switch (k) {
    case ScalarKind::Float32: return "float32";
    case ScalarKind::Float16: return "float16";
    case ScalarKind::BFloat16: return "bfloat16";
  }
  return "unknown";
}

template <class T> struct ScalarTraits;
template <> struct ScalarTraits<float> {
  static constexpr ScalarKind kind = ScalarKind::Float32;
};
template <> struct ScalarTraits<Half> {
  static constexpr ScalarKind kind = ScalarKind::Float16;
};
template <> struct ScalarTraits<BFloat16> {
  static constexpr ScalarKind kind = ScalarKind::BFloat16;
};

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float to_float(float x) { return x; }

inline float to_float(BFloat16 x) { return bits_to_float(static_cast<uint32_t>(x.bits) << 16); }

inline float to_float(Half h) {
  // Branch-light IEEE half -> float conversion (handles subnormals, inf, nan).
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t exp = (h.bits >> 10) & 0x1fu;
  const uint32_t man = h.bits & 0x3ffu;
  if (exp == 0) {
    // zero or subnormal: value = man * 2^-24
    float v = static_cast<float>(man) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | (man << 13));
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}

template <class T> T from_float(float f);

template <> inline float from_float<float>(float f) { return f; }

template <> inline BFloat16 from_float<BFloat16>(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return BFloat16{static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet nan
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return BFloat16{static_cast<uint16_t>(u >> 16)};
}

template <> inline Half from_float<Half>(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t absu = u & 0x7fffffffu;
  if (absu > 0x7f800000u) return Half{static_cast<uint16_t>(sign | 0x7e00u)};  // nan
  if (absu >= 0x477ff000u) return Half{static_cast<uint16_t>(sign | 0x7c00u)};  // overflow -> inf
  if (absu < 0x38800000u) {
    // subnormal or zero in half: round(|f| * 2^24) to nearest even
    const float a = bits_to_float(absu) * 16777216.0f;
    const float r = std::nearbyint(a);
    return Half{static_cast<uint16_t>(sign | static_cast<uint16_t>(r))};
  }
  uint32_t m = absu + 0xfffu + ((absu >> 13) & 1u);  // round mantissa to 10 bits, nearest even
  return Half{static_cast<uint16_t>(sign | ((m - 0x38000000u) >> 13))};
}

// Dot product of a float32 query with one stored row; float32 accumulation in 8 lanes so the
// compiler vectorises it without -ffast-math.
template <class T>
inline float dot_row(const float* q, const T* row, int64_t d) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= d; i += 8)
    for (int l = 0; l < 8; ++l) acc[l] += q[i + l] * to_float(row[i + l]);
  float s = 0.f;
  for (; i < d; ++i) s += q[i] * to_float(row[i]);
  return s + ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

// dot_row of four queries (q, q + d, q + 2d, q + 3d) against one row, read and widened once: out[j] is bit-equal to
// dot_row(q + j * d, row, d) (same lanes, same reduction order).
template <class T>
inline void dot_row4(const float* q, const T* row, int64_t d, float* out) {
  float a[4][8] = {};
  int64_t i = 0;
  for (; i + 8 <= d; i += 8)
    for (int l = 0; l < 8; ++l) {
      const float r = to_float(row[i + l]);
      for (int j = 0; j < 4; ++j) a[j][l] += q[j * d + i + l] * r;
    }
  for (int j = 0; j < 4; ++j) {
    float s = 0.f;
    for (int64_t t = i; t < d; ++t) s += q[j * d + t] * to_float(row[t]);
    out[j] = s + ((a[j][0] + a[j][4]) + (a[j][1] + a[j][5])) + ((a[j][2] + a[j][6]) + (a[j][3] + a[j][7]));
  }
}

// A hint that the `bytes` from p will be read soon (one request per 64-byte cache line); no effect on results.
inline void prefetch_bytes(const void* p, int64_t bytes) {
#if defined(__GNUC__)
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o);
#else
  (void)p;
  (void)bytes;
#endif
}

// out[i] += w * row[i]
template <class T>
inline void axpy_row(float w, const T* row, float* out, int64_t d) {
  for (int64_t i = 0; i < d; ++i) out[i] += w * to_float(row[i]);
}

// True when every value is finite; graph search orders candidates by score and needs comparable (non-NaN) scores.
template <class T>
inline bool all_finite(const T* v, int64_t count) {
  // A value is NaN or Inf exactly when its exponent bits are all ones. Testing the bits without a branch lets the
  // compiler vectorise the loop; one check per block keeps an early exit (the prefill checks every key row).
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>;
  constexpr Bits kExp = std::is_same_v<T, float> ? Bits(0x7f800000u) : std::is_same_v<T, Half> ? Bits(0x7c00u) : Bits(0x7f80u);
  static_assert(sizeof(T) == sizeof(Bits), "all_finite: a scalar of 2 or 4 bytes");
  constexpr int64_t kBlock = 4096;
  for (int64_t b = 0; b < count; b += kBlock) {
    const int64_t e = std::min(count, b + kBlock);
    Bits bad = 0;
    for (int64_t i = b; i < e; ++i) {
      Bits x;
      std::memcpy(&x, v + i, sizeof x);
      bad |= static_cast<Bits>((x & kExp) == kExp);
    }
    if (bad) return false;
  }
  return true;
}

// The core reports bad input with std::invalid_argument (pybind11 maps it to ValueError) and
// broken files with std::runtime_error; it never aborts.
inline void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

}  // namespace retrieval_attention
