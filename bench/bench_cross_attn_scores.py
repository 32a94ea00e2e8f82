"""cross_attn_scores: the fused op vs the eager reference vs torch.compile(reference), and
the q.k^T matmul alone (the floor the fused op should approach).

    pytest bench/bench_cross_attn_scores.py --benchmark-only
    python bench/run.py          # the same comparison as one table, plus memory
"""

import pytest
import torch
from common import SCORE_SHAPES, score_inputs

from etc_ext import ops, reference

# One compiled graph per (shape, dtype, forward or backward): more than dynamo's default recompile limit of 8, past
# which it would silently run the eager reference in the compile column.
torch._dynamo.config.recompile_limit = 64
_compiled_reference = None


def compiled_reference(*args, **kwargs):
    global _compiled_reference
    if _compiled_reference is None:
        _compiled_reference = torch.compile(reference.cross_attn_scores, dynamic=False)
    return _compiled_reference(*args, **kwargs)


def matmul_floor(q, k):
    """Only the q.k^T products the op must compute (GQA folded into the batch)."""
    batch, heads, queries, dim = q.shape
    kv_heads = k.shape[1]
    q_groups = q.reshape(batch * kv_heads, heads // kv_heads * queries, dim)
    return torch.bmm(q_groups, k.reshape(batch * kv_heads, -1, dim).transpose(1, 2))


PATHS = {
    "ours": ops.cross_attn_scores,
    "eager": reference.cross_attn_scores,
    "compile": compiled_reference,
    "matmul": matmul_floor,
}


# Used by common.peak_extra_memory_bytes in a fresh process.
def memory_probe_inputs(batch, heads, kv_heads, queries, keys, dim, dtype="float32", device="cpu"):
    return score_inputs(batch, heads, kv_heads, queries, keys, dim, dtype=getattr(torch, dtype), device=device)


def memory_ours(q, k):
    return ops.cross_attn_scores(q, k)


def memory_eager(q, k):
    return reference.cross_attn_scores(q, k)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("shape", SCORE_SHAPES, ids=[s[0] for s in SCORE_SHAPES])
def test_forward(benchmark, shape, path):
    q, k = score_inputs(*shape[1:])
    benchmark.group = f"cross_attn_scores forward {shape[0]}"
    fn = PATHS[path]
    fn(q, k)  # warm-up (compilation)
    benchmark(fn, q, k)


@pytest.mark.parametrize("path", ["ours", "eager", "compile"])
@pytest.mark.parametrize("shape", SCORE_SHAPES[:2], ids=[s[0] for s in SCORE_SHAPES[:2]])
def test_forward_backward(benchmark, shape, path):
    q, k = score_inputs(*shape[1:], requires_grad=True)
    grad = torch.randn(shape[1], shape[5])
    fn = PATHS[path]
    benchmark.group = f"cross_attn_scores fwd+bwd {shape[0]}"

    def step():
        q.grad = k.grad = None
        fn(q, k).backward(grad)

    step()
    benchmark(step)
