// Helpers of the ops' argument checks (csrc/torch_bindings.cpp holds each op's checks): message
// formatting, the checks every op uses, and the memory-overlap tests of the in-place op. ValueError
// for shapes, devices and values, TypeError for dtypes, each message naming the op, the argument
// and what was expected. The fakes' helpers (etc_ext/ops/checks.py) give the same errors under
// torch.compile, with the same wording (dtypes are spelled as Python spells them).
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

}  // namespace etc_ext
