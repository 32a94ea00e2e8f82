"""ETC under `torch.compile`: its dispatch runs outside the compiled region, the language model inside it.

Each call of an ETC model decides from the data what to run: where each image's tokens are, the extended layout with
the compression tokens, which passes (segmented or masked prefill, decoding, the original forward), the compacted
cache's state. That is Python reading tensor values (`.item()`, `nonzero`, `bincount`, `.tolist()`), on which
dynamo can only break the graph, trace the pieces between the breaks and guard on the values it read. So:

- `host_side(fn)`: `fn` and everything it calls run eagerly (bookkeeping that calls no module of the model).
- `dispatch(fn)`: `fn`'s own body runs eagerly, while the functions and modules it calls are still compiled: the
  language model's passes, the lm head, the original forward for text.

Eagerly, both cost nothing worth measuring (a flag on the code object, or one context switch per call).
"""

import torch

__all__ = ["dispatch", "host_side"]


def host_side(fn):
    """Run `fn`, and all it calls, eagerly under torch.compile."""
    return torch.compiler.disable(fn, recursive=True)


def dispatch(fn):
    """Run `fn`'s own frame eagerly under torch.compile; what it calls is compiled as usual."""
    return torch.compiler.disable(fn, recursive=False)
