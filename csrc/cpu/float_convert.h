// Element loads and stores between the storage dtypes (float32, float16, bfloat16, float64)
// and the accumulation type (float32, float64 for float64). Plain bit operations, so the
// loops around them vectorize (vpmovzxwd + vpslld for bf16, vcvtph2ps for fp16) instead of
// calling a conversion routine per element.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace etc_ext {

inline float load_acc(const float* p) { return *p; }
inline double load_acc(const double* p) { return *p; }
inline float load_acc(const c10::BFloat16* p) {
  uint16_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}
inline float load_acc(const c10::Half* p) {
#if defined(__FLT16_MAX__) && defined(__x86_64__)
  // GCC >= 12 and Clang on x86-64: converts with vcvtph2ps. (GCC 12 defines __FLT16_MAX__ on
  // AArch64 but has no _Float16 in C++ there: c10's conversion below.)
  _Float16 h;
  std::memcpy(&h, p, sizeof(h));
  return static_cast<float>(h);
#else
  return static_cast<float>(*p);
#endif
}

// Stores an accumulation-type value, rounding to nearest even. The bf16 case is written
// without branches (c10's conversion tests for NaN with a branch, which keeps the loops
// around it scalar).
template <typename dst_t, typename acc_t>
inline void store_acc(dst_t* p, acc_t v) {
  *p = static_cast<dst_t>(v);
}
inline void store_acc(c10::BFloat16* p, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const uint16_t out = static_cast<uint16_t>(v != v ? 0x7fc0u : rounded);
  std::memcpy(p, &out, sizeof(out));
}

}  // namespace etc_ext
