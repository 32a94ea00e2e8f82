"""Prints what the build produced; with ETC_EXT_REQUIRE_CUDA=1 fails unless the CUDA kernels
were compiled in (CI uses this so that a silent CPU-only fallback cannot pass)."""

import os
import sys

import torch

import etc_ext

print(
    f"etc_ext {etc_ext.__version__}: built_with_cuda={etc_ext.built_with_cuda()}, "
    f"torch {torch.__version__} (cuda {torch.version.cuda}), GPU available={torch.cuda.is_available()}"
)
if os.environ.get("ETC_EXT_REQUIRE_CUDA") == "1" and not etc_ext.built_with_cuda():
    sys.exit("ETC_EXT_REQUIRE_CUDA=1 but etc_ext was built without its CUDA kernels")
