"""One thin wrapper per etc_ext op: argument checks with clear errors, the fake (meta)
implementation for torch.compile, and autograd.

The kernels live in csrc/ and are registered as ``torch.ops.etc_ext.<name>``; their
pure-PyTorch references are in :mod:`etc_ext.reference`.
"""

from typing import Optional

import torch

from . import reference

__all__ = ["cross_attn_scores"]


# ----------------------------------------------------------------------------- checks
def _shape(t: torch.Tensor) -> list:
    return list(t.shape)


def _check_rank(t, rank: int, op: str, name: str, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{op}: {name} must be a {rank}-D tensor {layout}, got shape {_shape(t)}")


def _check_float(t: torch.Tensor, op: str, name: str) -> None:
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_same_device(t: torch.Tensor, ref: torch.Tensor, op: str, name: str, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} must be on the device of {ref_name} ({ref.device}), got {t.device}")


def _check_optional_2d(t, rows: int, cols: int, dtype: torch.dtype, ref: torch.Tensor, op: str, name: str, layout: str):
    if t is None:
        return
    _check_rank(t, 2, op, name, layout)
    if tuple(t.shape) != (rows, cols):
        raise ValueError(f"{op}: {name} must have shape {layout} = [{rows}, {cols}], got {_shape(t)}")
    if t.dtype != dtype:
        raise TypeError(f"{op}: {name} must have dtype {dtype}, got {t.dtype}")
    _check_same_device(t, ref, op, name, "q" if op == "cross_attn_scores" else "x")


def _check_cross_attn_scores_args(q, k, scale, q_mask, kv_mask, q_pos) -> None:
    op = "cross_attn_scores"
    _check_rank(q, 4, op, "q", "[B, H, T, D]")
    _check_rank(k, 4, op, "k", "[B, Hkv, N, D]")
    _check_float(q, op, "q")
    if k.dtype != q.dtype:
        raise TypeError(f"{op}: k must have the dtype of q ({q.dtype}), got {k.dtype}")
    _check_same_device(k, q, op, "k", "q")
    batch, heads, queries, dim = q.shape
    if k.shape[0] != batch:
        raise ValueError(f"{op}: k must have batch size B = {batch} like q, got k {_shape(k)}")
    if k.shape[3] != dim:
        raise ValueError(f"{op}: k must have head_dim D = {dim} like q, got k {_shape(k)}")
    if not 1 <= dim <= 256:
        raise ValueError(f"{op}: head_dim D must be in [1, 256], got {dim}")
    if k.shape[1] < 1 or heads % k.shape[1] != 0:
        raise ValueError(
            f"{op}: the number of query heads H = {heads} must be a multiple of the number of kv heads Hkv = {k.shape[1]}"
        )
    if scale is not None and not scale > 0:
        raise ValueError(f"{op}: scale must be positive, got {scale}")
    _check_optional_2d(q_mask, batch, queries, torch.bool, q, op, "q_mask", "[B, T]")
    _check_optional_2d(kv_mask, batch, k.shape[2], torch.bool, q, op, "kv_mask", "[B, N]")
    _check_optional_2d(q_pos, batch, queries, torch.int64, q, op, "q_pos", "[B, T]")


# ------------------------------------------------------------------- cross_attn_scores
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
    _check_cross_attn_scores_args(q, k, scale, q_mask, kv_mask, q_pos)
    return torch.ops.etc_ext.cross_attn_scores.default(q, k, scale, q_mask, kv_mask, q_pos)


@torch.library.register_fake("etc_ext::cross_attn_scores")
def _cross_attn_scores_fake(q, k, scale=None, q_mask=None, kv_mask=None, q_pos=None):
    torch._check(q.dim() == 4, lambda: f"cross_attn_scores: q must be [B, H, T, D], got {_shape(q)}")
    torch._check(k.dim() == 4, lambda: f"cross_attn_scores: k must be [B, Hkv, N, D], got {_shape(k)}")
    torch._check(k.dtype == q.dtype, lambda: "cross_attn_scores: k must have the dtype of q")
    torch._check(k.shape[0] == q.shape[0], lambda: "cross_attn_scores: k and q batch sizes differ")
    torch._check(k.shape[3] == q.shape[3], lambda: "cross_attn_scores: k and q head_dim differ")
    torch._check(q.shape[1] % k.shape[1] == 0, lambda: "cross_attn_scores: H must be a multiple of Hkv")
    return q.new_empty((q.shape[0], k.shape[2]), dtype=torch.float32)


# Heads per block when the backward pass recomputes the probabilities: bounds the extra
# memory to about this many [B, T, N] float32 slices.
_BACKWARD_HEADS_PER_BLOCK = 8


def _cross_attn_scores_setup_context(ctx, inputs, output):
    q, k, scale, q_mask, kv_mask, q_pos = inputs
    ctx.scale = scale
    ctx.save_for_backward(q, k, q_mask, kv_mask, q_pos)


def _cross_attn_scores_backward(ctx, grad_scores):
    """Blockwise recomputation over groups of kv heads: for each block the probabilities p
    are recomputed, dL/ds = p * (dL/dp - sum_n p * dL/dp), with dL/dp[b,h,t,n] =
    grad[b, n] * valid[b, t] / count[b]."""
    q, k, q_mask, kv_mask, q_pos = ctx.saved_tensors
    batch, heads, queries, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    scale = dim**-0.5 if ctx.scale is None else ctx.scale
    # float32 like the forward kernels; float64 inputs (gradcheck) stay float64.
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32

    q_valid = torch.ones(batch, queries, dtype=dtype, device=q.device) if q_mask is None else q_mask.to(dtype)
    count = q_valid.sum(dim=1) * heads
    # Rows with no valid query return the uniform distribution, which depends on neither input.
    row_weight = q_valid / count.clamp_min(1.0)[:, None]  # (B, T)
    grad_p = grad_scores.to(dtype)[:, None, None, :] * row_weight[:, None, :, None]  # (B, 1, T, N)

    grad_q = torch.zeros(q.shape, dtype=dtype, device=q.device) if ctx.needs_input_grad[0] else None
    grad_k = torch.zeros(k.shape, dtype=dtype, device=k.device) if ctx.needs_input_grad[1] else None
    kv_per_block = max(1, _BACKWARD_HEADS_PER_BLOCK // group)
    for j0 in range(0, kv_heads, kv_per_block):
        j1 = min(kv_heads, j0 + kv_per_block)
        q_blk = q[:, j0 * group : j1 * group]  # (B, hb, T, D)
        k_blk = k[:, j0:j1]  # (B, jb, N, D)
        probs = reference.cross_attn_probs(q_blk, k_blk, scale=scale, kv_mask=kv_mask, q_pos=q_pos)
        grad_logits = probs * (grad_p - (probs * grad_p).sum(dim=-1, keepdim=True))  # (B, hb, T, N)
        grad_logits = grad_logits * scale
        k_rep = k_blk.to(dtype).repeat_interleave(group, dim=1)
        if grad_q is not None:
            grad_q[:, j0 * group : j1 * group] = torch.matmul(grad_logits, k_rep)
        if grad_k is not None:
            grad_k_rep = torch.matmul(grad_logits.transpose(-1, -2), q_blk.to(dtype))  # (B, hb, N, D)
            grad_k[:, j0:j1] = grad_k_rep.unflatten(1, (j1 - j0, group)).sum(dim=2)
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
