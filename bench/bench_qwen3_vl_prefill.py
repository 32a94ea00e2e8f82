"""Prefill time and KV-cache bytes of ETC on a tiny random Qwen3-VL (real transformers classes, no downloads), and
the analytic KV-cache bytes of Qwen3-VL-2B (its real config on the meta device, `etc_ext.cost`).

Compares, for the same left-padded batch (shared prompt prefix, one image of N visual tokens per row, questions of
different lengths), the language-model prefill with the images already encoded (the vision tower's work is the same
for every variant; generate() also encodes before the prefill and passes `mm_encoder_outputs`):
  - the uncompressed model (ETC disabled: exactly the original Qwen3-VL), prefill into a DynamicCache;
  - ETC's segmented two-pass prefill (plain causal passes + compaction of every cache layer);
  - ETC's masked single pass (4-D bottleneck mask) followed by compaction;
and the KV-cache bytes after the prefill (full vs M compression tokens per image).

    python bench/bench_qwen3_vl_prefill.py                        # N = 1024 visual tokens (64 x 64 patches), CPU
    python bench/bench_qwen3_vl_prefill.py --grid 8 12 --repeats 3   # N = 24, the test-size image

On a shared CPU pass `--threads 1`: intra-op threads on a loaded machine mostly measure contention.
"""

import argparse

import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

import etc_ext  # noqa: F401
from common import chat_batch, compare_prefills, parse_prefill_arguments
from etc_ext.cost import TextModelShape, kv_cache_bytes, qwen3_vl_2b_config
from etc_ext.models.qwen3_vl import apply_etc

PAD, IMAGE, VIDEO, VISION_START, VISION_END = 0, 250, 251, 252, 253


def build_model(args) -> Qwen3VLForConditionalGeneration:
    torch.manual_seed(0)
    half = args.head_dim // 2  # M-RoPE sections (t, h, w) over head_dim / 2 frequencies, 2B's proportions
    sections = [half - 2 * (half * 5 // 16), half * 5 // 16, half * 5 // 16]
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=256, hidden_size=args.hidden_size, intermediate_size=3 * args.hidden_size,
            num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
            head_dim=args.head_dim, max_position_embeddings=8192, pad_token_id=PAD,
            rope_parameters={
                "rope_type": "default", "rope_theta": 5e6, "mrope_section": sections, "mrope_interleaved": True
            },
        ),
        vision_config=dict(
            depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=2, spatial_merge_size=2,
            temporal_patch_size=2, out_hidden_size=args.hidden_size, num_position_embeddings=256,
            deepstack_visual_indexes=[0],
        ),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )  # fmt: skip
    model = Qwen3VLForConditionalGeneration(config).to(args.device, getattr(torch, args.dtype))
    model.set_attn_implementation("sdpa")
    return model.eval()


def build_batch(args, model) -> dict:
    """Processor-like inputs with the images encoded once (mm_encoder_outputs)."""
    height, width = args.grid
    num_visual = height * width // 4
    image = [VISION_START] + [IMAGE] * num_visual + [VISION_END]
    input_ids, attention_mask, generator = chat_batch(args, image, pad=PAD)
    grid = torch.tensor([[1, height, width]] * args.batch_size)
    pixel_values = torch.randn(args.batch_size * height * width, 24, generator=generator)
    with torch.no_grad():
        encoded = model.model.get_image_features(
            pixel_values.to(args.device, getattr(torch, args.dtype)), grid.to(args.device), return_dict=True
        )
    return {
        "input_ids": input_ids.to(args.device),
        "attention_mask": attention_mask.to(args.device),
        "mm_token_type_ids": (input_ids == IMAGE).long().to(args.device),
        "image_grid_thw": grid.to(args.device),
        "mm_encoder_outputs": {"image": encoded},
    }, num_visual


def report_qwen3_vl_2b(num_prefix: int, num_visual: int, num_text: int, compression=(1, 4)) -> None:
    """KV-cache bytes of Qwen3-VL-2B (28 layers, 8 kv heads of 128) for one prompt, full vs ETC."""
    shape = TextModelShape.from_config(qwen3_vl_2b_config().text_config)
    full = num_prefix + num_visual + num_text
    print(
        f"\nQwen3-VL-2B (analytic, etc_ext.cost on the real config): prompt = {num_prefix} prefix + {num_visual} "
        f"visual + {num_text} text tokens; {shape.num_layers} layers x {shape.num_kv_heads} kv heads x "
        f"{shape.head_dim}"
    )
    print(f"{'method':<10}{'cached':>8}{'KV bf16 bytes':>16}{'MiB':>8}{'KV fp32 bytes':>16}{'MiB':>8}{'vs full':>9}")
    for label, m in [("full", None)] + [(f"ETC M={m}", m) for m in compression]:
        cached = full if m is None else num_prefix + m + num_text
        bf16, fp32 = kv_cache_bytes(shape, cached, 2), kv_cache_bytes(shape, cached, 4)
        print(
            f"{label:<10}{cached:>8}{bf16:>16,}{bf16 / 2**20:>8.1f}{fp32:>16,}{fp32 / 2**20:>8.1f}"
            f"{cached / full:>9.3f}"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--grid", type=int, nargs=2, default=[64, 64], help="image grid in patches (h w), N = h*w/4")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--text-before", type=int, default=13, help="text tokens before <|vision_start|>")
    parser.add_argument("--text-after", type=int, default=29, help="text tokens after <|vision_end|> (first row)")
    args = parse_prefill_arguments(parser)

    model = build_model(args)
    inputs, num_visual = build_batch(args, model)
    text = model.config.text_config
    description = (
        f"tiny Qwen3-VL: LLM {text.num_hidden_layers} layers x hidden {text.hidden_size} ({text.num_attention_heads} "
        f"query heads on {text.num_key_value_heads} kv heads of {text.head_dim})"
    )
    compare_prefills(model, apply_etc, inputs, args, description, num_visual)
    # the first row's prompt: the vision start / end tokens count as text
    report_qwen3_vl_2b(args.text_before + 1, num_visual, args.text_after + 1, tuple(args.num_compression_tokens))


if __name__ == "__main__":
    main()
