"""`weighted_aggregate`: the op's wrapper, its fake (meta) implementation and its autograd; and
`aggregation_weights`, the same merge weights written out (torch ops, for callers that need them).

The kernels are csrc/cpu/weighted_aggregate.cpp and csrc/cuda/weighted_aggregate.cu, their schema and checks csrc/torch_bindings.cpp;
the pure-PyTorch reference is `etc_ext.reference.weighted_aggregate`.
"""

from typing import Optional

import torch

from .. import reference
from . import checks
from .checks import KERNEL_FLOATS, check_dtype, check_dtype_in, check_rank, check_same_device, check_shape, shape

__all__ = ["weighted_aggregate", "aggregation_weights"]


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
    checks.require_tensor(x, "weighted_aggregate", "x", "[B, N, C]")
    checks.require_tensor(logits, "weighted_aggregate", "logits", "[B, K, N]")
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
    check_merge_args(logits, importance, mask, "aggregation_weights", logits, "logits")
    return reference.aggregation_weights(logits, importance, mask)


@torch.library.register_fake("etc_ext::weighted_aggregate")
def _weighted_aggregate_fake(x, logits, importance=None, mask=None):
    check_weighted_aggregate_args(x, logits, importance, mask)
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


# ============================================================================ argument checks (the fake's)
def check_merge_args(logits, importance, mask, op: str, ref: torch.Tensor, ref_name: str) -> None:
    """logits [B, K, N], importance float32/float64 [B, N], mask bool [B, N], on ref's device."""
    check_rank(logits, 3, op, "logits", "[B, K, N]")
    check_dtype_in(logits, KERNEL_FLOATS, op, "logits")
    if ref is not logits:
        check_same_device(logits, ref, op, "logits", ref_name)
    batch, tokens = logits.shape[0], logits.shape[2]
    if importance is not None:
        check_rank(importance, 2, op, "importance", "[B, N]")
        check_shape(importance, (batch, tokens), op, "importance", "[B, N]")
        torch._check_type(
            importance.dtype in (torch.float32, torch.float64),
            lambda: f"{op}: importance must be float32 (or float64), got {importance.dtype}",
        )
        check_same_device(importance, ref, op, "importance", ref_name)
    if mask is not None:
        check_rank(mask, 2, op, "mask", "[B, N]")
        check_shape(mask, (batch, tokens), op, "mask", "[B, N]")
        check_dtype(mask, torch.bool, op, "mask")
        check_same_device(mask, ref, op, "mask", ref_name)


def check_weighted_aggregate_args(x, logits, importance, mask) -> None:
    op = "weighted_aggregate"
    check_rank(x, 3, op, "x", "[B, N, C]")
    check_rank(logits, 3, op, "logits", "[B, K, N]")
    check_dtype_in(x, KERNEL_FLOATS, op, "x")
    batch, tokens, _ = x.shape
    torch._check_value(
        logits.shape[0] == batch and logits.shape[2] == tokens,
        lambda: f"{op}: logits must have shape [B, K, N] with B = {batch} and N = {tokens} from x {shape(x)}, got "
        f"{shape(logits)}",
    )
    check_merge_args(logits, importance, mask, op, x, "x")
