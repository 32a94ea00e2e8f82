"""Can a language model learn to find an object by its color from the demo's frozen vision features? (issue 20)

The demo's bases answer "is there a <color> shape?" at chance on some machines while they read a cell's color
perfectly (`etc_ext.demo.recipe`, items 14-19). This probe isolates that one skill: it takes the frozen vision tower
of a demo model, the exists questions of a training set made by `etc_ext.demo.data.generate_training_data`, and trains
a small model on "visual tokens, color word, suffix tokens -> yes / no" outside the VLM, in minutes:

- `--arch llama`: the demo's Llama language model (the recipe's `SIZES` and `INITIALIZER_RANGE`; `--rope-theta`,
  `--layers`, `--init` change it) behind a LLaVA-style projector, the color word between prefix and suffix tokens as
  in the demo's prompt (`<s> USER : _ <image> Is there <color>` then `--suffix` tokens for "shape ? ASSISTANT :");
- `--arch encoder`: a pre-norm `nn.TransformerEncoder` (LayerNorm, learned positions, causal) on the same sequence.

```
python scripts/demo_lookup_probe.py --model WORK/init-vision --data WORK/data/focus.json --arch llama --steps 600
```

prints the loss and the held-out accuracy (the last 15 % of the questions) every 200 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import re

import torch
from PIL import Image
from torch import nn


def load_questions(data_path: str, max_images: int) -> tuple[list[str], torch.Tensor]:
    """Image paths and `(image index, color index, answer is yes)` rows of the exists questions."""
    from etc_ext.data.shapes import COLORS

    colors = list(COLORS)
    images: dict[str, int] = {}
    rows = []
    for sample in json.load(open(data_path)):
        if sample["question_types"][0] != "exists_color":
            continue
        question, answer = sample["conversations"][0]["value"], sample["conversations"][1]["value"]
        color = next(i for i, c in enumerate(colors) if re.search(rf"\b{c}\b", question))
        if sample["image"] not in images and len(images) == max_images:
            break
        images.setdefault(sample["image"], len(images))
        rows.append((images[sample["image"]], color, int(answer == "yes")))
    return sorted(images, key=images.get), torch.tensor(rows)


@torch.no_grad()
def tower_features(model_dir: str, image_root: str, paths: list[str]) -> torch.Tensor:
    """`(images, patches, vision hidden size)`: what LLaVA reads (`vision_feature_layer`, without CLS)."""
    from etc_ext.demo.vision_pretrain import patch_features
    from etc_ext.models.loading import load_for_inference

    model, processor, _ = load_for_inference(model_dir)
    features = []
    for start in range(0, len(paths), 100):
        images = [Image.open(os.path.join(image_root, p)).convert("RGB") for p in paths[start : start + 100]]
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        features.append(patch_features(model.model.vision_tower, pixels, model.config.vision_feature_layer))
    return torch.cat(features)


class LlamaProbe(nn.Module):
    """The demo's Llama language model and a two-layer projector; token ids stand for the prompt's words."""

    def __init__(self, vision_size: int, args):
        super().__init__()
        from transformers import LlamaConfig, LlamaModel

        from etc_ext.demo import recipe

        sizes = recipe.SIZES
        init = args.init if args.init is not None else recipe.INITIALIZER_RANGE
        config = LlamaConfig(
            hidden_size=sizes.text_hidden_size, intermediate_size=sizes.text_intermediate_size,
            num_hidden_layers=args.layers or sizes.text_layers, num_attention_heads=sizes.text_heads,
            num_key_value_heads=sizes.text_kv_heads, initializer_range=init, vocab_size=32,
            max_position_embeddings=sizes.max_position_embeddings,
            rope_parameters={"rope_theta": args.rope_theta, "rope_type": "default"},
        )  # fmt: skip
        config._attn_implementation = "sdpa"
        self.llm = LlamaModel(config)
        hidden = sizes.text_hidden_size
        self.projector = nn.Sequential(nn.Linear(vision_size, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.head = nn.Linear(hidden, 2)
        for layer in (*self.projector, self.head):
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=init)
                nn.init.zeros_(layer.bias)
        self.suffix = args.suffix

    def forward(self, features: torch.Tensor, colors: torch.Tensor) -> torch.Tensor:
        embed, batch = self.llm.embed_tokens, len(colors)
        prefix = embed(torch.arange(4).expand(batch, -1))  # <s> USER : _
        question = embed(torch.stack([torch.full((batch,), 10), 20 + colors], 1))  # "Is there" <color>
        suffix = embed(torch.arange(11, 11 + self.suffix).expand(batch, -1))  # shape ? ASSISTANT :
        hidden = torch.cat([prefix, self.projector(features), question, suffix], 1)
        return self.head(self.llm(inputs_embeds=hidden).last_hidden_state[:, -1])


class EncoderProbe(nn.Module):
    """A pre-norm causal `nn.TransformerEncoder` with learned positions on visual tokens, color, suffix tokens."""

    def __init__(self, vision_size: int, args, patches: int, hidden: int = 128):
        super().__init__()
        self.visual = nn.Sequential(nn.Linear(vision_size, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        from etc_ext.data.shapes import COLORS

        self.color = nn.Embedding(len(COLORS), hidden)
        self.suffix = nn.Parameter(torch.randn(args.suffix, hidden))
        length = patches + 1 + args.suffix
        self.positions = nn.Parameter(torch.zeros(length, hidden))
        layer = nn.TransformerEncoderLayer(hidden, 4, 4 * hidden, 0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, args.layers or 2, enable_nested_tensor=False)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length), persistent=False)
        self.head = nn.Linear(hidden, 2)

    def forward(self, features: torch.Tensor, colors: torch.Tensor) -> torch.Tensor:
        batch = len(colors)
        tokens = [self.visual(features), self.color(colors)[:, None], self.suffix.expand(batch, -1, -1)]
        hidden = torch.cat(tokens, 1) + self.positions
        return self.head(self.encoder(hidden, mask=self.mask, is_causal=True)[:, -1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a demo model folder whose vision tower is read (frozen)")
    parser.add_argument("--data", required=True, help="a training set json of etc_ext.demo.data with exists questions")
    parser.add_argument("--arch", choices=("llama", "encoder"), default="llama")
    parser.add_argument("--images", type=int, default=3000, help="images whose exists questions are used")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--suffix", type=int, default=3, help="tokens between the color word and the answer")
    parser.add_argument("--layers", type=int, help="default: the recipe's (llama) or 2 (encoder)")
    parser.add_argument("--rope-theta", type=float, default=10000.0, help="llama only")
    parser.add_argument("--init", type=float, help="llama only; default: recipe.INITIALIZER_RANGE")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    paths, rows = load_questions(args.data, args.images)
    features = tower_features(args.model, os.path.dirname(os.path.abspath(args.data)), paths)
    split = int(len(rows) * 0.85)
    train_rows, test_rows = rows[:split], rows[split:]
    print(f"{len(paths)} images, {len(train_rows)} training and {len(test_rows)} held-out questions "
          f"({test_rows[:, 2].float().mean():.0%} yes)")  # fmt: skip

    torch.manual_seed(args.seed)
    if args.arch == "llama":
        probe = LlamaProbe(features.shape[-1], args)
    else:
        probe = EncoderProbe(features.shape[-1], args, features.shape[1])
    optimizer = torch.optim.AdamW(probe.parameters(), args.lr, weight_decay=0.0)
    for step in range(1, args.steps + 1):
        batch = train_rows[torch.randint(len(train_rows), (args.batch_size,))]
        loss = nn.functional.cross_entropy(probe(features[batch[:, 0]], batch[:, 1]), batch[:, 2])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 200 == 0 or step == args.steps:
            with torch.no_grad():
                predictions = probe(features[test_rows[:, 0]], test_rows[:, 1]).argmax(-1)
            accuracy = (predictions == test_rows[:, 2]).float().mean().item()
            print(f"step {step}: loss {loss.item():.3f}, held-out accuracy {accuracy:.3f}", flush=True)


if __name__ == "__main__":
    main()
