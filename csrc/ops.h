// Declarations of every etc_ext op implementation. Argument order and names follow the
// schemas in torch_bindings.cpp and the wrappers in etc_ext/ops.py.
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
