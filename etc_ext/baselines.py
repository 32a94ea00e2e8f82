"""Training-free visual-token compressors behind one interface, to compare with ETC.

`apply_baseline(model, method, num_tokens, **options)` extends a Hugging Face VLM in place (like `apply_etc`: a class
swap to a subclass, plus hooks); then `model(**inputs)` and `model.generate(**inputs)` run with `num_tokens` (K)
visual entries per image in the KV cache instead of N, and `remove_baseline(model)` gives the original model back.
Users' prompts and processor outputs stay as they are (N image placeholders per image).

The methods (N visual tokens per image on a `gh x gw` patch grid, K = num_tokens):

- "mean": adaptive average pooling (`torch.nn.functional.adaptive_avg_pool2d`) of the projected visual tokens on
  their 2-D grid to a `kh x kw` grid with `kh * kw = K` (`grid_shape`: the factorisation closest to the patch
  grid's aspect ratio, e.g. 1x1, 2x2, 4x4 on 12x12).
- "subsample": the projected tokens at the centres of the cells of a `kh x kw` partition of the grid (rows
  `floor((i + 1/2) gh / kh)`, same for columns), row-major.
- "visionzip": VisionZip (Yang et al., dvlab-research/VisionZip), in the vision tower's feature space before the
  projector, as its code does: in the CLIP layer whose output LLaVA reads (`vision_feature_layer`), the [CLS]
  query's attention over the patches (summed over heads) picks the dominant patches; the other patches are merged
  into contextual tokens: evenly spaced targets among them, every other one joins the target whose head-averaged
  key is most similar (cosine), and a contextual token is its target plus the mean of its group (VisionZip's
  `target_hidden + aggregated_hidden`). The query/key states are taken by forward hooks on that layer's `q_proj` and
  `k_proj` and reduced with `etc_ext.ops.cross_attn_scores`: the tower keeps its attention implementation (SDPA),
  no `output_attentions`. Like VisionZip, the [CLS] feature is one of the dominant tokens (`keep_cls=True`), and
  `[cls, dominant patches in grid order, contextual tokens]` is the order. Split (`visionzip_split`): VisionZip's
  README uses 54 + 10 tokens at 64 (and 108 + 20, 162 + 30 at 128, 192): contextual = round(5 K / 32), the rest
  dominant: K=1 -> 1 + 0 (the [CLS] token alone), 4 -> 3 + 1, 16 -> 13 + 3, 64 -> 54 + 10. `dominant=` overrides.
- "fastv": FastV (Chen et al., pkunlp-icler/FastV): the first `layer` (L, FastV's K, default 2) decoder layers run on
  the whole prompt; the attention of the L-th layer (index L - 1) ranks each image's visual tokens: queries the
  prompt's last token (`query="last"`, FastV's choice) or the text after the image (`query="instruction"`),
  probabilities over the whole causal context averaged over heads, exactly what eager attention would return, but
  from that layer's query/key states recorded by the `"etc_capture"` attention function and
  `etc_ext.ops.cross_attn_scores` (SDPA kept). The top K visual tokens stay; layers L.. run on the pruned sequence
  (forward pre-hooks on those decoder layers drop the other rows of the hidden states, rotary embeddings and mask),
  and the pruned tokens leave the cache of every layer (`cache.compact_dynamic_cache`, i.e. `write_compressed_kv` with
  `index`), so decoding sees K visual entries per image in all layers. Tokens keep their positions (a gap where
  pruned tokens were), as in FastV. With L equal to the number of layers only the cache is pruned.
- "instruction_merge": ETC's instruction-aware weighting without training: a first pass over the prompt, stopped
  after the attention of the L-th layer (default 2), gives each visual token's importance, the text-to-image
  `cross_attn_scores` of the text after the image (the instruction; with `labels`, the answer tokens are left out)
  averaged over heads and queries; the N projected tokens are split into K groups (`grouping="spatial"`: the
  `kh x kw` cells of the grid; `"similarity"`: the K most important tokens are centres and every other token joins
  the centre whose pre-RoPE key at that layer is most similar) and each group becomes one token,
  `weighted_aggregate(x, group logits, importance)`: the importance-weighted mean of the group.

"fastv" and "instruction_merge" take their queries from the prompt: with `labels` (teacher forcing), answer tokens
are never queries. Their selection depends on the prompt, so decoding keeps the prefill's choice (a forward() over
prompt + generated tokens would choose again); the other three ignore the text.

Positions: "mean", "subsample", "visionzip" and "instruction_merge" feed the language model a shorter prompt, each
image's N placeholders replaced by its K tokens, with positions as if the image had K tokens (the tokens after it
move up by N - K), as these methods do in their papers; "fastv" keeps every position. Decoding maps generate()'s
user-layout attention mask and positions onto the cache (`compress.ETCCacheState`).

Outputs: logits are in the user's layout `(batch_size, sequence_length, vocab_size)` (`logits_to_keep` applies), so
`labels` are the user's: a text token's logits are its own; within an image, the K entries are spread over the N
positions (entry k gives the logits from position `start + ceil((k + 1) N / K) - 1` on, so the image's last position
has its last entry's, which predicts the text after the image), and a position before the image's first entry has
the logits of the entry before it (fastv: a pruned token has the logits of the kept token before it; padding is not
meaningful). At K = N every method except "visionzip" (which adds the [CLS] feature and puts merged tokens last;
with `dominant=N, keep_cls=False` it too) reproduces the unpatched model's logits at every real position. As with
ETC, a forward() without a cache and without `use_cache=True` returns no cache. The prefill's cache is an `ETCCache`
(rows right-aligned; masked padding in front of shorter rows) whose state says which entries are real and which are
visual: `cache_visual_entries(cache)`.

Integrations: LLaVA-1.5 (`transformers.LlavaForConditionalGeneration`) is `BaselineLlavaForConditionalGeneration`.
Another model family registers its subclass with `register_baseline_class`; the model-agnostic parts (config,
compressors, `shorten_sequence` / `pruned_sequence`, `FastVPruner`, `first_pass_scores`, the cache state) take
tensors and modules, not a model class.
"""

import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, fields
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from transformers import LlavaForConditionalGeneration
from transformers.cache_utils import Cache
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from . import ops
from .cache import compact_dynamic_cache
from .compress import (
    ETCCache,
    ETCCacheState,
    ImageSpans,
    default_position_ids,
    find_image_spans,
    right_aligned_index,
)
from .continuation import CompressedCacheGenerationMixin, new_token_count
from .distill import capture_query_key, instruction_scores
from .models.common import unwrap_peft
from .models.llava import num_visual_tokens as llava_num_visual_tokens

__all__ = [
    "METHODS",
    "VISION_METHODS",
    "BaselineConfig",
    "VisualGeometry",
    "Baseline",
    "BaselineCacheState",
    "CompressedLayout",
    "FastVPruner",
    "BaselineLlavaForConditionalGeneration",
    "apply_baseline",
    "remove_baseline",
    "register_baseline_class",
    "cache_visual_entries",
    "grid_shape",
    "mean_pool",
    "subsample_index",
    "spatial_groups",
    "similarity_groups",
    "group_logits",
    "merge_groups",
    "visionzip_split",
    "visionzip_merge",
    "query_index",
    "shorten_sequence",
    "pruned_sequence",
    "first_pass_scores",
]

METHODS = ("mean", "subsample", "fastv", "visionzip", "instruction_merge")
# Methods that act while the images are encoded: `get_image_features` returns K tokens per image.
VISION_METHODS = ("mean", "subsample", "visionzip")
QUERY_MODES = ("last", "instruction")
GROUPINGS = ("spatial", "similarity")

# Options of each method and their defaults (None: resolved against the model, see BaselineConfig).
_METHOD_OPTIONS = {
    "mean": {},
    "subsample": {},
    "fastv": {"layer": 2, "query": "last"},
    "visionzip": {"dominant": None, "keep_cls": True},
    "instruction_merge": {"layer": 2, "query": "instruction", "grouping": "spatial"},
}

# Merge logit of a token outside a group: exp(-1e4 - anything in-group) is exactly 0 in float32, and unlike -inf it
# keeps every softmax row finite (each group holds at least one token).
_OUTSIDE_GROUP = -1.0e4


def _weighted_aggregate(x, logits, importance=None, mask=None):
    """The one call site of weighted_aggregate (the fused op; `etc_ext.reference` has the same contract)."""
    return ops.weighted_aggregate(x, logits, importance, mask)


# ============================================================================ config
@dataclass(frozen=True)
class VisualGeometry:
    """What a compressor needs to know about a model's images and language model.

    Attributes:
        num_visual_tokens: N, visual tokens per image in the language model's input.
        grid: `(gh, gw)` patch grid of an image (row-major order of the patch tokens).
        cls_feature: whether the first of the N tokens is the vision tower's [CLS] feature (LLaVA's "full"
            strategy); the other N - 1 are the grid.
        num_hidden_layers: decoder layers of the language model.
    """

    num_visual_tokens: int
    grid: tuple
    cls_feature: bool
    num_hidden_layers: int


@dataclass
class BaselineConfig:
    """A training-free compressor and its options.

    Args:
        method: one of `METHODS`.
        num_tokens: K >= 1, visual entries kept per image (at most N, checked against the model by `check`).
        layer: ("fastv", "instruction_merge") the scores come from the attention of decoder layer `layer - 1`, i.e.
            after `layer` layers have run on the whole prompt; FastV's K. Default 2.
        query: ("fastv", "instruction_merge") the queries of the text-to-image attention: "last" (the last prompt
            token; fastv's default) or "instruction" (the text after the image; instruction_merge's default).
        grouping: ("instruction_merge") "spatial" (default) or "similarity".
        dominant: ("visionzip") dominant tokens, the [CLS] feature included when `keep_cls`; default
            `visionzip_split(K)`.
        keep_cls: ("visionzip") keep the vision tower's [CLS] feature as a dominant token (VisionZip does); default
            True.

    Raises:
        ValueError: an unknown method, a num_tokens that is not a positive int, an option the method does not take,
            or a bad option value.
    """

    method: str
    num_tokens: int
    layer: Optional[int] = None
    query: Optional[str] = None
    grouping: Optional[str] = None
    dominant: Optional[int] = None
    keep_cls: Optional[bool] = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown baseline method {self.method!r}; choose one of {list(METHODS)}")
        if not _is_int(self.num_tokens) or self.num_tokens < 1:
            raise ValueError(f"num_tokens must be an int >= 1 (visual tokens kept per image), got {self.num_tokens!r}")
        allowed = _METHOD_OPTIONS[self.method]
        for name in ("layer", "query", "grouping", "dominant", "keep_cls"):
            value = getattr(self, name)
            if value is not None and name not in allowed:
                raise ValueError(
                    f"{name}={value!r} is not an option of method {self.method!r} "
                    f"(its options: {sorted(allowed) or 'none'})"
                )
            if value is None and name in allowed:
                setattr(self, name, allowed[name])
        if self.layer is not None and (not _is_int(self.layer) or self.layer < 1):
            raise ValueError(f"layer must be an int >= 1 (decoder layers run on the whole prompt), got {self.layer!r}")
        if self.query is not None and self.query not in QUERY_MODES:
            raise ValueError(f"query must be one of {list(QUERY_MODES)}, got {self.query!r}")
        if self.grouping is not None and self.grouping not in GROUPINGS:
            raise ValueError(f"grouping must be one of {list(GROUPINGS)}, got {self.grouping!r}")
        if self.keep_cls is not None and not isinstance(self.keep_cls, bool):
            raise ValueError(f"keep_cls must be a bool, got {self.keep_cls!r}")
        if self.dominant is not None and (not _is_int(self.dominant) or not 0 <= self.dominant <= self.num_tokens):
            raise ValueError(f"dominant must be an int in [0, num_tokens={self.num_tokens}], got {self.dominant!r}")

    @property
    def options(self) -> dict:
        """The method's options with their values."""
        return {name: getattr(self, name) for name in _METHOD_OPTIONS[self.method]}

    def check(self, geometry: VisualGeometry) -> None:
        """Raise ValueError if this config cannot run on a model of `geometry`."""
        n = geometry.num_visual_tokens
        if self.num_tokens > n:
            raise ValueError(
                f"num_tokens={self.num_tokens} is larger than the model's {n} visual tokens per image; "
                f"use 1 <= num_tokens <= {n}"
            )
        if self.layer is not None and self.layer > geometry.num_hidden_layers:
            raise ValueError(
                f"layer={self.layer} is out of range for a language model with {geometry.num_hidden_layers} decoder "
                f"layers (use 1..{geometry.num_hidden_layers})"
            )
        needs_grid = self.method in ("mean", "subsample") or (
            self.method == "instruction_merge" and self.grouping == "spatial"
        )
        if needs_grid:
            if geometry.cls_feature:
                raise ValueError(
                    f"method {self.method!r} works on the patch grid, but this model's visual tokens include the "
                    "[CLS] feature (vision_feature_select_strategy='full')"
                )
            grid_shape(self.num_tokens, geometry.grid)  # raises when K has no layout on the grid
        if self.method == "visionzip":
            num_patches = geometry.grid[0] * geometry.grid[1]
            dominant, contextual = visionzip_split(self.num_tokens, self.dominant)
            dominant_patches = dominant - int(self.keep_cls)
            if dominant_patches < 0:
                raise ValueError("visionzip: keep_cls=True needs dominant >= 1 (the [CLS] feature is a dominant token)")
            if dominant_patches + contextual > num_patches or (contextual > 0 and dominant_patches >= num_patches):
                raise ValueError(
                    f"visionzip: {dominant} dominant (keep_cls={self.keep_cls}) + {contextual} contextual tokens do "
                    f"not fit in {num_patches} patches"
                )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ============================================================================ compressors (tensors in, tensors out)
def grid_shape(num_tokens: int, grid: Sequence[int]) -> tuple[int, int]:
    """`(kh, kw)` with `kh * kw == num_tokens`, `kh <= gh`, `kw <= gw`, whose aspect ratio is closest to the grid's
    (1 -> 1x1, 4 -> 2x2, 16 -> 4x4, 6 -> 2x3 on a square grid).

    Raises:
        ValueError: if no such factorisation exists (e.g. a prime K larger than the grid's sides).
    """
    gh, gw = grid
    best = None
    for kh in range(1, num_tokens + 1):
        if num_tokens % kh:
            continue
        kw = num_tokens // kh
        if kh > gh or kw > gw:
            continue
        mismatch = abs(math.log((kh * gw) / (kw * gh)))
        if best is None or mismatch < best[0] - 1e-12:
            best = (mismatch, kh, kw)
    if best is None:
        raise ValueError(
            f"num_tokens={num_tokens} cannot be laid out as a kh x kw grid within the {gh}x{gw} patch grid (no "
            f"factorisation kh * kw = {num_tokens} with kh <= {gh} and kw <= {gw}); pick e.g. a square number"
        )
    return best[1], best[2]


def mean_pool(features: torch.Tensor, grid: Sequence[int], num_tokens: int) -> torch.Tensor:
    """Adaptive average pooling of `(I, gh * gw, C)` grid tokens to `(I, K, C)` (row-major `kh x kw`)."""
    gh, gw = grid
    kh, kw = grid_shape(num_tokens, grid)
    images, _, channels = features.shape
    x = features.transpose(1, 2).reshape(images, channels, gh, gw)
    return F.adaptive_avg_pool2d(x, (kh, kw)).flatten(2).transpose(1, 2)  # (I, K, C)


def subsample_index(grid: Sequence[int], num_tokens: int, device=None) -> torch.Tensor:
    """`(K,)` row-major token indices of the centres of a `kh x kw` partition of the grid."""
    gh, gw = grid
    kh, kw = grid_shape(num_tokens, grid)
    rows = (2 * torch.arange(kh, device=device) + 1) * gh // (2 * kh)
    cols = (2 * torch.arange(kw, device=device) + 1) * gw // (2 * kw)
    return (rows[:, None] * gw + cols[None, :]).flatten()


def spatial_groups(grid: Sequence[int], num_tokens: int, device=None) -> torch.Tensor:
    """`(N,)` group (0..K-1, row-major cells of a `kh x kw` partition of the grid) of each grid token."""
    gh, gw = grid
    kh, kw = grid_shape(num_tokens, grid)
    rows = torch.arange(gh, device=device) * kh // gh
    cols = torch.arange(gw, device=device) * kw // gw
    return (rows[:, None] * kw + cols[None, :]).flatten()


def similarity_groups(keys: torch.Tensor, importance: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Groups around the K most important tokens: `(I, N)` group of each token.

    Args:
        keys: `(I, N, D)` a representation of each token (e.g. head-averaged keys); cosine similarity decides.
        importance: `(I, N)`; the K largest are the centres, group k is the k-th centre in token order.
    """
    centres = importance.topk(num_tokens, dim=-1).indices.sort(dim=-1).values  # (I, K)
    unit = F.normalize(keys.float(), dim=-1)
    centre_keys = unit.gather(1, centres[..., None].expand(-1, -1, unit.shape[-1]))  # (I, K, D)
    groups = torch.bmm(unit, centre_keys.transpose(1, 2)).argmax(-1)  # (I, N)
    # A centre is in its own group even if another centre's key is as similar (duplicates).
    groups.scatter_(1, centres, torch.arange(num_tokens, device=keys.device).expand_as(centres))
    return groups


def group_logits(groups: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Merge logits float32 `(I, K, N)` from `(I, N)` group ids: 0 inside group k, a large negative elsewhere."""
    inside = groups[:, None, :] == torch.arange(num_tokens, device=groups.device)[None, :, None]
    return torch.zeros(inside.shape, dtype=torch.float32, device=groups.device).masked_fill(~inside, _OUTSIDE_GROUP)


def merge_groups(x: torch.Tensor, groups: torch.Tensor, num_tokens: int, importance: torch.Tensor) -> torch.Tensor:
    """The importance-weighted mean of each group, `(I, K, C)`: `weighted_aggregate(x, group_logits, importance)`.

    Args:
        x: `(I, N, C)`; groups: `(I, N)` (every group non-empty); importance: `(I, N)` >= 0.
    """
    # Floor the importance so that a group whose scores all underflowed to 0 still averages its own tokens.
    importance = importance.float().clamp_min(1e-30)
    return _weighted_aggregate(x, group_logits(groups, num_tokens), importance)


def visionzip_split(num_tokens: int, dominant: Optional[int] = None) -> tuple[int, int]:
    """`(dominant, contextual)` tokens for a budget of K: VisionZip's 54 + 10 of 64 (108 + 20 of 128, 162 + 30 of 192),
    i.e. contextual = round(5 K / 32) (halves up), or `K - dominant` when `dominant` is given."""
    if dominant is None:
        contextual = (5 * num_tokens + 16) // 32
        return num_tokens - contextual, contextual
    return dominant, num_tokens - dominant


def visionzip_merge(
    tokens: torch.Tensor,
    cls_attention: torch.Tensor,
    keys: torch.Tensor,
    dominant: int,
    contextual: int,
    keep_cls: bool,
) -> torch.Tensor:
    """VisionZip's dominant and contextual tokens, `(I, K, C)` with K = dominant + contextual.

    Args:
        tokens: `(I, 1 + P, C)` the vision layer's output: [CLS] then the P patches.
        cls_attention: `(I, P)` the [CLS] query's attention on each patch (any positive scale: summed or averaged
            over heads).
        keys: `(I, 1 + P, D)` that layer's keys averaged over heads.
        dominant: dominant tokens (the [CLS] feature among them when `keep_cls`).
        contextual: contextual tokens.

    Returns `[cls (keep_cls), dominant patches in patch order, contextual tokens in target order]`.
    """
    images, _, channels = tokens.shape
    cls_token, patches = tokens[:, :1], tokens[:, 1:]  # (I, 1, C), (I, P, C)
    patch_keys = keys[:, 1:]
    num_patches = patches.shape[1]
    num_dominant = dominant - int(keep_cls)
    device = tokens.device

    top = cls_attention.topk(num_dominant, dim=-1).indices.sort(dim=-1).values  # (I, Dp)
    parts = [cls_token] if keep_cls else []
    parts.append(patches.gather(1, top[..., None].expand(-1, -1, channels)))
    if contextual > 0:
        is_dominant = torch.zeros(images, num_patches, dtype=torch.bool, device=device)
        is_dominant.scatter_(1, top, True)
        # The remaining patches in patch order, R per image; evenly spaced targets among them.
        remaining = (~is_dominant).nonzero()[:, 1].view(images, num_patches - num_dominant)  # (I, R)
        step = max(1, remaining.shape[1] // contextual)
        target_slots = torch.arange(0, remaining.shape[1], step, device=device)[:contextual]
        targets = remaining[:, target_slots]  # (I, Cx)
        unit = F.normalize(patch_keys.float(), dim=-1)
        target_keys = unit.gather(1, targets[..., None].expand(-1, -1, unit.shape[-1]))  # (I, Cx, D)
        groups = torch.bmm(unit, target_keys.transpose(1, 2)).argmax(-1)  # (I, P): most similar target
        is_target = torch.zeros_like(is_dominant).scatter_(1, targets, True)
        members = ~is_dominant & ~is_target  # (I, P)
        # Mean of each target's members (uniform weights within the group), 0 for a target without members.
        group_mean = _weighted_aggregate(patches, group_logits(groups, contextual), mask=members)  # (I, Cx, C)
        counts = torch.zeros(images, contextual, device=device).scatter_add_(1, groups, members.float())
        group_mean = group_mean * (counts > 0)[..., None].to(group_mean.dtype)
        target_tokens = patches.gather(1, targets[..., None].expand(-1, -1, channels))
        parts.append(target_tokens + group_mean)
    return torch.cat(parts, dim=1)


def query_index(
    spans: ImageSpans,
    image_token_mask: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    labels: Optional[torch.Tensor],
    mode: str,
) -> torch.Tensor:
    """`(I, T)` positions of the query tokens of each image's text-to-image attention, right-aligned, -1 = none.

    "last": the prompt's last token (the row's last real token; FastV's query), `T = 1`. "instruction": the real
    text tokens after the image. With `labels`, answer tokens (labels != -100) are never queries.
    """
    length = image_token_mask.shape[1]
    rows = spans.row
    real = torch.ones(len(spans), length, dtype=torch.bool, device=rows.device)
    if attention_mask is not None:
        real = real & attention_mask.bool()[rows]
    if labels is not None:
        real = real & (labels[rows] == -100)
    if mode == "last":
        return right_aligned_index(real)[:, -1:]
    if mode == "instruction":
        after = torch.arange(length, device=rows.device)[None] >= spans.end[:, None]  # (I, L)
        return right_aligned_index(after & real & ~image_token_mask[rows])
    raise ValueError(f"query must be one of {list(QUERY_MODES)}, got {mode!r}")


# ============================================================================ the compressed sequence
@dataclass
class CompressedLayout:
    """The language model's (shorter) sequence after compression, in terms of the user's sequence.

    Attributes:
        index: `(B, S)` user position of each entry (for an image's K entries: the placeholders they occupy), -1 at
            padding (rows are right-aligned).
        anchor: `(B, S)` increasing: the user position from which on an entry gives the user-layout logits, -1 at
            padding.
        position_ids: `(B, S)` positions of the entries (0 at padding).
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
        next_position = self.position_ids.masked_fill(~self.valid, -1).amax(-1) + 1
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
) -> CompressedLayout:
    """Each image's N placeholders become K entries (the first K placeholders hold them), the others leave.

    Positions: the K entries of an image take its first K positions, and every later token moves up by N - K per
    earlier image, as if the image had been encoded to K tokens.

    Args:
        spans: the images (N placeholders each, `spans.num_tokens`).
        attention_mask: `(B, L)` user padding mask, or None.
        position_ids: `(B, L)` user positions.
        num_tokens: K.
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

    # Later tokens move up by N - K per image that ends at or before them.
    removed = torch.zeros(batch_size, length + 1, dtype=torch.long, device=device)
    removed.index_put_((spans.row, spans.end), spans.num_tokens - num_tokens, accumulate=True)
    positions = position_ids - removed[:, :length].cumsum(-1)

    return CompressedLayout(
        index=index,
        anchor=_gather_rows(anchor, index).masked_fill(~valid, -1),
        position_ids=_gather_rows(positions, index),
        visual=_gather_rows(slot, index),
    )


def pruned_sequence(
    keep: torch.Tensor, image_token_mask: torch.Tensor, position_ids: torch.Tensor
) -> CompressedLayout:
    """The kept tokens (bool `keep` `(B, L)`), in order, at their own positions (FastV)."""
    index = right_aligned_index(keep)
    return CompressedLayout(
        index=index,
        anchor=index,
        position_ids=_gather_rows(position_ids, index),
        visual=_gather_rows(image_token_mask, index),
    )


def _gather_rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`values` `(B, L, *rest)` at `index` `(B, S)` along L, zeros (False) where index is -1."""
    rows = torch.arange(index.shape[0], device=index.device)[:, None]
    out = values[rows, index.clamp_min(0)]
    pad = (index < 0).view(*index.shape, *([1] * (out.dim() - 2)))
    return out.masked_fill(pad, 0)


# ============================================================================ language-model passes
class _StopForward(Exception):
    """Raised by a forward hook to end a pass once the layer that was needed has run."""


@contextmanager
def _stop_after(module: nn.Module):
    def hook(_module, _args, _output):
        raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _record_output(module: nn.Module):
    """Record the output of `module`'s next call (a forward hook)."""

    class _Recorder:
        value: Optional[torch.Tensor] = None

    recorder = _Recorder()

    def hook(_module, _args, output):
        recorder.value = output

    handle = module.register_forward_hook(hook)
    try:
        yield recorder
    finally:
        handle.remove()


def first_pass_scores(
    language_model: nn.Module,
    decoder_layers: Sequence[nn.Module],
    layer: int,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    rows: torch.Tensor,
    query_positions: torch.Tensor,
    visual_index: torch.Tensor,
    with_keys: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Text-to-image attention at decoder layer `layer - 1` from a pass over the whole prompt that stops right after
    that layer's attention (no cache, SDPA through the "etc_capture" attention function, no attention weights).

    Args:
        language_model: called as `language_model(inputs_embeds=, attention_mask=, position_ids=, use_cache=False,
            **kwargs)`; its config's `_attn_implementation` is switched for the pass.
        decoder_layers: its decoder layers (`layer - 1` must have a `self_attn`, and `self_attn.k_proj` for keys).
        inputs_embeds: `(B, L, H)`; attention_mask: `(B, L)`; position_ids: `(B, L)` (or `(K, B, L)`).
        rows: `(I,)` batch row of each image; query_positions: `(I, T)` (-1 = none); visual_index: `(I, N)`.
        with_keys: also return the visual tokens' head-averaged keys before RoPE, `(I, N, D)` (the `k_proj` output).

    Returns:
        importance float32 `(I, N)` (probabilities over each query's causal context, averaged over heads and
        queries), and the keys or None.
    """
    target = decoder_layers[layer - 1].self_attn
    with ExitStack() as stack:
        recorder = stack.enter_context(capture_query_key(language_model.config, layer - 1))
        keys = stack.enter_context(_record_output(target.k_proj)) if with_keys else None
        stack.enter_context(_stop_after(target))
        try:
            language_model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
                **recorder.kwargs,
            )
        except _StopForward:
            pass
    if recorder.query is None:
        raise RuntimeError(f"the first pass did not reach the attention of decoder layer {layer - 1}")
    scores = instruction_scores(
        recorder.query[rows],
        recorder.key[rows],
        query_positions,
        visual_index,
        key_mask=attention_mask.bool()[rows],
        score_context="causal",
        scale=recorder.scale,
    )
    visual_keys = None
    if with_keys:
        head_dim = recorder.key.shape[-1]
        projected = keys.value  # (B, L, Hkv * D)
        mean_keys = projected.view(*projected.shape[:2], -1, head_dim).mean(2)  # (B, L, D)
        visual_keys = mean_keys[rows[:, None], visual_index]  # (I, N, D)
    return scores, visual_keys


class FastVPruner:
    """Drops the visual tokens FastV does not keep from the hidden states of decoder layers `layer..`, in one pass.

    Used as a context manager around the language model's call: it switches the attention to the "etc_capture"
    function (SDPA that records decoder layer `layer - 1`'s query/key states; pass `pruner.kwargs` to the call) and
    registers forward pre-hooks (with kwargs) on decoder layers `layer..`. The first of them calls `select(recorder)`
    for the bool `(B, L)` mask of the tokens to keep and replaces the layer's inputs by the kept rows, in order and
    right-aligned: `hidden_states`, `position_embeddings` (cos, sin), `position_ids`, and a causal boolean mask over
    them; the later layers get the same. The cache of layers `layer..` therefore holds the kept tokens only, in the
    order of `pruner.index`; compact the earlier layers afterwards with
    `compact_dynamic_cache(cache, pruner.index, layers=range(layer), empty_slots=True)`. The pass runs SDPA (an eager model too).

    The decoder layers must take `hidden_states` first and `attention_mask`, `position_embeddings`, `position_ids`
    as keyword arguments (transformers' decoder layers do). A pass with a non-empty cache is not supported.

    Args:
        config: the language model's config (its attention implementation is switched during the pass).
        decoder_layers: the language model's decoder layers.
        layer: L >= 1; layers 0..L-1 see every token, decoder layer L - 1's attention gives the scores.
        select: `select(recorder) -> keep` with the `QueryKeyRecorder` of layer L - 1, bool `(B, L)`.
    """

    def __init__(
        self,
        config,
        decoder_layers: Sequence[nn.Module],
        layer: int,
        select: Callable[[object], torch.Tensor],
    ):
        self.config = config
        self.decoder_layers = decoder_layers
        self.layer = layer
        self.select = select
        self.keep: Optional[torch.Tensor] = None  # (B, L)
        self.index: Optional[torch.Tensor] = None  # (B, S)
        self._inputs: Optional[dict] = None
        self._handles = []
        self._capture = None
        self.recorder = None

    @property
    def kwargs(self) -> dict:
        return self.recorder.kwargs

    def __enter__(self):
        self._capture = capture_query_key(self.config, self.layer - 1)
        self.recorder = self._capture.__enter__()
        for module in self.decoder_layers[self.layer :]:
            self._handles.append(module.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._capture.__exit__(*exc)
        return False

    def finish(self) -> torch.Tensor:
        """The keep mask `(B, L)` (selecting now if no pruned layer ran, i.e. `layer` is the last layer)."""
        if self.keep is None:
            self.keep = self.select(self.recorder)
            self.index = right_aligned_index(self.keep)
        return self.keep

    def _pre_hook(self, _module, args, kwargs):
        hidden_states = args[0] if args else kwargs.pop("hidden_states")
        args = args[1:]
        if self._inputs is None:  # the first pruned layer: select, then drop the rows (later layers get them so)
            self.finish()
            self._inputs = self._pruned_inputs(hidden_states, kwargs)
            hidden_states = _gather_rows(hidden_states, self.index)
        kwargs.update(self._inputs)
        return (hidden_states, *args), kwargs

    def _pruned_inputs(self, hidden_states: torch.Tensor, kwargs: dict) -> dict:
        batch_size, length = hidden_states.shape[:2]
        index = self.index
        valid = index >= 0
        inputs = {}
        cos_sin = kwargs.get("position_embeddings")
        if cos_sin is not None:
            inputs["position_embeddings"] = tuple(
                _gather_rows(t.expand(batch_size, *t.shape[1:]), index) for t in cos_sin
            )
        position_ids = kwargs.get("position_ids")
        if position_ids is not None:
            position_ids = position_ids.expand(*position_ids.shape[:-2], batch_size, length)
            rows = torch.arange(batch_size, device=index.device)[:, None]
            inputs["position_ids"] = position_ids[..., rows, index.clamp_min(0)].masked_fill(~valid, 0)
        size = index.shape[1]
        causal = torch.ones(size, size, dtype=torch.bool, device=index.device).tril()
        allowed = causal[None] & valid[:, None, :] & valid[:, :, None]
        allowed = allowed | torch.eye(size, dtype=torch.bool, device=index.device)[None]  # padding sees itself
        inputs["attention_mask"] = allowed[:, None]  # (B, 1, S, S), SDPA's boolean form
        return inputs


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


# ============================================================================ the model-side state
class Baseline:
    """What `apply_baseline` registers on a model as `model.baseline`.

    Attributes:
        config: the `BaselineConfig`.
        geometry: the model's `VisualGeometry`.
        enabled: when False the model runs exactly as the original one (the hooks pass everything through).
        original_class: the class to restore on removal.
    """

    def __init__(self, config: BaselineConfig, geometry: VisualGeometry, original_class: type):
        self.config = config
        self.geometry = geometry
        self.enabled = True
        self.original_class = original_class
        self.handles: list = []
        self.recorded: dict = {}  # vision-layer tensors between the hooks of one encoding call

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.config.options.items())
        return (
            f"Baseline(method={self.method!r}, num_tokens={self.num_tokens}{', ' + options if options else ''}, "
            f"enabled={self.enabled})"
        )


class _RecordInto:
    """Forward hook that stores a module's output in `baseline.recorded[name]` (an object, not a closure, so that it
    follows the model through `copy.deepcopy`)."""

    def __init__(self, baseline: Baseline, name: str):
        self.baseline = baseline
        self.name = name

    def __call__(self, _module, _args, output):
        if self.baseline.enabled:
            self.baseline.recorded[self.name] = output


# ============================================================================ LLaVA
class BaselineLlavaForConditionalGeneration(CompressedCacheGenerationMixin, LlavaForConditionalGeneration):
    """A `LlavaForConditionalGeneration` with a training-free compressor; made by `apply_baseline`, never
    instantiated directly."""

    baseline: Baseline

    # ------------------------------------------------------------------------------------------ integration hooks
    @staticmethod
    def baseline_geometry(model: LlavaForConditionalGeneration) -> VisualGeometry:
        config = model.config
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        return VisualGeometry(
            num_visual_tokens=llava_num_visual_tokens(config),
            grid=(side, side),
            cls_feature=config.vision_feature_select_strategy == "full",
            num_hidden_layers=config.text_config.num_hidden_layers,
        )

    def baseline_install(self) -> None:
        """Register the vision-stage hooks of `self.baseline` (mean, subsample: on the projector's output;
        visionzip: on the feature layer's `q_proj`, `k_proj` and output, and the projector's input)."""
        baseline = self.baseline
        projector = self.model.multi_modal_projector
        if baseline.method in ("mean", "subsample"):
            baseline.handles.append(projector.register_forward_hook(self._baseline_reduce_projected))
        elif baseline.method == "visionzip":
            layer = self._baseline_vision_layer()
            baseline.handles += [
                layer.self_attn.q_proj.register_forward_hook(_RecordInto(baseline, "query")),
                layer.self_attn.k_proj.register_forward_hook(_RecordInto(baseline, "key")),
                layer.register_forward_hook(_RecordInto(baseline, "hidden")),
                projector.register_forward_pre_hook(self._baseline_visionzip),
            ]

    def _baseline_vision_layer(self) -> nn.Module:
        """The vision encoder layer whose output LLaVA reads (`vision_feature_layer`)."""
        feature_layer = self.config.vision_feature_layer
        if not _is_int(feature_layer):
            raise ValueError(
                f"visionzip reads one vision layer; this model concatenates layers {feature_layer} "
                "(vision_feature_layer is a list)"
            )
        tower = self.model.vision_tower
        layers = getattr(tower, "vision_model", tower).encoder.layers
        index = feature_layer % (len(layers) + 1)  # into hidden_states: 0 = embeddings, i = output of layer i - 1
        if index == 0:
            raise ValueError("visionzip needs an attention layer: vision_feature_layer selects the embeddings")
        return layers[index - 1]

    # ------------------------------------------------------------------------------------------ vision-stage hooks
    def _baseline_reduce_projected(self, _module, _args, output):
        """Projector forward hook (mean, subsample): `(images, N, H)` -> `(images, K, H)`."""
        baseline = self.baseline
        if not baseline.enabled:
            return output
        geometry = baseline.geometry
        if output.shape[1] != geometry.num_visual_tokens:
            raise ValueError(
                f"{baseline.method}: the projector returned {output.shape[1]} tokens per image, expected the "
                f"{geometry.num_visual_tokens} of the patch grid"
            )
        if baseline.method == "mean":
            return mean_pool(output, geometry.grid, baseline.num_tokens)
        return output[:, subsample_index(geometry.grid, baseline.num_tokens, output.device)]

    def _baseline_visionzip(self, _module, args):
        """Projector forward pre-hook (visionzip): its input `(images, N, C)` -> `(images, K, C)`."""
        baseline = self.baseline
        if not baseline.enabled:
            return None
        recorded = dict(baseline.recorded)
        baseline.recorded.clear()  # the hooks hold this dict
        if set(recorded) != {"query", "key", "hidden"}:
            raise RuntimeError("visionzip: the vision feature layer's states were not recorded during this encoding")
        hidden = recorded["hidden"]  # (images, 1 + P, C): [CLS] and patches
        geometry = baseline.geometry
        features = args[0]
        expected = hidden.shape[1] - (0 if geometry.cls_feature else 1)
        if features.shape[:2] != (hidden.shape[0], expected):
            raise ValueError(
                f"visionzip: the projector's input {list(features.shape)} is not the recorded vision layer's output "
                f"{list(hidden.shape)} (was get_image_features called with another vision_feature_layer?)"
            )
        layer = self._baseline_vision_layer()
        num_heads, scale = layer.self_attn.num_heads, layer.self_attn.scale

        def heads(x):  # (images, S, heads * D) -> (images, heads, S, D)
            return x.view(*x.shape[:2], num_heads, -1).transpose(1, 2)

        query, key = heads(recorded["query"]), heads(recorded["key"])
        cls_attention = ops.cross_attn_scores(query[:, :, :1].contiguous(), key, scale=scale)[:, 1:]  # (images, P)
        dominant, contextual = visionzip_split(baseline.num_tokens, baseline.config.dominant)
        merged = visionzip_merge(hidden, cls_attention, key.mean(1), dominant, contextual, baseline.config.keep_cls)
        return (merged.to(features.dtype), *args[1:])

    # ------------------------------------------------------------------------------------------ forward
    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        vision_feature_layer=None,
        vision_feature_select_strategy: Optional[str] = None,
        labels: Optional[torch.LongTensor] = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_sizes: Optional[torch.Tensor] = None,
        mm_encoder_outputs=None,
        use_cache: Optional[bool] = None,
        **kwargs,
    ) -> LlavaCausalLMOutputWithPast:
        r"""
        Like `LlavaForConditionalGeneration.forward`, with the baseline when `self.baseline.enabled` and the inputs
        hold images:

        - without a cache (and `use_cache` not True): one pass over the compressed sequence; `logits` in the user's
          layout `(batch_size, sequence_length, vocab_size)` (see the module docstring), `loss` with `labels`.
        - with an empty cache or `use_cache=True` (generate()'s prefill): the same, into an `ETCCache` whose
          `etc_state` is a `BaselineCacheState` (K visual entries per image in every layer).
        - with such a cache: decoding; `attention_mask` and `position_ids` are in the user's layout (as generate()
          makes them) and are mapped onto the cache.
        """
        base_kwargs = dict(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            labels=labels,
            logits_to_keep=logits_to_keep,
            image_sizes=image_sizes,
            mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )
        if use_cache is not None:
            base_kwargs["use_cache"] = use_cache
        if not self.baseline.enabled:
            return super().forward(**base_kwargs)

        state = getattr(cache, "etc_state", None)
        encoded = (mm_encoder_outputs or {}).get("image")  # generate() encodes the images beforehand
        has_images = pixel_values is not None or encoded is not None
        if state is not None:  # a compressed prefill: decoding, or a follow-up question / turn (text only)
            if input_ids is None:
                raise ValueError("baseline decoding needs input_ids")
            cache_length = cache.get_seq_length()
            new = new_token_count(input_ids, attention_mask, state.covered_length(cache_length))
            input_ids = input_ids[:, -new:]
            if position_ids is not None:
                position_ids = position_ids[..., -new:]
            if has_images and bool((input_ids == self.config.image_token_id).any()):  # (a generated id is text)
                raise NotImplementedError(
                    "baseline: adding images to a cache that holds a compressed prefill is not supported; start a new "
                    "cache for a prompt with new images"
                )
            mask, positions = state.decode_inputs(cache_length, new, attention_mask, position_ids)
            base_kwargs.update(
                input_ids=input_ids, attention_mask=mask, position_ids=positions, pixel_values=None,
                mm_encoder_outputs=None,
            )  # fmt: skip
            return super().forward(**base_kwargs)
        image_token_mask = None if input_ids is None else input_ids == self.config.image_token_id
        if not has_images and (image_token_mask is None or not bool(image_token_mask.any())):
            return super().forward(**base_kwargs)  # text only: nothing to compress

        self._baseline_check_inputs(input_ids, inputs_embeds, has_images, labels, vision_feature_layer, kwargs)
        prefill = cache is not None or bool(use_cache)
        if cache is not None and cache.get_seq_length() > 0:
            raise NotImplementedError("baseline: prefilling images into a non-empty cache is not supported")
        if encoded is None:
            encoded = self.model.get_image_features(
                pixel_values=pixel_values,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                image_sizes=image_sizes,
                return_dict=True,
            )
        features = list(encoded.pooler_output)  # per image (n_i, H): K for vision-stage methods, else N
        if prefill and not isinstance(cache, ETCCache):  # e.g. the empty DynamicCache generate() made
            cache = ETCCache(config=self.config)
        hidden_states, layout = self._baseline_language_model(
            input_ids, features, image_token_mask, attention_mask, position_ids, labels, cache if prefill else None
        )
        length = input_ids.shape[1]
        user_hidden = _gather_rows(hidden_states, layout.user_index(length))  # (B, L, H)
        logits = self.lm_head(slice_logits_to_keep(user_hidden, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits,
                labels=labels,
                vocab_size=self.config.text_config.vocab_size,
                num_items_in_batch=kwargs.get("num_items_in_batch"),
            )
        if prefill:
            cache.etc_state = layout.cache_state(length, _user_next_position(attention_mask, position_ids, input_ids))
        return LlavaCausalLMOutputWithPast(
            loss=loss, logits=logits, cache=cache if prefill else None, image_outputs=encoded
        )

    def _baseline_check_inputs(self, input_ids, inputs_embeds, has_images, labels, vision_feature_layer, kwargs):
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("baseline: needs input_ids (not inputs_embeds) to find the images")
        if not has_images:
            raise ValueError("baseline: input_ids contain image tokens but no pixel_values were given")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(
                f"labels must have the shape of input_ids {list(input_ids.shape)}, got {list(labels.shape)}"
            )
        if (
            self.baseline.method == "visionzip"
            and vision_feature_layer is not None
            and vision_feature_layer != self.config.vision_feature_layer
        ):
            raise ValueError(
                "visionzip hooks config.vision_feature_layer; a per-call vision_feature_layer is not supported"
            )
        for flag in ("output_attentions", "output_hidden_states"):
            if kwargs.get(flag):
                raise NotImplementedError(f"baseline: {flag} is not supported with compression enabled")

    def _baseline_language_model(
        self, input_ids, features, image_token_mask, attention_mask, position_ids, labels, cache
    ) -> tuple[torch.Tensor, CompressedLayout]:
        """Run the language model on the compressed sequence: last hidden states `(B, S, H)` and its layout."""
        baseline = self.baseline
        config = baseline.config
        num_visual = baseline.geometry.num_visual_tokens
        spans = find_image_spans(image_token_mask, [num_visual] * len(features))
        batch_size, length = input_ids.shape
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, batch_size, length, input_ids.device)
        position_ids = position_ids.expand(batch_size, length)
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        language_model = self.model.language_model
        inputs_embeds = self.get_input_embeddings()(input_ids)  # (B, L, H)
        expected = config.num_tokens if config.method in VISION_METHODS else num_visual
        counts = {f.shape[0] for f in features}
        if counts != {expected}:
            raise ValueError(
                f"baseline {config.method!r}: image features have {sorted(counts)} tokens per image, expected "
                f"{expected} (were they encoded before apply_baseline?)"
            )
        image_features = torch.stack(features).to(inputs_embeds.device, inputs_embeds.dtype)  # (I, n, H)

        if config.method == "fastv":
            full_embeds = inputs_embeds.masked_scatter(image_token_mask[..., None], image_features)
            return self._baseline_fastv(full_embeds, spans, image_token_mask, mask, position_ids, labels, cache)

        if config.method == "instruction_merge":
            full_embeds = inputs_embeds.masked_scatter(image_token_mask[..., None], image_features)
            queries = query_index(spans, image_token_mask, mask, labels, config.query)
            visual_index = spans.start[:, None] + torch.arange(num_visual, device=input_ids.device)[None]
            importance, keys = first_pass_scores(
                language_model, language_model.layers, config.layer, full_embeds, mask, position_ids,
                spans.row, queries, visual_index, with_keys=config.grouping == "similarity",
            )  # fmt: skip
            if config.grouping == "spatial":
                groups = spatial_groups(baseline.geometry.grid, config.num_tokens, input_ids.device)
                groups = groups.expand(len(spans), -1)
            else:
                groups = similarity_groups(keys, importance, config.num_tokens)
            image_features = merge_groups(image_features, groups, config.num_tokens, importance)

        # The K tokens of each image take its first K placeholders; the shorter sequence runs in one pass.
        slots = spans.start[:, None] + torch.arange(config.num_tokens, device=input_ids.device)[None]  # (I, K)
        inputs_embeds = inputs_embeds.index_put((spans.row[:, None].expand_as(slots), slots), image_features)
        layout = shorten_sequence(spans, mask, position_ids, config.num_tokens)
        outputs = language_model(
            inputs_embeds=layout.gather(inputs_embeds),
            attention_mask=layout.valid.long(),
            position_ids=layout.position_ids,
            cache=cache,
            use_cache=cache is not None,
        )
        return outputs.last_hidden_state, layout

    def _baseline_fastv(self, inputs_embeds, spans, image_token_mask, mask, position_ids, labels, cache):
        config = self.baseline.config
        language_model = self.model.language_model
        num_visual = self.baseline.geometry.num_visual_tokens
        queries = query_index(spans, image_token_mask, mask, labels, config.query)
        visual_index = spans.start[:, None] + torch.arange(num_visual, device=mask.device)[None]  # (I, N)
        rows = spans.row

        def select(recorder) -> torch.Tensor:
            scores = instruction_scores(
                recorder.query[rows], recorder.key[rows], queries, visual_index,
                key_mask=mask.bool()[rows], score_context="causal", scale=recorder.scale,
            )  # fmt: skip  (I, N)
            top = scores.topk(config.num_tokens, dim=-1).indices  # (I, K)
            keep = mask.bool() & ~image_token_mask
            keep[rows[:, None].expand_as(top), visual_index.gather(1, top)] = True
            return keep

        pruner = FastVPruner(language_model.config, language_model.layers, config.layer, select)
        with pruner:
            hidden_states = language_model(
                inputs_embeds=inputs_embeds,
                attention_mask=mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=cache is not None,
                **pruner.kwargs,
            ).last_hidden_state
        keep = pruner.finish()
        layout = pruned_sequence(keep, image_token_mask, position_ids)
        if config.layer == len(language_model.layers):
            hidden_states = layout.gather(hidden_states)  # no layer ran on the pruned sequence: drop the rows now
        if cache is not None:
            # Layers < layer hold the whole prompt; layers >= layer already hold the kept entries in layout order.
            compact_dynamic_cache(cache, layout.index, layers=range(config.layer), empty_slots=True)
        return hidden_states, layout


def _user_next_position(attention_mask, position_ids, input_ids) -> torch.Tensor:
    """`(B,)` the user layout's position after each row's last real token."""
    batch_size, length = input_ids.shape
    if position_ids is None:
        position_ids = default_position_ids(attention_mask, batch_size, length, input_ids.device)
    position_ids = position_ids.expand(batch_size, length)
    if attention_mask is not None:
        position_ids = position_ids.masked_fill(~attention_mask.bool(), -1)
    return position_ids.amax(-1) + 1


# ============================================================================ public API
_BASELINE_CLASSES: dict = {LlavaForConditionalGeneration: BaselineLlavaForConditionalGeneration}
_SUBCLASSES: dict = {}


def register_baseline_class(model_class: type, baseline_class: type) -> None:
    """Make `apply_baseline` work on `model_class` (and its subclasses) through `baseline_class`, a subclass of it
    that defines `baseline_geometry(model)` (static), `baseline_install()` and a `forward` that runs the baseline."""
    if not issubclass(baseline_class, model_class):
        raise TypeError(f"{baseline_class.__name__} must subclass {model_class.__name__}")
    _BASELINE_CLASSES[model_class] = baseline_class


def _baseline_class(cls: type) -> type:
    for model_class in cls.__mro__:
        if model_class in _BASELINE_CLASSES:
            baseline_class = _BASELINE_CLASSES[model_class]
            if cls is model_class:
                return baseline_class
            if cls not in _SUBCLASSES:  # a subclass of a supported model: a baseline subclass of it
                _SUBCLASSES[cls] = type(f"Baseline{cls.__name__}", (baseline_class, cls), {})
            return _SUBCLASSES[cls]
    supported = ", ".join(c.__name__ for c in _BASELINE_CLASSES)
    raise TypeError(f"apply_baseline supports {supported}; got {cls.__name__}")


def apply_baseline(model: nn.Module, method: str, num_tokens: int, **options) -> nn.Module:
    """Make `model` keep `num_tokens` visual entries per image with a training-free compressor, in place.

    Args:
        model: a `LlavaForConditionalGeneration` (or a subclass, or a `peft.PeftModel` around one).
        method: "mean", "subsample", "fastv", "visionzip" or "instruction_merge" (see the module docstring).
        num_tokens: K, 1 <= K <= N (the model's visual tokens per image).
        options: the method's options (`BaselineConfig`): fastv `layer`, `query`; instruction_merge `layer`, `query`,
            `grouping`; visionzip `dominant`, `keep_cls`.

    Returns:
        `model`, whose `forward` and `generate` now compress; `model.baseline` holds the config. A prefill's cache
        tells its visual entries: `cache_visual_entries(cache)`.

    Raises:
        ValueError: a bad method, num_tokens or option, one that does not fit the model, a model that already has a
            baseline or ETC.
        TypeError: an unsupported model class.
    """
    base = unwrap_peft(model)
    if isinstance(getattr(base, "baseline", None), Baseline):
        raise ValueError(
            f"a baseline is already applied to this model ({base.baseline!r}); remove_baseline(model) first"
        )
    if getattr(base, "etc", None) is not None:
        raise ValueError(
            "this model has ETC applied (remove_etc(model) first): a baseline compresses the original model"
        )
    baseline_class = _baseline_class(type(base))  # TypeError for an unsupported model
    config = BaselineConfig(method=method, num_tokens=num_tokens, **_check_option_names(options))
    geometry = baseline_class.baseline_geometry(base)
    config.check(geometry)
    base.baseline = Baseline(config, geometry, original_class=type(base))
    base.__class__ = baseline_class
    try:
        base.baseline_install()
    except Exception:
        _remove(base)
        raise
    return model


def _check_option_names(options: dict) -> dict:
    known = {f.name for f in fields(BaselineConfig)} - {"method", "num_tokens"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown baseline option(s) {unknown}; options are {sorted(known)}")
    return options


def remove_baseline(model: nn.Module) -> nn.Module:
    """Undo `apply_baseline`: remove its hooks, restore the class and drop `model.baseline`. Returns `model`."""
    base = unwrap_peft(model)
    if not isinstance(getattr(base, "baseline", None), Baseline):
        raise ValueError("remove_baseline: no baseline is applied to this model")
    _remove(base)
    return model


def _remove(base: nn.Module) -> None:
    baseline = base.baseline
    for handle in baseline.handles:
        handle.remove()
    baseline.handles = []
    base.__class__ = baseline.original_class
    del base.baseline
