"""`etc-ext demo`: ETC against the full model and training-free compressors, measured on a held-out split.

Every row evaluates a model by generation on the same held-out test questions of the shapes data (generated on the
spot by `etc_ext.demo.data.generate_eval_conversations`, deterministic, never seen in training or model selection),
asked two ways:

- single questions: each question alone, with its image (`etc_ext.evaluate.evaluate`; a conversation's first
  question is the first turn of its chat below, which is the same prompt and the same greedy generate);
- follow-up questions: each image's questions in one conversation, the image compressed once at the first question
  and the cache continued for the next (`etc_ext.demo.followup`), as a chat does. Question-aware compressors keep the
  tokens chosen for the first question; ETC and the question-independent ones have the same cache either way.

- `full model`: the shipped full-token tiny LLaVA (144 visual tokens per image);
- `ETC (VID)` at M = 1, 4, 16, `ETC (MSE)` and `ETC (no reconstruction)` at M = 1: the shipped ETC variants, each
  fine-tuned from the full model (`etc_ext.demo.recipe`);
- every training-free compressor of `etc_ext.baselines` at K = 1, 4, 16, applied to the full model as it is.

Columns: visual tokens the decoder sees per image (measured from the KV cache after the prefill, not declared),
exact-match accuracy on single questions with its 95 % Wilson interval, the share of the full model's accuracy,
accuracy on the follow-up questions (and on the same questions asked alone), KV-cache bytes per sample after the
prefill (fp32, all layers, the sample's own entries) and the prefill time per batch (from the `generate` call to the
end of the first forward: image encoding, the language model's prefill and, for ETC, the cache compaction; measured
on the questions that are not first in their conversation).

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

from ..baselines import METHOD_CLASSES, METHODS, method_label
from . import recipe
from .artifacts import FULL_NAME, checkpoint_path, read_manifest


BASELINE_METHODS = METHODS
# The compressors that read the question to choose what to keep (FastV-style: the prompt's last token's attention;
# instruction-aware merge: text-to-image scores); the others compress the image alone, as ETC's tokens do.
QUESTION_AWARE_METHODS = tuple(name for name in METHODS if METHOD_CLASSES[name].reads_question)
TIME_LIMIT_S = 300.0  # `etc-ext demo` should finish in under 5 minutes on 2 CPU cores
BASELINE_LABELS = {name: method_label(name) for name in METHODS}


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
    """The held-out test split (`recipe.test_data_kwargs`: single questions and the follow-up conversations about the
    same images) under `out_dir`, reused when present with the same parameters. Returns the single-question json."""
    from .data import generate_eval_conversations

    json_path = os.path.join(out_dir, "test.json")
    params_path = os.path.join(out_dir, "test_scenes.json")
    kwargs = recipe.test_data_kwargs()
    if os.path.isfile(json_path) and os.path.isfile(params_path):
        with open(params_path) as f:
            params = json.load(f)["params"]
        wanted = json.loads(json.dumps({**kwargs, "num_images": num_images}))
        same = all(params.get(k) == v for k, v in wanted.items())
        if same and params.get("generator") == "generate_eval_conversations":
            return json_path
    return generate_eval_conversations(out_dir, num_images, **kwargs)


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion `correct / n` (`(0, 1)` for n = 0)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    return max(0.0, center - half), min(1.0, center + half)


def answer_prior(records: list[dict]) -> float:
    """Accuracy of always giving each question type's most frequent answer (what a model that ignores the image can
    reach at best without reading which color or cell is asked)."""
    from collections import Counter

    by_type: dict[str, Counter] = {}
    for record in records:
        by_type.setdefault(record["question_types"][-1], Counter())[record["conversations"][-1]["value"]] += 1
    return sum(max(c.values()) for c in by_type.values()) / max(len(records), 1)


class _MemoDataset:
    """A `ConversationDataset` in eval mode whose items are encoded once and reused by every row (the images are
    read and preprocessed once, not once per method); the collator copies what it batches."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.mode = dataset.mode
        self.samples = dataset.samples
        self._items: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        if index not in self._items:
            self._items[index] = self.dataset[index]
        return self._items[index]


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


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _interval(low: float, high: float) -> str:
    return f"{100 * low:.0f}-{100 * high:.0f}"


def _format_table(results: list[dict]) -> str:
    header = ("method", "tokens kept", "single", "95 % CI", "of full", "follow-up", "95 % CI", "alone",
              "KV cache after prefill", "prefill ms")  # fmt: skip
    lines = []
    full_accuracy = next((r["accuracy"] for r in results if r["kind"] == "full"), None)
    for r in results:
        budget = "" if r["budget"] is None else (f" M={r['budget']}" if r["kind"] == "etc" else f" K={r['budget']}")
        share = f"{100 * r['accuracy'] / full_accuracy:.0f} %" if full_accuracy else "-"
        follow = r.get("followup") or {}
        lines.append((
            r["label"] + budget,
            f"{r['visual_tokens']:g}",
            _pct(r["accuracy"]),
            _interval(*r["interval"]),
            share,
            _pct(follow.get("accuracy")),
            _interval(*follow["interval"]) if follow else "-",
            _pct(follow.get("alone_accuracy")),
            f"{r['kv_cache_bytes'] / 1024:.1f} KiB",
            f"{r['prefill_ms']:.0f}",
        ))  # fmt: skip
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    aligned = ["<"] + [">"] * (len(header) - 1)
    fmt_row = lambda cells: "| " + " | ".join(f"{c:{a}{w}}" for c, a, w in zip(cells, aligned, widths)) + " |"
    rule = "|" + "|".join(("-" * (w + 1) + ":") if a == ">" else ("-" * (w + 2)) for a, w in zip(aligned, widths))
    return "\n".join([fmt_row(header), rule + "|", *(fmt_row(line) for line in lines)])


def _difference_margin(a: dict, b: dict) -> float:
    """Half-width of the 95 % interval of the difference of two accuracies measured on `n` questions each (normal
    approximation, the questions treated as independent draws)."""
    variance = sum(r["accuracy"] * (1 - r["accuracy"]) / max(r["num_samples"], 1) for r in (a, b))
    return 1.96 * variance**0.5


def check_targets(results: list[dict], wall_time_s: float | None = None) -> list[dict]:
    """The issue's targets, each `{"target", "met", "detail"}`, from the measured rows (those whose rows ran).

    "Within noise" (the ordering of M) allows the larger M to score lower by at most `_difference_margin`."""
    by_key = {r["key"]: r for r in results}
    checks = []

    def add(target: str, met: bool, detail: str) -> None:
        checks.append({"target": target, "met": bool(met), "detail": detail})

    full = by_key.get(FULL_NAME)
    if full:
        add("the full model scores >= 90 % on single questions", full["accuracy"] >= 0.9, _pct(full["accuracy"]))
        per_type = full.get("per_type") or {}
        if per_type:
            add("the full model scores >= 90 % on every question type", min(per_type.values()) >= 0.9,
                ", ".join(f"{t} {_pct(v)}" for t, v in per_type.items()))  # fmt: skip
    m1 = by_key.get("etc-m1-vid")
    if full and m1:
        share = m1["accuracy"] / full["accuracy"] if full["accuracy"] else 0.0
        add("ETC M=1 keeps >= 90 % of the full model's accuracy (single questions)", share >= 0.9,
            f"{_pct(m1['accuracy'])} vs {_pct(full['accuracy'])} = {100 * share:.1f} %")  # fmt: skip
    baselines = [r for r in results if r["kind"] == "baseline"]
    for budget in recipe.BUDGETS:
        etc = by_key.get(f"etc-m{budget}-vid")
        rivals = [r for r in baselines if r["budget"] == budget]
        if etc is None or not rivals:
            continue
        followed = [r for r in rivals if r.get("followup")]
        if etc.get("followup") and followed:
            best = max(followed, key=lambda r: r["followup"]["accuracy"])
            add(f"ETC beats every training-free baseline on follow-up questions at {budget} token(s)",
                etc["followup"]["accuracy"] > best["followup"]["accuracy"],
                f"ETC {_pct(etc['followup']['accuracy'])} vs best {best['label']} "
                f"{_pct(best['followup']['accuracy'])}")  # fmt: skip
        independent = [r for r in rivals if r["name"] not in QUESTION_AWARE_METHODS]
        if independent:
            best = max(independent, key=lambda r: r["accuracy"])
            add(f"ETC >= the best question-independent baseline on single questions at {budget} token(s)",
                etc["accuracy"] >= best["accuracy"],
                f"ETC {_pct(etc['accuracy'])} vs {best['label']} {_pct(best['accuracy'])}")  # fmt: skip
    ladder = [by_key.get(f"etc-m{m}-vid") for m in recipe.BUDGETS]
    if all(ladder):
        met = all(b["accuracy"] >= a["accuracy"] - _difference_margin(a, b) for a, b in zip(ladder, ladder[1:]))
        add("ETC M=" + " <= M=".join(str(m) for m in recipe.BUDGETS) + " within noise (single questions)", met,
            " / ".join(_pct(r["accuracy"]) for r in ladder) + " (95 % margin of a difference: "
            + ", ".join(f"{100 * _difference_margin(a, b):.1f}" for a, b in zip(ladder, ladder[1:])) + " points)")
    vid, mse, none = (by_key.get(f"etc-m1-{loss}") for loss in ("vid", "mse", "none"))
    if vid and mse and none:
        add("VID >= MSE >= no reconstruction (M=1, single questions)",
            vid["accuracy"] >= mse["accuracy"] >= none["accuracy"],
            f"{_pct(vid['accuracy'])} / {_pct(mse['accuracy'])} / {_pct(none['accuracy'])}")  # fmt: skip
    if wall_time_s is not None:
        add(f"the demo finishes in under {TIME_LIMIT_S / 60:.0f} minutes", wall_time_s < TIME_LIMIT_S,
            f"{wall_time_s:.0f} s with {torch.get_num_threads()} CPU thread(s)")  # fmt: skip
    return checks


def write_plot(results: list[dict], path: str) -> str:
    """Accuracy vs visual tokens kept per image, one line per method, the full model as a reference line: single
    questions on the left, follow-up questions on the right (when measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("single questions", lambda r: r["accuracy"])]
    if any(r.get("followup") for r in results):
        panels.append(("follow-up questions (cache of the first)", lambda r: (r.get("followup") or {}).get("accuracy")))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels) + 3.0, 4.8), dpi=120, squeeze=False)
    full = next((r for r in results if r["kind"] == "full"), None)
    series: dict[str, list[dict]] = {}
    for r in results:
        if r["kind"] != "full":
            series.setdefault(r["label"], []).append(r)
    markers = "os^vD<>Px*"
    for ax, (title, accuracy) in zip(axes[0], panels):
        if full is not None and accuracy(full) is not None:
            ax.axhline(100 * accuracy(full), color="black", linestyle="--", linewidth=1,
                       label=f"full model ({full['visual_tokens']:g} tokens)")  # fmt: skip
        for index, (label, rows) in enumerate(series.items()):
            rows = sorted((r for r in rows if accuracy(r) is not None), key=lambda r: r["budget"])
            if not rows:
                continue
            etc = rows[0]["kind"] == "etc"
            ax.plot([r["budget"] for r in rows], [100 * accuracy(r) for r in rows], marker=markers[index % 10],
                    linewidth=2.2 if etc else 1.2, linestyle="-" if etc else ":", label=label)  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(recipe.BUDGETS))
        ax.set_xticklabels([str(b) for b in recipe.BUDGETS])
        ax.set_xlabel("visual tokens kept per image (of 144)")
        ax.set_ylabel("accuracy on the held-out test split (%)")
        ax.set_ylim(0, 100)
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
    fig.suptitle("ETC vs training-free compression, tiny LLaVA on the shapes task")
    axes[0][-1].legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the lines cross
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _split_by_turn(data_json: str, processor):
    """The single questions of the test split as two memoized eval datasets: first questions of their
    conversations (answered by the follow-up run's first turn) and the others (answered by `evaluate`)."""
    from ..data import ConversationDataset
    from ..data.conversation import load_llava_json

    records = load_llava_json(data_json)
    root = os.path.dirname(os.path.abspath(data_json))
    first = [r for r in records if r.get("turn", 0) == 0]
    later = [r for r in records if r.get("turn", 0) > 0]
    make = lambda rs: _MemoDataset(ConversationDataset(rs, processor, root, mode="eval")) if rs else None  # noqa
    return records, make(first), make(later)


def _evaluate_row(model, processor, data_json: str, first, later, batch_size: int) -> dict:
    """Single-question and follow-up accuracy of one model on the test split (see the module docstring)."""
    from ..evaluate import evaluate
    from .followup import evaluate_followups

    follow = evaluate_followups(model, processor, data_json, batch_size=batch_size, max_new_tokens=4,
                                first_turns=first)  # fmt: skip
    firsts = [p for p in follow["predictions"] if p["turn"] == 0]
    measured = later if later is not None else first
    outcome = evaluate(model, processor, measured, batch_size=batch_size, max_new_tokens=4, warmup=1,
                       progress=False)  # fmt: skip
    alone = outcome["predictions"] if later is not None else []
    singles = [{"type": p["type"], "correct": p["correct"]} for p in firsts + alone]
    correct = sum(p["correct"] for p in singles)
    per_type: dict[str, list[bool]] = {}
    for p in singles:
        per_type.setdefault(p["type"], []).append(p["correct"])
    metrics = outcome["metrics"]
    followup = None
    if follow["num_questions"]:
        follow_correct = sum(p["correct"] for p in follow["predictions"] if p["turn"] >= 1)
        followup = {
            "accuracy": follow["accuracy"],
            "num_questions": follow["num_questions"],
            "interval": wilson_interval(follow_correct, follow["num_questions"]),
            "per_type": follow["per_type"],
            # the same questions asked alone (single-turn, fresh prefill): the paired reference of the column
            "alone_accuracy": metrics["accuracy"],
        }
    return {
        "accuracy": correct / len(singles),
        "num_samples": len(singles),
        "interval": wilson_interval(correct, len(singles)),
        "per_type": {t: sum(v) / len(v) for t, v in sorted(per_type.items())},
        "followup": followup,
        "visual_tokens": metrics["visual_tokens"], "visual_tokens_input": metrics["visual_tokens_input"],
        "kv_cache_bytes": metrics["kv_cache_bytes"], "kv_cache_tokens": metrics["kv_cache_tokens"],
        "prefill_ms": metrics["prefill_ms"], "decode_ms_per_token": metrics["decode_ms_per_token"],
    }  # fmt: skip


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
        num_test_images: test images (`recipe.TEST_QUESTIONS_PER_IMAGE` questions each, asked alone and as one
            conversation).
        batch_size: prompts (and conversations) per `generate` call.
        rows: keys of the rows to run (default: all; e.g. `["full", "etc-m1-vid", "mean-k1"]`).
        plot: write `<output_dir>/demo.png`.
        progress: show a progress bar over the rows.
    """
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
    records, first, later = _split_by_turn(data_json, processor)
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
            measured = _evaluate_row(model, processor, data_json, first, later, batch_size)
        finally:
            _release(row, model)
        results.append({"key": row.key, "kind": row.kind, "name": row.name, "label": row.label, "budget": row.budget,
                        **measured})  # fmt: skip
        if bar is not None:
            bar.update(1)
        del model
    if bar is not None:
        bar.close()

    num_followups = sum(1 for r in records if r.get("turn", 0) > 0)
    report = {
        "rows": results,
        "test_data": os.path.abspath(data_json),
        "num_test_questions": len(records),
        "num_followup_questions": num_followups,
        "answer_prior": answer_prior(records),
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
    report["targets"] = check_targets(results, report["wall_time_s"])
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)) or ".", exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)

    print_fn(f"\nETC demo: tiny LLaVA (CLIP + Llama, {recipe.SIZES.text_layers} LLM layers of width "
             f"{recipe.SIZES.text_hidden_size}), shapes VQA, {len(records)} held-out test questions about "
             f"{len({r.get('conversation', r['image']) for r in records})} images, batch {batch_size}, "
             f"{torch.get_num_threads()} CPU thread(s)\n")  # fmt: skip
    print_fn(_format_table(results))
    print_fn(f"\nsingle: each question alone, with its 95 % Wilson interval (a constant answer per question type "
             f"scores {_pct(report['answer_prior'])}); follow-up: the {num_followups} questions asked after another "
             "one in the same conversation, from the cache of the first (question-aware compressors keep the tokens "
             "they chose for it); alone: those same questions asked alone. tokens kept: visual KV entries per image "
             "after the prefill (measured); KV cache: fp32 bytes per sample after the prefill, all layers; prefill "
             "ms: per batch, image encoding included.")  # fmt: skip
    if not any(r["kind"] == "baseline" for r in results) and rows is None:
        print_fn("training-free baselines: not available in this installation (etc_ext.baselines is missing)")
    for check in report["targets"]:
        print_fn(f"[{'met' if check['met'] else 'MISSED'}] {check['target']}: {check['detail']}")
    if plot_path:
        print_fn(f"plot: {os.path.abspath(plot_path)}")
    if json_path:
        print_fn(f"json: {os.path.abspath(json_path)}")
    print_fn(f"test data: {os.path.abspath(os.path.dirname(data_json))}")
    print_fn(f"done in {report['wall_time_s']:.0f} s")
    return report
