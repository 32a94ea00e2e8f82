"""write_compressed_kv against etc_ext.reference (run first, on a copy of the caches) and a
float64 computation: paged and Hugging Face layouts, GQA head counts, skip slots, cache
dtypes different from key, strided caches, untouched slots, rejected calls that leave the
cache bit-for-bit unchanged, opcheck and torch.compile. CUDA variants run when a GPU is
present."""

import pytest
import torch
from conftest import DEVICES, assert_refused_alike

import etc_ext  # noqa: F401  (registers torch.ops.etc_ext.*)
from etc_ext import ops, reference
from etc_ext.ops import kv_write

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
KV_HEADS = [1, 2, 8]  # GQA-like: a few kv heads
HEAD_DIMS = [17, 64]
SEEDS = [0]
# (rtol, atol) of the merged (weights) entries against float64, by cache dtype.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (8e-3, 8e-3),
    torch.float64: (1e-5, 1e-5),  # the weights are float32
}
NUM_BLOCKS, BLOCK_SIZE = 7, 5  # 35 slots; the block size divides none of the N below


def make_kv(batch, kv_heads, tokens, dim, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    key = torch.randn(batch, kv_heads, tokens, dim, generator=gen).to(dtype).to(device)
    value = torch.randn(batch, kv_heads, tokens, dim, generator=gen).to(dtype).to(device)
    return key, value


def make_paged_cache(kv_heads, dim, dtype, device, seed):
    """Random (not zero) contents, so untouched slots are recognisable."""
    gen = torch.Generator().manual_seed(seed + 1000)
    shape = (NUM_BLOCKS, BLOCK_SIZE, kv_heads, dim)
    return (
        torch.randn(shape, generator=gen).to(dtype).to(device),
        torch.randn(shape, generator=gen).to(dtype).to(device),
    )


def make_slots(batch, entries, num_slots, device, seed, skip=True):
    """Distinct slots across the whole batch, a few -1 (skip)."""
    gen = torch.Generator().manual_seed(seed + 2000)
    slots = torch.randperm(num_slots, generator=gen)[: batch * entries].view(batch, entries)
    if skip:
        slots[torch.rand(batch, entries, generator=gen) < 0.25] = -1
        slots[0, 0] = -1
    return slots.to(device)


def written_mask(slots, num_blocks, block_size):
    """bool (num_blocks, block_size): the slots the call writes."""
    mask = torch.zeros(num_blocks * block_size, dtype=torch.bool, device=slots.device)
    mask[slots[slots >= 0]] = True
    return mask.view(num_blocks, block_size)


def float64_entries(key, value, weights=None, index=None):
    """(B, K, Hkv, D) float64 entries of the definition."""
    if index is not None:
        safe = index.clamp(0, key.shape[2] - 1)
        gather = lambda t: torch.stack([t[b, :, safe[b]] for b in range(t.shape[0])])  # noqa: E731
        return gather(key.double()).transpose(1, 2), gather(value.double()).transpose(1, 2)
    k = torch.einsum("bkn,bhnd->bkhd", weights.double(), key.double())
    v = torch.einsum("bkn,bhnd->bkhd", weights.double(), value.double())
    return k, v


def run_both(key_cache, value_cache, key, value, slots, **form):
    """The reference first on copies (it is in place too), then the op; returns the
    reference caches."""
    ref_k, ref_v = key_cache.clone(), value_cache.clone()
    reference.write_compressed_kv(ref_k, ref_v, key, value, slots, **form)
    ops.write_compressed_kv(key_cache, value_cache, key, value, slots, **form)
    return ref_k, ref_v


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_heads", KV_HEADS)
@pytest.mark.parametrize("dim", HEAD_DIMS)
@pytest.mark.parametrize("seed", SEEDS)
@torch.inference_mode()
def test_index_paged_cache(device, dtype, kv_heads, dim, seed):
    batch, tokens, entries = 3, 11, 6
    key, value = make_kv(batch, kv_heads, tokens, dim, dtype, device, seed)
    key_cache, value_cache = make_paged_cache(kv_heads, dim, dtype, device, seed)
    before_k, before_v = key_cache.clone(), value_cache.clone()
    slots = make_slots(batch, entries, NUM_BLOCKS * BLOCK_SIZE, device, seed)
    index = torch.randint(0, tokens, (batch, entries), generator=torch.Generator().manual_seed(seed)).to(device)
    ref_k, ref_v = run_both(key_cache, value_cache, key, value, slots, index=index)
    # A copy is exact.
    torch.testing.assert_close(key_cache, ref_k, rtol=0, atol=0)
    torch.testing.assert_close(value_cache, ref_v, rtol=0, atol=0)
    exp_k, exp_v = float64_entries(key, value, index=index)
    for b in range(batch):
        for k in range(entries):
            slot = int(slots[b, k])
            if slot >= 0:
                block, offset = divmod(slot, BLOCK_SIZE)
                assert torch.equal(key_cache[block, offset].double(), exp_k[b, k])
                assert torch.equal(value_cache[block, offset].double(), exp_v[b, k])
    untouched = ~written_mask(slots, NUM_BLOCKS, BLOCK_SIZE)
    assert torch.equal(key_cache[untouched], before_k[untouched])
    assert torch.equal(value_cache[untouched], before_v[untouched])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_heads", KV_HEADS)
@pytest.mark.parametrize("dim", HEAD_DIMS)
@pytest.mark.parametrize("seed", SEEDS)
@torch.inference_mode()
def test_weights_paged_cache(device, dtype, kv_heads, dim, seed):
    batch, tokens, entries = 2, 13, 5
    key, value = make_kv(batch, kv_heads, tokens, dim, dtype, device, seed)
    key_cache, value_cache = make_paged_cache(kv_heads, dim, dtype, device, seed)
    before_k, before_v = key_cache.clone(), value_cache.clone()
    slots = make_slots(batch, entries, NUM_BLOCKS * BLOCK_SIZE, device, seed)
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, entries, tokens, generator=gen).to(device)
    mask = (torch.rand(batch, tokens, generator=gen) > 0.3).to(device)
    weights = ops.aggregation_weights(logits, mask=mask)  # zero weights included
    ref_k, ref_v = run_both(key_cache, value_cache, key, value, slots, weights=weights)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(key_cache, ref_k, rtol=rtol, atol=atol)
    torch.testing.assert_close(value_cache, ref_v, rtol=rtol, atol=atol)
    exp_k, exp_v = float64_entries(key, value, weights=weights)
    write = slots >= 0
    flat = slots[write]
    got_k = key_cache.view(-1, kv_heads, dim)[flat].double()
    got_v = value_cache.view(-1, kv_heads, dim)[flat].double()
    torch.testing.assert_close(got_k, exp_k[write], rtol=rtol, atol=atol)
    torch.testing.assert_close(got_v, exp_v[write], rtol=rtol, atol=atol)
    untouched = ~written_mask(slots, NUM_BLOCKS, BLOCK_SIZE)
    assert torch.equal(key_cache[untouched], before_k[untouched])
    assert torch.equal(value_cache[untouched], before_v[untouched])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("key_dtype,cache_dtype", [
    (torch.bfloat16, torch.float32),
    (torch.float32, torch.float16),
    (torch.float16, torch.bfloat16),
    (torch.float32, torch.bfloat16),
])
@pytest.mark.parametrize("form", ["index", "weights"])
@torch.inference_mode()
def test_cache_dtype_differs_from_key(device, key_dtype, cache_dtype, form):
    batch, kv_heads, tokens, dim, entries = 2, 4, 9, 24, 4
    key, value = make_kv(batch, kv_heads, tokens, dim, key_dtype, device, 1)
    key_cache, value_cache = make_paged_cache(kv_heads, dim, cache_dtype, device, 1)
    slots = make_slots(batch, entries, NUM_BLOCKS * BLOCK_SIZE, device, 1)
    if form == "index":
        kwargs = {"index": torch.tensor([[0, 8, 3, 3], [1, 2, 7, 0]], device=device)}
    else:
        kwargs = {"weights": torch.softmax(torch.randn(batch, entries, tokens), -1).to(device)}
    ref_k, ref_v = run_both(key_cache, value_cache, key, value, slots, **kwargs)
    assert key_cache.dtype == cache_dtype
    if form == "index":  # one rounding, to the cache dtype: exact
        torch.testing.assert_close(key_cache, ref_k, rtol=0, atol=0)
        torch.testing.assert_close(value_cache, ref_v, rtol=0, atol=0)
    else:
        rtol, atol = TOLERANCES[cache_dtype]
        torch.testing.assert_close(key_cache, ref_k, rtol=rtol, atol=atol)
        torch.testing.assert_close(value_cache, ref_v, rtol=rtol, atol=atol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["index", "weights"])
@torch.inference_mode()
def test_hugging_face_layout(device, dtype, form):
    """A per-layer HF cache (B, Hkv, L, D) passed as .transpose(1, 2): slot = b * L + pos.
    Compaction into the front of a new cache, as ETC does after the visual tokens."""
    batch, kv_heads, tokens, dim = 2, 4, 23, 32
    key, value = make_kv(batch, kv_heads, tokens, dim, dtype, device, 2)
    keep = torch.tensor([[0, 1, 2, 20, 21, 22], [0, 1, 5, 6, 21, 22]], device=device)  # (B, K)
    length = 8  # L: room for K = 6, positions 6, 7 stay untouched
    hf_k = torch.randn(batch, kv_heads, length, dim).to(dtype).to(device)
    hf_v = torch.randn(batch, kv_heads, length, dim).to(dtype).to(device)
    before_k, before_v = hf_k.clone(), hf_v.clone()
    slots = (torch.arange(batch, device=device)[:, None] * length + torch.arange(6, device=device)[None, :])
    if form == "index":
        kwargs = {"index": keep}
    else:
        kwargs = {"weights": torch.nn.functional.one_hot(keep, tokens).float()}  # the same, as weights
    ops.write_compressed_kv(hf_k.transpose(1, 2), hf_v.transpose(1, 2), key, value, slots, **kwargs)
    expected_k = torch.stack([key[b][:, keep[b]] for b in range(batch)])
    expected_v = torch.stack([value[b][:, keep[b]] for b in range(batch)])
    torch.testing.assert_close(hf_k[:, :, :6], expected_k, rtol=0, atol=0)
    torch.testing.assert_close(hf_v[:, :, :6], expected_v, rtol=0, atol=0)
    assert torch.equal(hf_k[:, :, 6:], before_k[:, :, 6:]) and torch.equal(hf_v[:, :, 6:], before_v[:, :, 6:])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["index", "weights"])
@torch.inference_mode()
def test_strided_inputs(device, dtype, form):
    """key/value transposed from (B, N, Hkv, D); caches laid out (blocks, Hkv, block, D)
    and with a head-dim stride of 2; sliced, non-contiguous slot_mapping/index/weights."""
    batch, kv_heads, tokens, dim, entries = 2, 3, 10, 20, 5
    key_c, value_c = make_kv(batch, kv_heads, tokens, dim, dtype, device, 3)
    key = key_c.transpose(1, 2).contiguous().transpose(1, 2)
    value = value_c.transpose(1, 2).contiguous().transpose(1, 2)
    assert not key.is_contiguous()
    base_k = torch.randn(NUM_BLOCKS, kv_heads, BLOCK_SIZE, 2 * dim).to(dtype).to(device)
    base_v = torch.randn(NUM_BLOCKS, kv_heads, BLOCK_SIZE, 2 * dim).to(dtype).to(device)
    key_cache = base_k.transpose(1, 2)[..., ::2]  # (num_blocks, block_size, Hkv, D), odd strides
    value_cache = base_v.transpose(1, 2)[..., ::2]
    slots = make_slots(batch, entries, NUM_BLOCKS * BLOCK_SIZE, device, 3)
    slots_s = torch.stack([slots, slots], dim=2).flatten(1)[:, ::2]
    index = torch.randint(0, tokens, (batch, entries), generator=torch.Generator().manual_seed(3)).to(device)
    index_s = torch.stack([index, index], dim=2).flatten(1)[:, ::2]
    weights = torch.softmax(torch.randn(batch, tokens, entries), 1).to(device).transpose(1, 2)
    assert not slots_s.is_contiguous() and not index_s.is_contiguous() and not weights.is_contiguous()
    kwargs = {"index": index_s} if form == "index" else {"weights": weights}

    # The same call on contiguous copies is the expectation.
    exp_k, exp_v = key_cache.contiguous(), value_cache.contiguous()
    ops.write_compressed_kv(exp_k, exp_v, key_c, value_c, slots, **({"index": index} if form == "index" else {"weights": weights.contiguous()}))
    untouched_k = base_k[..., 1::2].clone()
    ops.write_compressed_kv(key_cache, value_cache, key, value, slots_s, **kwargs)
    torch.testing.assert_close(key_cache, exp_k, rtol=0, atol=0)
    torch.testing.assert_close(value_cache, exp_v, rtol=0, atol=0)
    assert torch.equal(base_k[..., 1::2], untouched_k)  # the interleaved half is not written


@pytest.mark.parametrize("device", DEVICES)
@torch.inference_mode()
def test_all_skipped_and_empty(device):
    key, value = make_kv(2, 2, 5, 8, torch.float32, device, 4)
    key_cache, value_cache = make_paged_cache(2, 8, torch.float32, device, 4)
    before = key_cache.clone()
    slots = torch.full((2, 3), -1, device=device)
    ops.write_compressed_kv(key_cache, value_cache, key, value, slots, index=torch.full((2, 3), 99, device=device))
    ops.write_compressed_kv(key_cache, value_cache, key, value, slots, weights=torch.rand(2, 3, 5, device=device))
    ops.write_compressed_kv(key_cache, value_cache, key, value, slots[:, :0], index=slots[:, :0])
    assert torch.equal(key_cache, before)


BAD_CALLS = {
    "slot_too_large": (lambda s, i: (s.index_fill(1, torch.tensor([1], device=s.device), NUM_BLOCKS * BLOCK_SIZE), i), "slot_mapping[0, 1] = 35 is out of range"),
    "slot_below_minus_one": (lambda s, i: (s.index_fill(1, torch.tensor([2], device=s.device), -2), i), "slot_mapping[0, 2] = -2 is out of range"),
    "index_too_large": (lambda s, i: (s, i.index_fill(1, torch.tensor([1], device=s.device), 11)), "index[0, 1] = 11 is out of range [0, N) = [0, 11)"),
    "index_negative": (lambda s, i: (s, i.index_fill(1, torch.tensor([2], device=s.device), -1)), "index[0, 2] = -1 is out of range"),
    "duplicate_slot": (lambda s, i: (s.index_fill(1, torch.tensor([1, 2], device=s.device), 4), i), "writes slot 4 more than once"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(BAD_CALLS))
@torch.inference_mode()
def test_rejected_call_leaves_cache_unchanged(device, case):
    batch, kv_heads, tokens, dim = 2, 2, 11, 16
    key, value = make_kv(batch, kv_heads, tokens, dim, torch.bfloat16, device, 5)
    key_cache, value_cache = make_paged_cache(kv_heads, dim, torch.bfloat16, device, 5)
    before_k, before_v = key_cache.clone(), value_cache.clone()
    slots = torch.tensor([[0, 1, 2], [10, 11, 12]], device=device)
    index = torch.tensor([[0, 1, 2], [3, 4, 5]], device=device)
    make_bad, message = BAD_CALLS[case]
    bad_slots, bad_index = make_bad(slots, index)
    with pytest.raises(ValueError) as info:
        ops.write_compressed_kv(key_cache, value_cache, key, value, bad_slots, index=bad_index)
    assert message in str(info.value), str(info.value)
    assert torch.equal(key_cache, before_k) and torch.equal(value_cache, before_v)
    if "slot" in case:
        with pytest.raises(ValueError):
            ops.write_compressed_kv(key_cache, value_cache, key, value, bad_slots, weights=torch.rand(batch, 3, tokens, device=device))
        assert torch.equal(key_cache, before_k) and torch.equal(value_cache, before_v)


@pytest.mark.parametrize("device", DEVICES)
@torch.inference_mode()
def test_skipped_entries_may_carry_any_index(device):
    key, value = make_kv(1, 2, 4, 8, torch.float32, device, 6)
    key_cache, value_cache = make_paged_cache(2, 8, torch.float32, device, 6)
    slots = torch.tensor([[3, -1]], device=device)
    ops.write_compressed_kv(key_cache, value_cache, key, value, slots, index=torch.tensor([[1, 1000]], device=device))
    assert torch.equal(key_cache[0, 3], key[0, :, 1])


@pytest.mark.parametrize("device", DEVICES)
@torch.inference_mode()
def test_check_false_skips_out_of_range_entries(device):
    """Without the range check the kernels skip bad entries instead of writing out of bounds."""
    key, value = make_kv(1, 2, 4, 8, torch.float32, device, 7)
    key_cache, value_cache = make_paged_cache(2, 8, torch.float32, device, 7)
    before = key_cache.clone()
    slots = torch.tensor([[2, 10_000, 5, -7]], device=device)
    index = torch.tensor([[1, 0, 99, 0]], device=device)
    ops.write_compressed_kv(key_cache, value_cache, key, value, slots, index=index, check=False)
    assert torch.equal(key_cache.view(-1, 2, 8)[2], key[0, :, 1])
    changed = (key_cache != before).flatten(2).any(-1).flatten()
    assert changed.nonzero().flatten().tolist() == [2]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["index", "weights"])
def test_opcheck(device, form):
    key, value = make_kv(2, 2, 6, 8, torch.float16, device, 8)
    key_cache, value_cache = make_paged_cache(2, 8, torch.float32, device, 8)
    slots = torch.tensor([[0, -1, 7], [12, 13, 30]], device=device)
    if form == "index":
        kwargs = {"index": torch.tensor([[0, 5, 2], [1, 1, 4]], device=device)}
    else:
        kwargs = {"weights": torch.softmax(torch.randn(2, 3, 6), -1).to(device)}
    torch.library.opcheck(
        torch.ops.etc_ext.write_compressed_kv.default, (key_cache, value_cache, key, value, slots), kwargs
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["index", "weights"])
def test_compile(device, form):
    key, value = make_kv(2, 2, 6, 8, torch.float32, device, 9)
    slots = torch.tensor([[0, -1, 7], [12, 13, 30]], device=device)
    if form == "index":
        kwargs = {"index": torch.tensor([[0, 5, 2], [1, 1, 4]], device=device)}
    else:
        kwargs = {"weights": torch.softmax(torch.randn(2, 3, 6), -1).to(device)}

    def step(key_cache, value_cache, key, value, slots):
        ops.write_compressed_kv(key_cache, value_cache, key * 2, value + 1, slots, **kwargs)
        return key_cache.sum()

    compiled = torch.compile(step, fullgraph=True)
    caches = make_paged_cache(2, 8, torch.float32, device, 9)
    expected = [c.clone() for c in caches]
    got_sum = compiled(*caches, key, value, slots)
    exp_sum = step(*expected, key, value, slots)
    torch.testing.assert_close(caches[0], expected[0])
    torch.testing.assert_close(caches[1], expected[1])
    torch.testing.assert_close(got_sum, exp_sum)


def test_bad_inputs():
    key, value = make_kv(2, 2, 6, 8, torch.float32, "cpu", 10)
    key_cache, value_cache = make_paged_cache(2, 8, torch.float32, "cpu", 10)
    slots = torch.tensor([[0, 1, 2], [3, 4, 5]])
    index = torch.zeros(2, 3, dtype=torch.int64)
    w = torch.rand(2, 3, 6)
    cases = [
        (lambda call: call(key_cache, value_cache, key, value, slots), ValueError, "exactly one of weights [B, K, N] or index [B, K], got neither"),
        (lambda call: call(key_cache, value_cache, key, value, slots, index=index, weights=w), ValueError, "got both"),
        (lambda call: call(key_cache, value_cache, key[0], value, slots, index=index), ValueError, "key must be a 4-D tensor"),
        (lambda call: call(key_cache, value_cache, key, value[:, :1], slots, index=index), ValueError, "value must have shape"),
        (lambda call: call(key_cache[..., :4], value_cache, key, value, slots, index=index), ValueError, "key_cache must have shape [num_blocks, block_size, Hkv, D] with Hkv = 2 and D = 8"),
        (lambda call: call(key_cache, value_cache[:3], key, value, slots, index=index), ValueError, "value_cache must have shape"),
        (lambda call: call(key_cache, value_cache, key.half(), value, slots, index=index), TypeError, "value must have the dtype of key"),
        (lambda call: call(key_cache.int(), value_cache.int(), key, value, slots, index=index), TypeError, "key_cache must be float32"),
        (lambda call: call(key_cache, value_cache.half(), key, value, slots, index=index), TypeError, "value_cache must have the dtype of key_cache"),
        (lambda call: call(key_cache, value_cache, key, value, slots.int(), index=index), TypeError, "slot_mapping must have dtype torch.int64"),
        (lambda call: call(key_cache, value_cache, key, value, slots[:1], index=index), ValueError, "slot_mapping must have shape [B, K] with B = 2"),
        (lambda call: call(key_cache, value_cache, key, value, slots, index=index[:, :2]), ValueError, "index must have shape [B, K] like slot_mapping = [2, 3], got [2, 2]"),
        (lambda call: call(key_cache, value_cache, key, value, slots, index=index.int()), TypeError, "index must have dtype torch.int64"),
        (lambda call: call(key_cache, value_cache, key, value, slots, weights=w[..., :5]), ValueError, "weights must have shape [B, K, N] = [2, 3, 6], got [2, 3, 5]"),
        (lambda call: call(key_cache, value_cache, key, value, slots, weights=w.half()), TypeError, "weights must have dtype torch.float32"),
        (lambda call: call(key_cache.to("meta"), value_cache, key, value, slots, index=index), ValueError, "key_cache must be on the device of key (cpu), got meta"),
        (lambda call: call(key_cache, value_cache, key, value, slots.to("meta"), index=index), ValueError, "slot_mapping must be on the device of key"),
        (lambda call: call(key_cache, value_cache, key, value, slots, index=index.to("meta")), ValueError, "index must be on the device of key"),
        (lambda call: call(key_cache, value_cache, key, value.to("meta"), slots, index=index), ValueError, "value must be on the device of key"),
    ]
    # The wrapper, torch.ops.etc_ext.write_compressed_kv (the C++ checks) and the fake (traced calls) refuse alike,
    # and nothing is written.
    functions = (ops.write_compressed_kv, torch.ops.etc_ext.write_compressed_kv.default,
                 kv_write._write_compressed_kv_fake)  # fmt: skip
    before = key_cache.clone()
    for call, error, message in cases:
        assert_refused_alike(functions, call, error, message)
    assert torch.equal(key_cache, before)


def _overlapping_cases(key, value, key_cache, value_cache):
    """(name, key_cache, value_cache, key, value, message) calls whose written memory is shared."""
    num_blocks, block_size, heads, dim = key_cache.shape
    expanded = key_cache[:, :1].expand(num_blocks, block_size, heads, dim)  # stride 0: slots share memory
    storage = torch.zeros(num_blocks * block_size * heads * dim, dtype=key_cache.dtype, device=key_cache.device)
    overlapping = storage.as_strided(key_cache.shape, (block_size * heads * dim // 2, heads * dim, dim, 1))
    flat_key = key_cache.reshape(-1, heads, dim)  # key [B, Hkv, N, D] as a view of key_cache
    key_view = flat_key[: key.shape[0] * key.shape[2]].view(key.shape[0], key.shape[2], heads, dim).transpose(1, 2)
    return [
        ("expanded", expanded, value_cache, key, value, "key_cache has elements that share memory"),
        ("overlapping_blocks", key_cache, overlapping, key, value, "value_cache has elements that share memory"),
        ("same_tensor", key_cache, key_cache, key, value, "key_cache and value_cache share memory"),
        ("key_in_key_cache", key_cache, value_cache, key_view, value, "key shares memory with key_cache"),
        ("value_in_key_cache", key_cache, value_cache, key, key_view, "value shares memory with key_cache"),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["index", "weights"])
@torch.inference_mode()
def test_overlapping_memory_is_refused(device, form):
    """The op writes in place, in parallel: shared memory among the written or between written and read elements
    would give wrong values silently. Each case raises ValueError naming the arguments; nothing is written."""
    key, value = make_kv(2, 2, 6, 8, torch.float32, device, 12)
    key_cache, value_cache = make_paged_cache(2, 8, torch.float32, device, 12)
    slots = torch.tensor([[20, 21, 22], [30, 31, 32]], device=device)  # away from the slots key_view covers
    form_kwargs = {"index": torch.tensor([[0, 1, 2], [3, 4, 5]], device=device)} if form == "index" else {
        "weights": torch.softmax(torch.randn(2, 3, 6), -1).to(device)}  # fmt: skip
    for name, k_cache, v_cache, k, v, message in _overlapping_cases(key, value, key_cache, value_cache):
        before = [t.clone() for t in (key_cache, value_cache)]
        with pytest.raises(ValueError, match=message):
            ops.write_compressed_kv(k_cache, v_cache, k, v, slots, **form_kwargs)
        with pytest.raises(ValueError, match=message):  # the op itself (what the compaction calls)
            torch.ops.etc_ext.write_compressed_kv.default(k_cache, v_cache, k, v, slots, **form_kwargs)
        assert torch.equal(key_cache, before[0]) and torch.equal(value_cache, before[1]), name


@pytest.mark.parametrize("device", DEVICES)
@torch.inference_mode()
def test_interleaved_caches_in_one_storage(device):
    """Two caches in one tensor that share no element are accepted: vLLM's CPU layout, where each block holds
    `[Hkv, block_size, 2 * D]` with the key in the first D channels and the value in the last D."""
    heads, dim = 2, 8
    key, value = make_kv(2, heads, 6, dim, torch.float32, device, 13)
    storage = torch.randn(NUM_BLOCKS, heads, BLOCK_SIZE, 2 * dim, device=device)
    key_cache = storage[..., :dim].transpose(1, 2)  # [num_blocks, block_size, Hkv, D]
    value_cache = storage[..., dim:].transpose(1, 2)
    slots = torch.tensor([[0, 6, 13], [20, 27, 34]], device=device)
    index = torch.tensor([[0, 5, 2], [1, 3, 4]], device=device)
    ref_k, ref_v = run_both(key_cache, value_cache, key, value, slots, index=index)
    assert torch.equal(key_cache, ref_k) and torch.equal(value_cache, ref_v)


@pytest.mark.parametrize("device", DEVICES)
def test_grad_requiring_inputs_are_refused(device):
    """The op is not differentiable and writes in place: a cache that requires grad (a leaf) or a key/value that
    requires grad (its gradient would be dropped) raise while grad mode is on, like torch's in-place ops; under
    torch.no_grad() the same calls write."""
    key, value = make_kv(1, 2, 4, 8, torch.float32, device, 14)
    key_cache, value_cache = make_paged_cache(2, 8, torch.float32, device, 14)
    slots, index = torch.tensor([[3, 4]], device=device), torch.tensor([[1, 2]], device=device)
    leaf_cache = key_cache.clone().requires_grad_()
    grad_key = key.clone().requires_grad_()
    cases = [
        ((leaf_cache, value_cache, key, value), "key_cache requires grad"),
        ((key_cache, value_cache.clone().requires_grad_(), key, value), "value_cache requires grad"),
        ((key_cache, value_cache, grad_key, value), r"key requires grad, but write_compressed_kv is not differentiable"),
        ((key_cache, value_cache, key, value * torch.ones(1, device=device, requires_grad=True)), "value requires grad"),
    ]
    before = key_cache.clone()
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            ops.write_compressed_kv(*args, slots, index=index)
    assert torch.equal(key_cache, before)
    with torch.no_grad():
        ops.write_compressed_kv(leaf_cache, value_cache, grad_key, value, slots, index=index)
    assert torch.equal(leaf_cache.detach()[0, 3], key[0, :, 1])
