// Operator schemas of the etc_ext library, all of them. Each kernel file registers its
// implementation with TORCH_LIBRARY_IMPL: csrc/cpu/<op>.cpp for CPU, csrc/cuda/<op>.cu for
// CUDA (as the kernels' declarations are needed nowhere else, there is no header of them).
#include <torch/library.h>

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
