// The etc_ext ops in one place, each with its schema, its argument checks and its registration
// for CPU and CUDA: the ops' contract, written once (as flash-attention's flash_api.cpp holds all
// validation). ValueError for shapes, devices and values, TypeError for dtypes, each message naming
// the op, the argument and what was expected; the fakes in etc_ext/ops/ give the same errors under
// torch.compile with the same wording. The kernels (csrc/cpu/<op>.cpp, csrc/cuda/<op>.cu) only
// compute, on arguments checked here; their declarations are below, as nothing else calls them.
#include "checks.h"

#include <torch/library.h>

#include <limits>

namespace etc_ext {

// ================================================================================== the kernels
at::Tensor cross_attn_scores_cpu(const at::Tensor& q, const at::Tensor& k, std::optional<double> scale,
                                 const std::optional<at::Tensor>& q_mask, const std::optional<at::Tensor>& kv_mask,
                                 const std::optional<at::Tensor>& q_pos);
void weighted_aggregate_cpu(const at::Tensor& x, const at::Tensor& logits, const at::Tensor& bias, at::Tensor& out);
void write_compressed_kv_layers_cpu(at::TensorList key_caches, at::TensorList value_caches, at::TensorList keys,
                                    at::TensorList values, const at::Tensor& slot_mapping,
                                    const std::optional<at::Tensor>& weights, const std::optional<at::Tensor>& index);
#ifdef ETC_EXT_WITH_CUDA
at::Tensor cross_attn_scores_cuda(const at::Tensor& q, const at::Tensor& k, std::optional<double> scale,
                                  const std::optional<at::Tensor>& q_mask, const std::optional<at::Tensor>& kv_mask,
                                  const std::optional<at::Tensor>& q_pos);
void weighted_aggregate_cuda(const at::Tensor& x, const at::Tensor& logits, const at::Tensor& bias, at::Tensor& out);
void write_compressed_kv_layers_cuda(at::TensorList key_caches, at::TensorList value_caches, at::TensorList keys,
                                     at::TensorList values, const at::Tensor& slot_mapping,
                                     const std::optional<at::Tensor>& weights,
                                     const std::optional<at::Tensor>& index);
#endif

namespace {

// ================================================================================== the checks
// ---- cross_attn_scores(q [B, H, T, D], k [B, Hkv, N, D], q_mask [B, T], kv_mask [B, N],
//                        q_pos [B, T])
void check_cross_attn_scores_args(const at::Tensor& q, const at::Tensor& k,
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
void check_weighted_aggregate_args(const at::Tensor& x, const at::Tensor& logits,
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

// ---- write_compressed_kv's memory: it writes in place, and its kernels write and read in
// parallel, so two written elements must never share memory, nor a written element and a read one
// (checks.h's layout tests).
void check_write_compressed_kv_memory(const at::Tensor& key_cache,
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
void check_write_compressed_kv_args(const at::Tensor& key_cache,
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
[[noreturn]] void rethrow_for_layer(const Error& error, size_t layer) {
  throw Error(c10::SourceLocation{__func__, __FILE__, static_cast<uint32_t>(__LINE__)},
              "write_compressed_kv_layers: layer " + std::to_string(layer) + ": " +
                  error.what_without_backtrace());
}

bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  return a.sizes() == b.sizes() && a.strides() == b.strides() && a.scalar_type() == b.scalar_type();
}

void check_write_compressed_kv_layers_args(at::TensorList key_caches, at::TensorList value_caches,
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

// ================================================================================== the entries
// One per op, for both backends: the checks, then the backend's kernel.

template <auto kernel>
at::Tensor cross_attn_scores(const at::Tensor& q,  // [B, H, T, D]
                             const at::Tensor& k,  // [B, Hkv, N, D]
                             std::optional<double> scale,
                             const std::optional<at::Tensor>& q_mask,   // bool [B, T]
                             const std::optional<at::Tensor>& kv_mask,  // bool [B, N]
                             const std::optional<at::Tensor>& q_pos) {  // int64 [B, T]
  check_cross_attn_scores_args(q, k, scale, q_mask, kv_mask, q_pos);
  return kernel(q, k, scale, q_mask, kv_mask, q_pos);
}

// The kernels get the softmax's inputs in the accumulation type (float32, or float64 for float64
// x): logits [B, K, N] and bias [B, N] = log(importance) at valid tokens, -inf elsewhere, both
// contiguous and small next to x, which they read in its own dtype.
template <auto kernel>
at::Tensor weighted_aggregate(const at::Tensor& x,       // [B, N, C]
                              const at::Tensor& logits,  // [B, K, N]
                              const std::optional<at::Tensor>& importance,  // float32 [B, N]
                              const std::optional<at::Tensor>& mask) {      // bool [B, N]
  check_weighted_aggregate_args(x, logits, importance, mask);
  const int64_t batch = x.size(0), tokens = x.size(1), channels = x.size(2);
  at::Tensor out = at::empty({batch, logits.size(1), channels}, x.options());
  if (out.numel() == 0) return out;
  if (tokens == 0) return out.zero_();
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor bias = at::zeros({batch, tokens}, x.options().dtype(acc_dtype));
  if (importance.has_value()) {
    const at::Tensor imp = importance->to(acc_dtype);
    const double tiny = acc_dtype == at::kDouble ? std::numeric_limits<double>::min()
                                                 : std::numeric_limits<float>::min();
    bias = at::where(imp > 0, imp.clamp_min(tiny).log(), -std::numeric_limits<double>::infinity());
  }
  if (mask.has_value()) {
    bias = bias.masked_fill(mask->logical_not(), -std::numeric_limits<double>::infinity());
  }
  kernel(x, logits.to(acc_dtype).contiguous(), bias.contiguous(), out);
  return out;
}

// Out-of-range slots and indices are data-dependent: the Python wrapper checks them (check=True);
// the kernels skip them rather than write out of bounds, so check=False (CUDA graphs) stays safe.
template <auto write_layers>
void write_compressed_kv(at::Tensor& key_cache,    // [num_blocks, block_size, Hkv, D]
                         at::Tensor& value_cache,  // [num_blocks, block_size, Hkv, D]
                         const at::Tensor& key,    // [B, Hkv, N, D]
                         const at::Tensor& value,  // [B, Hkv, N, D]
                         const at::Tensor& slot_mapping,            // int64 [B, K]
                         const std::optional<at::Tensor>& weights,  // float32 [B, K, N]
                         const std::optional<at::Tensor>& index) {  // int64 [B, K]
  check_write_compressed_kv_args(key_cache, value_cache, key, value, slot_mapping, weights, index);
  write_layers({key_cache}, {value_cache}, {key}, {value}, slot_mapping, weights, index);
}

template <auto write_layers>
void write_compressed_kv_layers(at::TensorList key_caches,    // L x [num_blocks, block_size, Hkv, D]
                                at::TensorList value_caches,  // L x [num_blocks, block_size, Hkv, D]
                                at::TensorList keys,          // L x [B, Hkv, N, D]
                                at::TensorList values,        // L x [B, Hkv, N, D]
                                const at::Tensor& slot_mapping,            // int64 [B, K]
                                const std::optional<at::Tensor>& weights,  // float32 [B, K, N]
                                const std::optional<at::Tensor>& index) {  // int64 [B, K]
  check_write_compressed_kv_layers_args(key_caches, value_caches, keys, values, slot_mapping, weights, index);
  write_layers(key_caches, value_caches, keys, values, slot_mapping, weights, index);
}

}  // namespace
}  // namespace etc_ext

// ================================================================================== the schemas
TORCH_LIBRARY(etc_ext, m) {
  // Mean text-to-image attention probability of every key, averaged over heads and valid
  // queries, without materializing the [B, H, T, N] probabilities.
  // q: [B, H, T, D], k: [B, Hkv, N, D], q_mask: bool [B, T], kv_mask: bool [B, N],
  // q_pos: int64 [B, T] -> float32 [B, N]
  m.def(
      "cross_attn_scores(Tensor q, Tensor k, float? scale=None, Tensor? q_mask=None, "
      "Tensor? kv_mask=None, Tensor? q_pos=None) -> Tensor");
  // K softmax-weighted sums of the N tokens of x, the softmax over valid n of
  // logits + log(importance), computed in one pass without writing the weights.
  // x: [B, N, C], logits: [B, K, N], importance: float32 [B, N], mask: bool [B, N]
  // -> [B, K, C] (dtype of x)
  m.def(
      "weighted_aggregate(Tensor x, Tensor logits, Tensor? importance=None, "
      "Tensor? mask=None) -> Tensor");
  // Writes K entries per batch row, copied (index) or merged (weights) from one layer's
  // key/value, into the slots slot_mapping names of a paged cache, in place; slot -1 skips.
  // key_cache, value_cache: [num_blocks, block_size, Hkv, D], key, value: [B, Hkv, N, D],
  // slot_mapping: int64 [B, K], weights: float32 [B, K, N], index: int64 [B, K]
  m.def(
      "write_compressed_kv(Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor key, "
      "Tensor value, Tensor slot_mapping, *, Tensor? weights=None, Tensor? index=None) -> ()");
  // write_compressed_kv for the L layers of a cache in one call (ETC's compaction after the
  // prefill), with one slot_mapping and weights/index for all layers; every layer has the
  // shapes, strides and dtypes of layer 0.
  m.def(
      "write_compressed_kv_layers(Tensor(a!)[] key_caches, Tensor(b!)[] value_caches, "
      "Tensor[] keys, Tensor[] values, Tensor slot_mapping, *, Tensor? weights=None, "
      "Tensor? index=None) -> ()");
}

TORCH_LIBRARY_IMPL(etc_ext, CPU, m) {
  using namespace etc_ext;
  m.impl("cross_attn_scores", &cross_attn_scores<cross_attn_scores_cpu>);
  m.impl("weighted_aggregate", &weighted_aggregate<weighted_aggregate_cpu>);
  m.impl("write_compressed_kv", &write_compressed_kv<write_compressed_kv_layers_cpu>);
  m.impl("write_compressed_kv_layers", &write_compressed_kv_layers<write_compressed_kv_layers_cpu>);
}

#ifdef ETC_EXT_WITH_CUDA
TORCH_LIBRARY_IMPL(etc_ext, CUDA, m) {
  using namespace etc_ext;
  m.impl("cross_attn_scores", &cross_attn_scores<cross_attn_scores_cuda>);
  m.impl("weighted_aggregate", &weighted_aggregate<weighted_aggregate_cuda>);
  m.impl("write_compressed_kv", &write_compressed_kv<write_compressed_kv_layers_cuda>);
  m.impl("write_compressed_kv_layers", &write_compressed_kv_layers<write_compressed_kv_layers_cuda>);
}
#endif

// The Python module etc_ext._C: importing it loads this library and registers the ops.
// The CMake build for C++ users has no Python and leaves it out.
#ifdef TORCH_EXTENSION_NAME
#include "cpu/cpu_capability.h"

#include <torch/extension.h>

namespace {
bool built_with_cuda() {
#ifdef ETC_EXT_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "etc_ext compiled ops (registered as torch.ops.etc_ext.*)";
  m.def("built_with_cuda", &built_with_cuda, "True if the CUDA kernels were compiled in.");
  // The instruction set of the CPU kernels (csrc/cpu/cpu_capability.h), by name.
  m.def("cpu_capability", [] { return std::string(etc_ext::cpu_capability_name(etc_ext::cpu_capability())); },
        "The instruction set the CPU kernels run with: 'default', 'avx2' or 'avx512'.");
  m.def("supported_cpu_capabilities", [] {
    std::vector<std::string> names;
    for (const auto c : etc_ext::supported_cpu_capabilities()) names.emplace_back(etc_ext::cpu_capability_name(c));
    return names;
  }, "The instruction sets this CPU supports, lowest first.");
  m.def("set_cpu_capability", [](const std::string& name) {
    const auto parsed = etc_ext::parse_cpu_capability(name);
    TORCH_CHECK_VALUE(parsed.has_value(), "cpu capability must be one of default, avx2, avx512, got '", name, "'");
    etc_ext::set_cpu_capability(*parsed);
  }, "Makes the CPU kernels run with the named instruction set (one this CPU supports).");
}
#endif
