"""The baselines' model integration, written once for every backbone: `BaselineMixin` (the forward's dispatch, the
language model's passes over the compressed prompt, decoding on the compressed cache) and `Baseline`, what
`apply_baseline` registers on the model.

A backbone's baseline class is `class BaselineFoo(FooInputsMixin, BaselineMixin, FooForConditionalGeneration)`: the
family's `forward` (`FooInputsMixin`, shared with ETC's class, e.g. `etc_ext.models.llava.LlavaInputsMixin`) keeps the
Hugging Face signature (generate() reads it) and hands everything to `_compressed_forward`, here the baselines'
dispatch. The family mixin says where the images are (`_visual_token_mask(input_ids)`,
`_has_visual_inputs(visual_inputs)`); what else differs between backbones sits behind the adapter's hooks:

- `baseline_geometry(model)` (static): the `VisualGeometry`;
- `baseline_install()`: the method's hooks (LLaVA: `BaselineMethod.install`; Qwen3-VL: the vision tower's
  attention when the method reads it);
- `_baseline_encode(visual_inputs, input_ids, attention_mask, position_ids)`: an `EncodedPrompt` (the images'
  features in placeholder order, their spans and grids, the user's positions);
- `_baseline_token_kwargs(visual_mask, extras)`: per-token extras of a language-model pass (DeepStack);
- `_baseline_decode_position_ids(position_ids)`: the positions decoding uses;
- `_baseline_output(loss, logits, cache, encoder_outputs)`: the backbone's output dataclass.

`baseline_positions_from_sources`: False (LLaVA) numbers the shortened prompt as if each image had K tokens; True
(M-RoPE) places each entry at the positions of the visual token it stands for (`sequence.shorten_sequence`).
"""

from contextlib import nullcontext
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from ..compress import ETCCache, ImageSpans
from ..continuation import CompressedCacheGenerationMixin, forward_arguments, new_tokens
from .config import BaselineConfig, VisualGeometry
from .registry import LanguageInputs, method_class
from .sequence import CompressedLayout, _gather_rows, shorten_sequence, user_next_position

__all__ = ["Baseline", "BaselineMixin", "EncodedPrompt"]


class Baseline:
    """What `apply_baseline` registers on a model as `model.baseline`.

    Attributes:
        config: the `BaselineConfig`.
        implementation: its `BaselineMethod` (what the model's hooks and forward call).
        geometry: the model's `VisualGeometry`.
        enabled: when False the model runs exactly as the original one (the hooks pass everything through).
        original_class: the class to restore on removal.
    """

    def __init__(self, config: BaselineConfig, geometry: VisualGeometry, original_class: type):
        self.config = config
        self.implementation = method_class(config.method)()  # the registered BaselineMethod
        self.geometry = geometry
        self.enabled = True
        self.original_class = original_class
        self.handles: list = []
        self.recorded: dict = {}  # vision-tower tensors between the hooks of one encoding and its use

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


@dataclass
class EncodedPrompt:
    """A prompt's images, encoded, as the adapter's `_baseline_encode` returns them.

    Attributes:
        features: per image `(n_i, H + E)` (see `LanguageInputs.features`).
        sources: per image `(n_i,)` or None (see `LanguageInputs.sources`).
        grids: per image `(gh, gw)`.
        spans: where each image's N_i placeholders sit.
        position_ids: the user's positions, `(B, L)` or `(3, B, L)`.
        encoder_outputs: what the output dataclass reports of the encoding (LLaVA's `image_outputs`), or None.
    """

    features: list
    sources: Optional[list]
    grids: list
    spans: ImageSpans
    position_ids: torch.Tensor
    encoder_outputs: object = None


class BaselineMixin(CompressedCacheGenerationMixin):
    """A training-free compressor on a Hugging Face VLM class (see the module docstring). Never instantiated
    directly: `apply_baseline` swaps an existing model's class."""

    baseline: Baseline
    baseline_positions_from_sources: ClassVar[bool] = False

    def baseline_install(self) -> None:
        """Register the method's hooks (`BaselineMethod.install`)."""
        self.baseline.handles += self.baseline.implementation.install(self)

    # ---------------------------------------------------------------------------------------------- dispatch
    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def _compressed_forward(self, visual_inputs, visual_kwargs, input_ids=None, attention_mask=None, position_ids=None,
                            logits_to_keep=0, mm_encoder_outputs=None, **kwargs):  # fmt: skip
        """What the backbone family's `forward` (e.g. `etc_ext.models.llava.LlavaInputsMixin.forward`) hands the
        call to: `_baseline_forward`. `visual_inputs`: the family's image arguments for its hooks (with generate()'s
        encoder outputs); `visual_kwargs`: the same as the original forward takes them."""
        base_kwargs, (cache, labels, use_cache, inputs_embeds) = forward_arguments(
            visual_kwargs, input_ids, attention_mask, position_ids, logits_to_keep, mm_encoder_outputs, kwargs
        )
        return self._baseline_forward(
            base_kwargs, visual_inputs, input_ids, attention_mask, position_ids, cache, labels, logits_to_keep,
            use_cache, inputs_embeds, kwargs,
        )  # fmt: skip

    def _baseline_forward(
        self, base_kwargs, visual_inputs, input_ids, attention_mask, position_ids, cache, labels, logits_to_keep,
        use_cache, inputs_embeds, kwargs,
    ):  # fmt: skip
        """The compressing forward, with the baseline when `self.baseline.enabled` and the inputs hold images:

        - without a cache (and `use_cache` not True): one pass over the compressed sequence; `logits` in the user's
          layout `(batch_size, sequence_length, vocab_size)` (see the package docstring), `loss` with `labels`.
        - with an empty cache or `use_cache=True` (generate()'s prefill): the same, into an `ETCCache` whose
          `etc_state` is a `BaselineCacheState` (K visual entries per image in every layer).
        - with such a cache: decoding; `attention_mask` and `position_ids` are in the user's layout (as generate()
          makes them) and are mapped onto the cache.

        `base_kwargs`: the original forward's arguments; `kwargs`: the remaining ones (output flags, loss options).
        """
        original_forward = super().forward  # the Hugging Face class after BaselineMixin in the MRO
        if not self.baseline.enabled:
            return original_forward(**base_kwargs)
        state = getattr(cache, "etc_state", None)
        has_images = self._has_visual_inputs(visual_inputs)
        if state is not None:  # a compressed prefill: decoding, or a follow-up question / turn (text only)
            base_kwargs.update(self._baseline_continuation(cache, state, input_ids, attention_mask, position_ids,
                                                           has_images))  # fmt: skip
            return original_forward(**base_kwargs)
        image_token_mask = None if input_ids is None else self._visual_token_mask(input_ids)
        if not has_images and (image_token_mask is None or not bool(image_token_mask.any())):
            return original_forward(**base_kwargs)  # text only: nothing to compress

        self._baseline_check_inputs(input_ids, inputs_embeds, has_images, labels, visual_inputs, kwargs)
        prefill = cache is not None or bool(use_cache)
        if cache is not None and cache.get_seq_length() > 0:
            raise NotImplementedError("baseline: prefilling images into a non-empty cache is not supported")
        encoded = self._baseline_encode(visual_inputs, input_ids, attention_mask, position_ids)
        if prefill and not isinstance(cache, ETCCache):  # e.g. the empty DynamicCache generate() made
            cache = ETCCache(config=self.config)
        hidden_states, layout = self._baseline_language_model(
            input_ids, image_token_mask, encoded, attention_mask, labels, cache if prefill else None
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
            next_position = user_next_position(attention_mask, encoded.position_ids, input_ids)
            cache.etc_state = layout.cache_state(length, next_position)
        return self._baseline_output(loss, logits, cache if prefill else None, encoded.encoder_outputs)

    def _baseline_check_inputs(self, input_ids, inputs_embeds, has_images, labels, visual_inputs, kwargs) -> None:
        """What a compressing forward needs: input_ids (the images are found by their placeholders), pixel values
        for the placeholders, labels in the user's layout, a call the method supports, no hidden states /
        attentions."""
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("baseline: needs input_ids (not inputs_embeds) to find the images")
        if not has_images:
            raise ValueError("baseline: input_ids contain image tokens but no pixel_values were given")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(
                f"labels must have the shape of input_ids {list(input_ids.shape)}, got {list(labels.shape)}"
            )
        self.baseline.implementation.check_call(self, visual_inputs.get("vision_feature_layer"))
        for flag in ("output_attentions", "output_hidden_states"):
            if kwargs.get(flag):
                raise NotImplementedError(f"baseline: {flag} is not supported with compression enabled")

    def _baseline_continuation(self, cache, state, input_ids, attention_mask, position_ids, has_images) -> dict:
        """The forward's arguments for the tokens a compressed cache does not hold yet (decoding, or a follow-up
        question or turn without images): only those tokens, with the mask and positions mapped onto the compacted
        cache."""
        if input_ids is None:
            raise ValueError("baseline decoding needs input_ids")
        cache_length = cache.get_seq_length()
        input_ids, position_ids, _, new = new_tokens(cache, input_ids, attention_mask, position_ids)
        if has_images and bool(self._visual_token_mask(input_ids).any()):  # (a generated id is text)
            raise NotImplementedError(
                "baseline: adding images to a cache that holds a compressed prefill is not supported; start a new "
                "cache for a prompt with new images"
            )
        position_ids = self._baseline_decode_position_ids(position_ids)
        mask, positions = state.decode_inputs(cache_length, new, attention_mask, position_ids)
        return dict(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                    **{name: None for name in self._baseline_visual_argument_names})  # fmt: skip

    # ---------------------------------------------------------------------------------------------- passes
    def _baseline_language_model(
        self, input_ids, image_token_mask, encoded: EncodedPrompt, attention_mask, labels, cache
    ) -> tuple[torch.Tensor, CompressedLayout]:
        """Run the language model on the compressed sequence (`BaselineMethod.language_pass`): last hidden states
        `(B, S, H)` and its layout."""
        baseline = self.baseline
        config = baseline.config
        spans = encoded.spans
        reduced = baseline.implementation.reduces_while_encoding
        expected = [config.num_tokens] * len(spans) if reduced else spans.num_tokens.tolist()
        counts = [f.shape[0] for f in encoded.features]
        if counts != expected:
            raise ValueError(
                f"baseline {config.method!r}: image features have {sorted(set(counts))} tokens per image, expected "
                f"{sorted(set(expected))} (were they encoded before apply_baseline?)"
            )
        inputs_embeds = self.get_input_embeddings()(input_ids)  # (B, L, H)
        inputs = LanguageInputs(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            features=[f.to(inputs_embeds.device, inputs_embeds.dtype) for f in encoded.features],
            sources=encoded.sources,
            grids=encoded.grids,
            image_token_mask=image_token_mask,
            spans=spans,
            mask=attention_mask if attention_mask is not None else torch.ones_like(input_ids),
            position_ids=encoded.position_ids,
            labels=labels,
            cache=cache,
        )
        return baseline.implementation.language_pass(self, inputs)

    def _baseline_shortened_pass(self, inputs: LanguageInputs, features: list, sources: Optional[list] = None):
        """Each image's K tokens `features` (per image `(K, H + E)`) take its first K placeholders; the shorter
        sequence runs in one pass. `sources`: per image `(K,)` the token each stands for (see
        `baseline_positions_from_sources`). Returns `(last hidden states, CompressedLayout)`."""
        num_tokens = self.baseline.config.num_tokens
        spans, hidden_size = inputs.spans, inputs.hidden_size
        slots = spans.start[:, None] + torch.arange(num_tokens, device=inputs.input_ids.device)[None]  # (I, K)
        rows = spans.row[:, None].expand_as(slots)
        stacked = torch.stack(features).to(inputs.inputs_embeds.dtype)  # (I, K, H + E)
        inputs_embeds = inputs.inputs_embeds.index_put((rows, slots), stacked[..., :hidden_size])
        entry_sources = None
        if self.baseline_positions_from_sources:
            if sources is None:
                raise ValueError(
                    f"baseline {self.baseline.method!r}: this backbone places each kept entry at the positions of the "
                    "visual token it stands for, and the method gave none (its reduction must return them)"
                )
            entry_sources = spans.start[:, None] + torch.stack(sources).to(slots.device)
        layout = shorten_sequence(spans, inputs.mask, inputs.position_ids, num_tokens, entry_sources)
        extras = None
        if stacked.shape[-1] > hidden_size:  # the per-token extras follow their tokens
            user_extras = stacked.new_zeros(*inputs.input_ids.shape, stacked.shape[-1] - hidden_size)
            extras = layout.gather(user_extras.index_put((rows, slots), stacked[..., hidden_size:]))
        outputs = self._baseline_run_language_model(
            layout.gather(inputs_embeds), layout.valid.long(), layout.position_ids, inputs.cache, layout.visual,
            extras,
        )  # fmt: skip
        return outputs.last_hidden_state, layout

    def _baseline_run_language_model(self, inputs_embeds, attention_mask, position_ids, cache, visual_mask, extras,
                                     **kwargs):  # fmt: skip
        """One pass of the language model with the backbone's per-token extras (`visual_mask` `(B, S)` the visual
        entries, `extras` `(B, S, E)` or None)."""
        return self.model.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
            **self._baseline_token_kwargs(visual_mask, extras),
            **kwargs,
        )

    # ---------------------------------------------------------------------------------------------- adapter defaults
    _baseline_visual_argument_names: ClassVar[tuple] = ()  # the forward's image arguments, None while decoding

    def _baseline_token_kwargs(self, visual_mask, extras) -> dict:
        """Per-token extras of a language-model pass (none by default)."""
        return {}

    def _baseline_pruning(self, pruner):
        """Context around a pass that FastV prunes (`fastv.FastVPruner`): what the backbone's extras need."""
        return nullcontext()

    def _baseline_decode_position_ids(self, position_ids):
        """The positions of the new tokens on a compressed cache (the user's, mapped by the cache's state)."""
        return position_ids
