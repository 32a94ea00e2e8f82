"""Prefill time and KV-cache bytes of ETC on a tiny random LLaVA-1.5 (real transformers classes, no downloads).

Compares, for the same left-padded batch (shared prompt prefix, questions of different lengths):
  - the uncompressed model (ETC disabled: exactly the original LLaVA), prefill into a DynamicCache;
  - ETC's segmented two-pass prefill (plain causal passes + compaction of every cache layer);
  - ETC's masked single pass (4-D bottleneck mask) followed by compaction;
and the KV-cache bytes after the prefill (full vs M compression tokens per image).

    python bench/bench_llava_prefill.py                      # defaults: N = 576 visual tokens, CPU
    python bench/bench_llava_prefill.py --image-size 16 --patch-size 4   # the test-size model (N = 16)
"""

import argparse

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import etc_ext  # noqa: F401
from common import chat_batch, compare_prefills, parse_prefill_arguments
from etc_ext.models.llava import apply_etc

IMAGE_TOKEN = 250


def build_model(args) -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=args.vision_hidden_size,
        intermediate_size=4 * args.vision_hidden_size,
        num_hidden_layers=args.vision_layers,
        num_attention_heads=4,
        image_size=args.image_size,
        patch_size=args.patch_size,
    )
    text = LlamaConfig(
        hidden_size=args.hidden_size,
        intermediate_size=4 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        vocab_size=256,
        max_position_embeddings=4096,
        pad_token_id=0,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN)
    model = LlavaForConditionalGeneration(config).to(args.device, getattr(torch, args.dtype))
    model.set_attn_implementation("sdpa")
    return model.eval()


def build_batch(args, num_visual: int) -> dict:
    input_ids, attention_mask, generator = chat_batch(args, [IMAGE_TOKEN] * num_visual)
    pixel_values = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator)
    return {
        "input_ids": input_ids.to(args.device),
        "attention_mask": attention_mask.to(args.device),
        "pixel_values": pixel_values.to(args.device, getattr(torch, args.dtype)),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=336)
    parser.add_argument("--patch-size", type=int, default=14)
    parser.add_argument("--vision-hidden-size", type=int, default=64)
    parser.add_argument("--vision-layers", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--text-before", type=int, default=5)
    parser.add_argument("--text-after", type=int, default=40)
    args = parse_prefill_arguments(parser)

    model = build_model(args)
    num_visual = (args.image_size // args.patch_size) ** 2
    inputs = build_batch(args, num_visual)
    text = model.config.text_config
    description = f"tiny LLaVA: LLM {text.num_hidden_layers} layers x hidden {text.hidden_size}"
    compare_prefills(model, apply_etc, inputs, args, description, num_visual)


if __name__ == "__main__":
    main()
