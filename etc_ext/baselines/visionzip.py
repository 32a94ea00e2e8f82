""""visionzip": VisionZip (Yang et al., dvlab-research/VisionZip), in the vision tower's feature space before the
projector, as its code does: in the layer whose output the model reads (`vision_feature_layer`), the [CLS] query's
attention over the patches picks the dominant patches; the other patches are merged into contextual tokens (see
`visionzip_merge`). The layer's query/key states are taken by forward hooks on its `q_proj` and `k_proj` and reduced
with `etc_ext.ops.cross_attn_scores`: the tower keeps its attention implementation."""

from typing import Optional

import torch
from torch.nn import functional as F

from .. import ops
from .merging import _weighted_aggregate, group_logits
from .registry import BaselineMethod, register_method

__all__ = ["VisionZip", "visionzip_split", "visionzip_merge"]


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
    merged, _ = merge_patches(tokens[:, 1:], cls_attention, keys[:, 1:], dominant - int(keep_cls), contextual)
    return torch.cat([tokens[:, :1], merged], dim=1) if keep_cls else merged


def merge_patches(
    patches: torch.Tensor, attention: torch.Tensor, patch_keys: torch.Tensor, num_dominant: int, contextual: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip on patches: the `num_dominant` most attended patches, then `contextual` merged tokens.

    Args:
        patches: `(I, P, C)`; attention: `(I, P)` how much attention each patch gets (any positive scale);
            patch_keys: `(I, P, D)` head-averaged keys (cosine similarity picks each patch's target).

    Returns `(I, num_dominant + contextual, C)` (`[dominant patches in patch order, contextual tokens in target
    order]`) and `(I, num_dominant + contextual)` the patch each stands for (itself, or the target).
    """
    images, num_patches, channels = patches.shape
    device = patches.device

    top = attention.topk(num_dominant, dim=-1).indices.sort(dim=-1).values  # (I, Dp)
    parts, sources = [patches.gather(1, top[..., None].expand(-1, -1, channels))], [top]
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
        sources.append(targets)
    return torch.cat(parts, dim=1), torch.cat(sources, dim=1)


class RecordInto:
    """Forward hook that stores a module's output in `baseline.recorded[name]` (an object, not a closure, so that it
    follows the model through `copy.deepcopy`)."""

    def __init__(self, baseline, name: str):
        self.baseline = baseline
        self.name = name

    def __call__(self, _module, _args, output):
        if self.baseline.enabled:
            self.baseline.recorded[self.name] = output


@register_method
class VisionZip(BaselineMethod):
    name = "visionzip"
    label = "VisionZip-style merge"
    options = {"dominant": None, "keep_cls": None}
    reduces_while_encoding = True
    records_vision_attention = True  # backbones without a fixed grid record the evidence `reduce_image` reads

    def check(self, config, geometry) -> None:
        if config.keep_cls is None:  # VisionZip keeps the [CLS] feature where the tower has one
            config.keep_cls = geometry.cls_token
        if config.keep_cls and not geometry.cls_token:
            raise ValueError("visionzip: keep_cls=True needs a vision tower with a [CLS] token; this one has none")
        if geometry.grid is None:
            return  # each image is checked when it arrives
        num_patches = geometry.grid[0] * geometry.grid[1]
        dominant, contextual = visionzip_split(config.num_tokens, config.dominant)
        dominant_patches = dominant - int(config.keep_cls)
        if dominant_patches < 0:
            raise ValueError("visionzip: keep_cls=True needs dominant >= 1 (the [CLS] feature is a dominant token)")
        if dominant_patches + contextual > num_patches or (contextual > 0 and dominant_patches >= num_patches):
            raise ValueError(
                f"visionzip: {dominant} dominant (keep_cls={config.keep_cls}) + {contextual} contextual tokens do "
                f"not fit in {num_patches} patches"
            )

    def install(self, model) -> list:
        """Hooks on the feature layer's `q_proj`, `k_proj` and output, and the projector's input."""
        baseline, layer = model.baseline, model._baseline_vision_layer()
        return [
            layer.self_attn.q_proj.register_forward_hook(RecordInto(baseline, "query")),
            layer.self_attn.k_proj.register_forward_hook(RecordInto(baseline, "key")),
            layer.register_forward_hook(RecordInto(baseline, "hidden")),
            model._baseline_projector().register_forward_pre_hook(model._baseline_reduce_projector_input),
        ]

    def reduce_image(self, tokens, grid, config, evidence):
        """A tower without [CLS] (Qwen3-VL), after encoding: the dominant tokens are those the last vision layer's
        queries attend to most (`evidence["received"]` `(N,)`, averaged over heads and queries: VisionZip's rule for
        models without [CLS]); the others merge into contextual tokens by their keys (`evidence["keys"]` `(N, D)`)."""
        dominant, contextual = visionzip_split(config.num_tokens, config.dominant)
        merged, sources = merge_patches(
            tokens[None], evidence["received"][None], evidence["keys"][None], dominant, contextual
        )
        return merged[0], sources[0]

    def check_call(self, model, vision_feature_layer) -> None:
        if vision_feature_layer is not None and vision_feature_layer != model.config.vision_feature_layer:
            raise ValueError(
                "visionzip hooks config.vision_feature_layer; a per-call vision_feature_layer is not supported"
            )

    def reduce_projector_input(self, model, features: torch.Tensor, recorded: dict) -> torch.Tensor:
        """The projector's input `(images, N, C)` -> `(images, K, C)` from the feature layer's recorded states."""
        baseline = model.baseline
        if set(recorded) != {"query", "key", "hidden"}:
            raise RuntimeError("visionzip: the vision feature layer's states were not recorded during this encoding")
        hidden = recorded["hidden"]  # (images, 1 + P, C): [CLS] and patches
        expected = hidden.shape[1] - (0 if baseline.geometry.cls_feature else 1)
        if features.shape[:2] != (hidden.shape[0], expected):
            raise ValueError(
                f"visionzip: the projector's input {list(features.shape)} is not the recorded vision layer's output "
                f"{list(hidden.shape)} (was get_image_features called with another vision_feature_layer?)"
            )
        layer = model._baseline_vision_layer()
        num_heads, scale = layer.self_attn.num_heads, layer.self_attn.scale

        def heads(x):  # (images, S, heads * D) -> (images, heads, S, D)
            return x.view(*x.shape[:2], num_heads, -1).transpose(1, 2)

        query, key = heads(recorded["query"]), heads(recorded["key"])
        cls_attention = ops.cross_attn_scores(query[:, :, :1].contiguous(), key, scale=scale)[:, 1:]  # (images, P)
        dominant, contextual = visionzip_split(baseline.num_tokens, baseline.config.dominant)
        merged = visionzip_merge(hidden, cls_attention, key.mean(1), dominant, contextual, baseline.config.keep_cls)
        return merged.to(features.dtype)
