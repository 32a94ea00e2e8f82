// CPU kernel of cross_attn_scores. Work items are (query group, slab of 32 query rows) pairs run
// in parallel. For each panel of P query rows of its slab, an item computes the transposed
// logits tile [N, P] = k . q_panel^T with a register-tiled micro-kernel into a per-thread
// buffer that stays in L2, then a softmax pass vectorized across the panel's query rows that
// accumulates into the thread's score rows. The [B, H, T, N] probabilities are never
// materialized. The loops are templates on the instruction set (cpu_capability.h): P and the
// micro-kernel's rows follow its vector width and register count.
//
// Why not BLAS: at inference shapes (T ~ 32 text queries, N ~ 576 keys per head) each head's
// q.k^T is a skinny 32 x 576 x 128 product, and MKL packs k for every such call. Transposed,
// each key row is read in place and broadcast against the packed q panel, so only the small
// panel is packed (the micro-kernel alone: ~1.1 ms vs ~1.5 ms for MKL's batched matmul there).
#include "cpu_capability.h"
#include "vec_math.h"

#include <ATen/Parallel.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace etc_ext {
namespace {

// Panel widths: two vector registers of query rows, and a narrow panel of one register for
// query groups that would leave most of a wide one empty. Key rows per micro-kernel call: as
// many accumulator rows as the register file holds beside the panel and the broadcast key
// value, at most 8 (8 x 2 zmm of AVX-512's 32 registers; 6 x 2 ymm of AVX2's 16, where 8 x 2
// spilled to the stack).
template <typename Isa>
struct ScoreTiles {
  static constexpr int kFloats = Isa::kVectorBytes / static_cast<int>(sizeof(float));
  static constexpr int kWidePanel = 2 * kFloats;
  static constexpr int kNarrowPanel = kFloats;
  template <int kPanel>
  static constexpr int kKeyRows = std::min(8, (Isa::kRegisters - 1 - kPanel / kFloats) / (kPanel / kFloats));
};
// Work items are (group, slab of kSlabRows query rows); each instruction set covers a slab
// with its own panels, so the split and the buffers are the same for all.
constexpr int kSlabRows = ScoreTiles<IsaAvx512>::kWidePanel;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// c[i, :] = sum_d k[i, d] * q_panel[d, :] for kRows key rows: each k value is broadcast against
// one packed row of the panel; the accumulators stay in registers for the whole d loop. Also
// folds the rows into the running column maxima (the softmax's max when no key is masked).
template <int kPanel, int kRows>
inline void logits_micro_kernel(const float* __restrict k, int64_t dim, const float* __restrict q_panel,
                                float* __restrict c, float* __restrict col_max) {
  float acc[kRows][kPanel] = {};
  for (int64_t d = 0; d < dim; ++d) {
    const float* q_row = q_panel + d * kPanel;
#pragma GCC unroll 16
    for (int i = 0; i < kRows; ++i) {
      const float k_value = k[i * dim + d];
#pragma omp simd
      for (int r = 0; r < kPanel; ++r) acc[i][r] += k_value * q_row[r];
    }
  }
  for (int i = 0; i < kRows; ++i) {
#pragma omp simd
    for (int r = 0; r < kPanel; ++r) {
      c[i * kPanel + r] = acc[i][r];
      col_max[r] = std::max(col_max[r], acc[i][r]);
    }
  }
}

// logits [keys, kPanel] of one panel against one kv head's keys [keys, dim], and each column's
// maximum over all keys.
template <typename Isa, int kPanel>
void panel_logits(const float* k, int64_t keys, int64_t dim, const float* q_panel, float* logits, float* col_max) {
  constexpr int kKeyRows = ScoreTiles<Isa>::template kKeyRows<kPanel>;
  for (int r = 0; r < kPanel; ++r) col_max[r] = kNegInf;
  int64_t n = 0;
  for (; n + kKeyRows <= keys; n += kKeyRows) {
    logits_micro_kernel<kPanel, kKeyRows>(k + n * dim, dim, q_panel, logits + n * kPanel, col_max);
  }
  for (; n < keys; ++n) logits_micro_kernel<kPanel, 1>(k + n * dim, dim, q_panel, logits + n * kPanel, col_max);
}

// Softmax of every column of `logits` [keys, kPanel] (one query row per column, unscaled q.k)
// over its visible keys, accumulated into `acc` [keys] with weight `column_weight[r]` (0 for a
// column that does not count). Key n is visible to column r when key_valid[n] > 0 and
// n < limit[r]. `col_max` holds each column's max over all keys; unless `every_key_visible`,
// it is replaced by the max over the visible ones. The softmax scale is applied here, so q
// needs no scaled copy.
template <int kPanel>
void accumulate_panel(float* logits, int64_t keys, const float* key_valid, const float* limit,
                      const float* column_weight, bool every_key_visible, float scale, float* col_max,
                      float* acc) {
  if (!every_key_visible) {
    for (int r = 0; r < kPanel; ++r) col_max[r] = kNegInf;
    for (int64_t n = 0; n < keys; ++n) {
      if (key_valid[n] == 0.0f) continue;
      const float* row = logits + n * kPanel;
      const float position = static_cast<float>(n);
#pragma omp simd
      for (int r = 0; r < kPanel; ++r) col_max[r] = std::max(col_max[r], position < limit[r] ? row[r] : kNegInf);
    }
  }
  // A column that sees no key keeps max -inf: shift by 0 so exp gives 0, not NaN.
  for (int r = 0; r < kPanel; ++r) col_max[r] = col_max[r] == kNegInf ? 0.0f : col_max[r];
  alignas(64) float col_sum[kPanel] = {};
  alignas(64) float weight[kPanel];
  alignas(64) float shift[kPanel];  // exp((s - max) * scale) as exp(s * scale + shift): one FMA
  for (int r = 0; r < kPanel; ++r) shift[r] = -col_max[r] * scale;
  if (every_key_visible) {  // no mask to apply (the common inference case): ~20 % less time in this pass
    for (int64_t n = 0; n < keys; ++n) {
      float* row = logits + n * kPanel;
#pragma omp simd
      for (int r = 0; r < kPanel; ++r) {
        const float e = exp_nonpositive(row[r] * scale + shift[r]);
        row[r] = e;
        col_sum[r] += e;
      }
    }
  } else {
    for (int64_t n = 0; n < keys; ++n) {
      float* row = logits + n * kPanel;
      const float position = static_cast<float>(n);
      const float valid = key_valid[n];
#pragma omp simd
      for (int r = 0; r < kPanel; ++r) {
        // exp computed for every lane, then selected: a call under a condition stops gcc
        // vectorizing, and a multiply by 0 would let a masked key's NaN through.
        const float e_all = exp_nonpositive(row[r] * scale + shift[r]);
        const float e = position < limit[r] && valid != 0.0f ? e_all : 0.0f;
        row[r] = e;
        col_sum[r] += e;
      }
    }
  }
  // A column that sees no key has sum 0 and adds nothing; a NaN sum (NaN in q or k) must reach
  // the scores as the reference's NaN, not be dropped by a "> 0" test.
  for (int r = 0; r < kPanel; ++r) weight[r] = col_sum[r] == 0.0f ? 0.0f : column_weight[r] / col_sum[r];
  for (int64_t n = 0; n < keys; ++n) {
    const float* row = logits + n * kPanel;
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int r = 0; r < kPanel; ++r) total += row[r] * weight[r];
    acc[n] += total;
  }
}

// Inputs shared by every work item, all float32 and contiguous.
struct ScoreProblem {
  const float* q;            // [B * Hkv, rows_per_group, D]
  const float* k;            // [B * Hkv, N, D]
  const float* key_valid;    // [B, N], 1 or 0
  const float* valid_keys;   // [B], number of valid keys
  const float* query_valid;  // [B, T], 1 or 0
  const float* limit;        // [B, T], keys [0, limit) pass the causal test
  const float* row_weight;   // [B], 1 / (counted queries * H)
  int64_t kv_heads, queries, keys, dim, rows_per_group;
  float scale;
};

// Scores of the query rows [r0, r0 + kPanel) of one group, added to `acc` [B, N]. `scratch`
// holds (keys + dim) * kPanel floats.
template <typename Isa, int kPanel>
void score_panel(const ScoreProblem& p, int64_t group_idx, int64_t r0, float* scratch, float* acc) {
  float* logits = scratch;
  float* q_panel = scratch + p.keys * kPanel;
  alignas(64) float column_limit[kPanel], column_weight[kPanel], col_max[kPanel];
  const int64_t b = group_idx / p.kv_heads;
  const int64_t rows = std::min<int64_t>(kPanel, p.rows_per_group - r0);
  // Pack the panel transposed, [D, kPanel]; missing rows are zeros that get weight 0.
  const float* q_rows = p.q + (group_idx * p.rows_per_group + r0) * p.dim;
  for (int64_t d = 0; d < p.dim; ++d) {
    for (int r = 0; r < kPanel; ++r) q_panel[d * kPanel + r] = r < rows ? q_rows[r * p.dim + d] : 0.0f;
  }
  // Whether every counted row sees every key: then the max over all keys is the softmax's.
  bool every_key_visible = p.valid_keys[b] == static_cast<float>(p.keys);
  for (int r = 0; r < kPanel; ++r) {
    const int64_t t = (r0 + r) % p.queries;  // row r0 + r of the group is query t of one head
    const bool counts = r < rows && p.query_valid[b * p.queries + t] != 0.0f;
    column_limit[r] = counts ? p.limit[b * p.queries + t] : 0.0f;
    column_weight[r] = counts ? p.row_weight[b] : 0.0f;
    every_key_visible = every_key_visible && (!counts || column_limit[r] == static_cast<float>(p.keys));
  }
  panel_logits<Isa, kPanel>(p.k + group_idx * p.keys * p.dim, p.keys, p.dim, q_panel, logits, col_max);
  accumulate_panel<kPanel>(logits, p.keys, p.key_valid + b * p.keys, column_limit, column_weight, every_key_visible,
                           p.scale, col_max, acc + b * p.keys);
}

// Items [begin, end) = (group, slab of kSlabRows query rows), added to acc [B, N]; scratch
// holds (keys + dim) * kSlabRows floats. A slab that fits a narrow panel takes one, else
// wide panels.
template <typename Isa>
void score_items(const ScoreProblem& p, int64_t begin, int64_t end, float* scratch, float* acc) {
  using Tiles = ScoreTiles<Isa>;
  const int64_t slabs_per_group = (p.rows_per_group + kSlabRows - 1) / kSlabRows;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t group_idx = item / slabs_per_group;
    const int64_t r0 = (item % slabs_per_group) * kSlabRows;
    const int64_t r1 = std::min<int64_t>(p.rows_per_group, r0 + kSlabRows);
    if (r1 - r0 <= Tiles::kNarrowPanel) {
      score_panel<Isa, Tiles::kNarrowPanel>(p, group_idx, r0, scratch, acc);
      continue;
    }
    for (int64_t r = r0; r < r1; r += Tiles::kWidePanel) {
      score_panel<Isa, Tiles::kWidePanel>(p, group_idx, r, scratch, acc);
    }
  }
}

// score_items for each instruction set (cpu_capability.h).
using ScoreItemsFn = void (*)(const ScoreProblem&, int64_t, int64_t, float*, float*);
ETC_EXT_TARGET_BASELINE void score_items_baseline(const ScoreProblem& p, int64_t begin, int64_t end, float* scratch,
                                                  float* acc) {
  score_items<IsaBaseline>(p, begin, end, scratch, acc);
}
ETC_EXT_TARGET_AVX2 void score_items_avx2(const ScoreProblem& p, int64_t begin, int64_t end, float* scratch,
                                          float* acc) {
  score_items<IsaAvx2>(p, begin, end, scratch, acc);
}
ETC_EXT_TARGET_AVX512 void score_items_avx512(const ScoreProblem& p, int64_t begin, int64_t end, float* scratch,
                                              float* acc) {
  score_items<IsaAvx512>(p, begin, end, scratch, acc);
}
const CpuKernels<ScoreItemsFn> kScoreItems{score_items_baseline, score_items_avx2, score_items_avx512};

// Runs every item over the threads; acc is [threads, B, N].
void score_all_items(const ScoreProblem& p, int64_t groups, float* acc, int64_t batch) {
  const ScoreItemsFn run = kScoreItems.pick();
  const int nthreads = at::get_num_threads();
  const int64_t items = groups * ((p.rows_per_group + kSlabRows - 1) / kSlabRows);
  const int64_t scratch_floats = (p.keys + p.dim) * kSlabRows;
  at::Tensor scratch = at::empty({nthreads, scratch_floats}, at::TensorOptions().dtype(at::kFloat));
  float* scratch_ptr = scratch.data_ptr<float>();
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    const int64_t tid = at::get_thread_num();
    run(p, begin, end, scratch_ptr + tid * scratch_floats, acc + tid * batch * p.keys);
  });
}

}  // namespace

at::Tensor cross_attn_scores_cpu(const at::Tensor& q,  // [B, H, T, D]
                                 const at::Tensor& k,  // [B, Hkv, N, D]
                                 std::optional<double> scale,
                                 const std::optional<at::Tensor>& q_mask,   // bool [B, T]
                                 const std::optional<at::Tensor>& kv_mask,  // bool [B, N]
                                 const std::optional<at::Tensor>& q_pos) {  // int64 [B, T]
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
  // Number of keys visible to each query (keys [0, limit) pass the causal test), as float so
  // that the softmax pass compares it with the key index in the same vector lanes.
  at::Tensor limit = q_pos.has_value()
                         ? (*q_pos + 1).clamp(0, keys).to(at::kFloat).contiguous()
                         : at::full({batch, queries}, static_cast<double>(keys), f32);
  at::Tensor valid_keys = key_valid.sum(1);                             // [B]
  at::Tensor count = query_valid.sum(1) * static_cast<double>(heads);  // [B]
  at::Tensor row_weight = (1.0 / count.clamp_min(1.0)).contiguous();   // [B]

  at::Tensor acc = at::zeros({at::get_num_threads(), batch, keys}, f32);
  if (batch > 0 && keys > 0 && queries > 0 && heads > 0) {
    // Queries grouped by the kv head they read: [B * Hkv, g * T, D] (a view of a contiguous
    // float32 q). Row r of group (b, j) is query t = r % T of head j * g + r / T.
    const at::Tensor q_groups = q.to(at::kFloat).reshape({batch * kv_heads, group * queries, dim}).contiguous();
    const at::Tensor k_groups = k.to(at::kFloat).reshape({batch * kv_heads, keys, dim}).contiguous();
    const ScoreProblem problem{q_groups.data_ptr<float>(), k_groups.data_ptr<float>(), key_valid.data_ptr<float>(),
                               valid_keys.data_ptr<float>(), query_valid.data_ptr<float>(), limit.data_ptr<float>(),
                               row_weight.data_ptr<float>(), kv_heads, queries, keys, dim, group * queries,
                               softmax_scale};
    score_all_items(problem, batch * kv_heads, acc.data_ptr<float>(), batch);
  }
  at::Tensor scores = acc.sum(0);
  // A row with no valid query gets the uniform distribution over its valid keys.
  at::Tensor uniform = key_valid / valid_keys.unsqueeze(1).clamp_min(1.0);
  return at::where((count > 0).unsqueeze(1), scores, uniform);
}


}  // namespace etc_ext
