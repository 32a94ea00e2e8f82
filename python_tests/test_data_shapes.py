"""Tests of the generated colored-shapes VQA data (etc_ext.data.shapes)."""

import hashlib
import json
import os
import random
import re
import time
from collections import Counter

import numpy as np
import pytest
import torch  # noqa: F401  (loads libtorch before etc_ext._C)
from PIL import Image

from etc_ext.data import shapes
from etc_ext.data.shapes import COLORS, SHAPE_PLURALS, SHAPES, generate_shapes_dataset


NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight"]


def _load(out_dir, split):
    with open(os.path.join(out_dir, f"{split}.json")) as f:
        samples = json.load(f)
    with open(os.path.join(out_dir, f"{split}_scenes.json")) as f:
        scenes = {scene["image"]: scene for scene in json.load(f)["scenes"]}
    return samples, scenes


def _question_answer_pairs(sample):
    turns = sample["conversations"]
    return [(turns[i]["value"], turns[i + 1]["value"]) for i in range(0, len(turns), 2)]


def _expected_answer(question, scene):
    """Answers a question from the scene metadata, independently of the generator's code."""
    objects = scene["objects"]
    by_cell = {(o["row"] + 1, o["col"]): o for o in objects}
    if m := re.search(r"shape in row (\d+), column ([a-z])\?", question):
        return by_cell[(int(m[1]), ord(m[2]) - ord("a"))]["color"]
    if m := re.search(r"(?:What shape is|Which shape is drawn) in row (\d+), column ([a-z])\?", question):
        return by_cell[(int(m[1]), ord(m[2]) - ord("a"))]["shape"]
    if m := re.search(r"(?:Where is|In which cell is) the (\w+) shape\?", question):  # named by color alone
        matches = [o for o in objects if o["color"] == m[1]]
        assert len(matches) == 1, f"ambiguous where-question {question!r}"
        return "abcdefgh"[matches[0]["col"]] + str(matches[0]["row"] + 1)
    if m := re.search(r"Is there an? (\w+) shape(?: in the image)?\?", question):
        return "yes" if any(o["color"] == m[1] for o in objects) else "no"
    if m := re.search(r"(?:Where is|In which cell is) the (\w+) (\w+)\?", question):
        matches = [o for o in objects if (o["color"], o["shape"]) == (m[1], m[2])]
        assert len(matches) == 1, f"ambiguous where-question {question!r}"
        return "abcdefgh"[matches[0]["col"]] + str(matches[0]["row"] + 1)
    if m := re.search(r"How many (\w+) shapes are there\?|How many shapes are (\w+)\?", question):
        color = m[1] or m[2]
        return NUMBERS[sum(o["color"] == color for o in objects)]
    if m := re.search(r"How many (\w+) (?:are there|can you see)\?", question):
        shape = {plural: shape for shape, plural in SHAPE_PLURALS.items()}[m[1]]
        return NUMBERS[sum(o["shape"] == shape for o in objects)]
    if m := re.search(r"Is there an? (\w+) (\w+)(?: in the image)?\?", question):
        return "yes" if any((o["color"], o["shape"]) == (m[1], m[2]) for o in objects) else "no"
    raise AssertionError(f"unrecognised question {question!r}")


def _classify_shape(pixels, obj):
    """Recognises a shape from the pixels of its color around its center (area and diagonal/horizontal extent)."""
    (x, y), r = obj["center"], obj["radius"]
    x0, x1 = int(np.floor(x - r)) - 1, int(np.ceil(x + r)) + 2
    y0, y1 = int(np.floor(y - r)) - 1, int(np.ceil(y + r)) + 2
    mask = np.all(pixels[y0:y1, x0:x1] == np.array(COLORS[obj["color"]]), axis=-1)
    area = mask.sum() / (2 * r) ** 2
    cy, cx = int(round(y)) - y0, int(round(x)) - x0
    horizontal = mask[cy].sum()
    diagonal = sum(
        mask[cy + d, cx + d] for d in range(-mask.shape[0], mask.shape[0]) if 0 <= cy + d < mask.shape[0]
        and 0 <= cx + d < mask.shape[1]
    ) * np.sqrt(2)
    ratio = diagonal / horizontal
    if ratio < 0.7:
        return "cross"  # thin arms: short along the diagonal
    if area < 0.6:
        return "triangle"  # about 0.43 of its box, against 0.72 (square) and 0.79 (circle)
    return "square" if ratio > 1.2 else "circle"


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    generate_shapes_dataset(out, 120, seed=3, split="train", progress=False)
    return out


def test_deterministic_by_seed(tmp_path):
    paths = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        paths.append(generate_shapes_dataset(tmp_path / name, 15, seed=seed, split="train", progress=False))
    a, b, c = (open(p).read() for p in paths)
    assert a == b
    assert a != c
    for i in range(15):
        image = f"images/train/{i:06d}.png"
        assert (tmp_path / "a" / image).read_bytes() == (tmp_path / "b" / image).read_bytes()
    assert (tmp_path / "a" / "train_scenes.json").read_text() == (tmp_path / "b" / "train_scenes.json").read_text()


def test_llava_format(train_dir):
    samples, scenes = _load(train_dir, "train")
    assert len(samples) == 2 * 120  # two questions per image, one sample each
    assert len(scenes) == 120
    assert len({s["id"] for s in samples}) == len(samples)
    for sample in samples:
        assert set(sample) == {"id", "image", "conversations", "question_types"}
        assert os.path.isfile(os.path.join(train_dir, sample["image"]))
        human, gpt = sample["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        assert human["value"].startswith("<image>\n") and human["value"].count("<image>") == 1
        assert human["value"].endswith("\nAnswer the question using a single word or phrase.")
        assert re.fullmatch(r"[a-z0-9]+", gpt["value"]), gpt["value"]
    with Image.open(os.path.join(train_dir, samples[0]["image"])) as image:
        assert image.size == (168, 168) and image.mode == "RGB"
    # The two questions about one image are of different types.
    by_image = {}
    for sample in samples:
        by_image.setdefault(sample["image"], []).extend(sample["question_types"])
    assert all(len(set(types)) == len(types) == 2 for types in by_image.values())


def test_answers_match_scene_metadata(train_dir):
    samples, scenes = _load(train_dir, "train")
    seen_types = Counter()
    for sample in samples:
        for question, answer in _question_answer_pairs(sample):
            assert answer == _expected_answer(question, scenes[sample["image"]]), (sample["id"], question)
        seen_types.update(sample["question_types"])
    assert set(seen_types) == set(shapes.QUESTION_TYPES)


def test_color_question_types(tmp_path):
    """The color-only types (the demo's) answer from the scene, never mention a shape name and balance answers."""
    path = shapes.generate_shapes_dataset(tmp_path, 150, seed=3, split="val", grid_sizes=(3,),
                                          question_types=shapes.COLOR_QUESTION_TYPES, questions_per_image=4,
                                          multi_turn=True, answer_prompt=None, progress=False)  # fmt: skip
    with open(path) as f:
        samples = json.load(f)
    with open(tmp_path / "val_scenes.json") as f:
        scenes = {scene["image"]: scene for scene in json.load(f)["scenes"]}
    answers = {t: Counter() for t in shapes.COLOR_QUESTION_TYPES}
    for sample in samples:
        for question_type, (question, answer) in zip(sample["question_types"], _question_answer_pairs(sample)):
            assert answer == _expected_answer(question, scenes[sample["image"]]), (sample["id"], question)
            assert not any(name in question for name in shapes.SHAPES)
            answers[question_type][answer] += 1
    assert set(answers["exists_color"]) == {"yes", "no"}
    assert abs(answers["exists_color"]["yes"] - answers["exists_color"]["no"]) <= 0.05 * sum(answers["exists_color"].values())
    assert len(answers["where_color"]) == 9 and len(answers["color"]) == len(shapes.COLORS)
    with pytest.raises(ValueError, match="question type"):
        shapes.candidate_questions(shapes.sample_scene(random.Random(0), 3), "size")


def test_pixels_match_scene_metadata(train_dir):
    _, scenes = _load(train_dir, "train")
    checked = Counter()
    for path, scene in list(scenes.items())[:40]:
        pixels = np.asarray(Image.open(os.path.join(train_dir, path)).convert("RGB"))
        grid, size = scene["grid_size"], scene["image_size"]
        cell = size / grid
        occupied = {(o["row"], o["col"]) for o in scene["objects"]}
        for o in scene["objects"]:
            x, y = o["center"]
            assert tuple(pixels[int(round(y)), int(round(x))]) == COLORS[o["color"]]
            # The object's cell center is also inside it, so reading the cell center gives its color.
            assert tuple(pixels[int((o["row"] + 0.5) * cell), int((o["col"] + 0.5) * cell)]) == COLORS[o["color"]]
            assert _classify_shape(pixels, o) == o["shape"], (path, o)
            checked[o["shape"]] += 1
        for row in range(grid):
            for col in range(grid):
                if (row, col) not in occupied:
                    assert tuple(pixels[int((row + 0.5) * cell), int((col + 0.5) * cell)]) == shapes.BACKGROUND
    assert set(checked) == set(SHAPES)


def test_answers_are_balanced(train_dir):
    samples, _ = _load(train_dir, "train")
    answers = {t: Counter() for t in shapes.QUESTION_TYPES}
    for sample in samples:
        answers[sample["question_types"][0]][sample["conversations"][1]["value"]] += 1
    assert set(answers["exists"]) == {"yes", "no"}
    assert abs(answers["exists"]["yes"] - answers["exists"]["no"]) <= 1
    assert set(answers["color"]) == set(COLORS)
    assert set(answers["shape"]) == set(SHAPES)
    assert set(answers["count"]) == set(NUMBERS[:5])
    for question_type in ("color", "shape", "exists"):  # every scene allows every answer of these types
        counts = answers[question_type]
        assert max(counts.values()) - min(counts.values()) <= 1, (question_type, counts)
    # `four` and the cells of the fourth row/column are not always available: looser bounds on the majority answer.
    assert max(answers["count"].values()) <= 1.5 * sum(answers["count"].values()) / 5, answers["count"]
    assert max(answers["where"].values()) <= 0.15 * sum(answers["where"].values()), answers["where"]
    # A constant guess per question type scores little.
    total = sum(sum(c.values()) for c in answers.values())
    best_constant = sum(max(c.values()) for c in answers.values())
    assert best_constant / total < 0.3


def test_splits_are_disjoint(tmp_path):
    generate_shapes_dataset(tmp_path, 150, seed=0, split="train", grid_sizes=(3,), progress=False)
    generate_shapes_dataset(tmp_path, 150, seed=0, split="test", grid_sizes=(3,), progress=False)
    keys, digests = {}, {}
    for split in ("train", "test"):
        _, scenes = _load(tmp_path, split)
        assert len(scenes) == 150
        keys[split] = {
            (s["grid_size"], tuple(sorted((o["row"], o["col"], o["shape"], o["color"]) for o in s["objects"])))
            for s in scenes.values()
        }
        digests[split] = {hashlib.sha256((tmp_path / p).read_bytes()).hexdigest() for p in scenes}
        assert len(keys[split]) == 150 and len(digests[split]) == 150  # no repeated scene within a split
    assert not keys["train"] & keys["test"]
    assert not digests["train"] & digests["test"]


def test_multi_turn(tmp_path):
    path = generate_shapes_dataset(tmp_path, 20, seed=1, split="val", questions_per_image=3, multi_turn=True,
                                   progress=False)  # fmt: skip
    samples, scenes = _load(tmp_path, "val")
    assert path.endswith("val.json") and len(samples) == 20
    for sample in samples:
        turns = sample["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * 3
        assert turns[0]["value"].startswith("<image>\n")
        assert all("<image>" not in t["value"] for t in turns[1:])
        assert len(set(sample["question_types"])) == 3
        for question, answer in _question_answer_pairs(sample):
            assert answer == _expected_answer(question, scenes[sample["image"]])


def test_cli_and_speed(tmp_path):
    start = time.perf_counter()
    shapes.main(["--out", str(tmp_path), "--num-images", "200", "--num-eval-images", "20", "--seed", "5",
                 "--no-progress"])  # fmt: skip
    elapsed = time.perf_counter() - start
    train, _ = _load(tmp_path, "train")
    test, _ = _load(tmp_path, "test")
    assert len(train) == 400 and len(test) == 40
    assert all(s["id"].startswith("shapes-test-") for s in test)
    assert elapsed < 30, f"200 images took {elapsed:.1f} s"  # about 0.5 s on one core


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"split": "dev"}, "unknown split"),
        ({"question_types": ("color", "size")}, "question_types"),
        ({"questions_per_image": 6}, "questions_per_image"),
        ({"grid_sizes": (1,)}, "grid_sizes"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_shapes_dataset(tmp_path, 2, progress=False, **kwargs)
