"""`etc-ext demo`: ETC against the full model and training-free compressors, measured on a held-out split.

Every row evaluates a model by generation (`etc_ext.evaluate.evaluate`) on the same held-out test questions of the
shapes data (generated on the spot, deterministic, never seen in training or model selection):

- `full model`: the shipped full-token tiny LLaVA (144 visual tokens per image);
- `ETC (VID)` at M = 1, 4, 16, `ETC (MSE)` and `ETC (no reconstruction)` at M = 1: the shipped ETC variants, each
  fine-tuned from the full model (`etc_ext.demo.recipe`);
- every training-free compressor of `etc_ext.baselines` at K = 1, 4, 16, applied to the full model as it is.

Columns: visual tokens the decoder sees per image (measured from the KV cache after the prefill, not declared),
exact-match accuracy, the share of the full model's accuracy, KV-cache bytes per sample after the prefill (fp32, all
layers, the sample's own entries) and the prefill time per batch (from the `generate` call to the end of the first
forward: image encoding, the language model's prefill and, for ETC, the cache compaction).

Outputs: the table on stdout, `<output>/demo.png` (accuracy vs tokens kept, one line per method) and, with
`json_path`, every number in json.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import time
from dataclasses import dataclass

import torch

from ..baselines import METHODS
from . import recipe
from .artifacts import FULL_NAME, checkpoint_path, read_manifest


BASELINE_METHODS = METHODS
BASELINE_LABELS = {
    "mean": "mean pooling",
    "subsample": "uniform subsampling",
    "fastv": "FastV-style top-K",
    "visionzip": "VisionZip-style merge",
    "instruction_merge": "instruction-aware merge",
}


@dataclass(frozen=True)
class Row:
    """One row of the demo table: `kind` is "full", "etc" or "baseline"; `name` the checkpoint (full, ETC) or the
    baseline method; `budget` the tokens per image asked for (None for the full model)."""

    kind: str
    name: str
    label: str
    budget: int | None

    @property
    def key(self) -> str:
        return self.name if self.kind != "baseline" else f"{self.name}-k{self.budget}"


def baselines_available() -> bool:
    return importlib.util.find_spec("etc_ext.baselines") is not None


def demo_rows(baselines: bool | None = None) -> list[Row]:
    """The rows of the demo, in table order (baselines only when `etc_ext.baselines` exists, unless told)."""
    rows = [Row("full", FULL_NAME, recipe.FULL.label, None)]
    rows += [Row("etc", run.name, run.label, run.num_compression_tokens) for run in recipe.ETC_RUNS]
    if baselines_available() if baselines is None else baselines:
        rows += [Row("baseline", m, BASELINE_LABELS[m], k) for m in BASELINE_METHODS for k in recipe.BUDGETS]
    return rows


def generate_test_data(out_dir: str, num_images: int) -> str:
    """The held-out test split (single-turn questions) under `out_dir`, reused when present with the same size."""
    from ..data import generate_shapes_dataset

    json_path = os.path.join(out_dir, "test.json")
    params_path = os.path.join(out_dir, "test_scenes.json")
    kwargs = recipe.eval_data_kwargs("test")
    if os.path.isfile(json_path) and os.path.isfile(params_path):
        with open(params_path) as f:
            params = json.load(f)["params"]
        wanted = json.loads(json.dumps({**kwargs, "num_images": num_images}))
        if all(params.get(k) == v for k, v in wanted.items()):
            return json_path
    return generate_shapes_dataset(out_dir, num_images, progress=False, **kwargs)


def _row_model(row: Row, full_model, checkpoints: str | None):
    """The model of one row: the full model itself, the full model with an ETC variant (a fresh copy loaded from the
    checkpoints), or the full model with a training-free compressor applied in place (`_release` removes it)."""
    if row.kind == "full":
        return full_model
    if row.kind == "etc":
        from .artifacts import load_etc

        model, _, _ = load_etc(row.name, checkpoints)
        return model
    from ..baselines import apply_baseline

    return apply_baseline(full_model, row.name, row.budget)


def _release(row: Row, model) -> None:
    if row.kind == "baseline":
        from ..baselines import remove_baseline

        remove_baseline(model)


def _format_table(results: list[dict]) -> str:
    header = ("method", "tokens kept", "accuracy", "of full", "KV cache after prefill", "prefill ms")
    lines = []
    full_accuracy = next((r["accuracy"] for r in results if r["kind"] == "full"), None)
    for r in results:
        budget = "" if r["budget"] is None else (f" M={r['budget']}" if r["kind"] == "etc" else f" K={r['budget']}")
        share = f"{100 * r['accuracy'] / full_accuracy:.0f} %" if full_accuracy else "-"
        lines.append((
            r["label"] + budget,
            f"{r['visual_tokens']:g}",
            f"{100 * r['accuracy']:.1f} %",
            share,
            f"{r['kv_cache_bytes'] / 1024:.1f} KiB",
            f"{r['prefill_ms']:.0f}",
        ))  # fmt: skip
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    aligned = ["<", ">", ">", ">", ">", ">"]
    fmt_row = lambda cells: "| " + " | ".join(f"{c:{a}{w}}" for c, a, w in zip(cells, aligned, widths)) + " |"
    rule = "|" + "|".join(("-" * (w + 1) + ":") if a == ">" else ("-" * (w + 2)) for a, w in zip(aligned, widths))
    return "\n".join([fmt_row(header), rule + "|", *(fmt_row(line) for line in lines)])


def check_targets(results: list[dict]) -> list[dict]:
    """The issue's targets, each `{"target", "met", "detail"}`, from the measured rows."""
    by_key = {r["key"]: r for r in results}
    checks = []
    full = by_key.get(FULL_NAME)
    m1 = by_key.get("etc-m1-vid")
    if full and m1:
        share = m1["accuracy"] / full["accuracy"] if full["accuracy"] else 0.0
        checks.append({"target": "ETC M=1 keeps >= 90 % of the full model's accuracy", "met": share >= 0.9,
                       "detail": f"{100 * m1['accuracy']:.1f} % vs {100 * full['accuracy']:.1f} % = "
                                 f"{100 * share:.1f} %"})  # fmt: skip
    baselines = [r for r in results if r["kind"] == "baseline"]
    if baselines:
        for budget in recipe.BUDGETS:
            etc = next((r for r in results if r["kind"] == "etc" and r["name"] == f"etc-m{budget}-vid"), None)
            rivals = [r for r in baselines if r["budget"] == budget]
            if etc is None or not rivals:
                continue
            best = max(rivals, key=lambda r: r["accuracy"])
            checks.append({"target": f"ETC beats the best training-free baseline at {budget} token(s)",
                           "met": etc["accuracy"] > best["accuracy"],
                           "detail": f"ETC {100 * etc['accuracy']:.1f} % vs {best['label']} "
                                     f"{100 * best['accuracy']:.1f} %"})  # fmt: skip
    vid, mse, none = (by_key.get(f"etc-m1-{loss}") for loss in ("vid", "mse", "none"))
    if vid and mse and none:
        met = vid["accuracy"] >= mse["accuracy"] >= none["accuracy"]
        checks.append({"target": "VID >= MSE >= no reconstruction (M=1)", "met": met,
                       "detail": f"{100 * vid['accuracy']:.1f} % / {100 * mse['accuracy']:.1f} % / "
                                 f"{100 * none['accuracy']:.1f} %"})  # fmt: skip
    return checks


def write_plot(results: list[dict], path: str) -> str:
    """Accuracy vs visual tokens kept per image, one line per method, the full model as a reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 4.8), dpi=120)
    full = next((r for r in results if r["kind"] == "full"), None)
    if full is not None:
        ax.axhline(100 * full["accuracy"], color="black", linestyle="--", linewidth=1,
                   label=f"full model ({full['visual_tokens']:g} tokens)")  # fmt: skip
    series: dict[str, list[dict]] = {}
    for r in results:
        if r["kind"] != "full":
            series.setdefault(r["label"], []).append(r)
    markers = "os^vD<>Px*"
    for index, (label, rows) in enumerate(series.items()):
        rows = sorted(rows, key=lambda r: r["budget"])
        etc = rows[0]["kind"] == "etc"
        ax.plot([r["budget"] for r in rows], [100 * r["accuracy"] for r in rows], marker=markers[index % 10],
                linewidth=2.2 if etc else 1.2, linestyle="-" if etc else ":", label=label)  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(recipe.BUDGETS))
    ax.set_xticklabels([str(b) for b in recipe.BUDGETS])
    ax.set_xlabel("visual tokens kept per image (of 144)")
    ax.set_ylabel("accuracy on the held-out test split (%)")
    ax.set_ylim(0, 100)
    ax.set_title("ETC vs training-free compression, tiny LLaVA on the shapes task")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the lines cross everywhere
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def run_demo(
    output_dir: str = os.path.join("outputs", "demo"),
    *,
    json_path: str | None = None,
    checkpoints: str | None = None,
    num_test_images: int = recipe.NUM_TEST_IMAGES,
    batch_size: int = 32,
    rows: list[str] | None = None,
    plot: bool = True,
    progress: bool = True,
    print_fn=print,
) -> dict:
    """Runs the demo (see the module docstring) and returns `{"rows": [...], "targets": [...], ...}`.

    Args:
        output_dir: the test data, the plot and (by default) nothing else go here.
        json_path: also write the results as json to this path.
        checkpoints: folder of the checkpoints (default: the ones shipped in the package).
        num_test_images: test images (two single-turn questions each).
        batch_size: prompts per `generate` call.
        rows: keys of the rows to run (default: all; e.g. `["full", "etc-m1-vid", "mean-k1"]`).
        plot: write `<output_dir>/demo.png`.
        progress: show a progress bar over the rows.
    """
    from ..data import ConversationDataset
    from ..evaluate import evaluate
    from .artifacts import load_full

    start = time.perf_counter()
    manifest = read_manifest(checkpoints)
    selected = demo_rows()
    if rows is not None:
        every_row = demo_rows(baselines=True)
        known = {row.key for row in every_row}
        unknown = sorted(set(rows) - known)
        if unknown:
            raise ValueError(f"unknown demo rows {unknown}; rows are {sorted(known)}")
        if not baselines_available() and not set(rows) <= {row.key for row in selected}:
            raise ValueError("baseline rows need etc_ext.baselines, which this installation lacks")
        selected = [row for row in every_row if row.key in rows]
    os.makedirs(output_dir, exist_ok=True)
    data_json = generate_test_data(os.path.join(output_dir, "data"), num_test_images)

    full_model, processor = load_full(checkpoints)
    dataset = ConversationDataset(data_json, processor, mode="eval")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(selected), desc="demo", unit="row", dynamic_ncols=True)
    results = []
    for row in selected:
        if bar is not None:
            bar.set_postfix_str(row.label + ("" if row.budget is None else f" {row.budget}"))
        model = _row_model(row, full_model, checkpoints)
        try:
            outcome = evaluate(model, processor, dataset, batch_size=batch_size, max_new_tokens=4, warmup=1,
                               progress=False)  # fmt: skip
        finally:
            _release(row, model)
        metrics = outcome["metrics"]
        results.append({
            "key": row.key, "kind": row.kind, "name": row.name, "label": row.label, "budget": row.budget,
            "accuracy": metrics["accuracy"], "per_type": {t: v["accuracy"] for t, v in metrics["per_type"].items()},
            "visual_tokens": metrics["visual_tokens"], "visual_tokens_input": metrics["visual_tokens_input"],
            "kv_cache_bytes": metrics["kv_cache_bytes"], "kv_cache_tokens": metrics["kv_cache_tokens"],
            "prefill_ms": metrics["prefill_ms"], "decode_ms_per_token": metrics["decode_ms_per_token"],
            "num_samples": metrics["num_samples"],
        })  # fmt: skip
        if bar is not None:
            bar.update(1)
        del model
    if bar is not None:
        bar.close()

    targets = check_targets(results)
    report = {
        "rows": results,
        "targets": targets,
        "test_data": os.path.abspath(data_json),
        "num_test_questions": len(dataset),
        "batch_size": batch_size,
        "checkpoints": os.path.abspath(checkpoints or checkpoint_path("")),
        "checkpoint_bytes": manifest.get("total_bytes"),
        "validation_accuracy": {name: (run.get("val") or {}).get("accuracy") for name, run in manifest["runs"].items()},
        "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__},  # fmt: skip
    }
    plot_path = write_plot(results, os.path.join(output_dir, "demo.png")) if plot else None
    report["plot"] = os.path.abspath(plot_path) if plot_path else None
    report["wall_time_s"] = time.perf_counter() - start
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)) or ".", exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)

    print_fn(f"\nETC demo: tiny LLaVA (CLIP + Llama, {recipe.SIZES.text_layers} LLM layers of width "
             f"{recipe.SIZES.text_hidden_size}), shapes VQA, {len(dataset)} held-out test questions, batch {batch_size}, "
             f"{torch.get_num_threads()} CPU thread(s)\n")  # fmt: skip
    print_fn(_format_table(results))
    print_fn("\ntokens kept: visual KV entries per image after the prefill (measured); KV cache: fp32 bytes per sample "
             "after the prefill, all layers; prefill ms: per batch, image encoding included.")  # fmt: skip
    if not any(r["kind"] == "baseline" for r in results) and rows is None:
        print_fn("training-free baselines: not available in this installation (etc_ext.baselines is missing)")
    for check in targets:
        print_fn(f"[{'met' if check['met'] else 'MISSED'}] {check['target']}: {check['detail']}")
    if plot_path:
        print_fn(f"plot: {os.path.abspath(plot_path)}")
    if json_path:
        print_fn(f"json: {os.path.abspath(json_path)}")
    print_fn(f"test data: {os.path.abspath(os.path.dirname(data_json))}")
    print_fn(f"done in {report['wall_time_s']:.0f} s")
    return report
