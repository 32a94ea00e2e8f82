"""The etc_ext ops, one module per op: its wrapper (the documented Python entry point), its fake (meta)
implementation for torch.compile and, where it is differentiable, its autograd.

- `cross_attn_scores` (`scores`): text-to-image attention scores without the attention probabilities.
- `weighted_aggregate` and `aggregation_weights` (`aggregate`): softmax-weighted merges of tokens.
- `write_compressed_kv`, `write_compressed_kv_layers` (`kv_write`): compressed entries written into a paged KV
  cache, in place; one layer, or every layer of a cache in one call.
- `cpu_capability`, `use_cpu_capability`, ... (`cpu_capability`): which instruction set (baseline, AVX2, AVX-512)
  the CPU kernels run with, chosen at run time.

The kernels live in csrc/ and are registered as ``torch.ops.etc_ext.<name>``; csrc/torch_bindings.cpp holds every
op's schema and argument checks, written once and mirrored for tracing by each module's fake (helpers in `checks`).
The pure-PyTorch references are in `etc_ext.reference`. Each module's public names (its ``__all__``) are this
package's: a new op is its module, nothing to add here.
"""

import importlib
import pkgutil

__all__ = []
for _info in pkgutil.iter_modules(__path__):
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    for _name in getattr(_module, "__all__", ()):
        globals()[_name] = getattr(_module, _name)
        __all__.append(_name)
del _info, _module, _name
