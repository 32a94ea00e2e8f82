"""vLLM's prompt processing for ETC LLaVA: each image becomes M placeholder tokens instead of N.

vLLM tokenizes the user's prompt (one `<image>` token per image) and calls the Hugging Face image processor on the
images; the prompt update below then replaces every `<image>` token with M copies of it (the compression tokens'
slots), or with N copies for a model served without compression (M = 0: plain LLaVA). So a request's KV cache
holds prefix + M per image + text, never the N visual tokens.

Written against vLLM's own LLaVA processor (vllm/model_executor/models/llava.py) without importing it: that module
imports Pixtral's, which needs torchvision, and the CPU wheels of vLLM run without torchvision.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from transformers import BatchFeature, LlavaConfig
from transformers.models.llava import LlavaProcessor
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ImageSize, MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)

from .config import etc_settings


class ETCLlavaProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self) -> LlavaConfig:
        return self.ctx.get_hf_config(LlavaConfig)

    def get_hf_processor(self, **kwargs: object) -> LlavaProcessor:
        return self.ctx.get_hf_processor(LlavaProcessor, **kwargs)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_num_image_tokens(self, *, image_width: int = 0, image_height: int = 0) -> int:
        """The prompt slots of one image: M with compression, N without (images are resized to one size)."""
        settings = etc_settings(self.get_hf_config())
        return settings.num_compression_tokens or settings.num_visual_tokens

    def get_image_size_with_most_features(self) -> ImageSize:
        size = self.get_hf_config().vision_config.image_size
        return ImageSize(width=size, height=size)

    def get_max_image_tokens(self) -> int:
        return self.get_num_image_tokens()


class ETCLlavaDummyInputsBuilder(BaseDummyInputsBuilder[ETCLlavaProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return self.info.get_hf_processor().image_token * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        size = self.info.get_image_size_with_most_features()
        overrides = mm_options.get("image") if mm_options else None
        images = self._get_dummy_images(width=size.width, height=size.height,
                                        num_images=mm_counts.get("image", 0), overrides=overrides)  # fmt: skip
        return {"image": images}


class ETCLlavaMultiModalProcessor(BaseMultiModalProcessor[ETCLlavaProcessingInfo]):
    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {"pixel_values": MultiModalFieldConfig.batched("image")}

    def _get_prompt_updates(
        self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object], out_mm_kwargs
    ) -> Sequence[PromptUpdate]:
        image_token_id = self.info.get_hf_config().image_token_index
        slots = self.info.get_num_image_tokens()
        return [PromptReplacement(modality="image", target=[image_token_id], replacement=[image_token_id] * slots)]

    def apply(self, inputs, timing_ctx):
        """vLLM's processing, then a check that the request's positions fit the language model's RoPE table: with
        compression every image moves later tokens N positions on, so a prompt of max_model_len tokens with k images
        reaches position max_model_len + k * N (vLLM itself checks only the prompt's length)."""
        result = super().apply(inputs, timing_ctx)
        settings = etc_settings(self.info.get_hf_config())
        if settings.compresses:
            images = len(result["mm_placeholders"].get("image", []))
            limit = self.info.get_hf_config().text_config.max_position_embeddings
            furthest = self.info.ctx.model_config.max_model_len + images * settings.num_visual_tokens
            if images and furthest > limit:
                raise ValueError(
                    f"a request with {images} image(s) may reach position {furthest} (max_model_len "
                    f"{self.info.ctx.model_config.max_model_len} + {images} x {settings.num_visual_tokens} visual "
                    f"positions), past the model's max_position_embeddings {limit}: serve with a max_model_len of at "
                    f"most {limit - images * settings.num_visual_tokens} or send fewer images"
                )
        return result
