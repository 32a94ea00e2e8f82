"""One thin wrapper per etc_ext op: argument checks with clear errors, the fake (meta)
implementation for torch.compile, and autograd.

The kernels live in csrc/ and are registered as ``torch.ops.etc_ext.<name>``; their
pure-PyTorch references are in :mod:`etc_ext.reference`.
"""

import math
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
    if scale is not None and not (scale > 0 and math.isfinite(scale)):  # inf: every probability NaN
        raise ValueError(f"{op}: scale must be positive and finite, got {scale}")
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


# =====================================================================================
# weighted_aggregate, aggregation_weights, write_compressed_kv (issue 4)
# =====================================================================================
__all__ += ["weighted_aggregate", "aggregation_weights", "write_compressed_kv"]

# x, logits, key, value and caches: the three kernel dtypes, plus float64 (the gradcheck path).
_KERNEL_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_kernel_float(t: torch.Tensor, op: str, name: str) -> None:
    if t.dtype not in _KERNEL_FLOATS:
        raise TypeError(f"{op}: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")


def _check_shape(t: torch.Tensor, expected, op: str, name: str, layout: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{op}: {name} must have shape {layout} = {list(expected)}, got {_shape(t)}")


def _check_merge_args(logits, importance, mask, op: str, ref: torch.Tensor, ref_name: str) -> None:
    """logits [B, K, N], importance float32/float64 [B, N], mask bool [B, N], on ref's device."""
    _check_rank(logits, 3, op, "logits", "[B, K, N]")
    _check_kernel_float(logits, op, "logits")
    if ref is not logits:
        _check_same_device(logits, ref, op, "logits", ref_name)
    batch, tokens = logits.shape[0], logits.shape[2]
    if importance is not None:
        _check_rank(importance, 2, op, "importance", "[B, N]")
        _check_shape(importance, (batch, tokens), op, "importance", "[B, N]")
        if importance.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{op}: importance must be float32 (or float64), got {importance.dtype}")
        _check_same_device(importance, ref, op, "importance", ref_name)
    if mask is not None:
        _check_rank(mask, 2, op, "mask", "[B, N]")
        _check_shape(mask, (batch, tokens), op, "mask", "[B, N]")
        if mask.dtype != torch.bool:
            raise TypeError(f"{op}: mask must have dtype torch.bool, got {mask.dtype}")
        _check_same_device(mask, ref, op, "mask", ref_name)


def _check_weighted_aggregate_args(x, logits, importance, mask) -> None:
    op = "weighted_aggregate"
    _check_rank(x, 3, op, "x", "[B, N, C]")
    _check_kernel_float(x, op, "x")
    _check_rank(logits, 3, op, "logits", "[B, K, N]")
    batch, tokens, _ = x.shape
    if logits.shape[0] != batch or logits.shape[2] != tokens:
        raise ValueError(
            f"{op}: logits must have shape [B, K, N] with B = {batch} and N = {tokens} from x "
            f"{_shape(x)}, got {_shape(logits)}"
        )
    _check_merge_args(logits, importance, mask, op, x, "x")


# ------------------------------------------------------------------ weighted_aggregate
def weighted_aggregate(
    x: torch.Tensor,
    logits: torch.Tensor,
    importance: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """K softmax-weighted sums of the N tokens of x, without writing the weights.

    Args:
        x: `(B, N, C)` tokens, float32/float16/bfloat16 (float64 too), any strides.
        logits: `(B, K, N)` merge logits, any float dtype.
        importance: float32 `(B, N)` >= 0, biases the softmax by log(importance); zero (or
            negative) importance gives the token weight 0.
        mask: bool `(B, N)`, True = the token may be merged.

    Returns:
        `(B, K, C)` in the dtype of x: out[b, k] = sum_n w[b, k, n] * x[b, n] with
        w = softmax over valid n of logits + log(importance) (fp32 accumulation). A row with
        no valid token gives zeros, never NaN. Differentiable w.r.t. x, logits and
        importance (the gradient w.r.t. a zero importance is 0).
    """
    _check_weighted_aggregate_args(x, logits, importance, mask)
    return torch.ops.etc_ext.weighted_aggregate.default(x, logits, importance, mask)


def aggregation_weights(
    logits: torch.Tensor,
    importance: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The merge weights of :func:`weighted_aggregate`, float32 `(B, K, N)` (float64 for
    float64 logits): softmax over valid n of logits + log(importance); zero importance or
    masked tokens get exactly 0, a row with no valid token all zeros.

    Computed with torch ops (reference.aggregation_weights), so it runs on every device and
    is differentiable; it exists for callers that need w itself (e.g. write_compressed_kv's
    `weights`), the fused op never writes it.
    """
    _check_merge_args(logits, importance, mask, "aggregation_weights", logits, "logits")
    return reference.aggregation_weights(logits, importance, mask)


@torch.library.register_fake("etc_ext::weighted_aggregate")
def _weighted_aggregate_fake(x, logits, importance=None, mask=None):
    op = "weighted_aggregate"
    torch._check(x.dim() == 3, lambda: f"{op}: x must be [B, N, C], got {_shape(x)}")
    torch._check(logits.dim() == 3, lambda: f"{op}: logits must be [B, K, N], got {_shape(logits)}")
    torch._check(x.dtype in _KERNEL_FLOATS, lambda: f"{op}: unsupported dtype of x {x.dtype}")
    torch._check(logits.shape[0] == x.shape[0], lambda: f"{op}: logits and x batch sizes differ")
    torch._check(logits.shape[2] == x.shape[1], lambda: f"{op}: logits and x token counts differ")
    for name, t in (("importance", importance), ("mask", mask)):
        if t is not None:
            torch._check(t.dim() == 2, lambda: f"{op}: {name} must be [B, N], got {_shape(t)}")
            torch._check(t.shape[0] == x.shape[0], lambda: f"{op}: {name} and x batch sizes differ")
            torch._check(t.shape[1] == x.shape[1], lambda: f"{op}: {name} and x token counts differ")
    return x.new_empty((x.shape[0], logits.shape[1], x.shape[2]))


def _needs_grad(ctx, importance) -> tuple:
    """(x, logits, importance) flags. needs_input_grad is shorter when the trailing optional
    inputs are None, so read it defensively."""
    flags = tuple(ctx.needs_input_grad) + (False,) * 4
    return flags[0], flags[1], importance is not None and flags[2]


def _weighted_aggregate_setup_context(ctx, inputs, output):
    x, logits, importance, mask = inputs
    need_x, need_logits, need_importance = _needs_grad(ctx, importance)
    # x is needed for the logits/importance gradients; the weights are recomputed from
    # logits, importance and mask.
    ctx.save_for_backward(
        x if (need_logits or need_importance) else None,
        logits,
        importance,
        mask,
    )
    ctx.x_dtype = x.dtype


def _weighted_aggregate_backward(ctx, grad_out):
    """w = softmax(z), z = logits + log(importance), out = w @ x:
    dx = w^T @ g;  dw = g @ x^T;  dz = w * (dw - sum_n w * dw);  dlogits = dz;
    dimportance = sum_k dz / importance (0 where importance is 0 or the token is masked)."""
    x, logits, importance, mask = ctx.saved_tensors
    need_x, need_logits, need_importance = _needs_grad(ctx, importance)
    weights = reference.aggregation_weights(logits, importance, mask)  # (B, K, N)
    dtype = torch.promote_types(weights.dtype, ctx.x_dtype)  # float32, or float64
    weights = weights.to(dtype)
    grad = grad_out.to(dtype)  # (B, K, C)

    grad_x = grad_logits = grad_importance = None
    if need_x:
        grad_x = torch.matmul(weights.transpose(1, 2), grad).to(ctx.x_dtype)  # (B, N, C)
    if need_logits or need_importance:
        grad_w = torch.matmul(grad, x.to(dtype).transpose(1, 2))  # (B, K, N)
        grad_z = weights * (grad_w - (weights * grad_w).sum(dim=-1, keepdim=True))
        if need_logits:
            grad_logits = grad_z.to(logits.dtype)
        if need_importance:
            # reference.aggregation_weights clamps importance at `tiny` before the log.
            tiny = torch.finfo(torch.promote_types(logits.dtype, torch.float32)).tiny
            imp = importance.to(dtype)
            usable = imp >= tiny
            grad_importance = torch.where(usable, grad_z.sum(dim=1) / imp.clamp_min(tiny), 0.0)
            grad_importance = grad_importance.to(importance.dtype)
    return grad_x, grad_logits, grad_importance, None


torch.library.register_autograd(
    "etc_ext::weighted_aggregate",
    _weighted_aggregate_backward,
    setup_context=_weighted_aggregate_setup_context,
)


# ------------------------------------------------------------------ write_compressed_kv
def _check_write_compressed_kv_args(key_cache, value_cache, key, value, slot_mapping, weights, index) -> None:
    op = "write_compressed_kv"
    _check_rank(key, 4, op, "key", "[B, Hkv, N, D]")
    _check_rank(value, 4, op, "value", "[B, Hkv, N, D]")
    _check_rank(key_cache, 4, op, "key_cache", "[num_blocks, block_size, Hkv, D]")
    _check_rank(value_cache, 4, op, "value_cache", "[num_blocks, block_size, Hkv, D]")
    _check_kernel_float(key, op, "key")
    _check_kernel_float(key_cache, op, "key_cache")
    if value.dtype != key.dtype:
        raise TypeError(f"{op}: value must have the dtype of key ({key.dtype}), got {value.dtype}")
    if value_cache.dtype != key_cache.dtype:
        raise TypeError(f"{op}: value_cache must have the dtype of key_cache ({key_cache.dtype}), got {value_cache.dtype}")
    _check_shape(value, key.shape, op, "value", "[B, Hkv, N, D] like key")
    batch, kv_heads, tokens, dim = key.shape
    if key_cache.shape[2] != kv_heads or key_cache.shape[3] != dim:
        raise ValueError(
            f"{op}: key_cache must have shape [num_blocks, block_size, Hkv, D] with Hkv = {kv_heads} and "
            f"D = {dim} from key {_shape(key)}, got {_shape(key_cache)}"
        )
    _check_shape(value_cache, key_cache.shape, op, "value_cache", "[num_blocks, block_size, Hkv, D] like key_cache")
    _check_same_device(value, key, op, "value", "key")
    _check_same_device(key_cache, key, op, "key_cache", "key")
    _check_same_device(value_cache, key, op, "value_cache", "key")

    _check_rank(slot_mapping, 2, op, "slot_mapping", "[B, K]")
    if slot_mapping.shape[0] != batch:
        raise ValueError(f"{op}: slot_mapping must have shape [B, K] with B = {batch} from key, got {_shape(slot_mapping)}")
    if slot_mapping.dtype != torch.int64:
        raise TypeError(f"{op}: slot_mapping must have dtype torch.int64, got {slot_mapping.dtype}")
    _check_same_device(slot_mapping, key, op, "slot_mapping", "key")
    entries = slot_mapping.shape[1]

    if (weights is None) == (index is None):
        raise ValueError(
            f"{op}: pass exactly one of weights [B, K, N] or index [B, K], got "
            f"{'neither' if weights is None else 'both'}"
        )
    if index is not None:
        _check_rank(index, 2, op, "index", "[B, K]")
        _check_shape(index, (batch, entries), op, "index", "[B, K] like slot_mapping")
        if index.dtype != torch.int64:
            raise TypeError(f"{op}: index must have dtype torch.int64, got {index.dtype}")
        _check_same_device(index, key, op, "index", "key")
    else:
        _check_rank(weights, 3, op, "weights", "[B, K, N]")
        _check_shape(weights, (batch, entries, tokens), op, "weights", "[B, K, N]")
        if weights.dtype != torch.float32:
            raise TypeError(f"{op}: weights must have dtype torch.float32, got {weights.dtype}")
        _check_same_device(weights, key, op, "weights", "key")


def _first_bad(bad: torch.Tensor) -> tuple:
    """(b, k) of the first True entry of a [B, K] bool tensor."""
    return tuple(int(i) for i in bad.nonzero()[0])


def _check_write_compressed_kv_ranges(key_cache, key, slot_mapping, index) -> None:
    """Data-dependent checks, before anything is written: every slot is -1 or in
    [0, num_blocks * block_size), no slot is written twice, every index of a written entry is
    in [0, N). One device-to-host sync in the common (valid) case."""
    op = "write_compressed_kv"
    num_slots = key_cache.shape[0] * key_cache.shape[1]
    tokens = key.shape[2]
    bad_slot = (slot_mapping < -1) | (slot_mapping >= num_slots)  # (B, K)
    writes = slot_mapping >= 0
    flags = [bad_slot.any()]
    if index is not None:
        bad_index = writes & ((index < 0) | (index >= tokens))
        flags.append(bad_index.any())
    written = slot_mapping[writes]
    any_slot_bad, *rest = torch.stack(flags).tolist()
    if any_slot_bad:
        b, k = _first_bad(bad_slot)
        raise ValueError(
            f"{op}: slot_mapping[{b}, {k}] = {int(slot_mapping[b, k])} is out of range: slots must be -1 (skip) "
            f"or in [0, num_blocks * block_size) = [0, {num_slots}) for key_cache {_shape(key_cache)}"
        )
    if rest and rest[0]:
        b, k = _first_bad(bad_index)
        raise ValueError(
            f"{op}: index[{b}, {k}] = {int(index[b, k])} is out of range [0, N) = [0, {tokens}) for key "
            f"{_shape(key)} (slot_mapping[{b}, {k}] = {int(slot_mapping[b, k])})"
        )
    if written.numel() > 1 and torch.unique(written).numel() != written.numel():
        values, counts = torch.unique(written, return_counts=True)
        raise ValueError(f"{op}: slot_mapping writes slot {int(values[counts > 1][0])} more than once")


def write_compressed_kv(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    weights: Optional[torch.Tensor] = None,
    index: Optional[torch.Tensor] = None,
    check: bool = True,
) -> None:
    """Write K compressed entries per batch row of one layer into a paged KV cache, in place.

    Args:
        key_cache, value_cache: `(num_blocks, block_size, Hkv, D)`, any strides and a dtype
            of their own (the op converts). A vLLM-style paged cache as is, or a Hugging Face
            per-layer cache `(B, Hkv, L, D)` passed as `.transpose(1, 2)` (slot = b * L + position).
        key, value: `(B, Hkv, N, D)` the layer's keys/values as attention saw them (after RoPE).
        slot_mapping: int64 `(B, K)`, flat destination slot of each entry, -1 = skip.
        weights: float32 `(B, K, N)`: entry k = sum_n weights[b, k, n] * key[b, :, n, :]
            (fp32 accumulation), the merging compressors.
        index: int64 `(B, K)`: entry k copies source position index[b, k] (the ETC path:
            keep the prefix and compression tokens). Exactly one of weights / index.
        check: validate the slots and indices before writing (one device-to-host sync):
            out-of-range values or a slot written twice raise ValueError and the caches stay
            bit-for-bit unchanged. check=False skips that (CUDA graphs, or a caller that
            validated once for all layers); the kernels then skip out-of-range entries rather
            than write out of bounds. Under torch.compile the data-dependent check is skipped.

    Nothing outside the given slots is written. key/value must not overlap the caches.
    """
    _check_write_compressed_kv_args(key_cache, value_cache, key, value, slot_mapping, weights, index)
    if check and not torch.compiler.is_compiling():
        _check_write_compressed_kv_ranges(key_cache, key, slot_mapping, index)
    torch.ops.etc_ext.write_compressed_kv.default(
        key_cache, value_cache, key, value, slot_mapping, weights=weights, index=index
    )


@torch.library.register_fake("etc_ext::write_compressed_kv")
def _write_compressed_kv_fake(key_cache, value_cache, key, value, slot_mapping, *, weights=None, index=None):
    op = "write_compressed_kv"
    torch._check(key.dim() == 4, lambda: f"{op}: key must be [B, Hkv, N, D], got {_shape(key)}")
    torch._check(key_cache.dim() == 4, lambda: f"{op}: key_cache must be [num_blocks, block_size, Hkv, D]")
    torch._check(slot_mapping.dim() == 2, lambda: f"{op}: slot_mapping must be [B, K]")
    torch._check((weights is None) != (index is None), lambda: f"{op}: pass exactly one of weights or index")
    return None
