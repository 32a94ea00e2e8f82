"""The build products a user relies on: the package metadata, the C++ (CMake) build against
libtorch, and the ops example behind `make demo`."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import etc_ext

ROOT = Path(__file__).resolve().parent.parent


def _env_importing_this_etc_ext():
    """Subprocesses import the same etc_ext as the tests do."""
    package_parent = str(Path(etc_ext.__file__).resolve().parent.parent)
    return dict(os.environ, PYTHONPATH=os.pathsep.join([package_parent, os.environ.get("PYTHONPATH", "")]))


def test_version_and_build_flags():
    assert etc_ext.__version__.count(".") == 2
    assert isinstance(etc_ext.built_with_cuda(), bool)
    # The ops are registered with the dispatcher, with a CPU kernel.
    assert torch._C._dispatch_has_kernel_for_dispatch_key("etc_ext::cross_attn_scores", "CPU")
    if etc_ext.built_with_cuda():
        assert torch._C._dispatch_has_kernel_for_dispatch_key("etc_ext::cross_attn_scores", "CUDA")


def test_every_op_has_its_kernels_wrapper_and_reference():
    """What a new op brings (docs/new_baseline_or_op.md): a schema with CPU (and, when built, CUDA) kernels
    registered by csrc/torch_bindings.cpp, a wrapper that `etc_ext.ops` exports from its module's `__all__`, and a
    pure-PyTorch reference with the wrapper's signature."""
    import inspect
    import pkgutil

    from etc_ext import ops, reference

    schemas = {op.name.split("::")[1] for op in torch._C._jit_get_all_schemas() if op.name.startswith("etc_ext::")}
    assert schemas == {"cross_attn_scores", "weighted_aggregate", "write_compressed_kv", "write_compressed_kv_layers"}
    exported = []
    for info in pkgutil.iter_modules(ops.__path__):
        exported += getattr(__import__(f"etc_ext.ops.{info.name}", fromlist=["_"]), "__all__", [])
    assert sorted(ops.__all__) == sorted(exported) and schemas <= set(ops.__all__)
    for name in schemas:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"etc_ext::{name}", "CPU"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"etc_ext::{name}", "CUDA") == etc_ext.built_with_cuda()
        wrapper, oracle = getattr(ops, name), getattr(reference, name)
        wrapper_parameters = [p for p in inspect.signature(wrapper).parameters if p != "check"]
        assert wrapper_parameters == list(inspect.signature(oracle).parameters), name


def test_ops_example_agrees_with_pytorch():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "ops_example.py"), "--batch", "1", "--text", "8", "--repeats", "1", "--device", "cpu"],
        capture_output=True, text=True, check=True, cwd=ROOT, env=_env_importing_this_etc_ext(),
    ).stdout
    assert "top-16 visual tokens identical: True" in out
    assert "KV cache write of 16 kept entries per row identical: True" in out
    merge_error = float(out.split("merged 560 dropped tokens into 1: max |fused - PyTorch| = ")[1].split()[0])
    assert merge_error < 1e-5
    error = float(out.split("max |fused - eager| = ")[1].split()[0])
    assert error < 1e-5


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_cmake_build_and_cpp_example(tmp_path):
    """CMakeLists.txt builds the ops library against libtorch, and the C++ example calls the
    op through the dispatcher and checks it against plain ATen."""
    build = tmp_path / "build"
    env = dict(os.environ, MAKEFLAGS="-j2")
    subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
        check=True, capture_output=True, env=env,
    )
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True, env=env)
    result = subprocess.run([str(build / "cross_attn_scores_example")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "max |op - ATen|" in result.stdout


def test_cpu_kernels_compile_for_aarch64():
    """scripts/check_aarch64_compile.sh: with an AArch64 cross compiler every CPU source compiles (the AVX2/AVX-512
    entries become baseline copies there); without one the script names what to install."""
    script = ROOT / "scripts" / "check_aarch64_compile.sh"
    result = subprocess.run(["bash", str(script), sys.executable], capture_output=True, text=True)
    if shutil.which("aarch64-linux-gnu-g++"):
        assert result.returncode == 0, result.stderr
        sources = list((ROOT / "csrc" / "cpu").glob("*.cpp")) + [ROOT / "csrc" / "torch_bindings.cpp"]
        assert result.stdout.count("aarch64: compiled") == len(sources)
    else:
        assert result.returncode == 2 and "install an AArch64 cross compiler" in result.stderr
