// CPU kernel of weighted_aggregate: out[b, k, :] = sum_n w[b, k, n] * x[b, n, :] with
// w = softmax over valid n of logits + log(importance), fp32 accumulation, in one pass.
//
// float16/bfloat16 (and float64) x: a task owns one batch row b and a chunk of channels. For
// a group of rows of K it computes their softmax weights into a per-thread buffer (never a
// [B, K, N] tensor), then
//   - K <= 4 (memory bound): streams the rows of x once, contiguous channels, each updating
//     the K accumulator rows in L1 (fp16/bf16 converted in registers);
//   - larger K (compute bound): per chunk of tokens, copies x[b, tokens, channels] once into
//     a small tile-major fp32 panel (the only conversion of fp16/bf16 x) and runs a
//     register-blocked multiply-add over it (rows of K x two vector registers of channels).
//     The panel stays in L2 while every row block reads it, so x is read from memory once.
// float32 x needs no conversion and the sum is a plain GEMM per batch row: the softmax rows
// go to one [K, N] buffer and the product to ATen's BLAS (see weighted_aggregate_cpu).
//
// The loops are templates on the instruction set (cpu_capability.h): vectors of its register
// width, and a register tile that fits its register file. The split into tasks and the
// per-thread buffers are decided here, once, for every instruction set alike.
#include "cpu_capability.h"
#include "float_convert.h"
#include "vec_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if ETC_EXT_X86_DISPATCH
#include <immintrin.h>
#endif

// Vector types wider than the baseline target's registers in internal functions: the ABI
// note GCC prints for them does not concern us.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace etc_ext {
namespace {

// Register tile: kRowBlock<Isa> rows of K x kTileVecs vectors of channels. 8 x 2 = 16 zmm
// accumulators of AVX-512's 32 registers; 6 x 2 = 12 of the 16 ymm (xmm) registers, which
// leaves room for the two x vectors and the broadcast weight (8 x 2 spilled to the stack
// and ran at a twentieth of the speed). The tile uses GCC/Clang vector types: with plain
// arrays under `omp simd` GCC keeps the accumulators on the stack.
constexpr int kTileVecs = 2;
template <typename Isa>
constexpr int kRowBlock = Isa::kRegisters >= 32 ? 8 : 6;
// Channels are split into tasks in units of kChannelUnit (a multiple of every tile width).
constexpr int64_t kChannelUnit = 32;
// Tokens per packed panel of x: panel = kTokenChunk x (task channels) accumulation-type
// values, at most 512 KiB with float32, which stays in L2 while all rows use it.
constexpr int64_t kTokenChunk = 256;
// Channel units per task, at most.
constexpr int64_t kMaxUnitsPerTask = 16;
// Softmax weights a thread keeps at once (256 KiB of float32): a group of rows x N, the
// group a multiple of kGroupRows (of every kRowBlock: 6 and 8), so no group ends in a part block.
constexpr int64_t kWeightBufferFloats = int64_t{1} << 16;
constexpr int64_t kGroupRows = 24;
// Few rows (K <= kStreamRows) stream x instead of packing it; their accumulators stay
// within kStreamAccBytes (L1).
constexpr int kStreamRows = 4;
constexpr int64_t kStreamAccBytes = 16384;

// A GCC/Clang vector of kBytes bytes of T.
template <typename T, int kBytes>
struct VectorOf {
  typedef T type __attribute__((vector_size(kBytes)));
};

template <typename acc_t, int kBytes>
struct Vec {
  using type = typename VectorOf<acc_t, kBytes>::type;
  static constexpr int kWidth = kBytes / sizeof(acc_t);
  static constexpr int kTile = kWidth * kTileVecs;  // channels per tile
};

inline float exp_np(float x) { return exp_nonpositive(x); }
inline double exp_np(double x) { return std::exp(x); }  // float64 is the gradcheck path

// Softmax of logits[n] + bias[n] over n into w; bias is -inf for invalid tokens, which get
// exactly 0. A row with no finite logit gets all zeros.
template <typename acc_t>
void softmax_row(const acc_t* __restrict__ logits, const acc_t* __restrict__ bias,
                 int64_t tokens, acc_t* __restrict__ w) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  acc_t row_max = kNegInf;
#pragma omp simd reduction(max : row_max)
  for (int64_t n = 0; n < tokens; ++n) {
    const acc_t z = logits[n] + bias[n];
    w[n] = z;
    row_max = std::max(row_max, z);
  }
  if (row_max == kNegInf) {
    std::fill(w, w + tokens, acc_t(0));
    return;
  }
  acc_t row_sum = 0;
#pragma omp simd reduction(+ : row_sum)
  for (int64_t n = 0; n < tokens; ++n) {
    const acc_t z = w[n];
    // exp of -inf - max is clamped, not 0: the validity factor zeroes it exactly. (A select
    // instead of the product keeps GCC from vectorizing this loop.)
    const acc_t e = exp_np(z - row_max) * static_cast<acc_t>(z > kNegInf);
    w[n] = e;
    row_sum += e;
  }
  const acc_t inv = acc_t(1) / row_sum;
#pragma omp simd
  for (int64_t n = 0; n < tokens; ++n) w[n] *= inv;
}

// One vector of x[c:c+W] converted to the accumulation type (float32 x never gets here: it
// goes to BLAS). Fixed-size copies and __builtin_convertvector: a plain copy loop would
// become a memmove call per tile row.
template <int kBytes>
inline typename Vec<double, kBytes>::type load_vec(const double* p) {
  typename Vec<double, kBytes>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
#if ETC_EXT_X86_DISPATCH
// bf16 -> fp32 as one widening move and a shift at the AVX2 / AVX-512 width (GCC lowers the
// generic __builtin_convertvector below to two 128-bit halves there).
__attribute__((target("avx2"))) inline Vec<float, 32>::type bf16_to_float_avx2(const c10::BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i bits = _mm256_slli_epi32(wide, 16);
  Vec<float, 32>::type out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}
__attribute__((target("avx512f"))) inline Vec<float, 64>::type bf16_to_float_avx512(const c10::BFloat16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  const __m512i bits = _mm512_slli_epi32(wide, 16);
  Vec<float, 64>::type out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}
#endif

template <int kBytes>
inline typename Vec<float, kBytes>::type load_vec(const c10::BFloat16* p) {
#if ETC_EXT_X86_DISPATCH
  if constexpr (kBytes == 32) return bf16_to_float_avx2(p);
  if constexpr (kBytes == 64) return bf16_to_float_avx512(p);
#endif
  using half_bits = typename VectorOf<uint16_t, kBytes / 2>::type;
  using float_bits = typename VectorOf<uint32_t, kBytes>::type;
  half_bits h;
  std::memcpy(&h, p, sizeof(h));
  const float_bits wide = __builtin_convertvector(h, float_bits) << 16;
  typename Vec<float, kBytes>::type v;
  std::memcpy(&v, &wide, sizeof(v));
  return v;
}
#if ETC_EXT_X86_DISPATCH
// fp16 -> fp32 with F16C / AVX-512's vcvtph2ps, for the AVX2 and AVX-512 entries (which have
// those targets: `flatten` inlines these there). The integer path below costs ~3x more,
// which made the memory-bound small-K case slower than eager on AVX2.
__attribute__((target("avx,f16c"))) inline Vec<float, 32>::type half_to_float_f16c(const c10::Half* p) {
  const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  Vec<float, 32>::type out;
  std::memcpy(&out, &v, sizeof(out));
  return out;
}
__attribute__((target("avx512f"))) inline Vec<float, 64>::type half_to_float_avx512(const c10::Half* p) {
  const __m512 v = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  Vec<float, 64>::type out;
  std::memcpy(&out, &v, sizeof(out));
  return out;
}
#endif

// fp16 -> fp32 with integer operations (exact, subnormals, inf and NaN included): GCC 12
// does not vectorize _Float16 conversions, this vectorizes on any target. The AVX2 and
// AVX-512 widths use the hardware conversion instead.
template <int kBytes>
inline typename Vec<float, kBytes>::type load_vec(const c10::Half* p) {
#if ETC_EXT_X86_DISPATCH
  if constexpr (kBytes == 32) return half_to_float_f16c(p);
  if constexpr (kBytes == 64) return half_to_float_avx512(p);
#endif
  using half_bits = typename VectorOf<uint16_t, kBytes / 2>::type;
  using float_bits = typename VectorOf<uint32_t, kBytes>::type;
  using float_mask = typename VectorOf<int32_t, kBytes>::type;
  using V = typename Vec<float, kBytes>::type;
  half_bits h;
  std::memcpy(&h, p, sizeof(h));
  const float_bits wide = __builtin_convertvector(h, float_bits);
  constexpr uint32_t kExpMask = 0x7c00u << 13;  // fp16 exponent bits, shifted into place
  float_bits bits = (wide & 0x7fffu) << 13;     // exponent and mantissa
  const float_bits exponent = bits & kExpMask;
  bits += (127u - 15u) << 23;                   // rebias the exponent
  const float_mask is_special = exponent == kExpMask;  // inf, NaN: exponent all ones
  bits = is_special ? bits + ((128u - 16u) << 23) : bits;
  V normal, subnormal;
  std::memcpy(&normal, &bits, sizeof(bits));
  // Zero and subnormals: one more exponent step, then subtract the implicit leading one.
  const float_bits sub_bits = bits + (1u << 23);
  std::memcpy(&subnormal, &sub_bits, sizeof(sub_bits));
  subnormal -= 6.103515625e-05f;  // 2^-14, the float with bits 113 << 23
  const float_mask is_small = exponent == 0u;
  V value = is_small ? subnormal : normal;
  float_bits out;
  std::memcpy(&out, &value, sizeof(out));
  out |= (wide & 0x8000u) << 16;  // sign
  std::memcpy(&value, &out, sizeof(out));
  return value;
}

// Floats between two tiles of the panel beyond the tile itself: one cache line. Unpadded,
// the tiles are a multiple of 4 KiB apart, so the stores of one row of x all land in one L1
// set and evict each other (with AVX2's 16-channel tiles packing took 80 % of the time).
template <typename acc_t>
constexpr int64_t kTilePad = 64 / sizeof(acc_t);
template <typename acc_t, int CT>
constexpr int64_t tile_stride(int64_t count) { return count * CT + kTilePad<acc_t>; }

// Copies x[n0:n0+count, c_begin:c_end] (converted) into the panel, tile-major:
// panel[t * tile_stride + n * CT + c] = x[n0 + n, c_begin + t * CT + c], zero past c_end.
template <typename Isa, typename scalar_t, typename acc_t>
void pack_panel(const scalar_t* __restrict__ x, int64_t x_stride_n, int64_t n0, int64_t count,
                int64_t c_begin, int64_t c_end, acc_t* __restrict__ panel) {
  using VecT = Vec<acc_t, Isa::kVectorBytes>;
  using V = typename VecT::type;
  constexpr int W = VecT::kWidth, CT = VecT::kTile;
  // The piece of each row is short (a task's chunk of channels) and the rows are far apart,
  // which the hardware prefetchers do not follow: prefetch a few rows ahead by hand.
  constexpr int64_t kAhead = 4;
  constexpr int64_t kLine = 64 / sizeof(scalar_t);
  for (int64_t n = 0; n < count; ++n) {
    const scalar_t* row = x + (n0 + n) * x_stride_n;
    if (n + kAhead < count) {
      const scalar_t* next = row + kAhead * x_stride_n;
      for (int64_t c = c_begin; c < c_end; c += kLine) __builtin_prefetch(next + c);
    }
    int64_t t = 0;
    for (int64_t c0 = c_begin; c0 < c_end; c0 += CT, ++t) {
      acc_t* dst = panel + t * tile_stride<acc_t, CT>(count) + n * CT;
      const scalar_t* src = row + c0;
      if (c0 + CT <= c_end) {
        for (int v = 0; v < kTileVecs; ++v) {
          const V xv = load_vec<Isa::kVectorBytes>(src + v * W);
          std::memcpy(dst + v * W, &xv, sizeof(V));
        }
      } else {
        const int width = static_cast<int>(c_end - c0);
        for (int c = 0; c < CT; ++c) dst[c] = c < width ? load_acc(src + c) : acc_t(0);
      }
    }
  }
}

// acc[k][0:CT] += sum_n w[k * w_stride + n] * panel[n][0:CT] for KB rows over `count` tokens.
template <typename Isa, int KB, typename acc_t>
void tile_kernel(const acc_t* __restrict__ panel, const acc_t* __restrict__ w,
                 int64_t w_stride, int64_t count, acc_t* __restrict__ acc, int64_t acc_stride) {
  using VecT = Vec<acc_t, Isa::kVectorBytes>;
  using V = typename VecT::type;
  constexpr int W = VecT::kWidth, CT = VecT::kTile;
  V sum[KB][kTileVecs];
  for (int k = 0; k < KB; ++k)
    for (int v = 0; v < kTileVecs; ++v)
      std::memcpy(&sum[k][v], acc + k * acc_stride + v * W, sizeof(V));
  for (int64_t n = 0; n < count; ++n) {
    V xv[kTileVecs];
    for (int v = 0; v < kTileVecs; ++v) std::memcpy(&xv[v], panel + n * CT + v * W, sizeof(V));
    for (int k = 0; k < KB; ++k) {
      const acc_t wk = w[k * w_stride + n];
      for (int v = 0; v < kTileVecs; ++v) sum[k][v] += wk * xv[v];
    }
  }
  for (int k = 0; k < KB; ++k)
    for (int v = 0; v < kTileVecs; ++v)
      std::memcpy(acc + k * acc_stride + v * W, &sum[k][v], sizeof(V));
}

// tile_kernel<rows> for a runtime number of rows in [1, KB].
template <typename Isa, int KB, typename acc_t>
void tile_rows(int rows, const acc_t* panel, const acc_t* w, int64_t w_stride, int64_t count,
               acc_t* acc, int64_t acc_stride) {
  if constexpr (KB > 1) {
    if (rows < KB) {
      tile_rows<Isa, KB - 1>(rows, panel, w, w_stride, count, acc, acc_stride);
      return;
    }
  }
  tile_kernel<Isa, KB>(panel, w, w_stride, count, acc, acc_stride);
}

// Few rows: x is read row by row (contiguous channels, prefetcher friendly) and each row of
// x updates the KB accumulator rows, which stay in L1. Packing would cost more than it
// saves here. Tokens whose KB weights are all zero are skipped.
template <typename Isa, int KB, typename scalar_t, typename acc_t>
void stream_rows(const scalar_t* __restrict__ x, int64_t x_stride_n, int64_t tokens,
                 int64_t width, const acc_t* __restrict__ w, int64_t w_stride,
                 acc_t* __restrict__ acc, int64_t acc_stride) {
  using VecT = Vec<acc_t, Isa::kVectorBytes>;
  using V = typename VecT::type;
  constexpr int W = VecT::kWidth;
  const int64_t full = width / W * W;
  for (int64_t n = 0; n < tokens; ++n) {
    acc_t wk[KB];
    bool any = false;
    for (int k = 0; k < KB; ++k) {
      wk[k] = w[k * w_stride + n];
      any |= wk[k] != acc_t(0);
    }
    if (!any) continue;
    const scalar_t* row = x + n * x_stride_n;
    for (int64_t c = 0; c < full; c += W) {
      const V xv = load_vec<Isa::kVectorBytes>(row + c);
      for (int k = 0; k < KB; ++k) {
        V a;
        std::memcpy(&a, acc + k * acc_stride + c, sizeof(V));
        a += wk[k] * xv;
        std::memcpy(acc + k * acc_stride + c, &a, sizeof(V));
      }
    }
    for (int64_t c = full; c < width; ++c) {
      const acc_t xc = load_acc(row + c);
      for (int k = 0; k < KB; ++k) acc[k * acc_stride + c] += wk[k] * xc;
    }
  }
}

// stream_rows<rows> for a runtime number of rows in [1, KB].
template <typename Isa, int KB, typename scalar_t, typename acc_t>
void stream_block(int rows, const scalar_t* x, int64_t x_stride_n, int64_t tokens,
                  int64_t width, const acc_t* w, int64_t w_stride, acc_t* acc,
                  int64_t acc_stride) {
  if constexpr (KB > 1) {
    if (rows < KB) {
      stream_block<Isa, KB - 1>(rows, x, x_stride_n, tokens, width, w, w_stride, acc, acc_stride);
      return;
    }
  }
  stream_rows<Isa, KB>(x, x_stride_n, tokens, width, w, w_stride, acc, acc_stride);
}

// The split of a float16/bfloat16/float64 problem into tasks (b, chunk of channels), and
// the per-thread buffers, the same for every instruction set.
template <typename scalar_t>
struct AggregateProblem {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;     // [B, N, C], channel stride 1
  const acc_t* logits;   // [B, K, N] contiguous
  const acc_t* bias;     // [B, N] contiguous
  scalar_t* out;         // [B, K, C] contiguous
  int64_t tokens, channels, rows, x_stride_b, x_stride_n;
  bool streaming;        // K <= kStreamRows
  int64_t chunk_cols;    // channels per task (a multiple of kChannelUnit)
  int64_t chunks_per_row;
  int64_t group_rows;    // rows of K whose weights a thread holds at once
  // Per-thread buffer: weights [group_rows, N], then the panel [min(kTokenChunk, N),
  // chunk_cols] with its tile padding (packed path only; tiles of at least 4 channels),
  // then the accumulators [group_rows, chunk_cols].
  int64_t panel_offset() const { return group_rows * tokens; }
  int64_t acc_offset() const {
    const int64_t panel = std::min(kTokenChunk, tokens) * chunk_cols + (chunk_cols / 4 + 1) * kTilePad<acc_t>;
    return panel_offset() + (streaming ? 0 : panel);
  }
  int64_t scratch_size() const { return acc_offset() + group_rows * chunk_cols; }
};

// Tasks [begin, end) of `p`, with one thread's buffer.
template <typename Isa, typename scalar_t>
void aggregate_tasks(const AggregateProblem<scalar_t>& p, int64_t begin, int64_t end,
                     typename AggregateProblem<scalar_t>::acc_t* scratch) {
  using acc_t = typename AggregateProblem<scalar_t>::acc_t;
  constexpr int CT = Vec<acc_t, Isa::kVectorBytes>::kTile;
  constexpr int KB = kRowBlock<Isa>;
  acc_t* weights = scratch;
  acc_t* panel = scratch + p.panel_offset();
  acc_t* acc = scratch + p.acc_offset();
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / p.chunks_per_row, chunk = task % p.chunks_per_row;
    const int64_t c_begin = chunk * p.chunk_cols;
    const int64_t c_end = std::min(p.channels, c_begin + p.chunk_cols);
    const int64_t tiles = (c_end - c_begin + CT - 1) / CT;
    const scalar_t* xb = p.x + b * p.x_stride_b;
    for (int64_t g0 = 0; g0 < p.rows; g0 += p.group_rows) {
      const int64_t g1 = std::min(p.rows, g0 + p.group_rows);
      for (int64_t k = g0; k < g1; ++k) {
        softmax_row(p.logits + (b * p.rows + k) * p.tokens, p.bias + b * p.tokens, p.tokens,
                    weights + (k - g0) * p.tokens);
      }
      // acc[k][c]: row k - g0 of the group, channel c_begin + c.
      std::fill(acc, acc + p.group_rows * p.chunk_cols, acc_t(0));
      if (p.streaming) {
        stream_block<Isa, kStreamRows>(static_cast<int>(g1 - g0), xb + c_begin, p.x_stride_n,
                                       p.tokens, c_end - c_begin, weights, p.tokens, acc,
                                       p.chunk_cols);
      }
      for (int64_t n0 = 0; !p.streaming && n0 < p.tokens; n0 += kTokenChunk) {
        const int64_t count = std::min(kTokenChunk, p.tokens - n0);
        pack_panel<Isa>(xb, p.x_stride_n, n0, count, c_begin, c_end, panel);
        for (int64_t t = 0; t < tiles; ++t) {
          for (int64_t k0 = g0; k0 < g1; k0 += KB) {
            const int block = static_cast<int>(std::min<int64_t>(KB, g1 - k0));
            tile_rows<Isa, KB>(block, panel + t * tile_stride<acc_t, CT>(count), weights + (k0 - g0) * p.tokens + n0,
                               p.tokens, count, acc + (k0 - g0) * p.chunk_cols + t * CT,
                               p.chunk_cols);
          }
        }
      }
      for (int64_t k = g0; k < g1; ++k) {
        const acc_t* src = acc + (k - g0) * p.chunk_cols;
        scalar_t* dst = p.out + (b * p.rows + k) * p.channels + c_begin;
        const int64_t width = c_end - c_begin;
#pragma omp simd
        for (int64_t c = 0; c < width; ++c) store_acc(dst + c, src[c]);
      }
    }
  }
}

// Softmax rows [k0, k1) of batch row b into w [K, N] (the float32 path's weights).
template <typename Isa>
void softmax_rows(const float* logits, const float* bias, int64_t tokens, int64_t k0, int64_t k1,
                  float* w) {
  for (int64_t k = k0; k < k1; ++k) softmax_row(logits + k * tokens, bias, tokens, w + k * tokens);
}

// The entries of each instruction set (cpu_capability.h).
template <typename scalar_t>
using AggregateTasksFn = void (*)(const AggregateProblem<scalar_t>&, int64_t, int64_t,
                                  at::opmath_type<scalar_t>*);
template <typename scalar_t>
ETC_EXT_TARGET_BASELINE void aggregate_tasks_baseline(const AggregateProblem<scalar_t>& p, int64_t begin,
                                                      int64_t end, at::opmath_type<scalar_t>* scratch) {
  aggregate_tasks<IsaBaseline>(p, begin, end, scratch);
}
template <typename scalar_t>
ETC_EXT_TARGET_AVX2 void aggregate_tasks_avx2(const AggregateProblem<scalar_t>& p, int64_t begin, int64_t end,
                                              at::opmath_type<scalar_t>* scratch) {
  aggregate_tasks<IsaAvx2>(p, begin, end, scratch);
}
template <typename scalar_t>
ETC_EXT_TARGET_AVX512 void aggregate_tasks_avx512(const AggregateProblem<scalar_t>& p, int64_t begin,
                                                  int64_t end, at::opmath_type<scalar_t>* scratch) {
  aggregate_tasks<IsaAvx512>(p, begin, end, scratch);
}

using SoftmaxRowsFn = void (*)(const float*, const float*, int64_t, int64_t, int64_t, float*);
ETC_EXT_TARGET_BASELINE void softmax_rows_baseline(const float* logits, const float* bias, int64_t tokens,
                                                   int64_t k0, int64_t k1, float* w) {
  softmax_rows<IsaBaseline>(logits, bias, tokens, k0, k1, w);
}
ETC_EXT_TARGET_AVX2 void softmax_rows_avx2(const float* logits, const float* bias, int64_t tokens, int64_t k0,
                                           int64_t k1, float* w) {
  softmax_rows<IsaAvx2>(logits, bias, tokens, k0, k1, w);
}
ETC_EXT_TARGET_AVX512 void softmax_rows_avx512(const float* logits, const float* bias, int64_t tokens,
                                               int64_t k0, int64_t k1, float* w) {
  softmax_rows<IsaAvx512>(logits, bias, tokens, k0, k1, w);
}
const CpuKernels<SoftmaxRowsFn> kSoftmaxRows{softmax_rows_baseline, softmax_rows_avx2, softmax_rows_avx512};

// float32 x needs no conversion, so the weighted sum of each batch row is a plain GEMM:
// ATen's BLAS (MKL here, ~95% of peak) beats a compiler-vectorized tile (~75%) for large K
// and matches the streaming loop for small K, where both run at memory bandwidth. Only one
// [K, N] weight buffer exists at a time.
void aggregate_float32(const at::Tensor& x, const at::Tensor& logits, const at::Tensor& bias,
                       at::Tensor& out) {
  const int64_t batch = x.size(0), tokens = x.size(1), rows = logits.size(1);
  const SoftmaxRowsFn softmax = kSoftmaxRows.pick();
  at::Tensor w = at::empty({rows, tokens}, x.options());
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t grain = std::max<int64_t>(1, 4096 / tokens);
    at::parallel_for(0, rows, grain, [&](int64_t k0, int64_t k1) {
      softmax(logits.data_ptr<float>() + b * rows * tokens, bias.data_ptr<float>() + b * tokens, tokens, k0,
              k1, w.data_ptr<float>());
    });
    at::Tensor out_b = out.select(0, b);
    at::mm_out(out_b, w, x.select(0, b));
  }
}

template <typename scalar_t>
void aggregate_converted(const at::Tensor& x,       // [B, N, C], stride(2) == 1
                         const at::Tensor& logits,  // acc_t [B, K, N] contiguous
                         const at::Tensor& bias,    // acc_t [B, N] contiguous
                         at::Tensor& out) {         // [B, K, C] contiguous
  using acc_t = at::opmath_type<scalar_t>;
  AggregateProblem<scalar_t> p{x.data_ptr<scalar_t>(), logits.data_ptr<acc_t>(), bias.data_ptr<acc_t>(),
                               out.data_ptr<scalar_t>(), x.size(1), x.size(2), logits.size(1), x.stride(0),
                               x.stride(1)};
  const int64_t batch = x.size(0);
  // Tasks: (b, chunk of channel units), enough of them to balance the threads. Each task
  // recomputes the softmax of its rows: K*N exps against K*N*chunk multiply-adds. The
  // packed path caps the chunk so its panel stays in L2; the streaming path prefers long
  // contiguous pieces of the rows of x (whole rows when the batch feeds every thread).
  p.streaming = p.rows <= kStreamRows;
  const int64_t units_per_row = (p.channels + kChannelUnit - 1) / kChannelUnit;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t want_tasks = p.streaming ? threads : 4 * threads;
  // Streaming accumulators: rows x chunk values, kept within kStreamAccBytes (L1).
  const int64_t stream_max_units =
      std::max<int64_t>(1, kStreamAccBytes / (p.rows * int64_t(sizeof(acc_t)) * kChannelUnit));
  const int64_t units_per_task =
      std::clamp<int64_t>((batch * units_per_row + want_tasks - 1) / want_tasks, 1,
                          std::min(p.streaming ? stream_max_units : kMaxUnitsPerTask, units_per_row));
  p.chunk_cols = units_per_task * kChannelUnit;
  p.chunks_per_row = (units_per_row + units_per_task - 1) / units_per_task;
  p.group_rows = std::min<int64_t>(
      p.rows, std::max<int64_t>(kGroupRows, kWeightBufferFloats / p.tokens / kGroupRows * kGroupRows));

  const CpuKernels<AggregateTasksFn<scalar_t>> kernels{
      aggregate_tasks_baseline<scalar_t>, aggregate_tasks_avx2<scalar_t>, aggregate_tasks_avx512<scalar_t>};
  const AggregateTasksFn<scalar_t> run = kernels.pick();
  at::Tensor scratch = at::empty({threads, p.scratch_size()}, logits.options());
  acc_t* scratch_ptr = scratch.data_ptr<acc_t>();
  at::parallel_for(0, batch * p.chunks_per_row, 1, [&](int64_t begin, int64_t end) {
    run(p, begin, end, scratch_ptr + at::get_thread_num() * p.scratch_size());
  });
}

}  // namespace

// Arguments checked and prepared by csrc/torch_bindings.cpp: logits [B, K, N] and bias [B, N]
// (log importance, -inf at invalid tokens) contiguous in the accumulation type; out [B, K, C].
void weighted_aggregate_cpu(const at::Tensor& x,       // [B, N, C]
                            const at::Tensor& logits,  // [B, K, N]
                            const at::Tensor& bias,    // [B, N]
                            at::Tensor& out) {         // [B, K, C]
  TORCH_INTERNAL_ASSERT(x.device().is_cpu());
  // The kernel reads x in its own dtype; only the channel stride must be 1.
  const at::Tensor x_rows = x.stride(2) == 1 ? x : x.contiguous();

  if (x.scalar_type() == at::kFloat) {
    aggregate_float32(x_rows, logits, bias, out);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "weighted_aggregate_cpu", [&] {
    if constexpr (!std::is_same_v<scalar_t, float>) aggregate_converted<scalar_t>(x_rows, logits, bias, out);
  });
}


}  // namespace etc_ext
