"""Qwen3-VL's visual inputs for ETC and the baselines: the family's forward and placeholders (`Qwen3VLInputsMixin`),
the encoder's outputs in placeholder order, the units (an image, or one temporal group of a video) and their token
grids, the checks of `mm_token_type_ids`, the M-RoPE positions of the user's sequence, and the images of a later turn
(`count_images`, `select_images`)."""

import copy
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs

from ..compress import ImageSpans, find_image_spans

# mm_token_type_ids values (Qwen3-VL's processor): text, image, video.
MM_TEXT, MM_IMAGE, MM_VIDEO = 0, 1, 2
PIXEL_INPUTS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


class Qwen3VLInputsMixin:
    """What ETC and the training-free baselines share on Qwen3-VL (`ETCQwen3VLForConditionalGeneration`,
    `etc_ext.baselines.qwen3_vl.BaselineQwen3VLForConditionalGeneration`): the forward, with Hugging Face's
    signature, handing the call to the compressor's `_compressed_forward` (`ETCMixin`, `BaselineMixin`), and where
    the images and videos are. Listed first among a class's bases, so that the compressor's `super().forward` is
    Hugging Face's."""

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        pixel_values_videos: Optional[torch.Tensor] = None,
        image_grid_thw: Optional[torch.LongTensor] = None,
        video_grid_thw: Optional[torch.LongTensor] = None,
        mm_token_type_ids: Optional[torch.IntTensor] = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: Optional[dict] = None,
        **kwargs: Unpack[TransformersKwargs],
    ):
        r"""
        Like `Qwen3VLForConditionalGeneration.forward` (`kwargs`: cache, labels, use_cache, ... and the compressor's
        own, e.g. ETC's `etc_prefill_method`), compressing the images and videos when the compressor is enabled: see
        `ETCMixin._etc_forward` (ETC) or `BaselineMixin._baseline_forward` (the baselines). The processor's outputs
        go in unchanged. `position_ids` of a prompt with images, when given, are the user's M-RoPE positions (`(3 or
        4, batch_size, sequence_length)`); otherwise they are computed with `get_rope_index`, which needs
        `mm_token_type_ids` and the grids.
        """
        visual_kwargs = dict(
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            pixel_values_videos=pixel_values_videos,
            video_grid_thw=video_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
        )
        encoded = {k: v for k, v in (mm_encoder_outputs or {}).items() if v is not None}  # generate()'s
        return self._compressed_forward(
            dict(visual_kwargs, encoded=encoded), visual_kwargs, input_ids, attention_mask, position_ids,
            logits_to_keep, mm_encoder_outputs, inputs_embeds=inputs_embeds, **kwargs,
        )  # fmt: skip

    def _visual_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        return (input_ids == self.config.image_token_id) | (input_ids == self.config.video_token_id)

    def _placeholder_token_ids(self) -> tuple:
        return self.config.image_token_id, self.config.video_token_id

    def _has_visual_inputs(self, visual_inputs: dict) -> bool:
        pixels = visual_inputs["pixel_values"], visual_inputs["pixel_values_videos"]
        return any(p is not None for p in pixels) or bool(visual_inputs["encoded"])


@dataclass
class VisualFeatures:
    """Encoder outputs flattened in placeholder order: what goes into the visual positions of the user's sequence."""

    image: Optional[torch.Tensor]  # (n_image_tokens, H)
    video: Optional[torch.Tensor]  # (n_video_tokens, H)
    image_deepstack: Optional[torch.Tensor]  # (n_image_tokens, K, H): one feature per DeepStack layer
    video_deepstack: Optional[torch.Tensor]  # (n_video_tokens, K, H)


def check_mm_token_type_ids(mm_token_type_ids, image_mask, video_mask) -> None:
    if mm_token_type_ids is None:
        raise ValueError(
            "ETC on Qwen3-VL needs mm_token_type_ids (the processor returns it with input_ids: 0 text, 1 image, "
            "2 video) for the M-RoPE positions"
        )
    if mm_token_type_ids.shape != image_mask.shape:
        raise ValueError(
            f"mm_token_type_ids must have the shape of input_ids {list(image_mask.shape)}, "
            f"got {list(mm_token_type_ids.shape)}"
        )
    images, videos = mm_token_type_ids == MM_IMAGE, mm_token_type_ids == MM_VIDEO
    if not (torch.equal(images, image_mask) and torch.equal(videos, video_mask)):
        raise ValueError(
            "mm_token_type_ids do not match input_ids: they must be 1 exactly at the image tokens and 2 exactly at "
            "the video tokens"
        )


def _concat(outputs):
    if outputs is None:
        return None, None
    pooled = torch.cat(list(outputs.pooler_output), dim=0)  # (n, H)
    deepstack = getattr(outputs, "deepstack_features", None)
    if not deepstack:
        return pooled, None
    return pooled, torch.stack([torch.cat(list(layer), dim=0) for layer in deepstack], dim=1)  # (n, K, H)


def encode_visual_inputs(model, pixel_inputs: dict, encoded: dict) -> tuple:
    """`(image_outputs, video_outputs)` of the vision encoder of `model` (a `Qwen3VLModel`): as generate() made them
    (`encoded`), or from the pixels and grids."""
    for modality, pixels in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        if pixel_inputs[pixels] is not None and encoded.get(modality) is not None:
            raise ValueError(f"Pass either {pixels} or mm_encoder_outputs['{modality}'], not both")
    image_outputs, video_outputs = encoded.get("image"), encoded.get("video")
    if image_outputs is None and pixel_inputs["pixel_values"] is not None:
        if pixel_inputs["image_grid_thw"] is None:
            raise ValueError("ETC: pixel_values need image_grid_thw")
        image_outputs = model.get_image_features(pixel_inputs["pixel_values"], pixel_inputs["image_grid_thw"],
                                                 return_dict=True)  # fmt: skip
    if video_outputs is None and pixel_inputs["pixel_values_videos"] is not None:
        if pixel_inputs["video_grid_thw"] is None:
            raise ValueError("ETC: pixel_values_videos need video_grid_thw")
        video_outputs = model.get_video_features(pixel_inputs["pixel_values_videos"], pixel_inputs["video_grid_thw"],
                                                 return_dict=True)  # fmt: skip
    return image_outputs, video_outputs


def align_mm_token_type_ids(mm_token_type_ids, length: int):
    """`mm_token_type_ids` cut or padded to the last `length` columns: generate() passes the whole conversation's
    types on a later turn, and appends tokens (assisted decoding's candidates) without extending them (text)."""
    if mm_token_type_ids is None or mm_token_type_ids.shape[-1] == length:
        return mm_token_type_ids
    if mm_token_type_ids.shape[-1] > length:
        return mm_token_type_ids[..., -length:]
    missing = length - mm_token_type_ids.shape[-1]
    return torch.nn.functional.pad(mm_token_type_ids, (0, missing), value=MM_TEXT)


def module_trains(module: nn.Module, peft_layers=None) -> bool:
    """Whether `module` has trainable parameters, or (with LoRA) holds any of `peft_layers`."""
    if peft_layers is None:
        return any(p.requires_grad for p in module.parameters())
    inside = set(module.modules())
    return any(layer in inside for layer in peft_layers)


def flatten_features(image_outputs, video_outputs) -> VisualFeatures:
    image, image_deepstack = _concat(image_outputs)
    video, video_deepstack = _concat(video_outputs)
    return VisualFeatures(image=image, video=video, image_deepstack=image_deepstack, video_deepstack=video_deepstack)


def detached(features: VisualFeatures) -> VisualFeatures:
    return VisualFeatures(
        **{name: None if value is None else value.detach() for name, value in vars(features).items()}
    )


def encode_with(visual: nn.Module, pixel_inputs: dict, features: VisualFeatures) -> VisualFeatures:
    """Encode the pixels with a given vision tower (a frozen teacher's), as `Qwen3VLModel.get_image_features`;
    `features` tell which modalities the batch has."""
    outputs = {}
    for modality, pixels, grid in (
        ("image", "pixel_values", "image_grid_thw"),
        ("video", "pixel_values_videos", "video_grid_thw"),
    ):
        outputs[modality] = None
        if getattr(features, modality) is None:
            continue
        if pixel_inputs.get(pixels) is None:
            raise ValueError(f"ETC: the frozen teacher's vision tower needs {pixels} (not pre-encoded features)")
        grid_thw = pixel_inputs[grid]
        encoded = visual(pixel_inputs[pixels].type(visual.dtype), grid_thw=grid_thw, return_dict=True)
        sizes = (grid_thw.prod(-1) // visual.spatial_merge_size**2).tolist()
        encoded.pooler_output = torch.split(encoded.pooler_output, sizes)
        encoded.deepstack_features = [torch.split(f, sizes) for f in encoded.deepstack_features]
        outputs[modality] = encoded
    return flatten_features(outputs["image"], outputs["video"])


def scatter_features(inputs_embeds, image_mask, video_mask, features: VisualFeatures):
    """The user's embeddings `inputs_embeds` `(B, L, H)` with the visual features at the placeholders, and the
    DeepStack features `(B, L, K, H)` (zeros elsewhere; None without DeepStack)."""
    deepstack = None
    for mask, values, stacked in (
        (image_mask, features.image, features.image_deepstack),
        (video_mask, features.video, features.video_deepstack),
    ):
        if values is None:
            continue
        inputs_embeds = inputs_embeds.masked_scatter(mask[..., None], values.to(inputs_embeds.dtype))
        if stacked is not None:
            if deepstack is None:
                deepstack = inputs_embeds.new_zeros(*inputs_embeds.shape[:2], stacked.shape[1], inputs_embeds.shape[-1])
            deepstack = deepstack.masked_scatter(mask[..., None, None], stacked.to(inputs_embeds.dtype))
    return inputs_embeds, deepstack


def visual_spans(image_mask, video_mask, image_counts, video_counts) -> tuple[ImageSpans, list, list]:
    """Split the visual placeholders into ETC's units, in sequence order (row by row): each image is one unit of
    `image_counts[i]` tokens; each video is cut into its runs of placeholders (its temporal groups, which the
    processor separates with timestamp text). Returns the spans and, per unit, its kind ("image" / "video") and the
    index of its image / video."""
    for name, mask, counts in (("image", image_mask, image_counts), ("video", video_mask, video_counts)):
        total = int(mask.sum())
        # transformers' wording first, which users and tools search for, then what was given
        mismatch = (
            f"{name.capitalize()} features and {name} tokens do not match, tokens: {total}, features: {sum(counts)}."
        )
        if total == 0 and counts:
            raise ValueError(
                f"{mismatch} The prompts contain no {name} token but {len(counts)} {name}(s) were given: each needs "
                "its placeholder tokens in input_ids."
            )
        if total != sum(counts):
            given = f"{len(counts)} {name}(s) giving {sum(counts)} features" if counts else "no pixel values"
            raise ValueError(f"{mismatch} Got {given} ({counts} per {name}).")
    # Runs of placeholders of one kind, row-major: (row, length, kind).
    kind = image_mask.long() + 2 * video_mask.long()  # (B, L): 0 text, 1 image, 2 video
    previous = torch.nn.functional.pad(kind[:, :-1], (1, 0))
    starts = (kind > 0) & (kind != previous)
    run_id = starts.flatten().long().cumsum(0).view_as(kind) - 1
    visual = kind > 0
    lengths = torch.bincount(run_id[visual], minlength=int(starts.sum())).tolist()
    run_kinds = kind[starts].tolist()

    counts, kinds, sources = [], [], []
    images = iter(enumerate(image_counts))
    video_index, video_left = -1, 0
    for length, run_kind in zip(lengths, run_kinds):
        remaining = length
        while remaining > 0:
            if run_kind == 1:
                index, count = next(images)
                if count > remaining:
                    raise ValueError(
                        f"Image {index}'s {count} tokens are not one contiguous run of image tokens within one row"
                    )
                counts.append(count), kinds.append("image"), sources.append(index)
                remaining -= count
            else:
                if video_left == 0:
                    video_index += 1
                    video_left = video_counts[video_index]
                take = min(remaining, video_left)
                counts.append(take), kinds.append("video"), sources.append(video_index)
                remaining -= take
                video_left -= take
    spans = find_image_spans(image_mask | video_mask, counts)
    for v in range(len(video_counts)):
        video_rows = {int(spans.row[k]) for k in range(len(counts)) if kinds[k] == "video" and sources[k] == v}
        if len(video_rows) > 1:
            raise ValueError(f"Video {v}'s tokens are spread over several rows of input_ids")
    return spans, kinds, sources


def span_grids(spans, kinds, sources, image_grid_thw, video_grid_thw, merge, has_images, has_videos):
    """`(I, 3)` `(t, h, w)` grid of visual tokens of each unit, or None when a needed grid was not given."""
    if (has_images and image_grid_thw is None) or (has_videos and video_grid_thw is None):
        return None
    grids = []
    for k, (kind, source) in enumerate(zip(kinds, sources)):
        t, h, w = (image_grid_thw if kind == "image" else video_grid_thw)[source].tolist()
        h, w = h // merge, w // merge
        count = int(spans.num_tokens[k])
        if count % (h * w):
            raise ValueError(f"A {kind} run of {count} tokens does not fit the {kind}'s {h} x {w} token grid")
        grids.append((count // (h * w), h, w))
    return torch.tensor(grids, dtype=torch.long, device=spans.row.device).view(-1, 3)


def count_images(visual_inputs: dict) -> int:
    """The images in `visual_inputs` (pre-encoded or as grids); videos added to a compressed cache are refused."""
    if visual_inputs["pixel_values_videos"] is not None or visual_inputs["encoded"].get("video") is not None:
        raise NotImplementedError(
            "ETC: adding videos to a cache that holds a compressed prefill is not implemented yet; prefill the "
            "whole conversation into a new cache instead."
        )
    encoded = visual_inputs["encoded"].get("image")
    if encoded is not None:
        return len(encoded.pooler_output)
    grid = visual_inputs["image_grid_thw"]
    return 0 if grid is None else len(grid)


def select_images(visual_inputs: dict, index: list) -> dict:
    """`visual_inputs` restricted to the images `index` (their grids, patches and pre-encoded features)."""
    selected = dict(visual_inputs)
    grid = visual_inputs["image_grid_thw"]
    if grid is not None:
        selected["image_grid_thw"] = grid[index]
        if visual_inputs["pixel_values"] is not None:
            patches = visual_inputs["pixel_values"].split(grid.prod(-1).tolist())
            selected["pixel_values"] = torch.cat([patches[i] for i in index])
    encoded = visual_inputs["encoded"].get("image")
    if encoded is not None:
        encoded = copy.copy(encoded)
        encoded.pooler_output = [encoded.pooler_output[i] for i in index]
        if getattr(encoded, "deepstack_features", None):
            encoded.deepstack_features = [[layer[i] for i in index] for layer in encoded.deepstack_features]
        selected["encoded"] = dict(visual_inputs["encoded"], image=encoded)
    return selected


def user_positions(
    model, input_ids, attention_mask, position_ids, mm_token_type_ids, pixel_inputs, image_counts, video_counts
) -> torch.Tensor:
    """`(3, B, L)` M-RoPE positions of the user's sequence: the given ones (generate() passes `(4, B, L)`, the
    text row first), else `get_rope_index`."""
    if position_ids is not None:
        batch_size, length = input_ids.shape
        if position_ids.dim() == 2 and position_ids.shape == (batch_size, length):
            return position_ids[None].expand(3, -1, -1)
        if position_ids.dim() == 3 and position_ids.shape[0] in (3, 4) and position_ids.shape[1:] == (
            batch_size, length
        ):
            return position_ids[-3:]  # generate()'s (4, B, L) has the text row first
        raise ValueError(
            f"position_ids must be ({batch_size}, {length}), (3, {batch_size}, {length}) or (4, {batch_size}, "
            f"{length}) for input_ids of shape {[batch_size, length]}, got {list(position_ids.shape)}"
        )
    missing = [
        name
        for name, needed in (("image_grid_thw", image_counts), ("video_grid_thw", video_counts))
        if needed and pixel_inputs[name] is None
    ]
    if missing:
        raise ValueError(
            f"ETC on Qwen3-VL needs position_ids or {' and '.join(missing)} to compute the M-RoPE positions"
        )
    positions, _ = model.get_rope_index(
        input_ids,
        mm_token_type_ids=mm_token_type_ids,
        image_grid_thw=pixel_inputs["image_grid_thw"],
        video_grid_thw=pixel_inputs["video_grid_thw"],
        attention_mask=attention_mask,
    )
    return positions
