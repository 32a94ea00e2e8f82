"""The compressed sequence in terms of the user's: which entries the language model sees (`CompressedLayout`,
`shorten_sequence` for methods that replace each image by K tokens, `pruned_sequence` for FastV), the queries of the
text-to-image attention (`query_index`), and the decoding state of a baseline's prefill cache."""

from dataclasses import dataclass
from typing import Optional

import torch

from ..compress import ETCCacheState, ImageSpans, default_position_ids, right_aligned_index
from ..models.common import query_index  # noqa: F401  (re-exported: the methods pick their queries with it)

__all__ = [
    "query_index",
    "CompressedLayout",
    "shorten_sequence",
    "pruned_sequence",
    "BaselineCacheState",
    "cache_visual_entries",
    "user_next_position",
    "gather_positions",
    "last_position",
]


# ============================================================================ the compressed sequence
@dataclass
class CompressedLayout:
    """The language model's (shorter) sequence after compression, in terms of the user's sequence.

    Attributes:
        index: `(B, S)` user position of each entry (for an image's K entries: the placeholders they occupy), -1 at
            padding (rows are right-aligned).
        anchor: `(B, S)` increasing: the user position from which on an entry gives the user-layout logits, -1 at
            padding.
        position_ids: `(B, S)` positions of the entries (0 at padding), `(A, B, S)` for multi-axis positions.
        visual: bool `(B, S)`, True at visual entries.
    """

    index: torch.Tensor
    anchor: torch.Tensor
    position_ids: torch.Tensor
    visual: torch.Tensor

    @property
    def valid(self) -> torch.Tensor:
        return self.index >= 0  # (B, S)

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Per-user-token `values` `(B, L, *rest)` at the entries, `(B, S, *rest)` (zeros at padding)."""
        return _gather_rows(values, self.index)

    def user_index(self, length: int) -> torch.Tensor:
        """`(B, L)` entry whose output gives the logits at each user position: the last entry anchored at or
        before it."""
        positions = torch.arange(length, device=self.anchor.device).expand(self.anchor.shape[0], length)
        column = torch.searchsorted(self.anchor.contiguous(), positions.contiguous(), right=True) - 1
        return column.clamp_min(0)

    def cache_state(self, input_length: int, user_next_position: torch.Tensor) -> "BaselineCacheState":
        """The decoding state of a cache filled with this sequence (`user_next_position`: `(B,)` the user layout's
        position after each row's last token)."""
        next_position = last_position(self.position_ids, self.valid) + 1
        return BaselineCacheState(
            attention_mask=self.valid,
            input_length=input_length,
            position_offset=next_position - user_next_position,
            next_position=next_position,
            visual_mask=self.visual & self.valid,
        )


def _image_ranks(spans: ImageSpans, batch_size: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(B, L)` rank of each image token within its image (-1 elsewhere) and image id (-1 elsewhere)."""
    device = spans.row.device
    rank = torch.full((batch_size, length), -1, dtype=torch.long, device=device)
    image = torch.full_like(rank, -1)
    columns = torch.arange(length, device=device)[None]
    inside = (columns >= spans.start[:, None]) & (columns < spans.end[:, None])  # (I, L)
    image_ids, cols = inside.nonzero(as_tuple=True)
    rows = spans.row[image_ids]
    rank[rows, cols] = cols - spans.start[image_ids]
    image[rows, cols] = image_ids
    return rank, image


def shorten_sequence(
    spans: ImageSpans,
    attention_mask: Optional[torch.Tensor],
    position_ids: torch.Tensor,
    num_tokens: int,
    sources: Optional[torch.Tensor] = None,
) -> CompressedLayout:
    """Each image's N placeholders become K entries (the first K placeholders hold them), the others leave.

    Positions, without `sources` (1-D positions, LLaVA): the K entries of an image take its first K positions, and
    every later token moves up by N - K per earlier image, as if the image had been encoded to K tokens. With
    `sources` (M-RoPE, Qwen3-VL, where an image's positions are its 2-D grid): entry k of image i takes the positions
    of the visual token it stands for, user position `sources[i, k]` (a cell's centre, a kept token, a merge
    target), and every other token keeps its own, so at K = N nothing moves.

    Args:
        spans: the images (N placeholders each, `spans.num_tokens`).
        attention_mask: `(B, L)` user padding mask, or None.
        position_ids: `(B, L)` user positions, or `(A, B, L)` for multi-axis positions (M-RoPE).
        num_tokens: K.
        sources: int64 `(I, K)` user position of the visual token each entry stands for, or None.
    """
    batch_size, length = position_ids.shape[-2:]
    device = position_ids.device
    real = torch.ones(batch_size, length, dtype=torch.bool, device=device)
    if attention_mask is not None:
        real = attention_mask.bool()
    rank, image = _image_ranks(spans, batch_size, length)
    slot = (rank >= 0) & (rank < num_tokens)
    keep = real & ((rank < 0) | slot)
    index = right_aligned_index(keep)  # (B, S)
    valid = index >= 0

    # Entry k of an image is anchored at start + ceil((k + 1) N / K) - 1 (its last one at the image's end - 1).
    sizes = spans.num_tokens[image.clamp_min(0)]  # (B, L) N of the image at each position
    start = spans.start[image.clamp_min(0)]
    spread = start + torch.div((rank + 1) * sizes + num_tokens - 1, num_tokens, rounding_mode="floor") - 1
    anchor = torch.where(slot, spread, torch.arange(length, device=device).expand(batch_size, length))

    if sources is None:  # later tokens move up by N - K per image that ends at or before them
        removed = torch.zeros(batch_size, length + 1, dtype=torch.long, device=device)
        removed.index_put_((spans.row, spans.end), spans.num_tokens - num_tokens, accumulate=True)
        positions = position_ids - removed[:, :length].cumsum(-1)
    else:  # each slot reads the positions of the token its entry stands for
        source = torch.arange(length, device=device).repeat(batch_size, 1)  # (B, L)
        slots = spans.start[:, None] + torch.arange(num_tokens, device=device)[None]  # (I, K)
        source[spans.row[:, None].expand_as(slots), slots] = sources
        positions = _along_positions(position_ids, lambda p: p.gather(1, source[..., None].expand_as(p)))

    return CompressedLayout(
        index=index,
        anchor=_gather_rows(anchor, index).masked_fill(~valid, -1),
        position_ids=gather_positions(positions, index),
        visual=_gather_rows(slot, index),
    )


def pruned_sequence(
    keep: torch.Tensor, image_token_mask: torch.Tensor, position_ids: torch.Tensor
) -> CompressedLayout:
    """The kept tokens (bool `keep` `(B, L)`), in order, at their own positions (FastV); `position_ids` `(B, L)` or
    `(A, B, L)`."""
    index = right_aligned_index(keep)
    return CompressedLayout(
        index=index,
        anchor=index,
        position_ids=gather_positions(position_ids, index),
        visual=_gather_rows(image_token_mask, index),
    )


def _along_positions(position_ids: torch.Tensor, fn) -> torch.Tensor:
    """`fn` applied to positions as `(B, L, A)` (A axes, 1 for `(B, L)` positions); the result in the input's
    layout (`(B, S)` or `(A, B, S)`)."""
    per_row = position_ids[..., None] if position_ids.dim() == 2 else position_ids.permute(1, 2, 0)
    out = fn(per_row)
    return out[..., 0] if position_ids.dim() == 2 else out.permute(2, 0, 1)


def gather_positions(position_ids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Positions `(B, L)` or `(A, B, L)` at `index` `(B, S)` along L, 0 where index is -1."""
    return _along_positions(position_ids, lambda p: _gather_rows(p, index))


def last_position(position_ids: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`(B,)` the largest position of each row over the axes and the `valid` `(B, L)` entries."""
    positions = position_ids if position_ids.dim() == 2 else position_ids.amax(0)
    if valid is not None:
        positions = positions.masked_fill(~valid, -1)
    return positions.amax(-1)


def _gather_rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`values` `(B, L, *rest)` at `index` `(B, S)` along L, zeros (False) where index is -1."""
    rows = torch.arange(index.shape[0], device=index.device)[:, None]
    out = values[rows, index.clamp_min(0)]
    pad = (index < 0).view(*index.shape, *([1] * (out.dim() - 2)))
    return out.masked_fill(pad, 0)


# ============================================================================ cache
@dataclass
class BaselineCacheState(ETCCacheState):
    """`ETCCacheState` of a baseline's prefill, plus which of its C0 entries are visual.

    Attributes:
        visual_mask: bool `(B, C0)`, True at the visual entries (K per image).
    """

    visual_mask: Optional[torch.Tensor] = None

    def _map(self, fn) -> None:
        super()._map(fn)
        self.visual_mask = fn(self.visual_mask)


def cache_visual_entries(cache) -> torch.Tensor:
    """`(B,)` visual entries each row of a baseline's prefill cache holds (K per image, every layer alike).

    Raises:
        ValueError: if the cache does not come from a baseline's prefill.
    """
    state = getattr(cache, "etc_state", None)
    if not isinstance(state, BaselineCacheState):
        raise ValueError(
            "cache_visual_entries needs the cache of a baseline's prefill (model(..., use_cache=True).cache or "
            "generate(..., return_dict_in_generate=True).cache on a model with apply_baseline)"
        )
    return state.visual_mask.sum(-1)


def user_next_position(attention_mask, position_ids, input_ids) -> torch.Tensor:
    """`(B,)` the user layout's position after each row's last real token (`position_ids` `(B, L)` or
    `(A, B, L)`: the largest over the axes, as text after an M-RoPE image is numbered)."""
    batch_size, length = input_ids.shape
    if position_ids is None:
        position_ids = default_position_ids(attention_mask, batch_size, length, input_ids.device)
    position_ids = position_ids.expand(*position_ids.shape[:-2], batch_size, length)
    valid = None if attention_mask is None else attention_mask.bool()
    return last_position(position_ids, valid) + 1
