// CUDA kernels of cross_attn_scores. Two passes over the keys, each recomputing q.k in fp32:
//   1. row_stats: per query row, the max and the sum of exp of its visible logits (online
//      softmax over tiles of 32 keys),
//   2. accumulate: per tile of 32 keys, sum over all query rows of exp(s - max) / sum,
//      reduced in the block and added into scores[b, n].
// Memory beyond the output: two floats per query row. The [B, H, T, N] probabilities are
// never written.
#include "../checks.h"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>

namespace etc_ext {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarps = 8;              // one query row per warp at a time
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kKeyTile = kWarpSize;    // one key per lane
constexpr int kMaxHeadDim = 256;

struct Strides4 {
  int64_t s0, s1, s2, s3;
};

struct ScoreArgs {
  int64_t batch, heads, kv_heads, queries, keys, dim;
  float scale;
  Strides4 q_stride, k_stride;
  const bool* key_valid;      // [B, N] contiguous
  const bool* query_valid;    // [B, T] contiguous
  const int64_t* limit;       // [B, T]: keys [0, limit) are causally visible
};

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, offset));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    v += __shfl_xor_sync(0xffffffff, v, offset);
  return v;
}

// Shared tiles: 32 keys (padded rows: lane i reads row i without bank conflicts) and one
// pre-scaled query row per warp.
struct SharedTiles {
  float keys[kKeyTile][kMaxHeadDim + 1];
  float query[kWarps][kMaxHeadDim];
};

template <typename scalar_t>
__device__ void load_key_tile(SharedTiles& tiles, const scalar_t* __restrict__ k,
                              const ScoreArgs& a, int64_t b, int64_t j, int64_t n0) {
  for (int idx = threadIdx.x; idx < kKeyTile * a.dim; idx += kThreads) {
    const int i = idx / a.dim, d = idx % a.dim;
    const int64_t n = n0 + i;
    tiles.keys[i][d] = n < a.keys ? static_cast<float>(k[b * a.k_stride.s0 + j * a.k_stride.s1 +
                                                       n * a.k_stride.s2 + d * a.k_stride.s3])
                                  : 0.0f;
  }
}

// Loads query row `row` of group (b, j) into this warp's slot; returns false past the end.
template <typename scalar_t>
__device__ bool load_query_row(SharedTiles& tiles, const scalar_t* __restrict__ q,
                               const ScoreArgs& a, int64_t b, int64_t j, int64_t row,
                               int warp, int lane, int64_t* h_out, int64_t* t_out) {
  const int64_t group = a.heads / a.kv_heads;
  if (row >= group * a.queries) return false;
  const int64_t h = j * group + row / a.queries, t = row % a.queries;
  for (int d = lane; d < a.dim; d += kWarpSize)
    tiles.query[warp][d] = a.scale * static_cast<float>(q[b * a.q_stride.s0 + h * a.q_stride.s1 +
                                                         t * a.q_stride.s2 + d * a.q_stride.s3]);
  __syncwarp();
  *h_out = h;
  *t_out = t;
  return true;
}

__device__ __forceinline__ float dot_row(const SharedTiles& tiles, int warp, int lane, int dim) {
  float s = 0.0f;
  for (int d = 0; d < dim; ++d) s += tiles.query[warp][d] * tiles.keys[lane][d];
  return s;
}

// grid: (B * Hkv, ceil(g * T / kWarps)); warp w of block (bj, y) owns row y * kWarps + w.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    row_stats_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                     ScoreArgs a, float* __restrict__ row_max, float* __restrict__ row_sum) {
  __shared__ SharedTiles tiles;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t b = blockIdx.x / a.kv_heads, j = blockIdx.x % a.kv_heads;
  int64_t h = 0, t = 0;
  const bool has_row = load_query_row(tiles, q, a, b, j, int64_t(blockIdx.y) * kWarps + warp,
                                      warp, lane, &h, &t);
  const bool active = has_row && a.query_valid[b * a.queries + t];
  const int64_t limit = has_row ? a.limit[b * a.queries + t] : 0;

  float m = -INFINITY, l = 0.0f;
  for (int64_t n0 = 0; n0 < a.keys; n0 += kKeyTile) {
    __syncthreads();  // previous tile fully read
    load_key_tile(tiles, k, a, b, j, n0);
    __syncthreads();
    if (!active) continue;
    const int64_t n = n0 + lane;
    const bool visible = n < limit && a.key_valid[b * a.keys + n];
    const float s = visible ? dot_row(tiles, warp, lane, a.dim) : -INFINITY;
    const float tile_max = warp_max(s);
    if (tile_max == -INFINITY) continue;
    const float new_m = fmaxf(m, tile_max);
    const float e = visible ? __expf(s - new_m) : 0.0f;
    l = l * __expf(m - new_m) + warp_sum(e);
    m = new_m;
  }
  if (active && lane == 0) {
    const int64_t idx = (b * a.heads + h) * a.queries + t;
    row_max[idx] = m;
    row_sum[idx] = l;
  }
}

// grid: (B * Hkv, ceil(N / kKeyTile)); lane i of every warp owns key n0 + i.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    accumulate_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                      ScoreArgs a, const float* __restrict__ row_max,
                      const float* __restrict__ row_sum, const float* __restrict__ row_weight,
                      float* __restrict__ scores) {
  __shared__ SharedTiles tiles;
  __shared__ float partial[kWarps][kKeyTile];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t b = blockIdx.x / a.kv_heads, j = blockIdx.x % a.kv_heads;
  const int64_t n = int64_t(blockIdx.y) * kKeyTile + lane;
  load_key_tile(tiles, k, a, b, j, int64_t(blockIdx.y) * kKeyTile);
  __syncthreads();

  const bool key_ok = n < a.keys && a.key_valid[b * a.keys + n];
  const int64_t rows = (a.heads / a.kv_heads) * a.queries;
  float acc = 0.0f;
  for (int64_t row = warp; row < rows; row += kWarps) {
    int64_t h = 0, t = 0;
    load_query_row(tiles, q, a, b, j, row, warp, lane, &h, &t);
    const int64_t idx = (b * a.heads + h) * a.queries + t;
    const float l = row_sum[idx];
    const bool visible = key_ok && a.query_valid[b * a.queries + t] && l > 0.0f &&
                         n < a.limit[b * a.queries + t];
    if (visible) acc += __expf(dot_row(tiles, warp, lane, a.dim) - row_max[idx]) / l;
    __syncwarp();  // the query slot is overwritten by the next row
  }
  partial[warp][lane] = acc;
  __syncthreads();
  if (warp == 0 && n < a.keys) {
    float total = 0.0f;
    for (int w = 0; w < kWarps; ++w) total += partial[w][lane];
    atomicAdd(&scores[b * a.keys + n], total * row_weight[b]);
  }
}

Strides4 strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

}  // namespace

at::Tensor cross_attn_scores_cuda(const at::Tensor& q,  // [B, H, T, D]
                                  const at::Tensor& k,  // [B, Hkv, N, D]
                                  std::optional<double> scale,
                                  const std::optional<at::Tensor>& q_mask,   // bool [B, T]
                                  const std::optional<at::Tensor>& kv_mask,  // bool [B, N]
                                  const std::optional<at::Tensor>& q_pos) {  // int64 [B, T]
  check_cross_attn_scores_args(q, k, scale, q_mask, kv_mask, q_pos);
  TORCH_INTERNAL_ASSERT(q.is_cuda());
  const c10::cuda::CUDAGuard device_guard(q.device());
  const int64_t batch = q.size(0), heads = q.size(1), queries = q.size(2), dim = q.size(3);
  const int64_t kv_heads = k.size(1), keys = k.size(2);

  const auto opts = q.options();
  at::Tensor key_valid = kv_mask.has_value() ? kv_mask->contiguous()
                                             : at::ones({batch, keys}, opts.dtype(at::kBool));
  at::Tensor query_valid = q_mask.has_value() ? q_mask->contiguous()
                                              : at::ones({batch, queries}, opts.dtype(at::kBool));
  at::Tensor limit = q_pos.has_value() ? (*q_pos + 1).clamp(0, keys).contiguous()
                                       : at::full({batch, queries}, keys, opts.dtype(at::kLong));
  at::Tensor count = query_valid.sum(1).to(at::kFloat) * static_cast<double>(heads);  // [B]
  at::Tensor row_weight = (1.0 / count.clamp_min(1.0)).contiguous();
  at::Tensor scores = at::zeros({batch, keys}, opts.dtype(at::kFloat));

  if (batch > 0 && heads > 0 && queries > 0 && keys > 0) {
    at::Tensor row_max = at::empty({batch, heads, queries}, opts.dtype(at::kFloat));
    at::Tensor row_sum = at::zeros({batch, heads, queries}, opts.dtype(at::kFloat));
    ScoreArgs args{batch, heads, kv_heads, queries, keys, dim,
                   static_cast<float>(scale.value_or(1.0 / std::sqrt(double(dim)))),
                   strides_of(q), strides_of(k), key_valid.data_ptr<bool>(),
                   query_valid.data_ptr<bool>(), limit.data_ptr<int64_t>()};
    const int64_t rows_per_group = (heads / kv_heads) * queries;
    const dim3 stats_grid(batch * kv_heads, (rows_per_group + kWarps - 1) / kWarps);
    const dim3 acc_grid(batch * kv_heads, (keys + kKeyTile - 1) / kKeyTile);
    TORCH_CHECK(stats_grid.y <= 65535 && acc_grid.y <= 65535,
                "cross_attn_scores: too many query rows or keys for one launch (H/Hkv*T = ",
                rows_per_group, ", N = ", keys, ")");
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(),
                                    "cross_attn_scores_cuda", [&] {
      row_stats_kernel<scalar_t><<<stats_grid, kThreads, 0, stream>>>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), args, row_max.data_ptr<float>(),
          row_sum.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      accumulate_kernel<scalar_t><<<acc_grid, kThreads, 0, stream>>>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), args, row_max.data_ptr<float>(),
          row_sum.data_ptr<float>(), row_weight.data_ptr<float>(), scores.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  // A row with no valid query gets the uniform distribution over its valid keys.
  at::Tensor key_valid_f = key_valid.to(at::kFloat);
  at::Tensor uniform = key_valid_f / key_valid_f.sum(1, /*keepdim=*/true).clamp_min(1.0);
  return at::where((count > 0).unsqueeze(1), scores, uniform);
}

TORCH_LIBRARY_IMPL(etc_ext, CUDA, m) {
  m.impl("cross_attn_scores", &cross_attn_scores_cuda);
}

}  // namespace etc_ext
