"""The demo's held-out questions asked alone and as follow-ups in one conversation (etc_ext.demo.data,
etc_ext.demo.followup), English articles in the shapes questions, and the demo's 95 % intervals."""

import json
import random
from collections import Counter, defaultdict

import pytest
import torch

from etc_ext.data.shapes import Scene, ShapeObject, pick_balanced_question, scene_split, with_articles
from etc_ext.demo import recipe
from etc_ext.demo.data import generate_eval_conversations, question_mentions
from etc_ext.demo.run import answer_prior, wilson_interval


pytestmark = pytest.mark.usefixtures("few_threads")  # conftest: at most 2 threads


def _scene(objects):
    return Scene(3, 168, tuple(ShapeObject(r, c, "circle", color, (0.0, 0.0), 1.0) for r, c, color in objects))


# ------------------------------------------------------------------------------------------------ articles
def test_with_articles():
    assert with_articles("Is there a orange shape?") == "Is there an orange shape?"
    assert with_articles("Is there a red shape in the image?") == "Is there a red shape in the image?"
    assert with_articles("A orange one") == "An orange one"
    assert with_articles("Is there an orange shape?") == "Is there an orange shape?"
    assert with_articles("What is the color of the shape in row 1, column a?").endswith("column a?")


def test_articles_change_only_the_text_of_the_same_draws():
    scene = _scene([(0, 0, "orange"), (1, 1, "red")])
    asked = {}
    for articles in (True, False):
        rng, counts = random.Random(3), Counter()
        questions = [pick_balanced_question(rng, scene, "exists_color", counts, articles=articles) for _ in range(40)]
        asked[articles] = questions
    assert [q.answer for q in asked[True]] == [q.answer for q in asked[False]]
    orange = [(a.text, b.text) for a, b in zip(asked[True], asked[False]) if "orange" in a.text]
    assert orange and all(" an orange" in a and " a orange" in b for a, b in orange)
    assert all(a.text == b.text for a, b in zip(asked[True], asked[False]) if "orange" not in a.text)


# ------------------------------------------------------------------------------------------------ the questions
def test_question_mentions():
    scene = _scene([(0, 0, "red"), (2, 1, "red"), (1, 2, "blue")])
    assert question_mentions(scene, ("color", {"row": 2, "col": "c"}, "blue")) == ({"blue"}, {"c2"})
    assert question_mentions(scene, ("where_color", {"color": "blue"}, "c2")) == ({"blue"}, {"c2"})
    assert question_mentions(scene, ("count_color", {"color": "red"}, "two")) == ({"red"}, {"a1", "b3"})
    assert question_mentions(scene, ("exists_color", {"color": "green"}, "no")) == ({"green"}, set())
    with pytest.raises(ValueError, match="color question types"):
        question_mentions(scene, ("where", {"color": "red", "shape": "circle"}, "a1"))


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    kwargs = {**recipe.test_data_kwargs(), "split": "val"}  # the test split is the demo's: not made in tests
    path = generate_eval_conversations(out, 60, **kwargs)
    return out, path, kwargs


def test_eval_conversations_are_leak_free_balanced_and_deterministic(eval_data, tmp_path):
    out, path, kwargs = eval_data
    with open(path) as f:
        singles = json.load(f)
    with open(out / "val_conversations.json") as f:
        conversations = json.load(f)
    with open(out / "val_scenes.json") as f:
        scenes = json.load(f)
    assert len(conversations) == len(scenes["scenes"]) == 60 and len(singles) == 60 * kwargs["questions_per_image"]
    assert scenes["params"]["generator"] == "generate_eval_conversations"
    keys = set()
    for index, conversation in enumerate(conversations):
        scene_dict = scenes["scenes"][index]
        scene = Scene(3, 168, tuple(ShapeObject(**{**o, "center": tuple(o["center"])}) for o in scene_dict["objects"]))
        assert scene_split(scene) == "val" and scene.key() not in keys
        keys.add(scene.key())
        records = [r for r in singles if r["conversation"] == index]
        assert [r["turn"] for r in records] == list(range(kwargs["questions_per_image"]))
        types = [r["question_types"][0] for r in records]
        assert len(set(types)) == len(types) == len(conversation["question_types"]) and types == conversation["question_types"]
        # single questions carry the image; in the conversation only the first turn does
        assert all(r["conversations"][0]["value"].startswith("<image>\n") for r in records)
        human = conversation["conversations"][::2]
        assert human[0]["value"].startswith("<image>\n") and not any("<image>" in t["value"] for t in human[1:])
        # no two questions of a conversation share a color or a cell (so no answer gives another away)
        mentioned_colors, mentioned_cells = set(), set()
        for record in records:
            text = record["conversations"][0]["value"]
            answer = record["conversations"][1]["value"]
            colors = {c for c in ("red", "green", "blue", "yellow", "purple", "orange") if c in text.split()
                      or c + "?" in text.split() or c == answer}  # fmt: skip
            cells = {answer} if record["question_types"][0] == "where_color" else set()
            if record["question_types"][0] == "color":
                words = text.rstrip("?").split()
                cells = {words[-1] + words[-3].rstrip(",")}
            assert not colors & mentioned_colors and not cells & mentioned_cells, (index, records)
            mentioned_colors |= colors
            mentioned_cells |= cells
    # balanced answers: a constant answer per type scores well under half
    assert answer_prior(singles) < 0.5
    # and as balanced at every turn: picked in order, the follow-ups were mostly "no" and "zero" (prior 57 % here)
    priors = [answer_prior([r for r in singles if r["turn"] == turn]) for turn in range(kwargs["questions_per_image"])]
    assert max(priors) < 0.5 and max(priors) - min(priors) < 0.1, priors
    again = generate_eval_conversations(tmp_path, 60, **kwargs)
    with open(again) as f:
        assert json.load(f) == singles
    other = generate_eval_conversations(tmp_path / "seed1", 60, **{**kwargs, "seed": 1})
    with open(other) as f:
        assert [r["conversations"] for r in json.load(f)] != [r["conversations"] for r in singles]
    with pytest.raises(ValueError, match="questions_per_image"):
        generate_eval_conversations(tmp_path, 2, **{**kwargs, "questions_per_image": 5})


# ------------------------------------------------------------------------------------------------ follow-ups
@pytest.fixture(scope="module")
def shipped():
    from etc_ext.demo.artifacts import load_etc, load_full

    full, processor = load_full()
    etc, _, _ = load_etc("etc-m1-vid")
    return {"full": full, "etc": etc}, processor


def _whole_conversation_answer(model, processor, image_path, turns):
    """The oracle: a fresh generate() of the whole conversation (no cache), turns = [(role, text), ...]."""
    from etc_ext.data.conversation import encode_prompt, load_image, to_chat_messages

    item = encode_prompt(processor, to_chat_messages(turns), [load_image(image_path)])
    tokenizer = processor.tokenizer
    out = model.generate(input_ids=item["input_ids"][None], attention_mask=item["attention_mask"][None],
                         pixel_values=item["pixel_values"], max_new_tokens=4, do_sample=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return tokenizer.decode(out[0, item["input_ids"].shape[0] :], skip_special_tokens=True).strip()


@pytest.mark.parametrize("name", ["full", "etc"])
def test_follow_ups_continue_the_cache_as_a_fresh_chat_would(eval_data, shipped, name, tmp_path):
    from etc_ext.data import ConversationDataset
    from etc_ext.demo.followup import evaluate_followups
    from etc_ext.evaluate import evaluate

    out, path, _ = eval_data
    models, processor = shipped
    model = models[name]
    with open(path) as f:
        singles = [r for r in json.load(f) if r["conversation"] < 6]
    small = out / f"small-{name}.json"
    with open(small, "w") as f:
        json.dump(singles, f)
    batched = evaluate_followups(model, processor, small, batch_size=4)
    alone = evaluate_followups(model, processor, small, batch_size=1)
    assert [p["prediction"] for p in batched["predictions"]] == [p["prediction"] for p in alone["predictions"]]
    assert batched["num_questions"] == 6 and set(batched["per_turn"]) == {0, 1}
    # the first question is a single question: the same answers as evaluate() on the same prompts and batches
    firsts = ConversationDataset([r for r in singles if r["turn"] == 0], processor, out, mode="eval")
    expected = evaluate(model, processor, firsts, batch_size=4, max_new_tokens=4, warmup=0, progress=False)
    got = [p for p in batched["predictions"] if p["turn"] == 0]
    assert [p["prediction"] for p in got] == [p["prediction"] for p in expected["predictions"]]
    # a follow-up answer is what a fresh generate() of the whole chat (the model's own first answer in it) gives
    predictions = {(p["conversation"], p["turn"]): p for p in batched["predictions"]}
    for conversation in range(6):
        first, second = [r for r in singles if r["conversation"] == conversation]
        turns = [("user", first["conversations"][0]["value"]), ("assistant", predictions[(conversation, 0)]["prediction"]),
                 ("user", second["conversations"][0]["value"].replace("<image>\n", ""))]  # fmt: skip
        oracle = _whole_conversation_answer(model, processor, str(out / first["image"]), turns)
        assert predictions[(conversation, 1)]["prediction"] == oracle, conversation
    correct = [p["correct"] for p in batched["predictions"] if p["turn"] == 1]
    assert batched["accuracy"] == pytest.approx(sum(correct) / 6)


def test_follow_ups_refuse_first_turns_of_other_data(eval_data, shipped):
    from etc_ext.data import ConversationDataset
    from etc_ext.demo.followup import evaluate_followups

    out, path, _ = eval_data
    models, processor = shipped
    with open(path) as f:
        records = json.load(f)
    wrong = ConversationDataset([r for r in records if r["turn"] == 1], processor, out, mode="eval")
    with pytest.raises(ValueError, match="first question of every conversation"):
        evaluate_followups(models["full"], processor, path, first_turns=wrong)


# ------------------------------------------------------------------------------------------------ intervals
def test_wilson_interval():
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-3)
    low, high = wilson_interval(600, 1000)
    assert high - low == pytest.approx(0.0604, abs=2e-3)  # about +-3 points at 60 % over 1000 questions
    assert wilson_interval(0, 0) == (0.0, 1.0)


# ------------------------------------------------------------------------------------------------ training data
def test_disjoint_training_conversations(tmp_path):
    from etc_ext.demo.data import generate_training_data

    path = generate_training_data(tmp_path, ((40, 1, 2),), name="mix", question_types=recipe.QUESTION_TYPES,
                                  grouping="disjoint")  # fmt: skip
    with open(path) as f:
        samples = json.load(f)
    assert any(len(s["question_types"]) > 1 and s["question_types"][0] != "color" for s in samples)
    assert all(len(s["question_types"]) <= 3 for s in samples)
    for s in samples:
        texts = [t["value"] for t in s["conversations"]]
        answers = texts[1::2]
        colors = [{c for c in ("red", "green", "blue", "yellow", "purple", "orange")
                   if c in q.replace("?", " ").split() or c == a} for q, a in zip(texts[::2], answers)]  # fmt: skip
        for i in range(len(colors)):
            for j in range(i + 1, len(colors)):
                assert not colors[i] & colors[j], texts
    cells = generate_training_data(tmp_path / "cells", ((40, 1, 2),), name="mix", question_types=recipe.QUESTION_TYPES)
    with open(cells) as f:
        grouped_by_cell = json.load(f)
    assert all(len(s["question_types"]) == 1 or set(s["question_types"]) == {"color"} for s in grouped_by_cell)
    with pytest.raises(ValueError, match="grouping"):
        generate_training_data(tmp_path, ((2, 1, 1),), grouping="turns")


def test_disjoint_training_conversations_balance_answers_at_every_turn(tmp_path):
    # Placed wherever they fit, the questions about an absent color (answers "no", "zero") gathered in later turns and
    # the first turns were mostly "yes": a model trained on them answered "yes" to every yes/no question asked alone.
    from etc_ext.demo.data import generate_training_data

    path = generate_training_data(tmp_path, ((300, 1, 4),), name="mix", question_types=recipe.QUESTION_TYPES,
                                  grouping="disjoint")  # fmt: skip
    with open(path) as f:
        samples = json.load(f)
    answers = defaultdict(Counter)
    for s in samples:
        for turn, question_type in enumerate(s["question_types"]):
            answers[(question_type, turn)][s["conversations"][2 * turn + 1]["value"]] += 1
    assert sum(answers[("exists_color", 1)].values()) >= 20  # the follow-up turns are trained too
    for turn in (0, 1):
        yes_no = answers[("exists_color", turn)]
        assert abs(yes_no["yes"] - yes_no["no"]) <= 3, (turn, yes_no)
        counts = [answers[("count_color", turn)][answer] for answer in ("zero", "one", "two")]
        assert max(counts) - min(counts) <= 3, (turn, counts)


def test_mixed_grouping_keeps_the_cells_single_questions_and_adds_conversations_of_every_type(tmp_path):
    from etc_ext.demo.data import generate_training_data

    def groupings(share):
        path = generate_training_data(tmp_path / str(share), ((200, 1, 4),), name="mix",
                                      question_types=recipe.QUESTION_TYPES, grouping="mixed",
                                      disjoint_share=share)  # fmt: skip
        with open(path) as f:
            samples = json.load(f)
        by_image = defaultdict(list)
        for s in samples:
            by_image[s["image"]].append(s["question_types"])
        # an image grouped as "cells" has all its color questions in one sample and every other question alone
        as_cells = sum(all(len(t) == 1 or set(t) == {"color"} for t in turns)
                       and sum("color" in t for t in turns) <= 1 for turns in by_image.values())  # fmt: skip
        mixed_turns = sum(len(t) > 1 and t[0] != "color" for s_turns in by_image.values() for t in s_turns)
        return as_cells / len(by_image), mixed_turns

    all_cells, no_conversations = groupings(0.0)
    assert all_cells == 1.0 and no_conversations == 0
    some_cells, conversations = groupings(0.5)
    # about half the images drawn "cells" (200 draws: +-7 points), and a few disjoint ones that happen to look alike
    assert 0.4 <= some_cells <= 0.7 and conversations >= 20
    with pytest.raises(ValueError, match="disjoint_share"):
        generate_training_data(tmp_path, ((2, 1, 1),), grouping="mixed", disjoint_share=1.5)


# ------------------------------------------------------------------------------------------------ vision pretraining
def test_patch_targets_follow_the_cells():
    from etc_ext.demo.vision_pretrain import COLOR_CLASSES, SHAPE_CLASSES, patch_targets

    scene = Scene(3, 168, (ShapeObject(0, 2, "cross", "orange", (0.0, 0.0), 1.0),
                           ShapeObject(2, 0, "square", "red", (0.0, 0.0), 1.0)))  # fmt: skip
    color, shape, cell = patch_targets(scene, 12)
    color, shape, cell = color.reshape(12, 12), shape.reshape(12, 12), cell.reshape(12, 12)
    assert (color[:4, 8:] == COLOR_CLASSES.index("orange")).all() and (shape[:4, 8:] == SHAPE_CLASSES.index("cross")).all()
    assert (color[8:, :4] == COLOR_CLASSES.index("red")).all() and (shape[8:, :4] == SHAPE_CLASSES.index("square")).all()
    assert int((color > 0).sum()) == 32 and int((shape > 0).sum()) == 32  # two cells of 4 x 4 patches
    # every patch, empty or not, names its cell row-major: 4 x 4 patches per cell
    expected_cell = (torch.arange(12) // 4)[:, None] * 3 + (torch.arange(12) // 4)[None, :]
    assert torch.equal(cell, expected_cell) and cell[0, 8] == 2 and cell[8, 0] == 6
    # 7 patches per side over a 3x3 grid: the middle patch row belongs to the middle cell
    color, _, cell = patch_targets(Scene(3, 168, (ShapeObject(1, 1, "circle", "blue", (0.0, 0.0), 1.0),)), 7)
    assert color.reshape(7, 7)[3, 3] == COLOR_CLASSES.index("blue") and color.reshape(7, 7)[0, 0] == 0
    assert cell.reshape(7, 7)[3, 3] == 4 and cell.reshape(7, 7)[6, 6] == 8


def test_vision_pretraining_learns_the_maps_and_only_touches_the_tower():
    from etc_ext.demo.vision_pretrain import SceneBatches, pretrain_vision_tower

    model, processor = recipe.build_initial_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = SceneBatches(processor.image_processor, 12, "val", seed=3)
    assert all(scene_split(batches.scene()) == "val" for _ in range(20))
    logs = []
    result = pretrain_vision_tower(model, processor.image_processor, steps=30, batch_size=8, log_every=10,
                                   log=logs.append)  # fmt: skip
    assert [r["step"] for r in result["history"]] == [10, 20, 30] and len(logs) == 4
    assert result["history"][-1]["loss"] < result["history"][0]["loss"]
    # empty cells are most patches: after 30 steps the maps beat the all-"none" guess on objects' patches at least
    assert result["val"]["color"] > 0.5 and 0.0 <= result["val"]["color_on_objects"] <= 1.0
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.vision_tower.") for k in changed), sorted(changed)[:5]
    assert "cell" not in result["val"]


def test_vision_pretraining_with_cell_targets_learns_where_each_patch_lies():
    from etc_ext.demo.vision_pretrain import pretrain_vision_tower

    model, processor = recipe.build_initial_model()
    result = pretrain_vision_tower(model, processor.image_processor, steps=30, batch_size=8, cell_targets=True,
                                   log_every=10, log=lambda _: None)  # fmt: skip
    # 9 cells of 16 patches each: a constant guess is right on 1/9 of the patches; 30 steps already do twice that
    assert result["val"]["cell"] > 0.2 and 0.0 <= result["val"]["cell_on_objects"] <= 1.0
    assert result["history"][-1]["loss"] < result["history"][0]["loss"]


def test_reproduce_pretrains_the_vision_tower_when_the_recipe_says_so(tmp_path, monkeypatch):
    from etc_ext.demo.reproduce import main as reproduce_main

    monkeypatch.setattr(recipe, "VISION_PRETRAINING", {"steps": 3, "batch_size": 4})
    monkeypatch.setattr(recipe, "GROUPING", "disjoint")
    work = tmp_path / "work"
    argv = ["--work", str(work), "--runs", "full-base", "--max-steps", "1", "--data-scale", "0.0005",
            "--num-val-images", "2", "--no-progress"]  # fmt: skip
    assert reproduce_main(argv) == 0
    with open(work / "init-vision" / "vision_pretrain.json") as f:
        info = json.load(f)
    assert info["settings"]["steps"] == 1 and len(info["history"]) == 1  # --max-steps caps this stage too
    with open(work / "runs" / "full-base" / "train_args.json") as f:
        assert json.load(f)["model"] == str(work / "init-vision")
    from safetensors.torch import load_file

    init = load_file(str(work / "init" / "model.safetensors"))
    pretrained = load_file(str(work / "init-vision" / "model.safetensors"))
    changed = {k for k in init if not torch.equal(init[k], pretrained[k])}
    assert changed and all(".vision_tower." in k or k.startswith("vision_tower") for k in changed)
    with open(work / "data" / "params.json") as f:
        assert json.load(f)["curriculum"]["grouping"] == "disjoint"
