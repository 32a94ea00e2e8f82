// Declarations of every etc_ext op implementation. Argument order and names follow the
// schemas in torch_bindings.cpp and the wrappers in etc_ext/ops/.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace etc_ext {

// q: [B, H, T, D], k: [B, Hkv, N, D] -> float32 [B, N]
at::Tensor cross_attn_scores_cpu(const at::Tensor& q, const at::Tensor& k,
                                 std::optional<double> scale,
                                 const std::optional<at::Tensor>& q_mask,
                                 const std::optional<at::Tensor>& kv_mask,
                                 const std::optional<at::Tensor>& q_pos);

}  // namespace etc_ext

// ---------------------------------------------------------------------------------------
// weighted_aggregate, write_compressed_kv (issue 4)
namespace etc_ext {

// x: [B, N, C], logits: [B, K, N], importance: [B, N], mask: bool [B, N] -> [B, K, C]
at::Tensor weighted_aggregate_cpu(const at::Tensor& x, const at::Tensor& logits,
                                  const std::optional<at::Tensor>& importance,
                                  const std::optional<at::Tensor>& mask);

// key_cache, value_cache: [num_blocks, block_size, Hkv, D] (written in place),
// key, value: [B, Hkv, N, D], slot_mapping: int64 [B, K],
// weights: float32 [B, K, N] or index: int64 [B, K]
void write_compressed_kv_cpu(at::Tensor& key_cache, at::Tensor& value_cache,
                             const at::Tensor& key, const at::Tensor& value,
                             const at::Tensor& slot_mapping,
                             const std::optional<at::Tensor>& weights,
                             const std::optional<at::Tensor>& index);

// write_compressed_kv for every layer at once: lists of L tensors of one layout each, one
// slot_mapping and weights/index for all layers
void write_compressed_kv_layers_cpu(at::TensorList key_caches, at::TensorList value_caches,
                                    at::TensorList keys, at::TensorList values,
                                    const at::Tensor& slot_mapping,
                                    const std::optional<at::Tensor>& weights,
                                    const std::optional<at::Tensor>& index);

}  // namespace etc_ext
