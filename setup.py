"""Build of etc_ext._C: the CPU kernels always, the CUDA kernels when torch has CUDA and nvcc
is found.

Environment variables:
  ETC_EXT_CUDA=0|1        force the CUDA kernels off or on (default: auto)
  TORCH_CUDA_ARCH_LIST    GPU architectures, e.g. "8.0;9.0" (default: the visible GPUs, or
                          "8.0;9.0" when none is visible so the build never needs a GPU)
  MAX_JOBS                parallel compile jobs (read by torch's ninja build)
  ETC_EXT_CPU_NATIVE=1    compile everything with -march=native (default off: the CPU kernels are
                          compiled for the baseline, AVX2 and AVX-512 and pick one at run time,
                          so a binary built on one machine runs at full speed on another)
  DEBUG=1                 -O0 -g
"""

import glob
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - the message is the point
    sys.exit(
        "etc-ext compiles against the installed PyTorch: install torch first, then build with\n"
        "  pip install --no-build-isolation .\n"
        "(build isolation would hide your torch from the build)."
    )

ROOT = Path(__file__).parent
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def is_cuda_home(path):
    """A CUDA toolkit folder: nvcc and the CUDA runtime library to link against."""
    if not path:
        return False
    root = Path(path)
    has_cudart = any((root / lib / "libcudart.so").exists() for lib in ("lib64", "lib"))
    return (root / "bin" / "nvcc").exists() and has_cudart


def nvcc_toolkit_root():
    """The toolkit of the nvcc on PATH, also when PATH holds a wrapper script rather than
    the real nvcc: nvcc itself reports where it lives (the `_HERE_` line of a dry run)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        dry_run = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        dry_run = None
    for line in (dry_run.stderr + dry_run.stdout).splitlines() if dry_run else []:
        if line.startswith("#$ _HERE_="):
            return str(Path(line.split("=", 1)[1]).resolve().parent)
    return str(Path(nvcc).resolve().parent.parent)


def find_cuda_home():
    """CUDA_HOME from the environment, else the first valid toolkit among torch's guess, the
    toolkit of the nvcc on PATH and /usr/local/cuda."""
    from_env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if from_env:
        return from_env
    for candidate in (CUDA_HOME, nvcc_toolkit_root(), "/usr/local/cuda"):
        if is_cuda_home(candidate):
            return candidate
    return None


def want_cuda():
    flag = os.environ.get("ETC_EXT_CUDA", "auto").lower()
    if flag in ("0", "false", "off"):
        return False
    available = torch.version.cuda is not None and find_cuda_home() is not None
    if flag in ("1", "true", "on"):
        if not available:
            sys.exit(
                "ETC_EXT_CUDA=1 but the CUDA kernels cannot be built: "
                f"torch.version.cuda={torch.version.cuda}, nvcc/CUDA_HOME={find_cuda_home()}"
            )
        return True
    return available


def nvidia_wheel_include_dirs():
    """Headers (cuBLAS, cuSPARSE, ...) that torch's CUDA headers include. A minimal toolkit
    lacks them; the nvidia-* wheels that a CUDA torch depends on ship them."""
    dirs = []
    for base in site.getsitepackages() + [site.getusersitepackages()]:
        dirs += sorted(glob.glob(os.path.join(base, "nvidia", "cu*", "include")))
        dirs += sorted(glob.glob(os.path.join(base, "nvidia", "*", "include")))
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def sources(with_cuda):
    # CMakeLists.txt globs the same patterns.
    files = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    if with_cuda:
        files += sorted(glob.glob("csrc/cuda/*.cu"))
    return files


def extension():
    with_cuda = want_cuda()
    debug = os.environ.get("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # The C++ standard is the one torch asks for. -fno-trapping-math lets GCC if-convert the
    # float compares in the softmax loops, without which they do not vectorize.
    cxx = opt + ["-fopenmp", "-fno-trapping-math"]
    if os.environ.get("ETC_EXT_CPU_NATIVE", "0") == "1":
        cxx.append("-march=native")
    kwargs = dict(
        name="etc_ext._C",
        sources=sources(with_cuda),
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )
    if not with_cuda:
        return CppExtension(**kwargs)

    cuda_home = find_cuda_home()
    os.environ["CUDA_HOME"] = cuda_home
    import torch.utils.cpp_extension as cpp_ext

    cpp_ext.CUDA_HOME = cuda_home  # torch resolved it at import time, maybe before we set it
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    kwargs["include_dirs"] += nvidia_wheel_include_dirs()
    kwargs["extra_compile_args"]["cxx"].append("-DETC_EXT_WITH_CUDA")
    kwargs["extra_compile_args"]["nvcc"] = opt + [
        "-DETC_EXT_WITH_CUDA",
        "--use_fast_math",
        "-lineinfo",
        f"--threads={os.environ.get('NVCC_THREADS', '2')}",
    ]
    return CUDAExtension(**kwargs)


setup(
    packages=find_packages(include=["etc_ext", "etc_ext.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
