"""etc_ext.cache: compaction of every layer of a KV cache, on a transformers DynamicCache
filled by a real (tiny, random) Llama forward pass and on plain lists, against a per-layer
index_select/gather loop."""

import pytest
import torch
from conftest import DEVICES

import etc_ext  # noqa: F401
from etc_ext.cache import compact_dynamic_cache, compact_kv_layers

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]
SEQ_LEN = 40


def tiny_llama(device, dtype):
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def gather_positions(t, keep):
    """The baseline: (B, Hkv, L, D) -> (B, Hkv, K, D) with torch.gather."""
    return t.gather(2, keep[:, None, :, None].expand(t.shape[0], t.shape[1], keep.shape[1], t.shape[3]))


def filled_cache(model, device, batch=2):
    torch.manual_seed(1)
    input_ids = torch.randint(0, model.config.vocab_size, (batch, SEQ_LEN), device=device)
    with torch.no_grad():
        out = model(input_ids=input_ids, use_cache=True)
    assert isinstance(out.cache, DynamicCache)
    return input_ids, out.cache


def keep_index_for(batch, device):
    # Prefix (0..4), compression tokens (30..31), the text after (32..39); row 1 keeps a
    # different set, as rows with images at different places would.
    rows = [
        list(range(0, 5)) + [30, 31] + list(range(32, 40)),
        list(range(0, 3)) + [20, 21, 25] + list(range(31, 40)),
    ]
    return torch.tensor(rows[:batch], device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@torch.inference_mode()
def test_compact_dynamic_cache_matches_gather(device, dtype):
    model = tiny_llama(device, dtype)
    _, cache = filled_cache(model, device)
    keep = keep_index_for(2, device)
    originals = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    assert len(originals) == model.config.num_hidden_layers
    assert originals[0][0].shape == (2, 2, SEQ_LEN, 16)

    compact_dynamic_cache(cache, keep)

    assert cache.get_seq_length() == keep.shape[1]
    for (key, value), layer in zip(originals, cache.layers):
        assert layer.keys.shape == (2, 2, keep.shape[1], 16) and layer.keys.dtype == dtype
        torch.testing.assert_close(layer.keys, gather_positions(key, keep), rtol=0, atol=0)
        torch.testing.assert_close(layer.values, gather_positions(value, keep), rtol=0, atol=0)
        # index_select per row: the same.
        for b in range(2):
            torch.testing.assert_close(layer.keys[b], key[b].index_select(1, keep[b]), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@torch.inference_mode()
def test_decoding_continues_on_compacted_cache(device):
    """A decode step on the compacted cache gives the logits of the same step on a cache
    compacted with index_select (keeping the original positions)."""
    model = tiny_llama(device, torch.float32)
    input_ids, cache = filled_cache(model, device, batch=1)
    keep = keep_index_for(1, device)
    baseline = DynamicCache()
    for i, layer in enumerate(cache.layers):
        baseline.update(layer.keys.index_select(2, keep[0]), layer.values.index_select(2, keep[0]), i)
    compact_dynamic_cache(cache, keep)

    next_ids = torch.tensor([[5]], device=device)
    position_ids = torch.tensor([[SEQ_LEN]], device=device)  # positions are not renumbered
    step = dict(input_ids=next_ids, position_ids=position_ids, use_cache=True)
    ours = model(**step, cache=cache).logits
    expected = model(**step, cache=baseline).logits
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    assert cache.get_seq_length() == keep.shape[1] + 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@torch.inference_mode()
def test_compact_kv_layers_list(device, dtype):
    """Plain list of 32 layers, heads/dims that differ per layer, strided inputs."""
    torch.manual_seed(2)
    batch, length = 2, 37
    layers = []
    for i in range(32):
        heads, dim = (2, 8) if i % 2 else (4, 16)
        base = torch.randn(batch, length, heads, dim, device=device).to(dtype)
        layers.append((base.transpose(1, 2), torch.randn(batch, heads, length, dim, device=device).to(dtype)))
    keep = torch.tensor([[0, 1, 36, 20], [3, 3, 0, 36]], device=device)  # repeats are allowed
    out = compact_kv_layers(layers, keep)
    assert len(out) == 32
    for (key, value), (new_key, new_value) in zip(layers, out):
        torch.testing.assert_close(new_key, gather_positions(key, keep), rtol=0, atol=0)
        torch.testing.assert_close(new_value, gather_positions(value, keep), rtol=0, atol=0)
        assert new_key.is_contiguous()
    assert compact_kv_layers([], keep) == []


@pytest.mark.parametrize("device", DEVICES)
@torch.inference_mode()
def test_bad_keep_index_changes_nothing(device):
    model = tiny_llama(device, torch.float32)
    _, cache = filled_cache(model, device)
    before = [layer.keys for layer in cache.layers]
    cases = [
        (torch.tensor([[0, SEQ_LEN], [0, 1]], device=device), ValueError, "keep_index must be in [0, L) = [0, 40)"),
        (torch.tensor([[0, -1], [0, 1]], device=device), ValueError, "got values in [-1, 1]"),
        (torch.tensor([[0, 1]], device=device), ValueError, "keep_index must have shape [B, K] with B = 2"),
        (torch.tensor([[0, 1], [0, 1]], device=device, dtype=torch.int32), TypeError, "keep_index must have dtype torch.int64"),
        (torch.tensor([[0, 1], [0, 1]], device="meta"), ValueError, "keep_index must be on the device of the cache"),
        ([[0, 1], [0, 1]], TypeError, "keep_index must be a torch.Tensor"),
    ]
    for keep, error, message in cases:
        with pytest.raises(error) as info:
            compact_dynamic_cache(cache, keep)
        assert message in str(info.value), str(info.value)
        assert all(layer.keys is key for layer, key in zip(cache.layers, before))
        assert cache.get_seq_length() == SEQ_LEN
    with pytest.raises(TypeError, match="expected a transformers DynamicCache"):
        compact_dynamic_cache([(before[0], before[0])], torch.zeros(2, 1, dtype=torch.int64, device=device))


def test_sliding_window_layers_are_rejected():
    from transformers.cache_utils import DynamicSlidingWindowLayer

    cache = DynamicCache()
    cache.layers = [DynamicSlidingWindowLayer(sliding_window=4)]
    cache.layers[0].update(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8))
    with pytest.raises(TypeError, match="DynamicSlidingWindowLayer"):
        compact_dynamic_cache(cache, torch.zeros(1, 1, dtype=torch.int64))


def test_uninitialized_layers_are_left_alone():
    cache = DynamicCache()
    cache.update(torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), 0)
    cache.update(torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), 2)  # layer 1 stays empty
    assert not cache.layers[1].is_initialized
    keys = cache.layers[2].keys.clone()
    compact_dynamic_cache(cache, torch.tensor([[5, 0]]))
    assert cache.layers[0].keys.shape[2] == 2 and not cache.layers[1].is_initialized
    torch.testing.assert_close(cache.layers[2].keys, keys[:, :, [5, 0]], rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@torch.inference_mode()
def test_empty_slots_and_selected_layers(device):
    """-1 leaves an empty (zero) slot with `empty_slots=True` (ETC's right-aligned indices); `layers=` compacts only
    those layers (FastV-style pruning of the first layers); -1 without `empty_slots` is refused."""
    model = tiny_llama(device, torch.float32)
    _, cache = filled_cache(model, device)
    originals = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    keep = torch.tensor([[-1, -1, 3, 7], [0, 5, 6, 39]], device=device)
    with pytest.raises(ValueError, match=r"keep_index must be in \[0, L\)"):
        compact_dynamic_cache(cache, keep)
    compact_dynamic_cache(cache, keep, layers=[0], empty_slots=True)
    first = cache.layers[0]
    assert first.keys.shape[2] == 4
    assert torch.count_nonzero(first.keys[0, :, :2]) == 0 and torch.count_nonzero(first.values[0, :, :2]) == 0
    torch.testing.assert_close(first.keys[0, :, 2:], gather_positions(originals[0][0], keep.clamp_min(0))[0, :, 2:])
    torch.testing.assert_close(first.values[1], gather_positions(originals[0][1], keep.clamp_min(0))[1], rtol=0, atol=0)
    for (key, _), layer in zip(originals[1:], cache.layers[1:]):  # untouched
        assert torch.equal(layer.keys, key)
