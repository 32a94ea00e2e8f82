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
import re
from collections import Counter

from ..data.shapes import (
    DEFAULT_IMAGE_SIZE,
    QUESTION_TYPES,
    Question,
    cell_name,
    candidate_questions,
    draw_scene,
    pick_balanced_question,
    render_question,
    sample_scene,
    scene_split,
)


def scene_questions(
    rng: random.Random, scene, question_types, answer_counts: dict, every_object: bool, articles: bool = True
) -> list[Question]:
    """The questions of one multi-turn sample, in random order: one of each type the scene allows (answers balanced
    through `answer_counts`, as `generate_shapes_dataset` does), and with `every_object` the `color` and `shape`
    questions about every object instead. `articles`: see `etc_ext.data.shapes.render_question`."""
    questions = []
    for question_type in question_types:
        if every_object and question_type in ("color", "shape"):
            for template_key, fields, answer in candidate_questions(scene, question_type):
                text = render_question(template_key, fields, rng, articles)
                questions.append(Question(question_type, text, answer))
            continue
        question = pick_balanced_question(rng, scene, question_type, answer_counts[question_type], articles=articles)
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


def disjoint_groups(
    rng: random.Random, scene, questions: list[Question], turn_counts: dict | None = None, max_turns: int = 3
) -> list[list[Question]]:
    """Splits one image's questions into conversations of up to `max_turns` questions of any types, none sharing a
    color or a cell with another of its conversation (`question_mentions`), so that no answer gives a later question
    away.

    Each question (in random order) takes the place where its answer is the rarest so far among the questions of its
    type at that turn (`turn_counts[(type, turn)]`, a `Counter` of answers, updated; pass the same dict for every image
    of a dataset): a new conversation (turn 0) or the end of one it fits; ties are broken at random. Why: placed
    wherever they fit, the questions whose color is absent ("Is there a red shape?" no, "How many red shapes?" zero)
    fit after any other question and gathered in later turns, while those about an object clash with the other
    questions about it and opened conversations; a model trained that way answered "yes" to every yes/no question
    asked alone (measured: `etc_ext.demo.recipe`)."""
    turn_counts = {} if turn_counts is None else turn_counts
    order = list(questions)
    rng.shuffle(order)
    groups: list[tuple[list[Question], set, set]] = []
    for question in order:
        colors, cells = question_mentions(scene, _candidate_of(scene, question))
        places = [None] + [g for g in groups if len(g[0]) < max_turns and not (colors & g[1] or cells & g[2])]
        shares = [_answer_share(turn_counts, question, 0 if g is None else len(g[0])) for g in places]
        place = rng.choice([g for g, share in zip(places, shares) if share == min(shares)])
        if place is None:
            place = ([], set(), set())
            groups.append(place)
        turns, used_colors, used_cells = place
        turn_counts.setdefault((question.type, len(turns)), Counter())[question.answer] += 1
        turns.append(question)
        used_colors |= colors
        used_cells |= cells
    return [turns for turns, _, _ in groups]


def _answer_share(turn_counts: dict, question: Question, turn: int) -> float:
    """The share of `question`'s answer among the answers of its type at `turn` so far (0 before any)."""
    counts = turn_counts.get((question.type, turn))
    return counts[question.answer] / sum(counts.values()) if counts else 0.0


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
    articles: bool = True,
    grouping: str = "cells",
    disjoint_share: float = 0.5,
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
        articles: "an orange" (True) or "a orange" (`etc_ext.data.shapes.render_question`).
        grouping: how an image's questions become conversations: "cells" (`leak_free_groups`: the cell questions
            share one, every other question is alone; what the first checkpoints were trained on) or "disjoint"
            (`disjoint_groups`: conversations of any types whose questions share no color or cell, as the demo's
            follow-up test asks them, each type's answers balanced at every turn), or "mixed": each image's
            questions grouped "disjoint" with probability `disjoint_share`, else "cells" (the single questions of
            "cells", and conversations of every type for the follow-up test).
        disjoint_share: see "mixed" (ignored by the other groupings).

    Returns:
        The json path.
    """
    if not blocks:
        raise ValueError("blocks must not be empty")
    if grouping not in ("cells", "disjoint", "mixed"):
        raise ValueError(f"grouping must be 'cells', 'disjoint' or 'mixed', got {grouping!r}")
    if not 0.0 <= disjoint_share <= 1.0:
        raise ValueError(f"disjoint_share must be in [0, 1], got {disjoint_share}")
    for num_images, low, high in blocks:
        if num_images < 1 or low < 1 or high < low:
            raise ValueError(f"a block is (num_images >= 1, 1 <= min_objects <= max_objects), got {blocks}")
    digest = hashlib.sha256(f"etc-ext-demo/{seed}/{name}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "little"))
    os.makedirs(os.path.join(out_dir, "images", name), exist_ok=True)
    answer_counts = {t: Counter() for t in question_types}
    turn_counts: dict = {}  # (type, turn) -> answers so far, for `disjoint_groups`
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
            questions = scene_questions(rng, scene, question_types, answer_counts, every_object, articles)
            if not questions:
                continue
            image_path = f"images/{name}/{image_count:06d}.png"
            draw_scene(scene).save(os.path.join(out_dir, image_path))
            # (only "mixed" draws here, so that the other groupings' streams stay those of their shipped data)
            disjoint = grouping == "disjoint" or (grouping == "mixed" and rng.random() < disjoint_share)
            if not disjoint:
                groups = leak_free_groups(questions)
            else:
                groups = disjoint_groups(rng, scene, questions, turn_counts)
            for group, turns in enumerate(groups):
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


# ------------------------------------------------------------------------------------------------ evaluation
def question_mentions(scene, candidate: tuple[str, dict, str]) -> tuple[set[str], set[str]]:
    """The colors and cells a `candidate_questions` candidate `(template_key, fields, answer)` is about, question and
    answer together: a `color` question names a cell and answers a color, `where_color` names a color and answers a
    cell, `count_color` and `exists_color` name a color and are answered from the cells of that color's objects."""
    template_key, fields, answer = candidate
    if template_key == "color":
        return {answer}, {f"{fields['col']}{fields['row']}"}
    if template_key == "where_color":
        return {fields["color"]}, {answer}
    if template_key in ("count_color", "exists_color"):
        cells = {cell_name(o.row, o.col) for o in scene.objects if o.color == fields["color"]}
        return {fields["color"]}, cells
    raise ValueError(f"the demo's evaluation conversations ask color question types only, got {template_key!r}")


def generate_eval_conversations(
    out_dir: str | os.PathLike,
    num_images: int,
    *,
    split: str,
    seed: int = 0,
    grid_sizes: tuple[int, ...] = (3,),
    image_size: int = DEFAULT_IMAGE_SIZE,
    question_types: tuple[str, ...] = ("color", "where_color", "count_color", "exists_color"),
    questions_per_image: int = 3,
    min_objects: int = 1,
    max_objects: int = 2,
    answer_prompt: str | None = None,
    articles: bool = True,
) -> str:
    """Held-out questions asked two ways: alone, and as one conversation per image (the follow-up test of the demo).

    Each image (distinct scenes of `split` only) gets `questions_per_image` questions of distinct types, answers
    balanced per type as in `generate_shapes_dataset`, and chosen so that no question of the conversation gives
    another away: their colors and cells (`question_mentions`) are pairwise disjoint (after "What color is the shape
    in row 1, column a? red", no question about red or about a1 follows). They are asked in an order drawn after they
    are chosen, so that every turn has the same mix of answers.

    Writes under `out_dir`:
        `<split>.json`: one single-turn sample per question (`conversation`: the image's index, `turn`: the
            question's place in its conversation), in the LLaVA conversation format;
        `<split>_conversations.json`: one sample per image with all its questions as turns (reference answers in
            the gpt turns; the demo feeds the model's own answers instead);
        `<split>_scenes.json`: the parameters and the scenes; images under `images/<split>/`.

    Returns:
        The path of `<split>.json`.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if not 1 <= questions_per_image <= len(question_types):
        raise ValueError(f"questions_per_image must be in [1, {len(question_types)}], got {questions_per_image}")
    digest = hashlib.sha256(f"etc-ext-demo-eval/{seed}/{split}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "little"))
    os.makedirs(os.path.join(out_dir, "images", split), exist_ok=True)
    answer_counts = {t: Counter() for t in question_types}
    singles, conversations, scenes, seen = [], [], [], set()
    draws = 0
    while len(scenes) < num_images:
        draws += 1
        if draws > 1000 * num_images:
            raise RuntimeError(f"found only {len(scenes)} distinct {split} scenes for {num_images} images")
        scene = sample_scene(rng, rng.choice(grid_sizes), image_size, min_objects, max_objects)
        if scene.key() in seen or scene_split(scene) != split:
            continue
        colors, cells, questions = set(), set(), []

        def allowed(candidate) -> bool:
            its_colors, its_cells = question_mentions(scene, candidate)
            return not (its_colors & colors or its_cells & cells)

        # a scratch copy of the counts: a scene that cannot take enough questions leaves them as they were
        counts = {t: Counter(c) for t, c in answer_counts.items()}
        for question_type in rng.sample(list(question_types), len(question_types)):
            question = pick_balanced_question(rng, scene, question_type, counts[question_type], allowed, articles)
            if question is None:
                continue
            chosen = _candidate_of(scene, question)
            its_colors, its_cells = question_mentions(scene, chosen)
            colors |= its_colors
            cells |= its_cells
            questions.append(question)
            if len(questions) == questions_per_image:
                break
        if len(questions) < questions_per_image:
            continue
        # The order is drawn after the questions: picked in turn, the later ones must avoid the earlier ones' colors
        # and cells and are mostly about absent colors ("no", "zero"), so asked in the order picked the follow-ups'
        # answers were skewed and a model could score on them from the turn alone.
        rng.shuffle(questions)
        answer_counts = counts
        seen.add(scene.key())
        index = len(scenes)
        image_path = f"images/{split}/{index:06d}.png"
        draw_scene(scene).save(os.path.join(out_dir, image_path))
        scenes.append({"image": image_path, **scene.to_dict()})
        turns = []
        for turn, question in enumerate(questions):
            text = question.text if not answer_prompt else f"{question.text}\n{answer_prompt}"
            singles.append({"id": f"shapes-{split}-{index:06d}-{turn}", "image": image_path,
                            "conversations": [{"from": "human", "value": f"<image>\n{text}"},
                                              {"from": "gpt", "value": question.answer}],
                            "question_types": [question.type], "conversation": index, "turn": turn})  # fmt: skip
            turns.append({"from": "human", "value": f"<image>\n{text}" if turn == 0 else text})
            turns.append({"from": "gpt", "value": question.answer})
        conversations.append({"id": f"shapes-{split}-{index:06d}", "image": image_path, "conversations": turns,
                              "question_types": [q.type for q in questions]})  # fmt: skip
    params = {"seed": seed, "split": split, "num_images": num_images, "grid_sizes": list(grid_sizes),
              "image_size": image_size, "question_types": list(question_types),
              "questions_per_image": questions_per_image, "min_objects": min_objects, "max_objects": max_objects,
              "answer_prompt": answer_prompt, "articles": articles,
              "generator": "generate_eval_conversations"}  # fmt: skip
    with open(os.path.join(out_dir, f"{split}_scenes.json"), "w") as f:
        json.dump({"params": params, "scenes": scenes}, f)
    with open(os.path.join(out_dir, f"{split}_conversations.json"), "w") as f:
        json.dump(conversations, f, indent=1)
    json_path = os.path.join(out_dir, f"{split}.json")
    with open(json_path, "w") as f:
        json.dump(singles, f, indent=1)
    return json_path


def _candidate_of(scene, question: Question) -> tuple[str, dict, str]:
    """The `candidate_questions` entry a picked question was phrased from (same type and answer, and for the types
    whose answer does not name the subject, the subject the text names)."""
    for candidate in candidate_questions(scene, question.type):
        template_key, fields, answer = candidate
        if answer != question.answer:
            continue
        if template_key == "color":
            named = f"row {fields['row']}, column {fields['col']}" in question.text
        else:
            named = re.search(rf"\b{fields['color']}\b", question.text) is not None
        if named:
            return candidate
    raise AssertionError(f"no candidate of {question} in the scene")  # pick_balanced_question phrased one of them
