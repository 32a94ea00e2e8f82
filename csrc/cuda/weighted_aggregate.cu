// CUDA kernels of weighted_aggregate: out[b, k, :] = sum_n w[b, k, n] * x[b, n, :] with
// w = softmax over valid n of logits + log(importance), fp32 accumulation (fp64 for fp64).
//   1. row_stats: one warp per row (b, k): the max over valid n of z = logits + bias and
//      1 / sum exp(z - max), two numbers per row,
//   2. aggregate: per block, KB rows x CT channels of one batch row; tiles of tokens of
//      the weights (recomputed from z and the row stats) and of x go through shared memory,
//      each thread accumulates 4 rows of one channel.
// The [B, K, N] weights are never written. x may have any strides and any of the float
// dtypes; logits are read as contiguous accumulation-type values (a conversion of the
// small logits tensor at most).

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <ATen/ATen.h>

#include <cmath>
#include <limits>

namespace etc_ext {
namespace {

constexpr int kWarpSize = 32;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kRowsPerThread = 4;
constexpr int kTileElems = 2048;  // x tile: NT tokens x CT channels

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return static_cast<acc_t>(-INFINITY);
}

__device__ __forceinline__ float exp_acc(float x) { return __expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    v = max(v, __shfl_xor_sync(0xffffffff, v, offset));
  return v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    v += __shfl_xor_sync(0xffffffff, v, offset);
  return v;
}

// grid: ceil(B * K / kWarps); warp w of block i owns row i * kWarps + w of [B * K].
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    row_stats_kernel(const acc_t* __restrict__ logits,  // [B, K, N]
                     const acc_t* __restrict__ bias,    // [B, N], -inf = invalid token
                     int64_t rows_total, int64_t rows, int64_t tokens,
                     acc_t* __restrict__ row_max, acc_t* __restrict__ row_inv) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t row = int64_t(blockIdx.x) * kWarps + warp;
  if (row >= rows_total) return;  // whole warps leave together
  const int64_t b = row / rows;
  const acc_t* z_row = logits + row * tokens;
  const acc_t* bias_row = bias + b * tokens;
  acc_t m = neg_inf<acc_t>();
  for (int64_t n = lane; n < tokens; n += kWarpSize) m = max(m, z_row[n] + bias_row[n]);
  m = warp_max(m);
  acc_t l = 0;
  if (m != neg_inf<acc_t>()) {
    for (int64_t n = lane; n < tokens; n += kWarpSize) {
      const acc_t z = z_row[n] + bias_row[n];
      if (z != neg_inf<acc_t>()) l += exp_acc(z - m);
    }
  }
  l = warp_sum(l);
  if (lane == 0) {
    row_max[row] = m;
    row_inv[row] = l > acc_t(0) ? acc_t(1) / l : acc_t(0);  // all-invalid row: weights 0
  }
}

struct AggregateArgs {
  int64_t batch, tokens, channels, rows;
  int64_t x_stride_b, x_stride_n, x_stride_c;
};

// grid: (ceil(C / CT), ceil(K / KB), B). Thread t owns channel t % CT and the rows
// (t / CT) * 4 .. + 3 of the block's KB rows.
template <typename scalar_t, typename acc_t, int KB>
__global__ void __launch_bounds__(kThreads)
    aggregate_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ logits,
                     const acc_t* __restrict__ bias, const acc_t* __restrict__ row_max,
                     const acc_t* __restrict__ row_inv, AggregateArgs a,
                     scalar_t* __restrict__ out) {
  constexpr int kGroups = KB / kRowsPerThread;
  constexpr int CT = kThreads / kGroups;  // channels per block
  constexpr int NT = kTileElems / CT;     // tokens per tile
  __shared__ acc_t x_tile[NT][CT];
  __shared__ acc_t w_tile[KB][NT];

  const int64_t b = blockIdx.z;
  const int64_t k0 = int64_t(blockIdx.y) * KB;
  const int64_t c0 = int64_t(blockIdx.x) * CT;
  const int tid = threadIdx.x;
  const int c_local = tid % CT, group = tid / CT;
  const scalar_t* xb = x + b * a.x_stride_b;

  acc_t acc[kRowsPerThread];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) acc[i] = 0;

  for (int64_t n0 = 0; n0 < a.tokens; n0 += NT) {
    for (int idx = tid; idx < KB * NT; idx += kThreads) {
      const int r = idx / NT, j = idx % NT;
      const int64_t k = k0 + r, n = n0 + j;
      acc_t w = 0;
      if (k < a.rows && n < a.tokens) {
        const int64_t row = b * a.rows + k;
        const acc_t z = logits[row * a.tokens + n] + bias[b * a.tokens + n];
        if (z != neg_inf<acc_t>()) w = exp_acc(z - row_max[row]) * row_inv[row];
      }
      w_tile[r][j] = w;
    }
    for (int idx = tid; idx < NT * CT; idx += kThreads) {
      const int j = idx / CT, cc = idx % CT;
      const int64_t n = n0 + j, c = c0 + cc;
      x_tile[j][cc] = (n < a.tokens && c < a.channels)
                          ? static_cast<acc_t>(xb[n * a.x_stride_n + c * a.x_stride_c])
                          : acc_t(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int j = 0; j < NT; ++j) {
      const acc_t xv = x_tile[j][c_local];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i)
        acc[i] += w_tile[group * kRowsPerThread + i][j] * xv;
    }
    __syncthreads();
  }
  const int64_t c = c0 + c_local;
  if (c >= a.channels) return;
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t k = k0 + group * kRowsPerThread + i;
    if (k < a.rows) out[(b * a.rows + k) * a.channels + c] = static_cast<scalar_t>(acc[i]);
  }
}

template <typename scalar_t, int KB>
void launch_aggregate(const at::Tensor& x, const at::Tensor& logits, const at::Tensor& bias,
                      const at::Tensor& row_max, const at::Tensor& row_inv, at::Tensor& out,
                      cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int CT = kThreads / (KB / kRowsPerThread);
  const AggregateArgs args{x.size(0), x.size(1), x.size(2), logits.size(1),
                           x.stride(0), x.stride(1), x.stride(2)};
  const dim3 grid((args.channels + CT - 1) / CT, (args.rows + KB - 1) / KB, args.batch);
  TORCH_CHECK(grid.y <= 65535 && grid.z <= 65535,
              "weighted_aggregate: too many rows or batch rows for one launch (K = ", args.rows,
              ", B = ", args.batch, ")");
  aggregate_kernel<scalar_t, acc_t, KB><<<grid, kThreads, 0, stream>>>(
      x.data_ptr<scalar_t>(), logits.data_ptr<acc_t>(), bias.data_ptr<acc_t>(),
      row_max.data_ptr<acc_t>(), row_inv.data_ptr<acc_t>(), args, out.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// Arguments checked and prepared by csrc/torch_bindings.cpp: logits [B, K, N] and bias [B, N]
// (log importance, -inf at invalid tokens) contiguous in the accumulation type; out [B, K, C].
void weighted_aggregate_cuda(const at::Tensor& x,       // [B, N, C]
                             const at::Tensor& logits,  // [B, K, N]
                             const at::Tensor& bias,    // [B, N]
                             at::Tensor& out) {         // [B, K, C]
  TORCH_INTERNAL_ASSERT(x.is_cuda());
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t batch = x.size(0), tokens = x.size(1);
  const int64_t rows = logits.size(1);
  const auto acc_opts = logits.options();
  at::Tensor row_max = at::empty({batch, rows}, acc_opts);
  at::Tensor row_inv = at::empty({batch, rows}, acc_opts);

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "weighted_aggregate_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t rows_total = batch * rows;
    const int64_t stat_blocks = (rows_total + kWarps - 1) / kWarps;
    row_stats_kernel<acc_t><<<stat_blocks, kThreads, 0, stream>>>(
        logits.data_ptr<acc_t>(), bias.data_ptr<acc_t>(), rows_total, rows, tokens,
        row_max.data_ptr<acc_t>(), row_inv.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // Few rows: 4 rows x 256 channels per block; else 16 rows x 64 channels.
    if (rows <= kRowsPerThread) {
      launch_aggregate<scalar_t, 4>(x, logits, bias, row_max, row_inv, out, stream);
    } else {
      launch_aggregate<scalar_t, 16>(x, logits, bias, row_max, row_inv, out, stream);
    }
  });
}


}  // namespace etc_ext
