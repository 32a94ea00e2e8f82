"""ETC on Hugging Face Qwen3-VL (`transformers.Qwen3VLForConditionalGeneration`).

`apply_etc(model, config)` extends a model in place, as for LLaVA (`etc_ext.models.llava`): it registers `model.etc`,
freezes the vision tower (`model.model.visual`, which holds Qwen3-VL's mergers, i.e. its projector) and makes the
model an `ETCQwen3VLForConditionalGeneration`. Then `model(**inputs, labels=labels)` trains under the bottleneck mask
(`loss = ce_loss + vid_weight * vid_loss`), `model.generate(**inputs)` prefills into an `ETCCache` holding M entries
per image per layer, and `model.etc.enabled = False` gives back the original model. The processor's outputs go in
unchanged (input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw, pixel_values_videos,
video_grid_thw).

What differs from LLaVA:

- Images of any size: an image is one run of `t * h * w / merge**2` `<|image_pad|>` tokens, so N varies per image.
  A video is several runs of `<|video_pad|>` tokens, one per temporal group (the processor separates them with
  timestamp text); each run is compressed on its own, so ETC's unit is "an image or a video's temporal group", and a
  video of T groups keeps M * T entries.
- M-RoPE: the 3-D position ids of the user's sequence come from the model's `get_rope_index` (or from `generate()`,
  which computes the same); compression tokens get text-like positions right after their image (all three axes equal
  to the image's largest position + 1, as text there would), and the text after moves by M per earlier image: exactly
  `get_rope_index` of the extended sequence with `mm_token_type_ids` 0 (text) at the inserted tokens. Dropping the
  visual entries from the cache leaves the gap; nothing is renumbered.
- DeepStack: the features the vision tower injects into the first LLM layers are placed in the extended layout and
  passed with each pass (`visual_pos_masks`, `deepstack_visual_embeds`), so they reach the visual positions in the
  masked training pass, in pass 1 of the segmented prefill and in the teacher pass.
- generate() encodes images and videos before the first forward (`mm_encoder_outputs`) and drops pixel_values and
  the grids; the prefill works from those outputs and generate()'s 3-D position ids.
- Variable N in the VID decoder: its position embeddings form a 2-D grid (the vision tower's position grid after the
  spatial merge, 24 x 24 for Qwen3-VL-2B), resampled to each image's grid (`etc_ext.distill.VIDDecoder`).
- LoRA is the default way to fine-tune the LLM (the paper: rank 8): `apply_etc_with_lora(model, config)`.
"""

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from transformers import Qwen3VLForConditionalGeneration
from transformers.cache_utils import Cache
from transformers.modeling_outputs import MultimodalCausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from ..compress import (
    VISUAL,
    ETCCache,
    ETCLayout,
    ImageSpans,
    bottleneck_mask,
    etc_prefill,
    find_image_spans,
    insert_compression_tokens,
    to_attention_mask,
)
from ..config import ETCConfig
from ..distill import (
    adapter_layers,
    adapters_disabled,
    capture_query_key,
    instruction_aware_target,
    instruction_scores_spans,
    resolve_target_layer,
)
from . import common
from .common import ETCModules, FrozenTeacher, check_etc_inputs, unwrap_peft

__all__ = [
    "LORA_TARGET_MODULES",
    "ETCQwen3VLCausalLMOutputWithPast",
    "ETCQwen3VLInputs",
    "ETCQwen3VLForConditionalGeneration",
    "apply_etc",
    "apply_etc_with_lora",
    "default_lora_config",
    "remove_etc",
    "save_pretrained",
    "from_pretrained",
    "snapshot_teacher",
    "prepare_inputs",
    "instruction_target",
    "decoder_position_grid",
]

# The LLM's linear layers (attention and MLP), not the vision tower's: the paper's LoRA setup for Qwen3-VL-2B.
LORA_TARGET_MODULES = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

# mm_token_type_ids values (Qwen3-VL's processor): text, image, video.
_MM_TEXT, _MM_IMAGE, _MM_VIDEO = 0, 1, 2


@dataclass
class ETCQwen3VLCausalLMOutputWithPast(MultimodalCausalLMOutputWithPast):
    r"""
    ce_loss (`torch.FloatTensor`, *optional*):
        Next-token cross-entropy of the compressed model (returned with `labels`).
    vid_loss (`torch.FloatTensor`, *optional*):
        Distillation loss (VID or MSE, see `ETCConfig.loss`; returned with `labels` unless the loss is "none").
        `loss = ce_loss + vid_weight * vid_loss`.
    """

    ce_loss: Optional[torch.FloatTensor] = None
    vid_loss: Optional[torch.FloatTensor] = None


@dataclass
class _VisualFeatures:
    """Encoder outputs flattened in placeholder order: what goes into the visual positions of the user's sequence."""

    image: Optional[torch.Tensor]  # (n_image_tokens, H)
    video: Optional[torch.Tensor]  # (n_video_tokens, H)
    image_deepstack: Optional[torch.Tensor]  # (n_image_tokens, K, H): one feature per DeepStack layer
    video_deepstack: Optional[torch.Tensor]  # (n_video_tokens, K, H)


@dataclass
class ETCQwen3VLInputs:
    """A batch prepared for ETC (see `prepare_inputs`).

    Attributes:
        layout: the extended sequence (M compression tokens after each image / video temporal group).
        inputs_embeds: `(B, Lx, H)` extended embeddings.
        token_inputs: what each language-model pass gets per token, extended layout: `deepstack` `(B, Lx, K, H)`
            (zeros off the visual tokens) and `visual_mask` `(B, Lx)`; empty without DeepStack.
        mm_token_type_ids: `(B, Lx)` the user's token types extended with 0 (text) at the compression tokens.
        position_ids: `(3, B, L)` M-RoPE positions of the user's sequence.
        visual_token_mask: `(B, L)` image and video placeholders.
        grids: int64 `(I, 3)` `(t, h, w)` grid of visual tokens of each image / temporal group, in span order, or
            None when the grids were not given (generate() drops them; only distillation needs them).
        features: the encoder outputs (reused by the teacher pass).
        image_outputs, video_outputs: the vision encoder's outputs, returned as the model's outputs do.
        pixel_inputs: pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw as given.
    """

    layout: ETCLayout
    inputs_embeds: torch.Tensor
    token_inputs: dict
    mm_token_type_ids: torch.Tensor
    position_ids: torch.Tensor
    visual_token_mask: torch.Tensor
    grids: Optional[torch.Tensor]
    features: _VisualFeatures = field(repr=False)
    image_outputs: object = field(default=None, repr=False)
    video_outputs: object = field(default=None, repr=False)
    pixel_inputs: dict = field(default_factory=dict, repr=False)

    @property
    def spans(self) -> ImageSpans:
        return self.layout.spans


class ETCQwen3VLForConditionalGeneration(Qwen3VLForConditionalGeneration):
    """A `Qwen3VLForConditionalGeneration` with ETC; made by `apply_etc`, never instantiated directly."""

    etc: ETCModules

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        pixel_values_videos: Optional[torch.Tensor] = None,
        image_grid_thw: Optional[torch.LongTensor] = None,
        video_grid_thw: Optional[torch.LongTensor] = None,
        mm_token_type_ids: Optional[torch.IntTensor] = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: Optional[dict] = None,
        use_cache: Optional[bool] = None,
        etc_prefill_method: Optional[str] = None,
        **kwargs,
    ) -> ETCQwen3VLCausalLMOutputWithPast:
        r"""
        Like `Qwen3VLForConditionalGeneration.forward`, with ETC when `self.etc.enabled`:

        - without a cache (and `use_cache` not True): the masked single pass over the sequence with M compression
          tokens after each image (and each temporal group of a video). `logits` are in the user's layout
          `(batch_size, sequence_length, vocab_size)`, so `labels` are the user's. With `labels`:
          `loss = ce_loss + vid_weight * vid_loss`.
        - with an empty cache or `use_cache=True` (generate()'s prefill): the compressed prefill into an `ETCCache`;
          `logits` `(batch_size, 1, vocab_size)` are those of each row's last token.
        - with an `ETCCache` that holds a prefill: decoding. `attention_mask` and `position_ids` (2-D, or 3-D with 3
          or 4 rows as generate() makes them) are in the user's layout and are mapped onto the compacted cache.

        `position_ids` of a prompt with images, when given, are the user's M-RoPE positions (`(3 or 4, batch_size,
        sequence_length)`); otherwise they are computed with `get_rope_index`, which needs `mm_token_type_ids` and
        the grids.

        etc_prefill_method (`str`, *optional*):
            "auto", "segmented" or "masked"; defaults to `self.etc.prefill_method`.
        """
        base_kwargs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            labels=labels,
            pixel_values=pixel_values,
            pixel_values_videos=pixel_values_videos,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            logits_to_keep=logits_to_keep,
            mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )
        if use_cache is not None:
            base_kwargs["use_cache"] = use_cache
        if not self.etc.enabled:
            return super().forward(**base_kwargs)

        encoded = {k: v for k, v in (mm_encoder_outputs or {}).items() if v is not None}
        has_visual_inputs = pixel_values is not None or pixel_values_videos is not None or bool(encoded)
        etc_state = getattr(cache, "etc_state", None)
        if etc_state is not None:  # decoding: new tokens are text (a generated image token id too)
            if has_visual_inputs:
                raise NotImplementedError(
                    "ETC: adding images or videos to a cache that already holds a compressed prefill is not "
                    "supported; start a new cache for a prompt with images."
                )
            base_kwargs.update(self._etc_decode_inputs(input_ids, attention_mask, position_ids, cache))
            return super().forward(**base_kwargs)
        visual_token_mask = None if input_ids is None else self._etc_visual_token_mask(input_ids)
        has_visual_tokens = visual_token_mask is not None and bool(visual_token_mask.any())
        if not has_visual_inputs and not has_visual_tokens:
            return super().forward(**base_kwargs)  # nothing to compress: text only

        check_etc_inputs(input_ids, inputs_embeds, labels, kwargs)
        pixel_inputs = dict(
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            pixel_values_videos=pixel_values_videos,
            video_grid_thw=video_grid_thw,
        )
        prefill = cache is not None or bool(use_cache)
        if prefill and labels is not None:
            raise ValueError(
                "ETC: labels go with the training forward (no cache); the prefill (cache / use_cache=True) returns "
                "only the last token's logits."
            )
        if prefill and cache is not None and cache.get_seq_length() > 0:
            raise NotImplementedError("ETC: prefilling images into a non-empty cache is not supported")
        prepared = self._etc_inputs(input_ids, attention_mask, position_ids, mm_token_type_ids, pixel_inputs, encoded)
        if prefill:
            method = etc_prefill_method or self.etc.prefill_method
            return self._etc_prefill(prepared, input_ids.shape[1], cache, method)
        return self._etc_masked_forward(prepared, input_ids, attention_mask, labels, logits_to_keep, kwargs)

    # ---------------------------------------------------------------------------------------------- inputs
    def _etc_visual_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        return (input_ids == self.config.image_token_id) | (input_ids == self.config.video_token_id)

    def _etc_encode(self, pixel_inputs: dict, encoded: dict) -> tuple:
        """The vision encoder's outputs for images and videos (as generate() made them, or from the pixels)."""
        for modality, pixels in (("image", "pixel_values"), ("video", "pixel_values_videos")):
            if pixel_inputs[pixels] is not None and encoded.get(modality) is not None:
                raise ValueError(f"Pass either {pixels} or mm_encoder_outputs['{modality}'], not both")
        image_outputs, video_outputs = encoded.get("image"), encoded.get("video")
        if image_outputs is None and pixel_inputs["pixel_values"] is not None:
            if pixel_inputs["image_grid_thw"] is None:
                raise ValueError("ETC: pixel_values need image_grid_thw")
            image_outputs = self.model.get_image_features(
                pixel_inputs["pixel_values"], pixel_inputs["image_grid_thw"], return_dict=True
            )
        if video_outputs is None and pixel_inputs["pixel_values_videos"] is not None:
            if pixel_inputs["video_grid_thw"] is None:
                raise ValueError("ETC: pixel_values_videos need video_grid_thw")
            video_outputs = self.model.get_video_features(
                pixel_inputs["pixel_values_videos"], pixel_inputs["video_grid_thw"], return_dict=True
            )
        return image_outputs, video_outputs

    def _etc_inputs(
        self, input_ids, attention_mask, position_ids, mm_token_type_ids, pixel_inputs: dict, encoded: dict
    ) -> ETCQwen3VLInputs:
        """Vision features, the images' spans, M-RoPE positions, the extended layout, embeddings and DeepStack."""
        image_mask = input_ids == self.config.image_token_id  # (B, L)
        video_mask = input_ids == self.config.video_token_id
        visual_token_mask = image_mask | video_mask
        _check_mm_token_type_ids(mm_token_type_ids, image_mask, video_mask)
        image_outputs, video_outputs = self._etc_encode(pixel_inputs, encoded)
        features = _flatten_features(image_outputs, video_outputs)
        image_counts = [] if image_outputs is None else [f.shape[0] for f in image_outputs.pooler_output]
        video_counts = [] if video_outputs is None else [f.shape[0] for f in video_outputs.pooler_output]
        spans, kinds, sources = _visual_spans(image_mask, video_mask, image_counts, video_counts)
        grids = _span_grids(
            spans, kinds, sources, pixel_inputs["image_grid_thw"], pixel_inputs["video_grid_thw"],
            self.config.vision_config.spatial_merge_size, image_outputs is not None, video_outputs is not None,
        )  # fmt: skip

        position_ids = self._etc_user_positions(
            input_ids, attention_mask, position_ids, mm_token_type_ids, pixel_inputs, image_counts, video_counts
        )
        user_embeds, user_deepstack = _scatter_features(
            self.get_input_embeddings(), input_ids, image_mask, video_mask, features
        )
        layout = insert_compression_tokens(
            spans, input_ids.shape[1], self.etc.config.num_compression_tokens, attention_mask, position_ids
        )
        token_inputs = {}
        if user_deepstack is not None:
            token_inputs = {
                "deepstack": layout.extend(user_deepstack, 0.0),  # (B, Lx, K, H)
                "visual_mask": layout.token_type == VISUAL,  # (B, Lx)
            }
        return ETCQwen3VLInputs(
            layout=layout,
            inputs_embeds=layout.embed(user_embeds, self.etc.compression_tokens()),
            token_inputs=token_inputs,
            mm_token_type_ids=layout.extend(mm_token_type_ids, _MM_TEXT),
            position_ids=position_ids,
            visual_token_mask=visual_token_mask,
            grids=grids,
            features=features,
            image_outputs=image_outputs,
            video_outputs=video_outputs,
            pixel_inputs=pixel_inputs,
        )

    def _etc_user_positions(
        self, input_ids, attention_mask, position_ids, mm_token_type_ids, pixel_inputs, image_counts, video_counts
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
        positions, _ = self.model.get_rope_index(
            input_ids,
            mm_token_type_ids=mm_token_type_ids,
            image_grid_thw=pixel_inputs["image_grid_thw"],
            video_grid_thw=pixel_inputs["video_grid_thw"],
            attention_mask=attention_mask,
        )
        return positions

    def _etc_language_model(
        self, language_model, inputs_embeds, attention_mask, position_ids, cache, deepstack=None, visual_mask=None,
        **kwargs,
    ):  # fmt: skip
        """One language-model pass with the DeepStack features `(B, S, K, H)` of the tokens in `visual_mask`."""
        visual_pos_masks = deepstack_visual_embeds = None
        if deepstack is not None and bool(visual_mask.any()):
            visual_pos_masks = visual_mask
            deepstack_visual_embeds = list(deepstack[visual_mask].unbind(1))  # K x (n_visual, H)
        return language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
            visual_pos_masks=visual_pos_masks,
            deepstack_visual_embeds=deepstack_visual_embeds,
            **kwargs,
        )

    def _etc_run_language_model(self, inputs_embeds, attention_mask, position_ids, cache, **token_inputs):
        """`RunLanguageModel` for the prefill drivers of `etc_ext.compress` (token_inputs: DeepStack)."""
        outputs = self._etc_language_model(
            self.model.language_model, inputs_embeds, attention_mask, position_ids, cache, **token_inputs
        )
        return outputs.last_hidden_state

    # ---------------------------------------------------------------------------------------------- training
    def _etc_masked_forward(
        self, prepared: ETCQwen3VLInputs, input_ids, attention_mask, labels, logits_to_keep, kwargs
    ) -> ETCQwen3VLCausalLMOutputWithPast:
        """The single pass under the bottleneck mask (training, and the oracle for the prefill)."""
        layout = prepared.layout
        language_model = self.model.language_model
        mask = to_attention_mask(
            bottleneck_mask(layout), language_model.config._attn_implementation, prepared.inputs_embeds.dtype
        )
        distill = labels is not None and self.etc.distill is not None
        hidden_index, attention_layer = resolve_target_layer(
            self.etc.config.target_layer, language_model.config.num_hidden_layers
        )
        final = hidden_index == language_model.config.num_hidden_layers
        outputs = self._etc_language_model(
            language_model,
            prepared.inputs_embeds,
            mask,
            layout.position_ids,
            None,
            output_hidden_states=[hidden_index] if distill and not final else None,
            **prepared.token_inputs,
        )
        hidden_states = outputs.last_hidden_state  # (B, Lx, H)

        # Logits in the user's layout: the output that predicts each user token's successor.
        rows = torch.arange(layout.batch_size, device=hidden_states.device)[:, None]
        user_hidden = hidden_states[rows, layout.next_token_index()]  # (B, L, H)
        if labels is None:
            user_hidden = slice_logits_to_keep(user_hidden, logits_to_keep)
        logits = self.lm_head(user_hidden)

        loss = ce_loss = vid_loss = None
        if labels is not None:
            ce_loss = self.loss_function(
                logits=logits,
                labels=labels,
                vocab_size=self.config.text_config.vocab_size,
                num_items_in_batch=kwargs.get("num_items_in_batch"),
            )
            loss = ce_loss
            if distill:
                student_states = hidden_states if final else outputs.hidden_states[hidden_index]  # (B, Lx, H)
                vid_loss = self._etc_distill_loss(
                    prepared, input_ids, attention_mask, labels, student_states, hidden_index, attention_layer
                )
                loss = ce_loss + self.etc.config.vid_weight * vid_loss
        return ETCQwen3VLCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            image_outputs=prepared.image_outputs,
            video_outputs=prepared.video_outputs,
            ce_loss=ce_loss,
            vid_loss=vid_loss,
        )

    def _etc_distill_loss(
        self, prepared, input_ids, attention_mask, labels, student_states, hidden_index, attention_layer
    ) -> torch.Tensor:
        if prepared.grids is None:
            raise ValueError(
                "ETC distillation on Qwen3-VL needs image_grid_thw / video_grid_thw: the decoder predicts each "
                "image's grid of visual tokens"
            )
        layout, spans = prepared.layout, prepared.spans
        parts = self._etc_target(
            prepared, input_ids, attention_mask, labels, hidden_index, attention_layer, student_states
        )
        instruction_index = parts["instruction_index"]
        rows = spans.row[:, None]
        compression_hidden = student_states[rows.expand_as(layout.compression_index), layout.compression_index]
        # Mean of the instruction tokens' states (zeros for an image without instruction), extended layout.
        ext_instruction = layout.ext_index[rows, instruction_index.clamp_min(0)]  # (I, T)
        valid = (instruction_index >= 0)[..., None].to(student_states.dtype)
        instruction_sum = (student_states[rows, ext_instruction] * valid).sum(1)  # (I, H)
        instruction_hidden = instruction_sum / valid.sum(1).clamp_min(1.0)
        return self.etc.distill(compression_hidden, instruction_hidden, parts["target"], grid_sizes=prepared.grids)

    def _etc_target(
        self, prepared, input_ids, attention_mask, labels, hidden_index, attention_layer, student_states
    ) -> dict:
        """The distillation target: a dict with `target` (a list of X^ `(N_i, D)` float32), `scores` (a list of
        `(N_i,)`, before min-max) and `instruction_index` `(I, T)` (user positions, -1 = none)."""
        config = self.etc.config
        spans = prepared.spans
        instruction_index = common.instruction_index(
            spans, prepared.visual_token_mask, attention_mask, labels, input_ids.shape[1]
        )
        teacher_states, recorder = self._etc_teacher_pass(
            prepared, input_ids, attention_mask, hidden_index, attention_layer
        )
        rows = spans.row
        key_mask = None if attention_mask is None else attention_mask.bool()[rows]
        with torch.no_grad():
            scores = instruction_scores_spans(
                recorder.query[rows],
                recorder.key[rows],
                instruction_index,
                spans.start,
                spans.end,
                key_mask=key_mask,
                score_context=config.score_context,
                scale=recorder.scale,
            )  # I x (N_i,)
            targets = []
            for k in range(len(spans)):
                row, start, end = int(spans.row[k]), int(spans.start[k]), int(spans.end[k])
                if config.target_source == "teacher" or student_states is None:
                    visual_hidden = teacher_states[row, start:end]  # (N_i, D)
                else:
                    visual_hidden = student_states.detach()[row, prepared.layout.ext_index[row, start:end]]
                targets.append(instruction_aware_target(visual_hidden, scores[k], config.alpha))
        return {"target": targets, "scores": scores, "instruction_index": instruction_index}

    @torch.no_grad()
    def _etc_teacher_pass(self, prepared, input_ids, attention_mask, hidden_index, attention_layer):
        """The unmasked, no-grad pass over the user's sequence (no compression tokens, the same M-RoPE positions
        and DeepStack features) that gives the scores and X_v. Returns the hidden states at the target layer
        `(B, L, D)` and the recorder with the score layer's q/k."""
        features = prepared.features
        language_model, visual, context = self.model.language_model, None, nullcontext()
        if self.etc.config.teacher == "frozen":
            peft_layers = adapter_layers(self)
            if peft_layers:  # LoRA: the same model with its adapters off
                context = adapters_disabled(peft_layers)
                visual_modules = set(self.model.visual.modules())
                if any(layer in visual_modules for layer in peft_layers):
                    visual = self.model.visual
            else:  # full fine-tuning: the frozen snapshot of the starting model
                teacher = snapshot_teacher(self)
                language_model, visual = teacher.language_model, getattr(teacher, "visual", None)
        with context:
            if visual is not None:  # the vision tower (or its mergers) trains: the teacher encodes with its own
                features = _encode_with(visual, prepared.pixel_inputs, features)
            image_mask = input_ids == self.config.image_token_id
            video_mask = input_ids == self.config.video_token_id
            inputs_embeds, deepstack = _scatter_features(
                language_model.get_input_embeddings(), input_ids, image_mask, video_mask, _detached(features)
            )
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            final = hidden_index == language_model.config.num_hidden_layers
            with capture_query_key(language_model.config, attention_layer) as recorder:
                outputs = self._etc_language_model(
                    language_model,
                    inputs_embeds,
                    mask,
                    prepared.position_ids,
                    None,
                    deepstack=deepstack,
                    visual_mask=prepared.visual_token_mask,
                    output_hidden_states=None if final else [hidden_index],
                    **recorder.kwargs,
                )
        states = outputs.last_hidden_state if final else outputs.hidden_states[hidden_index]
        return states, recorder

    # ---------------------------------------------------------------------------------------------- generation
    def _etc_prefill(self, prepared: ETCQwen3VLInputs, input_length, cache, method) -> ETCQwen3VLCausalLMOutputWithPast:
        if not isinstance(cache, ETCCache):  # e.g. the empty DynamicCache generate() made
            cache = ETCCache(config=self.config)
        prefill = etc_prefill(
            self._etc_run_language_model,
            prepared.layout,
            prepared.inputs_embeds,
            cache,
            self.model.language_model.config._attn_implementation,
            input_length=input_length,
            method=method,
            token_inputs=prepared.token_inputs,
        )
        logits = self.lm_head(prefill.last_hidden_state[:, None])  # (B, 1, V)
        return ETCQwen3VLCausalLMOutputWithPast(
            logits=logits, cache=cache, image_outputs=prepared.image_outputs, video_outputs=prepared.video_outputs
        )

    def _etc_decode_inputs(self, input_ids, attention_mask, position_ids, cache) -> dict:
        if input_ids is None:
            raise ValueError("ETC decoding needs input_ids")
        if position_ids is not None and position_ids.dim() == 3:
            position_ids = position_ids[-3:]  # generate()'s (4, B, q): drop the text row, keep the M-RoPE axes
        mask, positions = cache.etc_state.decode_inputs(
            cache.get_seq_length(), input_ids.shape[1], attention_mask, position_ids
        )
        if positions.dim() == 2:  # text: the same position on the three axes
            positions = positions[None].expand(3, -1, -1)
        return {"attention_mask": mask, "position_ids": positions}


# ================================================================================================== helpers
def _check_mm_token_type_ids(mm_token_type_ids, image_mask, video_mask) -> None:
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
    images, videos = mm_token_type_ids == _MM_IMAGE, mm_token_type_ids == _MM_VIDEO
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


def _flatten_features(image_outputs, video_outputs) -> _VisualFeatures:
    image, image_deepstack = _concat(image_outputs)
    video, video_deepstack = _concat(video_outputs)
    return _VisualFeatures(image=image, video=video, image_deepstack=image_deepstack, video_deepstack=video_deepstack)


def _detached(features: _VisualFeatures) -> _VisualFeatures:
    return _VisualFeatures(
        **{name: None if value is None else value.detach() for name, value in vars(features).items()}
    )


def _encode_with(visual: nn.Module, pixel_inputs: dict, features: _VisualFeatures) -> _VisualFeatures:
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
    return _flatten_features(outputs["image"], outputs["video"])


def _scatter_features(embedding, input_ids, image_mask, video_mask, features: _VisualFeatures):
    """The user's embeddings `(B, L, H)` with the visual features at the placeholders, and the DeepStack features
    `(B, L, K, H)` (zeros elsewhere; None without DeepStack)."""
    inputs_embeds = embedding(input_ids)  # (B, L, H)
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
                deepstack = inputs_embeds.new_zeros(*input_ids.shape, stacked.shape[1], inputs_embeds.shape[-1])
            deepstack = deepstack.masked_scatter(mask[..., None, None], stacked.to(inputs_embeds.dtype))
    return inputs_embeds, deepstack


def _visual_spans(image_mask, video_mask, image_counts, video_counts) -> tuple[ImageSpans, list, list]:
    """Split the visual placeholders into ETC's units, in sequence order (row by row): each image is one unit of
    `image_counts[i]` tokens; each video is cut into its runs of placeholders (its temporal groups, which the
    processor separates with timestamp text). Returns the spans and, per unit, its kind ("image" / "video") and the
    index of its image / video."""
    for name, mask, counts in (("image", image_mask, image_counts), ("video", video_mask, video_counts)):
        total = int(mask.sum())
        if total == 0 and counts:
            raise ValueError(
                f"The prompts contain no {name} token but {len(counts)} {name}(s) were given: each needs its "
                "placeholder tokens in input_ids."
            )
        if total != sum(counts):
            given = f"{len(counts)} {name}(s) giving {sum(counts)} features" if counts else "no pixel values"
            raise ValueError(
                f"{name.capitalize()} tokens and {name} features do not match: the prompts contain {total} {name} "
                f"tokens, got {given} ({counts} per {name})."
            )
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


def _span_grids(spans, kinds, sources, image_grid_thw, video_grid_thw, merge, has_images, has_videos):
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


# ================================================================================================== public API
def decoder_position_grid(config) -> tuple[int, int]:
    """The VID decoder's position grid of a `Qwen3VLConfig`: the vision tower's learned position grid after the
    spatial merge (Qwen3-VL-2B: 48 x 48 patches, 24 x 24 tokens)."""
    vision = config.vision_config
    side = max(int(vision.num_position_embeddings**0.5) // vision.spatial_merge_size, 1)
    return side, side


def apply_etc(model: nn.Module, config: Optional[ETCConfig] = None) -> nn.Module:
    """Extend a `Qwen3VLForConditionalGeneration` (or a `peft.PeftModel` around one) with ETC, in place.

    Registers `model.etc` (compression tokens; decoder and variances unless `config.loss == "none"`), freezes the
    vision tower with its mergers (`config.freeze_vision_tower`), and makes the model an
    `ETCQwen3VLForConditionalGeneration`. `config.num_visual_tokens` is the decoder's position grid size
    (`decoder_position_grid`). With peft, wrap first, then apply ETC (`apply_etc_with_lora` does both). Returns
    `model`.
    """
    base = unwrap_peft(model)
    grid = decoder_position_grid(base.config) if isinstance(base, Qwen3VLForConditionalGeneration) else (1, 1)
    return common.install_etc(
        model, config, Qwen3VLForConditionalGeneration, _etc_class, _vision_tower, grid[0] * grid[1], grid
    )


def default_lora_config(rank: int = 8, alpha: int = 16, dropout: float = 0.05, **kwargs):
    """The paper's fine-tuning setup for Qwen3-VL: a `peft.LoraConfig` of rank 8 on the LLM's attention and MLP
    projections (`LORA_TARGET_MODULES`); the vision tower stays frozen. `kwargs` go to `LoraConfig`."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGET_MODULES, **kwargs
    )


def apply_etc_with_lora(model: nn.Module, config: Optional[ETCConfig] = None, lora_config=None) -> nn.Module:
    """The default way to fine-tune Qwen3-VL with ETC: wrap `model` in a `peft.PeftModel` with `lora_config`
    (`default_lora_config()` when None), then apply ETC (its parameters stay trainable). The frozen teacher is then
    the same model with its adapters off. Returns the `PeftModel`."""
    from peft import get_peft_model

    if isinstance(getattr(unwrap_peft(model), "etc", None), ETCModules):
        raise ValueError("ETC is already applied to this model: apply_etc_with_lora wraps a model without ETC")
    peft_model = get_peft_model(model, lora_config if lora_config is not None else default_lora_config())
    return apply_etc(peft_model, config)


def remove_etc(model: nn.Module) -> nn.Module:
    """Undo `apply_etc`: drop `model.etc` (and the teacher snapshot), restore the class and the vision tower's
    `requires_grad`. Returns `model`."""
    return common.uninstall_etc(model, _vision_tower)


def _vision_tower(base: nn.Module) -> nn.Module:
    return base.model.visual


_ETC_CLASSES: dict = {Qwen3VLForConditionalGeneration: ETCQwen3VLForConditionalGeneration}


def _etc_class(cls: type) -> type:
    """`ETCQwen3VLForConditionalGeneration` for Qwen3-VL, an ETC subclass of any subclass of it."""
    return common.etc_subclass(cls, ETCQwen3VLForConditionalGeneration, _ETC_CLASSES)


def snapshot_teacher(model: nn.Module) -> FrozenTeacher:
    """The frozen teacher of `teacher="frozen"` under full fine-tuning: a copy of the language model (and of the
    vision tower when some of it trains), taken the first time the teacher runs; call this earlier to take it from
    the weights as they are now. It neither trains nor saves, and it follows the language model's device."""

    def modules(base):
        parts = {"language_model": base.model.language_model}
        if any(p.requires_grad for p in base.model.visual.parameters()):
            parts["visual"] = base.model.visual
        return parts

    return common.frozen_teacher(model, modules)


def prepare_inputs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    mm_token_type_ids: Optional[torch.Tensor] = None,
    pixel_values: Optional[torch.Tensor] = None,
    image_grid_thw: Optional[torch.Tensor] = None,
    pixel_values_videos: Optional[torch.Tensor] = None,
    video_grid_thw: Optional[torch.Tensor] = None,
    position_ids: Optional[torch.Tensor] = None,
) -> ETCQwen3VLInputs:
    """The extended batch the ETC model runs on (layout, positions, embeddings, DeepStack), for inspection."""
    base = unwrap_peft(model)
    pixel_inputs = dict(
        pixel_values=pixel_values,
        image_grid_thw=image_grid_thw,
        pixel_values_videos=pixel_values_videos,
        video_grid_thw=video_grid_thw,
    )
    return base._etc_inputs(input_ids, attention_mask, position_ids, mm_token_type_ids, pixel_inputs, {})


def instruction_target(model: nn.Module, input_ids: torch.Tensor, labels=None, **inputs) -> dict:
    """The distillation target of a batch and its parts, for inspection and tests (no grad).

    `inputs` are the processor's outputs besides input_ids (attention_mask, mm_token_type_ids, pixel_values,
    image_grid_thw, ...). Returns a dict with `scores` and `target`, lists over the images (and video temporal
    groups) in sequence order of `(N_i,)` (text-to-image attention, before min-max) and X^ `(N_i, D)`,
    `instruction_index` `(I, T)` (user positions) and `spans` (the `ImageSpans`).
    """
    base = unwrap_peft(model)
    language_model = base.model.language_model
    hidden_index, attention_layer = resolve_target_layer(
        base.etc.config.target_layer, language_model.config.num_hidden_layers
    )
    with torch.no_grad():
        prepared = prepare_inputs(model, input_ids, **inputs)
        parts = base._etc_target(
            prepared, input_ids, inputs.get("attention_mask"), labels, hidden_index, attention_layer, None
        )
    parts["spans"] = prepared.spans
    return parts


def save_pretrained(model: nn.Module, save_directory, *, save_base_weights: bool = True) -> None:
    """Save ETC's parts (see `etc_ext.models.common.save_pretrained`): with LoRA, the adapters."""
    common.save_pretrained(model, save_directory, save_base_weights=save_base_weights)


def from_pretrained(model: nn.Module, load_directory, *, load_base_weights: bool = True, is_trainable: bool = False):
    """Apply ETC from a checkpoint of `save_pretrained` to `model` (the starting Qwen3-VL) and load the weights;
    returns the model (a `PeftModel` when the checkpoint holds LoRA adapters). With `is_trainable=True`,
    teacher="frozen" and full fine-tuning, the teacher is snapshotted before the fine-tuned weights are loaded."""

    def before_loading_weights(model):
        config = unwrap_peft(model).etc.config
        if is_trainable and config.teacher == "frozen" and config.loss != "none" and not adapter_layers(model):
            snapshot_teacher(model)

    return common.from_pretrained(
        model,
        load_directory,
        apply_etc,
        load_base_weights=load_base_weights,
        is_trainable=is_trainable,
        before_loading_weights=before_loading_weights,
    )
