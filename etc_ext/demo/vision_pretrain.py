"""Supervised pretraining of the demo's CLIP vision tower on generated scenes: per-cell color and shape maps.

Why. Trained from random weights inside the VLM, the tower learns what the language model's loss asks for, slowly:
the first demo's full model never learned where an object is, nor to count (`etc_ext.demo.recipe`). A cheap
supervised objective teaches the tower the scene first: every patch predicts the color and the shape of the object in
its grid cell (or "none") from the features LLaVA reads (`vision_feature_layer`, the second to last layer), through
one linear head per attribute. Each patch then carries what its cell holds, and the 2-D position embeddings carry
where the cell is; the VLM stage (and ETC's compression tokens) only has to read them. With `cell_targets`, a third
head reads the index of the patch's cell, so that the cell is written in the feature too (the demo's color and where
questions name or answer a cell).

Data: scenes drawn on the fly (`etc_ext.data.shapes.sample_scene`, train split only by `scene_split`), preprocessed by
the model's own image processor; nothing is written to disk. Deterministic given the seed.

```
python -m etc_ext.demo.vision_pretrain --model runs/demo/init --out runs/demo/init-vision --steps 1500 --threads 1
```

writes the whole model (the VLM with the pretrained tower; the language model and projector as they were) with its
processor to `--out`, and `vision_pretrain.json` (the settings, the loss curve, the per-cell accuracy on validation
scenes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import time

import torch
from torch import nn

from ..data.shapes import COLORS, SHAPES, draw_scene, sample_scene, scene_split

MAPS = ("color", "shape", "cell")  # what `patch_targets` returns per patch, in that order
COLOR_CLASSES = ("none", *COLORS)  # index 0: an empty cell
SHAPE_CLASSES = ("none", *SHAPES)


def patch_targets(scene, patches_per_side: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(color, shape, cell)` class indices `(patches_per_side ** 2,)` of every patch, row-major: the object of the
    grid cell that holds the patch's center (`COLOR_CLASSES` / `SHAPE_CLASSES`, 0 for an empty cell) and that cell's
    row-major index."""
    color = torch.zeros(scene.grid_size, scene.grid_size, dtype=torch.long)
    shape = torch.zeros(scene.grid_size, scene.grid_size, dtype=torch.long)
    for obj in scene.objects:
        color[obj.row, obj.col] = COLOR_CLASSES.index(obj.color)
        shape[obj.row, obj.col] = SHAPE_CLASSES.index(obj.shape)
    centers = (torch.arange(patches_per_side) + 0.5) / patches_per_side  # patch centers in [0, 1]
    cell = (centers * scene.grid_size).long().clamp(max=scene.grid_size - 1)
    rows, cols = cell[:, None].expand(-1, patches_per_side), cell[None, :].expand(patches_per_side, -1)
    return color[rows, cols].reshape(-1), shape[rows, cols].reshape(-1), (rows * scene.grid_size + cols).reshape(-1)


class SceneBatches:
    """Batches of `(pixel_values, color, shape)` from scenes of one split drawn on the fly.

    Args:
        image_processor: the model's image processor (CLIP preprocessing of the drawn PIL images).
        patches_per_side: image size // patch size of the tower.
        split: the `scene_split` every scene must belong to.
        seed: seed of the draws (each split its own stream).
        grid_sizes, min_objects, max_objects, image_size: as `sample_scene`.
    """

    def __init__(self, image_processor, patches_per_side: int, split: str = "train", seed: int = 0,
                 grid_sizes=(3,), min_objects: int = 1, max_objects: int = 2, image_size: int = 168):  # fmt: skip
        digest = hashlib.sha256(f"etc-ext-demo-vision/{seed}/{split}".encode()).digest()
        self.rng = random.Random(int.from_bytes(digest[:8], "little"))
        self.image_processor = image_processor
        self.patches_per_side = patches_per_side
        self.split = split
        self.grid_sizes = tuple(grid_sizes)
        self.min_objects, self.max_objects, self.image_size = min_objects, max_objects, image_size

    def scene(self):
        while True:
            scene = sample_scene(self.rng, self.rng.choice(self.grid_sizes), self.image_size, self.min_objects,
                                 self.max_objects)  # fmt: skip
            if scene_split(scene) == self.split:
                return scene

    def batch(self, size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`(pixel_values, {map: targets (size, patches)})`, the maps of `MAPS` as `patch_targets` gives them."""
        scenes = [self.scene() for _ in range(size)]
        pixels = self.image_processor(images=[draw_scene(s) for s in scenes], return_tensors="pt")["pixel_values"]
        targets = [patch_targets(s, self.patches_per_side) for s in scenes]
        return pixels, {name: torch.stack(column) for name, column in zip(MAPS, zip(*targets))}


class CellHeads(nn.Module):
    """Linear classifiers on every patch feature `(B, P, D)` -> `{map: (B, P, classes)}`: color and shape, and, with
    `num_cells`, the patch's grid cell. Only the maps it has are trained and measured."""

    def __init__(self, hidden_size: int, num_cells: int | None = None):
        super().__init__()
        self.maps = nn.ModuleDict(
            {"color": nn.Linear(hidden_size, len(COLOR_CLASSES)), "shape": nn.Linear(hidden_size, len(SHAPE_CLASSES))}
        )
        if num_cells:
            self.maps["cell"] = nn.Linear(hidden_size, num_cells)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(features) for name, head in self.maps.items()}


def patch_features(vision_tower, pixel_values: torch.Tensor, feature_layer: int) -> torch.Tensor:
    """`(B, P, D)` patch features of the layer LLaVA reads (`hidden_states[feature_layer]`, CLS dropped)."""
    out = vision_tower(pixel_values=pixel_values, output_hidden_states=True)
    return out.hidden_states[feature_layer][:, 1:]


@torch.no_grad()
def map_accuracy(vision_tower, heads: CellHeads, batches: SceneBatches, feature_layer: int, num_images: int = 256,
                 batch_size: int = 64) -> dict:  # fmt: skip
    """Per-patch accuracy of each map of `heads` on `num_images` scenes of `batches` (object patches and all
    patches)."""
    was_training = vision_tower.training
    vision_tower.eval()
    totals = dict.fromkeys([*heads.maps, *(f"{name}_objects" for name in heads.maps), "patches", "object_patches"], 0)
    for start in range(0, num_images, batch_size):
        pixels, targets = batches.batch(min(batch_size, num_images - start))
        objects = targets["color"] > 0
        for name, logits in heads(patch_features(vision_tower, pixels, feature_layer)).items():
            hit = logits.argmax(-1) == targets[name]
            totals[name] += int(hit.sum())
            totals[f"{name}_objects"] += int(hit[objects].sum())
        totals["patches"] += objects.numel()
        totals["object_patches"] += int(objects.sum())
    vision_tower.train(was_training)
    accuracy = {}
    for name in heads.maps:
        accuracy[name] = totals[name] / totals["patches"]
        accuracy[f"{name}_on_objects"] = totals[f"{name}_objects"] / max(totals["object_patches"], 1)
    return accuracy


def pretrain_vision_tower(
    model,
    image_processor,
    *,
    steps: int = 1500,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    warmup_steps: int = 50,
    seed: int = 0,
    grid_sizes=(3,),
    min_objects: int = 1,
    max_objects: int = 2,
    cell_targets: bool = False,
    log_every: int = 50,
    log=print,
) -> dict:
    """Trains `model`'s vision tower (a `LlavaForConditionalGeneration`) in place on the per-cell maps (see the module
    docstring): AdamW, linear warmup then cosine decay to 0. `cell_targets`: every patch also predicts the index of
    its grid cell, so that where a patch lies is written in its feature, not only mixed in by the position
    embeddings. Returns `{"history": [...], "val": map_accuracy}`."""
    config = model.config
    vision_tower = model.model.vision_tower
    feature_layer = config.vision_feature_layer
    if not isinstance(feature_layer, int):
        raise ValueError(f"vision_feature_layer must be one layer index, got {feature_layer!r}")
    patches = config.vision_config.image_size // config.vision_config.patch_size
    train = SceneBatches(image_processor, patches, "train", seed, grid_sizes, min_objects, max_objects,
                         config.vision_config.image_size)  # fmt: skip
    val = SceneBatches(image_processor, patches, "val", seed, grid_sizes, min_objects, max_objects,
                       config.vision_config.image_size)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        heads = CellHeads(config.vision_config.hidden_size, max(grid_sizes) ** 2 if cell_targets else None)
    parameters = [p for p in vision_tower.parameters()] + list(heads.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return learning_rate * (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(steps - warmup_steps, 1)
        return learning_rate * 0.5 * (1 + math.cos(math.pi * progress))

    vision_tower.train()
    history, start = [], time.perf_counter()
    running = None
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        pixels, targets = train.batch(batch_size)
        logits = heads(patch_features(vision_tower, pixels, feature_layer))
        loss = sum(nn.functional.cross_entropy(logits[name].flatten(0, 1), targets[name].flatten()) for name in logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            record = {"step": step + 1, "loss": running, "lr": lr_at(step), "elapsed_s": time.perf_counter() - start}
            history.append(record)
            log(json.dumps(record))
    vision_tower.eval()
    accuracy = map_accuracy(vision_tower, heads, val, feature_layer)
    log(json.dumps({"val": accuracy}))
    return {"history": history, "val": accuracy, "train_time_s": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m etc_ext.demo.vision_pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="save_pretrained folder of the tiny LLaVA and its processor")
    parser.add_argument("--out", required=True, help="where the model with the pretrained tower goes")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-objects", type=int, default=1)
    parser.add_argument("--max-objects", type=int, default=2)
    parser.add_argument("--cell-targets", action="store_true", help="every patch also predicts its grid cell")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(args.model)
    result = pretrain_vision_tower(model, processor.image_processor, steps=args.steps, batch_size=args.batch_size,
                                   learning_rate=args.lr, seed=args.seed, min_objects=args.min_objects,
                                   max_objects=args.max_objects, cell_targets=args.cell_targets)  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    with open(os.path.join(args.out, "vision_pretrain.json"), "w") as f:
        json.dump({"settings": vars(args), **result}, f, indent=1)
    print(f"val per-patch accuracy: {result['val']}; model written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
