// Argument checks shared by the CPU and CUDA implementations of every op: the ops' contract,
// written once. ValueError for shapes, devices and values, TypeError for dtypes, each message
// naming the op, the argument and what was expected. The fake (meta) implementations in
// etc_ext/ops/checks.py give the same errors under torch.compile, with the same wording (dtypes
// are spelled as Python spells them).
#pragma once

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace etc_ext {

// ---- formatting and the checks every op uses

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream out;
  out << t.sizes();
  return out.str();
}

// The dtype as Python prints it (torch.float32), so that the kernels' errors read like the fakes'.
inline std::string dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return "torch.float32";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kDouble: return "torch.float64";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(dtype);
  }
}

inline void check_rank(const at::Tensor& t, int64_t rank, const char* op, const char* name,
                       const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == rank, op, ": ", name, " must be a ", rank, "-D tensor ", layout,
                    ", got shape ", shape_str(t));
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* op,
                        const char* name, const char* layout) {
  TORCH_CHECK_VALUE(t.sizes() == expected, op, ": ", name, " must have shape ", layout, " = ",
                    expected, ", got ", shape_str(t));
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* op,
                        const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " must have dtype ",
                   dtype_name(dtype), ", got ", dtype_name(t.scalar_type()));
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* op,
                             const char* name, const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name,
                   " must have the dtype of ", ref_name, " (", dtype_name(ref.scalar_type()),
                   "), got ", dtype_name(t.scalar_type()));
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                              const char* name, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " must be on the device of ",
                    ref_name, " (", ref.device(), "), got ", t.device());
}

// float32, float16 or bfloat16 (the scoring kernels).
inline void check_score_float(const at::Tensor& t, const char* op, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op, ": ",
                   name, " must be float32, float16 or bfloat16, got ", dtype_name(dtype));
}

// float32, float16, bfloat16, or float64 (the float64 path exists for gradcheck).
inline bool is_kernel_float(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
         dtype == at::kDouble;
}

inline void check_kernel_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(is_kernel_float(t.scalar_type()), op, ": ", name,
                   " must be float32, float16, bfloat16 or float64, got ",
                   dtype_name(t.scalar_type()));
}

// An optional per-row tensor such as a mask: shape [rows, cols], the given dtype, ref's device.
inline void check_optional_2d(const std::optional<at::Tensor>& t, int64_t rows, int64_t cols,
                              at::ScalarType dtype, const at::Tensor& ref, const char* op,
                              const char* name, const char* layout, const char* ref_name) {
  if (!t.has_value()) return;
  check_rank(*t, 2, op, name, layout);
  check_shape(*t, {rows, cols}, op, name, layout);
  check_dtype(*t, dtype, op, name);
  check_same_device(*t, ref, op, name, ref_name);
}

// ---- cross_attn_scores(q [B, H, T, D], k [B, Hkv, N, D], q_mask [B, T], kv_mask [B, N],
//                        q_pos [B, T])
inline void check_cross_attn_scores_args(const at::Tensor& q, const at::Tensor& k,
                                         std::optional<double> scale,
                                         const std::optional<at::Tensor>& q_mask,
                                         const std::optional<at::Tensor>& kv_mask,
                                         const std::optional<at::Tensor>& q_pos) {
  constexpr const char* op = "cross_attn_scores";
  check_rank(q, 4, op, "q", "[B, H, T, D]");
  check_rank(k, 4, op, "k", "[B, Hkv, N, D]");
  check_score_float(q, op, "q");
  check_same_dtype(k, q, op, "k", "q");
  check_same_device(k, q, op, "k", "q");
  const int64_t batch = q.size(0), heads = q.size(1), queries = q.size(2), dim = q.size(3);
  TORCH_CHECK_VALUE(k.size(0) == batch, op, ": k must have batch size B = ", batch,
                    " like q, got k ", shape_str(k));
  TORCH_CHECK_VALUE(k.size(3) == dim, op, ": k must have head_dim D = ", dim, " like q, got k ",
                    shape_str(k));
  TORCH_CHECK_VALUE(dim >= 1 && dim <= 256, op, ": head_dim D must be in [1, 256], got ", dim);
  TORCH_CHECK_VALUE(k.size(1) >= 1 && heads % k.size(1) == 0, op,
                    ": the number of query heads H = ", heads,
                    " must be a multiple of the number of kv heads Hkv = ", k.size(1));
  TORCH_CHECK_VALUE(!scale.has_value() || (*scale > 0.0 && std::isfinite(*scale)), op,
                    ": scale must be positive and finite, got ", scale.value_or(0.0));
  check_optional_2d(q_mask, batch, queries, at::kBool, q, op, "q_mask", "[B, T]", "q");
  check_optional_2d(kv_mask, batch, k.size(2), at::kBool, q, op, "kv_mask", "[B, N]", "q");
  check_optional_2d(q_pos, batch, queries, at::kLong, q, op, "q_pos", "[B, T]", "q");
}

// ---- weighted_aggregate(x [B, N, C], logits [B, K, N], importance [B, N], mask bool [B, N])
inline void check_weighted_aggregate_args(const at::Tensor& x, const at::Tensor& logits,
                                          const std::optional<at::Tensor>& importance,
                                          const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "weighted_aggregate";
  check_rank(x, 3, op, "x", "[B, N, C]");
  check_rank(logits, 3, op, "logits", "[B, K, N]");
  check_kernel_float(x, op, "x");
  const int64_t batch = x.size(0), tokens = x.size(1);
  TORCH_CHECK_VALUE(logits.size(0) == batch && logits.size(2) == tokens, op,
                    ": logits must have shape [B, K, N] with B = ", batch, " and N = ", tokens,
                    " from x ", shape_str(x), ", got ", shape_str(logits));
  check_kernel_float(logits, op, "logits");
  check_same_device(logits, x, op, "logits", "x");
  if (importance.has_value()) {
    check_rank(*importance, 2, op, "importance", "[B, N]");
    check_shape(*importance, {batch, tokens}, op, "importance", "[B, N]");
    const auto dtype = importance->scalar_type();
    TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble, op,
                     ": importance must be float32 (or float64), got ", dtype_name(dtype));
    check_same_device(*importance, x, op, "importance", "x");
  }
  check_optional_2d(mask, batch, tokens, at::kBool, x, op, "mask", "[B, N]", "x");
}

// ---- memory: the op writes in place, and its kernels write and read in parallel, so two written
// elements must never share memory, nor a written element and a read one.

// (stride, size) of every dimension with more than one element, smallest stride first.
inline std::vector<std::pair<int64_t, int64_t>> sorted_dims(const at::Tensor& t) {
  std::vector<std::pair<int64_t, int64_t>> dims;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  }
  std::sort(dims.begin(), dims.end());
  return dims;
}

// Whether every element of a strided layout has an offset of its own. The test (each dimension
// steps past everything the smaller ones span) holds for every permutation of a slice of a
// contiguous tensor, e.g. a Hugging Face cache seen as .transpose(1, 2) or the key and value
// halves of vLLM's CPU cache; it rejects stride 0 (expand) and overlapping as_strided views.
inline bool layout_is_non_overlapping(std::vector<std::pair<int64_t, int64_t>> dims) {
  std::sort(dims.begin(), dims.end());
  int64_t span = 0;  // the largest offset the smaller dimensions reach
  for (const auto& [stride, size] : dims) {
    if (stride <= span) return false;
    span += stride * (size - 1);
  }
  return true;
}

// [first byte, one past the last byte] that t's elements occupy.
inline std::pair<uintptr_t, uintptr_t> byte_range(const at::Tensor& t) {
  int64_t span = 0;
  for (int64_t d = 0; d < t.dim(); ++d) span += t.stride(d) * (t.size(d) - 1);
  const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  return {begin, begin + static_cast<uintptr_t>((span + 1) * t.element_size())};
}

inline bool share_bytes(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.is_alias_of(b)) return false;
  const auto [a_begin, a_end] = byte_range(a);
  const auto [b_begin, b_end] = byte_range(b);
  return a_begin < b_end && b_begin < a_end;
}

// key_cache and value_cache in one storage: fine when they are disjoint ranges, or the same
// layout at an offset that interleaves them without a shared element (vLLM's CPU cache).
inline bool caches_overlap(const at::Tensor& key_cache, const at::Tensor& value_cache) {
  if (!share_bytes(key_cache, value_cache)) return false;
  if (key_cache.strides() != value_cache.strides()) return true;
  const auto delta = static_cast<int64_t>(byte_range(value_cache).first) -
                     static_cast<int64_t>(byte_range(key_cache).first);
  if (delta == 0 || delta % key_cache.element_size() != 0) return true;
  auto dims = sorted_dims(key_cache);
  dims.emplace_back(std::abs(delta) / key_cache.element_size(), 2);  // the pair as a dimension
  return !layout_is_non_overlapping(dims);
}

inline void check_write_compressed_kv_memory(const at::Tensor& key_cache,
                                             const at::Tensor& value_cache,
                                             const at::Tensor& key, const at::Tensor& value,
                                             const std::optional<at::Tensor>& weights) {
  constexpr const char* op = "write_compressed_kv";
  for (const auto& [cache, name] : {std::pair{&key_cache, "key_cache"},
                                    std::pair{&value_cache, "value_cache"}}) {
    TORCH_CHECK_VALUE(cache->numel() == 0 || layout_is_non_overlapping(sorted_dims(*cache)), op,
                      ": ", name, " has elements that share memory (strides ", cache->strides(),
                      " for shape ", shape_str(*cache),
                      ", e.g. an expanded tensor): it is written in place; pass a tensor whose "
                      "elements are distinct (clone() it)");
  }
  TORCH_CHECK_VALUE(!caches_overlap(key_cache, value_cache), op,
                    ": key_cache and value_cache share memory (the same tensor, or overlapping "
                    "views of one): pass two separate caches");
  for (const auto& [source, name] : {std::pair{&key, "key"}, std::pair{&value, "value"}}) {
    for (const auto& [cache, cache_name] : {std::pair{&key_cache, "key_cache"},
                                            std::pair{&value_cache, "value_cache"}}) {
      TORCH_CHECK_VALUE(!share_bytes(*source, *cache), op, ": ", name, " shares memory with ",
                        cache_name, ", which is written while ", name,
                        " is read: pass a copy (clone()) of it");
    }
  }
  if (weights.has_value()) {
    for (const auto& [cache, cache_name] : {std::pair{&key_cache, "key_cache"},
                                            std::pair{&value_cache, "value_cache"}}) {
      TORCH_CHECK_VALUE(!share_bytes(*weights, *cache), op, ": weights shares memory with ",
                        cache_name, ": pass a copy (clone()) of it");
    }
  }
  // The op is not differentiable and writes in place: refuse what autograd would get wrong
  // silently (as torch's in-place ops do for a leaf, and instead of dropping key's gradient).
  if (c10::GradMode::is_enabled()) {
    for (const auto& [cache, name] : {std::pair{&key_cache, "key_cache"},
                                      std::pair{&value_cache, "value_cache"}}) {
      TORCH_CHECK_VALUE(!cache->requires_grad(), op, ": ", name,
                        " requires grad; the op writes it in place and is not differentiable: "
                        "write under torch.no_grad() or into a tensor that does not require grad");
    }
    for (const auto& [source, name] : {std::pair{&key, "key"}, std::pair{&value, "value"}}) {
      TORCH_CHECK_VALUE(!source->requires_grad(), op, ": ", name,
                        " requires grad, but write_compressed_kv is not differentiable (its "
                        "gradient would be dropped): pass ", name, ".detach() or call it under "
                        "torch.no_grad()");
    }
  }
}

// ---- write_compressed_kv(key_cache [num_blocks, block_size, Hkv, D], value_cache (same shape),
//                          key [B, Hkv, N, D], value (same shape), slot_mapping int64 [B, K],
//                          weights float32 [B, K, N] | index int64 [B, K])
// Structure and memory: out-of-range slots and indices are data-dependent and checked by the
// Python wrapper (the kernels skip them rather than write out of bounds).
inline void check_write_compressed_kv_args(const at::Tensor& key_cache,
                                           const at::Tensor& value_cache,
                                           const at::Tensor& key, const at::Tensor& value,
                                           const at::Tensor& slot_mapping,
                                           const std::optional<at::Tensor>& weights,
                                           const std::optional<at::Tensor>& index) {
  constexpr const char* op = "write_compressed_kv";
  check_rank(key, 4, op, "key", "[B, Hkv, N, D]");
  check_rank(value, 4, op, "value", "[B, Hkv, N, D]");
  check_rank(key_cache, 4, op, "key_cache", "[num_blocks, block_size, Hkv, D]");
  check_rank(value_cache, 4, op, "value_cache", "[num_blocks, block_size, Hkv, D]");
  check_kernel_float(key, op, "key");
  check_kernel_float(key_cache, op, "key_cache");
  check_same_dtype(value, key, op, "value", "key");
  check_same_dtype(value_cache, key_cache, op, "value_cache", "key_cache");
  check_shape(value, key.sizes(), op, "value", "[B, Hkv, N, D] like key");
  const int64_t batch = key.size(0), kv_heads = key.size(1), tokens = key.size(2),
                dim = key.size(3);
  TORCH_CHECK_VALUE(key_cache.size(2) == kv_heads && key_cache.size(3) == dim, op,
                    ": key_cache must have shape [num_blocks, block_size, Hkv, D] with Hkv = ",
                    kv_heads, " and D = ", dim, " from key ", shape_str(key), ", got ",
                    shape_str(key_cache));
  check_shape(value_cache, key_cache.sizes(), op, "value_cache",
              "[num_blocks, block_size, Hkv, D] like key_cache");
  check_same_device(value, key, op, "value", "key");
  check_same_device(key_cache, key, op, "key_cache", "key");
  check_same_device(value_cache, key, op, "value_cache", "key");

  check_rank(slot_mapping, 2, op, "slot_mapping", "[B, K]");
  TORCH_CHECK_VALUE(slot_mapping.size(0) == batch, op,
                    ": slot_mapping must have shape [B, K] with B = ", batch, " from key, got ",
                    shape_str(slot_mapping));
  check_dtype(slot_mapping, at::kLong, op, "slot_mapping");
  check_same_device(slot_mapping, key, op, "slot_mapping", "key");
  const int64_t entries = slot_mapping.size(1);

  TORCH_CHECK_VALUE(weights.has_value() != index.has_value(), op,
                    ": pass exactly one of weights [B, K, N] or index [B, K], got ",
                    weights.has_value() ? "both" : "neither");
  if (index.has_value()) {
    check_rank(*index, 2, op, "index", "[B, K]");
    check_shape(*index, {batch, entries}, op, "index", "[B, K] like slot_mapping");
    check_dtype(*index, at::kLong, op, "index");
    check_same_device(*index, key, op, "index", "key");
  } else {
    check_rank(*weights, 3, op, "weights", "[B, K, N]");
    check_shape(*weights, {batch, entries, tokens}, op, "weights", "[B, K, N]");
    check_dtype(*weights, at::kFloat, op, "weights");
    check_same_device(*weights, key, op, "weights", "key");
  }
  check_write_compressed_kv_memory(key_cache, value_cache, key, value, weights);
}

// ---- write_compressed_kv_layers(key_caches[L], value_caches[L], keys[L], values[L], slot_mapping,
//                                 weights | index): write_compressed_kv for every layer, with one
// slot_mapping and index/weights for all. Each layer passes write_compressed_kv's checks (its
// messages are prefixed with the layer), every layer has layer 0's shapes, strides and dtypes
// (the kernels take one set of sizes), and no layer's cache shares memory with another layer's
// cache, key or value (the layers are written in parallel).
template <typename Error>
[[noreturn]] inline void rethrow_for_layer(const Error& error, size_t layer) {
  throw Error(c10::SourceLocation{__func__, __FILE__, static_cast<uint32_t>(__LINE__)},
              "write_compressed_kv_layers: layer " + std::to_string(layer) + ": " +
                  error.what_without_backtrace());
}

inline bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  return a.sizes() == b.sizes() && a.strides() == b.strides() && a.scalar_type() == b.scalar_type();
}

inline void check_write_compressed_kv_layers_args(at::TensorList key_caches, at::TensorList value_caches,
                                                  at::TensorList keys, at::TensorList values,
                                                  const at::Tensor& slot_mapping,
                                                  const std::optional<at::Tensor>& weights,
                                                  const std::optional<at::Tensor>& index) {
  constexpr const char* op = "write_compressed_kv_layers";
  const size_t layers = keys.size();
  TORCH_CHECK_VALUE(layers > 0, op, ": keys must hold at least one layer, got an empty list");
  TORCH_CHECK_VALUE(values.size() == layers && key_caches.size() == layers && value_caches.size() == layers, op,
                    ": key_caches, value_caches, keys and values must hold one tensor per layer, got ",
                    key_caches.size(), ", ", value_caches.size(), ", ", keys.size(), " and ", values.size());
  for (size_t l = 0; l < layers; ++l) {
    try {
      check_write_compressed_kv_args(key_caches[l], value_caches[l], keys[l], values[l], slot_mapping, weights,
                                     index);
    } catch (const c10::TypeError& error) {
      rethrow_for_layer(error, l);
    } catch (const c10::ValueError& error) {
      rethrow_for_layer(error, l);
    }
  }
  const std::pair<at::TensorList, const char*> lists[] = {
      {key_caches, "key_caches"}, {value_caches, "value_caches"}, {keys, "keys"}, {values, "values"}};
  for (const auto& [list, name] : lists) {
    for (size_t l = 1; l < layers; ++l) {
      TORCH_CHECK_VALUE(same_layout(list[l], list[0]), op, ": ", name, "[", l,
                        "] must have the shape, strides and dtype of ", name, "[0] (", shape_str(list[0]),
                        ", strides ", list[0].strides(), ", ", dtype_name(list[0].scalar_type()), "), got ",
                        shape_str(list[l]), ", strides ", list[l].strides(), ", ",
                        dtype_name(list[l].scalar_type()), "; call write_compressed_kv per layer for layers "
                        "that differ");
    }
  }
  // Another layer's tensors: written caches against every tensor of the other layers. Separate
  // allocations (or slices of one stacked tensor) never share bytes; interleaved views of one
  // tensor are accepted when no element is shared (caches_overlap's layout test).
  for (size_t l = 0; l < layers; ++l) {
    for (const auto& [cache_list, cache_name] : {lists[0], lists[1]}) {
      for (size_t other = 0; other < layers; ++other) {
        if (other == l) continue;
        for (const auto& [list, name] : lists) {
          TORCH_CHECK_VALUE(!caches_overlap(cache_list[l], list[other]), op, ": ", cache_name, "[", l,
                            "] shares memory with ", name, "[", other,
                            "]: every layer needs caches of its own, apart from every layer's key and value");
        }
      }
    }
  }
}

}  // namespace etc_ext
