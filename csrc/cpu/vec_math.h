// Small branch-free math helpers the compiler can vectorize inside `omp simd` loops.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace etc_ext {

// exp(x) for x <= 0 (larger x is clamped to 0), Cephes-style: range reduction by ln 2 and a
// degree-6 polynomial, relative error below 3e-7. std::exp is a library call and stops the
// loops around it from vectorizing, which made the softmax pass dominate the CPU kernels.
inline float exp_nonpositive(float x) {
  x = std::min(std::max(x, -87.0f), 0.0f);  // a NaN stays NaN (std::max/min return it)
  const float n = static_cast<float>(static_cast<int32_t>(x * 1.44269504088896341f - 0.5f));
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n by building the float exponent directly; n >= -126 after the clamp.
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float pow2n;
  std::memcpy(&pow2n, &bits, sizeof(pow2n));
  return p * pow2n;
}

}  // namespace etc_ext
