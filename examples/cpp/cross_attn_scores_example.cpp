// Calls etc_ext::cross_attn_scores through the PyTorch dispatcher from C++ (no Python) and
// checks it against the same math written with plain ATen ops. Exits non-zero on mismatch.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <iostream>
#include <optional>

int main() {
  using OptTensor = std::optional<at::Tensor>;
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("etc_ext::cross_attn_scores", "")
                .typed<at::Tensor(const at::Tensor&, const at::Tensor&, std::optional<double>,
                                  const OptTensor&, const OptTensor&, const OptTensor&)>();

  at::manual_seed(0);
  const int64_t batch = 2, heads = 8, kv_heads = 4, queries = 5, keys = 37, dim = 64;
  at::Tensor q = at::randn({batch, heads, queries, dim});   // instruction queries
  at::Tensor k = at::randn({batch, kv_heads, keys, dim});   // visual keys
  at::Tensor scores = op.call(q, k, std::nullopt, std::nullopt, std::nullopt, std::nullopt);

  // Plain ATen: GQA expansion, softmax over keys, mean over heads and queries.
  at::Tensor k_full = k.repeat_interleave(heads / kv_heads, /*dim=*/1);
  at::Tensor probs = at::softmax(at::matmul(q, k_full.transpose(-1, -2)) / std::sqrt(double(dim)), -1);
  at::Tensor expected = probs.mean({1, 2});

  const double max_error = (scores - expected).abs().max().item<double>();
  std::cout << "etc_ext::cross_attn_scores " << scores.sizes() << ", max |op - ATen| = " << max_error
            << ", row sums " << scores.sum(1) << std::endl;
  return max_error < 1e-5 ? 0 : 1;
}
