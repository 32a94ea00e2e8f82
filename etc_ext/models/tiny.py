"""A tiny LLaVA-1.5 model with random weights, built from the real transformers classes, for tests and the demo.

`build_tiny_llava(processor)` returns a `LlavaForConditionalGeneration` whose configuration matches the demo processor
of `etc_ext.data.build_processor`: a CLIP vision tower reading `image_size` px images in `patch_size` px patches
(168 / 14 -> 12 x 12 = 144 visual tokens per image with `vision_feature_select_strategy="default"`, which drops the
CLS feature), a Llama language model with `len(tokenizer)` tokens, and `image_token_id` / pad / bos / eos ids taken
from the tokenizer. `save_tiny_llava(dir)` writes model and processor with `save_pretrained`, so that
`AutoModelForImageTextToText.from_pretrained(dir)` / `AutoProcessor.from_pretrained(dir)` (and `etc-ext train --model
dir`) load them.

Command line: `python -m etc_ext.models.tiny --out DIR [--seed S] [--text-hidden-size 128 ...]`.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass

import torch


@dataclass
class TinyLlavaSizes:
    """Sizes of the tiny model; the defaults give about 0.32 M parameters (0.12 M without the embeddings).

    Attributes:
        vision_hidden_size, vision_intermediate_size, vision_layers, vision_heads: the CLIP vision tower.
        text_hidden_size, text_intermediate_size, text_layers, text_heads, text_kv_heads: the Llama language model
            (grouped-query attention when `text_kv_heads < text_heads`).
        max_position_embeddings: longest sequence the language model accepts.
    """

    vision_hidden_size: int = 32
    vision_intermediate_size: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden_size: int = 64
    text_intermediate_size: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    max_position_embeddings: int = 2048


def tiny_llava_config(processor, sizes: TinyLlavaSizes | None = None):
    """A `LlavaConfig` (with `CLIPVisionConfig` and `LlamaConfig` sub-configs) matched to `processor`.

    Args:
        processor: a `LlavaProcessor` (e.g. `etc_ext.data.build_processor()`); its image crop size, patch size,
            feature-select strategy and tokenizer fix the image size, patch size, strategy, vocabulary and special
            token ids of the model.
        sizes: widths and depths (`TinyLlavaSizes()` by default).
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    sizes = sizes or TinyLlavaSizes()
    tokenizer = processor.tokenizer
    crop = processor.image_processor.crop_size
    if crop["height"] != crop["width"]:
        raise ValueError(f"the tiny model reads square images, the processor crops to {crop}")
    if tokenizer.image_token_id is None:
        raise ValueError("the processor's tokenizer has no image token (tokenizer.image_token_id is None)")
    if processor.num_additional_image_tokens != 1:
        raise ValueError(
            "the tiny model's CLIP tower adds one CLS token: build the processor with num_additional_image_tokens=1, "
            f"got {processor.num_additional_image_tokens}"
        )
    vision_config = CLIPVisionConfig(
        image_size=crop["height"],
        patch_size=processor.patch_size,
        hidden_size=sizes.vision_hidden_size,
        intermediate_size=sizes.vision_intermediate_size,
        num_hidden_layers=sizes.vision_layers,
        num_attention_heads=sizes.vision_heads,
        projection_dim=sizes.vision_hidden_size,
    )
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=sizes.text_hidden_size,
        intermediate_size=sizes.text_intermediate_size,
        num_hidden_layers=sizes.text_layers,
        num_attention_heads=sizes.text_heads,
        num_key_value_heads=sizes.text_kv_heads,
        max_position_embeddings=sizes.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.image_token_id,
        vision_feature_select_strategy=processor.vision_feature_select_strategy,
        vision_feature_layer=-2,  # LLaVA-1.5 reads the second to last CLIP layer
        projector_hidden_act="gelu",
        image_seq_length=_num_image_tokens(processor),
        pad_token_id=tokenizer.pad_token_id,
    )


def _num_image_tokens(processor) -> int:
    from ..data import num_image_tokens

    return num_image_tokens(processor)


def build_tiny_llava(processor=None, sizes: TinyLlavaSizes | None = None, seed: int = 0):
    """Builds the tiny LLaVA with random weights (deterministic given `seed` and the sizes).

    Args:
        processor: the processor to match (default: `etc_ext.data.build_processor()`, 168 px images, patch 14).
        sizes: widths and depths, `TinyLlavaSizes()` by default.
        seed: seed of the weight initialisation (the global torch RNG is left as it was).

    Returns:
        `(model, processor)`: a `LlavaForConditionalGeneration` in float32 and eval mode, with SDPA attention, and
        the processor. Its generation config stops at the tokenizer's EOS and pads with its pad token.
    """
    from transformers import LlavaForConditionalGeneration

    if processor is None:
        from ..data import build_processor

        processor = build_processor()
    config = tiny_llava_config(processor, sizes)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.bos_token_id = processor.tokenizer.bos_token_id
    n_visual = _num_image_tokens(processor)
    expected = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    if config.vision_feature_select_strategy == "full":
        expected += 1
    if n_visual != expected:  # processor and model must agree on the number of <image> tokens per image
        raise ValueError(f"the processor expands an image into {n_visual} tokens, the model yields {expected}")
    return model.eval(), processor


def save_tiny_llava(
    output_dir: str | os.PathLike, processor=None, sizes: TinyLlavaSizes | None = None, seed: int = 0
) -> str:
    """Builds the tiny LLaVA and writes it with its processor to `output_dir` (`save_pretrained`, safetensors).
    Returns `output_dir`."""
    model, processor = build_tiny_llava(processor, sizes, seed)
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return os.fspath(output_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m etc_ext.models.tiny",
        description="Write a tiny random LLaVA-1.5 (CLIP + Llama) and its demo processor to a folder.",
    )
    parser.add_argument("--out", required=True, help="output folder (model and processor, save_pretrained format)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--image-size", type=int, default=168, help="image side in pixels")
    parser.add_argument("--patch-size", type=int, default=14, help="patch side of the vision tower")
    for name, value in asdict(TinyLlavaSizes()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=value)
    args = parser.parse_args(argv)

    from ..data import build_processor

    processor = build_processor(args.image_size, args.patch_size)
    sizes = TinyLlavaSizes(**{name: getattr(args, name) for name in asdict(TinyLlavaSizes())})
    path = save_tiny_llava(args.out, processor, sizes, args.seed)
    print(path)


if __name__ == "__main__":
    main()
