"""Generated instruction-VQA data: colored shapes on a grid.

Every image is a `grid_size x grid_size` grid (3x3 or 4x4 by default) with a few colored shapes, one per occupied
cell. Questions can only be answered by combining the instruction with the image (which cell, which color, which
shape), and every answer is a single lower-case word:

| type     | example question                                  | answers                        |
|----------|---------------------------------------------------|--------------------------------|
| `color`  | What color is the shape in row 2, column c?       | red, green, blue, ...          |
| `shape`  | What shape is in row 1, column a?                 | circle, square, triangle, cross|
| `where`  | Where is the blue triangle?                       | a cell name such as `c2`       |
| `count`  | How many red shapes are there?                    | zero, one, two, three, four    |
| `exists` | Is there a green cross?                           | yes, no                        |

Four more types name objects by color only, for models too small to tell shapes apart (the demo's tiny LLaVA):
`where_color` ("Where is the blue shape?", asked only when one object has that color), `count_color` ("How many red
shapes are there?"), `exists_color` ("Is there a green shape?"); with `color` they form `COLOR_QUESTION_TYPES`.

Rows are numbered from 1 at the top, columns are lettered from `a` at the left, and a cell is named by its column
then its row (`c2` is column c, row 2), as on a chess board read from the top.

The data is written in the LLaVA conversation format (the `llava_v1_5_mix665k` layout), so the training and evaluation
code reads it exactly like real data:

```
out_dir/
    train.json          [{"id", "image": "images/train/000000.png", "conversations": [...], "question_types": [...]}]
    train_scenes.json          {"params": {...}, "scenes": [{"image", "grid_size", "objects": [...]}]}
    images/train/000000.png
```

Answers are balanced: within each question type the generator picks, among the questions a scene allows, one whose
answer has been used least so far, so a constant guess scores about `1 / (number of answers)` of its type.

Splits are disjoint by construction: a scene (grid size and the set of `(row, column, shape, color)`) belongs to one
split only, decided by a hash of the scene, and every split draws from its own seed. Generation is deterministic given
`(seed, split)` and the other arguments.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw


SHAPES = ("circle", "square", "triangle", "cross")
SHAPE_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
COLORS = {
    "red": (220, 40, 40),
    "green": (30, 160, 60),
    "blue": (40, 90, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 60, 180),
    "orange": (245, 135, 30),
}
NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
    "nine", "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
)  # fmt: skip
MAX_COUNT_ANSWER = 4  # count questions are asked only when the answer is zero..four, so the answers stay balanced
QUESTION_TYPES = ("color", "shape", "where", "count", "exists")
COLOR_QUESTION_TYPES = ("color", "where_color", "count_color", "exists_color")  # answerable without telling shapes apart
ALL_QUESTION_TYPES = QUESTION_TYPES + COLOR_QUESTION_TYPES[1:]
DEFAULT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
BACKGROUND = (255, 255, 255)
GRID_LINE = (200, 200, 200)

# Image size of the demo: 168 px with a patch-14 vision tower gives 12 x 12 = 144 visual tokens, and the cells of a
# 3x3 (56 px) or 4x4 (42 px) grid are whole numbers of patches.
DEFAULT_IMAGE_SIZE = 168

# Split of the scene space: a scene belongs to the split whose bucket range holds `hash(scene) % 100`.
SPLIT_BUCKETS = {"train": range(0, 80), "val": range(80, 90), "test": range(90, 100)}

QUESTION_TEMPLATES = {
    "color": (
        "What color is the shape in row {row}, column {col}?",
        "What is the color of the shape in row {row}, column {col}?",
    ),
    "shape": (
        "What shape is in row {row}, column {col}?",
        "Which shape is drawn in row {row}, column {col}?",
    ),
    "where": (
        "Where is the {color} {shape}?",
        "In which cell is the {color} {shape}?",
    ),
    "count_color": ("How many {color} shapes are there?", "How many shapes are {color}?"),
    "count_shape": ("How many {shapes} are there?", "How many {shapes} can you see?"),
    "exists": ("Is there a {color} {shape}?", "Is there a {color} {shape} in the image?"),
    "where_color": ("Where is the {color} shape?", "In which cell is the {color} shape?"),
    "exists_color": ("Is there a {color} shape?", "Is there a {color} shape in the image?"),
}


def column_letter(col: int) -> str:
    """Letter of a 0-based column index: 0 -> "a"."""
    return "abcdefghijklmnopqrstuvwxyz"[col]


def cell_name(row: int, col: int) -> str:
    """Name of the cell at 0-based `(row, col)`: column letter then 1-based row, e.g. `(1, 2) -> "c2"`."""
    return f"{column_letter(col)}{row + 1}"


@dataclass(frozen=True)
class ShapeObject:
    """One shape of a scene. `center` and `radius` are in pixels; the pixel at `center` has the shape's color."""

    row: int
    col: int
    shape: str
    color: str
    center: tuple[float, float]
    radius: float


@dataclass(frozen=True)
class Scene:
    """A grid of `grid_size x grid_size` cells, at most one object per cell, drawn on `image_size` pixels."""

    grid_size: int
    image_size: int
    objects: tuple[ShapeObject, ...]

    def key(self) -> tuple:
        """What the scene shows, without drawing jitter: two scenes with the same key ask the same questions."""
        return (self.grid_size, tuple(sorted((o.row, o.col, o.shape, o.color) for o in self.objects)))

    def to_dict(self) -> dict:
        objects = [asdict(o) for o in self.objects]
        return {"grid_size": self.grid_size, "image_size": self.image_size, "objects": objects}


@dataclass(frozen=True)
class Question:
    """A question about a scene: `text` (no image placeholder, no answer prompt) and its one-word `answer`."""

    type: str
    text: str
    answer: str


def scene_split(scene: Scene) -> str:
    """The split a scene belongs to (stable across runs and machines: sha256 of the scene key)."""
    digest = hashlib.sha256(repr(scene.key()).encode()).digest()
    bucket = int.from_bytes(digest[:8], "little") % 100
    for split, buckets in SPLIT_BUCKETS.items():
        if bucket in buckets:
            return split
    raise AssertionError(f"bucket {bucket} belongs to no split")  # SPLIT_BUCKETS covers 0..99


def _split_seed(seed: int, split: str) -> int:
    """Seed of one split, so that train, val and test draw independent streams from the same user seed."""
    return int.from_bytes(hashlib.sha256(f"etc-ext-shapes/{seed}/{split}".encode()).digest()[:8], "little")


def sample_scene(
    rng: random.Random,
    grid_size: int,
    image_size: int = DEFAULT_IMAGE_SIZE,
    min_objects: int = 2,
    max_objects: int | None = None,
) -> Scene:
    """Draws a scene: `n` objects (uniform in `[min_objects, max_objects]`, default max `2 * grid_size`) in distinct
    random cells, each with a uniformly random shape and color, a random size and a small offset from the cell center
    (the cell center always stays inside the shape)."""
    num_cells = grid_size * grid_size
    max_objects = min(2 * grid_size, num_cells) if max_objects is None else max_objects
    if not 1 <= min_objects <= max_objects <= num_cells:
        raise ValueError(
            f"need 1 <= min_objects <= max_objects <= {num_cells} cells for a {grid_size}x{grid_size} grid, "
            f"got min_objects={min_objects}, max_objects={max_objects}"
        )
    cell = image_size / grid_size
    num_objects = rng.randint(min_objects, max_objects)
    # Each scene draws from a random sub-palette of colors and shapes, so that repeated colors/shapes (counts above
    # one, distractors that share the color or the shape of the asked object) are common.
    palette = rng.sample(list(COLORS), rng.randint(2, len(COLORS)))
    shapes = rng.sample(SHAPES, rng.randint(2, len(SHAPES)))
    objects = []
    for index in sorted(rng.sample(range(num_cells), num_objects)):
        row, col = divmod(index, grid_size)
        shape = rng.choice(shapes)
        color = rng.choice(palette)
        radius = cell * rng.uniform(0.28, 0.38)
        center_x = (col + 0.5 + rng.uniform(-0.08, 0.08)) * cell
        center_y = (row + 0.5 + rng.uniform(-0.08, 0.08)) * cell
        center = (center_x, center_y)
        objects.append(ShapeObject(row, col, shape, color, center, radius))
    return Scene(grid_size, image_size, tuple(objects))


def draw_scene(scene: Scene) -> Image.Image:
    """Renders a scene as an RGB image of `image_size x image_size` pixels: white background, light grid lines,
    flat-colored shapes (no anti-aliasing, so the pixel at an object's center has exactly its color)."""
    size = scene.image_size
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = size / scene.grid_size
    for i in range(1, scene.grid_size):
        line = round(i * cell)
        draw.line([(line, 0), (line, size - 1)], fill=GRID_LINE, width=1)
        draw.line([(0, line), (size - 1, line)], fill=GRID_LINE, width=1)
    for obj in scene.objects:
        (x, y), r, fill = obj.center, obj.radius, COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        elif obj.shape == "square":
            s = 0.85 * r
            draw.rectangle([x - s, y - s, x + s, y + s], fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(x, y - r), (x - 0.95 * r, y + 0.8 * r), (x + 0.95 * r, y + 0.8 * r)], fill=fill)
        elif obj.shape == "cross":
            t = 0.3 * r
            draw.rectangle([x - r, y - t, x + r, y + t], fill=fill)
            draw.rectangle([x - t, y - r, x + t, y + r], fill=fill)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}, expected one of {SHAPES}")
    return image


def candidate_questions(scene: Scene, question_type: str) -> list[tuple[str, dict, str]]:
    """All questions of one type that a scene can answer, as `(template_key, fields, answer)`."""
    if question_type not in ALL_QUESTION_TYPES:
        raise ValueError(f"unknown question type {question_type!r}, expected one of {ALL_QUESTION_TYPES}")
    objects = scene.objects
    candidates = []
    colors = Counter(o.color for o in objects)
    if question_type == "where_color":
        return [("where_color", {"color": o.color}, cell_name(o.row, o.col)) for o in objects if colors[o.color] == 1]
    if question_type == "count_color":
        return [("count_color", {"color": color}, NUMBER_WORDS[colors[color]]) for color in COLORS]
    if question_type == "exists_color":
        return [("exists_color", {"color": color}, "yes" if colors[color] else "no") for color in COLORS]
    if question_type in ("color", "shape"):
        for o in objects:
            fields = {"row": o.row + 1, "col": column_letter(o.col)}
            candidates.append((question_type, fields, o.color if question_type == "color" else o.shape))
    elif question_type == "where":
        combos = Counter((o.color, o.shape) for o in objects)
        for o in objects:
            if combos[(o.color, o.shape)] == 1:  # only objects that the question names unambiguously
                candidates.append(("where", {"color": o.color, "shape": o.shape}, cell_name(o.row, o.col)))
    elif question_type == "count":
        colors = Counter(o.color for o in objects)
        shapes = Counter(o.shape for o in objects)
        for color in COLORS:
            candidates.append(("count_color", {"color": color}, NUMBER_WORDS[colors[color]]))
        for shape in SHAPES:
            candidates.append(("count_shape", {"shapes": SHAPE_PLURALS[shape]}, NUMBER_WORDS[shapes[shape]]))
    else:  # exists
        present = {(o.color, o.shape) for o in objects}
        for color in COLORS:
            for shape in SHAPES:
                answer = "yes" if (color, shape) in present else "no"
                candidates.append(("exists", {"color": color, "shape": shape}, answer))
    return candidates


def with_articles(text: str) -> str:
    """English indefinite articles: "a" before a word that starts with a vowel becomes "an" ("Is there a orange
    shape?" -> "Is there an orange shape?"). Of the generator's words only "orange" starts with one."""
    return _ARTICLE_BEFORE_VOWEL.sub(r"\1n", text)


_ARTICLE_BEFORE_VOWEL = re.compile(r"\b([Aa])(?= [aeiouAEIOU])")


def render_question(template_key: str, fields: dict, rng: random.Random, articles: bool = True) -> str:
    """One question text: a random template of `template_key` filled with `fields`, with English articles (`"an
    orange"`) unless `articles=False` (the text the demo's first checkpoints were trained on: `"a orange"`)."""
    text = rng.choice(QUESTION_TEMPLATES[template_key]).format(**fields)
    return with_articles(text) if articles else text


def pick_balanced_question(
    rng: random.Random,
    scene: Scene,
    question_type: str,
    answer_counts: Counter,
    allowed=None,
    articles: bool = True,
) -> Question | None:
    """Picks a question of `question_type` whose answer is the least used so far in `answer_counts` (ties broken at
    random; `count` answers above `MAX_COUNT_ANSWER` are not asked), phrases it with a random template
    (`render_question`), and updates `answer_counts`. None if the scene allows no such question (e.g. `where` when
    every (color, shape) appears twice). `allowed`, if given, is a predicate on the `(template_key, fields, answer)`
    candidates of `candidate_questions`: only those it accepts are asked (the demo's follow-up conversations use it
    so that no answer gives a later question away)."""
    candidates = candidate_questions(scene, question_type)
    if question_type in ("count", "count_color"):
        candidates = [c for c in candidates if NUMBER_WORDS.index(c[2]) <= MAX_COUNT_ANSWER]
    if allowed is not None:
        candidates = [c for c in candidates if allowed(c)]
    if not candidates:
        return None
    available = sorted({answer for _, _, answer in candidates})
    fewest = min(answer_counts[a] for a in available)
    answer = rng.choice([a for a in available if answer_counts[a] == fewest])
    template_key, fields, _ = rng.choice([c for c in candidates if c[2] == answer])
    text = render_question(template_key, fields, rng, articles)
    answer_counts[answer] += 1
    return Question(question_type, text, answer)


def _human_turn(question: Question, with_image: bool, answer_prompt: str | None) -> str:
    value = question.text if not answer_prompt else f"{question.text}\n{answer_prompt}"
    return f"<image>\n{value}" if with_image else value


def generate_shapes_dataset(
    out_dir: str | os.PathLike,
    num_images: int,
    seed: int = 0,
    split: str = "train",
    *,
    grid_sizes: tuple[int, ...] = (3, 4),
    image_size: int = DEFAULT_IMAGE_SIZE,
    questions_per_image: int = 2,
    multi_turn: bool = False,
    question_types: tuple[str, ...] = QUESTION_TYPES,
    answer_prompt: str | None = DEFAULT_ANSWER_PROMPT,
    min_objects: int = 2,
    max_objects: int | None = None,
    articles: bool = True,
    progress: bool = True,
) -> str:
    """Generates `num_images` scenes of one split and writes their images, questions and metadata under `out_dir`.

    Args:
        out_dir: output folder; `<split>.json`, `<split>_scenes.json` and `images/<split>/*.png` are (over)written.
        num_images: number of distinct images (scenes) of this split.
        seed: user seed; each split derives its own stream from it, so `split="train"` and `split="test"` with the
            same seed share nothing.
        split: one of `"train"`, `"val"`, `"test"`. A scene belongs to exactly one split (hash of the scene), so no
            scene appears in two splits whatever the seeds.
        grid_sizes: grid sizes drawn uniformly per image.
        image_size: image side in pixels (168 gives 144 patches of 14 px).
        questions_per_image: distinct question types asked about each image (at most `len(question_types)`).
        multi_turn: False writes one sample per question (samples share the image); True writes one multi-turn
            sample per image, with `<image>` in its first human turn only.
        question_types: subset of `QUESTION_TYPES` to ask.
        answer_prompt: appended to every question on its own line (LLaVA-1.5's short-answer prompt by default);
            None for bare questions.
        min_objects, max_objects: objects per image, drawn uniformly (default 2 to `2 * grid_size`).
        articles: write "an orange"; False writes "a orange", as the first demo checkpoints were trained
            (`render_question`). The draws are the same either way: only those question texts differ.
        progress: show a tqdm progress bar.

    Returns:
        The path of `<out_dir>/<split>.json`, a list of LLaVA conversation samples. Besides `id`, `image` (relative to
        `out_dir`) and `conversations`, each sample has `question_types` (one per human turn).
    """
    if split not in SPLIT_BUCKETS:
        raise ValueError(f"unknown split {split!r}, expected one of {tuple(SPLIT_BUCKETS)}")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    unknown = set(question_types) - set(ALL_QUESTION_TYPES)
    if unknown or not question_types:
        raise ValueError(f"question_types must be a non-empty subset of {ALL_QUESTION_TYPES}, got {question_types}")
    if not 1 <= questions_per_image <= len(question_types):
        raise ValueError(f"questions_per_image must be in [1, {len(question_types)}], got {questions_per_image}")
    if not grid_sizes or any(g < 2 or g > 26 for g in grid_sizes):
        raise ValueError(f"grid_sizes must be non-empty, each in [2, 26], got {grid_sizes}")
    if any(image_size < 4 * g for g in grid_sizes):
        raise ValueError(f"image_size={image_size} is too small for grids {grid_sizes}")

    rng = random.Random(_split_seed(seed, split))
    image_dir = os.path.join(out_dir, "images", split)
    os.makedirs(image_dir, exist_ok=True)
    answer_counts = {t: Counter() for t in question_types}
    seen_keys: set[tuple] = set()
    samples, scenes = [], []

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_images, desc=f"shapes {split}", unit="img")
    max_draws = 1000 * num_images
    draws = 0
    while len(scenes) < num_images:
        draws += 1
        if draws > max_draws:
            raise RuntimeError(
                f"found only {len(scenes)} distinct {split} scenes in {max_draws} draws: the scene space of grids "
                f"{grid_sizes} is too small for num_images={num_images}"
            )
        scene = sample_scene(rng, rng.choice(grid_sizes), image_size, min_objects, max_objects)
        key = scene.key()
        if key in seen_keys or scene_split(scene) != split:
            continue

        # Question types of this image: a random order, skipping types the scene cannot answer.
        questions = []
        for question_type in rng.sample(list(question_types), len(question_types)):
            question = pick_balanced_question(
                rng, scene, question_type, answer_counts[question_type], articles=articles
            )
            if question is not None:
                questions.append(question)
            if len(questions) == questions_per_image:
                break
        if len(questions) < questions_per_image:
            continue
        seen_keys.add(key)

        index = len(scenes)
        image_path = f"images/{split}/{index:06d}.png"
        draw_scene(scene).save(os.path.join(out_dir, image_path))
        scenes.append({"image": image_path, **scene.to_dict()})
        if multi_turn:
            conversations = []
            for turn, question in enumerate(questions):
                conversations.append({"from": "human", "value": _human_turn(question, turn == 0, answer_prompt)})
                conversations.append({"from": "gpt", "value": question.answer})
            samples.append(
                {
                    "id": f"shapes-{split}-{index:06d}",
                    "image": image_path,
                    "conversations": conversations,
                    "question_types": [q.type for q in questions],
                }
            )
        else:
            for turn, question in enumerate(questions):
                samples.append(
                    {
                        "id": f"shapes-{split}-{index:06d}-{turn}",
                        "image": image_path,
                        "conversations": [
                            {"from": "human", "value": _human_turn(question, True, answer_prompt)},
                            {"from": "gpt", "value": question.answer},
                        ],
                        "question_types": [question.type],
                    }
                )
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    params = {
        "seed": seed,
        "split": split,
        "num_images": num_images,
        "grid_sizes": list(grid_sizes),
        "image_size": image_size,
        "questions_per_image": questions_per_image,
        "multi_turn": multi_turn,
        "question_types": list(question_types),
        "answer_prompt": answer_prompt,
        "min_objects": min_objects,
        "max_objects": max_objects,
        "articles": articles,
    }
    with open(os.path.join(out_dir, f"{split}_scenes.json"), "w") as f:
        json.dump({"params": params, "scenes": scenes}, f)
    json_path = os.path.join(out_dir, f"{split}.json")
    with open(json_path, "w") as f:
        json.dump(samples, f, indent=1)
    return json_path


def shapes_vocabulary(grid_sizes: tuple[int, ...] = (3, 4, 5, 6)) -> list[str]:
    """Every text the generator can write (question templates filled in every way, answers, the answer prompt), as a
    list of strings: the corpus that the demo tokenizer is built from. The templates are filled without
    `with_articles` ("a orange"), as when the tokenizer was first built: its merges, hence every token id of the
    demo tokenizer and of the checkpoints trained with it, stay the same, and " an" is a whole token anyway
    (`etc_ext.data.processor.COMMON_WORDS`)."""
    max_grid = max(grid_sizes)
    texts = [DEFAULT_ANSWER_PROMPT, "yes", "no", *SHAPES, *COLORS, *NUMBER_WORDS]
    texts += [cell_name(r, c) for r in range(max_grid) for c in range(max_grid)]
    for key, templates in QUESTION_TEMPLATES.items():
        for template in templates:
            if key in ("color", "shape"):
                cells = [(r, c) for r in range(max_grid) for c in range(max_grid)]
                texts += [template.format(row=r + 1, col=column_letter(c)) for r, c in cells]
            elif key in ("where", "exists"):
                texts += [template.format(color=color, shape=shape) for color in COLORS for shape in SHAPES]
            elif key in ("count_color", "where_color", "exists_color"):
                texts += [template.format(color=color) for color in COLORS]
            else:
                texts += [template.format(shapes=SHAPE_PLURALS[shape]) for shape in SHAPES]
    return texts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m etc_ext.data.shapes",
        description="Generate the colored-shapes instruction-VQA data set (LLaVA conversation json + PNG images).",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-images", type=int, required=True, help="images of the train split")
    parser.add_argument(
        "--num-eval-images", type=int, default=None, help="images of each other split (default: num-images // 5)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--splits", nargs="+", default=["train", "test"], choices=list(SPLIT_BUCKETS))
    parser.add_argument("--grid-sizes", type=int, nargs="+", default=[3, 4])
    parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    parser.add_argument("--questions-per-image", type=int, default=2)
    parser.add_argument("--multi-turn", action="store_true", help="one multi-turn sample per image")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    num_eval = args.num_eval_images if args.num_eval_images is not None else max(1, args.num_images // 5)
    for split in args.splits:
        path = generate_shapes_dataset(
            args.out,
            args.num_images if split == "train" else num_eval,
            seed=args.seed,
            split=split,
            grid_sizes=tuple(args.grid_sizes),
            image_size=args.image_size,
            questions_per_image=args.questions_per_image,
            multi_turn=args.multi_turn,
            progress=not args.no_progress,
        )
        print(path)


if __name__ == "__main__":
    main()
