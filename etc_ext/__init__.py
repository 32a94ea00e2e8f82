"""etc-ext: ETC (Extreme Token Compression) for vision-language models.

Fused C++/CUDA ops registered as ``torch.ops.etc_ext.*`` and wrapped in :mod:`etc_ext.ops`;
their pure-PyTorch references live in :mod:`etc_ext.reference`.
"""

__version__ = "0.1.0"

import torch  # noqa: F401  (loads libc10/libtorch, which etc_ext._C links against)

try:
    from . import _C  # noqa: F401  (loads the library and registers torch.ops.etc_ext.*)
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError(
        "etc_ext's compiled module etc_ext._C could not be loaded "
        f"({error}). Build it against your installed torch with\n"
        "    pip install --no-build-isolation .        (or `-e .` for development)\n"
        "from the etc-ext source tree; `make test` does this in a fresh virtual environment. "
        "If you run Python from the source tree after a non-editable install, the source "
        "package (without _C) shadows the installed one: run from another directory."
    ) from error

from . import ops, reference  # noqa: E402
from .config import ETCConfig  # noqa: E402


def built_with_cuda() -> bool:
    """True if the CUDA kernels were compiled into etc_ext._C."""
    return bool(_C.built_with_cuda())


__all__ = ["__version__", "ETCConfig", "built_with_cuda", "ops", "reference"]
