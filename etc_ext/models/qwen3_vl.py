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

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from transformers import Qwen3VLForConditionalGeneration
from transformers.modeling_outputs import MultimodalCausalLMOutputWithPast

from ..compress import VISUAL, insert_compression_tokens
from ..config import ETCConfig
from . import common
from .common import LORA_TARGET_MODULES, ETCModules, unwrap_peft
from .etc_hooks import user_embeddings
from .etc_model import ETCInputs, ETCMixin, etc_output_class
from .qwen3_vl_inputs import (
    MM_TEXT,
    PIXEL_INPUTS,
    Qwen3VLInputsMixin,
    align_mm_token_type_ids,
    check_mm_token_type_ids,
    count_images,
    detached,
    encode_visual_inputs,
    encode_with,
    flatten_features,
    module_trains,
    scatter_features,
    select_images,
    span_grids,
    user_positions,
    visual_spans,
)

__all__ = [
    "LORA_TARGET_MODULES",
    "ETCQwen3VLCausalLMOutputWithPast",
    "ETCQwen3VLInputs",
    "ETCQwen3VLForConditionalGeneration",
    "apply_etc_with_lora",
    "default_lora_config",
    "decoder_position_grid",
    *common.FAMILY_API,
]


ETCQwen3VLCausalLMOutputWithPast = etc_output_class(MultimodalCausalLMOutputWithPast, "ETCQwen3VLCausalLMOutputWithPast", __name__)


@dataclass
class ETCQwen3VLInputs(ETCInputs):
    """A batch prepared for ETC (see `prepare_inputs` and `ETCInputs`): `position_ids` are the user's `(3, B, L)`
    M-RoPE positions, `token_inputs` hold DeepStack (`deepstack` `(B, Lx, K, H)`, zeros off the visual tokens, and
    `visual_mask` `(B, Lx)`), `grids` are None when generate() dropped the grids (only distillation needs them).

    Attributes:
        mm_token_type_ids: `(B, Lx)` the user's token types extended with 0 (text) at the compression tokens.
    """

    mm_token_type_ids: Optional[torch.Tensor] = None


class ETCQwen3VLForConditionalGeneration(Qwen3VLInputsMixin, ETCMixin, Qwen3VLForConditionalGeneration):
    """A `Qwen3VLForConditionalGeneration` with ETC; made by `apply_etc`, never instantiated directly. `ETCMixin`
    holds ETC; this class is Qwen3-VL's adapter: images and videos (`Qwen3VLInputsMixin`), M-RoPE positions,
    DeepStack.

    `forward` (`Qwen3VLInputsMixin.forward`), with ETC when `self.etc.enabled`:

    - without a cache (and `use_cache` not True): the masked single pass over the sequence with M compression tokens
      after each image (and each temporal group of a video). `logits` are in the user's layout `(batch_size,
      sequence_length, vocab_size)`, so `labels` are the user's. With `labels`: `loss = ce_loss + vid_weight *
      vid_loss`.
    - with an empty cache or `use_cache=True` (generate()'s prefill): the compressed prefill into an `ETCCache`;
      `logits` `(batch_size, n, vocab_size)` are those of each row's last n = max(1, logits_to_keep) tokens (tokens
      of the text after the last image).
    - with an `ETCCache` that holds a prefill: decoding. `attention_mask` and `position_ids` (2-D, or 3-D with 3 or 4
      rows as generate() makes them) are in the user's layout and are mapped onto the compacted cache.
    - `etc_prefill_method` ("auto", "segmented" or "masked"; default `self.etc.prefill_method`) picks the prefill.
    """

    etc_base_class = Qwen3VLForConditionalGeneration
    etc_output_class = ETCQwen3VLCausalLMOutputWithPast

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        """generate()'s M-RoPE positions of the prompt. From inputs_embeds Qwen3-VL's generate() gives text positions
        (its `get_rope_index` takes ids, for their shape only); ETC's prefill of an image prompt needs the M-RoPE
        ones: compute them from the placeholder ids of the embeddings."""
        etc = getattr(self, "etc", None)
        if etc is not None and etc.enabled and inputs_tensor.dim() == 3 and inputs_tensor.is_floating_point():
            inputs_tensor = self._etc_placeholder_ids(None, inputs_tensor)  # (B, L)
        return super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)

    # ---------------------------------------------------------------------------------------------- adapter
    @classmethod
    def etc_visual_token_count(cls, config):
        grid = decoder_position_grid(config)
        return grid[0] * grid[1], grid

    def _etc_vision_tower(self) -> nn.Module:
        return self.model.visual  # with the mergers (Qwen3-VL's projector)

    def _etc_encode(self, pixel_inputs: dict, encoded: dict) -> tuple:
        return encode_visual_inputs(self.model, pixel_inputs, encoded)

    def _etc_num_images(self, visual_inputs: dict) -> int:
        return count_images(visual_inputs)

    def _etc_select_images(self, visual_inputs: dict, index: list) -> dict:
        return select_images(visual_inputs, index)

    def _etc_decode_inputs(self, input_ids, attention_mask, position_ids, cache) -> dict:
        # For text on a compressed cache, positions follow from the cache itself: generate()'s come from the rope
        # deltas it keeps on the model, stale after a prompt of another conversation.
        if not bool(self._visual_token_mask(input_ids).any()):
            position_ids = None
        return super()._etc_decode_inputs(input_ids, attention_mask, position_ids, cache)

    def _etc_prepare(
        self, input_ids, attention_mask, position_ids, visual_inputs: dict, user_embeds=None
    ) -> ETCQwen3VLInputs:  # fmt: skip
        """Vision features, the images' spans, M-RoPE positions, the extended layout, embeddings (the text's from
        `user_embeds` when the user gave inputs_embeds) and DeepStack."""
        mm_token_type_ids = align_mm_token_type_ids(visual_inputs["mm_token_type_ids"], input_ids.shape[1])
        encoded = visual_inputs["encoded"]
        pixel_inputs = {name: visual_inputs[name] for name in PIXEL_INPUTS}
        image_mask = input_ids == self.config.image_token_id  # (B, L)
        video_mask = input_ids == self.config.video_token_id
        visual_token_mask = image_mask | video_mask
        image_outputs, video_outputs = self._etc_encode(pixel_inputs, encoded)
        features = flatten_features(image_outputs, video_outputs)
        image_counts = [] if image_outputs is None else [f.shape[0] for f in image_outputs.pooler_output]
        video_counts = [] if video_outputs is None else [f.shape[0] for f in video_outputs.pooler_output]
        spans, kinds, sources = visual_spans(image_mask, video_mask, image_counts, video_counts)
        # after the placeholders' check: a prompt without its pixel values is told so first
        check_mm_token_type_ids(mm_token_type_ids, image_mask, video_mask)
        grids = span_grids(
            spans, kinds, sources, pixel_inputs["image_grid_thw"], pixel_inputs["video_grid_thw"],
            self.config.vision_config.spatial_merge_size, image_outputs is not None, video_outputs is not None,
        )  # fmt: skip

        position_ids = self._etc_user_positions(
            input_ids, attention_mask, position_ids, mm_token_type_ids, pixel_inputs, image_counts, video_counts
        )
        embeds, user_deepstack = scatter_features(
            user_embeddings(self.get_input_embeddings(), input_ids, user_embeds), image_mask, video_mask, features
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
            inputs_embeds=layout.embed(embeds, self.etc.compression_tokens()),
            visual_token_mask=visual_token_mask,
            position_ids=position_ids,
            token_inputs=token_inputs,
            grids=grids,
            encoder_outputs={"image_outputs": image_outputs, "video_outputs": video_outputs},
            teacher_inputs={"features": features, "pixel_inputs": pixel_inputs},
            mm_token_type_ids=layout.extend(mm_token_type_ids, MM_TEXT),
            user_embeds=user_embeds,
        )

    def _etc_user_positions(
        self, input_ids, attention_mask, position_ids, mm_token_type_ids, pixel_inputs, image_counts, video_counts
    ) -> torch.Tensor:
        return user_positions(
            self.model, input_ids, attention_mask, position_ids, mm_token_type_ids, pixel_inputs, image_counts,
            video_counts,
        )  # fmt: skip

    def _etc_token_kwargs(self, deepstack=None, visual_mask=None) -> dict:
        """DeepStack: the features `(B, S, K, H)` of the tokens in `visual_mask` `(B, S)`, as the language model
        takes them."""
        if deepstack is None or not bool(visual_mask.any()):
            return {"visual_pos_masks": None, "deepstack_visual_embeds": None}
        return {
            "visual_pos_masks": visual_mask,
            "deepstack_visual_embeds": list(deepstack[visual_mask].unbind(1)),  # K x (n_visual, H)
        }

    def _etc_teacher_modules(self, peft_layers=None) -> dict:
        # The vision tower too when it (or its mergers) trains, or holds adapters: the teacher encodes with its own.
        modules = {"language_model": self.model.language_model}
        if module_trains(self.model.visual, peft_layers):
            modules["visual"] = self.model.visual
        return modules

    def _etc_teacher_inputs(self, prepared: "ETCQwen3VLInputs", input_ids, modules: dict):
        features = prepared.teacher_inputs["features"]
        if "visual" in modules:
            features = encode_with(modules["visual"], prepared.teacher_inputs["pixel_inputs"], features)
        image_mask = input_ids == self.config.image_token_id
        video_mask = input_ids == self.config.video_token_id
        text_embeds = user_embeddings(modules["language_model"].get_input_embeddings(), input_ids, prepared.user_embeds)
        inputs_embeds, deepstack = scatter_features(text_embeds, image_mask, video_mask, detached(features))
        return inputs_embeds, {"deepstack": deepstack, "visual_mask": prepared.visual_token_mask}

    def _etc_decoder_grids(self, prepared: "ETCQwen3VLInputs"):
        if prepared.grids is None:
            raise ValueError(
                "ETC distillation on Qwen3-VL needs image_grid_thw / video_grid_thw: the decoder predicts each "
                "image's grid of visual tokens"
            )
        return prepared.grids

    def _etc_text_positions(self, positions: torch.Tensor) -> torch.Tensor:
        return positions[None].expand(3, -1, -1) if positions.dim() == 2 else positions  # the same on 3 axes


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
    return common.install_etc(model, config, ETCQwen3VLForConditionalGeneration)


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
    visual_inputs = dict(
        pixel_values=pixel_values,
        image_grid_thw=image_grid_thw,
        pixel_values_videos=pixel_values_videos,
        video_grid_thw=video_grid_thw,
        mm_token_type_ids=mm_token_type_ids,
        encoded={},
    )
    return base._etc_prepare(input_ids, attention_mask, position_ids, visual_inputs)


def instruction_target(model: nn.Module, input_ids: torch.Tensor, labels=None, **inputs) -> dict:
    """The distillation target of a batch and its parts, for inspection and tests (no grad).

    `inputs` are the processor's outputs besides input_ids (attention_mask, mm_token_type_ids, pixel_values,
    image_grid_thw, ...). Returns a dict with `scores` and `target`, lists over the images (and video temporal
    groups) in sequence order of `(N_i,)` (text-to-image attention, before min-max) and X^ `(N_i, D)`,
    `instruction_index` `(I, T)` (user positions) and `spans` (the `ImageSpans`).
    """
    with torch.no_grad():
        prepared = prepare_inputs(model, input_ids, **inputs)
    parts = unwrap_peft(model)._etc_instruction_target(prepared, input_ids, inputs.get("attention_mask"), labels)
    parts["spans"] = prepared.spans
    return parts


# Written once for every backbone (etc_ext.models.common).
remove_etc = common.uninstall_etc
save_pretrained = common.save_pretrained
from_pretrained = common.from_pretrained
snapshot_teacher = common.snapshot_teacher
