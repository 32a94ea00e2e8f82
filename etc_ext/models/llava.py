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

import copy
from typing import Optional

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs

from ..compress import default_position_ids, find_image_spans, insert_compression_tokens, record_input
from ..config import ETCConfig
from . import common
from .common import unwrap_peft
from .etc_hooks import user_embeddings
from .etc_model import ETCInputs, ETCMixin, etc_output_class

__all__ = [
    "LlavaInputsMixin",
    "ETCLlavaCausalLMOutputWithPast",
    "ETCLlavaForConditionalGeneration",
    "num_visual_tokens",
    *common.FAMILY_API,
]


ETCLlavaCausalLMOutputWithPast = etc_output_class(LlavaCausalLMOutputWithPast, "ETCLlavaCausalLMOutputWithPast", __name__)


class LlavaInputsMixin:
    """What ETC and the training-free baselines share on LLaVA (`ETCLlavaForConditionalGeneration`,
    `etc_ext.baselines.llava.BaselineLlavaForConditionalGeneration`): the forward, with Hugging Face's signature,
    handing the call to the compressor's `_compressed_forward` (`ETCMixin`, `BaselineMixin`), and where the images
    are. Listed first among a class's bases, so that the compressor's `super().forward` is Hugging Face's."""

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        vision_feature_layer=None,
        vision_feature_select_strategy: Optional[str] = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_sizes: Optional[torch.Tensor] = None,
        mm_encoder_outputs=None,
        **kwargs: Unpack[TransformersKwargs],
    ):
        r"""
        Like `LlavaForConditionalGeneration.forward` (`kwargs`: cache, labels, use_cache, ... and the compressor's
        own, e.g. ETC's `etc_prefill_method`), compressing the images when the compressor is enabled: see
        `ETCMixin._etc_forward` (ETC) or `BaselineMixin._baseline_forward` (the baselines). `logits` are in the
        user's layout, so `labels` are the user's; `attention_mask` and `position_ids` are too, also while decoding
        on a compressed cache.
        """
        visual_kwargs = dict(
            pixel_values=pixel_values,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            image_sizes=image_sizes,
        )
        encoded_images = (mm_encoder_outputs or {}).get("image")  # generate() encodes the images beforehand
        return self._compressed_forward(
            dict(visual_kwargs, encoded_images=encoded_images), visual_kwargs, input_ids, attention_mask,
            position_ids, logits_to_keep, mm_encoder_outputs, inputs_embeds=inputs_embeds, **kwargs,
        )  # fmt: skip

    def _visual_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        return input_ids == self.config.image_token_id

    def _placeholder_token_ids(self) -> tuple:
        return (self.config.image_token_id,)

    def _has_visual_inputs(self, visual_inputs: dict) -> bool:
        return visual_inputs["pixel_values"] is not None or visual_inputs["encoded_images"] is not None


class ETCLlavaForConditionalGeneration(LlavaInputsMixin, ETCMixin, LlavaForConditionalGeneration):
    """A `LlavaForConditionalGeneration` with ETC; made by `apply_etc`, never instantiated directly. `ETCMixin`
    holds ETC; this class is LLaVA's adapter: where the images are (`LlavaInputsMixin`) and how they are encoded.

    `forward` (`LlavaInputsMixin.forward`), with ETC when `self.etc.enabled`:

    - without a cache (and `use_cache` not True): the masked single pass over the sequence with M compression
      tokens after each image. `logits` are in the user's layout `(batch_size, sequence_length, vocab_size)` (the
      logits after an image's last visual token come from its last compression token), so `labels` are the user's.
      With `labels`: `loss = ce_loss + vid_weight * vid_loss`.
    - with an empty cache or `use_cache=True` (generate()'s prefill): the compressed prefill into an `ETCCache`;
      `logits` `(batch_size, n, vocab_size)` are those of each row's last n = max(1, logits_to_keep) tokens (tokens
      of the text after the last image).
    - with an `ETCCache` that holds a prefill: decoding. `attention_mask` and `position_ids` are in the user's layout
      (as generate() makes them) and are mapped onto the compacted cache.
    - `etc_prefill_method` ("auto", "segmented" or "masked"; default `self.etc.prefill_method`) picks the prefill.
    """

    etc_base_class = LlavaForConditionalGeneration
    etc_output_class = ETCLlavaCausalLMOutputWithPast

    # ---------------------------------------------------------------------------------------------- adapter
    @classmethod
    def etc_visual_token_count(cls, config):
        return num_visual_tokens(config), None

    def _etc_vision_tower(self) -> nn.Module:
        return self.model.vision_tower

    def _etc_check_visual_inputs(self, visual_inputs: dict) -> None:
        if visual_inputs["pixel_values"] is not None and visual_inputs["encoded_images"] is not None:
            raise ValueError("Pass either pixel_values or mm_encoder_outputs['image'], not both")
        if not self._has_visual_inputs(visual_inputs):
            raise ValueError("ETC: input_ids contain image tokens but no pixel_values were given")

    def _etc_num_images(self, visual_inputs: dict) -> int:
        encoded = visual_inputs.get("encoded_images")
        return len(encoded.pooler_output) if encoded is not None else len(visual_inputs["pixel_values"])

    def _etc_select_images(self, visual_inputs: dict, index: list) -> dict:
        selected = dict(visual_inputs)
        encoded = visual_inputs.get("encoded_images")
        if encoded is not None:
            selected["encoded_images"] = copy.copy(encoded)
            selected["encoded_images"].pooler_output = [encoded.pooler_output[i] for i in index]
        else:
            selected["pixel_values"] = visual_inputs["pixel_values"][index]
            if visual_inputs.get("image_sizes") is not None:
                selected["image_sizes"] = visual_inputs["image_sizes"][index]
        return selected

    def _etc_prepare(self, input_ids, attention_mask, position_ids, visual_inputs: dict, user_embeds=None) -> ETCInputs:
        """Image features (from pixel_values, or as generate() encoded them), the extended layout and embeddings
        (the text's from `user_embeds` when the user gave inputs_embeds)."""
        projector_input = None
        image_outputs = visual_inputs.get("encoded_images")
        if image_outputs is None:
            with record_input(self.model.multi_modal_projector) as recorded:
                image_outputs = self.model.get_image_features(
                    pixel_values=visual_inputs["pixel_values"],
                    vision_feature_layer=visual_inputs.get("vision_feature_layer"),
                    vision_feature_select_strategy=visual_inputs.get("vision_feature_select_strategy"),
                    image_sizes=visual_inputs.get("image_sizes"),
                    return_dict=True,
                )
            projector_input = recorded.value
        image_token_mask = self._visual_token_mask(input_ids)
        features = image_outputs.pooler_output  # list of (N_i, H)
        spans = find_image_spans(image_token_mask, [f.shape[0] for f in features])
        inputs_embeds = user_embeddings(self.get_input_embeddings(), input_ids, user_embeds)  # (B, L, H)
        image_features = torch.cat(features, dim=0).to(inputs_embeds.device, inputs_embeds.dtype)  # (I * N, H)
        inputs_embeds = inputs_embeds.masked_scatter(image_token_mask[..., None], image_features)
        layout = insert_compression_tokens(
            spans, input_ids.shape[1], self.etc.config.num_compression_tokens, attention_mask, position_ids
        )
        batch_size, length = input_ids.shape
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, batch_size, length, input_ids.device)
        return ETCInputs(
            layout=layout,
            inputs_embeds=layout.embed(inputs_embeds, self.etc.compression_tokens()),
            visual_token_mask=image_token_mask,
            position_ids=position_ids,
            encoder_outputs={"image_outputs": image_outputs},
            teacher_inputs={"image_features": image_features, "projector_input": projector_input},
            user_embeds=user_embeds,
        )

    def _etc_teacher_modules(self, peft_layers=None) -> dict:
        # The projector always: with peft it may hold adapters (or modules_to_save) of its own.
        return {"projector": self.model.multi_modal_projector, "language_model": self.model.language_model}

    def _etc_teacher_inputs(self, prepared: ETCInputs, input_ids, modules: dict):
        features = prepared.teacher_inputs["image_features"].detach()
        projector = modules.get("projector")
        if projector is not None:  # the teacher projects the vision features with its own projector
            projector_input = prepared.teacher_inputs["projector_input"]
            if projector_input is None:
                raise ValueError("ETC: the frozen teacher needs pixel_values (not pre-encoded image features)")
            features = projector(projector_input).flatten(0, -2)
        inputs_embeds = user_embeddings(modules["language_model"].get_input_embeddings(), input_ids, prepared.user_embeds)
        inputs_embeds = inputs_embeds.masked_scatter(
            prepared.visual_token_mask[..., None], features.to(inputs_embeds.dtype)
        )
        return inputs_embeds, {}


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
    return common.install_etc(model, config, ETCLlavaForConditionalGeneration)


def prepare_inputs(model: nn.Module, input_ids, pixel_values, attention_mask=None, position_ids=None) -> ETCInputs:
    """The extended batch the ETC model runs on (layout, embeddings), for inspection."""
    base = unwrap_peft(model)
    visual_inputs = {"pixel_values": pixel_values, "encoded_images": None}
    return base._etc_prepare(input_ids, attention_mask, position_ids, visual_inputs)


def instruction_target(model: nn.Module, input_ids, pixel_values, attention_mask=None, labels=None) -> dict:
    """The distillation target of a batch and its parts, for inspection and tests (no grad).

    Returns a dict with `scores` `(I, N)` (text-to-image attention, before min-max), `target` X^ `(I, N, D)`,
    `instruction_index` `(I, T)` and `visual_index` `(I, N)` (user positions).
    """
    with torch.no_grad():
        prepared = prepare_inputs(model, input_ids, pixel_values, attention_mask)
    parts = unwrap_peft(model)._etc_instruction_target(prepared, input_ids, attention_mask, labels)
    spans = prepared.spans
    parts["scores"], parts["target"] = torch.stack(parts["scores"]), torch.stack(parts["target"])
    parts["visual_index"] = spans.start[:, None] + torch.arange(parts["scores"].shape[1], device=input_ids.device)
    return parts


# Written once for every backbone (etc_ext.models.common).
remove_etc = common.uninstall_etc
save_pretrained = common.save_pretrained
from_pretrained = common.from_pretrained
snapshot_teacher = common.snapshot_teacher
