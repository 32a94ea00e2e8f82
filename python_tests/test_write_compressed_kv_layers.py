"""write_compressed_kv_layers (write_compressed_kv for every layer of a cache in one call) against the per-layer
reference: both forms, paged and Hugging Face layouts, dtype conversions, strided caches, more layers than one CUDA
launch takes; the layers' common layout and their memory checked before anything is written; opcheck and
torch.compile; and the compaction helpers that use it. CUDA variants run when a GPU is present."""

import pytest
import torch
import test_write_compressed_kv as kv_tests
from conftest import DEVICES, assert_refused_alike

from etc_ext import ops, reference
from etc_ext.cache import compact_kv_layers
from etc_ext.ops import kv_write

NUM_SLOTS = kv_tests.NUM_BLOCKS * kv_tests.BLOCK_SIZE


def make_layers(layers, dtype, cache_dtype, device, seed, kv_heads=3, tokens=19, dim=17):
    keys, values, key_caches, value_caches = [], [], [], []
    for layer in range(layers):
        key, value = kv_tests.make_kv(2, kv_heads, tokens, dim, dtype, device, seed + layer)
        key_cache, value_cache = kv_tests.make_paged_cache(kv_heads, dim, cache_dtype, device, seed + layer)
        keys.append(key), values.append(value), key_caches.append(key_cache), value_caches.append(value_cache)
    return key_caches, value_caches, keys, values


def form_inputs(form, device, entries=10, tokens=19, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if form == "index":
        index = torch.stack([torch.arange(2, 2 + entries), torch.randperm(tokens, generator=gen)[:entries]])
        return {"index": index.to(device)}
    return {"weights": torch.softmax(torch.randn(2, entries, tokens, generator=gen), -1).to(device)}


def assert_like_per_layer_reference(key_caches, value_caches, keys, values, slots, tolerance=None, **form):
    expected_k = [c.clone() for c in key_caches]
    expected_v = [c.clone() for c in value_caches]
    reference.write_compressed_kv_layers(expected_k, expected_v, keys, values, slots, **form)
    ops.write_compressed_kv_layers(key_caches, value_caches, keys, values, slots, **form)
    for got, want in zip(key_caches + value_caches, expected_k + expected_v):
        if tolerance is None:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got.double(), want.double(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", kv_tests.DTYPES)
@pytest.mark.parametrize("cache_dtype", kv_tests.DTYPES)
@pytest.mark.parametrize("form", ["index", "weights"])
@torch.inference_mode()
def test_matches_per_layer_reference(device, dtype, cache_dtype, form):
    key_caches, value_caches, keys, values = make_layers(5, dtype, cache_dtype, device, seed=1)
    slots = kv_tests.make_slots(2, 10, NUM_SLOTS, device, seed=1)
    # Copies are exact; merges round once per accumulation (fp32, as write_compressed_kv).
    tolerance = None if form == "index" else kv_tests.TOLERANCES[cache_dtype][0]
    assert_like_per_layer_reference(key_caches, value_caches, keys, values, slots, tolerance,
                                    **form_inputs(form, device))  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@torch.inference_mode()
def test_more_layers_than_one_launch(device):
    """70 layers: two CUDA launches (64 layers each at most); every layer written from its own key."""
    key_caches, value_caches, keys, values = make_layers(70, torch.bfloat16, torch.bfloat16, device, seed=2, tokens=6,
                                                         dim=8, kv_heads=1)  # fmt: skip
    slots = torch.tensor([[0, 1, 2], [10, 11, 12]], device=device)
    index = torch.tensor([[5, 0, 3], [1, 2, 4]], device=device)
    assert_like_per_layer_reference(key_caches, value_caches, keys, values, slots, index=index)


@pytest.mark.parametrize("device", DEVICES)
@torch.inference_mode()
def test_hugging_face_layout_and_strided_caches(device):
    """Per-layer caches (B, Hkv, L, D) passed as .transpose(1, 2), and key/value sliced out of a longer sequence."""
    keys = [torch.randn(2, 4, 40, 32, device=device)[:, :, 3:30] for _ in range(4)]
    values = [torch.randn(2, 4, 40, 32, device=device)[:, :, 3:30] for _ in range(4)]
    caches = [torch.zeros(2, 4, 12, 32, device=device) for _ in range(8)]
    slots = (torch.arange(12, device=device) + torch.tensor([[0], [12]], device=device))
    index = torch.stack([torch.arange(12), torch.arange(15, 27)]).to(device)
    key_caches = [c.transpose(1, 2) for c in caches[:4]]
    value_caches = [c.transpose(1, 2) for c in caches[4:]]
    assert_like_per_layer_reference(key_caches, value_caches, keys, values, slots, index=index)
    for key, cache in zip(keys, caches[:4]):  # the cache holds the kept positions, in order
        assert torch.equal(cache[1], key[1, :, 15:27])


def _bad_calls(key_caches, value_caches, keys, values, slots, index):
    other = [t.clone() for t in key_caches]
    wide = torch.zeros(kv_tests.NUM_BLOCKS, kv_tests.BLOCK_SIZE, 3, 34)[..., ::2]  # the shape, other strides
    return [
        (lambda call: call(key_caches, value_caches, [], [], slots, index=index), ValueError, "keys must hold at least one layer, got an empty list"),
        (lambda call: call(key_caches, value_caches[:2], keys, values, slots, index=index), ValueError, "must hold one tensor per layer, got 3, 2, 3 and 3"),
        (lambda call: call(key_caches, value_caches, keys[:2] + [keys[2][:, :1]], values, slots, index=index), ValueError, "write_compressed_kv_layers: layer 2: write_compressed_kv: value must have shape"),
        (lambda call: call(key_caches, value_caches, keys, values[:1] + [values[1].half()] + values[2:], slots, index=index), TypeError, "write_compressed_kv_layers: layer 1: write_compressed_kv: value must have the dtype of key"),
        (lambda call: call(key_caches, value_caches, keys, values, slots, index=index.int()), TypeError, "layer 0: write_compressed_kv: index must have dtype torch.int64"),
        (lambda call: call(key_caches[:2] + [key_caches[2].half()], value_caches[:2] + [value_caches[2].half()], keys, values, slots, index=index), ValueError, "key_caches[2] must have the shape, strides and dtype of key_caches[0]"),
        (lambda call: call(key_caches[:1] + [wide] + key_caches[2:], value_caches, keys, values, slots, index=index), ValueError, "key_caches[1] must have the shape, strides and dtype of key_caches[0] ([7, 5, 3, 17], strides [255, 51, 17, 1], torch.float32), got [7, 5, 3, 17], strides [510, 102, 34, 2]"),
        (lambda call: call(other, value_caches, keys, values, slots, index=index, weights=torch.rand(2, 10, 19)), ValueError, "got both"),
    ]  # fmt: skip


def test_bad_inputs_are_refused_alike_and_nothing_is_written():
    key_caches, value_caches, keys, values = make_layers(3, torch.float32, torch.float32, "cpu", seed=3)
    slots = kv_tests.make_slots(2, 10, NUM_SLOTS, "cpu", seed=3)
    index = form_inputs("index", "cpu")["index"]
    functions = (ops.write_compressed_kv_layers, torch.ops.etc_ext.write_compressed_kv_layers.default,
                 kv_write._write_compressed_kv_layers_fake)  # fmt: skip
    before = [c.clone() for c in key_caches + value_caches]
    for call, error, message in _bad_calls(key_caches, value_caches, keys, values, slots, index):
        assert_refused_alike(functions, call, error, message)
    assert all(torch.equal(c, b) for c, b in zip(key_caches + value_caches, before))


def test_out_of_range_slots_and_indices_are_checked_once_for_all_layers():
    key_caches, value_caches, keys, values = make_layers(3, torch.float32, torch.float32, "cpu", seed=4)
    before = [c.clone() for c in key_caches + value_caches]
    slots = kv_tests.make_slots(2, 10, NUM_SLOTS, "cpu", seed=4)
    index = form_inputs("index", "cpu")["index"]
    bad_index = index.clone()
    bad_index[1, 3] = 19
    slots[1, 3] = 7
    with pytest.raises(ValueError, match=r"index\[1, 3\] = 19 is out of range \[0, N\) = \[0, 19\)"):
        ops.write_compressed_kv_layers(key_caches, value_caches, keys, values, slots, index=bad_index)
    bad_slots = slots.clone()
    bad_slots[0, 2] = NUM_SLOTS
    with pytest.raises(ValueError, match=rf"slot_mapping\[0, 2\] = {NUM_SLOTS} is out of range"):
        ops.write_compressed_kv_layers(key_caches, value_caches, keys, values, bad_slots, index=index)
    assert all(torch.equal(c, b) for c, b in zip(key_caches + value_caches, before))


def test_layers_sharing_memory_are_refused():
    """Layers are written in parallel: one layer's cache may not be another layer's cache, key or value."""
    key_caches, value_caches, keys, values = make_layers(3, torch.float32, torch.float32, "cpu", seed=5)
    slots = kv_tests.make_slots(2, 10, NUM_SLOTS, "cpu", seed=5)
    index = form_inputs("index", "cpu")["index"]
    before = [c.clone() for c in key_caches + value_caches]
    same_cache = key_caches[:2] + [key_caches[0]]
    with pytest.raises(ValueError, match=r"key_caches\[0\] shares memory with key_caches\[2\]"):
        ops.write_compressed_kv_layers(same_cache, value_caches, keys, values, slots, index=index)
    # Layer 1's cache is a view of layer 0's keys (which layer 0 reads while layer 1 is written).
    key_caches_bad = [key_caches[0], keys[0].view(-1)[: 7 * 5 * 3 * 17].view(7, 5, 3, 17), key_caches[2]]
    with pytest.raises(ValueError, match=r"key_caches\[1\] shares memory with keys\[0\]"):
        ops.write_compressed_kv_layers(key_caches_bad, value_caches, keys, values, slots, index=index)
    assert all(torch.equal(c, b) for c, b in zip(key_caches + value_caches, before))
    # Slices of one stacked tensor share a storage but no element: accepted.
    stacked_k, stacked_v = torch.zeros(3, 7, 5, 3, 17), torch.zeros(3, 7, 5, 3, 17)
    assert_like_per_layer_reference(list(stacked_k), list(stacked_v), keys, values, slots, index=index)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["index", "weights"])
def test_opcheck(device, form):
    key_caches, value_caches, keys, values = make_layers(3, torch.float16, torch.float32, device, seed=6)
    slots = kv_tests.make_slots(2, 10, NUM_SLOTS, device, seed=6)
    torch.library.opcheck(torch.ops.etc_ext.write_compressed_kv_layers.default,
                          (key_caches, value_caches, keys, values, slots), form_inputs(form, device))  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
def test_compile(device):
    key_caches, value_caches, keys, values = make_layers(3, torch.float32, torch.float32, device, seed=7)
    slots = kv_tests.make_slots(2, 10, NUM_SLOTS, device, seed=7)
    index = form_inputs("index", device)["index"]

    def step(key_caches, value_caches, keys, values):
        ops.write_compressed_kv_layers(key_caches, value_caches, [k * 2 for k in keys], values, slots, index=index)
        return sum(c.sum() for c in key_caches)

    expected = ([c.clone() for c in key_caches], [c.clone() for c in value_caches])
    got = torch.compile(step, fullgraph=True)(key_caches, value_caches, keys, values)
    want = step(*expected, keys, values)
    torch.testing.assert_close(got, want)
    for a, b in zip(key_caches + value_caches, expected[0] + expected[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@torch.inference_mode()
def test_compaction_uses_one_call_and_matches_gather(device, monkeypatch):
    """compact_kv_layers: one write_compressed_kv_layers call when the layers share a layout, per-layer calls when
    they do not (here: one layer with other head counts); the same result either way."""
    calls = []
    for name in ("write_compressed_kv", "write_compressed_kv_layers"):
        original = getattr(torch.ops.etc_ext, name).default
        monkeypatch.setattr(getattr(torch.ops.etc_ext, name), "default",
                            lambda *a, _f=original, _n=name, **k: (calls.append(_n), _f(*a, **k))[1])  # fmt: skip
    keep = torch.tensor([[0, 1, 2, 20, 21], [3, 4, 5, 6, 29]], device=device)
    for heads in ([4, 4, 4, 4], [4, 2, 4, 4]):
        calls.clear()
        layers = [(torch.randn(2, h, 30, 16, device=device).bfloat16(), torch.randn(2, h, 30, 16, device=device).bfloat16())
                  for h in heads]  # fmt: skip
        out = compact_kv_layers(layers, keep)
        for (key, value), (new_key, new_value) in zip(layers, out):
            idx = keep[:, None, :, None].expand(2, key.shape[1], 5, 16)
            assert torch.equal(new_key, key.gather(2, idx)) and torch.equal(new_value, value.gather(2, idx))
        uniform = len(set(heads)) == 1
        assert calls == (["write_compressed_kv_layers"] if uniform else ["write_compressed_kv"] * len(heads))
