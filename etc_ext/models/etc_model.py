"""The ETC model, written once for every backbone: `ETCMixin` adds ETC to a Hugging Face VLM class.

A backbone's ETC class is `class ETCFooForConditionalGeneration(ETCMixin, FooForConditionalGeneration)`. Its
`forward` keeps the Hugging Face signature (generate() reads it) and hands everything to `ETCMixin._etc_forward`,
which dispatches:

- compression disabled, or a text-only prompt: the original forward.
- a cache holding a compressed prefill: decoding, with the user's attention mask and positions mapped onto it.
- an empty cache or `use_cache=True` (generate()'s prefill): the segmented (or masked) prefill into an `ETCCache`.
- otherwise: the masked single pass (training), `loss = ce_loss + vid_weight * vid_loss` with labels.

What differs between backbones sits behind the hooks at the bottom of `ETCMixin` (the "adapter"): how to find
visual tokens, encode images and build the extended inputs (`_etc_prepare`), the per-token extras each language-model
pass gets (DeepStack), the teacher's modules and inputs, the decoder's grids. `docs/new_backbone.md` walks through
them.
"""

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from ..compress import ETCCache, ETCLayout, ImageSpans, bottleneck_mask, etc_prefill, to_attention_mask
from ..continuation import CompressedCacheGenerationMixin, new_token_count
from ..distill import (
    adapter_layers,
    adapters_disabled,
    capture_query_key,
    instruction_aware_target,
    instruction_scores_spans,
    resolve_target_layer,
)
from . import common
from .common import ETCModules, check_etc_inputs

__all__ = ["ETCInputs", "ETCMixin", "etc_output_class"]


def etc_output_class(base: type, name: str, module: str) -> type:
    """The backbone's output dataclass `base` with ETC's two loss parts (a `ModelOutput` dataclass named `name`,
    defined in `module`):

    ce_loss (`torch.FloatTensor`, *optional*):
        Next-token cross-entropy of the compressed model (returned with `labels`).
    vid_loss (`torch.FloatTensor`, *optional*):
        Distillation loss (VID or MSE, see `ETCConfig.loss`; returned with `labels` unless the loss is "none").
        `loss = ce_loss + vid_weight * vid_loss`.
    """
    namespace = {
        "__annotations__": {"ce_loss": Optional[torch.FloatTensor], "vid_loss": Optional[torch.FloatTensor]},
        "ce_loss": None,
        "vid_loss": None,
        "__module__": module,
        "__qualname__": name,
        "__doc__": f"`{base.__name__}` with `ce_loss` and `vid_loss` (see `etc_ext.models.etc_model.etc_output_class`).",
    }
    return dataclass(type(name, (base,), namespace))


@dataclass
class ETCInputs:
    """A batch prepared for ETC by a backbone's `_etc_prepare`.

    Attributes:
        layout: the extended sequence (M compression tokens after each image).
        inputs_embeds: `(B, Lx, H)` extended embeddings.
        visual_token_mask: `(B, L)` the visual placeholders of the user's sequence.
        position_ids: the user's positions (`(B, L)`, or `(3, B, L)` for M-RoPE): the teacher pass runs on them.
        token_inputs: per-token extras every language-model pass of the extended sequence gets (DeepStack),
            extended layout; empty when the backbone has none.
        grids: int64 `(I, 3)` `(t, h, w)` token grid of each image for a decoder of variable N, else None.
        encoder_outputs: the vision encoder's outputs as the model's output dataclass names them
            (`image_outputs`, ...).
        teacher_inputs: what the backbone's teacher pass reuses (e.g. the projector's input), backbone-specific.
    """

    layout: ETCLayout
    inputs_embeds: torch.Tensor
    visual_token_mask: torch.Tensor
    position_ids: torch.Tensor
    token_inputs: dict = field(default_factory=dict)
    grids: Optional[torch.Tensor] = None
    encoder_outputs: dict = field(default_factory=dict, repr=False)
    teacher_inputs: dict = field(default_factory=dict, repr=False)

    @property
    def spans(self) -> ImageSpans:
        return self.layout.spans


class ETCMixin(CompressedCacheGenerationMixin):
    """ETC on a Hugging Face VLM class (see the module docstring). Never instantiated directly: `apply_etc` swaps an
    existing model's class."""

    etc: ETCModules
    etc_output_class: type  # the backbone's output dataclass with `ce_loss` and `vid_loss`

    # ---------------------------------------------------------------------------------------------- dispatch
    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def _etc_forward(
        self,
        visual_inputs: dict,
        visual_kwargs: dict,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        logits_to_keep=0,
        mm_encoder_outputs=None,
        etc_prefill_method=None,
        **kwargs,
    ):
        """The body of every backbone's `forward`. `visual_inputs`: the backbone's image arguments for its hooks
        (pixel values, grids, generate()'s encoder outputs); `visual_kwargs`: the same as the original forward
        takes them; `kwargs`: the original forward's other arguments (cache, labels, use_cache, ...)."""
        base_kwargs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=logits_to_keep,
            mm_encoder_outputs=mm_encoder_outputs,
            **visual_kwargs,
            **kwargs,
        )
        cache, labels, use_cache = kwargs.pop("cache", None), kwargs.pop("labels", None), kwargs.pop("use_cache", None)
        inputs_embeds = kwargs.pop("inputs_embeds", None)
        original_forward = super().forward  # the Hugging Face class after ETCMixin in the MRO
        if not self.etc.enabled:
            return original_forward(**base_kwargs)

        has_visual_inputs = self._etc_has_visual_inputs(visual_inputs)
        if getattr(cache, "etc_state", None) is not None:  # a cache holding a compressed prefill: continue it
            return self._etc_continue(
                original_forward, base_kwargs, visual_inputs, visual_kwargs, input_ids, attention_mask,
                position_ids, cache, has_visual_inputs, etc_prefill_method, kwargs,
            )  # fmt: skip
        visual_token_mask = None if input_ids is None else self._etc_visual_token_mask(input_ids)
        has_visual_tokens = visual_token_mask is not None and bool(visual_token_mask.any())
        if not has_visual_inputs and not has_visual_tokens:
            return original_forward(**base_kwargs)  # nothing to compress: text only

        check_etc_inputs(input_ids, inputs_embeds, labels, kwargs)
        self._etc_check_visual_inputs(visual_inputs)
        prefill = cache is not None or bool(use_cache)
        if prefill and labels is not None:
            raise ValueError(
                "ETC: labels go with the training forward (no cache); the prefill (cache / use_cache=True) returns "
                "only the last token's logits."
            )
        if prefill and cache is not None and cache.get_seq_length() > 0:
            raise NotImplementedError("ETC: prefilling images into a non-empty cache is not supported")
        prepared = self._etc_prepare(input_ids, attention_mask, position_ids, visual_inputs)
        if prefill:
            return self._etc_prefill(prepared, input_ids.shape[1], cache, etc_prefill_method or self.etc.prefill_method)
        return self._etc_masked_forward(prepared, input_ids, attention_mask, labels, logits_to_keep, kwargs)

    def _etc_continue(
        self, original_forward, base_kwargs, visual_inputs, visual_kwargs, input_ids, attention_mask, position_ids,
        cache, has_visual_inputs, etc_prefill_method, kwargs,
    ):  # fmt: skip
        """New tokens on a cache that holds a compressed prefill: decoding, the question after a reused image cache,
        or a later turn of a conversation (with or without new images).

        `input_ids` may be the whole conversation or only its new tokens: the cache knows how many user tokens it
        holds (`ETCCacheState.covered_length`), and `attention_mask` (when given) covers the whole conversation, as
        generate() makes it; the new tokens are the last `mask length - covered` columns. Images already in the
        cache may be passed again (generate() re-sends the conversation's pixel values) or not: only the new
        images' placeholders are compressed, against the cache."""
        if input_ids is None:
            raise ValueError("ETC: continuing a compressed cache needs input_ids (not inputs_embeds)")
        if kwargs.get("labels") is not None:
            raise ValueError("ETC: labels go with the training forward (no cache)")
        state = cache.etc_state
        cache_length = cache.get_seq_length()
        covered = state.covered_length(cache_length)
        new = new_token_count(input_ids, attention_mask, covered)
        total = covered + new
        input_ids = input_ids[:, -new:]
        if position_ids is not None:
            position_ids = position_ids[..., -new:]
        visual_token_mask = self._etc_visual_token_mask(input_ids)
        decode_inputs = self._etc_decode_inputs(input_ids, attention_mask, position_ids, cache)
        mask, positions = decode_inputs["attention_mask"], decode_inputs["position_ids"]
        if not bool(visual_token_mask.any()):  # text only: the cached images are in the cache already
            base_kwargs.update({name: None for name in visual_kwargs}, mm_encoder_outputs=None)
            base_kwargs.update(input_ids=input_ids, attention_mask=mask, position_ids=positions)
            return original_forward(**base_kwargs)
        if not has_visual_inputs:
            raise ValueError("ETC: the new tokens contain image tokens but no pixel values were given")

        # New images: compress them against the cache (segmented prefill of the new tokens).
        past_images = state.position_offset // self.etc.config.num_compression_tokens  # (B,)
        visual_inputs = self._etc_new_images(visual_inputs, visual_token_mask, past_images)
        prepared = self._etc_prepare(input_ids, mask[:, -new:], positions, visual_inputs)
        prefill = etc_prefill(
            self._etc_run_language_model,
            prepared.layout,
            prepared.inputs_embeds,
            cache,
            self.model.language_model.config._attn_implementation,
            input_length=total,
            method=etc_prefill_method or self.etc.prefill_method,
            token_inputs=prepared.token_inputs,
            past_valid=mask[:, :cache_length].bool(),
            past_offset=state.position_offset,
        )
        logits = self.lm_head(prefill.last_hidden_state[:, None])  # (B, 1, V)
        return self.etc_output_class(logits=logits, cache=cache, **prepared.encoder_outputs)

    def _etc_new_images(self, visual_inputs: dict, visual_token_mask, past_images) -> dict:
        """`visual_inputs` restricted to the images of the new tokens: all of them when only those were passed,
        else (the whole conversation's, as generate() re-sends them) each row's images after its cached ones."""
        spans_per_row = self._etc_count_images(visual_token_mask)  # (B,) new images per row
        given = self._etc_num_images(visual_inputs)
        new_total, past_total = int(spans_per_row.sum()), int(past_images.sum())
        if given == new_total:
            return visual_inputs
        if given != new_total + past_total:
            raise ValueError(
                f"ETC: the new tokens hold {new_total} image(s) and the cache {past_total}; got {given} image(s): pass "
                "either the new images only or every image of the conversation"
            )
        index, start = [], 0
        for row_past, row_new in zip(past_images.tolist(), spans_per_row.tolist()):
            index += range(start + row_past, start + row_past + row_new)
            start += row_past + row_new
        return self._etc_select_images(visual_inputs, index)

    def _etc_count_images(self, visual_token_mask: torch.Tensor) -> torch.Tensor:
        """`(B,)` runs of visual tokens per row (one per image)."""
        starts = visual_token_mask & ~torch.nn.functional.pad(visual_token_mask[:, :-1], (1, 0))
        return starts.sum(-1)

    def _etc_language_model(self, language_model, inputs_embeds, attention_mask, position_ids, cache, token_inputs,
                            **kwargs):  # fmt: skip
        """One pass of `language_model` (the model's, or a frozen teacher's) with the backbone's per-token extras."""
        return language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
            **self._etc_token_kwargs(**token_inputs),
            **kwargs,
        )

    def _etc_run_language_model(self, inputs_embeds, attention_mask, position_ids, cache, **token_inputs):
        """`RunLanguageModel` for the prefill drivers of `etc_ext.compress`."""
        outputs = self._etc_language_model(
            self.model.language_model, inputs_embeds, attention_mask, position_ids, cache, token_inputs
        )
        return outputs.last_hidden_state

    # ---------------------------------------------------------------------------------------------- training
    def _etc_masked_forward(self, prepared: ETCInputs, input_ids, attention_mask, labels, logits_to_keep, kwargs):
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
            prepared.token_inputs,
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
                    prepared, input_ids, attention_mask, labels, student_states, hidden_index, attention_layer
                )
                loss = ce_loss + self.etc.config.vid_weight * vid_loss
        return self.etc_output_class(
            loss=loss, logits=logits, ce_loss=ce_loss, vid_loss=vid_loss, **prepared.encoder_outputs
        )

    def _etc_distill_loss(
        self, prepared: ETCInputs, input_ids, attention_mask, labels, student_states, hidden_index, attention_layer
    ) -> torch.Tensor:
        """The distillation loss: the decoder predicts X^ from the compression tokens' and the instruction's states
        at the target layer."""
        grids = self._etc_decoder_grids(prepared)
        layout, spans = prepared.layout, prepared.spans
        parts = self._etc_target(
            prepared, input_ids, attention_mask, labels, hidden_index, attention_layer, student_states
        )
        target = parts["target"]
        if grids is None:  # a decoder of fixed N: every image must have N tokens
            num_visual = self.etc.config.num_visual_tokens
            if bool((spans.num_tokens != num_visual).any()):
                raise ValueError(
                    f"ETC distillation: images have {spans.num_tokens.tolist()} visual tokens, the decoder was "
                    f"built for num_visual_tokens={num_visual}"
                )
            target = torch.stack(target)  # (I, N, D)
        instruction_index = parts["instruction_index"]
        rows = spans.row[:, None]
        compression_hidden = student_states[rows.expand_as(layout.compression_index), layout.compression_index]
        # Mean of the instruction tokens' states (zeros for an image without instruction), extended layout.
        ext_instruction = layout.ext_index[rows, instruction_index.clamp_min(0)]  # (I, T)
        valid = (instruction_index >= 0)[..., None].to(student_states.dtype)
        instruction_sum = (student_states[rows, ext_instruction] * valid).sum(1)  # (I, H)
        instruction_hidden = instruction_sum / valid.sum(1).clamp_min(1.0)
        return self.etc.distill(compression_hidden, instruction_hidden, target, grid_sizes=grids)

    def _etc_target(
        self, prepared: ETCInputs, input_ids, attention_mask, labels, hidden_index, attention_layer, student_states
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
    def _etc_instruction_target(self, prepared: ETCInputs, input_ids, attention_mask, labels) -> dict:
        """`_etc_target` at the configured target layer, from the teacher's states (the public helpers'
        `instruction_target`)."""
        hidden_index, attention_layer = resolve_target_layer(
            self.etc.config.target_layer, self.model.language_model.config.num_hidden_layers
        )
        return self._etc_target(prepared, input_ids, attention_mask, labels, hidden_index, attention_layer, None)

    @torch.no_grad()
    def _etc_teacher_pass(self, prepared: ETCInputs, input_ids, attention_mask, hidden_index, attention_layer):
        """The unmasked, no-grad pass over the user's sequence (no compression tokens, the user's positions) that
        gives the scores and X_v. Returns the hidden states at the target layer `(B, L, D)` and the recorder with
        the score layer's q/k."""
        modules, context = self._etc_teacher()
        language_model = modules["language_model"]
        with context:
            inputs_embeds, token_inputs = self._etc_teacher_inputs(prepared, input_ids, modules)
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            final = hidden_index == language_model.config.num_hidden_layers
            with capture_query_key(language_model.config, attention_layer) as recorder:
                outputs = self._etc_language_model(
                    language_model,
                    inputs_embeds,
                    mask,
                    prepared.position_ids,
                    None,
                    token_inputs,
                    output_hidden_states=None if final else [hidden_index],
                    **recorder.kwargs,
                )
        states = outputs.last_hidden_state if final else outputs.hidden_states[hidden_index]
        return states, recorder

    def _etc_teacher(self) -> tuple[dict, object]:
        """The teacher's modules (name -> module, `language_model` always) and the context to run them in.

        teacher="frozen": with peft, the model's own modules with the adapters off; under full fine-tuning, the
        frozen snapshot of the starting model. teacher="self": the current language model, no mask, no grad."""
        if self.etc.config.teacher == "frozen":
            peft_layers = adapter_layers(self)
            if peft_layers:
                return self._etc_teacher_modules(peft_layers), adapters_disabled(peft_layers)
            teacher = common.frozen_teacher(self, lambda base: base._etc_teacher_modules())
            return dict(teacher.named_children()), nullcontext()
        return {"language_model": self.model.language_model}, nullcontext()

    # ---------------------------------------------------------------------------------------------- generation
    def _etc_prefill(self, prepared: ETCInputs, input_length: int, cache, method: str):
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
        return self.etc_output_class(logits=logits, cache=cache, **prepared.encoder_outputs)

    def _etc_decode_inputs(self, input_ids, attention_mask, position_ids, cache) -> dict:
        if input_ids is None:
            raise ValueError("ETC decoding needs input_ids")
        if position_ids is not None and position_ids.dim() == 3:
            position_ids = position_ids[-3:]  # generate()'s M-RoPE (4, B, q): drop the text row, keep the 3 axes
        mask, positions = cache.etc_state.decode_inputs(
            cache.get_seq_length(), input_ids.shape[1], attention_mask, position_ids
        )
        return {"attention_mask": mask, "position_ids": self._etc_text_positions(positions)}

    # ---------------------------------------------------------------------------------------------- backbone hooks
    @classmethod
    def etc_visual_token_count(cls, config) -> tuple[int, Optional[tuple[int, int]]]:
        """`ETCConfig.num_visual_tokens` for a model of this config, and the decoder's position grid (None for a
        fixed N)."""
        raise NotImplementedError

    def _etc_vision_tower(self) -> nn.Module:
        """The vision encoder (`ETCConfig.freeze_vision_tower` freezes it)."""
        raise NotImplementedError

    def _etc_visual_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """bool `(B, L)`: the visual placeholders in `input_ids`."""
        raise NotImplementedError

    def _etc_has_visual_inputs(self, visual_inputs: dict) -> bool:
        """Whether the call brings images (pixels or generate()'s encoder outputs)."""
        raise NotImplementedError

    def _etc_check_visual_inputs(self, visual_inputs: dict) -> None:
        """Raise for image arguments that cannot go together (e.g. pixels and their encoder outputs)."""

    def _etc_prepare(self, input_ids, attention_mask, position_ids, visual_inputs: dict) -> ETCInputs:
        """Encode the images and build the extended inputs (`ETCInputs`)."""
        raise NotImplementedError

    def _etc_num_images(self, visual_inputs: dict) -> int:
        """How many images `visual_inputs` holds (for images added to a compressed cache)."""
        raise NotImplementedError(
            f"ETC: adding images to a cache that holds a compressed prefill is not implemented for "
            f"{self.etc_base_class.__name__} yet; prefill the whole conversation into a new cache instead."
        )

    def _etc_select_images(self, visual_inputs: dict, index: list) -> dict:
        """`visual_inputs` with only the images at `index` (in the order images are given)."""
        raise NotImplementedError

    def _etc_token_kwargs(self, **token_inputs) -> dict:
        """Language-model keyword arguments made from `ETCInputs.token_inputs` (none by default)."""
        return {}

    def _etc_teacher_modules(self, peft_layers: Optional[list] = None) -> dict:
        """The modules the teacher runs (name -> module, `language_model` always): what the frozen snapshot copies
        (no `peft_layers`), or, with peft, what runs with the adapters off."""
        raise NotImplementedError

    def _etc_teacher_inputs(self, prepared: ETCInputs, input_ids, modules: dict) -> tuple[torch.Tensor, dict]:
        """The teacher pass's `(B, L, H)` input embeddings of the user's sequence and its token inputs."""
        raise NotImplementedError

    def _etc_decoder_grids(self, prepared: ETCInputs) -> Optional[torch.Tensor]:
        """`(I, 3)` grids for a decoder of variable N (raise when they are needed and missing), None for fixed N."""
        return None

    def _etc_text_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Decoding positions `(B, q)` of text tokens in the form the language model takes."""
        return positions
