"""Many questions about one image: prefill the image once into a compressed ETC cache and reuse it.

Runs on a CPU in seconds with a random LLaVA-architecture model whose image gives LLaVA-1.5's 576 visual tokens
(real transformers classes, small widths). Prints the time of answering Q questions with a fresh generate() each
versus one image prefill plus Q reuses, checks that the answers are the same, and the cache entries kept.

    python examples/image_cache_reuse.py --questions 5
"""

import argparse
import copy
import time

import torch
from transformers import CLIPVisionConfig, DynamicCache, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from etc_ext import ETCConfig
from etc_ext.models.llava import apply_etc

IMAGE_TOKEN = 7999


def build_model(seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=336, patch_size=14
    )
    text = LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=8000, max_position_embeddings=2048,
    )  # fmt: skip
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN))
    model.generation_config.eos_token_id = None
    return apply_etc(model.eval(), ETCConfig(num_compression_tokens=1, loss="none"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=5)
    parser.add_argument("--question-tokens", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))

    model = build_model()
    generator = torch.Generator().manual_seed(1)
    prefix = torch.cat([torch.randint(3, 7000, (1, 5), generator=generator), torch.full((1, 576), IMAGE_TOKEN)], 1)
    pixel_values = torch.randn(1, 3, 336, 336, generator=generator)
    questions = [torch.randint(3, 7000, (1, args.question_tokens), generator=generator) for _ in range(args.questions)]
    generate = dict(max_new_tokens=args.new_tokens, do_sample=False)

    with torch.no_grad():
        start = time.perf_counter()
        fresh = [
            model.generate(input_ids=torch.cat([prefix, q], 1), pixel_values=pixel_values, **generate)
            for q in questions
        ]
        fresh_seconds = time.perf_counter() - start

        start = time.perf_counter()
        image_cache = model(input_ids=prefix, pixel_values=pixel_values, cache=DynamicCache(), use_cache=True).cache
        reused = [
            model.generate(input_ids=torch.cat([prefix, q], 1), cache=copy.deepcopy(image_cache), **generate)
            for q in questions
        ]
        reuse_seconds = time.perf_counter() - start

    same = all(torch.equal(a, b) for a, b in zip(fresh, reused))
    print(f"{args.questions} questions about one image (576 visual tokens, M=1), {args.new_tokens} new tokens each")
    print(f"  fresh generate() per question:      {fresh_seconds:7.2f} s")
    print(f"  one image prefill + cache reuse:    {reuse_seconds:7.2f} s  ({fresh_seconds / reuse_seconds:.1f}x)")
    print(f"  image cache entries per layer:      {image_cache.get_seq_length()} (prefix 5 + 1 compression token)")
    print(f"  same answers: {same}")
    if not same:
        raise SystemExit("the reused cache gave other answers than a fresh generate()")


if __name__ == "__main__":
    main()
