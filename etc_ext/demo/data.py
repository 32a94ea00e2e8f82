"""Training data of the demo: shapes scenes with a chosen number of objects, and the curriculum built from them.

Why a curriculum. A tiny LLaVA trained from random weights on `etc_ext.data.shapes` scenes (2 to 6 objects) stays at
the answer prior for thousands of steps: every question needs the instruction to select part of the image (which
cell, which color), an attention pattern that gradient descent finds late when everything else is random too. Scenes
with a single object make every question answerable from the image alone, which the model learns in a few hundred
steps (color, shape and place of what it sees); scenes with exactly two objects then make selection pay off at once
(the right of two answers), and more objects follow. Measured on the validation split while building the demo: with
two-object scenes the model learned to pick the asked cell's color in a few hundred steps; trained on 2 to 6 objects
from the start it had not after 700 (`etc_ext.demo.recipe` has the numbers of the shipped run).

The samples are written as `generate_shapes_dataset` writes them (LLaVA conversation json, the same question
templates, `question_types` per turn) with two differences that make training cheaper: a sample is one image with
many turns (one question of each type, and with `every_object` a color and a shape question about every object), so
the 144 visual tokens are paid once for up to 16 questions; and only scenes of the `train` split (by
`etc_ext.data.shapes.scene_split`) are drawn, so no validation or test scene is ever trained on. A scene's objects may
repeat across samples (drawn with other sizes and offsets): one-object scenes on a 3x3 grid are only 216.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter

from ..data.shapes import (
    DEFAULT_IMAGE_SIZE,
    QUESTION_TEMPLATES,
    QUESTION_TYPES,
    Question,
    candidate_questions,
    draw_scene,
    pick_balanced_question,
    sample_scene,
    scene_split,
)


def scene_questions(
    rng: random.Random, scene, question_types, answer_counts: dict, every_object: bool
) -> list[Question]:
    """The questions of one multi-turn sample, in random order: one of each type the scene allows (answers balanced
    through `answer_counts`, as `generate_shapes_dataset` does), and with `every_object` the `color` and `shape`
    questions about every object instead."""
    questions = []
    for question_type in question_types:
        if every_object and question_type in ("color", "shape"):
            for template_key, fields, answer in candidate_questions(scene, question_type):
                text = rng.choice(QUESTION_TEMPLATES[template_key]).format(**fields)
                questions.append(Question(question_type, text, answer))
            continue
        question = pick_balanced_question(rng, scene, question_type, answer_counts[question_type])
        if question is not None:
            questions.append(question)
    rng.shuffle(questions)
    return questions


def generate_training_data(
    out_dir: str | os.PathLike,
    blocks: tuple[tuple[int, int, int], ...],
    *,
    name: str = "train",
    seed: int = 0,
    grid_sizes: tuple[int, ...] = (3,),
    image_size: int = DEFAULT_IMAGE_SIZE,
    question_types: tuple[str, ...] = QUESTION_TYPES,
    every_object: bool = True,
    answer_prompt: str | None = None,
) -> str:
    """Writes multi-turn training samples to `<out_dir>/<name>.json` (images under `<out_dir>/images/<name>/`).

    Args:
        blocks: `(num_images, min_objects, max_objects)` per block; the file holds the blocks in this order (a
            curriculum when trained with `shuffle=False`), each block's scenes drawn at random.
        name: file and image folder name.
        seed: seed of the draws (each name draws its own stream).
        grid_sizes, image_size, question_types, answer_prompt: as in `generate_shapes_dataset`.
        every_object: ask the color and the shape of every object (see `scene_questions`).

    Returns:
        The json path.
    """
    if not blocks:
        raise ValueError("blocks must not be empty")
    for num_images, low, high in blocks:
        if num_images < 1 or low < 1 or high < low:
            raise ValueError(f"a block is (num_images >= 1, 1 <= min_objects <= max_objects), got {blocks}")
    digest = hashlib.sha256(f"etc-ext-demo/{seed}/{name}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "little"))
    os.makedirs(os.path.join(out_dir, "images", name), exist_ok=True)
    answer_counts = {t: Counter() for t in question_types}
    samples = []
    for block, (num_images, low, high) in enumerate(blocks):
        made, draws = 0, 0
        while made < num_images:
            draws += 1
            if draws > 1000 * num_images:
                raise RuntimeError(f"found only {made} train scenes with {low}..{high} objects")
            scene = sample_scene(rng, rng.choice(grid_sizes), image_size, low, high)
            if scene_split(scene) != "train":
                continue
            questions = scene_questions(rng, scene, question_types, answer_counts, every_object)
            if not questions:
                continue
            index = len(samples)
            image_path = f"images/{name}/{index:06d}.png"
            draw_scene(scene).save(os.path.join(out_dir, image_path))
            conversations = []
            for turn, question in enumerate(questions):
                text = question.text if not answer_prompt else f"{question.text}\n{answer_prompt}"
                conversations.append({"from": "human", "value": f"<image>\n{text}" if turn == 0 else text})
                conversations.append({"from": "gpt", "value": question.answer})
            samples.append({"id": f"shapes-{name}-{index:06d}", "image": image_path, "conversations": conversations,
                            "question_types": [q.type for q in questions], "num_objects": len(scene.objects),
                            "block": block})  # fmt: skip
            made += 1
    json_path = os.path.join(out_dir, f"{name}.json")
    with open(json_path, "w") as f:
        json.dump(samples, f, indent=1)
    return json_path
