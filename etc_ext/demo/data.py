"""Training data of the demo: shapes scenes with a chosen number of objects, and the curriculum built from them.

Why a curriculum. A tiny LLaVA trained from random weights learns first what needs no selection: in one-object
scenes every question is about the one object (its color, its cell, whether it has the asked color), and the model
learns those in a few hundred steps; picking one of several objects by the question's words comes later and slower
(`etc_ext.demo.recipe` has the numbers measured while building the demo). So the full-token model sees one-object
scenes first, then the task's mix.

The samples are written as `generate_shapes_dataset` writes them (LLaVA conversation json, the same question
templates, `question_types` per turn) with two differences: an image gets one question of each type and, with
`every_object`, a color (and shape) question about every object, split into several samples by `leak_free_groups`
(the cell questions share one multi-turn sample, so the 144 visual tokens are paid once for them; no answer in a
conversation gives away a later question of it); and only scenes of the `train` split (by
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


def leak_free_groups(questions: list[Question]) -> list[list[Question]]:
    """Splits one image's questions into the conversations of its samples so that no earlier answer gives a later
    question away: the questions about what is in a named cell (`color`, `shape`) share one multi-turn sample (each
    names another cell, or asks another attribute), and every other question is a sample of its own. (In one
    conversation, "What color is the shape in row 1, column a? red" would answer a later "Is there a red shape?",
    "How many red shapes are there?" and "Where is the red shape?" from the text alone: trained that way, the demo's
    model learned those three types on the training conversations and stayed at chance on single questions.)"""
    by_cell = [q for q in questions if q.type in ("color", "shape")]
    groups = [[q] for q in questions if q.type not in ("color", "shape")]
    return ([by_cell] if by_cell else []) + groups


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
    """Writes training samples to `<out_dir>/<name>.json` (images under `<out_dir>/images/<name>/`): per image, its
    questions (`scene_questions`) split into conversations by `leak_free_groups`.

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
    samples, image_count = [], 0
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
            image_path = f"images/{name}/{image_count:06d}.png"
            draw_scene(scene).save(os.path.join(out_dir, image_path))
            for group, turns in enumerate(leak_free_groups(questions)):
                conversations = []
                for turn, question in enumerate(turns):
                    text = question.text if not answer_prompt else f"{question.text}\n{answer_prompt}"
                    conversations.append({"from": "human", "value": f"<image>\n{text}" if turn == 0 else text})
                    conversations.append({"from": "gpt", "value": question.answer})
                samples.append({"id": f"shapes-{name}-{image_count:06d}-{group}", "image": image_path,
                                "conversations": conversations, "question_types": [q.type for q in turns],
                                "num_objects": len(scene.objects), "block": block})  # fmt: skip
            image_count += 1
            made += 1
    json_path = os.path.join(out_dir, f"{name}.json")
    with open(json_path, "w") as f:
        json.dump(samples, f, indent=1)
    return json_path
