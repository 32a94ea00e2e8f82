"""The shipped demo models end to end on a GPU, checked against the CPU: ETC and a baseline through `generate`
(cross_attn_scores, write_compressed_kv and the cache compaction on CUDA), then a short ETC training run on CUDA in
bf16 autocast (cross_attn_scores' backward on CUDA).

    python scripts/gpu_e2e.py [--device cuda] [--questions 100] [--train-steps 20] [--out DIR]

Prints, per model, accuracy and the share of answers that agree between the CPU and the device, KV-cache bytes after
prefill and prefill time; then the training losses. Exits 1 when an answer rate or a loss is off (see `main`).
"""

import argparse
import json
import os
import sys
import tempfile
import time

import torch

ROWS = ("full", "etc-m1-vid", "etc-m16-vid", "fastv-k4")
# fp32 on both devices: answers may differ only where two logits are within rounding (different kernels, summation
# orders); more than this share of differing answers means a wrong kernel.
MIN_AGREEMENT = 0.95


def evaluate_rows(device: str, data_json: str, questions: int) -> dict:
    from etc_ext.data import ConversationDataset
    from etc_ext.demo.artifacts import load_full
    from etc_ext.demo.run import _release, _row_model, demo_rows
    from etc_ext.evaluate import evaluate

    rows = {row.key: row for row in demo_rows(baselines=True)}
    full_model, processor = load_full()
    dataset = ConversationDataset(data_json, processor, mode="eval")
    dataset.samples = dataset.samples[:questions]
    results = {}
    for key in ROWS:
        model = _row_model(rows[key], full_model, None).to(device)
        try:
            outcome = evaluate(model, processor, dataset, batch_size=32, max_new_tokens=4, warmup=1, device=device,
                               progress=False)  # fmt: skip
        finally:
            _release(rows[key], model)
        metrics = outcome["metrics"]
        results[key] = {
            "accuracy": metrics["accuracy"],
            "kv_cache_bytes": metrics["kv_cache_bytes"],
            "prefill_ms": metrics["prefill_ms"],
            "predictions": [p["prediction"] for p in outcome["predictions"]],
        }
        full_model.to("cpu")
    return results


def train_smoke(device: str, steps: int, work: str) -> dict:
    """ETC M=1 VID from the shipped full model, `steps` optimizer steps on fresh training scenes."""
    from etc_ext.data import generate_shapes_dataset
    from etc_ext.demo import recipe
    from etc_ext.demo.artifacts import checkpoint_path
    from etc_ext.train import TrainingArguments, train

    train_json = generate_shapes_dataset(os.path.join(work, "train_data"), 64, seed=1, split="train", progress=False)
    run = recipe.ETC_RUNS[0]
    options = {**run.training, "max_steps": steps, "per_device_batch_size": 8}
    args = TrainingArguments(
        model=checkpoint_path("full"), data=train_json, output_dir=os.path.join(work, "train"),
        etc_config=json.dumps(run.etc), device=device, precision="bf16" if device == "cuda" else "fp32",
        save_steps=0, logging_steps=1, progress=False, **options,
    )  # fmt: skip
    start = time.perf_counter()
    summary = train(args)
    losses = [json.loads(line) for line in open(os.path.join(work, "train", "metrics.jsonl"))]
    losses = [m for m in losses if "loss" in m]
    return {
        "seconds": time.perf_counter() - start,
        "global_step": summary["global_step"],
        "first": {k: losses[0].get(k) for k in ("loss", "ce", "vid")},
        "last": {k: losses[-1].get(k) for k in ("loss", "ce", "vid")},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--out", default=None, help="write the results here as json")
    args = parser.parse_args(argv)

    from etc_ext.demo.run import generate_test_data

    failures = []
    with tempfile.TemporaryDirectory() as work:
        data_json = generate_test_data(os.path.join(work, "data"), (args.questions + 1) // 2)
        torch.manual_seed(0)
        on_cpu = evaluate_rows("cpu", data_json, args.questions)
        on_device = evaluate_rows(args.device, data_json, args.questions)
        print(f"{'row':<14}{'acc cpu':>9}{'acc ' + args.device:>10}{'agree':>8}{'KV bytes':>11}{'prefill ms':>12}")
        report = {"rows": {}}
        for key in ROWS:
            a, b = on_cpu[key], on_device[key]
            agree = sum(x == y for x, y in zip(a["predictions"], b["predictions"])) / len(a["predictions"])
            print(f"{key:<14}{a['accuracy']:>9.3f}{b['accuracy']:>10.3f}{agree:>8.3f}{b['kv_cache_bytes']:>11}"
                  f"{b['prefill_ms']:>12.2f}")  # fmt: skip
            report["rows"][key] = {"cpu": {k: v for k, v in a.items() if k != "predictions"},
                                   args.device: {k: v for k, v in b.items() if k != "predictions"}, "agree": agree}  # fmt: skip
            if agree < MIN_AGREEMENT:
                failures.append(f"{key}: only {agree:.1%} of answers agree between cpu and {args.device}")
            if a["kv_cache_bytes"] != b["kv_cache_bytes"]:
                failures.append(f"{key}: KV bytes differ ({a['kv_cache_bytes']} vs {b['kv_cache_bytes']})")
        if args.train_steps:
            trained = train_smoke(args.device, args.train_steps, work)
            report["train"] = trained
            print(f"training on {args.device}: {trained['global_step']} steps in {trained['seconds']:.1f} s, "
                  f"first {trained['first']}, last {trained['last']}")  # fmt: skip
            values = [v for part in ("first", "last") for v in trained[part].values() if v is not None]
            if trained["global_step"] != args.train_steps or not all(map(lambda v: v == v and abs(v) < 1e6, values)):
                failures.append(f"training: {trained}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    for failure in failures:
        print("FAIL", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
