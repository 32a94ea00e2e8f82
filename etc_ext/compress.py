"""Compression tokens, the bottleneck attention mask, the segmented (two-pass) prefill and cache compaction.

Everything here is model-agnostic: it works on token-type bookkeeping (`ETCLayout`), embeddings, position ids and a
Hugging Face `DynamicCache`, and reaches the language model only through a `run_language_model` callable. The model
integrations (`etc_ext.models.*`) compute the embeddings and call these functions.

Vocabulary used in shapes and docstrings:
    B   batch size
    L   length of the user's sequence (input_ids as the processor made them)
    Lx  length of the extended sequence (M compression tokens inserted after each image)
    I   number of images in the batch, in the order they appear (row by row)
    N   visual tokens of an image, M compression tokens per image
    C   cache length
"""

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from .cache import ETCCache, ETCCacheState, compact_dynamic_cache  # noqa: F401 (ETCCache* re-exported)
from .dispatch import dispatch, host_side

__all__ = [
    "TEXT",
    "VISUAL",
    "COMPRESSION",
    "SUPPORTED_MASK_ATTENTION",
    "CompressionTokens",
    "ImageSpans",
    "ETCLayout",
    "ETCCache",
    "ETCCacheState",
    "PrefillOutput",
    "find_image_spans",
    "insert_compression_tokens",
    "default_position_ids",
    "bottleneck_mask",
    "to_attention_mask",
    "check_mask_attention_implementation",
    "right_aligned_index",
    "can_segment",
    "segmented_prefill",
    "masked_prefill",
    "compact_masked_pass",
    "prefill_state",
    "etc_prefill",
]

# Token types of the extended sequence.
TEXT, VISUAL, COMPRESSION = 0, 1, 2

# Attention implementations that take our 4-D bottleneck mask as is. flash_attention_* unpad with a 2-D mask and
# would silently drop it; flex_attention needs a BlockMask.
SUPPORTED_MASK_ATTENTION = ("sdpa", "eager")

# (*, inputs_embeds [B, S, H], attention_mask [B, C+S] or [B, 1, S, C+S], position_ids [B, S] or [K, B, S], cache,
#  **token_inputs [B, S, ...]) -> last_hidden_state [B, S, H], all passed by keyword.
# token_inputs are the per-token extras the prefill drivers were given (e.g. Qwen3-VL's DeepStack features), gathered
# for the tokens of each pass.
RunLanguageModel = Callable[..., torch.Tensor]


# ============================================================================ compression tokens
class CompressionTokens(nn.Module):
    """The M learnable compression-token embeddings, one `[M, hidden_size]` parameter."""

    def __init__(self, num_compression_tokens: int, hidden_size: int, initializer_range: float = 0.02):
        super().__init__()
        self.initializer_range = initializer_range
        self.weight = nn.Parameter(torch.empty(num_compression_tokens, hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.initializer_range)

    def forward(self) -> torch.Tensor:
        return self.weight  # (M, hidden_size)

    def extra_repr(self) -> str:
        return f"num_compression_tokens={self.weight.shape[0]}, hidden_size={self.weight.shape[1]}"


# ============================================================================ token bookkeeping
@dataclass
class ImageSpans:
    """Where each image's visual tokens sit in the user's sequence.

    Attributes:
        row: `(I,)` batch row of each image.
        start: `(I,)` index of its first visual token.
        end: `(I,)` one past its last visual token.
        index_in_row: `(I,)` 0-based order of the image within its row.
        num_images: `(B,)` images per row.
    """

    row: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor
    index_in_row: torch.Tensor
    num_images: torch.Tensor

    @property
    def num_tokens(self) -> torch.Tensor:
        return self.end - self.start  # (I,)

    def __len__(self) -> int:
        return self.row.numel()


@host_side
def find_image_spans(image_token_mask: torch.Tensor, tokens_per_image: Sequence[int]) -> ImageSpans:
    """Split the image placeholder tokens into images.

    Args:
        image_token_mask: bool `(B, L)`, True at the image placeholder tokens (e.g. `input_ids == image_token_id`).
        tokens_per_image: visual tokens of each image, in the order the images fill the placeholders (row by row,
            left to right), e.g. `[f.shape[0] for f in image_features]`. Two adjacent images form one run of
            placeholders; the counts tell them apart.

    Raises:
        ValueError: if the placeholders and the image features do not match (a prompt without image token, more
            images in the prompts than image features or the reverse), or an image's tokens are not one contiguous
            run within one row.
    """
    batch_size = image_token_mask.shape[0]
    counts = [int(c) for c in tokens_per_image]
    rows, cols = image_token_mask.nonzero(as_tuple=True)  # row-major order
    total, expected = rows.numel(), sum(counts)
    # transformers' wording first ("Image features and image tokens do not match, tokens: ..., features: ..."), which
    # users and tools search for, then what to check.
    if total == 0 and counts:
        raise ValueError(
            f"Image features and image tokens do not match, tokens: 0, features: {expected}. The prompts contain no "
            f"image token but {len(counts)} image(s) were given: each image needs its placeholder (e.g. '<image>' "
            "expanded by the processor) in input_ids."
        )
    if total != expected:
        raise ValueError(
            f"Image features and image tokens do not match, tokens: {total}, features: {expected}. The "
            f"{len(counts)} image(s) give {counts} features per image. Check that the number of '<image>' "
            "placeholders equals the number of images passed as pixel_values."
        )
    first = torch.tensor([0] + counts[:-1], dtype=torch.long).cumsum(0).to(rows.device)
    last = first + torch.tensor(counts, dtype=torch.long, device=rows.device) - 1
    row, start, end_col = rows[first], cols[first], cols[last]
    bad = (rows[last] != row) | (end_col - start + 1 != torch.tensor(counts, device=rows.device))
    if bool(bad.any()):
        k = int(bad.nonzero()[0])
        raise ValueError(
            f"Image {k}'s {counts[k]} tokens are not one contiguous run of image tokens within one row of input_ids."
        )
    num_images = torch.bincount(row, minlength=batch_size)
    # 0-based order within the row: images are sorted by row, so subtract the index of the row's first image.
    row_first = torch.cumsum(num_images, 0) - num_images
    index_in_row = torch.arange(len(counts), device=rows.device) - row_first[row]
    return ImageSpans(row=row, start=start, end=end_col + 1, index_in_row=index_in_row, num_images=num_images)


def default_position_ids(attention_mask: Optional[torch.Tensor], batch_size: int, length: int, device) -> torch.Tensor:
    """Padding-aware positions `(B, L)`, as `generate()` makes them: cumsum(mask) - 1, 0 at padding."""
    if attention_mask is None:
        return torch.arange(length, device=device).expand(batch_size, length)
    mask = attention_mask.bool()
    return (mask.long().cumsum(-1) - 1).masked_fill(~mask, 0)


@dataclass
class ETCLayout:
    """Token bookkeeping of a batch once the compression tokens are inserted (the extended sequence).

    Attributes:
        token_type: `(B, Lx)` TEXT, VISUAL or COMPRESSION (padding counts as TEXT; see `attention_mask`).
        image_id: `(B, Lx)` image (0..I-1, batch order) of visual and compression tokens, -1 elsewhere.
        attention_mask: bool `(B, Lx)`, True = real token.
        position_ids: `(B, Lx)` (or `(K, B, Lx)` for multi-axis RoPE): the positions of the uncompressed extended
            sequence; they are never renumbered, so dropping V from the cache leaves a gap.
        ext_index: `(B, L)` index in the extended sequence of each user token.
        compression_index: `(I, M)` index in the extended sequence of each image's compression tokens.
        spans: the images in the user's sequence.
        num_compression_tokens: M.
        left_padding: whether rows were aligned to the right (extra padding goes on the left).
    """

    token_type: torch.Tensor
    image_id: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    ext_index: torch.Tensor
    compression_index: torch.Tensor
    spans: ImageSpans
    num_compression_tokens: int
    left_padding: bool

    @property
    def batch_size(self) -> int:
        return self.token_type.shape[0]

    @property
    def length(self) -> int:
        return self.token_type.shape[1]

    @property
    def num_images(self) -> torch.Tensor:
        return self.spans.num_images

    def extend(self, values: torch.Tensor, fill) -> torch.Tensor:
        """Place per-user-token `values` `(B, L, ...)` in the extended layout `(B, Lx, ...)`; `fill` elsewhere."""
        out = values.new_full((self.batch_size, self.length, *values.shape[2:]), fill)
        rows = torch.arange(self.batch_size, device=values.device)[:, None]
        out[rows, self.ext_index] = values
        return out

    def embed(self, inputs_embeds: torch.Tensor, compression_embeds: torch.Tensor) -> torch.Tensor:
        """Extended embeddings `(B, Lx, H)`: the user's `(B, L, H)` and the compression embeddings `(M, H)` after
        each image."""
        out = self.extend(inputs_embeds, 0.0)
        rows = self.spans.row[:, None].expand_as(self.compression_index)
        out[rows, self.compression_index] = compression_embeds.to(out.dtype)[None].expand(len(self.spans), -1, -1)
        return out

    @host_side
    def next_token_index(self) -> torch.Tensor:
        """`(B, L)` extended index of the token whose output predicts the user token after each user token: the
        token itself, except the last visual token of an image, whose successor is predicted by the image's last
        compression token. Gathering the extended outputs there gives logits in the user's layout, with which the
        user's (unshifted) labels give exactly the extended sequence's cross-entropy."""
        index = self.ext_index.clone()
        last_visual = self.spans.end - 1
        index[self.spans.row, last_visual] = self.compression_index[:, -1]
        return index

    def segment_ids(self) -> torch.Tensor:
        """`(B, Lx)` segment of each token for the segmented prefill: segment i holds the tokens up to image i's last
        compression token (text before it, its visual and compression tokens); the last segment the rest."""
        last_compression = torch.zeros_like(self.attention_mask)
        rows = self.spans.row
        last_compression[rows, self.compression_index[:, -1]] = True
        count = last_compression.long().cumsum(-1)
        return count - last_compression.long()

    def next_position(self) -> torch.Tensor:
        """`(B,)` position of the token after each row's last real token."""
        positions = self.position_ids
        if positions.dim() == 3:
            positions = positions.amax(0)
        return positions.masked_fill(~self.attention_mask, -1).amax(-1) + 1


@host_side
def insert_compression_tokens(
    spans: ImageSpans,
    length: int,
    num_compression_tokens: int,
    attention_mask: Optional[torch.Tensor] = None,
    position_ids: Optional[torch.Tensor] = None,
) -> ETCLayout:
    """Insert M compression tokens right after each image's visual tokens.

    Args:
        spans: the images, from `find_image_spans`.
        length: L, the user's sequence length.
        num_compression_tokens: M.
        attention_mask: `(B, L)` padding mask of the user's sequence (1 = real), or None.
        position_ids: `(B, L)` or `(K, B, L)` positions of the user's sequence; defaults to `default_position_ids`.
            Tokens after an image move by M per earlier image; image i's compression tokens get the positions right
            after its last visual token (for multi-axis positions, after the maximum over the axes).

    Rows with fewer images than others get extra padding, on the left when the batch is left padded (no row ends
    with padding), else on the right.
    """
    batch_size = spans.num_images.shape[0]
    device = spans.row.device
    m = num_compression_tokens
    if attention_mask is None:
        real = torch.ones(batch_size, length, dtype=torch.bool, device=device)
    else:
        real = attention_mask.bool()
    left_padding = not bool((~real[:, -1]).any())
    if position_ids is None:
        position_ids = default_position_ids(attention_mask, batch_size, length, device)
    if position_ids.shape[-2] != batch_size:
        position_ids = position_ids.expand(*position_ids.shape[:-2], batch_size, length)

    # shift[b, t] = M * (number of images of row b that end at or before t)
    ends = torch.zeros(batch_size, length + 1, dtype=torch.long, device=device)
    ends.index_put_((spans.row, spans.end), torch.ones_like(spans.row), accumulate=True)
    shift = m * ends[:, :length].cumsum(-1)  # (B, L)

    max_images = int(spans.num_images.max()) if batch_size else 0
    ext_length = length + m * max_images
    offset = (m * (max_images - spans.num_images)) if left_padding else torch.zeros_like(spans.num_images)  # (B,)
    ext_index = torch.arange(length, device=device)[None] + shift + offset[:, None]  # (B, L)
    compression_index = (
        (spans.end + m * spans.index_in_row + offset[spans.row])[:, None] + torch.arange(m, device=device)[None]
    )  # (I, M)

    rows = torch.arange(batch_size, device=device)[:, None]
    image_rows = spans.row[:, None].expand(-1, m)

    token_type = torch.full((batch_size, ext_length), TEXT, dtype=torch.long, device=device)
    image_id = torch.full((batch_size, ext_length), -1, dtype=torch.long, device=device)
    user_image_id = torch.full((batch_size, length), -1, dtype=torch.long, device=device)
    for k in range(len(spans)):  # I is small (images per batch)
        user_image_id[spans.row[k], spans.start[k] : spans.end[k]] = k
    token_type[rows, ext_index] = torch.where(user_image_id >= 0, VISUAL, TEXT)
    image_id[rows, ext_index] = user_image_id
    token_type[image_rows, compression_index] = COMPRESSION
    image_id[image_rows, compression_index] = torch.arange(len(spans), device=device)[:, None].expand(-1, m)

    ext_mask = torch.zeros(batch_size, ext_length, dtype=torch.bool, device=device)
    ext_mask[rows, ext_index] = real
    ext_mask[image_rows, compression_index] = True

    # Positions: user tokens keep theirs plus the shift; compression tokens follow their image's last visual token.
    lead = position_ids.shape[:-2]
    ext_positions = position_ids.new_zeros((*lead, batch_size, ext_length))
    ext_positions[..., rows, ext_index] = position_ids + shift
    last_visual = position_ids[..., spans.row, spans.end - 1]  # (..., I)
    if last_visual.dim() == 2:
        last_visual = last_visual.amax(0)
    z_positions = (last_visual + m * spans.index_in_row + 1)[:, None] + torch.arange(m, device=device)[None]  # (I, M)
    ext_positions[..., image_rows, compression_index] = z_positions.to(ext_positions.dtype)

    return ETCLayout(
        token_type=token_type,
        image_id=image_id,
        attention_mask=ext_mask,
        position_ids=ext_positions,
        ext_index=ext_index,
        compression_index=compression_index,
        spans=spans,
        num_compression_tokens=m,
        left_padding=left_padding,
    )


# ============================================================================ bottleneck mask
@host_side
def bottleneck_mask(layout: ETCLayout) -> torch.Tensor:
    """Boolean attention mask `(B, 1, Lx, Lx)`, True = may attend.

    On top of causal and padding masks: a visual key is visible only to the visual and compression tokens of its own
    image. So text never sees a visual token but sees every earlier compression token; image i's compression tokens
    see image i's visual tokens and every earlier non-visual token, never another image's visual tokens. A padding
    query sees itself only, so that no row is fully masked (SDPA would return NaN there).
    """
    length = layout.length
    device = layout.token_type.device
    idx = torch.arange(length, device=device)
    causal = idx[None, :, None] >= idx[None, None, :]  # (1, Lx, Lx) [query, key]
    key_real = layout.attention_mask[:, None, :]
    key_visual = (layout.token_type == VISUAL)[:, None, :]
    same_image = layout.image_id[:, :, None] == layout.image_id[:, None, :]
    query_real = layout.attention_mask[:, :, None]
    allowed = causal & query_real & key_real & (~key_visual | same_image)
    pad_query = ~query_real & (idx[None, :, None] == idx[None, None, :])
    return (allowed | pad_query)[:, None]


def check_mask_attention_implementation(attn_implementation: Optional[str]) -> None:
    """Raise if the attention implementation cannot take a 4-D mask (it would silently drop the bottleneck)."""
    if attn_implementation not in SUPPORTED_MASK_ATTENTION:
        raise ValueError(
            f"ETC's bottleneck attention mask is a 4-D mask, which attn_implementation={attn_implementation!r} cannot "
            f"take (it would be dropped silently). Use one of {list(SUPPORTED_MASK_ATTENTION)} for training and for "
            "the masked prefill, e.g. model.set_attn_implementation('sdpa')."
        )


@host_side
def to_attention_mask(mask: torch.Tensor, attn_implementation: Optional[str], dtype: torch.dtype) -> torch.Tensor:
    """The boolean `(B, 1, Q, K)` mask in the form the attention implementation expects: as is for SDPA, additive
    (0 / dtype min) for eager attention, which adds the mask to the scores."""
    check_mask_attention_implementation(attn_implementation)
    if attn_implementation == "eager":
        return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


# ============================================================================ cache
@host_side
def right_aligned_index(select: torch.Tensor) -> torch.Tensor:
    """Indices of the True entries of each row of `select` `(B, L)`, right-aligned in `(B, S)` (S = the largest
    count), -1 in front where a row has fewer."""
    counts = select.sum(-1)
    width = int(counts.max()) if select.numel() else 0
    out = torch.full((select.shape[0], width), -1, dtype=torch.long, device=select.device)
    rows, cols = select.nonzero(as_tuple=True)
    rank = select.long().cumsum(-1)[rows, cols] - 1
    out[rows, width - counts[rows] + rank] = cols
    return out


# ============================================================================ prefill
@dataclass
class PrefillOutput:
    """Result of an ETC prefill.

    Attributes:
        last_hidden_state: `(B, H)` final hidden state of each row's last real token (gives the next-token logits).
        hidden_states: `(B, S, H)` final hidden states of the last pass (segmented: the text after the last image;
            masked: the whole extended sequence).
        index: `(B, S)` extended index of each column of `hidden_states`, -1 at padding.
        method: "segmented" or "masked".
        state: the `ETCCacheState` stored on the cache.
    """

    last_hidden_state: torch.Tensor
    hidden_states: torch.Tensor
    index: torch.Tensor
    method: str
    state: ETCCacheState = field(repr=False)


@host_side
def can_segment(layout: ETCLayout) -> bool:
    """The segmented prefill needs the same number of images in every row, and text after the last image either in
    every row or in none."""
    num_images = layout.num_images
    if bool((num_images != num_images[0]).any()) or int(num_images[0]) == 0:
        return False
    last = layout.segment_ids() == int(num_images[0])
    has_text_after = (last & layout.attention_mask).any(-1)
    return bool(has_text_after.all()) or not bool(has_text_after.any())


def _gather_tokens(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`values` `(B, L, *rest)` gathered at `index` `(B, S)` along L, zeros where index is -1."""
    rows = torch.arange(index.shape[0], device=index.device)[:, None]
    out = values[rows, index.clamp_min(0)]  # (B, S, *rest)
    pad = (index < 0).view(*index.shape, *([1] * (out.dim() - 2)))
    return out.masked_fill(pad, 0)


def _gather_positions(position_ids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Position ids `(B, L)` or `(K, B, L)` gathered at `index` `(B, S)` along L, 0 where index is -1."""
    rows = torch.arange(index.shape[0], device=index.device)[:, None]
    out = position_ids[..., rows, index.clamp_min(0)]
    return out.masked_fill(index < 0, 0)


@dispatch
def segmented_prefill(
    run_language_model: RunLanguageModel,
    layout: ETCLayout,
    inputs_embeds: torch.Tensor,
    cache: DynamicCache,
    token_inputs: Optional[dict[str, torch.Tensor]] = None,
    past_valid: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prefill with plain causal passes and cache compaction, no custom mask (PAPER.md, "Architecture").

    For each image in order: one causal pass over [text before it, its visual tokens, its compression tokens]
    against the cache so far, then compaction of every cache layer that drops its visual entries (and padding);
    finally one pass over the text after the last image. Each pass left-pads the rows' tokens of that segment, so the
    cache may hold padding between segments (masked; none when the text before each image has the same length in
    every row, as with a chat template). Positions are the extended sequence's, never renumbered.

    Args:
        run_language_model: see `RunLanguageModel`; called with 2-D padding masks.
        layout: from `insert_compression_tokens`; `can_segment(layout)` must hold.
        inputs_embeds: `(B, Lx, H)` extended embeddings.
        cache: a `DynamicCache`, filled in place: empty, or holding earlier turns (then `past_valid` tells which
            of its entries are real, and the new tokens' positions in `layout` continue the cached ones).
        token_inputs: optional per-token extras `(B, Lx, ...)` in the extended layout; each pass receives them
            gathered for its tokens `(B, S, ...)` (zeros / False at padding) as keyword arguments.
        past_valid: bool `(B, C)` validity of the entries `cache` holds already (None: an empty cache).

    Returns:
        hidden_states `(B, S, H)` of the last pass, its extended `index` `(B, S)` (-1 = padding), and the cache's
        validity mask `(B, C)`.
    """
    if not can_segment(layout):
        raise ValueError("segmented_prefill needs the same number of images per row (see can_segment)")
    num_segments = int(layout.num_images[0]) + 1
    cache_valid = torch.zeros(layout.batch_size, 0, dtype=torch.bool, device=inputs_embeds.device)
    if past_valid is not None:
        cache_valid = past_valid.to(device=inputs_embeds.device, dtype=torch.bool)
    hidden_states = index = None
    for segment in range(num_segments):
        seg_index, pass_inputs = _segment_pass_inputs(layout, segment, inputs_embeds, cache_valid, token_inputs)
        if seg_index is None:  # no text after the last image in any row
            break
        hidden_states = run_language_model(cache=cache, **pass_inputs)
        index = seg_index
        cache_valid = _compact_segment(layout, cache, cache_valid, seg_index, last=segment == num_segments - 1)
    return hidden_states, index, cache_valid


@host_side
def _segment_pass_inputs(layout: ETCLayout, segment: int, inputs_embeds, cache_valid, token_inputs):
    """The extended index `(B, S)` of segment `segment`'s tokens (right-aligned, -1 = padding; None when no row has
    any) and the keyword arguments of its pass: embeddings `(B, S, H)`, the 2-D mask over cache and segment
    `(B, C + S)`, positions and per-token extras."""
    select = layout.attention_mask & (layout.segment_ids() == segment)
    seg_index = right_aligned_index(select)  # (B, S)
    if seg_index.shape[1] == 0:
        return None, None
    pass_inputs = {name: _gather_tokens(value, seg_index) for name, value in (token_inputs or {}).items()}
    pass_inputs.update(
        inputs_embeds=_gather_tokens(inputs_embeds, seg_index),  # (B, S, H)
        attention_mask=torch.cat([cache_valid, seg_index >= 0], dim=1).long(),  # (B, C + S)
        position_ids=_gather_positions(layout.position_ids, seg_index),  # (B, S) or (K, B, S)
    )
    return seg_index, pass_inputs


@host_side
def _compact_segment(layout: ETCLayout, cache: DynamicCache, cache_valid, seg_index, last: bool) -> torch.Tensor:
    """After the pass of a segment: drop its visual entries (and padding) from every cache layer, unless it is the
    last segment. Returns the cache's validity `(B, C)`."""
    seg_valid = seg_index >= 0
    if last:
        return torch.cat([cache_valid, seg_valid], dim=1)
    seg_types = layout.token_type.gather(1, seg_index.clamp_min(0))
    keep = torch.cat([cache_valid, seg_valid & (seg_types != VISUAL)], dim=1)  # (B, C + S)
    keep_index = right_aligned_index(keep)
    compact_dynamic_cache(cache, keep_index, empty_slots=True)
    return keep_index >= 0


@dispatch
def masked_prefill(
    run_language_model: RunLanguageModel,
    layout: ETCLayout,
    inputs_embeds: torch.Tensor,
    cache: DynamicCache,
    attn_implementation: Optional[str],
    token_inputs: Optional[dict[str, torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prefill with one pass under the bottleneck mask, then compaction of every layer (drops visual entries and
    padding, right-aligns the rest). Works for any batch; the mask needs SDPA or eager attention. `token_inputs`
    (`(B, Lx, ...)` each) go to the pass as keyword arguments.

    Returns like `segmented_prefill`: hidden states `(B, Lx, H)`, index `(B, Lx)`, cache validity `(B, C)`.
    """
    mask = to_attention_mask(bottleneck_mask(layout), attn_implementation, inputs_embeds.dtype)
    hidden_states = run_language_model(
        inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=layout.position_ids, cache=cache,
        **(token_inputs or {}),
    )  # fmt: skip
    index = torch.arange(layout.length, device=inputs_embeds.device).expand(layout.batch_size, -1)
    index = index.masked_fill(~layout.attention_mask, -1)
    return hidden_states, index, compact_masked_pass(layout, cache)


@host_side
def compact_masked_pass(layout: ETCLayout, cache: DynamicCache) -> torch.Tensor:
    """After one pass of the whole extended sequence under the bottleneck mask: drop the visual entries and the
    padding from every layer of `cache` and right-align the rest. Returns the bool `(B, C)` validity of the entries."""
    keep_index = right_aligned_index(layout.attention_mask & (layout.token_type != VISUAL))
    compact_dynamic_cache(cache, keep_index, empty_slots=True)
    return keep_index >= 0


@host_side
def prefill_state(
    layout: ETCLayout, cache_valid: torch.Tensor, input_length: int, past_offset: Optional[torch.Tensor] = None
) -> ETCCacheState:
    """The `ETCCacheState` of a cache compacted after a prefill of `layout` (`cache_valid`: its entries' validity;
    `past_offset`: the position offset of earlier turns' images already in the cache)."""
    position_offset = layout.num_compression_tokens * layout.num_images
    if past_offset is not None:
        position_offset = position_offset + past_offset.to(position_offset.device)
    return ETCCacheState(
        attention_mask=cache_valid,
        input_length=input_length,
        position_offset=position_offset,
        next_position=layout.next_position(),
        trailing_tokens=_trailing_text_tokens(layout),
    )


def _trailing_text_tokens(layout: ETCLayout) -> int:
    """The number of text tokens after the last image (its compression tokens) in every row: the last entries of
    the right-aligned compacted cache that are one token each."""
    columns = torch.arange(layout.length, device=layout.token_type.device)
    last_image = torch.where(layout.token_type != TEXT, columns, -1).max(dim=-1).values  # (B,), -1: no image
    trailing = (layout.attention_mask & (columns > last_image[:, None])).sum(dim=-1)
    return int(trailing.min()) if layout.batch_size else 0


@dispatch
def etc_prefill(
    run_language_model: RunLanguageModel,
    layout: ETCLayout,
    inputs_embeds: torch.Tensor,
    cache: ETCCache,
    attn_implementation: Optional[str],
    input_length: int,
    method: str = "auto",
    token_inputs: Optional[dict[str, torch.Tensor]] = None,
    past_valid: Optional[torch.Tensor] = None,
    past_offset: Optional[torch.Tensor] = None,
) -> PrefillOutput:
    """Fill `cache` with the compressed prefill of a batch and record its `ETCCacheState`.

    Args:
        method: "segmented" (plain causal passes), "masked" (one pass under the bottleneck mask), or "auto":
            segmented when `can_segment(layout)`, else masked.
        input_length: L, the user's sequence length (for decoding with generate()'s 2-D mask), earlier turns
            included.
        token_inputs: per-token extras `(B, Lx, ...)` for `run_language_model` (see `segmented_prefill`).
        past_valid: for a cache that holds earlier turns, the bool `(B, C)` validity of its entries; `layout` is
            then the new tokens' (positions continuing the cache's), and only the segmented prefill applies.
        past_offset: `(B,)` the position offset of the earlier turns' images (`ETCCacheState.position_offset`).
    """
    if method == "auto":
        method = "segmented" if can_segment(layout) else "masked"
    if past_valid is not None and method != "segmented":
        raise NotImplementedError(
            "ETC: adding images to a non-empty cache needs the segmented prefill: the same number of new images in "
            "every row of the batch (and text after the last one in every row or in none). Continue such rows one "
            "at a time."
        )
    if method == "segmented":
        hidden_states, index, cache_valid = segmented_prefill(
            run_language_model, layout, inputs_embeds, cache, token_inputs, past_valid
        )
    elif method == "masked":
        hidden_states, index, cache_valid = masked_prefill(
            run_language_model, layout, inputs_embeds, cache, attn_implementation, token_inputs
        )
    else:
        raise ValueError(f"etc_prefill: method must be 'auto', 'segmented' or 'masked', got {method!r}")
    # Each row's last real token: the largest extended index among the last pass's columns.
    last_column = index.argmax(dim=-1)  # (B,)
    rows = torch.arange(layout.batch_size, device=index.device)
    state = prefill_state(layout, cache_valid, input_length, past_offset)
    cache.etc_state = state
    return PrefillOutput(
        last_hidden_state=hidden_states[rows, last_column],
        hidden_states=hidden_states,
        index=index,
        method=method,
        state=state,
    )


@contextmanager
def record_input(module: nn.Module):
    """Record the first positional input of `module`'s next calls (a forward pre-hook): `with record_input(m) as
    rec: ...; rec.value`."""

    class _Recorder:
        value: Optional[torch.Tensor] = None

    recorder = _Recorder()

    def hook(_module, args):
        recorder.value = args[0]

    handle = module.register_forward_pre_hook(hook)
    try:
        yield recorder
    finally:
        handle.remove()
