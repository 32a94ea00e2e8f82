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
//     register-blocked multiply-add over it, 8 rows x 32 channels of accumulators. The
//     panel stays in L2 while every row block reads it, so x is read from memory once.
// float32 x needs no conversion and the sum is a plain GEMM per batch row: the softmax rows
// go to one [K, N] buffer and the product to ATen's BLAS (see weighted_aggregate_kernel).
#include "../checks.h"
#include "../ops.h"
#include "float_convert.h"
#include "vec_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

// 64-byte vector types in internal functions: the ABI note GCC prints for targets without
// AVX-512 (the portable build) does not concern us.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace etc_ext {
namespace {

// Register tile: KB rows of K x kTileVecs vectors of 64 bytes (32 floats / 16 doubles) of
// channels, 16 zmm accumulators with AVX-512. The tile uses GCC/Clang vector types: with
// plain arrays under `omp simd` GCC keeps the accumulators on the stack (a load and a store
// per multiply-add, 15 GFLOP/s instead of ~100 per core here).
constexpr int kRowBlock = 8;
constexpr int kTileVecs = 2;
// Tokens per packed panel of x: panel = kTokenChunk x (task channels) accumulation-type
// values, at most 512 KiB with float32, which stays in L2 while all rows use it.
constexpr int64_t kTokenChunk = 256;
// Channel tiles per task, at most.
constexpr int64_t kMaxTilesPerTask = 16;
// Softmax weights a thread keeps at once (256 KiB of float32): a group of rows x N.
constexpr int64_t kWeightBufferFloats = int64_t{1} << 16;

template <typename acc_t>
struct Vec {
  typedef acc_t type __attribute__((vector_size(64)));
  static constexpr int kWidth = 64 / sizeof(acc_t);
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

// One vector of x[c:c+W] converted to the accumulation type. Fixed-size copies and
// __builtin_convertvector: a plain copy loop would become a memmove call per tile row.
inline Vec<float>::type load_vec(const float* p) {
  Vec<float>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline Vec<double>::type load_vec(const double* p) {
  Vec<double>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline Vec<float>::type load_vec(const c10::BFloat16* p) {
  typedef uint16_t half_bits __attribute__((vector_size(32)));
  typedef uint32_t float_bits __attribute__((vector_size(64)));
  half_bits h;
  std::memcpy(&h, p, sizeof(h));
  const float_bits wide = __builtin_convertvector(h, float_bits) << 16;
  Vec<float>::type v;
  std::memcpy(&v, &wide, sizeof(v));
  return v;
}
// fp16 -> fp32 with integer operations (exact, subnormals, inf and NaN included): GCC 12
// does not vectorize _Float16 conversions, this vectorizes on any target.
inline Vec<float>::type load_vec(const c10::Half* p) {
  typedef uint16_t half_bits __attribute__((vector_size(32)));
  typedef uint32_t float_bits __attribute__((vector_size(64)));
  typedef int32_t float_mask __attribute__((vector_size(64)));
  half_bits h;
  std::memcpy(&h, p, sizeof(h));
  const float_bits wide = __builtin_convertvector(h, float_bits);
  constexpr uint32_t kExpMask = 0x7c00u << 13;  // fp16 exponent bits, shifted into place
  float_bits bits = (wide & 0x7fffu) << 13;     // exponent and mantissa
  const float_bits exponent = bits & kExpMask;
  bits += (127u - 15u) << 23;                   // rebias the exponent
  const float_mask is_special = exponent == kExpMask;  // inf, NaN: exponent all ones
  bits = is_special ? bits + ((128u - 16u) << 23) : bits;
  Vec<float>::type normal, subnormal;
  std::memcpy(&normal, &bits, sizeof(bits));
  // Zero and subnormals: one more exponent step, then subtract the implicit leading one.
  const float_bits sub_bits = bits + (1u << 23);
  std::memcpy(&subnormal, &sub_bits, sizeof(sub_bits));
  subnormal -= 6.103515625e-05f;  // 2^-14, the float with bits 113 << 23
  const float_mask is_small = exponent == 0u;
  Vec<float>::type value = is_small ? subnormal : normal;
  float_bits out;
  std::memcpy(&out, &value, sizeof(out));
  out |= (wide & 0x8000u) << 16;  // sign
  std::memcpy(&value, &out, sizeof(out));
  return value;
}

// Copies x[n0:n0+count, c_begin:c_end] (converted) into the panel, tile-major:
// panel[t][n][c] = x[n0 + n, c_begin + t * CT + c], zero past c_end.
template <typename scalar_t, typename acc_t>
void pack_panel(const scalar_t* __restrict__ x, int64_t x_stride_n, int64_t n0, int64_t count,
                int64_t c_begin, int64_t c_end, acc_t* __restrict__ panel) {
  using V = typename Vec<acc_t>::type;
  constexpr int W = Vec<acc_t>::kWidth, CT = Vec<acc_t>::kTile;
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
      acc_t* dst = panel + (t * count + n) * CT;
      const scalar_t* src = row + c0;
      if (c0 + CT <= c_end) {
        for (int v = 0; v < kTileVecs; ++v) {
          const V xv = load_vec(src + v * W);
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
template <int KB, typename acc_t>
void tile_kernel(const acc_t* __restrict__ panel, const acc_t* __restrict__ w,
                 int64_t w_stride, int64_t count, acc_t* __restrict__ acc, int64_t acc_stride) {
  using V = typename Vec<acc_t>::type;
  constexpr int W = Vec<acc_t>::kWidth, CT = Vec<acc_t>::kTile;
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
template <int KB, typename acc_t>
void tile_rows(int rows, const acc_t* panel, const acc_t* w, int64_t w_stride, int64_t count,
               acc_t* acc, int64_t acc_stride) {
  if constexpr (KB > 1) {
    if (rows < KB) {
      tile_rows<KB - 1>(rows, panel, w, w_stride, count, acc, acc_stride);
      return;
    }
  }
  tile_kernel<KB>(panel, w, w_stride, count, acc, acc_stride);
}

// Few rows (K <= kStreamRows): x is read row by row (contiguous channels, prefetcher
// friendly) and each row of x updates the KB accumulator rows, which stay in L1. Packing
// would cost more than it saves here. Tokens whose KB weights are all zero are skipped.
constexpr int kStreamRows = 4;
constexpr int64_t kStreamAccBytes = 16384;

template <int KB, typename scalar_t, typename acc_t>
void stream_rows(const scalar_t* __restrict__ x, int64_t x_stride_n, int64_t tokens,
                 int64_t width, const acc_t* __restrict__ w, int64_t w_stride,
                 acc_t* __restrict__ acc, int64_t acc_stride) {
  using V = typename Vec<acc_t>::type;
  constexpr int W = Vec<acc_t>::kWidth;
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
      const V xv = load_vec(row + c);
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
template <int KB, typename scalar_t, typename acc_t>
void stream_block(int rows, const scalar_t* x, int64_t x_stride_n, int64_t tokens,
                  int64_t width, const acc_t* w, int64_t w_stride, acc_t* acc,
                  int64_t acc_stride) {
  if constexpr (KB > 1) {
    if (rows < KB) {
      stream_block<KB - 1>(rows, x, x_stride_n, tokens, width, w, w_stride, acc, acc_stride);
      return;
    }
  }
  stream_rows<KB>(x, x_stride_n, tokens, width, w, w_stride, acc, acc_stride);
}

template <typename scalar_t>
void weighted_aggregate_kernel(const at::Tensor& x,       // [B, N, C], stride(2) == 1
                               const at::Tensor& logits,  // acc_t [B, K, N] contiguous
                               const at::Tensor& bias,    // acc_t [B, N] contiguous
                               at::Tensor& out) {         // [B, K, C] contiguous
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int CT = Vec<acc_t>::kTile;
  const int64_t batch = x.size(0), tokens = x.size(1), channels = x.size(2);
  const int64_t rows = logits.size(1);
  const int64_t x_stride_b = x.stride(0), x_stride_n = x.stride(1);
  const scalar_t* x_ptr = x.data_ptr<scalar_t>();
  const acc_t* logits_ptr = logits.data_ptr<acc_t>();
  const acc_t* bias_ptr = bias.data_ptr<acc_t>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();

  if constexpr (std::is_same_v<scalar_t, float>) {
    // float32 x needs no conversion, so the weighted sum of each batch row is a plain GEMM:
    // ATen's BLAS (MKL here, ~95% of peak) beats our compiler-vectorized tile (~75%) for
    // large K and matches our streaming loop for small K, where both run at memory
    // bandwidth. Only one [K, N] weight buffer exists at a time.
    at::Tensor w = at::empty({rows, tokens}, x.options());
    float* w_ptr = w.data_ptr<float>();
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t grain = std::max<int64_t>(1, 4096 / tokens);
      at::parallel_for(0, rows, grain, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
          softmax_row(logits_ptr + (b * rows + k) * tokens, bias_ptr + b * tokens, tokens,
                      w_ptr + k * tokens);
        }
      });
      at::Tensor out_b = out.select(0, b);
      at::mm_out(out_b, w, x.select(0, b));
    }
    return;
  }

  // Tasks: (b, chunk of channel tiles), enough of them to balance the threads. Each task
  // recomputes the softmax of its rows: K*N exps against K*N*chunk multiply-adds. The
  // packed path caps the chunk so its panel stays in L2; the streaming path prefers long
  // contiguous pieces of the rows of x (whole rows when the batch feeds every thread).
  const bool streaming = rows <= kStreamRows;
  const int64_t tiles_per_row = (channels + CT - 1) / CT;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t want_tasks = streaming ? threads : 4 * threads;
  // Streaming accumulators: rows x chunk values, kept within kStreamAccBytes (L1).
  const int64_t stream_max_tiles =
      std::max<int64_t>(1, kStreamAccBytes / (rows * int64_t(sizeof(acc_t)) * CT));
  const int64_t tiles_per_task = std::clamp<int64_t>(
      (batch * tiles_per_row + want_tasks - 1) / want_tasks, 1,
      std::min(streaming ? stream_max_tiles : kMaxTilesPerTask, tiles_per_row));
  const int64_t chunks_per_row = (tiles_per_row + tiles_per_task - 1) / tiles_per_task;
  // Rows whose weights a thread holds at once (a multiple of the register block).
  const int64_t group_rows = std::min<int64_t>(
      rows, std::max<int64_t>(kRowBlock, kWeightBufferFloats / tokens / kRowBlock * kRowBlock));
  const int64_t chunk_cols = tiles_per_task * CT;

  at::parallel_for(0, batch * chunks_per_row, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> weights(static_cast<size_t>(group_rows * tokens));
    std::vector<acc_t> panel(
        streaming ? 0 : static_cast<size_t>(std::min(kTokenChunk, tokens) * chunk_cols));
    std::vector<acc_t> acc(static_cast<size_t>(group_rows * chunk_cols));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks_per_row, chunk = task % chunks_per_row;
      const int64_t c_begin = chunk * chunk_cols;
      const int64_t c_end = std::min(channels, c_begin + chunk_cols);
      const int64_t tiles = (c_end - c_begin + CT - 1) / CT;
      const scalar_t* xb = x_ptr + b * x_stride_b;
      for (int64_t g0 = 0; g0 < rows; g0 += group_rows) {
        const int64_t g1 = std::min(rows, g0 + group_rows);
        for (int64_t k = g0; k < g1; ++k) {
          softmax_row(logits_ptr + (b * rows + k) * tokens, bias_ptr + b * tokens, tokens,
                      weights.data() + (k - g0) * tokens);
        }
        // acc[k][c]: row k - g0 of the group, channel c_begin + c.
        std::fill(acc.begin(), acc.end(), acc_t(0));
        if (streaming) {
          stream_block<kStreamRows>(static_cast<int>(g1 - g0), xb + c_begin, x_stride_n,
                                    tokens, c_end - c_begin, weights.data(), tokens, acc.data(),
                                    chunk_cols);
        }
        for (int64_t n0 = 0; !streaming && n0 < tokens; n0 += kTokenChunk) {
          const int64_t count = std::min(kTokenChunk, tokens - n0);
          pack_panel(xb, x_stride_n, n0, count, c_begin, c_end, panel.data());
          for (int64_t t = 0; t < tiles; ++t) {
            for (int64_t k0 = g0; k0 < g1; k0 += kRowBlock) {
              const int block = static_cast<int>(std::min<int64_t>(kRowBlock, g1 - k0));
              tile_rows<kRowBlock>(block, panel.data() + t * count * CT,
                                   weights.data() + (k0 - g0) * tokens + n0, tokens, count,
                                   acc.data() + (k0 - g0) * chunk_cols + t * CT, chunk_cols);
            }
          }
        }
        for (int64_t k = g0; k < g1; ++k) {
          const acc_t* src = acc.data() + (k - g0) * chunk_cols;
          scalar_t* dst = out_ptr + (b * rows + k) * channels + c_begin;
          const int64_t width = c_end - c_begin;
#pragma omp simd
          for (int64_t c = 0; c < width; ++c) store_acc(dst + c, src[c]);
        }
      }
    }
  });
}

}  // namespace

at::Tensor weighted_aggregate_cpu(const at::Tensor& x,       // [B, N, C]
                                  const at::Tensor& logits,  // [B, K, N]
                                  const std::optional<at::Tensor>& importance,  // [B, N]
                                  const std::optional<at::Tensor>& mask) {      // bool [B, N]
  check_weighted_aggregate_args(x, logits, importance, mask);
  TORCH_INTERNAL_ASSERT(x.device().is_cpu());
  const int64_t batch = x.size(0), tokens = x.size(1), channels = x.size(2);
  const int64_t rows = logits.size(1);
  at::Tensor out = at::empty({batch, rows, channels}, x.options());
  if (out.numel() == 0) return out;
  if (tokens == 0) return out.zero_();

  // Accumulation type: float32, or float64 for float64 x.
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_opts = x.options().dtype(acc_dtype);
  // bias[b, n] = log(importance) for valid tokens, -inf otherwise: [B, N], small next to x.
  at::Tensor bias = at::zeros({batch, tokens}, acc_opts);
  if (importance.has_value()) {
    const at::Tensor imp = importance->to(acc_dtype);
    const double tiny = acc_dtype == at::kDouble ? std::numeric_limits<double>::min()
                                                 : std::numeric_limits<float>::min();
    bias = at::where(imp > 0, imp.clamp_min(tiny).log(),
                     -std::numeric_limits<double>::infinity());
  }
  if (mask.has_value()) {
    bias = bias.masked_fill(mask->logical_not(), -std::numeric_limits<double>::infinity());
  }
  bias = bias.contiguous();
  const at::Tensor logits_acc = logits.to(acc_dtype).contiguous();
  // The kernel reads x in its own dtype; only the channel stride must be 1.
  const at::Tensor x_rows = x.stride(2) == 1 ? x : x.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "weighted_aggregate_cpu", [&] {
    weighted_aggregate_kernel<scalar_t>(x_rows, logits_acc, bias, out);
  });
  return out;
}

}  // namespace etc_ext
