// CUDA kernels of cross_attn_scores. Two passes over the keys, each recomputing q.k with fp32
// accumulation:
//   1. row statistics: per query row, the max and the sum of exp of its visible logits (online
//      softmax over key tiles),
//   2. accumulation: per key tile, the sum over query rows of exp(s - max) / sum, added into
//      scores[b, n] with the row weight 1 / (H * valid queries).
// fp16/bf16 with D % 16 == 0 on sm_80+ take the tensor-core kernel (scores_mma_kernel: one block
// per (b, kv head, 64 query rows), both passes in the block, 64x64 logit tiles from WMMA in shared
// memory); every other case the FFMA kernels (row_stats_kernel + accumulate_kernel).
// Memory beyond the output: at most two floats per query row. The [B, H, T, N] probabilities
// are never written. Absent masks are null pointers, not tensors of ones (fewer launches).

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <limits>

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
  const bool* key_valid;      // [B, N] contiguous, or null: every key valid
  const bool* query_valid;    // [B, T] contiguous, or null: every query valid
  const int64_t* q_pos;       // [B, T] contiguous, or null: every key visible to every query
  const float* row_weight;    // [B]: 1 / (H * valid queries of row b), or null: uniform_weight
  float uniform_weight;       // 1 / (H * T)
};

__device__ __forceinline__ bool query_ok(const ScoreArgs& a, int64_t b, int64_t t) {
  return a.query_valid == nullptr || a.query_valid[b * a.queries + t];
}

__device__ __forceinline__ bool key_ok(const ScoreArgs& a, int64_t b, int64_t n) {
  return a.key_valid == nullptr || a.key_valid[b * a.keys + n];
}

// Keys [0, limit) are causally visible to query (b, t).
__device__ __forceinline__ int64_t key_limit(const ScoreArgs& a, int64_t b, int64_t t) {
  if (a.q_pos == nullptr) return a.keys;
  const int64_t p = a.q_pos[b * a.queries + t] + 1;
  return p < 0 ? 0 : (p > a.keys ? a.keys : p);
}

__device__ __forceinline__ float row_weight_of(const ScoreArgs& a, int64_t b) {
  return a.row_weight == nullptr ? a.uniform_weight : a.row_weight[b];
}

// max that returns a NaN operand (fmaxf drops it): a NaN logit must make its row NaN, as in the
// reference, not vanish from the softmax.
__device__ __forceinline__ float nan_max(float a, float b) {
  return (a != a || a > b) ? a : b;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    v = nan_max(v, __shfl_xor_sync(0xffffffff, v, offset));
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
  const bool active = has_row && query_ok(a, b, t);
  const int64_t limit = has_row ? key_limit(a, b, t) : 0;

  float m = -INFINITY, l = 0.0f;
  for (int64_t n0 = 0; n0 < a.keys; n0 += kKeyTile) {
    __syncthreads();  // previous tile fully read
    load_key_tile(tiles, k, a, b, j, n0);
    __syncthreads();
    if (!active) continue;
    const int64_t n = n0 + lane;
    const bool visible = n < limit && key_ok(a, b, n);
    const float s = visible ? dot_row(tiles, warp, lane, a.dim) : -INFINITY;
    const float tile_max = warp_max(s);
    if (tile_max == -INFINITY) continue;
    const float new_m = nan_max(tile_max, m);
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
                      const float* __restrict__ row_sum, float* __restrict__ scores) {
  __shared__ SharedTiles tiles;
  __shared__ float partial[kWarps][kKeyTile];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t b = blockIdx.x / a.kv_heads, j = blockIdx.x % a.kv_heads;
  const int64_t n = int64_t(blockIdx.y) * kKeyTile + lane;
  load_key_tile(tiles, k, a, b, j, int64_t(blockIdx.y) * kKeyTile);
  __syncthreads();

  const bool key_valid = n < a.keys && key_ok(a, b, n);
  const int64_t rows = (a.heads / a.kv_heads) * a.queries;
  float acc = 0.0f;
  for (int64_t row = warp; row < rows; row += kWarps) {
    int64_t h = 0, t = 0;
    load_query_row(tiles, q, a, b, j, row, warp, lane, &h, &t);
    const int64_t idx = (b * a.heads + h) * a.queries + t;
    const float l = row_sum[idx];
    const bool visible = key_valid && query_ok(a, b, t) && l != 0.0f && n < key_limit(a, b, t);
    if (visible) acc += __expf(dot_row(tiles, warp, lane, a.dim) - row_max[idx]) / l;
    __syncwarp();  // the query slot is overwritten by the next row
  }
  partial[warp][lane] = acc;
  __syncthreads();
  if (warp == 0 && n < a.keys) {
    float total = 0.0f;
    for (int w = 0; w < kWarps; ++w) total += partial[w][lane];
    atomicAdd(&scores[b * a.keys + n], total * row_weight_of(a, b));
  }
}

// ------------------------------------------------------------------ tensor-core kernel
constexpr int kMmaWarps = 4;
constexpr int kMmaThreads = kMmaWarps * kWarpSize;
constexpr int kRowTile = 16 * kMmaWarps;  // 16 query rows per warp
constexpr int kMmaKeyTile = 64;           // 4 WMMA tiles of 16 keys
constexpr int kTilePad = 8;               // 16 bytes per shared row: no bank conflicts, aligned
constexpr int kLogitStride = kMmaKeyTile + 4;

template <typename scalar_t>
struct MmaElement;
template <>
struct MmaElement<at::Half> {
  using type = __half;
};
template <>
struct MmaElement<at::BFloat16> {
  using type = __nv_bfloat16;
};

// Shared memory of scores_mma_kernel, carved from one dynamic allocation.
struct MmaShared {
  uint16_t* q;          // [kRowTile][D + kTilePad] raw 16-bit elements
  uint16_t* k;          // [kMmaKeyTile][D + kTilePad]
  float* logits;        // [kRowTile][kLogitStride], unscaled
  float* row_max;       // [kRowTile], of scaled logits
  float* row_inv_sum;   // [kRowTile], 0 for a row that contributes nothing, NaN for a NaN row
  int* row_limit;       // [kRowTile], keys [0, limit) visible; 0 for an invalid row
  int* key_valid;       // [kMmaKeyTile]
  float* col_partial;   // [2][kMmaKeyTile]

  __device__ MmaShared(unsigned char* base, int ld) {
    q = reinterpret_cast<uint16_t*>(base);
    k = q + kRowTile * ld;
    logits = reinterpret_cast<float*>(k + kMmaKeyTile * ld);
    row_max = logits + kRowTile * kLogitStride;
    row_inv_sum = row_max + kRowTile;
    row_limit = reinterpret_cast<int*>(row_inv_sum + kRowTile);
    key_valid = row_limit + kRowTile;
    col_partial = reinterpret_cast<float*>(key_valid + kMmaKeyTile);
  }

  static size_t bytes(int ld) {
    return (kRowTile + kMmaKeyTile) * ld * sizeof(uint16_t) +
           (kRowTile * kLogitStride + 2 * kRowTile + 2 * kMmaKeyTile) * sizeof(float) +
           (kRowTile + kMmaKeyTile) * sizeof(int);
  }
};

// Copies 64 rows of D 16-bit elements into a shared [64][ld] tile; `row(i)` is the source of
// row i (null: zeros). kVector: rows are contiguous and 16-byte aligned, copied as uint4.
template <bool kVector, typename RowSource>
__device__ void load_rows(uint16_t* tile, int ld, int dim, int64_t elem_stride, const RowSource& row) {
  if (kVector) {
    const int chunks = dim / 8;
    for (int idx = threadIdx.x; idx < 64 * chunks; idx += kMmaThreads) {
      const int i = idx / chunks, c = idx % chunks;
      const uint16_t* src = row(i);
      *reinterpret_cast<uint4*>(tile + i * ld + c * 8) =
          src != nullptr ? reinterpret_cast<const uint4*>(src)[c] : make_uint4(0, 0, 0, 0);
    }
  } else {
    for (int idx = threadIdx.x; idx < 64 * dim; idx += kMmaThreads) {
      const int i = idx / dim, d = idx % dim;
      const uint16_t* src = row(i);
      tile[i * ld + d] = src != nullptr ? src[d * elem_stride] : uint16_t(0);
    }
  }
}

struct QueryRows {  // query row r = row0 + i of group (b, j): head j * G + r / T, position r % T
  const uint16_t* q;
  Strides4 stride;
  int64_t b, j, group, queries, rows, row0;
  __device__ const uint16_t* operator()(int i) const {
    const int64_t r = row0 + i;
    if (r >= rows) return nullptr;
    const int64_t h = j * group + r / queries, t = r % queries;
    return q + b * stride.s0 + h * stride.s1 + t * stride.s2;
  }
};

struct KeyRows {
  const uint16_t* k;
  Strides4 stride;
  int64_t b, j, keys, n0;
  __device__ const uint16_t* operator()(int i) const {
    const int64_t n = n0 + i;
    return n < keys ? k + b * stride.s0 + j * stride.s1 + n * stride.s2 : nullptr;
  }
};

// The 64 keys [n0, n0 + 64) of kv head (b, j) into the shared tile, and which of them are valid
// (in range and not masked). Both passes load through here, so they see the same keys.
template <bool kVector>
__device__ void load_mma_key_tile(const MmaShared& sm, int ld, const uint16_t* __restrict__ k,
                                  const ScoreArgs& a, int64_t b, int64_t j, int64_t n0) {
  load_rows<kVector>(sm.k, ld, static_cast<int>(a.dim), a.k_stride.s3,
                     KeyRows{k, a.k_stride, b, j, a.keys, n0});
  if (threadIdx.x < kMmaKeyTile)
    sm.key_valid[threadIdx.x] = n0 + threadIdx.x < a.keys && key_ok(a, b, n0 + threadIdx.x);
}

// Unscaled logits of this warp's 16 query rows against the 64 keys of the shared tile.
template <typename mma_t>
__device__ void warp_logits(const MmaShared& sm, int ld, int dim, int warp) {
  using namespace nvcuda;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kMmaKeyTile / 16];
#pragma unroll
  for (int c = 0; c < kMmaKeyTile / 16; ++c) wmma::fill_fragment(acc[c], 0.0f);
  const mma_t* q_rows = reinterpret_cast<const mma_t*>(sm.q + warp * 16 * ld);
  const mma_t* k_rows = reinterpret_cast<const mma_t*>(sm.k);
  for (int d0 = 0; d0 < dim; d0 += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, mma_t, wmma::row_major> a;
    wmma::load_matrix_sync(a, q_rows + d0, ld);
#pragma unroll
    for (int c = 0; c < kMmaKeyTile / 16; ++c) {
      // k^T as a column-major matrix: element (d, n) at k_rows[n * ld + d]
      wmma::fragment<wmma::matrix_b, 16, 16, 16, mma_t, wmma::col_major> bk;
      wmma::load_matrix_sync(bk, k_rows + c * 16 * ld + d0, ld);
      wmma::mma_sync(acc[c], a, bk, acc[c]);
    }
  }
#pragma unroll
  for (int c = 0; c < kMmaKeyTile / 16; ++c)
    wmma::store_matrix_sync(sm.logits + warp * 16 * kLogitStride + c * 16, acc[c], kLogitStride,
                            wmma::mem_row_major);
  __syncwarp();
}

// grid: (ceil(G * T / 64), B * Hkv). Pass 1 keeps each row's (max, sum) in two lanes of its warp
// (32 keys each); pass 2 sums columns over the block's 64 rows, one atomicAdd per key and block.
template <typename scalar_t, bool kVector>
__global__ void __launch_bounds__(kMmaThreads)
    scores_mma_kernel(const uint16_t* __restrict__ q, const uint16_t* __restrict__ k, ScoreArgs a,
                      float* __restrict__ scores) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using mma_t = typename MmaElement<scalar_t>::type;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const int dim = static_cast<int>(a.dim), ld = dim + kTilePad;
  const MmaShared sm(smem_raw, ld);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t b = blockIdx.y / a.kv_heads, j = blockIdx.y % a.kv_heads;
  const int64_t group = a.heads / a.kv_heads, rows = group * a.queries;
  const int64_t row0 = int64_t(blockIdx.x) * kRowTile;

  load_rows<kVector>(sm.q, ld, dim, a.q_stride.s3,
                     QueryRows{q, a.q_stride, b, j, group, a.queries, rows, row0});
  if (threadIdx.x < kRowTile) {
    const int64_t r = row0 + threadIdx.x, t = r % a.queries;
    sm.row_limit[threadIdx.x] =
        r < rows && query_ok(a, b, t) ? static_cast<int>(key_limit(a, b, t)) : 0;
  }

  // Pass 1: lanes 2i and 2i+1 hold row warp * 16 + i, keys [0, 32) and [32, 64) of each tile,
  // visited in a lane-rotated order (conflict-free shared reads).
  const int my_row = warp * 16 + lane / 2, half = lane % 2;
  float m = -INFINITY, l = 0.0f;
  for (int64_t n0 = 0; n0 < a.keys; n0 += kMmaKeyTile) {
    __syncthreads();  // the previous tile is fully read
    load_mma_key_tile<kVector>(sm, ld, k, a, b, j, n0);
    __syncthreads();
    warp_logits<mma_t>(sm, ld, dim, warp);
    const int64_t limit = sm.row_limit[my_row];
    const float* logits = sm.logits + my_row * kLogitStride + half * 32;
    float tile_max = -INFINITY;
    for (int i = 0; i < 32; ++i) {
      const int c = (i + lane) % 32;
      if (sm.key_valid[half * 32 + c] && n0 + half * 32 + c < limit)
        tile_max = nan_max(logits[c] * a.scale, tile_max);
    }
    tile_max = nan_max(tile_max, __shfl_xor_sync(0xffffffff, tile_max, 1));
    if (tile_max == -INFINITY) continue;  // the same in both lanes of the row
    const float new_m = nan_max(tile_max, m);
    l *= __expf(m - new_m);
    for (int i = 0; i < 32; ++i) {
      const int c = (i + lane) % 32;
      if (sm.key_valid[half * 32 + c] && n0 + half * 32 + c < limit)
        l += __expf(logits[c] * a.scale - new_m);
    }
    m = new_m;
  }
  l += __shfl_xor_sync(0xffffffff, l, 1);
  if (half == 0) {
    sm.row_max[my_row] = m;
    sm.row_inv_sum[my_row] = l != 0.0f ? 1.0f / l : 0.0f;  // NaN stays NaN
  }

  // Pass 2: thread (h, c) sums column c over rows [32 h, 32 h + 32).
  const int col = threadIdx.x % kMmaKeyTile, row_half = threadIdx.x / kMmaKeyTile;
  const float weight = row_weight_of(a, b);
  for (int64_t n0 = 0; n0 < a.keys; n0 += kMmaKeyTile) {
    __syncthreads();  // row statistics written; the previous tile fully read
    load_mma_key_tile<kVector>(sm, ld, k, a, b, j, n0);
    __syncthreads();
    warp_logits<mma_t>(sm, ld, dim, warp);
    __syncthreads();  // every warp's logits are in
    float acc = 0.0f;
    if (sm.key_valid[col]) {
      for (int i = row_half * 32; i < row_half * 32 + 32; ++i) {
        const float inv_sum = sm.row_inv_sum[i];
        if (inv_sum != 0.0f && n0 + col < sm.row_limit[i])
          acc += __expf(sm.logits[i * kLogitStride + col] * a.scale - sm.row_max[i]) * inv_sum;
      }
    }
    sm.col_partial[row_half * kMmaKeyTile + col] = acc;
    __syncthreads();
    if (threadIdx.x < kMmaKeyTile && n0 + threadIdx.x < a.keys) {
      const float total = sm.col_partial[threadIdx.x] + sm.col_partial[kMmaKeyTile + threadIdx.x];
      if (total != 0.0f) atomicAdd(&scores[b * a.keys + n0 + threadIdx.x], total * weight);
    }
  }
#else
  __trap();  // the host launches this kernel on sm_80+ only
#endif
}

Strides4 strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Rows of D elements that load as aligned uint4 vectors.
bool rows_are_vectors(const at::Tensor& t) {
  const int64_t dim = t.size(3);
  return t.stride(3) == 1 && dim % 8 == 0 && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 &&
         t.stride(2) % 8 == 0 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

bool use_tensor_cores(const at::Tensor& q) {
  const bool half_type = q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16;
  return half_type && q.size(3) % 16 == 0 && at::cuda::getCurrentDeviceProperties()->major >= 8;
}

template <typename scalar_t, bool kVector>
void launch_mma(const at::Tensor& q, const at::Tensor& k, const ScoreArgs& args, at::Tensor& scores,
                cudaStream_t stream) {
  const int64_t rows = (args.heads / args.kv_heads) * args.queries;
  const dim3 grid((rows + kRowTile - 1) / kRowTile, args.batch * args.kv_heads);
  TORCH_CHECK(grid.y <= 65535 && rows / kRowTile < std::numeric_limits<int32_t>::max() &&
                  args.keys < std::numeric_limits<int32_t>::max(),
              "cross_attn_scores: too many batch rows x kv heads (", grid.y,
              ") or keys for one launch");
  const size_t smem = MmaShared::bytes(static_cast<int>(args.dim) + kTilePad);
  auto kernel = scores_mma_kernel<scalar_t, kVector>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  kernel<<<grid, kMmaThreads, smem, stream>>>(
      reinterpret_cast<const uint16_t*>(q.data_ptr<scalar_t>()),
      reinterpret_cast<const uint16_t*>(k.data_ptr<scalar_t>()), args,
      scores.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_ffma(const at::Tensor& q, const at::Tensor& k, const ScoreArgs& args, at::Tensor& scores,
                 cudaStream_t stream) {
  const int64_t rows_per_group = (args.heads / args.kv_heads) * args.queries;
  const dim3 stats_grid(args.batch * args.kv_heads, (rows_per_group + kWarps - 1) / kWarps);
  const dim3 acc_grid(args.batch * args.kv_heads, (args.keys + kKeyTile - 1) / kKeyTile);
  TORCH_CHECK(stats_grid.y <= 65535 && acc_grid.y <= 65535,
              "cross_attn_scores: too many query rows or keys for one launch (H/Hkv*T = ",
              rows_per_group, ", N = ", args.keys, ")");
  const auto stats_opts = q.options().dtype(at::kFloat);
  at::Tensor row_max = at::empty({args.batch, args.heads, args.queries}, stats_opts);
  at::Tensor row_sum = at::zeros({args.batch, args.heads, args.queries}, stats_opts);
  row_stats_kernel<scalar_t><<<stats_grid, kThreads, 0, stream>>>(
      q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), args, row_max.data_ptr<float>(),
      row_sum.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  accumulate_kernel<scalar_t><<<acc_grid, kThreads, 0, stream>>>(
      q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), args, row_max.data_ptr<float>(),
      row_sum.data_ptr<float>(), scores.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor cross_attn_scores_cuda(const at::Tensor& q,  // [B, H, T, D]
                                  const at::Tensor& k,  // [B, Hkv, N, D]
                                  std::optional<double> scale,
                                  const std::optional<at::Tensor>& q_mask,   // bool [B, T]
                                  const std::optional<at::Tensor>& kv_mask,  // bool [B, N]
                                  const std::optional<at::Tensor>& q_pos) {  // int64 [B, T]
  TORCH_INTERNAL_ASSERT(q.is_cuda());
  const c10::cuda::CUDAGuard device_guard(q.device());
  const int64_t batch = q.size(0), heads = q.size(1), queries = q.size(2), dim = q.size(3);
  const int64_t kv_heads = k.size(1), keys = k.size(2);
  const auto float_opts = q.options().dtype(at::kFloat);
  at::Tensor scores = at::zeros({batch, keys}, float_opts);

  // Masks as given (contiguous) or absent; the row weight only when q_mask makes it per row.
  at::Tensor key_valid = kv_mask.has_value() ? kv_mask->contiguous() : at::Tensor();
  at::Tensor query_valid = q_mask.has_value() ? q_mask->contiguous() : at::Tensor();
  at::Tensor positions = q_pos.has_value() ? q_pos->contiguous() : at::Tensor();
  at::Tensor count, row_weight;
  if (q_mask.has_value()) {
    count = query_valid.sum(1).to(at::kFloat) * static_cast<double>(heads);  // [B]
    row_weight = (1.0 / count.clamp_min(1.0)).contiguous();
  }

  if (batch > 0 && heads > 0 && queries > 0 && keys > 0) {
    const ScoreArgs args{batch, heads, kv_heads, queries, keys, dim,
                         static_cast<float>(scale.value_or(1.0 / std::sqrt(double(dim)))),
                         strides_of(q), strides_of(k),
                         kv_mask.has_value() ? key_valid.data_ptr<bool>() : nullptr,
                         q_mask.has_value() ? query_valid.data_ptr<bool>() : nullptr,
                         q_pos.has_value() ? positions.data_ptr<int64_t>() : nullptr,
                         q_mask.has_value() ? row_weight.data_ptr<float>() : nullptr,
                         static_cast<float>(1.0 / (double(heads) * double(queries)))};
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    if (use_tensor_cores(q)) {
      const bool vector = rows_are_vectors(q) && rows_are_vectors(k);
      AT_DISPATCH_REDUCED_FLOATING_TYPES(q.scalar_type(), "cross_attn_scores_cuda_mma", [&] {
        if (vector) {
          launch_mma<scalar_t, true>(q, k, args, scores, stream);
        } else {
          launch_mma<scalar_t, false>(q, k, args, scores, stream);
        }
      });
    } else {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(),
                                      "cross_attn_scores_cuda", [&] {
        launch_ffma<scalar_t>(q, k, args, scores, stream);
      });
    }
  }
  // A row with no valid query gets the uniform distribution over its valid keys.
  if (q_mask.has_value() || queries == 0) {
    at::Tensor key_valid_f = kv_mask.has_value() ? key_valid.to(at::kFloat)
                                                 : at::ones({batch, keys}, float_opts);
    at::Tensor uniform = key_valid_f / key_valid_f.sum(1, /*keepdim=*/true).clamp_min(1.0);
    at::Tensor has_query = q_mask.has_value() ? (count > 0).unsqueeze(1)
                                              : at::zeros({batch, 1}, float_opts.dtype(at::kBool));
    return at::where(has_query, scores, uniform);
  }
  return scores;
}


}  // namespace etc_ext
