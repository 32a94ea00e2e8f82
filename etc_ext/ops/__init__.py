"""The etc_ext ops, one module per op: its wrapper (the documented Python entry point), its fake (meta)
implementation for torch.compile and, where it is differentiable, its autograd.

- `cross_attn_scores` (`scores`): text-to-image attention scores without the attention probabilities.
- `weighted_aggregate` and `aggregation_weights` (`aggregate`): softmax-weighted merges of tokens.
- `write_compressed_kv`, `write_compressed_kv_layers` (`kv_write`): compressed entries written into a paged KV
  cache, in place; one layer, or every layer of a cache in one call.
- `cpu_capability`, `use_cpu_capability`, ... (`cpu_capability`): which instruction set (baseline, AVX2, AVX-512)
  the CPU kernels run with, chosen at run time.

The kernels live in csrc/ and are registered as ``torch.ops.etc_ext.<name>`` (schemas in csrc/torch_bindings.cpp);
their argument checks are written once, in csrc/checks.h, and mirrored for tracing by `checks` (the fakes'). The
pure-PyTorch references are in `etc_ext.reference`.
"""

from .aggregate import aggregation_weights, weighted_aggregate
from .cpu_capability import cpu_capability, set_cpu_capability, supported_cpu_capabilities, use_cpu_capability
from .kv_write import write_compressed_kv, write_compressed_kv_layers
from .scores import _cross_attn_scores_backward, cross_attn_scores  # noqa: F401  (the backward: tests gradcheck it)

__all__ = [
    "cross_attn_scores",
    "weighted_aggregate",
    "aggregation_weights",
    "write_compressed_kv",
    "write_compressed_kv_layers",
    "cpu_capability",
    "supported_cpu_capabilities",
    "set_cpu_capability",
    "use_cpu_capability",
]
