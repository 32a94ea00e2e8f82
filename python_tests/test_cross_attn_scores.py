"""cross_attn_scores against the pure-PyTorch reference and a float64 computation."""

import pytest
import torch
from conftest import DEVICES, assert_refused_alike
from torch.library import opcheck

from etc_ext import ops, reference
from etc_ext.ops import scores

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, H, Hkv, T, N, D): from 1x1x1x1 to the LLaVA-1.5-7B final layer, GQA like Qwen3-VL-2B,
# odd N and D.
SHAPES = [
    (1, 1, 1, 1, 1, 1),
    (1, 2, 1, 3, 7, 16),
    (2, 4, 2, 5, 577, 33),
    (3, 16, 8, 9, 1000, 128),  # Qwen3-VL-2B heads
    (2, 32, 32, 40, 576, 128),  # LLaVA-1.5-7B final layer
    (1, 2, 2, 4, 9, 256),
]
# Error of the op in low precision vs float64 must stay within what the inputs' rounding
# allows: scores are probabilities of order 1/N, compared with relative + absolute bounds.
TOLERANCES = {torch.float32: (1e-5, 1e-6), torch.float16: (1e-5, 1e-6), torch.bfloat16: (1e-5, 1e-6)}


def make_inputs(shape, dtype, device, with_masks=True, seed=0):
    batch, heads, kv_heads, queries, keys, dim = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, queries, dim, generator=gen).to(device, dtype)
    k = torch.randn(batch, kv_heads, keys, dim, generator=gen).to(device, dtype)
    if not with_masks:
        return q, k, {}
    q_mask = torch.rand(batch, queries, generator=gen) > 0.3
    q_mask[:, 0] = True
    kv_mask = torch.rand(batch, keys, generator=gen) > 0.2
    kv_mask[:, 0] = True
    q_pos = torch.randint(0, keys, (batch, queries), generator=gen)
    masks = dict(q_mask=q_mask.to(device), kv_mask=kv_mask.to(device), q_pos=q_pos.to(device))
    return q, k, masks


def float64_scores(q, k, **kwargs):
    """The reference evaluated in float64 on the (already rounded) inputs."""
    return reference.cross_attn_scores(q.double(), k.double(), **kwargs).float()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_masks", [False, True])
def test_matches_reference_and_float64(shape, dtype, device, with_masks):
    q, k, masks = make_inputs(shape, dtype, device, with_masks)
    out = ops.cross_attn_scores(q, k, **masks)
    assert out.shape == (shape[0], shape[4]) and out.dtype == torch.float32
    expected = float64_scores(q, k, **masks)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)
    # The reference computes in float32 from the same rounded inputs.
    torch.testing.assert_close(out, reference.cross_attn_scores(q, k, **masks), rtol=1e-4, atol=1e-6)
    # Each row with a valid query and a visible key is a distribution over the keys.
    torch.testing.assert_close(out.sum(dim=1), torch.ones(shape[0], device=device), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(dtype, device):
    batch, heads, kv_heads, queries, keys, dim = 2, 8, 4, 6, 131, 64
    # q laid out as [B, T, H, D] (as attention modules produce it) and viewed as [B, H, T, D];
    # k sliced out of a longer sequence with a stride on the last dim.
    q_bthd = torch.randn(batch, queries, heads, dim, device=device, dtype=dtype)
    q = q_bthd.transpose(1, 2)
    k_big = torch.randn(batch, kv_heads, keys + 10, 2 * dim, device=device, dtype=dtype)
    k = k_big[:, :, 5 : 5 + keys, ::2]
    assert not q.is_contiguous() and not k.is_contiguous()
    q_pos = torch.randint(0, keys, (batch, queries), device=device)
    out = ops.cross_attn_scores(q, k, q_pos=q_pos)
    expected = float64_scores(q.contiguous(), k.contiguous(), q_pos=q_pos)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_edge_rows(device):
    """Row 0: no valid query -> uniform over valid keys. Row 1: one valid key -> all mass on
    it. Row 2: no valid key -> zeros."""
    q, k, _ = make_inputs((3, 4, 2, 5, 9, 16), torch.float32, device, with_masks=False)
    q_mask = torch.ones(3, 5, dtype=torch.bool, device=device)
    q_mask[0] = False
    kv_mask = torch.ones(3, 9, dtype=torch.bool, device=device)
    kv_mask[0, ::2] = False
    kv_mask[1] = False
    kv_mask[1, 4] = True
    kv_mask[2] = False
    out = ops.cross_attn_scores(q, k, q_mask=q_mask, kv_mask=kv_mask)
    uniform = kv_mask[0].float() / kv_mask[0].sum()
    torch.testing.assert_close(out[0], uniform)
    torch.testing.assert_close(out[1], kv_mask[1].float())
    assert torch.equal(out[2], torch.zeros(9, device=device))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, float64_scores(q, k, q_mask=q_mask, kv_mask=kv_mask))


@pytest.mark.parametrize("device", DEVICES)
def test_causal_positions_match_eager_attention(device):
    """With the layer's whole key sequence and q_pos, the scores are the eager attention
    probabilities of a causal layer averaged over heads and queries."""
    batch, heads, seq, dim = 2, 4, 30, 16
    x_q = torch.randn(batch, heads, seq, dim, device=device)
    x_k = torch.randn(batch, heads, seq, dim, device=device)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
    logits = (x_q @ x_k.transpose(-1, -2)) * dim**-0.5
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)  # eager attention
    text = torch.arange(20, seq, device=device)  # the instruction: the last 10 tokens
    expected = probs[:, :, text].mean(dim=(1, 2))
    q_pos = text[None].expand(batch, -1)
    out = ops.cross_attn_scores(x_q[:, :, text], x_k, q_pos=q_pos)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_scale(device):
    q, k, _ = make_inputs((2, 2, 1, 3, 17, 8), torch.float32, device, with_masks=False)
    torch.testing.assert_close(ops.cross_attn_scores(q, k, scale=0.7), float64_scores(q, k, scale=0.7))
    assert not torch.allclose(ops.cross_attn_scores(q, k, scale=0.7), ops.cross_attn_scores(q, k))


@pytest.mark.parametrize("device", DEVICES)
def test_large_tile_count(device):
    """More rows and keys than one CPU logits tile / CUDA grid row holds."""
    q, k, masks = make_inputs((2, 8, 2, 300, 2500, 32), torch.float32, device)
    out = ops.cross_attn_scores(q, k, **masks)
    torch.testing.assert_close(out, float64_scores(q, k, **masks), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_masks", [False, True])
@pytest.mark.parametrize("one_slice_per_block", [False, True])
def test_backward_matches_float64_autograd(device, with_masks, one_slice_per_block, monkeypatch):
    """Gradients of the op (float32) against autograd through the float64 reference; with
    `one_slice_per_block` the backward recomputes one (batch row, kv head) at a time."""
    if one_slice_per_block:
        monkeypatch.setattr(scores, "_BACKWARD_BLOCK_BYTES", 1)
    shape = (2, 4, 2, 3, 7, 5)
    q, k, masks = make_inputs(shape, torch.float32, device, with_masks)
    q.requires_grad_()
    k.requires_grad_()
    weights = torch.randn(shape[0], shape[4], device=device, dtype=torch.float64)
    (ops.cross_attn_scores(q, k, **masks) * weights.float()).sum().backward()
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    (reference.cross_attn_scores(q64, k64, **masks) * weights).sum().backward()
    torch.testing.assert_close(q.grad, q64.grad.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(k.grad, k64.grad.float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_nan_in_a_visible_key_reaches_the_scores(device, dtype):
    """A NaN in a visible key makes every score of its batch row NaN, as in the reference (the key enters every
    softmax denominator of its kv head); a NaN key that kv_mask hides changes nothing; other rows are untouched."""
    q = torch.randn(2, 4, 3, 32, device=device).to(dtype)
    k = torch.randn(2, 2, 70, 32, device=device).to(dtype)
    k[0, 1, 5, 3] = float("nan")
    got, want = ops.cross_attn_scores(q, k), reference.cross_attn_scores(q.double(), k.double())
    assert got[0].isnan().all() and want[0].isnan().all()
    torch.testing.assert_close(got[1], want[1].float(), rtol=1e-4, atol=1e-6)
    kv_mask = torch.ones(2, 70, dtype=torch.bool, device=device)
    kv_mask[0, 5] = False
    got = ops.cross_attn_scores(q, k, kv_mask=kv_mask)
    want = reference.cross_attn_scores(q.double(), k.double(), kv_mask=kv_mask)
    assert not want.isnan().any()
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 4, 2, 3, 5, 8), (2, 4, 2, 0, 5, 8), (2, 4, 2, 3, 0, 8)], ids=["B0", "T0", "N0"])
def test_backward_of_empty_inputs(device, shape):
    """Zero batch rows, queries or keys: gradients of the inputs' shapes, all zero, like autograd through the
    reference (which has nothing to differentiate either)."""
    batch, heads, kv_heads, queries, keys, dim = shape
    q = torch.randn(batch, heads, queries, dim, device=device, requires_grad=True)
    k = torch.randn(batch, kv_heads, keys, dim, device=device, requires_grad=True)
    grad = torch.randn(batch, keys, device=device)
    grad_q, grad_k = torch.autograd.grad(ops.cross_attn_scores(q, k), (q, k), grad)
    assert grad_q.shape == q.shape and grad_k.shape == k.shape
    assert not grad_q.any() and not grad_k.any()


@pytest.mark.parametrize("with_masks", [False, True])
@pytest.mark.parametrize("one_slice_per_block", [False, True])
def test_gradcheck_backward_formula(with_masks, one_slice_per_block, monkeypatch):
    """torch.autograd.gradcheck in float64 of the backward the op registers."""
    if one_slice_per_block:
        monkeypatch.setattr(scores, "_BACKWARD_BLOCK_BYTES", 1)
    q, k, masks = make_inputs((2, 4, 2, 3, 6, 5), torch.float32, "cpu", with_masks)
    q = q.double().requires_grad_()
    k = k.double().requires_grad_()

    def fn(q_, k_):
        return _Float64CrossAttnScores.apply(q_, k_, masks)

    assert torch.autograd.gradcheck(fn, (q, k), eps=1e-6, atol=1e-6)


class _Float64CrossAttnScores(torch.autograd.Function):
    """Forward by the float64 reference, backward by the op's registered backward, so that
    gradcheck sees the backward formula in float64."""

    @staticmethod
    def forward(ctx, q, k, masks):
        ctx.save_for_backward(q, k, masks.get("q_mask"), masks.get("kv_mask"), masks.get("q_pos"))
        ctx.scale = None
        return reference.cross_attn_scores(q, k, **masks)

    @staticmethod
    def backward(ctx, grad):
        grads = scores._cross_attn_scores_backward(ctx, grad)
        return grads[0], grads[1], None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_low_precision(device, dtype):
    q, k, masks = make_inputs((2, 4, 2, 5, 33, 16), dtype, device)
    q.requires_grad_()
    k.requires_grad_()
    ops.cross_attn_scores(q, k, **masks).pow(2).sum().backward()
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    reference.cross_attn_scores(q64, k64, **masks).pow(2).sum().backward()
    assert q.grad.dtype == dtype and k.grad.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(q.grad.double(), q64.grad, rtol=tol, atol=tol * q64.grad.abs().max().item())
    torch.testing.assert_close(k.grad.double(), k64.grad, rtol=tol, atol=tol * k64.grad.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_masks", [False, True])
def test_opcheck(device, with_masks):
    q, k, masks = make_inputs((2, 4, 2, 3, 11, 8), torch.float32, device, with_masks)
    q.requires_grad_()
    k.requires_grad_()
    opcheck(torch.ops.etc_ext.cross_attn_scores.default, (q, k, None, masks.get("q_mask"), masks.get("kv_mask"), masks.get("q_pos")))
    opcheck(torch.ops.etc_ext.cross_attn_scores.default, (q, k, 0.5, None, None, None))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    q, k, masks = make_inputs((2, 4, 2, 3, 11, 8), torch.float32, device)
    compiled = torch.compile(ops.cross_attn_scores, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, **masks), ops.cross_attn_scores(q, k, **masks))


# ------------------------------------------------------------------------- bad inputs
def _good():
    return torch.randn(2, 4, 3, 8), torch.randn(2, 2, 5, 8)


BAD_INPUTS = [
    # (description, kwargs transform, exception, message fragment)
    ("q rank", lambda q, k: dict(q=q[0], k=k), ValueError, "q must be a 4-D tensor"),
    ("k rank", lambda q, k: dict(q=q, k=k[0]), ValueError, "k must be a 4-D tensor"),
    ("heads", lambda q, k: dict(q=q[:, :3], k=k), ValueError, "multiple of the number of kv heads"),
    ("head_dim", lambda q, k: dict(q=q, k=k[..., :4]), ValueError, "head_dim D = 8"),
    ("batch", lambda q, k: dict(q=q, k=k[:1]), ValueError, "batch size B = 2"),
    ("q dtype", lambda q, k: dict(q=q.double(), k=k), TypeError, "q must be float32, float16 or bfloat16"),
    ("k dtype", lambda q, k: dict(q=q, k=k.half()), TypeError, "k must have the dtype of q"),
    ("big head_dim", lambda q, k: dict(q=torch.randn(1, 1, 1, 300), k=torch.randn(1, 1, 2, 300)), ValueError, "[1, 256]"),
    ("q_mask shape", lambda q, k: dict(q=q, k=k, q_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "q_mask must have shape"),
    ("q_mask dtype", lambda q, k: dict(q=q, k=k, q_mask=torch.ones(2, 3)), TypeError, "q_mask must have dtype torch.bool"),
    ("kv_mask shape", lambda q, k: dict(q=q, k=k, kv_mask=torch.ones(2, 6, dtype=torch.bool)), ValueError, "kv_mask must have shape"),
    ("q_pos dtype", lambda q, k: dict(q=q, k=k, q_pos=torch.zeros(2, 3, dtype=torch.int32)), TypeError, "q_pos must have dtype torch.int64"),
    ("scale", lambda q, k: dict(q=q, k=k, scale=0.0), ValueError, "scale must be positive"),
    ("scale inf", lambda q, k: dict(q=q, k=k, scale=float("inf")), ValueError, "scale must be positive and finite"),
    ("scale nan", lambda q, k: dict(q=q, k=k, scale=float("nan")), ValueError, "scale must be positive and finite"),
    ("q not a tensor", lambda q, k: dict(q=q.tolist(), k=k), TypeError, "q must be a torch.Tensor"),
    ("k device", lambda q, k: dict(q=q, k=k.to("meta")), ValueError, "k must be on the device of q"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_clear_errors(case):
    _, transform, error, fragment = case
    q, k = _good()
    with pytest.raises(error, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        ops.cross_attn_scores(**transform(q, k))


@pytest.mark.parametrize("case", [c for c in BAD_INPUTS if "not a tensor" not in c[0]], ids=lambda c: c[0])
def test_the_op_and_its_fake_refuse_alike(case):
    """Callers of torch.ops.etc_ext.cross_attn_scores directly get the C++ checks, and traced calls the fake's: the
    same error type and message as the wrapper (the dispatcher itself refuses a non-tensor)."""
    _, transform, error, fragment = case
    q, k = _good()
    functions = (ops.cross_attn_scores, torch.ops.etc_ext.cross_attn_scores.default, scores._cross_attn_scores_fake)
    assert_refused_alike(functions, lambda function: function(**transform(q, k)), error, fragment)