"""`cross_attn_scores`: the op's wrapper, its fake (meta) implementation and its autograd.

The kernels are csrc/cpu/cross_attn_scores.cpp and csrc/cuda/cross_attn_scores.cu, their schema and checks csrc/torch_bindings.cpp; the
pure-PyTorch reference is `etc_ext.reference.cross_attn_scores`.
"""

import math
from typing import Optional

import torch

from .. import reference
from . import checks
from .checks import (
    SCORE_FLOATS, check_dtype_in, check_optional_2d, check_rank, check_same_device, check_same_dtype, shape,
)

__all__ = ["cross_attn_scores"]


def cross_attn_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: Optional[float] = None,
    q_mask: Optional[torch.Tensor] = None,
    kv_mask: Optional[torch.Tensor] = None,
    q_pos: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Text-to-image attention scores without materializing the attention probabilities.

    Args:
        q: `(B, H, T, D)` queries of the instruction tokens at one layer (after RoPE).
        k: `(B, Hkv, N, D)` keys at that layer: the visual tokens only, or the layer's whole
            key sequence (then pass `q_pos`). H % Hkv == 0 (GQA); D <= 256.
        scale: softmax scale (> 0), defaults to D ** -0.5.
        q_mask: bool `(B, T)`, True = real text token.
        kv_mask: bool `(B, N)`, True = valid key.
        q_pos: int64 `(B, T)`, index in k of each query: key n is visible to query t only if
            n <= q_pos[b, t] (causal masking).

    Returns:
        float32 `(B, N)`: softmax probability of each key averaged over all heads and valid
        queries. A row with no valid query gets the uniform distribution over valid keys; a
        row with no valid key gets zeros. Differentiable w.r.t. q and k.
    """
    checks.require_tensor(q, "cross_attn_scores", "q", "[B, H, T, D]")
    checks.require_tensor(k, "cross_attn_scores", "k", "[B, Hkv, N, D]")
    return torch.ops.etc_ext.cross_attn_scores.default(q, k, scale, q_mask, kv_mask, q_pos)


@torch.library.register_fake("etc_ext::cross_attn_scores")
def _cross_attn_scores_fake(q, k, scale=None, q_mask=None, kv_mask=None, q_pos=None):
    check_cross_attn_scores_args(q, k, scale, q_mask, kv_mask, q_pos)
    return q.new_empty((q.shape[0], k.shape[2]), dtype=torch.float32)


# Probabilities recomputed per block by the backward pass: blocks of (batch rows, kv heads) whose
# [G*T, N] slices fit this many bytes (at least one of each), so that the extra memory stays
# bounded. On the CPU the elementwise passes over a block then run from cache; inference shapes
# (B=1, T~32) run as one block. A GPU has no cache to fit but pays ~10 launches per block: its
# blocks are 64x larger (the LLaVA-7B training shape, 604 MB of fp32 probabilities, in 3 blocks).
_BACKWARD_BLOCK_BYTES = 4 * 2**20
_GPU_BLOCK_FACTOR = 64


def _backward_blocks(batch: int, kv_heads: int, slice_bytes: int, device: torch.device) -> tuple[int, int]:
    """(batch rows, kv heads) per block for [G*T, N] slices of `slice_bytes` each."""
    budget = _BACKWARD_BLOCK_BYTES * (1 if device.type == "cpu" else _GPU_BLOCK_FACTOR)
    kv_per_block = min(kv_heads, max(1, budget // max(1, slice_bytes)))
    batch_per_block = min(batch, max(1, budget // max(1, slice_bytes * kv_per_block)))
    return batch_per_block, kv_per_block


def _cross_attn_scores_setup_context(ctx, inputs, output):
    q, k, scale, q_mask, kv_mask, q_pos = inputs
    ctx.scale = scale
    ctx.save_for_backward(q, k, q_mask, kv_mask, q_pos)


def _cross_attn_scores_backward(ctx, grad_scores):
    """Blockwise recomputation over blocks of (batch rows, kv heads) (`_backward_blocks`): for each block the
    probabilities p are recomputed with the G = H / Hkv query heads of a kv head folded into its rows (no repeated
    keys), and with dL/dp[b,h,t,n] = g[b, n] * w[b, t] (g the upstream gradient, w = valid[b, t] / count[b]) the
    softmax backward is dL/ds = p * w * (g - p.g): one elementwise pass over p and two matmuls per block, with the
    softmax scale and the row weight w applied to the [G*T, D] sides of the matmuls instead of to p."""
    q, k, q_mask, kv_mask, q_pos = ctx.saved_tensors
    if q.numel() == 0 or k.numel() == 0:  # nothing flows back (and no block to iterate over)
        return torch.zeros_like(q), torch.zeros_like(k), None, None, None, None
    batch, heads, queries, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    scale = dim**-0.5 if ctx.scale is None else ctx.scale
    # float32 like the forward kernels; float64 inputs (gradcheck) stay float64.
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32

    q_valid = torch.ones(batch, queries, dtype=dtype, device=q.device) if q_mask is None else q_mask.to(dtype)
    count = q_valid.sum(dim=1) * heads
    # Rows with no valid query return the uniform distribution, which depends on neither input.
    row_weight = (q_valid / count.clamp_min(1.0)[:, None]).repeat(1, group)  # (B, G*T), g-major like q_g
    row_weight = row_weight[:, None, :, None]  # (B, 1, G*T, 1)
    q_pos_g = None if q_pos is None else q_pos.repeat(1, group)
    g = grad_scores.to(dtype)[:, None, None, :]  # (B, 1, 1, N)

    needs_grad_q, needs_grad_k = ctx.needs_input_grad[:2]
    slice_bytes = group * queries * k.shape[2] * torch.finfo(dtype).bits // 8
    batch_per_block, kv_per_block = _backward_blocks(batch, kv_heads, slice_bytes, q.device)
    # Every (batch row, kv head) is in exactly one block, so the gradients need no zero fill; a single block (the
    # inference shapes) returns its matmul results as they are, without a copy.
    single_block = batch_per_block == batch and kv_per_block == kv_heads
    grad_q = torch.empty(q.shape, dtype=dtype, device=q.device) if needs_grad_q and not single_block else None
    grad_k = torch.empty(k.shape, dtype=dtype, device=k.device) if needs_grad_k and not single_block else None
    for b0 in range(0, batch, batch_per_block):
        b1 = min(batch, b0 + batch_per_block)
        for j0 in range(0, kv_heads, kv_per_block):
            j1 = min(kv_heads, j0 + kv_per_block)
            # the block's G query heads per kv head as rows of one "head": no repeated keys; scaled once here so
            # that the logits need no scaling pass
            q_g = q[b0:b1, j0 * group : j1 * group].to(dtype).reshape(b1 - b0, j1 - j0, group * queries, dim) * scale
            k_blk = k[b0:b1, j0:j1].to(dtype)  # (b, jb, N, D)
            probs = reference.cross_attn_probs(
                q_g,
                k_blk,
                scale=1.0,
                kv_mask=None if kv_mask is None else kv_mask[b0:b1],
                q_pos=None if q_pos_g is None else q_pos_g[b0:b1],
            )  # (b, jb, G*T, N)
            g_blk, w_blk = g[b0:b1], row_weight[b0:b1]
            p_dot_g = torch.matmul(probs, g_blk.transpose(-1, -2))  # (b, jb, G*T, 1)
            grad_logits = probs.mul_(g_blk - p_dot_g)  # without w and the scale; probs is not needed any more
            if needs_grad_q:
                block_q = (torch.matmul(grad_logits, k_blk) * (w_blk * scale)).reshape(
                    b1 - b0, (j1 - j0) * group, queries, dim
                )
                if single_block:
                    grad_q = block_q
                else:
                    grad_q[b0:b1, j0 * group : j1 * group] = block_q
            if needs_grad_k:
                block_k = torch.matmul(grad_logits.transpose(-1, -2), q_g * w_blk)
                if single_block:
                    grad_k = block_k
                else:
                    grad_k[b0:b1, j0:j1] = block_k
    return (
        None if grad_q is None else grad_q.to(q.dtype),
        None if grad_k is None else grad_k.to(k.dtype),
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd(
    "etc_ext::cross_attn_scores",
    _cross_attn_scores_backward,
    setup_context=_cross_attn_scores_setup_context,
)


# ============================================================================ argument checks (the fake's)
def check_cross_attn_scores_args(q, k, scale, q_mask, kv_mask, q_pos) -> None:
    op = "cross_attn_scores"
    check_rank(q, 4, op, "q", "[B, H, T, D]")
    check_rank(k, 4, op, "k", "[B, Hkv, N, D]")
    check_dtype_in(q, SCORE_FLOATS, op, "q")
    check_same_dtype(k, q, op, "k", "q")
    check_same_device(k, q, op, "k", "q")
    batch, heads, queries, dim = q.shape
    torch._check_value(
        k.shape[0] == batch, lambda: f"{op}: k must have batch size B = {batch} like q, got k {shape(k)}"
    )
    torch._check_value(k.shape[3] == dim, lambda: f"{op}: k must have head_dim D = {dim} like q, got k {shape(k)}")
    torch._check_value(1 <= dim <= 256, lambda: f"{op}: head_dim D must be in [1, 256], got {dim}")
    torch._check_value(
        k.shape[1] >= 1 and heads % k.shape[1] == 0,
        lambda: f"{op}: the number of query heads H = {heads} must be a multiple of the number of kv heads Hkv = "
        f"{k.shape[1]}",
    )
    torch._check_value(
        scale is None or (scale > 0 and math.isfinite(scale)),  # inf: every probability NaN
        lambda: f"{op}: scale must be positive and finite, got {scale}",
    )
    check_optional_2d(q_mask, batch, queries, torch.bool, q, op, "q_mask", "[B, T]", "q")
    check_optional_2d(kv_mask, batch, k.shape[2], torch.bool, q, op, "kv_mask", "[B, N]", "q")
    check_optional_2d(q_pos, batch, queries, torch.int64, q, op, "q_pos", "[B, T]", "q")
