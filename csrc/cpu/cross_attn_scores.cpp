// CPU kernel of cross_attn_scores. Work items are (query group, row chunk) pairs run in
// parallel; each thread computes its q.k^T logits tile with a single-threaded BLAS matmul into
// a buffer that stays in its L2 cache, then one fused pass per row (mask, softmax, accumulate
// into the thread's score rows). The [B, H, T, N] probabilities are never materialized.
#include "../checks.h"
#include "../ops.h"
#include "vec_math.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

namespace etc_ext {
namespace {

// Floats in one thread's logits tile (256 KiB): stays in the core's L2 cache between the
// matmul that writes it and the softmax pass that reads it.
constexpr int64_t kTileFloats = int64_t{1} << 16;

// Softmax of one row of unscaled logits (q.k) over its visible keys, accumulated into `acc`
// with weight `row_weight`. Keys at index >= limit or with key_valid == 0 are invisible.
// The softmax scale is applied here, so q needs no scaled copy.
inline void accumulate_row(float* logits, const float* key_valid, int64_t limit, float scale,
                           float row_weight, float* acc) {
  float row_max = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : row_max)
  for (int64_t n = 0; n < limit; ++n) {
    const float v = key_valid[n] > 0.0f ? logits[n] : -std::numeric_limits<float>::infinity();
    row_max = std::max(row_max, v);
  }
  if (row_max == -std::numeric_limits<float>::infinity()) return;  // sees no key
  float row_sum = 0.0f;
#pragma omp simd reduction(+ : row_sum)
  for (int64_t n = 0; n < limit; ++n) {
    const float e = exp_nonpositive((logits[n] - row_max) * scale) * key_valid[n];
    logits[n] = e;
    row_sum += e;
  }
  const float w = row_weight / row_sum;
#pragma omp simd
  for (int64_t n = 0; n < limit; ++n) acc[n] += logits[n] * w;
}

}  // namespace

at::Tensor cross_attn_scores_cpu(const at::Tensor& q,  // [B, H, T, D]
                                 const at::Tensor& k,  // [B, Hkv, N, D]
                                 std::optional<double> scale,
                                 const std::optional<at::Tensor>& q_mask,   // bool [B, T]
                                 const std::optional<at::Tensor>& kv_mask,  // bool [B, N]
                                 const std::optional<at::Tensor>& q_pos) {  // int64 [B, T]
  check_cross_attn_scores_args(q, k, scale, q_mask, kv_mask, q_pos);
  TORCH_INTERNAL_ASSERT(q.device().is_cpu());
  const int64_t batch = q.size(0), heads = q.size(1), queries = q.size(2), dim = q.size(3);
  const int64_t kv_heads = k.size(1), keys = k.size(2);
  const int64_t group = heads / kv_heads;
  const float softmax_scale = static_cast<float>(scale.value_or(1.0 / std::sqrt(static_cast<double>(dim))));

  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor key_valid = kv_mask.has_value() ? kv_mask->to(at::kFloat).contiguous()
                                             : at::ones({batch, keys}, f32);
  at::Tensor query_valid = q_mask.has_value() ? q_mask->to(at::kFloat).contiguous()
                                              : at::ones({batch, queries}, f32);
  // Number of keys visible to each query: keys [0, limit) pass the causal test.
  at::Tensor limit = q_pos.has_value()
                         ? (*q_pos + 1).clamp(0, keys).contiguous()
                         : at::full({batch, queries}, keys, q.options().dtype(at::kLong));
  at::Tensor count = query_valid.sum(1) * static_cast<double>(heads);  // [B]
  at::Tensor row_weight = (1.0 / count.clamp_min(1.0)).contiguous();   // [B]

  const int nthreads = at::get_num_threads();
  at::Tensor acc = at::zeros({nthreads, batch, keys}, f32);
  if (batch > 0 && keys > 0 && queries > 0 && heads > 0) {
    // Queries grouped by the kv head they read: [B * Hkv, g * T, D] (a view of a contiguous
    // float32 q). Row r of group (b, j) is query t = r % T of head j * g + r / T.
    const at::Tensor q_groups = q.to(at::kFloat).reshape({batch * kv_heads, group * queries, dim}).contiguous();
    const at::Tensor k_groups = k.to(at::kFloat).reshape({batch * kv_heads, keys, dim}).contiguous();
    const int64_t rows_per_group = group * queries;
    const int64_t row_chunk = std::min(rows_per_group, std::max<int64_t>(1, kTileFloats / keys));
    const int64_t chunks_per_group = (rows_per_group + row_chunk - 1) / row_chunk;
    at::Tensor tiles = at::empty({nthreads, row_chunk, keys}, f32);

    const float* q_ptr = q_groups.data_ptr<float>();
    const float* k_ptr = k_groups.data_ptr<float>();
    const float* key_valid_ptr = key_valid.data_ptr<float>();
    const float* query_valid_ptr = query_valid.data_ptr<float>();
    const int64_t* limit_ptr = limit.data_ptr<int64_t>();
    const float* row_weight_ptr = row_weight.data_ptr<float>();
    float* acc_ptr = acc.data_ptr<float>();
    float* tiles_ptr = tiles.data_ptr<float>();

    at::parallel_for(0, batch * kv_heads * chunks_per_group, 1, [&](int64_t begin, int64_t end) {
      const int64_t tid = at::get_thread_num();
      float* thread_acc = acc_ptr + tid * batch * keys;
      float* tile_ptr = tiles_ptr + tid * row_chunk * keys;
      const auto cpu_f32 = at::TensorOptions().dtype(at::kFloat);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t group_idx = item / chunks_per_group;
        const int64_t r0 = (item % chunks_per_group) * row_chunk;
        const int64_t rows = std::min(row_chunk, rows_per_group - r0);
        const int64_t b = group_idx / kv_heads;
        // Plain tensors over raw buffers (no autograd state): inside a parallel region the
        // matmul runs single-threaded on this thread.
        const at::Tensor q_rows = at::from_blob(const_cast<float*>(q_ptr) + (group_idx * rows_per_group + r0) * dim, {rows, dim}, cpu_f32);
        const at::Tensor k_rows = at::from_blob(const_cast<float*>(k_ptr) + group_idx * keys * dim, {keys, dim}, cpu_f32);
        at::Tensor logits = at::from_blob(tile_ptr, {rows, keys}, cpu_f32);
        at::mm_out(logits, q_rows, k_rows.t());
        for (int64_t row = 0; row < rows; ++row) {
          const int64_t t = (r0 + row) % queries;
          if (query_valid_ptr[b * queries + t] == 0.0f) continue;
          accumulate_row(tile_ptr + row * keys, key_valid_ptr + b * keys, limit_ptr[b * queries + t],
                         softmax_scale, row_weight_ptr[b], thread_acc + b * keys);
        }
      }
    });
  }
  at::Tensor scores = acc.sum(0);
  // A row with no valid query gets the uniform distribution over its valid keys.
  at::Tensor uniform = key_valid / key_valid.sum(1, /*keepdim=*/true).clamp_min(1.0);
  return at::where((count > 0).unsqueeze(1), scores, uniform);
}

}  // namespace etc_ext
