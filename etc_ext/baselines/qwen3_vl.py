"""The baselines on Qwen3-VL (`transformers.Qwen3VLForConditionalGeneration`):
`BaselineQwen3VLForConditionalGeneration`, Qwen3-VL's adapter for `etc_ext.baselines.model.BaselineMixin`.

What differs from LLaVA:

- Images of any size: a unit is an image or one temporal group of a video (a run of `h * w` placeholders, as for
  ETC, `etc_ext.models.qwen3_vl_inputs`), each on its own `h x w` token grid (from `image_grid_thw` /
  `video_grid_thw`, or, when generate() has dropped the grids, from the extent of the unit's M-RoPE positions). The
  methods that reduce while encoding on LLaVA ("mean", "subsample", "visionzip") reduce each unit after encoding
  (`BaselineMethod.reduce_image`); K must fit every unit (checked as it arrives).
- M-RoPE: an image's positions are its 2-D grid, so a kept entry takes the positions of the visual token it stands
  for (a cell's centre for "mean" and spatial "instruction_merge", the kept token for "subsample" and VisionZip's
  dominant tokens, the merge target for its contextual tokens, the centre for "similarity" groups) and every other
  token keeps its own; "fastv" keeps every position, as on LLaVA. At K = N nothing moves.
- DeepStack: the features the vision tower injects into the first decoder layers follow their tokens: merged and
  selected with them (they travel as extra channels of each token, `LanguageInputs.features`) and, in FastV's pass,
  pruned with them from the first pruned layer on.
- VisionZip without [CLS]: the tower has no [CLS] token, so the dominant tokens are those that the last vision
  layer's queries attend to most (attention received, averaged over heads and queries, summed over the patches a
  token merges: VisionZip's rule for models without [CLS]); the other tokens merge into contextual ones by the
  similarity of their head-averaged keys. It works on the merger's output tokens (the patches of one token are
  merged first by Qwen3-VL's own merger). A forward pre-hook on the last vision block's attention records what it
  needs while the tower runs (in the forward, or in generate()'s encoding before it).
"""

import torch
from torch import nn
from transformers import Qwen3VLForConditionalGeneration
from transformers.modeling_outputs import MultimodalCausalLMOutputWithPast
from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision

from .. import ops
from ..models.qwen3_vl_inputs import (
    PIXEL_INPUTS,
    Qwen3VLInputsMixin,
    align_mm_token_type_ids,
    check_mm_token_type_ids,
    encode_visual_inputs,
    flatten_features,
    span_grids,
    user_positions,
    visual_spans,
)
from .config import VisualGeometry
from .model import BaselineMixin, EncodedPrompt
from .sequence import _gather_rows

__all__ = ["BaselineQwen3VLForConditionalGeneration"]

class BaselineQwen3VLForConditionalGeneration(Qwen3VLInputsMixin, BaselineMixin, Qwen3VLForConditionalGeneration):
    """A `Qwen3VLForConditionalGeneration` with a training-free compressor; made by `apply_baseline`, never
    instantiated directly."""

    baseline_positions_from_sources = True
    _baseline_visual_argument_names = PIXEL_INPUTS + ("mm_token_type_ids", "mm_encoder_outputs")

    # ------------------------------------------------------------------------------------------ integration hooks
    @staticmethod
    def baseline_geometry(model: Qwen3VLForConditionalGeneration) -> VisualGeometry:
        return VisualGeometry(
            num_visual_tokens=None,  # per image
            grid=None,
            cls_feature=False,
            num_hidden_layers=model.config.text_config.num_hidden_layers,
            cls_token=False,
        )

    def baseline_install(self) -> None:
        """The per-image reductions run after encoding; only VisionZip's evidence needs hooks (on the tower)."""
        baseline = self.baseline
        if baseline.implementation.records_vision_attention:
            tower = self.model.visual
            recorder = VisionAttentionRecorder(baseline, tower.blocks[-1].attn, tower.spatial_merge_size)
            baseline.handles += [
                tower.register_forward_pre_hook(recorder.start_encoding),
                tower.blocks[-1].attn.register_forward_pre_hook(recorder, with_kwargs=True),
            ]

    # ------------------------------------------------------------------------------------------ adapter
    def _baseline_encode(self, visual_inputs: dict, input_ids, attention_mask, position_ids) -> EncodedPrompt:
        """Encode the images and videos, split them into units (an image, a video's temporal group), find each
        unit's grid and the user's M-RoPE positions, and reduce each unit for the methods that reduce while
        encoding."""
        baseline = self.baseline
        pixel_inputs = {name: visual_inputs[name] for name in PIXEL_INPUTS}
        if any(visual_inputs[name] is not None for name in ("pixel_values", "pixel_values_videos")):
            baseline.recorded.clear()  # the tower runs now: what an earlier encoding left is stale
        image_outputs, video_outputs = encode_visual_inputs(self.model, pixel_inputs, visual_inputs["encoded"])
        image_mask = input_ids == self.config.image_token_id
        video_mask = input_ids == self.config.video_token_id
        image_counts = [] if image_outputs is None else [f.shape[0] for f in image_outputs.pooler_output]
        video_counts = [] if video_outputs is None else [f.shape[0] for f in video_outputs.pooler_output]
        spans, kinds, sources = visual_spans(image_mask, video_mask, image_counts, video_counts)
        mm_token_type_ids = align_mm_token_type_ids(visual_inputs["mm_token_type_ids"], input_ids.shape[1])
        if position_ids is None:  # get_rope_index reads the token types
            check_mm_token_type_ids(mm_token_type_ids, image_mask, video_mask)
        positions = user_positions(
            self.model, input_ids, attention_mask, position_ids, mm_token_type_ids, pixel_inputs, image_counts,
            video_counts,
        )  # fmt: skip
        merge = self.config.vision_config.spatial_merge_size
        grids = span_grids(spans, kinds, sources, pixel_inputs["image_grid_thw"], pixel_inputs["video_grid_thw"],
                           merge, image_outputs is not None, video_outputs is not None)  # fmt: skip
        grids = grids_from_positions(spans, positions) if grids is None else [tuple(g[1:]) for g in grids.tolist()]
        tokens = unit_tokens(flatten_features(image_outputs, video_outputs), kinds, spans.num_tokens.tolist())
        for k, (kind, grid) in enumerate(zip(kinds, grids)):
            self._baseline_check_unit(f"{kind} {sources[k]}", int(spans.num_tokens[k]), grid)

        method = baseline.implementation
        reduced = None
        if method.reduces_while_encoding:
            evidence = [{}] * len(tokens)
            if method.records_vision_attention:
                evidence = recorded_evidence(baseline.recorded.pop("encodings", []), kinds, image_outputs is not None,
                                             video_outputs is not None)  # fmt: skip
            reduced = [method.reduce_image(t, g, baseline.config, e) for t, g, e in zip(tokens, grids, evidence)]
            tokens = [r[0] for r in reduced]
        return EncodedPrompt(
            features=tokens, sources=None if reduced is None else [r[1] for r in reduced], grids=grids, spans=spans,
            position_ids=positions,
        )  # fmt: skip

    def _baseline_check_unit(self, name: str, num_visual: int, grid) -> None:
        """The config against one image's (or temporal group's) geometry; a ValueError names the unit."""
        geometry = VisualGeometry(
            num_visual_tokens=num_visual, grid=tuple(grid), cls_feature=False,
            num_hidden_layers=self.baseline.geometry.num_hidden_layers, cls_token=False,
        )  # fmt: skip
        try:
            self.baseline.config.check(geometry)
        except ValueError as error:
            raise ValueError(f"baseline on {name} ({num_visual} tokens, {grid[0]} x {grid[1]} grid): {error}") from None

    def _baseline_token_kwargs(self, visual_mask, extras) -> dict:
        """DeepStack: the extra channels of the visual entries, `(B, S, layers * H)`, as the language model takes
        them (one `(n_visual, H)` tensor per DeepStack layer)."""
        if extras is None or not bool(visual_mask.any()):
            return {"visual_pos_masks": None, "deepstack_visual_embeds": None}
        hidden_size = self.config.text_config.hidden_size
        deepstack = extras[visual_mask].view(-1, extras.shape[-1] // hidden_size, hidden_size)
        return {"visual_pos_masks": visual_mask, "deepstack_visual_embeds": list(deepstack.unbind(1))}

    def _baseline_pruning(self, pruner):
        return PrunedDeepStack(self.model.language_model, pruner)

    def _baseline_decode_position_ids(self, position_ids):
        # Text on a compressed cache: positions follow from the cache's state (generate()'s come from rope deltas
        # the model keeps from its own prefill, which did not run).
        return None

    def _baseline_output(self, loss, logits, cache, encoder_outputs) -> MultimodalCausalLMOutputWithPast:
        return MultimodalCausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)


# ============================================================================ units
def unit_tokens(features, kinds: list, counts: list) -> list:
    """Per unit `(n, H + layers * H)`: its tokens with their DeepStack features as extra channels, in sequence
    order (images and videos each in their own order, as the placeholders take them)."""
    parts = {}
    for kind, values, deepstack in (
        ("image", features.image, features.image_deepstack),
        ("video", features.video, features.video_deepstack),
    ):
        if values is not None:
            rows = values if deepstack is None else torch.cat([values, deepstack.flatten(1).to(values)], dim=-1)
            parts[kind] = iter(rows.split([n for n, k in zip(counts, kinds) if k == kind]))
    return [next(parts[kind]) for kind in kinds]


def grids_from_positions(spans, positions: torch.Tensor) -> list:
    """Per unit `(h, w)` from the extent of its M-RoPE positions `(3, B, L)` (height and width axes), as
    `get_rope_index` lays a unit out."""
    grids = []
    for k in range(len(spans)):
        row, start, end = int(spans.row[k]), int(spans.start[k]), int(spans.end[k])
        unit = positions[1:, row, start:end]  # (2, n)
        h, w = (unit.amax(-1) - unit.amin(-1) + 1).tolist()
        if h * w != end - start:
            raise ValueError(
                f"baseline: the M-RoPE positions of visual unit {k} ({end - start} tokens) do not form a grid (they "
                f"span {h} x {w}); pass image_grid_thw / video_grid_thw, or position_ids from get_rope_index"
            )
        grids.append((h, w))
    return grids


# ============================================================================ VisionZip's evidence
class VisionAttentionRecorder:
    """Forward pre-hook (with kwargs) on the last vision block's attention: per attention chunk (an image, or a
    video's temporal group), the attention each merged token receives (averaged over heads and queries, summed over
    its `merge**2` patches) and its head-averaged keys (mean over its patches), appended to
    `baseline.recorded["encodings"][-1]`; `start_encoding` (a pre-hook on the tower) opens a new encoding. An
    object, not a closure, so that it follows the model through `copy.deepcopy`."""

    def __init__(self, baseline, attention: nn.Module, merge: int):
        self.baseline = baseline
        self.attention = attention
        self.merge = merge

    def start_encoding(self, _module, _args):
        if self.baseline.enabled:
            self.baseline.recorded.setdefault("encodings", []).append([])

    @torch.no_grad()
    def __call__(self, _module, args, kwargs):
        if not self.baseline.enabled:
            return None
        hidden_states = args[0] if args else kwargs["hidden_states"]
        cu_seqlens = kwargs["cu_seqlens"] if "cu_seqlens" in kwargs else args[1]
        cos, sin = kwargs["position_embeddings"]
        attention = self.attention
        length = hidden_states.shape[0]
        qkv = attention.qkv(hidden_states).reshape(length, 3, attention.num_heads, -1)
        query, key, _ = qkv.permute(1, 0, 2, 3).unbind(0)
        query, key = apply_rotary_pos_emb_vision(query, key, cos, sin)  # (P, heads, D)
        group = self.merge**2
        chunks = []
        bounds = cu_seqlens.tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            q, k = query[start:end].transpose(0, 1)[None], key[start:end].transpose(0, 1)[None]  # (1, heads, P, D)
            received = ops.cross_attn_scores(q.contiguous(), k.contiguous(), scale=attention.scaling)[0]  # (P,)
            keys = key[start:end].float().mean(1)  # (P, D)
            chunks.append((received.view(-1, group).sum(-1), keys.view(-1, group, keys.shape[-1]).mean(1)))
        self.baseline.recorded.setdefault("encodings", [[]])[-1].extend(chunks)
        return None


def recorded_evidence(encodings: list, kinds: list, has_images: bool, has_videos: bool) -> list:
    """Per unit, in sequence order, `{"received": (n,), "keys": (n, D)}` from the recorded encodings: the last ones,
    the images' then the videos', as the encoder runs them right before the forward (generate() encodes before each
    call; an earlier encoding that no forward used, e.g. of a call that continued a cache, is stale)."""
    expected = int(has_images) + int(has_videos)
    if len(encodings) < expected:
        raise RuntimeError(
            f"visionzip: {len(encodings)} encodings of the vision tower were recorded, expected {expected} (the "
            "tower must run after apply_baseline, in this forward or in generate(): pre-encoded mm_encoder_outputs "
            "from elsewhere carry no attention)"
        )
    encodings = encodings[len(encodings) - expected :]
    chunks = {}
    for kind, encoding in zip([k for k, present in (("image", has_images), ("video", has_videos)) if present],
                              encodings):  # fmt: skip
        if len(encoding) != kinds.count(kind):
            raise RuntimeError(
                f"visionzip: the recorded vision attention covers {len(encoding)} {kind} chunks, the prompt has "
                f"{kinds.count(kind)} (were these features encoded by another call?)"
            )
        chunks[kind] = iter(encoding)
    evidence = [next(chunks[kind]) for kind in kinds]
    return [{"received": received, "keys": keys} for received, keys in evidence]


# ============================================================================ FastV and DeepStack
class PrunedDeepStack:
    """Context for FastV's pass on Qwen3-VL: from the first pruned layer on, DeepStack's features are added to the
    kept visual tokens only (the language model's `_deepstack_process` gets the pruned mask and features)."""

    def __init__(self, language_model: nn.Module, pruner):
        self.language_model = language_model
        self.pruner = pruner

    def __enter__(self):
        original = self.language_model._deepstack_process
        pruner = self.pruner

        def process(hidden_states, visual_pos_masks, visual_embeds):
            if pruner.pruning:  # the rows are the kept tokens, in `pruner.index` order
                visual_embeds = visual_embeds[pruner.keep[visual_pos_masks]]
                visual_pos_masks = _gather_rows(visual_pos_masks & pruner.keep, pruner.index)
            return original(hidden_states, visual_pos_masks, visual_embeds)

        self.language_model._deepstack_process = process  # an instance attribute over the class's method
        return self

    def __exit__(self, *exc):
        del self.language_model._deepstack_process
        return False
