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

prints the loss and the held-out accuracy (the last 15 % of the questions) every 200 steps. The other switches swap
one part at a time between the two (`--help`; `--norm`, `--positions`, `--hidden-act`, the `--*-init` ones for the
Llama model, `--init`, `--final-norm`, `--prefix` for the encoder) or change what both read (`--patch-grid`,
`--pooled-features`); what each measured is in `etc_ext.demo.recipe`, items 18 and 20.
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
            rope_parameters={"rope_theta": args.rope_theta, "rope_type": "default"}, hidden_act=args.hidden_act,
        )  # fmt: skip
        config._attn_implementation = "sdpa"
        self.llm = LlamaModel(config)
        if args.norm == "layer":  # a diagnostic swap: the recipe's Llama cannot change its norm by config
            swap_rms_norms(self.llm, config.hidden_size)
        if args.llm_init == "torch":  # nn.Linear's own (uniform, std 1 / sqrt(3 fan_in)) and nn.Embedding's (std 1)
            for module in self.llm.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    module.reset_parameters()
        if args.embed_std is not None:
            nn.init.normal_(self.llm.embed_tokens.weight, std=args.embed_std)
        if args.residual_init != "recipe":  # the layers' writes to the residual stream: o_proj and down_proj
            std = 0.0 if args.residual_init == "zero" else init / (2 * config.num_hidden_layers) ** 0.5
            for layer in self.llm.layers:
                nn.init.normal_(layer.self_attn.o_proj.weight, std=std)
                nn.init.normal_(layer.mlp.down_proj.weight, std=std)
        hidden = sizes.text_hidden_size
        self.projector = nn.Sequential(nn.Linear(vision_size, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.head = nn.Linear(hidden, 2)
        if args.projector_init == "recipe":  # as LLaVA's `_init_weights` does; "torch" keeps nn.Linear's own
            for layer in (*self.projector, self.head):
                if isinstance(layer, nn.Linear):
                    nn.init.normal_(layer.weight, std=init)
                    nn.init.zeros_(layer.bias)
        self.suffix = args.suffix
        self.positions = args.positions

    def forward(self, features: torch.Tensor, colors: torch.Tensor) -> torch.Tensor:
        embed, batch = self.llm.embed_tokens, len(colors)
        prefix = embed(torch.arange(4).expand(batch, -1))  # <s> USER : _
        question = embed(torch.stack([torch.full((batch,), 10), 20 + colors], 1))  # "Is there" <color>
        suffix = embed(torch.arange(11, 11 + self.suffix).expand(batch, -1))  # shape ? ASSISTANT :
        hidden = torch.cat([prefix, self.projector(features), question, suffix], 1)
        position_ids = None
        if self.positions == "none":  # every token at position 0: RoPE rotates nothing, the causal mask remains
            position_ids = torch.zeros(batch, hidden.shape[1], dtype=torch.long)
        return self.head(self.llm(inputs_embeds=hidden, position_ids=position_ids).last_hidden_state[:, -1])


def swap_rms_norms(module: nn.Module, hidden: int) -> None:
    """Replaces every `*RMSNorm` under `module` with a fresh `nn.LayerNorm(hidden)`, in place."""
    for name, child in module.named_children():
        if type(child).__name__.endswith("RMSNorm"):
            setattr(module, name, nn.LayerNorm(hidden))
        else:
            swap_rms_norms(child, hidden)


class EncoderProbe(nn.Module):
    """A pre-norm causal `nn.TransformerEncoder` with learned positions on visual tokens, color, suffix tokens."""

    def __init__(self, vision_size: int, args, patches: int, hidden: int = 128):
        super().__init__()
        self.visual = nn.Sequential(nn.Linear(vision_size, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        from etc_ext.data.shapes import COLORS

        self.color = nn.Embedding(len(COLORS), hidden)
        self.prefix = nn.Parameter(torch.randn(args.prefix, hidden))
        self.suffix = nn.Parameter(torch.randn(args.suffix, hidden))
        length = args.prefix + patches + 1 + args.suffix
        self.positions = nn.Parameter(torch.zeros(length, hidden))
        layer = nn.TransformerEncoderLayer(hidden, 4, 4 * hidden, 0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, args.layers or 2, enable_nested_tensor=False)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length), persistent=False)
        self.final_norm = nn.LayerNorm(hidden) if args.final_norm else nn.Identity()
        self.head = nn.Linear(hidden, 2)
        if args.init is not None:  # Llama's way: every weight normal(0, init), biases zero, norms one
            for name, parameter in self.named_parameters():
                if "norm" in name:
                    continue
                if name.endswith("bias"):
                    nn.init.zeros_(parameter)
                elif name != "positions":
                    nn.init.normal_(parameter, std=args.init)

    def forward(self, features: torch.Tensor, colors: torch.Tensor) -> torch.Tensor:
        batch = len(colors)
        tokens = [self.prefix.expand(batch, -1, -1), self.visual(features), self.color(colors)[:, None]]
        hidden = torch.cat([*tokens, self.suffix.expand(batch, -1, -1)], 1) + self.positions
        return self.head(self.final_norm(self.encoder(hidden, mask=self.mask, is_causal=True))[:, -1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a demo model folder whose vision tower is read (frozen)")
    parser.add_argument("--data", required=True, help="a training set json of etc_ext.demo.data with exists questions")
    parser.add_argument("--arch", choices=("llama", "encoder"), default="llama")
    parser.add_argument("--images", type=int, default=3000, help="images whose exists questions are used")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=0, help="steps of linear learning-rate warmup")
    parser.add_argument("--suffix", type=int, default=3, help="tokens between the color word and the answer")
    parser.add_argument("--layers", type=int, help="default: the recipe's (llama) or 2 (encoder)")
    parser.add_argument("--rope-theta", type=float, default=10000.0, help="llama only")
    parser.add_argument("--init", type=float, help="default: recipe.INITIALIZER_RANGE (llama), torch's (encoder)")
    parser.add_argument("--prefix", type=int, default=0, help="encoder only: learned tokens before the image")
    parser.add_argument("--final-norm", action="store_true", help="encoder only: a LayerNorm before the head")
    parser.add_argument("--hidden-act", default="silu", help="llama only: the gated MLP's activation")
    parser.add_argument("--norm", choices=("rms", "layer"), default="rms", help="llama only: layer swaps in LayerNorm")
    parser.add_argument("--positions", choices=("rope", "none"), default="rope", help="llama only")
    parser.add_argument("--embed-std", type=float, help="llama only: token embeddings' std (default: --init)")
    parser.add_argument("--llm-init", choices=("recipe", "torch"), default="recipe",
                        help="llama only: the language model's linear layers and embeddings as torch initialises them")
    parser.add_argument("--residual-init", choices=("recipe", "scaled", "zero"), default="recipe",
                        help="llama only: o_proj and down_proj at init / sqrt(2 * layers) (GPT-2's) or zero")
    parser.add_argument("--projector-init", choices=("recipe", "torch"), default="recipe", help="llama only")
    parser.add_argument("--patch-grid", type=int, help="average the patches into a grid of this side (3: 9 tokens)")
    parser.add_argument("--pooled-features", action="store_true",
                        help="append the max over the image's patches to every patch feature")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    paths, rows = load_questions(args.data, args.images)
    features = tower_features(args.model, os.path.dirname(os.path.abspath(args.data)), paths)
    if args.patch_grid:  # fewer visual tokens: average the patch features over a coarser grid
        side = int(features.shape[1] ** 0.5)
        grid = features.unflatten(1, (side, side)).permute(0, 3, 1, 2)
        features = nn.functional.adaptive_avg_pool2d(grid, args.patch_grid).flatten(2).transpose(1, 2)
    if args.pooled_features:  # what a tower with image-level targets would put in every patch: the whole image
        features = torch.cat([features, features.amax(1, keepdim=True).expand_as(features)], -1)
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
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (args.warmup + 1)))
    for step in range(1, args.steps + 1):
        batch = train_rows[torch.randint(len(train_rows), (args.batch_size,))]
        loss = nn.functional.cross_entropy(probe(features[batch[:, 0]], batch[:, 1]), batch[:, 2])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        warmup.step()
        if step % 200 == 0 or step == args.steps:
            with torch.no_grad():
                predictions = probe(features[test_rows[:, 0]], test_rows[:, 1]).argmax(-1)
            accuracy = (predictions == test_rows[:, 2]).float().mean().item()
            print(f"step {step}: loss {loss.item():.3f}, held-out accuracy {accuracy:.3f}", flush=True)


if __name__ == "__main__":
    main()
