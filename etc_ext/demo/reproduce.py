"""Reproduces every checkpoint of the demo from scratch with the public training pipeline (`etc_ext.train.train`).

```
python -m etc_ext.demo.reproduce --work runs/demo --install --threads 2   # data, 8 training runs, validation, packing
```

About 95 minutes on 2 CPU cores (measured for the shipped checkpoints, the machine shared part of the time:
`full-base` 2600 steps in 21 min, `full-base-2` 3000 steps in 37 min, the six 800-step fine-tunes 5 to 7 min each).

Steps (each skipped when its output exists, so an interrupted run continues; training runs resume from their last
checkpoint):

1. generate the data under `WORK/data`: the training sets of `recipe.TRAINING_DATA` (`etc_ext.demo.data`: the
   full model's curriculum, its second stage's set and the fine-tunes' set, train-split scenes only) and the `val` split
   (`generate_shapes_dataset`); the `test` split is never touched here;
2. write the tiny LLaVA with random weights to `WORK/init` (`recipe.build_initial_model`); with
   `recipe.VISION_PRETRAINING` set, pretrain its vision tower on per-cell color and shape maps
   (`etc_ext.demo.vision_pretrain`) into `WORK/init-vision`, which the runs starting from "init" then start from;
3. train the runs of `recipe.RUNS` in order, each from the model its `start` names (`etc_ext.train.train(
   TrainingArguments(...))`) into `WORK/runs/<name>/`: `full-base` from random weights, `full-base-2` from it, then
   the shipped full model and each ETC variant from `full-base-2`, trained alike;
4. evaluate every run on the validation split (`WORK/runs/<name>/val.json`);
5. pack the runs in fp16 (`etc_ext.demo.artifacts`) into `--dest` (with `--install`: the package's
   `etc_ext/demo/checkpoints/`, which the demo reads), with `manifest.json`.

`--max-steps`, `--data-scale` and `--num-val-images` shrink the recipe (tests, quick looks); the manifest records
what was actually run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

from . import recipe
from .artifacts import CHECKPOINT_DIR, MANIFEST_NAME, pack_etc, pack_full


logger = logging.getLogger(__name__)


def _scaled_blocks(blocks, scale: float) -> tuple:
    return tuple((max(1, round(n * scale)), low, high) for n, low, high in blocks)


def generate_data(work: str, data_scale: float = 1.0, num_val_images: int | None = None) -> str:
    """Writes the training sets (`recipe.TRAINING_DATA`, images scaled by `data_scale`) and the val split under
    `WORK/data`; each is reused when present with the same parameters (`WORK/data/params.json`)."""
    from ..data import generate_shapes_dataset
    from .data import generate_training_data

    data_dir = os.path.join(work, "data")
    os.makedirs(data_dir, exist_ok=True)
    params_path = os.path.join(data_dir, "params.json")
    done = json.load(open(params_path)) if os.path.isfile(params_path) else {}
    wanted = {}
    for name in recipe.TRAINING_DATA:
        kwargs = recipe.training_data_kwargs(name)
        kwargs["blocks"] = _scaled_blocks(kwargs["blocks"], data_scale)
        wanted[name] = json.loads(json.dumps(kwargs))
        if done.get(name) != wanted[name] or not os.path.isfile(os.path.join(data_dir, f"{name}.json")):
            logger.info("generating %s: %s", name, kwargs["blocks"])
            generate_training_data(data_dir, **kwargs)
            done[name] = wanted[name]
            atomic_json(params_path, done)
    kwargs = recipe.eval_data_kwargs("val")
    wanted["val"] = json.loads(json.dumps({**kwargs, "num_images": num_val_images or recipe.NUM_VAL_IMAGES}))
    if done.get("val") != wanted["val"] or not os.path.isfile(os.path.join(data_dir, "val.json")):
        generate_shapes_dataset(data_dir, wanted["val"]["num_images"], progress=False, **kwargs)
        done["val"] = wanted["val"]
        atomic_json(params_path, done)
    return data_dir


def atomic_json(path: str, data) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)


def start_dir(work: str, run: recipe.Run) -> str:
    """The model folder a run starts from."""
    if run.start != "init":
        return final_dir(work, run.start)
    return os.path.join(work, "init-vision" if recipe.VISION_PRETRAINING else "init")


def pretrain_vision(work: str, steps: int | None = None) -> dict | None:
    """`recipe.VISION_PRETRAINING` (None: nothing to do) on `WORK/init` into `WORK/init-vision` (skipped when its
    `vision_pretrain.json` exists). Returns what `pretrain_vision_tower` measured."""
    if not recipe.VISION_PRETRAINING:
        return None
    out = os.path.join(work, "init-vision")
    done = os.path.join(out, "vision_pretrain.json")
    if not os.path.isfile(done):
        import torch
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        from .vision_pretrain import pretrain_vision_tower

        init = os.path.join(work, "init")
        model = LlavaForConditionalGeneration.from_pretrained(init, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(init)
        options = dict(recipe.VISION_PRETRAINING)
        if steps is not None:
            options["steps"] = steps
        result = pretrain_vision_tower(model, processor.image_processor, seed=recipe.MODEL_SEED,
                                       grid_sizes=recipe.GRID_SIZES, min_objects=recipe.MIN_OBJECTS,
                                       max_objects=recipe.MAX_OBJECTS, log=logger.info, **options)  # fmt: skip
        model.save_pretrained(out)
        processor.save_pretrained(out)
        atomic_json(done, {"settings": options, **result})
    with open(done) as f:
        return json.load(f)


def training_arguments(run: recipe.Run, work: str, max_steps: int | None = None, progress: bool = True):
    """The `etc_ext.train.TrainingArguments` of one run of the recipe."""
    from ..train import TrainingArguments

    options = dict(run.training)
    if max_steps is not None:
        options["max_steps"] = max_steps
    return TrainingArguments(
        model=start_dir(work, run),
        data=os.path.join(work, "data", f"{run.data}.json"),
        output_dir=os.path.join(work, "runs", run.name),
        etc_config=json.dumps(run.etc) if run.etc is not None else None,
        device="cpu",
        precision="fp32",
        save_steps=100,
        save_total_limit=1,
        resume="auto",
        logging_steps=10,
        progress=progress,
        **options,
    )


def final_dir(work: str, name: str) -> str:
    return os.path.join(work, "runs", name, "final")


def train_run(run: recipe.Run, work: str, max_steps: int | None = None, progress: bool = True) -> dict:
    """Trains one run of the recipe from the model its `start` names, unless its `final/` folder exists. Returns
    `{"name", "train_time_s", "global_step", "metrics"}`."""
    from ..train import train

    done = os.path.join(final_dir(work, run.name), "training_info.json")
    if not os.path.isfile(done):
        if not os.path.isfile(os.path.join(start_dir(work, run), "config.json")):
            raise ValueError(f"run {run.name} starts from {run.start}, which is not trained yet (include it in --runs)")
        start = time.perf_counter()
        summary = train(training_arguments(run, work, max_steps, progress))
        if summary["final_dir"] is None:
            raise RuntimeError(f"training of {run.name} stopped early at step {summary['global_step']}")
        with open(os.path.join(work, "runs", run.name, "train_time.json"), "w") as f:
            json.dump({"train_time_s": time.perf_counter() - start}, f)
    with open(done) as f:
        info = json.load(f)
    time_path = os.path.join(work, "runs", run.name, "train_time.json")
    train_time = json.load(open(time_path))["train_time_s"] if os.path.isfile(time_path) else None
    return {"name": run.name, "train_time_s": train_time, "global_step": info["global_step"],
            "metrics": info["final_metrics"]}  # fmt: skip


def validate_run(run: recipe.Run, work: str, batch_size: int = 32, progress: bool = True) -> dict:
    """Accuracy of a trained run on the validation split (`WORK/runs/<name>/val.json`, reused when present)."""
    from ..data import ConversationDataset
    from ..evaluate import evaluate
    from ..models.loading import load_for_inference

    path = os.path.join(work, "runs", run.name, "val.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    if run.etc is None:
        model, processor, _ = load_for_inference(final_dir(work, run.name))
    else:
        model, processor, _ = load_for_inference(start_dir(work, run), final_dir(work, run.name))
    dataset = ConversationDataset(os.path.join(work, "data", "val.json"), processor, mode="eval")
    result = evaluate(model, processor, dataset, batch_size=batch_size, max_new_tokens=4, warmup=0,
                      progress=progress)  # fmt: skip
    metrics = {k: result["metrics"][k] for k in ("accuracy", "per_type", "num_samples", "visual_tokens")}
    with open(path, "w") as f:
        json.dump(metrics, f, indent=1)
    return metrics


def pack(work: str, dest: str, runs, summaries: dict, validation: dict, settings: dict) -> dict:
    """Packs the trained runs into `dest` (fp16) and writes its manifest. Returns the manifest."""
    os.makedirs(dest, exist_ok=True)
    files = {}
    runs = [run for run in runs if run.shipped]
    for run in runs:
        out = os.path.join(dest, run.name)
        if run.etc is None:
            pack_full(final_dir(work, run.name), out)
        else:
            pack_etc(final_dir(work, run.name), out)
        files[run.name] = {name: os.path.getsize(os.path.join(out, name)) for name in sorted(os.listdir(out))}
    from .. import __version__

    manifest = {
        "etc_ext_version": __version__,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": "python -m etc_ext.demo.reproduce " + " ".join(settings["argv"]),
        "settings": {k: v for k, v in settings.items() if k != "argv"},
        "recipe": {
            "data_seed": recipe.DATA_SEED,
            "grid_sizes": list(recipe.GRID_SIZES),
            "question_types": list(recipe.QUESTION_TYPES),
            "answer_prompt": recipe.ANSWER_PROMPT,
            "model_seed": recipe.MODEL_SEED,
            "initializer_range": recipe.INITIALIZER_RANGE,
            "sizes": vars(recipe.SIZES).copy(),
            "articles": recipe.ARTICLES,
            "grouping": recipe.GROUPING,
            "vision_pretraining": recipe.VISION_PRETRAINING,
        },
        "stages": {name: {"training_summary": summaries.get(name), "val": validation.get(name)}
                   for name in summaries if not recipe.run_by_name(name).shipped},  # fmt: skip
        "runs": {
            run.name: {
                **run.to_dict(),
                "training_summary": summaries.get(run.name),
                "val": validation.get(run.name),
                "files": files[run.name],
                "bytes": sum(files[run.name].values()),
            }
            for run in runs
        },
        "total_bytes": sum(sum(sizes.values()) for sizes in files.values()),
    }
    with open(os.path.join(dest, MANIFEST_NAME), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def reproduce(
    work: str,
    dest: str | None = None,
    runs: list[str] | None = None,
    max_steps: int | None = None,
    data_scale: float = 1.0,
    num_val_images: int | None = None,
    progress: bool = True,
    argv: list[str] | None = None,
) -> dict:
    """Runs the recipe (see the module docstring); returns the manifest (written to `dest` when given).

    `max_steps` (every run's steps), `data_scale` (training images per block) and `num_val_images` shrink the recipe
    for tests and quick looks."""
    selected = [run for run in recipe.RUNS if not runs or run.name in runs]  # training order
    os.makedirs(work, exist_ok=True)
    generate_data(work, data_scale, num_val_images)
    init_dir = os.path.join(work, "init")
    if not os.path.isfile(os.path.join(init_dir, "config.json")):
        model, processor = recipe.build_initial_model()
        model.save_pretrained(init_dir)
        processor.save_pretrained(init_dir)
    vision = pretrain_vision(work, max_steps)

    summaries, validation = {}, {}
    for run in selected:
        logger.info("run %s", run.name)
        summaries[run.name] = train_run(run, work, max_steps, progress)
        validation[run.name] = validate_run(run, work, progress=progress)
        print(f"{run.name}: {summaries[run.name]['global_step']} steps, val accuracy "
              f"{validation[run.name]['accuracy']:.3f}", flush=True)  # fmt: skip
    settings = {"max_steps": max_steps, "data_scale": data_scale, "num_val_images": num_val_images,
                "argv": argv or []}  # fmt: skip
    if vision is not None:
        settings["vision_pretraining"] = {"val": vision["val"], "train_time_s": vision["train_time_s"],
                                          "settings": vision["settings"]}  # fmt: skip
    if dest is None:
        return {"runs": {name: {"training_summary": summaries[name], "val": validation[name]} for name in summaries},
                "vision_pretraining": settings.get("vision_pretraining")}  # fmt: skip
    if {r.name for r in selected} != {r.name for r in recipe.RUNS}:
        raise ValueError("packing needs every run of the recipe (omit --runs)")
    return pack(work, dest, selected, summaries, validation, settings)


def main(argv: list[str] | None = None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m etc_ext.demo.reproduce",
        description="Train every checkpoint of `etc-ext demo` from scratch (etc_ext.train) and pack them in fp16.",
    )
    parser.add_argument("--work", required=True, help="working folder: data, training runs (resumable)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--dest", help="write the packed checkpoints and manifest.json here")
    target.add_argument("--install", action="store_true", help=f"write them into the package ({CHECKPOINT_DIR})")
    parser.add_argument("--runs", nargs="+", choices=[r.name for r in recipe.RUNS], help="train only these runs")
    parser.add_argument("--max-steps", type=int, help="override every run's steps (tests, quick looks)")
    parser.add_argument("--data-scale", type=float, default=1.0, help="scale the training images of every block")
    parser.add_argument("--num-val-images", type=int, help=f"default {recipe.NUM_VAL_IMAGES}")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")  # fmt: skip
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    dest = CHECKPOINT_DIR if args.install else args.dest
    manifest = reproduce(args.work, dest, args.runs, args.max_steps, args.data_scale, args.num_val_images,
                         not args.no_progress, argv)  # fmt: skip
    if dest is not None:
        print(f"packed {len(manifest['runs'])} checkpoints, {manifest['total_bytes'] / 2**20:.1f} MiB, into {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
