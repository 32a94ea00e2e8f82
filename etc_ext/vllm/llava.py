"""ETC LLaVA-1.5 as a vLLM model: the vision tower and projector on the full image, M compression tokens per image in
the prompt and the KV cache, their states computed by the compression sub-forward (`compression.py`).

Served from a folder `etc-ext export-vllm` writes (architecture `ETCLlavaForConditionalGeneration`): Hugging Face
LLaVA weights plus `etc.compression_tokens.weight`, and `etc_compression` in config.json. With
`num_compression_tokens = 0` the same class serves the model without compression (N slots per image, as vLLM's own
LLaVA), which is what the serving benchmark compares against.

Positions keep ETC's gap: a compression token or text token after an image sits N positions further than its index
in the prompt (the positions of the uncompressed sequence, as in training and in etc-ext's `generate()`). vLLM
computes custom positions only for M-RoPE models, so the export declares a top-level `mrope_section` and
`get_mrope_input_positions` returns the gapped positions on all three rows; the language model reads the first row
with its ordinary 1-D RoPE.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.activation import get_act_fn
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.models.clip import CLIPVisionModel
from vllm.model_executor.models.interfaces import SupportsMRoPE, SupportsMultiModal
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY

from .compression import (
    CompressionSubForward,
    PendingImage,
    initial_side_hidden,
    override_rows,
    plan_side_sequence,
)
from .config import etc_settings
from .processing import ETCLlavaDummyInputsBuilder, ETCLlavaMultiModalProcessor, ETCLlavaProcessingInfo


class LlavaProjector(nn.Module):
    """LLaVA-1.5's two-layer MLP projector (`multi_modal_projector`)."""

    def __init__(self, vision_hidden_size: int, text_hidden_size: int, act: str, bias: bool, prefix: str = ""):
        super().__init__()
        self.linear_1 = ColumnParallelLinear(vision_hidden_size, text_hidden_size, bias=bias,
                                             prefix=f"{prefix}.linear_1")  # fmt: skip
        self.act = get_act_fn(act)
        self.linear_2 = RowParallelLinear(text_hidden_size, text_hidden_size, bias=bias, prefix=f"{prefix}.linear_2")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.linear_1(features)
        hidden, _ = self.linear_2(self.act(hidden))
        return hidden


def _vision_layers_needed(config) -> int:
    """The tower runs up to the layer LLaVA reads (`vision_feature_layer`, e.g. -2: the second to last)."""
    layer, total = config.vision_feature_layer, config.vision_config.num_hidden_layers
    if not isinstance(layer, int):
        raise NotImplementedError(f"vision_feature_layer must be one layer index for ETC LLaVA, got {layer!r}")
    return layer + total + 1 if layer < 0 else layer


@MULTIMODAL_REGISTRY.register_processor(
    ETCLlavaMultiModalProcessor, info=ETCLlavaProcessingInfo, dummy_inputs=ETCLlavaDummyInputsBuilder
)
class ETCLlavaForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsMRoPE):
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    # checkpoint names -> this module's: transformers 5 writes LLaVA's legacy names (`vision_tower.*` without CLIP's
    # `vision_model.`, `language_model.model.*`, `language_model.lm_head.*`); its in-memory names are mapped too
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_regex={re.compile(r"^(model\.)?vision_tower\.(?!vision_model\.)"): "vision_tower.vision_model."},
        orig_to_new_prefix={
            "model.language_model.": "language_model.model.",
            "model.multi_modal_projector.": "multi_modal_projector.",
            "lm_head.": "language_model.lm_head.",
            "etc.compression_tokens.weight": "compression_tokens",
        },
    )

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return "<image>"
        raise ValueError(f"ETC LLaVA takes images only, got modality {modality!r}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.settings = etc_settings(config)
        self.configure_mm_token_handling(vocab_size=config.text_config.vocab_size,
                                         mm_token_ids=[config.image_token_index])  # fmt: skip
        if config.vision_feature_select_strategy not in ("default", "full"):
            raise NotImplementedError("ETC LLaVA in vLLM takes vision_feature_select_strategy 'default' or 'full', got "
                                      f"{config.vision_feature_select_strategy!r}")  # fmt: skip
        with self._mark_tower_model(vllm_config, "image"):
            self.vision_tower = CLIPVisionModel(config.vision_config, vllm_config.quant_config,
                                                num_hidden_layers_override=_vision_layers_needed(config),
                                                require_post_norm=False, prefix=maybe_prefix(prefix, "vision_tower"))  # fmt: skip
            self.multi_modal_projector = LlavaProjector(
                config.vision_config.hidden_size, config.text_config.hidden_size, config.projector_hidden_act,
                getattr(config, "multimodal_projector_bias", True), prefix=maybe_prefix(prefix, "multi_modal_projector"),
            )  # fmt: skip
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(vllm_config=vllm_config, hf_config=config.text_config,
                                                             prefix=maybe_prefix(prefix, "language_model"))  # fmt: skip
        self.dtype = vllm_config.model_config.dtype
        if self.settings.compresses:  # [M, hidden], from the checkpoint's etc_compression.safetensors
            tokens = torch.empty(self.settings.num_compression_tokens, config.text_config.hidden_size, dtype=self.dtype)
            self.compression_tokens = nn.Parameter(tokens, requires_grad=False)
        self.sub_forward = CompressionSubForward()
        self._pending: list[PendingImage] = []  # set by embed_input_ids, consumed by the forward of the same step

    # --- images -------------------------------------------------------------------------------------------------
    def embed_multimodal(self, **kwargs: object):
        pixel_values = kwargs.pop("pixel_values", None)
        if pixel_values is None:
            return []
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.stack(list(pixel_values))
        features = self.vision_tower(pixel_values.to(self.dtype),
                                     feature_select_strategy=self.config.vision_feature_select_strategy)  # fmt: skip
        visual = self.multi_modal_projector(features)  # [images, N, H]
        if visual.shape[1] != self.settings.num_visual_tokens:
            raise ValueError(f"the vision tower gave {visual.shape[1]} tokens per image, the export says "
                             f"num_visual_tokens={self.settings.num_visual_tokens}")  # fmt: skip
        if not self.settings.compresses:
            return list(visual)
        return [self._pack(image) for image in visual]

    def _pack(self, visual: torch.Tensor) -> torch.Tensor:
        """One image's encoder output for vLLM: one row per compression-token slot, `[M, 1 + N * H]`: the slot's
        index, then all N visual embeddings. vLLM hands the model the rows of the slots scheduled in a step, so every
        row carries what the sub-forward needs even when a prefix-cache hit covered the first slots."""
        m = self.settings.num_compression_tokens
        index = torch.arange(m, dtype=visual.dtype, device=visual.device)[:, None]
        return torch.cat([index, visual.reshape(1, -1).expand(m, -1)], dim=1)

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings=None, *,
                        is_multimodal: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        embeds = self._embed_text_input_ids(input_ids, self.language_model.embed_input_ids,
                                            is_multimodal=is_multimodal)  # fmt: skip
        self._pending = []
        if multimodal_embeddings is None or len(multimodal_embeddings) == 0 or is_multimodal is None:
            return embeds
        rows = torch.nonzero(is_multimodal.to(embeds.device)).squeeze(1)
        if not self.settings.compresses:
            embeds[rows] = torch.cat(list(multimodal_embeddings)).to(embeds.dtype)
            return embeds
        start = 0
        hidden = self.config.text_config.hidden_size
        for item in multimodal_embeddings:  # the scheduled rows of one image's packed output, in prompt order
            count = item.shape[0]
            item_rows = rows[start:start + count]
            start += count
            first = int(item[0, 0])
            embeds[item_rows] = self.compression_tokens[first:first + count].to(embeds.dtype)
            visual = item[0, 1:].view(self.settings.num_visual_tokens, hidden)
            self._pending.append(PendingImage(item_rows, first, visual))
        if start != rows.numel():
            raise RuntimeError(f"{rows.numel()} image slots in the step but {start} rows of image embeddings")
        return embeds

    # --- positions ----------------------------------------------------------------------------------------------
    def get_mrope_input_positions(self, input_tokens: list[int], mm_features) -> tuple[torch.Tensor, int]:
        """Gapped positions on all three rows (see the module docstring), and the decode offset."""
        gap = self.settings.num_visual_tokens if self.settings.compresses else 0
        shift = torch.zeros(len(input_tokens), dtype=torch.int64)
        for feature in mm_features:
            shift[feature.mm_position.offset:] += gap
        positions = torch.arange(len(input_tokens), dtype=torch.int64) + shift
        return positions.expand(3, -1).clone(), int(gap * len(mm_features))

    # --- language model -----------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, **kwargs: object) -> torch.Tensor:  # fmt: skip
        positions = positions[0] if positions.dim() == 2 else positions
        pending, self._pending = self._pending, []
        model = self.language_model.model
        layers = list(model.layers[model.start_layer:model.end_layer])
        metadata = self._attention_metadata(layers[0]) if pending else None
        if metadata is None:  # no image compressed in this step (decode, text, warm-up runs)
            return model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)
        hidden = inputs_embeds if inputs_embeds is not None else model.embed_input_ids(input_ids)
        first = layers[0].self_attn  # its cache reader checks the layout before anything is planned on it
        reader = self.sub_forward.reader(first.attn, first.attn.kv_cache, first.num_kv_heads, first.head_dim)
        side = plan_side_sequence(pending, positions, metadata, reader.block_size,
                                  self.settings.num_visual_tokens, self.settings.num_compression_tokens)  # fmt: skip
        side_hidden = initial_side_hidden(pending, self.compression_tokens)
        residual = None
        for layer in layers:
            override_rows(hidden, residual, side, side_hidden)
            hidden, residual = layer(positions, hidden, residual)
            attention = layer.self_attn.attn
            side_hidden = self.sub_forward.layer(layer, side_hidden, side, attention.kv_cache, attention)
        override_rows(hidden, residual, side, side_hidden)
        hidden, _ = model.norm(hidden, residual)
        return hidden

    @staticmethod
    def _attention_metadata(layer):
        metadata = get_forward_context().attn_metadata
        if isinstance(metadata, list):
            metadata = metadata[0]
        if isinstance(metadata, dict):
            metadata = metadata.get(layer.self_attn.attn.layer_name)
        return metadata

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loader = AutoWeightsLoader(self)
        return loader.load_weights(weights, mapper=self.hf_to_vllm_mapper)
