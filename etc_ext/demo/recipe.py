"""The demo's recipe: data, model sizes, and the training runs behind every shipped checkpoint.

One place for every number, read by `etc_ext.demo.reproduce` (which trains the checkpoints) and by
`etc_ext.demo.run` (which evaluates them), so that what the demo reports is what the recipe says.

- Data: `etc_ext.data.shapes` scenes on a 3x3 grid, 168 px images (144 visual tokens with patch 14), the five
  question types, no answer prompt (the questions already ask for one word). Training samples are multi-turn (one
  image, one question of each type), so the 144 visual tokens are paid once per five questions; validation and test
  samples are single-turn, one question per sample, as the demo asks them. Splits are disjoint by scene (see
  `etc_ext.data.shapes`): model choices read the validation split, the test split is only reported.
- Model: a LLaVA-1.5 architecture (`transformers` CLIP vision tower, two-layer MLP projector, Llama language model)
  with random initial weights (`etc_ext.models.tiny`).
- Runs: the full-token model trains everything (vision tower included) from scratch; every ETC variant starts from
  it and trains the projector, the language model and the ETC parts with the vision tower frozen, as in the paper.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..models.tiny import TinyLlavaSizes


DATA_SEED = 0
GRID_SIZES = (3,)
QUESTION_TYPES = ("color", "shape", "where", "count", "exists")
ANSWER_PROMPT = None  # the questions ask for a one-word answer already; no LLaVA short-answer suffix
NUM_TRAIN_IMAGES = 6000  # multi-turn samples, one question of each type per image
NUM_VAL_IMAGES = 150  # x 2 questions, single-turn: model selection
NUM_TEST_IMAGES = 150  # x 2 questions, single-turn: what the demo reports
EVAL_QUESTIONS_PER_IMAGE = 2

MODEL_SEED = 0
SIZES = TinyLlavaSizes(
    vision_hidden_size=64,
    vision_intermediate_size=256,
    vision_layers=2,
    vision_heads=2,
    text_hidden_size=128,
    text_intermediate_size=512,
    text_layers=4,
    text_heads=4,
    text_kv_heads=2,
    max_position_embeddings=512,
)

BUDGETS = (1, 4, 16)  # visual tokens kept per image: ETC's M and the baselines' K

# lambda of the distillation loss. The paper's 1e-5 is for L_VID summed over N * D = 576 * 4096 terms (LLaVA-1.5-7B);
# the tiny model's sum has 144 * 128 terms, so the same weight relative to the cross-entropy is 1e-5 * 576 * 4096 /
# (144 * 128) = 1.28e-3.
VID_WEIGHT = 1e-5 * (576 * 4096) / (144 * 128)


@dataclass(frozen=True)
class Run:
    """One training run of the recipe.

    Attributes:
        name: folder of its checkpoint under `etc_ext/demo/checkpoints/` (and of its run under the reproduce output).
        label: how the demo's table names it.
        etc: the `ETCConfig` fields (None: the full-token model).
        training: `etc_ext.train.TrainingArguments` fields of the run.
    """

    name: str
    label: str
    etc: dict | None
    training: dict = field(default_factory=dict)

    @property
    def num_compression_tokens(self) -> int | None:
        return None if self.etc is None else self.etc["num_compression_tokens"]

    def to_dict(self) -> dict:
        return asdict(self)


FULL_TRAINING = {
    "train_vision_tower": True,
    "per_device_batch_size": 16,
    "max_steps": 1200,
    "learning_rate": 2e-3,
    "warmup_ratio": 0.05,
    "min_lr_ratio": 0.05,
    "weight_decay": 0.0,
    "seed": 0,
}
ETC_TRAINING = {
    "train_vision_tower": False,
    "per_device_batch_size": 16,
    "max_steps": 400,
    "learning_rate": 5e-4,
    "etc_learning_rate": 2e-3,
    "warmup_ratio": 0.05,
    "min_lr_ratio": 0.05,
    "weight_decay": 0.0,
    "seed": 0,
}


def _etc(m: int, loss: str) -> dict:
    return {
        "num_compression_tokens": m,
        "loss": loss,
        "vid_weight": VID_WEIGHT,
        "alpha": 0.6,
        "target_layer": -1,
        "teacher": "frozen",
        "decoder_hidden_size": 128,
        "decoder_num_layers": 2,
    }


FULL = Run("full", "full model", None, FULL_TRAINING)
ETC_RUNS = (
    Run("etc-m1-vid", "ETC (VID)", _etc(1, "vid"), ETC_TRAINING),
    Run("etc-m4-vid", "ETC (VID)", _etc(4, "vid"), ETC_TRAINING),
    Run("etc-m16-vid", "ETC (VID)", _etc(16, "vid"), ETC_TRAINING),
    Run("etc-m1-mse", "ETC (MSE)", _etc(1, "mse"), ETC_TRAINING),
    Run("etc-m1-none", "ETC (no reconstruction)", _etc(1, "none"), ETC_TRAINING),
)
RUNS = (FULL, *ETC_RUNS)


def run_by_name(name: str) -> Run:
    for run in RUNS:
        if run.name == name:
            return run
    raise ValueError(f"unknown demo run {name!r}, expected one of {[r.name for r in RUNS]}")


def data_kwargs(split: str) -> dict:
    """`generate_shapes_dataset` arguments of a split (besides `out_dir` and `num_images`)."""
    common = {
        "seed": DATA_SEED,
        "split": split,
        "grid_sizes": GRID_SIZES,
        "question_types": QUESTION_TYPES,
        "answer_prompt": ANSWER_PROMPT,
    }
    if split == "train":
        return {**common, "questions_per_image": len(QUESTION_TYPES), "multi_turn": True}
    return {**common, "questions_per_image": EVAL_QUESTIONS_PER_IMAGE, "multi_turn": False}


def default_num_images(split: str) -> int:
    return {"train": NUM_TRAIN_IMAGES, "val": NUM_VAL_IMAGES, "test": NUM_TEST_IMAGES}[split]
