"""Compaction of every layer of a KV cache, keeping given positions per batch row.

ETC keeps the prefix and the compression tokens of each image and drops its visual tokens
from every layer's cache. These helpers do that for all layers with one validation and one
`write_compressed_kv_layers(index=...)` call (per-layer `write_compressed_kv` calls where
the layers' layouts differ; no Python loop of index_select/gather calls):

- :func:`compact_kv_layers` on a plain list of per-layer `(key, value)` tensors
  `(B, Hkv, L, D)`, returns the compacted list `(B, Hkv, K, D)`;
- :func:`compact_dynamic_cache` on a transformers `DynamicCache`, in place: every layer's
  `keys` / `values` `(B, Hkv, L, D)` become `(B, Hkv, K, D)`. It is the one compaction ETC's
  prefill and the baselines run (`empty_slots=True` for right-aligned indices with -1 in
  front, `layers=` for FastV-style pruning of the first layers only).

The compressed cache itself: `ETCCache` (a `DynamicCache` with an `ETCCacheState`: which entries are real, how
user-layout positions map onto it). Saving and loading one: `etc_ext.cache_store`; continuing one:
`etc_ext.continuation`.

Positions are kept, not renumbered: the caller keeps passing the original position ids (or
cache_position) for later tokens; `cache.get_seq_length()` becomes K.
"""

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from transformers.cache_utils import DynamicCache

from .ops.checks import same_layout

__all__ = ["compact_kv_layers", "compact_dynamic_cache", "ETCCacheState", "ETCCache"]

_OP = "compact_kv"


def _check_keep_index(
    keep_index, batch: int, lengths: Sequence[int], device, check: bool, empty_slots: bool = False
) -> None:
    """keep_index: int64 [B, K] with 0 <= keep_index < L for every layer (-1 too with `empty_slots`; one host
    sync)."""
    if not isinstance(keep_index, torch.Tensor):
        raise TypeError(f"{_OP}: keep_index must be a torch.Tensor [B, K], got {type(keep_index).__name__}")
    if keep_index.dim() != 2 or keep_index.shape[0] != batch:
        raise ValueError(f"{_OP}: keep_index must have shape [B, K] with B = {batch}, got {list(keep_index.shape)}")
    if keep_index.dtype != torch.int64:
        raise TypeError(f"{_OP}: keep_index must have dtype torch.int64, got {keep_index.dtype}")
    if keep_index.device != device:
        raise ValueError(f"{_OP}: keep_index must be on the device of the cache ({device}), got {keep_index.device}")
    if check and keep_index.numel() > 0 and not torch.compiler.is_compiling():
        shortest = min(lengths)
        low, high = torch.stack([keep_index.min(), keep_index.max()]).tolist()
        lowest = -1 if empty_slots else 0
        if low < lowest or high >= shortest:
            allowed = f"[-1, L) = [-1, {shortest}) (-1 = empty slot)" if empty_slots else f"[0, L) = [0, {shortest})"
            raise ValueError(
                f"{_OP}: keep_index must be in {allowed} (the cached length), got values in [{low}, {high}]"
            )


def _check_pairs(pairs: Sequence[tuple], what: str) -> None:
    """Every layer: key and value 4-D [B, Hkv, L, D] of the same shape, dtype and device, and
    the same B and device in all layers. Done once, before anything is written."""
    first_key = pairs[0][0]
    for i, (key, value) in enumerate(pairs):
        name = f"{what}[{i}]"
        if not isinstance(key, torch.Tensor) or not isinstance(value, torch.Tensor):
            raise TypeError(f"{_OP}: {name} must hold (key, value) tensors [B, Hkv, L, D]")
        if key.dim() != 4 or value.shape != key.shape:
            raise ValueError(
                f"{_OP}: {name} key and value must be [B, Hkv, L, D] of one shape, got "
                f"{list(key.shape)} and {list(value.shape)}"
            )
        if value.dtype != key.dtype:
            raise TypeError(f"{_OP}: {name} value dtype {value.dtype} differs from key dtype {key.dtype}")
        if key.shape[0] != first_key.shape[0]:
            raise ValueError(f"{_OP}: {name} has batch size {key.shape[0]}, layer 0 has {first_key.shape[0]}")
        if key.device != first_key.device or value.device != key.device:
            raise ValueError(
                f"{_OP}: {name} is on {key.device}/{value.device}, layer 0 on {first_key.device}: "
                "all layers must share one device"
            )


def _compact_pairs(pairs: Sequence[tuple], keep_index: torch.Tensor, empty_slots: bool = False) -> list:
    """The compaction after validation, no checks: one `write_compressed_kv_layers` call for all layers when they
    share one layout (a model's cache does), else one `write_compressed_kv` call per layer. With `empty_slots`, -1
    entries of keep_index leave zeros."""
    batch, kept = keep_index.shape
    # The new (B, Hkv, K, D) tensor seen as a paged cache (B, K, Hkv, D): slot = b * K + k.
    slots = torch.arange(batch * kept, device=keep_index.device).view(batch, kept)
    if empty_slots:
        slots = torch.where(keep_index >= 0, slots, -1)
        keep_index = keep_index.clamp_min(0)
    allocate = torch.Tensor.new_zeros if empty_slots else torch.Tensor.new_empty
    out, new_keys, new_values, keys, values = [], [], [], [], []
    for key, value in pairs:
        b, heads, _, dim = key.shape
        new_key = allocate(key, (b, heads, kept, dim))
        new_value = allocate(value, (b, heads, kept, dim))
        out.append((new_key, new_value))
        new_keys.append(new_key.transpose(1, 2))
        new_values.append(new_value.transpose(1, 2))
        # detach: a cache is never differentiated through its compaction (the op is not differentiable).
        keys.append(key.detach() if key.requires_grad else key)
        values.append(value.detach() if value.requires_grad else value)
    if all(same_layout(t, ts[0]) for ts in (keys, values) for t in ts):
        torch.ops.etc_ext.write_compressed_kv_layers.default(new_keys, new_values, keys, values, slots, index=keep_index)
    else:
        write = torch.ops.etc_ext.write_compressed_kv.default
        for layer in zip(new_keys, new_values, keys, values):
            write(*layer, slots, index=keep_index)
    return out


def compact_kv_layers(
    layers: Sequence[tuple],
    keep_index: torch.Tensor,
    *,
    check: bool = True,
) -> list:
    """Keep positions `keep_index` of every layer of a KV cache given as a list.

    Args:
        layers: per layer `(key, value)`, each `(B, Hkv, L, D)` (any strides; all layers on
            one device and with the same B; Hkv, D, L and dtype may differ per layer).
        keep_index: int64 `(B, K)`: row b keeps positions keep_index[b, 0..K-1], in that
            order (e.g. the prefix and compression tokens, without the visual tokens).
        check: validate keep_index against the shortest layer first (one host sync).

    Returns:
        list of `(key, value)` `(B, Hkv, K, D)`, new contiguous tensors.
    """
    layers = list(layers)
    if not layers:
        return []
    _check_pairs(layers, "layers")
    key0 = layers[0][0]
    _check_keep_index(keep_index, key0.shape[0], [k.shape[2] for k, _ in layers], key0.device, check)
    return _compact_pairs(layers, keep_index)


def compact_dynamic_cache(
    cache,
    keep_index: torch.Tensor,
    *,
    layers: Optional[Sequence[int]] = None,
    empty_slots: bool = False,
    check: bool = True,
) -> None:
    """Keep positions `keep_index` in every layer of a transformers DynamicCache, in place.

    Args:
        cache: a `transformers.DynamicCache` whose layers are `DynamicLayer`s
            (`cache.layers[i].keys` / `.values` `(B, Hkv, L, D)`). Layers not yet initialized
            (e.g. KV-sharing consumers) are left alone. Sliding-window and other layer types
            raise TypeError: their stored positions are not the positions of keep_index.
        keep_index: int64 `(B, K)` on the cache's device: row b keeps positions
            keep_index[b, :], in that order.
        layers: indices of the layers to compact (default: all), e.g. only the layers that still
            hold every entry when the later ones were filled with the kept ones (FastV-style).
        empty_slots: allow -1 in keep_index: that slot stays empty (zeros; mask it out).
        check: validate keep_index first (one host sync); nothing is changed if it fails.

    Afterwards every initialized layer holds `(B, Hkv, K, D)` and `cache.get_seq_length()`
    is K. Positions are not renumbered.
    """
    from transformers.cache_utils import DynamicLayer

    cache_layers = getattr(cache, "layers", None)
    if cache_layers is None:
        raise TypeError(f"{_OP}: expected a transformers DynamicCache, got {type(cache).__name__}")
    selected = set(range(len(cache_layers))) if layers is None else set(layers)
    live = []
    for i, layer in enumerate(cache_layers):
        if i not in selected:
            continue
        if type(layer) is not DynamicLayer:
            raise TypeError(
                f"{_OP}: cache.layers[{i}] is a {type(layer).__name__}; compact_dynamic_cache supports "
                "DynamicLayer only (sliding-window layers do not store every position)"
            )
        if layer.is_initialized and layer.keys is not None and layer.keys.numel() > 0:
            live.append(i)
    if not live:
        return
    pairs = [(cache_layers[i].keys, cache_layers[i].values) for i in live]
    _check_pairs(pairs, "cache.layers")
    key0 = pairs[0][0]
    _check_keep_index(keep_index, key0.shape[0], [k.shape[2] for k, _ in pairs], key0.device, check, empty_slots)
    for i, (new_key, new_value) in zip(live, _compact_pairs(pairs, keep_index, empty_slots)):
        cache_layers[i].keys = new_key
        cache_layers[i].values = new_value


# ============================================================================ the compressed cache
@dataclass
class ETCCacheState:
    """What decoding needs to know about a compacted cache.

    Attributes:
        attention_mask: bool `(B, C0)`, which of the C0 entries after the prefill are real.
        input_length: length of the user's input_ids the prefill consumed (generate()'s 2-D attention mask covers
            these, then one column per new token).
        position_offset: `(B,)` M * images per row: user-layout position ids + offset = extended positions.
        next_position: `(B,)` position of the first token after the prompt.
        trailing_tokens: how many of the prefill's last entries are one token each in every row (the text after
            each row's last image): what `ETCCache.crop` may remove besides the entries added since.
    """

    attention_mask: torch.Tensor
    input_length: int
    position_offset: torch.Tensor
    next_position: torch.Tensor
    trailing_tokens: int = 0

    @property
    def prefill_length(self) -> int:
        return self.attention_mask.shape[1]

    def covered_length(self, cache_length: int) -> int:
        """How many tokens of the user's sequence a cache of `cache_length` entries holds: the prefill's input,
        then one token per entry added since."""
        return self.input_length + cache_length - self.prefill_length

    def decode_inputs(
        self,
        cache_length: int,
        query_length: int,
        attention_mask: Optional[torch.Tensor],
        position_ids: Optional[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """2-D attention mask `(B, cache_length + query_length)` and positions `(B, query_length)` for new tokens.

        Args:
            attention_mask: the user's 2-D mask `(B, input_length + new tokens so far)` as generate() grows it, or None.
            position_ids: user-layout positions `(B, query_length)` of the new tokens, or None.
        """
        batch_size = self.attention_mask.shape[0]
        device = self.attention_mask.device
        new_columns = cache_length - self.prefill_length + query_length
        if attention_mask is None:
            tail = torch.ones(batch_size, new_columns, dtype=torch.bool, device=device)
        else:
            tail = attention_mask[:, self.input_length :].bool().to(device)
            if tail.shape[1] != new_columns:
                raise ValueError(
                    f"attention_mask has {attention_mask.shape[1]} columns; with an ETC cache it must cover the "
                    f"{self.input_length} prompt tokens plus the {new_columns} tokens since (got {tail.shape[1]})."
                )
        mask = torch.cat([self.attention_mask, tail], dim=1).long()
        if position_ids is None:
            start = self.next_position + (cache_length - self.prefill_length)
            positions = start[:, None] + torch.arange(query_length, device=device)[None]
        else:
            positions = position_ids.to(device) + self.position_offset[:, None]
        return mask, positions

    def drop_trailing_tokens(self, count: int) -> None:
        """Forget the prefill's last `count` tokens (their entries were cropped from the cache)."""
        if not 0 <= count <= self.trailing_tokens:
            raise ValueError(f"can drop 0 to {self.trailing_tokens} of the prefill's trailing tokens, got {count}")
        if count:
            self.attention_mask = self.attention_mask[:, :-count]
            self.input_length -= count
            self.next_position = self.next_position - count
            self.trailing_tokens -= count

    def _map(self, fn) -> None:
        self.attention_mask = fn(self.attention_mask)
        self.position_offset = fn(self.position_offset)
        self.next_position = fn(self.next_position)


class ETCCache(DynamicCache):
    """A `DynamicCache` that holds a compacted ETC prefill (M entries per image per layer) and its `etc_state`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.etc_state: Optional[ETCCacheState] = None

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        if self.etc_state is not None:
            self.etc_state._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        if self.etc_state is not None:
            self.etc_state._map(lambda t: t[indices.to(t.device)])

    def crop(self, tokens_to_remove: int):
        """Drop the last `-tokens_to_remove` entries (assisted decoding's rollback of rejected candidates): entries
        added after the compressed prefill, then the prefill's trailing text tokens (one entry each); never an
        image's compressed entries."""
        if self.etc_state is not None and tokens_to_remove < 0:
            state = self.etc_state
            added = self.get_seq_length() - state.prefill_length
            if -tokens_to_remove > added + state.trailing_tokens:
                raise ValueError(
                    f"ETCCache.crop({tokens_to_remove}): only the last {added + state.trailing_tokens} entries are one "
                    "token each (the text after the last image and what came after the prefill); the entries before "
                    "them hold compressed images"
                )
            state.drop_trailing_tokens(max(-tokens_to_remove - added, 0))
        super().crop(tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        if self.etc_state is not None:
            self.etc_state._map(lambda t: t.index_select(0, beam_idx.to(t.device)))
