"""weighted_aggregate and aggregation_weights against etc_ext.reference and a float64
computation: odd and strided shapes, masks and zero importance, empty rows, gradients,
opcheck, torch.compile and argument errors. CUDA variants run when a GPU is present."""

import pytest
import torch
from conftest import DEVICES, assert_refused_alike

import etc_ext  # noqa: F401  (registers torch.ops.etc_ext.*)
from etc_ext import ops, reference
from etc_ext.ops import aggregate

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOKENS = [1, 7, 577]
ROWS = [1, 3, 16]
CHANNELS = [5, 131]
SEEDS = [0]
# (rtol, atol) against the float64 computation, for outputs of magnitude ~1.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
    torch.float64: (1e-12, 1e-12),
}


def make_inputs(batch, tokens, rows, channels, dtype, device, seed, importance=True, mask=True):
    """x (B, N, C) in dtype; logits float32 (B, K, N); importance float32 (B, N) with zeros;
    mask bool (B, N) with False entries (every row keeps at least one valid token)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, channels, generator=gen).to(dtype)
    logits = 2.0 * torch.randn(batch, rows, tokens, generator=gen)
    imp = m = None
    if importance:
        imp = torch.rand(batch, tokens, generator=gen)
        imp[torch.rand(batch, tokens, generator=gen) < 0.25] = 0.0
        imp[:, 0] = 0.5
    if mask:
        m = torch.rand(batch, tokens, generator=gen) > 0.2
        m[:, 0] = True
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(x), to(logits), to(imp), to(m)


def float64_aggregate(x, logits, importance=None, mask=None):
    """The definition in float64: masked softmax of logits + log(importance), then w @ x."""
    z = logits.double()
    valid = torch.ones(z.shape[0], z.shape[2], dtype=torch.bool, device=z.device)
    if importance is not None:
        valid &= importance > 0
        z = z + torch.log(importance.double().clamp_min(1e-300))[:, None, :]
    if mask is not None:
        valid &= mask
    z = z.masked_fill(~valid[:, None, :], float("-inf"))
    alive = valid.any(dim=-1)[:, None, None]
    w = torch.where(alive, torch.softmax(torch.where(alive, z, 0.0), dim=-1), 0.0)
    return w @ x.double(), w


def assert_close_to_float64(out, x, logits, importance, mask):
    expected, _ = float64_aggregate(x, logits, importance, mask)
    rtol, atol = TOLERANCES[out.dtype]
    torch.testing.assert_close(out.double(), expected, rtol=rtol, atol=atol)
    # Like flash-attention's tests: no worse than twice the error of the same math done by
    # torch in the same precision (plus a little slack for the fp32 softmax approximation).
    ref = reference.weighted_aggregate(x, logits, importance, mask)
    err = (out.double() - expected).abs().max().item()
    ref_err = (ref.double() - expected).abs().max().item()
    assert err <= 2 * ref_err + atol, (err, ref_err)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("seed", SEEDS)
@torch.inference_mode()
def test_weighted_aggregate_matches_reference(device, dtype, tokens, rows, channels, seed):
    x, logits, importance, mask = make_inputs(2, tokens, rows, channels, dtype, device, seed)
    out = ops.weighted_aggregate(x, logits, importance, mask)
    assert out.shape == (2, rows, channels) and out.dtype == dtype and out.device == x.device
    assert torch.isfinite(out).all()
    assert_close_to_float64(out, x, logits, importance, mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("shape", [(2, 577, 1100, 20), (1, 300, 4096, 64), (3, 33, 257, 4), (1, 1000, 96, 9)])
@torch.inference_mode()
def test_weighted_aggregate_large_shapes(device, dtype, shape):
    """Several token chunks, channel chunks and row groups of the CPU kernel, partial tiles."""
    batch, tokens, channels, rows = shape
    x, logits, importance, mask = make_inputs(batch, tokens, rows, channels, dtype, device, seed=1)
    out = ops.weighted_aggregate(x, logits, importance, mask)
    assert_close_to_float64(out, x, logits, importance, mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_importance,use_mask", [(False, False), (True, False), (False, True)])
@torch.inference_mode()
def test_weighted_aggregate_optional_inputs(device, dtype, use_importance, use_mask):
    x, logits, importance, mask = make_inputs(3, 50, 5, 40, dtype, device, 2, use_importance, use_mask)
    out = ops.weighted_aggregate(x, logits, importance, mask)
    assert_close_to_float64(out, x, logits, importance, mask)
    if not use_importance and not use_mask:  # plain softmax pooling
        expected = torch.softmax(logits.double(), dim=-1) @ x.double()
        torch.testing.assert_close(out.double(), expected, rtol=TOLERANCES[dtype][0], atol=TOLERANCES[dtype][1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [2, 16])
@torch.inference_mode()
def test_weighted_aggregate_strided_inputs(device, dtype, rows):
    """Transposed x (channel stride N), token-sliced x, and non-contiguous logits,
    importance and mask."""
    batch, tokens, channels = 2, 37, 45
    x, logits, importance, mask = make_inputs(batch, tokens, rows, channels, dtype, device, 3)
    variants = {
        "transposed": x.transpose(1, 2).contiguous().transpose(1, 2),  # (B, N, C), stride(2) = N
        "token_slice": torch.stack([x, x], dim=2).flatten(1, 2)[:, ::2],  # stride(1) = 2C
        "channel_slice": torch.stack([x, x], dim=3).flatten(2)[:, :, ::2],  # stride(2) = 2
    }
    logits_t = logits.transpose(1, 2).contiguous().transpose(1, 2)
    importance_s = torch.stack([importance, importance], dim=2).flatten(1)[:, ::2]
    mask_s = torch.stack([mask, mask], dim=2).flatten(1)[:, ::2]
    assert not logits_t.is_contiguous() and not importance_s.is_contiguous() and not mask_s.is_contiguous()
    expected = ops.weighted_aggregate(x, logits, importance, mask)
    for name, xv in variants.items():
        torch.testing.assert_close(xv, x, rtol=0, atol=0)
        assert not xv.is_contiguous(), name
        out = ops.weighted_aggregate(xv, logits_t, importance_s, mask_s)
        rtol, atol = TOLERANCES[dtype]
        torch.testing.assert_close(out, expected, rtol=rtol, atol=atol, msg=name)
        assert_close_to_float64(out, x, logits, importance, mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 16])
@torch.inference_mode()
def test_weighted_aggregate_empty_rows_give_zeros(device, dtype, rows):
    """Rows with no valid token (all masked, all zero importance, or all logits -inf) give
    exactly zero, never NaN; the other batch rows are unaffected."""
    x, logits, importance, mask = make_inputs(4, 19, rows, 21, dtype, device, 4)
    mask[1] = False  # every token masked
    importance[2] = 0.0  # every importance zero
    logits[3, 0] = float("-inf")  # one row of logits all -inf
    out = ops.weighted_aggregate(x, logits, importance, mask)
    assert not torch.isnan(out).any()
    assert (out[1] == 0).all() and (out[2] == 0).all() and (out[3, 0] == 0).all()
    assert out[0].abs().sum() > 0
    assert_close_to_float64(out[[0]], x[[0]], logits[[0]], importance[[0]], mask[[0]])
    weights = ops.aggregation_weights(logits, importance, mask)
    assert not torch.isnan(weights).any() and (weights[1:3] == 0).all() and (weights[3, 0] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 16])
@torch.inference_mode()
def test_weighted_aggregate_invalid_tokens_get_exactly_zero_weight(device, dtype, rows):
    """Changing x at masked or zero-importance tokens changes nothing, bit for bit."""
    x, logits, importance, mask = make_inputs(2, 301, rows, 70, dtype, device, 5)
    out = ops.weighted_aggregate(x, logits, importance, mask)
    invalid = (~mask) | (importance == 0)
    assert invalid.any()
    x_changed = torch.where(invalid[:, :, None], torch.full_like(x, 1000.0), x)
    torch.testing.assert_close(ops.weighted_aggregate(x_changed, logits, importance, mask), out, rtol=0, atol=0)
    weights = ops.aggregation_weights(logits, importance, mask)
    assert (weights.masked_select(invalid[:, None, :].expand_as(weights)) == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", ROWS)
@torch.inference_mode()
def test_aggregation_weights(device, rows):
    _, logits, importance, mask = make_inputs(3, 41, rows, 1, torch.float32, device, 6)
    weights = ops.aggregation_weights(logits, importance, mask)
    assert weights.shape == (3, rows, 41) and weights.dtype == torch.float32
    _, expected = float64_aggregate(torch.zeros(3, 41, 1, device=device), logits, importance, mask)
    torch.testing.assert_close(weights.double(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, rows, device=device))
    # The op is the weighted sum with exactly these weights.
    x = torch.randn(3, 41, 9, device=device)
    torch.testing.assert_close(ops.weighted_aggregate(x, logits, importance, mask), weights @ x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_weighted_aggregate_gradcheck(device):
    """float64 gradcheck w.r.t. x, logits and importance (importance > 0: the finite
    differences are one-sided at 0), with a mask."""
    gen = torch.Generator().manual_seed(7)
    batch, tokens, rows, channels = 2, 6, 3, 5
    x = torch.randn(batch, tokens, channels, generator=gen, dtype=torch.float64)
    logits = torch.randn(batch, rows, tokens, generator=gen, dtype=torch.float64)
    importance = torch.rand(batch, tokens, generator=gen, dtype=torch.float64) + 0.1
    mask = torch.rand(batch, tokens, generator=gen) > 0.3
    mask[:, 0] = True
    args = [t.to(device).requires_grad_() for t in (x, logits, importance)]
    mask = mask.to(device)
    assert torch.autograd.gradcheck(lambda a, b, c: ops.weighted_aggregate(a, b, c, mask), args)
    assert torch.autograd.gradcheck(lambda a, b: ops.weighted_aggregate(a, b), args[:2])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_weighted_aggregate_backward_matches_reference(device, dtype):
    """Gradients in low precision against autograd through reference.weighted_aggregate,
    including zero-importance and masked tokens (gradient 0 there)."""
    x, logits, importance, mask = make_inputs(2, 29, 4, 23, dtype, device, 8)
    grad = torch.randn(2, 4, 23, device=device).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (x, logits, importance)]
    ref_leaves = [t.clone().requires_grad_() for t in (x, logits, importance)]
    ops.weighted_aggregate(*leaves, mask).backward(grad)
    reference.weighted_aggregate(*ref_leaves, mask).backward(grad)
    rtol, atol = TOLERANCES[dtype]
    for name, ours, ref in zip(("x", "logits", "importance"), leaves, ref_leaves):
        assert ours.grad is not None and ours.grad.dtype == ours.dtype, name
        torch.testing.assert_close(ours.grad, ref.grad, rtol=rtol, atol=atol, msg=name)
    assert (leaves[2].grad[importance == 0] == 0).all()
    assert (leaves[0].grad[~mask] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_weighted_aggregate_opcheck(device, dtype):
    x, logits, importance, mask = make_inputs(2, 13, 3, 11, dtype, device, 9)
    op = torch.ops.etc_ext.weighted_aggregate.default
    torch.library.opcheck(op, (x, logits, importance, mask))
    torch.library.opcheck(op, (x, logits, None, None))
    grads = (x.clone().requires_grad_(), logits.clone().requires_grad_(), importance.clone().requires_grad_())
    torch.library.opcheck(op, (*grads, mask))


@pytest.mark.parametrize("device", DEVICES)
def test_weighted_aggregate_compile(device):
    x, logits, importance, mask = make_inputs(2, 17, 3, 9, torch.float32, device, 10)
    compiled = torch.compile(ops.weighted_aggregate, fullgraph=True)
    torch.testing.assert_close(compiled(x, logits, importance, mask), ops.weighted_aggregate(x, logits, importance, mask))

    def pooled_loss(x, logits):
        return ops.weighted_aggregate(x, logits, importance, mask).square().sum()

    leaves = [x.clone().requires_grad_(), logits.clone().requires_grad_()]
    torch.compile(pooled_loss, fullgraph=True)(*leaves).backward()
    eager = [x.clone().requires_grad_(), logits.clone().requires_grad_()]
    pooled_loss(*eager).backward()
    for ours, ref in zip(leaves, eager):
        torch.testing.assert_close(ours.grad, ref.grad)


@pytest.mark.parametrize("device", DEVICES)
@torch.inference_mode()
def test_weighted_aggregate_empty_sizes(device):
    x = torch.randn(2, 0, 5, device=device)
    assert (ops.weighted_aggregate(x, torch.randn(2, 3, 0, device=device)) == 0).all()
    out = ops.weighted_aggregate(torch.randn(2, 4, 5, device=device), torch.randn(2, 0, 4, device=device))
    assert out.shape == (2, 0, 5)
    out = ops.weighted_aggregate(torch.randn(0, 4, 5, device=device), torch.randn(0, 3, 4, device=device))
    assert out.shape == (0, 3, 5)


def test_weighted_aggregate_bad_inputs():
    x = torch.randn(2, 7, 5)
    logits = torch.randn(2, 3, 7)
    cases = [
        ((torch.randn(7, 5), logits), ValueError, "x must be a 3-D tensor"),
        ((x, torch.randn(2, 7)), ValueError, "logits must be a 3-D tensor"),
        ((x, torch.randn(3, 3, 7)), ValueError, "logits must have shape [B, K, N] with B = 2"),
        ((x, torch.randn(2, 3, 6)), ValueError, "N = 7"),
        ((x.long(), logits), TypeError, "x must be float32"),
        ((x, logits.int()), TypeError, "logits must be float32"),
        ((x, logits, torch.rand(2, 6)), ValueError, "importance must have shape [B, N] = [2, 7], got [2, 6]"),
        ((x, logits, torch.rand(2, 7, dtype=torch.float16)), TypeError, "importance must be float32"),
        ((x, logits, None, torch.ones(2, 7)), TypeError, "mask must have dtype torch.bool"),
        ((x, logits, None, torch.ones(2, 8, dtype=torch.bool)), ValueError, "mask must have shape [B, N]"),
        ((x, logits.to("meta")), ValueError, "logits must be on the device of x (cpu), got meta"),
        ((x, logits, torch.rand(2, 7, device="meta")), ValueError, "importance must be on the device of x"),
        ((x, logits, None, torch.ones(2, 7, dtype=torch.bool, device="meta")), ValueError, "mask must be on the device"),
        (([[1.0]], logits), TypeError, "x must be a torch.Tensor"),
    ]
    # The wrapper, torch.ops.etc_ext.weighted_aggregate (the C++ checks) and the fake (traced calls) refuse alike;
    # the dispatcher itself refuses a non-tensor.
    functions = (ops.weighted_aggregate, torch.ops.etc_ext.weighted_aggregate.default, aggregate._weighted_aggregate_fake)
    for args, error, message in cases:
        padded = tuple(args) + (None,) * (4 - len(args))
        assert_refused_alike(functions if isinstance(args[0], torch.Tensor) else functions[:1],
                             lambda function: function(*padded), error, message)  # fmt: skip
    with pytest.raises(ValueError, match="aggregation_weights: importance must have shape"):
        ops.aggregation_weights(logits, torch.rand(2, 6))
