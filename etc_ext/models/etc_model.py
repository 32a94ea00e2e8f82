"""The ETC model, written once for every backbone: `ETCMixin` adds ETC to a Hugging Face VLM class.

A backbone's ETC class is `class ETCFooForConditionalGeneration(FooInputsMixin, ETCMixin, FooForConditionalGeneration)`.
Its `forward` (the family's, `FooInputsMixin`, which the training-free baselines share) keeps the Hugging Face
signature (generate() reads it) and hands everything to `_compressed_forward`, here `ETCMixin._etc_forward`, which
dispatches:

- compression disabled, or a text-only prompt: the original forward.
- a cache holding a compressed prefill: decoding, with the user's attention mask and positions mapped onto it.
- an empty cache or `use_cache=True` (generate()'s prefill): the segmented (or masked) prefill into an `ETCCache`
  (with `output_hidden_states` or `output_attentions`, the masked single pass, which also fills the cache).
- otherwise: the masked single pass (training), `loss = ce_loss + vid_weight * vid_loss` with labels; unless
  `use_cache=False` is passed (or the text config's `use_cache` is off), it also returns the compacted `ETCCache`,
  as Hugging Face models return their cache.

What differs between backbones sits behind the hooks of `etc_hooks.ETCBackboneHooks` (the "adapter"): how to find
visual tokens, encode images and build the extended inputs (`_etc_prepare`), the per-token extras each language-model
pass gets (DeepStack), the teacher's modules and inputs, the decoder's grids. `docs/new_backbone.md` walks through
them.

The parts: `etc_training.ETCTrainingMixin` (masked pass, target, teacher, VID), `etc_generation.ETCGenerationMixin`
(prefill, decoding, continuing a compressed cache), `etc_hooks` (`ETCInputs` and the hooks); this module holds the
dispatch.

Under `torch.compile` the dispatch runs eagerly and the language model's passes compile (`etc_ext.dispatch`): the
routing and the hooks' bookkeeping are `host_side` (the adapter's hooks are called through `_etc_route`,
`_etc_prepare_inputs` and `_etc_pass_kwargs`), the functions that call the passes are `dispatch`.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from transformers import PreTrainedModel
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from ..compress import CompressionTokens, ETCCache
from ..continuation import forward_arguments
from ..dispatch import dispatch, host_side
from ..distill import DistillHead, VIDDecoder
from . import common
from .common import ETCModules, check_etc_inputs
from .etc_generation import ETCGenerationMixin
from .etc_hooks import ETCInputs, placeholder_input_ids
from .etc_training import ETCTrainingMixin

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


class ETCMixin(ETCGenerationMixin, ETCTrainingMixin):
    """ETC on a Hugging Face VLM class (see the module docstring). Never instantiated directly: `apply_etc` swaps an
    existing model's class."""

    etc: ETCModules
    etc_output_class: type  # the backbone's output dataclass with `ce_loss` and `vid_loss`

    # ---------------------------------------------------------------------------------------------- dispatch
    def _compressed_forward(self, *args, **kwargs):
        """What the backbone family's `forward` (e.g. `etc_ext.models.llava.LlavaInputsMixin.forward`) hands the
        call to: ETC's dispatch."""
        return self._etc_forward(*args, **kwargs)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @dispatch  # the frame itself: data-dependent routing; the passes it calls compile (etc_ext.dispatch)
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
        base_kwargs, (cache, labels, use_cache, inputs_embeds) = forward_arguments(
            visual_kwargs, input_ids, attention_mask, position_ids, logits_to_keep, mm_encoder_outputs, kwargs
        )
        original_forward = super().forward  # the Hugging Face class after ETCMixin in the MRO
        if getattr(self, "etc", None) is None or not self.etc.enabled:  # no ETC parts (a bare ETC class) or off
            return original_forward(**base_kwargs)

        if inputs_embeds is not None:  # the user's embeddings: find the placeholders in them, as transformers does
            input_ids = self._etc_placeholder_ids(input_ids, inputs_embeds)
        route = self._etc_route(visual_inputs, input_ids, inputs_embeds, cache, labels, use_cache, kwargs)
        if route == "original":
            return original_forward(**base_kwargs)
        if route == "continue":
            return self._etc_continue(
                original_forward, base_kwargs, visual_inputs, visual_kwargs, input_ids, attention_mask,
                position_ids, cache, etc_prefill_method, inputs_embeds,
            )  # fmt: skip
        prepared = self._etc_prepare_inputs(input_ids, attention_mask, position_ids, visual_inputs, inputs_embeds)
        if route == "prefill":
            method = etc_prefill_method or self.etc.prefill_method
            return self._etc_prefill(prepared, input_ids.shape[1], cache, method, logits_to_keep)
        # the masked single pass; with a fresh ETCCache (generate() passes an empty DynamicCache) for a prefill with
        # output_hidden_states/attentions (the one pass that has every token's states), or as use_cache asks
        cache = ETCCache(config=self.config) if route == "masked_cached" else None
        return self._etc_masked_forward(prepared, input_ids, attention_mask, labels, logits_to_keep, kwargs, cache)

    @host_side
    def _etc_route(self, visual_inputs, input_ids, inputs_embeds, cache, labels, use_cache, kwargs) -> str:
        """Which path a call takes, after that path's checks (data-dependent: whether the prompt holds image
        tokens, the cache's state): "continue" (a cache holding a compressed prefill), "original" (nothing to
        compress), "prefill" (the compressed prefill), "masked_cached" / "masked" (the masked single pass, returning
        a cache or not)."""
        has_visual_inputs = self._has_visual_inputs(visual_inputs)
        if getattr(cache, "etc_state", None) is not None:
            if labels is not None:
                raise ValueError("ETC: labels go with the training forward (no cache)")
            return "continue"
        visual_token_mask = None if input_ids is None else self._visual_token_mask(input_ids)
        has_visual_tokens = visual_token_mask is not None and bool(visual_token_mask.any())
        if not has_visual_inputs and not has_visual_tokens:
            return "original"  # nothing to compress: text only
        if inputs_embeds is not None and not has_visual_tokens:
            raise self._etc_no_placeholder_error()
        if not has_visual_inputs and cache is not None and cache.get_seq_length() > 0:
            # Decoding a text-only prompt (a plain, uncompressed cache): an image token id here was generated as
            # text, and the original model treats it as text too.
            return "original"

        check_etc_inputs(input_ids, labels, kwargs)
        self._etc_check_visual_inputs(visual_inputs)
        prefill = cache is not None or bool(use_cache)
        if prefill and (labels is not None or kwargs.get("shift_labels") is not None):
            raise ValueError(
                "ETC: labels go with the training forward (no cache); the prefill (cache / use_cache=True) returns "
                "only the last token's logits."
            )
        if prefill:
            self._etc_check_cache(cache)
        if prefill and cache is not None and cache.get_seq_length() > 0:
            raise NotImplementedError("ETC: prefilling images into a non-empty cache is not supported")
        wants_states = self._etc_output_option(kwargs, "output_hidden_states") or self._etc_output_option(
            kwargs, "output_attentions"
        )
        if prefill and not wants_states:
            return "prefill"
        return "masked_cached" if prefill or self._etc_default_use_cache(use_cache) else "masked"

    @host_side
    def _etc_prepare_inputs(self, input_ids, attention_mask, position_ids, visual_inputs, user_embeds=None):
        """The backbone's `_etc_prepare` (encoding the images, the layout), outside any compiled region."""
        return self._etc_prepare(input_ids, attention_mask, position_ids, visual_inputs, user_embeds)

    @host_side
    def _etc_placeholder_ids(self, input_ids, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """`(B, L)` ids standing for the user's `inputs_embeds` `(B, L, H)` in ETC's bookkeeping: the visual
        placeholders' token ids where the embeddings are theirs, `NO_TOKEN` at the text (whose embeddings are the
        user's: they are never re-embedded)."""
        if input_ids is not None:
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")  # transformers' wording
        hidden_size = self.get_input_embeddings().embedding_dim
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != hidden_size:
            raise ValueError(
                f"inputs_embeds must be (batch_size, sequence_length, {hidden_size}), got {list(inputs_embeds.shape)}"
            )
        return placeholder_input_ids(inputs_embeds, self.get_input_embeddings(), self._placeholder_token_ids())

    def _etc_no_placeholder_error(self) -> ValueError:
        ids = ", ".join(str(i) for i in self._placeholder_token_ids())
        return ValueError(
            "ETC: images were given but no position of inputs_embeds holds the embedding of an image placeholder "
            f"token (id {ids}): ETC finds each image's tokens in inputs_embeds as transformers does, at the positions "
            "equal to model.get_input_embeddings()(image_token_id); keep that embedding there (or pass input_ids)"
        )

    def _etc_default_use_cache(self, use_cache) -> bool:
        """Whether the masked forward returns a cache: `use_cache`, else the text config's (as Hugging Face's
        language models resolve it; off while training with gradient checkpointing, as there)."""
        if use_cache is not None:
            return bool(use_cache)
        language_model = self.model.language_model
        if self.training and getattr(language_model, "gradient_checkpointing", False):
            return False
        return bool(getattr(self.config.get_text_config(), "use_cache", False))

    @dispatch
    def _etc_language_model(self, language_model, inputs_embeds, attention_mask, position_ids, cache, token_inputs,
                            **kwargs):  # fmt: skip
        """One pass of `language_model` (the model's, or a frozen teacher's) with the backbone's per-token extras."""
        return language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
            **self._etc_pass_kwargs(token_inputs),
            **kwargs,
        )

    @host_side
    def _etc_pass_kwargs(self, token_inputs: dict) -> dict:
        """The backbone's `_etc_token_kwargs` (e.g. DeepStack's visual positions), outside any compiled region."""
        return self._etc_token_kwargs(**token_inputs)

    # ---------------------------------------------------------------------------------------------- weights
    @classmethod
    def is_custom_code(cls) -> bool:
        """As the Hugging Face class under the ETC class: transformers counts classes defined outside it as custom
        code, and for those skips the original model's checkpoint key conversions and part of its weight
        initialisation (modules without parameters of their own, e.g. CLIP's attention, which re-initialises its
        projections); an ETC class is the original model with ETC's parts."""
        from .etc_hooks import ETCBackboneHooks

        original = next(
            c for c in cls.__mro__ if issubclass(c, PreTrainedModel) and not issubclass(c, ETCBackboneHooks)
        )
        return original.is_custom_code()

    def _init_weights(self, module):
        """transformers' initialisation, and ETC's own parameters as ETC's modules make them (transformers calls this
        for weights a checkpoint lacks, e.g. a model built on the meta device; its Linear and LayerNorm layers, the
        decoder's included, keep transformers' rule)."""
        if isinstance(module, (CompressionTokens, VIDDecoder, DistillHead)):
            module.reset_parameters()
        else:
            super()._init_weights(module)

    # ---------------------------------------------------------------------------------------------- saving
    def save_pretrained(self, save_directory, *args, **kwargs):
        """Hugging Face's `save_pretrained`, written as the original model (its weights without ETC's, config.json
        naming the original class, so `AutoModel*` / the original class's `from_pretrained` load it) with ETC's parts
        beside it (`etc_config.json`, `etc_model.safetensors`, as `etc_ext.models.common.save_pretrained` writes
        them): `etc_ext.models.common.from_pretrained(model, save_directory)` and `etc-ext eval --model save_directory`
        bring them back."""
        etc = getattr(self, "etc", None)
        if etc is None:  # a bare ETC class: the original model only
            return super().save_pretrained(save_directory, *args, **kwargs)
        state_dict = kwargs.pop("state_dict", None)
        state_dict = self.state_dict() if state_dict is None else state_dict
        state_dict = {name: value for name, value in state_dict.items() if not name.startswith("etc.")}
        super().save_pretrained(save_directory, *args, state_dict=state_dict, **kwargs)
        if kwargs.get("is_main_process", True):
            self.config.architectures = [etc.original_class.__name__]
            self.config.save_pretrained(save_directory)
            common.save_pretrained(self, save_directory, save_base_weights=False)

    @dispatch
    def _etc_run_language_model(self, inputs_embeds, attention_mask, position_ids, cache, **token_inputs):
        """`RunLanguageModel` for the prefill drivers of `etc_ext.compress`."""
        outputs = self._etc_language_model(
            self.model.language_model, inputs_embeds, attention_mask, position_ids, cache, token_inputs
        )
        return outputs.last_hidden_state
