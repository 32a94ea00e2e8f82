"""The CPU kernels' instruction sets (csrc/cpu/cpu_capability.h): every path this machine supports (baseline, AVX2,
AVX-512) against the float64 computations of the op tests, at odd shapes, every dtype, masks, GQA and strided inputs;
and the ways a user picks one (etc_ext.ops.use_cpu_capability, ETC_EXT_CPU_CAPABILITY)."""

import os
import subprocess
import sys

import pytest
import torch
import test_cross_attn_scores as scores_tests
import test_weighted_aggregate as aggregate_tests
import test_write_compressed_kv as kv_tests

from etc_ext import ops, reference

CAPABILITIES = ops.supported_cpu_capabilities()
ALL_CAPABILITIES = ["default", "avx2", "avx512"]


@pytest.fixture(params=CAPABILITIES)
def capability(request):
    with ops.use_cpu_capability(request.param):
        assert ops.cpu_capability() == request.param
        yield request.param


def test_supported_capabilities_and_default_choice():
    assert CAPABILITIES[0] == "default"
    assert CAPABILITIES == [c for c in ALL_CAPABILITIES if c in CAPABILITIES]  # lowest first, known names only
    with ops.use_cpu_capability("default"):
        assert ops.cpu_capability() == "default"
    # The choice without the environment variable: the best one this CPU supports.
    script = "from etc_ext import ops; print(ops.cpu_capability())"
    env = {k: v for k, v in os.environ.items() if k != "ETC_EXT_CPU_CAPABILITY"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == CAPABILITIES[-1]


def test_use_cpu_capability_restores_the_previous_choice():
    before = ops.cpu_capability()
    with pytest.raises(RuntimeError, match="inside"):
        with ops.use_cpu_capability("default"):
            raise RuntimeError("inside")
    assert ops.cpu_capability() == before


def test_unknown_or_unsupported_capability_raises():
    before = ops.cpu_capability()
    with pytest.raises(ValueError, match="must be one of default, avx2, avx512, got 'avx1024'"):
        ops.set_cpu_capability("avx1024")
    with pytest.raises(TypeError, match="name must be a str"):
        ops.set_cpu_capability(2)
    for name in set(ALL_CAPABILITIES) - set(CAPABILITIES):  # only on a CPU without AVX2 / AVX-512
        with pytest.raises(ValueError, match=f"asks for the {name} kernels, but this CPU supports only"):
            ops.set_cpu_capability(name)
    assert ops.cpu_capability() == before


@pytest.mark.parametrize("name", CAPABILITIES)
def test_environment_variable_selects_the_kernels(name):
    script = (
        "import torch; from etc_ext import ops; "
        "out = ops.weighted_aggregate(torch.randn(1, 5, 40).bfloat16(), torch.randn(1, 9, 5)); "
        "print(ops.cpu_capability(), out.shape[1])"
    )
    env = dict(os.environ, ETC_EXT_CPU_CAPABILITY=name)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [name, "9"]


def test_bad_environment_variable_is_a_clear_error():
    script = "import torch; from etc_ext import ops; ops.weighted_aggregate(torch.randn(1, 5, 4), torch.randn(1, 2, 5))"
    env = dict(os.environ, ETC_EXT_CPU_CAPABILITY="sse9")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert out.returncode != 0
    assert "ETC_EXT_CPU_CAPABILITY must be one of default, avx2, avx512, got 'sse9'" in out.stderr


# ------------------------------------------------------------------ weighted_aggregate
# (B, N, C, K): the streaming path (K <= 4) and the packed one (row blocks of 6 and 8 with remainders), token chunks
# (N > 256), partial channel tiles and chunks, and two row groups (N = 3000: 24 rows of weights per group).
AGGREGATE_SHAPES = [(2, 7, 5, 1), (2, 577, 131, 3), (1, 300, 1100, 7), (3, 33, 257, 16), (1, 577, 96, 20),
                    (1, 3000, 40, 30)]  # fmt: skip


@pytest.mark.parametrize("dtype", aggregate_tests.DTYPES + [torch.float64])
@pytest.mark.parametrize("shape", AGGREGATE_SHAPES)
@torch.inference_mode()
def test_weighted_aggregate_every_capability(capability, dtype, shape):
    batch, tokens, channels, rows = shape
    x, logits, importance, mask = aggregate_tests.make_inputs(batch, tokens, rows, channels, dtype, "cpu", seed=3)
    out = ops.weighted_aggregate(x, logits, importance, mask)
    aggregate_tests.assert_close_to_float64(out, x, logits, importance, mask)


@pytest.mark.parametrize("dtype", aggregate_tests.DTYPES)
@torch.inference_mode()
def test_weighted_aggregate_strided_every_capability(capability, dtype):
    # x as a [B, C, N] buffer seen as [B, N, C] (channel stride != 1), and a token-strided view.
    x_cn = torch.randn(2, 70, 45).to(dtype)
    x = x_cn.transpose(1, 2)
    logits = torch.randn(2, 9, 45)
    out = ops.weighted_aggregate(x, logits)
    aggregate_tests.assert_close_to_float64(out, x, logits, None, None)
    x_wide = torch.randn(2, 90, 70).to(dtype)[:, ::2]
    out = ops.weighted_aggregate(x_wide, logits)
    aggregate_tests.assert_close_to_float64(out, x_wide, logits, None, None)


# ------------------------------------------------------------------ cross_attn_scores
# Narrow and wide panels of every instruction set (query rows per kv head g * T from 1 to 40: one panel, several,
# a slab remainder), GQA, odd N and D.
SCORE_SHAPES = [(1, 1, 1, 1, 1, 1), (2, 4, 2, 5, 577, 33), (3, 16, 8, 9, 100, 128), (1, 4, 4, 40, 61, 64),
                (1, 6, 2, 7, 13, 256)]  # fmt: skip


@pytest.mark.parametrize("dtype", scores_tests.DTYPES)
@pytest.mark.parametrize("shape", SCORE_SHAPES)
@pytest.mark.parametrize("with_masks", [False, True])
def test_cross_attn_scores_every_capability(capability, dtype, shape, with_masks):
    q, k, masks = scores_tests.make_inputs(shape, dtype, "cpu", with_masks, seed=4)
    out = ops.cross_attn_scores(q, k, **masks)
    rtol, atol = scores_tests.TOLERANCES[dtype]
    torch.testing.assert_close(out, scores_tests.float64_scores(q, k, **masks), rtol=rtol, atol=atol)


def test_cross_attn_scores_strided_every_capability(capability):
    q = torch.randn(2, 6, 8, 64).transpose(1, 2)  # [B, H, T, D] from [B, T, H, D]
    k = torch.randn(2, 4, 140, 128)[:, :, 3:134, ::2]
    q_pos = torch.randint(0, 131, (2, 6))
    out = ops.cross_attn_scores(q, k, q_pos=q_pos)
    torch.testing.assert_close(out, scores_tests.float64_scores(q, k, q_pos=q_pos), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ write_compressed_kv
@pytest.mark.parametrize("dtype", kv_tests.DTYPES)
@pytest.mark.parametrize("cache_dtype", kv_tests.DTYPES)
@torch.inference_mode()
def test_write_compressed_kv_index_every_capability(capability, dtype, cache_dtype):
    """Copies with and without a dtype conversion, paged cache (runs of contiguous rows) and a strided one."""
    key, value = kv_tests.make_kv(2, 3, 19, 17, dtype, "cpu", seed=5)
    index = torch.stack([torch.arange(2, 12), torch.randperm(19)[:10]])
    slots = kv_tests.make_slots(2, 10, kv_tests.NUM_BLOCKS * kv_tests.BLOCK_SIZE, "cpu", seed=5)
    for transposed in (False, True):
        key_cache, value_cache = kv_tests.make_paged_cache(3, 17, cache_dtype, "cpu", seed=5)
        if transposed:  # strided cache: [num_blocks, Hkv, block_size, D] seen as [num_blocks, block_size, Hkv, D]
            key_cache = key_cache.transpose(1, 2).contiguous().transpose(1, 2)
            value_cache = value_cache.transpose(1, 2).contiguous().transpose(1, 2)
        expected_key, expected_value = key_cache.clone(), value_cache.clone()
        reference.write_compressed_kv(expected_key, expected_value, key, value, slots, index=index)
        ops.write_compressed_kv(key_cache, value_cache, key, value, slots, index=index)
        assert torch.equal(key_cache, expected_key) and torch.equal(value_cache, expected_value)
