"""Analytic cost of a VLM prompt with and without ETC: KV-cache bytes and FLOPs.

The model sizes come from real transformers config classes; parameter counts from the real
model classes instantiated on the meta device (no memory, no weights). The FLOP model counts
the matmuls (2 FLOPs per multiply-add) of the linear layers and of attention; norms,
activations and softmax are left out (a few percent).

    python -m etc_ext.cost            # LLaVA-1.5-7B and Qwen3-VL-2B, full vs ETC
"""

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = [
    "llava_1_5_7b_config",
    "qwen3_vl_2b_config",
    "TextModelShape",
    "kv_cache_bytes",
    "prefill_flops",
    "decode_flops",
    "count_parameters",
]


def llava_1_5_7b_config():
    """LlavaConfig of llava-hf/llava-1.5-7b-hf (Vicuna-7B + CLIP ViT-L/14 at 336 px)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(
        vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
    )
    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768,
    )
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000,
                       vision_feature_layer=-2, vision_feature_select_strategy="default")


def qwen3_vl_2b_config():
    """Qwen3VLConfig of Qwen/Qwen3-VL-2B-Instruct (a Qwen3-1.7B LLM: 28 layers, 16 query heads
    on 8 kv heads of 128; a 24-layer ViT with patch 16, 2x2 merge and DeepStack)."""
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
            num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
            rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True},
        ),
        vision_config=dict(
            depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16,
            spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=2048,
            deepstack_visual_indexes=[5, 11, 17],
        ),
        tie_word_embeddings=True,
    )


@dataclass
class TextModelShape:
    """What the cost of the LLM depends on."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def from_config(cls, text_config) -> "TextModelShape":
        heads = text_config.num_attention_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        return cls(
            num_layers=text_config.num_hidden_layers,
            hidden_size=text_config.hidden_size,
            num_heads=heads,
            num_kv_heads=getattr(text_config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            intermediate_size=text_config.intermediate_size,
            vocab_size=text_config.vocab_size,
        )

    @property
    def linear_params_per_layer(self) -> int:
        """q, k, v, o projections and the gated MLP (gate, up, down)."""
        attn = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.hidden_size * self.intermediate_size
        return attn + mlp


def kv_cache_bytes(shape: TextModelShape, num_tokens: int, bytes_per_value: int = 2) -> int:
    """Bytes of keys and values cached for num_tokens positions in every layer."""
    return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * num_tokens * bytes_per_value


def _attention_flops(shape: TextModelShape, query_context_pairs: int) -> int:
    # q.k^T and p.v: 2 matmuls of head_dim multiply-adds per (query, key) pair and head.
    return 2 * 2 * shape.num_layers * shape.num_heads * shape.head_dim * query_context_pairs


def prefill_flops(
    shape: TextModelShape,
    num_prefix: int,
    num_visual: int,
    num_text: int,
    num_compression: Optional[int] = None,
) -> int:
    """LLM FLOPs of the prefill of `[prefix ; V ; (Z) ; text]` (one image).

    Without compression (num_compression=None) every token attends causally to all earlier
    ones. With ETC, pass 1 runs `[prefix ; V ; Z]` causally and pass 2 runs the text against
    `[prefix ; Z]` plus the earlier text: every token still goes through the LLM once (the
    visual tokens are read, through Z), and only the text's attention context shrinks.
    """
    linear_per_token = 2 * shape.num_layers * shape.linear_params_per_layer
    if num_compression is None:
        total = num_prefix + num_visual + num_text
        pairs = total * (total + 1) // 2
        return linear_per_token * total + _attention_flops(shape, pairs)
    first = num_prefix + num_visual + num_compression
    pairs = first * (first + 1) // 2
    kept = num_prefix + num_compression
    pairs += sum(kept + i + 1 for i in range(num_text))
    return linear_per_token * (first + num_text) + _attention_flops(shape, pairs)


def decode_flops(shape: TextModelShape, context: int) -> int:
    """LLM FLOPs of one decoded token attending to `context` cached positions (+ LM head)."""
    linear = 2 * shape.num_layers * shape.linear_params_per_layer + 2 * shape.hidden_size * shape.vocab_size
    return linear + _attention_flops(shape, context + 1)


def count_parameters(config) -> dict:
    """Parameter counts of the real model class built on the meta device (no memory)."""
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    counts = {"total": sum(p.numel() for p in model.parameters())}
    vision = getattr(model.model, "vision_tower", None) or getattr(model.model, "visual", None)
    counts["vision"] = sum(p.numel() for p in vision.parameters())
    counts["language_model"] = sum(p.numel() for p in model.model.language_model.parameters())
    return counts


def _report(name, config, num_prefix, num_visual, num_text, compression=(1, 4, 16)):
    shape = TextModelShape.from_config(config.text_config)
    params = count_parameters(config)
    full_tokens = num_prefix + num_visual + num_text
    print(f"\n{name}: {params['total'] / 1e9:.2f} B parameters (LLM {params['language_model'] / 1e9:.2f} B, "
          f"vision {params['vision'] / 1e9:.2f} B); prompt = {num_prefix} prefix + {num_visual} visual + {num_text} text tokens")
    print(f"{'method':<12}{'cached tokens':>14}{'KV bf16 MiB':>13}{'KV fp32 MiB':>13}{'prefill TFLOPs':>16}{'decode GFLOPs/tok':>19}")
    rows = [("full", None)] + [(f"ETC M={m}", m) for m in compression]
    for label, m in rows:
        cached = full_tokens if m is None else num_prefix + m + num_text
        print(
            f"{label:<12}{cached:>14}{kv_cache_bytes(shape, cached, 2) / 2**20:>13.1f}"
            f"{kv_cache_bytes(shape, cached, 4) / 2**20:>13.1f}"
            f"{prefill_flops(shape, num_prefix, num_visual, num_text, m) / 1e12:>16.3f}"
            f"{decode_flops(shape, cached) / 1e9:>19.2f}"
        )


def main():
    _report("LLaVA-1.5-7B", llava_1_5_7b_config(), num_prefix=35, num_visual=576, num_text=40)
    _report("Qwen3-VL-2B", qwen3_vl_2b_config(), num_prefix=14, num_visual=1024, num_text=30)


if __name__ == "__main__":
    main()
