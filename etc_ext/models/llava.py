"""ETC on Hugging Face LLaVA-1.5 (`transformers.LlavaForConditionalGeneration`).

`apply_etc(model, config)` extends a model in place: it registers `model.etc` (compression tokens, and for training
the VID decoder and variances), freezes the vision tower, and makes the model an `ETCLlavaForConditionalGeneration`
(a subclass whose `forward` adds ETC). Then:

- `model(**inputs, labels=labels)` runs the masked single pass (bottleneck mask, SDPA or eager attention) and returns
  `loss = ce_loss + vid_weight * vid_loss` with both parts, and logits in the user's layout `(B, L, V)`.
- `model.generate(**inputs)` prefills into an `ETCCache` (segmented two-pass prefill, or the masked pass followed by
  compaction for batches whose rows have different numbers of images) that holds M entries per image per layer,
  then decodes from it.
- `model.etc.enabled = False` (or `remove_etc(model)`) gives back the original model's outputs exactly.

The user's prompts and the processor's outputs stay as they are: the model inserts the compression tokens itself.
"""

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration
from transformers.cache_utils import Cache
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from ..compress import (
    ETCCache,
    ETCLayout,
    bottleneck_mask,
    default_position_ids,
    etc_prefill,
    find_image_spans,
    insert_compression_tokens,
    record_input,
    to_attention_mask,
)
from ..config import ETCConfig
from ..distill import (
    adapter_layers,
    adapters_disabled,
    capture_query_key,
    instruction_aware_target,
    instruction_scores,
    resolve_target_layer,
)
from . import common
from .common import ETCModules, FrozenTeacher, check_etc_inputs, unwrap_peft

__all__ = [
    "ETCLlavaCausalLMOutputWithPast",
    "ETCLlavaForConditionalGeneration",
    "apply_etc",
    "remove_etc",
    "save_pretrained",
    "from_pretrained",
    "snapshot_teacher",
    "instruction_target",
    "num_visual_tokens",
]


@dataclass
class ETCLlavaCausalLMOutputWithPast(LlavaCausalLMOutputWithPast):
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
class _ETCInputs:
    """A batch prepared for ETC: the extended layout and embeddings, and what the teacher pass reuses."""

    layout: ETCLayout
    inputs_embeds: torch.Tensor  # (B, Lx, H) extended
    image_token_mask: torch.Tensor  # (B, L)
    image_features: torch.Tensor  # (I * N, H) projector outputs
    projector_input: Optional[torch.Tensor]  # what the projector received (for a teacher's own projector)
    image_outputs: object


class ETCLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """A `LlavaForConditionalGeneration` with ETC; made by `apply_etc`, never instantiated directly."""

    etc: ETCModules

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
        etc_prefill_method: Optional[str] = None,
        **kwargs,
    ) -> ETCLlavaCausalLMOutputWithPast:
        r"""
        Like `LlavaForConditionalGeneration.forward`, with ETC when `self.etc.enabled`:

        - without a cache (and `use_cache` not True): the masked single pass over the sequence with M compression
          tokens after each image. `logits` are in the user's layout `(batch_size, sequence_length, vocab_size)`
          (the logits after an image's last visual token come from its last compression token), so `labels` are the
          user's. With `labels`: `loss = ce_loss + vid_weight * vid_loss`.
        - with an empty cache or `use_cache=True` (generate()'s prefill): the compressed prefill into an `ETCCache`;
          `logits` `(batch_size, 1, vocab_size)` are those of each row's last token.
        - with an `ETCCache` that holds a prefill: decoding. `attention_mask` and `position_ids` are in the user's
          layout (as generate() makes them) and are mapped onto the compacted cache.

        etc_prefill_method (`str`, *optional*):
            "auto", "segmented" or "masked"; defaults to `self.etc.prefill_method`.
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
        if not self.etc.enabled:
            return super().forward(**base_kwargs)

        etc_state = getattr(cache, "etc_state", None)
        encoded_images = (mm_encoder_outputs or {}).get("image")  # generate() encodes the images beforehand
        has_images = pixel_values is not None or encoded_images is not None
        if etc_state is not None:  # decoding: new tokens are text (as in LLaVA, a generated image token id is too)
            if has_images:
                raise NotImplementedError(
                    "ETC: adding images to a cache that already holds a compressed prefill is not supported; "
                    "start a new cache for a prompt with images."
                )
            base_kwargs.update(self._etc_decode_inputs(input_ids, attention_mask, position_ids, cache))
            return super().forward(**base_kwargs)
        image_token_mask = None if input_ids is None else input_ids == self.config.image_token_id
        has_image_tokens = image_token_mask is not None and bool(image_token_mask.any())
        if not has_images and not has_image_tokens:
            return super().forward(**base_kwargs)  # nothing to compress: text only

        self._etc_check_inputs(input_ids, inputs_embeds, has_images, pixel_values, encoded_images, labels, kwargs)
        if cache is not None or use_cache:
            if labels is not None:
                raise ValueError(
                    "ETC: labels go with the training forward (no cache); the prefill (cache / use_cache=True) "
                    "returns only the last token's logits."
                )
            if cache is not None and cache.get_seq_length() > 0:
                raise NotImplementedError("ETC: prefilling images into a non-empty cache is not supported")
            return self._etc_prefill(
                input_ids, pixel_values, encoded_images, attention_mask, position_ids, cache, image_token_mask,
                vision_feature_layer, vision_feature_select_strategy, image_sizes,
                etc_prefill_method or self.etc.prefill_method,
            )  # fmt: skip
        return self._etc_masked_forward(
            input_ids, pixel_values, encoded_images, attention_mask, position_ids, image_token_mask, labels,
            logits_to_keep, vision_feature_layer, vision_feature_select_strategy, image_sizes, kwargs,
        )  # fmt: skip

    # ---------------------------------------------------------------------------------------------- inputs
    def _etc_check_inputs(
        self, input_ids, inputs_embeds, has_images, pixel_values, encoded_images, labels, kwargs
    ) -> None:
        check_etc_inputs(input_ids, inputs_embeds, labels, kwargs)
        if pixel_values is not None and encoded_images is not None:
            raise ValueError("Pass either pixel_values or mm_encoder_outputs['image'], not both")
        if not has_images:
            raise ValueError("ETC: input_ids contain image tokens but no pixel_values were given")

    def _etc_inputs(
        self,
        input_ids,
        pixel_values,
        encoded_images,
        attention_mask,
        position_ids,
        image_token_mask,
        vision_feature_layer,
        vision_feature_select_strategy,
        image_sizes,
    ) -> _ETCInputs:
        """Image features (from pixel_values, or as generate() encoded them), the extended layout and embeddings."""
        projector_input = None
        if encoded_images is not None:
            image_outputs = encoded_images
        else:
            with record_input(self.model.multi_modal_projector) as recorded:
                image_outputs = self.model.get_image_features(
                    pixel_values=pixel_values,
                    vision_feature_layer=vision_feature_layer,
                    vision_feature_select_strategy=vision_feature_select_strategy,
                    image_sizes=image_sizes,
                    return_dict=True,
                )
            projector_input = recorded.value
        features = image_outputs.pooler_output  # list of (N_i, H)
        spans = find_image_spans(image_token_mask, [f.shape[0] for f in features])
        inputs_embeds = self.get_input_embeddings()(input_ids)  # (B, L, H)
        image_features = torch.cat(features, dim=0).to(inputs_embeds.device, inputs_embeds.dtype)  # (I * N, H)
        inputs_embeds = inputs_embeds.masked_scatter(image_token_mask[..., None], image_features)
        layout = insert_compression_tokens(
            spans, input_ids.shape[1], self.etc.config.num_compression_tokens, attention_mask, position_ids
        )
        return _ETCInputs(
            layout=layout,
            inputs_embeds=layout.embed(inputs_embeds, self.etc.compression_tokens()),
            image_token_mask=image_token_mask,
            image_features=image_features,
            projector_input=projector_input,
            image_outputs=image_outputs,
        )

    def _etc_run_language_model(self, inputs_embeds, attention_mask, position_ids, cache):
        """`RunLanguageModel` for the prefill drivers of `etc_ext.compress`."""
        outputs = self.model.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
        )
        return outputs.last_hidden_state

    # ---------------------------------------------------------------------------------------------- training
    def _etc_masked_forward(
        self,
        input_ids,
        pixel_values,
        encoded_images,
        attention_mask,
        position_ids,
        image_token_mask,
        labels,
        logits_to_keep,
        vision_feature_layer,
        vision_feature_select_strategy,
        image_sizes,
        kwargs,
    ) -> ETCLlavaCausalLMOutputWithPast:
        """The single pass under the bottleneck mask (training, and the oracle for the prefill)."""
        prepared = self._etc_inputs(
            input_ids, pixel_values, encoded_images, attention_mask, position_ids, image_token_mask,
            vision_feature_layer, vision_feature_select_strategy, image_sizes,
        )  # fmt: skip
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
        outputs = language_model(
            inputs_embeds=prepared.inputs_embeds,
            attention_mask=mask,
            position_ids=layout.position_ids,
            use_cache=False,
            output_hidden_states=[hidden_index] if distill and not final else None,
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
                    prepared, input_ids, attention_mask, position_ids, labels, student_states,
                    hidden_index, attention_layer,
                )  # fmt: skip
                loss = ce_loss + self.etc.config.vid_weight * vid_loss
        return ETCLlavaCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            image_outputs=prepared.image_outputs,
            ce_loss=ce_loss,
            vid_loss=vid_loss,
        )

    def _etc_distill_loss(
        self, prepared, input_ids, attention_mask, position_ids, labels, student_states, hidden_index, attention_layer
    ) -> torch.Tensor:
        layout, spans = prepared.layout, prepared.layout.spans
        num_visual = self.etc.config.num_visual_tokens
        if bool((spans.num_tokens != num_visual).any()):
            raise ValueError(
                f"ETC distillation: images have {spans.num_tokens.tolist()} visual tokens, the decoder was built "
                f"for num_visual_tokens={num_visual}"
            )
        parts = self._etc_target(
            prepared, input_ids, attention_mask, position_ids, labels, hidden_index, attention_layer, student_states
        )
        target, instruction_index = parts["target"], parts["instruction_index"]
        rows = spans.row[:, None]
        compression_hidden = student_states[rows.expand_as(layout.compression_index), layout.compression_index]
        # Mean of the instruction tokens' states (zeros for an image without instruction), extended layout.
        ext_instruction = layout.ext_index[rows, instruction_index.clamp_min(0)]  # (I, T)
        valid = (instruction_index >= 0)[..., None].to(student_states.dtype)
        instruction_sum = (student_states[rows, ext_instruction] * valid).sum(1)  # (I, H)
        instruction_hidden = instruction_sum / valid.sum(1).clamp_min(1.0)
        return self.etc.distill(compression_hidden, instruction_hidden, target)

    def _etc_target(
        self, prepared, input_ids, attention_mask, position_ids, labels, hidden_index, attention_layer, student_states
    ) -> dict:
        """The distillation target: a dict with `target` X^ `(I, N, D)` float32, `scores` `(I, N)` (before min-max),
        `instruction_index` `(I, T)` and `visual_index` `(I, N)` (user positions, -1 = none)."""
        config = self.etc.config
        spans = prepared.layout.spans
        length = input_ids.shape[1]
        instruction_index = common.instruction_index(spans, prepared.image_token_mask, attention_mask, labels, length)
        visual_index = spans.start[:, None] + torch.arange(int(spans.num_tokens[0]), device=input_ids.device)[None]
        teacher_states, recorder = self._etc_teacher_pass(
            prepared, input_ids, attention_mask, position_ids, hidden_index, attention_layer
        )
        rows = spans.row
        key_mask = None if attention_mask is None else attention_mask.bool()[rows]
        with torch.no_grad():
            scores = instruction_scores(
                recorder.query[rows],
                recorder.key[rows],
                instruction_index,
                visual_index,
                key_mask=key_mask,
                score_context=config.score_context,
                scale=recorder.scale,
            )  # (I, N)
            if config.target_source == "teacher" or student_states is None:
                visual_hidden = teacher_states[rows[:, None], visual_index]  # (I, N, D)
            else:
                ext_visual = prepared.layout.ext_index[rows[:, None], visual_index]
                visual_hidden = student_states.detach()[rows[:, None], ext_visual]
            target = instruction_aware_target(visual_hidden, scores, config.alpha)
        return {
            "target": target,
            "scores": scores,
            "instruction_index": instruction_index,
            "visual_index": visual_index,
        }

    @torch.no_grad()
    def _etc_teacher_pass(self, prepared, input_ids, attention_mask, position_ids, hidden_index, attention_layer):
        """The unmasked, no-grad pass over the user's sequence (no compression tokens) that gives the scores and X_v.
        Returns the hidden states at the target layer `(B, L, D)` and the recorder with the score layer's q/k."""
        features = prepared.image_features.detach()
        projector, language_model, context = None, self.model.language_model, nullcontext()
        if self.etc.config.teacher == "frozen":
            peft_layers = adapter_layers(self)
            if peft_layers:  # LoRA: the same model with its adapters off
                projector, context = self.model.multi_modal_projector, adapters_disabled(peft_layers)
            else:  # full fine-tuning: the frozen snapshot of the starting model
                teacher = snapshot_teacher(self)
                projector, language_model = teacher.projector, teacher.language_model
        with context:
            if projector is not None:
                if prepared.projector_input is None:
                    raise ValueError("ETC: the frozen teacher needs pixel_values (not pre-encoded image features)")
                features = projector(prepared.projector_input).flatten(0, -2)
            inputs_embeds = language_model.get_input_embeddings()(input_ids)
            inputs_embeds = inputs_embeds.masked_scatter(
                prepared.image_token_mask[..., None], features.to(inputs_embeds.dtype)
            )
            batch_size, length = input_ids.shape
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            if position_ids is None:
                position_ids = default_position_ids(attention_mask, batch_size, length, input_ids.device)
            final = hidden_index == language_model.config.num_hidden_layers
            with capture_query_key(language_model.config, attention_layer) as recorder:
                outputs = language_model(
                    inputs_embeds=inputs_embeds,
                    attention_mask=mask,
                    position_ids=position_ids,
                    use_cache=False,
                    output_hidden_states=None if final else [hidden_index],
                    **recorder.kwargs,
                )
        states = outputs.last_hidden_state if final else outputs.hidden_states[hidden_index]
        return states, recorder

    # ---------------------------------------------------------------------------------------------- generation
    def _etc_prefill(
        self,
        input_ids,
        pixel_values,
        encoded_images,
        attention_mask,
        position_ids,
        cache,
        image_token_mask,
        vision_feature_layer,
        vision_feature_select_strategy,
        image_sizes,
        method,
    ) -> ETCLlavaCausalLMOutputWithPast:
        prepared = self._etc_inputs(
            input_ids, pixel_values, encoded_images, attention_mask, position_ids, image_token_mask,
            vision_feature_layer, vision_feature_select_strategy, image_sizes,
        )  # fmt: skip
        if not isinstance(cache, ETCCache):  # e.g. the empty DynamicCache generate() made
            cache = ETCCache(config=self.config)
        prefill = etc_prefill(
            self._etc_run_language_model,
            prepared.layout,
            prepared.inputs_embeds,
            cache,
            self.model.language_model.config._attn_implementation,
            input_length=input_ids.shape[1],
            method=method,
        )
        logits = self.lm_head(prefill.last_hidden_state[:, None])  # (B, 1, V)
        return ETCLlavaCausalLMOutputWithPast(logits=logits, cache=cache, image_outputs=prepared.image_outputs)

    def _etc_decode_inputs(self, input_ids, attention_mask, position_ids, cache) -> dict:
        if input_ids is None:
            raise ValueError("ETC decoding needs input_ids")
        mask, positions = cache.etc_state.decode_inputs(
            cache.get_seq_length(), input_ids.shape[1], attention_mask, position_ids
        )
        return {"attention_mask": mask, "position_ids": positions}


# ================================================================================================== public API
def num_visual_tokens(config) -> int:
    """N, the visual tokens per image of a `LlavaConfig` (CLIP patches, plus CLS with the "full" strategy)."""
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches + (1 if config.vision_feature_select_strategy == "full" else 0)


def apply_etc(model: nn.Module, config: Optional[ETCConfig] = None) -> nn.Module:
    """Extend a `LlavaForConditionalGeneration` (or a `peft.PeftModel` around one) with ETC, in place.

    Registers `model.etc` (compression tokens; decoder and variances unless `config.loss == "none"`) on the model's
    device and dtype, freezes the vision tower (`config.freeze_vision_tower`), and makes the model an
    `ETCLlavaForConditionalGeneration`. With peft, wrap first (`get_peft_model`), then apply ETC, so that peft does
    not freeze ETC's parameters. Returns `model`.
    """
    base = unwrap_peft(model)
    n = num_visual_tokens(base.config) if isinstance(base, LlavaForConditionalGeneration) else None
    return common.install_etc(model, config, LlavaForConditionalGeneration, _etc_class, _vision_tower, n)


def remove_etc(model: nn.Module) -> nn.Module:
    """Undo `apply_etc`: drop `model.etc` (and the teacher snapshot), restore the class and the vision tower's
    `requires_grad`. Returns `model`."""
    return common.uninstall_etc(model, _vision_tower)


def _vision_tower(base: nn.Module) -> nn.Module:
    return base.model.vision_tower


_ETC_CLASSES: dict = {LlavaForConditionalGeneration: ETCLlavaForConditionalGeneration}


def _etc_class(cls: type) -> type:
    """`ETCLlavaForConditionalGeneration` for LLaVA, an ETC subclass of any subclass of it."""
    return common.etc_subclass(cls, ETCLlavaForConditionalGeneration, _ETC_CLASSES)


def snapshot_teacher(model: nn.Module) -> FrozenTeacher:
    """The frozen teacher of `teacher="frozen"` under full fine-tuning: a copy of the projector and language model,
    taken the first time the teacher runs (the first training forward, or `instruction_target`); call this earlier
    to take it from the weights as they are now. It is not a submodule: it neither trains nor saves, and it follows
    the language model's device."""
    return common.frozen_teacher(
        model, lambda base: {"projector": base.model.multi_modal_projector, "language_model": base.model.language_model}
    )


def instruction_target(model: nn.Module, input_ids, pixel_values, attention_mask=None, labels=None) -> dict:
    """The distillation target of a batch and its parts, for inspection and tests (no grad).

    Returns a dict with `scores` `(I, N)` (text-to-image attention, before min-max), `target` X^ `(I, N, D)`,
    `instruction_index` `(I, T)` and `visual_index` `(I, N)` (user positions).
    """
    base = unwrap_peft(model)
    language_model = base.model.language_model
    image_token_mask = input_ids == base.config.image_token_id
    hidden_index, attention_layer = resolve_target_layer(
        base.etc.config.target_layer, language_model.config.num_hidden_layers
    )
    with torch.no_grad():
        prepared = base._etc_inputs(
            input_ids, pixel_values, None, attention_mask, None, image_token_mask, None, None, None
        )
        return base._etc_target(
            prepared, input_ids, attention_mask, None, labels, hidden_index, attention_layer, student_states=None
        )


def save_pretrained(model: nn.Module, save_directory, *, save_base_weights: bool = True) -> None:
    """Save ETC's parts (see `etc_ext.models.common.save_pretrained`)."""
    common.save_pretrained(model, save_directory, save_base_weights=save_base_weights)


def from_pretrained(model: nn.Module, load_directory, *, load_base_weights: bool = True, is_trainable: bool = False):
    """Apply ETC from a checkpoint of `save_pretrained` to `model` (or check that the applied config matches) and
    load the weights; returns the model (a `PeftModel` when the checkpoint holds adapters).

    `model` is the starting model (e.g. the original LLaVA-1.5 weights). With `is_trainable=True` (resuming
    training), teacher="frozen" and full fine-tuning, the frozen teacher is snapshotted from it before the fine-tuned
    weights are loaded, so the teacher stays the starting model.
    """

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
