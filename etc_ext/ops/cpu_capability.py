"""The instruction set the CPU kernels run with.

Every CPU kernel is compiled for the baseline target ('default': SSE2 on x86-64, NEON on AArch64), 'avx2'
(x86-64-v3: AVX2, FMA, F16C) and 'avx512' (x86-64-v4: AVX-512 F/BW/DQ/VL) into one binary, and the best one the
CPU supports runs (csrc/cpu/cpu_capability.h). To run a lower one, e.g. to compare them or to see what a user with
an older CPU gets:

    ETC_EXT_CPU_CAPABILITY=avx2 python ...            # for the whole process, read at the first kernel call

    with etc_ext.ops.use_cpu_capability("avx2"):       # for a block of code
        ...

An unknown name, or one the CPU does not support, raises ValueError. The setting is process-wide (all threads).
"""

import contextlib

from .. import _C

__all__ = ["cpu_capability", "supported_cpu_capabilities", "set_cpu_capability", "use_cpu_capability"]


def cpu_capability() -> str:
    """'default', 'avx2' or 'avx512': what the CPU kernels run with now."""
    return _C.cpu_capability()


def supported_cpu_capabilities() -> list:
    """The instruction sets this CPU supports, lowest first, e.g. ['default', 'avx2', 'avx512']."""
    return list(_C.supported_cpu_capabilities())


def set_cpu_capability(name: str) -> None:
    """Makes the CPU kernels run with `name` (one of `supported_cpu_capabilities()`) from now on."""
    if not isinstance(name, str):
        raise TypeError(f"set_cpu_capability: name must be a str ('default', 'avx2', 'avx512'), got {type(name).__name__}")
    _C.set_cpu_capability(name)


@contextlib.contextmanager
def use_cpu_capability(name: str):
    """Runs the CPU kernels with `name` inside the block, then restores the previous choice."""
    previous = cpu_capability()
    set_cpu_capability(name)
    try:
        yield
    finally:
        set_cpu_capability(previous)
