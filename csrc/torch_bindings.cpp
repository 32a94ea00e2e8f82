// Operator schemas of the etc_ext library and their CPU implementations. The CUDA
// implementations register themselves in csrc/cuda/*.cu with TORCH_LIBRARY_IMPL.
#include "ops.h"

#include <torch/library.h>

TORCH_LIBRARY(etc_ext, m) {
  // Mean text-to-image attention probability of every key, averaged over heads and valid
  // queries, without materializing the [B, H, T, N] probabilities.
  // q: [B, H, T, D], k: [B, Hkv, N, D], q_mask: bool [B, T], kv_mask: bool [B, N],
  // q_pos: int64 [B, T] -> float32 [B, N]
  m.def(
      "cross_attn_scores(Tensor q, Tensor k, float? scale=None, Tensor? q_mask=None, "
      "Tensor? kv_mask=None, Tensor? q_pos=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(etc_ext, CPU, m) {
  m.impl("cross_attn_scores", &etc_ext::cross_attn_scores_cpu);
}

// The Python module etc_ext._C: importing it loads this library and registers the ops.
// The CMake build for C++ users has no Python and leaves it out.
#ifdef TORCH_EXTENSION_NAME
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
}
#endif
