// Argument checks shared by the CPU and CUDA implementations of every op.
// Written once here; etc_ext/ops.py mirrors them (with Python exceptions) and the fake
// impls mirror them with torch._check.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <sstream>
#include <string>

namespace etc_ext {

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream out;
  out << t.sizes();
  return out.str();
}

inline void check_rank(const at::Tensor& t, int64_t rank, const char* op, const char* name,
                       const char* layout) {
  TORCH_CHECK(t.dim() == rank, op, ": ", name, " must be a ", rank, "-D tensor ", layout,
              ", got shape ", shape_str(t));
}

inline void check_float_dtype(const at::Tensor& t, const char* op, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op, ": ",
              name, " must be float32, float16 or bfloat16, got ", dtype);
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                              const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the device of ", ref_name,
              " (", ref.device(), "), got ", t.device());
}

// An optional per-row tensor such as a mask: shape [rows, cols], the given dtype, same device.
inline void check_optional_2d(const std::optional<at::Tensor>& t, int64_t rows, int64_t cols,
                              at::ScalarType dtype, const at::Tensor& ref, const char* op,
                              const char* name, const char* layout) {
  if (!t.has_value()) return;
  check_rank(*t, 2, op, name, layout);
  TORCH_CHECK(t->size(0) == rows && t->size(1) == cols, op, ": ", name, " must have shape ",
              layout, " = [", rows, ", ", cols, "], got ", shape_str(*t));
  TORCH_CHECK(t->scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ",
              t->scalar_type());
  check_same_device(*t, ref, op, name, "q");
}

// cross_attn_scores(q [B, H, T, D], k [B, Hkv, N, D], q_mask [B, T], kv_mask [B, N], q_pos [B, T])
inline void check_cross_attn_scores_args(const at::Tensor& q, const at::Tensor& k,
                                         std::optional<double> scale,
                                         const std::optional<at::Tensor>& q_mask,
                                         const std::optional<at::Tensor>& kv_mask,
                                         const std::optional<at::Tensor>& q_pos) {
  constexpr const char* op = "cross_attn_scores";
  check_rank(q, 4, op, "q", "[B, H, T, D]");
  check_rank(k, 4, op, "k", "[B, Hkv, N, D]");
  check_float_dtype(q, op, "q");
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), op, ": k must have the dtype of q (",
              q.scalar_type(), "), got ", k.scalar_type());
  check_same_device(k, q, op, "k", "q");
  const int64_t batch = q.size(0), heads = q.size(1), queries = q.size(2), dim = q.size(3);
  TORCH_CHECK(k.size(0) == batch, op, ": k must have batch size B = ", batch, " like q, got k ",
              shape_str(k));
  TORCH_CHECK(k.size(3) == dim, op, ": k must have head_dim D = ", dim, " like q, got k ",
              shape_str(k));
  TORCH_CHECK(dim >= 1 && dim <= 256, op, ": head_dim D must be in [1, 256], got ", dim);
  TORCH_CHECK(k.size(1) >= 1 && heads % k.size(1) == 0, op,
              ": the number of query heads H = ", heads,
              " must be a multiple of the number of kv heads Hkv = ", k.size(1));
  TORCH_CHECK(!scale.has_value() || *scale > 0.0, op, ": scale must be positive, got ", *scale);
  check_optional_2d(q_mask, batch, queries, at::kBool, q, op, "q_mask", "[B, T]");
  check_optional_2d(kv_mask, batch, k.size(2), at::kBool, q, op, "kv_mask", "[B, N]");
  check_optional_2d(q_pos, batch, queries, at::kLong, q, op, "q_pos", "[B, T]");
}

}  // namespace etc_ext
