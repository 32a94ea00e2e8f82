"""The baselines on LLaVA-1.5 (`transformers.LlavaForConditionalGeneration`): `BaselineLlavaForConditionalGeneration`,
the model integration that calls a `BaselineMethod` at each point of the forward (see `etc_ext.baselines.registry`),
and `Baseline`, what `apply_baseline` registers on the model."""

from typing import Optional

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration
from transformers.cache_utils import Cache
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from ..compress import ETCCache, default_position_ids, find_image_spans
from ..continuation import CompressedCacheGenerationMixin, new_tokens
from ..models.llava import num_visual_tokens as llava_num_visual_tokens
from .config import BaselineConfig, VisualGeometry
from .registry import LanguageInputs, method_class
from .sequence import CompressedLayout, _gather_rows, shorten_sequence, user_next_position

__all__ = ["Baseline", "BaselineLlavaForConditionalGeneration"]


# ============================================================================ the model-side state
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
        """Register the method's hooks (`BaselineMethod.install`)."""
        self.baseline.handles += self.baseline.implementation.install(self)

    def _baseline_projector(self) -> nn.Module:
        """The module that maps vision features to the language model's width (the vision-side methods hook it)."""
        return self.model.multi_modal_projector

    def _baseline_vision_layer(self) -> nn.Module:
        """The vision encoder layer whose output LLaVA reads (`vision_feature_layer`)."""
        feature_layer = self.config.vision_feature_layer
        if not isinstance(feature_layer, int) or isinstance(feature_layer, bool):
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
        """Projector forward hook (methods reducing the projected features): `(images, N, H)` -> `(images, K, H)`."""
        baseline = self.baseline
        if not baseline.enabled:
            return output
        geometry = baseline.geometry
        if output.shape[1] != geometry.num_visual_tokens:
            raise ValueError(
                f"{baseline.method}: the projector returned {output.shape[1]} tokens per image, expected the "
                f"{geometry.num_visual_tokens} of the patch grid"
            )
        return baseline.implementation.reduce_projected(output, baseline.config, geometry)

    def _baseline_reduce_projector_input(self, _module, args):
        """Projector forward pre-hook (methods reducing the vision features, with what their hooks recorded during
        this encoding): its input `(images, N, C)` -> `(images, K, C)`."""
        baseline = self.baseline
        if not baseline.enabled:
            return None
        recorded = dict(baseline.recorded)
        baseline.recorded.clear()  # the hooks hold this dict
        return (baseline.implementation.reduce_projector_input(self, args[0], recorded), *args[1:])

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
            base_kwargs.update(continuation_inputs(self, cache, state, input_ids, attention_mask, position_ids, has_images))
            return super().forward(**base_kwargs)
        image_token_mask = None if input_ids is None else input_ids == self.config.image_token_id
        if not has_images and (image_token_mask is None or not bool(image_token_mask.any())):
            return super().forward(**base_kwargs)  # text only: nothing to compress

        check_inputs(self, input_ids, inputs_embeds, has_images, labels, vision_feature_layer, kwargs)
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
            cache.etc_state = layout.cache_state(length, user_next_position(attention_mask, position_ids, input_ids))
        return LlavaCausalLMOutputWithPast(
            loss=loss, logits=logits, cache=cache if prefill else None, image_outputs=encoded
        )

    def _baseline_language_model(
        self, input_ids, features, image_token_mask, attention_mask, position_ids, labels, cache
    ) -> tuple[torch.Tensor, CompressedLayout]:
        """Run the language model on the compressed sequence (`BaselineMethod.language_pass`): last hidden states
        `(B, S, H)` and its layout."""
        baseline = self.baseline
        config = baseline.config
        num_visual = baseline.geometry.num_visual_tokens
        spans = find_image_spans(image_token_mask, [num_visual] * len(features))
        batch_size, length = input_ids.shape
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, batch_size, length, input_ids.device)
        position_ids = position_ids.expand(batch_size, length)
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        inputs_embeds = self.get_input_embeddings()(input_ids)  # (B, L, H)
        expected = config.num_tokens if baseline.implementation.reduces_while_encoding else num_visual
        counts = {f.shape[0] for f in features}
        if counts != {expected}:
            raise ValueError(
                f"baseline {config.method!r}: image features have {sorted(counts)} tokens per image, expected "
                f"{expected} (were they encoded before apply_baseline?)"
            )
        image_features = torch.stack(features).to(inputs_embeds.device, inputs_embeds.dtype)  # (I, n, H)
        inputs = LanguageInputs(
            input_ids, inputs_embeds, image_features, image_token_mask, spans, mask, position_ids, labels, cache
        )
        return baseline.implementation.language_pass(self, inputs)

    def _baseline_shortened_pass(self, inputs: LanguageInputs, image_features: torch.Tensor):
        """Each image's K tokens `image_features` `(I, K, H)` take its first K placeholders; the shorter sequence runs
        in one pass. Returns `(last hidden states, CompressedLayout)`."""
        num_tokens = self.baseline.config.num_tokens
        spans = inputs.spans
        slots = spans.start[:, None] + torch.arange(num_tokens, device=inputs.input_ids.device)[None]  # (I, K)
        inputs_embeds = inputs.inputs_embeds.index_put((spans.row[:, None].expand_as(slots), slots), image_features)
        layout = shorten_sequence(spans, inputs.mask, inputs.position_ids, num_tokens)
        outputs = self.model.language_model(
            inputs_embeds=layout.gather(inputs_embeds),
            attention_mask=layout.valid.long(),
            position_ids=layout.position_ids,
            cache=inputs.cache,
            use_cache=inputs.cache is not None,
        )
        return outputs.last_hidden_state, layout


# ============================================================================ forward's helpers
def continuation_inputs(model, cache, state, input_ids, attention_mask, position_ids, has_images) -> dict:
    """The forward's arguments for the tokens a compressed cache does not hold yet (decoding, or a follow-up question
    or turn without images): only those tokens, with the mask and positions mapped onto the compacted cache."""
    if input_ids is None:
        raise ValueError("baseline decoding needs input_ids")
    cache_length = cache.get_seq_length()
    input_ids, position_ids, _, new = new_tokens(cache, input_ids, attention_mask, position_ids)
    if has_images and bool((input_ids == model.config.image_token_id).any()):  # (a generated id is text)
        raise NotImplementedError(
            "baseline: adding images to a cache that holds a compressed prefill is not supported; start a new "
            "cache for a prompt with new images"
        )
    mask, positions = state.decode_inputs(cache_length, new, attention_mask, position_ids)
    return dict(input_ids=input_ids, attention_mask=mask, position_ids=positions, pixel_values=None,
                mm_encoder_outputs=None)  # fmt: skip


def check_inputs(model, input_ids, inputs_embeds, has_images, labels, vision_feature_layer, kwargs) -> None:
    """What a compressing forward needs: input_ids (the images are found by their placeholders), pixel values for
    the placeholders, labels in the user's layout, a call the method supports, no hidden states / attentions."""
    if input_ids is None or inputs_embeds is not None:
        raise ValueError("baseline: needs input_ids (not inputs_embeds) to find the images")
    if not has_images:
        raise ValueError("baseline: input_ids contain image tokens but no pixel_values were given")
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(f"labels must have the shape of input_ids {list(input_ids.shape)}, got {list(labels.shape)}")
    model.baseline.implementation.check_call(model, vision_feature_layer)
    for flag in ("output_attentions", "output_hidden_states"):
        if kwargs.get(flag):
            raise NotImplementedError(f"baseline: {flag} is not supported with compression enabled")
