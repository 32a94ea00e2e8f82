"""Prints the benchmark tables: etc_ext's ops vs the PyTorch path, end to end, memory, projections; writes JSON and plots.

    python bench/run.py [--quick] [--threads N] [--sections ops e2e memory projections] [--out outputs/bench]
    etc-ext bench ...          # the same (the ops section needs this source checkout)

The op table (this file): columns are our op, the eager reference (etc_ext.reference), torch.compile(reference), and for
cross_attn_scores the q.k^T matmul alone (the floor a fused op can reach); ratios are
reference time / our time. cross_attn_scores times are the minimum of 5 interleaved rounds of every path (robust to a
shared machine's drifting load). Memory: peak bytes a call allocates beyond its inputs, measured
in a fresh process; written to ops.json and ops.png. The other sections are etc_ext.bench (end to end on tiny
LLaVA / Qwen3-VL, the memory of ETC's target scores, analytic projections to the real models), written to bench.json
and e2e.png.
"""

import importlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SCORE_SHAPES, copy_bandwidth_gbps, interleaved_min_ms, peak_extra_memory_bytes, score_inputs  # noqa: E402

import etc_ext  # noqa: E402


# (rounds, min_run_time in s) of the cross_attn_scores rows, by `quick`. A GPU's timings hardly drift: fewer rounds.
_TIMING = {False: (5, 0.3), True: (1, 0.3)}
_CUDA_TIMING = (2, 0.2)


def timing(device, quick):
    return _TIMING[quick] if device == "cpu" or quick else _CUDA_TIMING


def score_dtypes(device):
    """fp32 on the CPU (what CPU models run in); the half types models run in on a GPU."""
    return (torch.float32,) if device == "cpu" else (torch.bfloat16, torch.float16)


def score_rows(device, quick, with_memory):
    import bench_cross_attn_scores as bcs

    rows = []
    shapes = SCORE_SHAPES[:2] if quick else SCORE_SHAPES
    for dtype in score_dtypes(device):
        for name, *shape in shapes:
            q, k = score_inputs(*shape, dtype=dtype, device=device)
            fns = {path: (lambda fn=fn: fn(q, k)) for path, fn in bcs.PATHS.items()}
            times = interleaved_min_ms(fns, *timing(device, quick))
            moved = q.numel() * q.element_size() + k.numel() * k.element_size() + 4 * shape[0] * shape[4]
            row = {
                "op": "cross_attn_scores",
                "case": name,
                "shape": "B={} H={} Hkv={} T={} N={} D={}".format(*shape),
                "dtype": str(dtype).replace("torch.", ""),
                "ours_ms": times["ours"],
                "eager_ms": times["eager"],
                "compile_ms": times["compile"],
                "floor_ms": times["matmul"],
                "ours_gbps": moved / (times["ours"] * 1e-3) / 1e9,
                "ours_tflops": 2 * shape[0] * shape[1] * shape[3] * shape[4] * shape[5] / (times["ours"] * 1e-3) / 1e12,
            }
            if with_memory:
                args = (*shape, str(dtype).replace("torch.", ""))
                row["ours_extra_bytes"] = peak_extra_memory_bytes("bench_cross_attn_scores", "memory_ours", args, device)
                row["eager_extra_bytes"] = peak_extra_memory_bytes("bench_cross_attn_scores", "memory_eager", args, device)
            rows.append(row)
    for name, *shape in shapes:
        rows.append(score_backward_row(name, shape, score_dtypes(device)[0], device, quick))
    return rows


def score_backward_row(name, shape, dtype, device, quick):
    """Forward + backward (gradients of q and k from a random upstream gradient) of each path; no floor column."""
    import bench_cross_attn_scores as bcs

    q, k = score_inputs(*shape, dtype=dtype, device=device, requires_grad=True)
    grad = torch.randn(shape[0], shape[4], device=device)
    steps = {}
    for path in ("ours", "eager", "compile"):
        fn = bcs.PATHS[path]

        def step(fn=fn):
            q.grad = k.grad = None
            fn(q, k).backward(grad)

        step()  # warm-up (compilation)
        steps[path] = step
    times = interleaved_min_ms(steps, *timing(device, quick))
    return {
        "op": "cross_attn_scores",
        "case": name + " fwd+bwd",
        "shape": "B={} H={} Hkv={} T={} N={} D={}".format(*shape),
        "dtype": str(dtype).replace("torch.", ""),
        "ours_ms": times["ours"],
        "eager_ms": times["eager"],
        "compile_ms": times["compile"],
        "floor_ms": None,
    }


def other_op_rows(device, quick):
    """Rows of the other op benchmarks, each module exposing run_table(quick, device)."""
    rows = []
    for module_name in ("bench_aggregate_kv",):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            continue
        rows += module.run_table(quick=quick, device=device)
    return rows


def fmt_bytes(n):
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def print_table(rows, peak_gbps=None):
    """One line per row; with `peak_gbps` (a GPU's measured copy bandwidth) also our GB/s as a share of it."""
    precision = 3 if peak_gbps else 2  # GPU rows are tens of microseconds
    header = (f"{'op':<20}{'case':<26}{'dtype':<10}{'ours ms':>10}{'eager ms':>10}{'compile ms':>11}{'floor ms':>10}"
              f"{'x eager':>9}{'x compile':>10}{'ours GB/s':>10}{'% peak' if peak_gbps else '':>7}"
              f"{'ours mem':>11}{'eager mem':>11}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for r in rows:
        floor = r.get("floor_ms")
        gbps = r.get("ours_gbps")
        share = f"{100 * gbps / peak_gbps:.0f}" if peak_gbps and gbps is not None else ""
        print(
            f"{r['op']:<20}{r['case']:<26}{r['dtype']:<10}{r['ours_ms']:>10.{precision}f}"
            f"{r['eager_ms']:>10.{precision}f}{r['compile_ms']:>11.{precision}f}"
            f"{floor if floor is not None else float('nan'):>10.{precision}f}"
            f"{r['eager_ms'] / r['ours_ms']:>9.2f}{r['compile_ms'] / r['ours_ms']:>10.2f}"
            f"{gbps if gbps is not None else float('nan'):>10.1f}{share:>7}"
            f"{fmt_bytes(r.get('ours_extra_bytes')):>11}{fmt_bytes(r.get('eager_extra_bytes')):>11}"
        )


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['op']}\n{r['case']} {r['dtype']}" for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    ax.bar([x - 0.2 for x in xs], [r["eager_ms"] / r["ours_ms"] for r in rows], 0.4, label="eager / ours")
    ax.bar([x + 0.2 for x in xs], [r["compile_ms"] / r["ours_ms"] for r in rows], 0.4, label="torch.compile / ours")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(list(xs), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("speed-up of the etc_ext op")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def op_section(device, quick, with_memory, out):
    """The op rows, printed as one table; writes ops.json and ops.png under out (etc_ext.bench calls this)."""
    peak_gbps = copy_bandwidth_gbps(device)
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    if peak_gbps:
        print(f"{gpu}: device-to-device copy {peak_gbps:.0f} GB/s (read + write), the '% peak' column's 100 %")
    rows = score_rows(device, quick, with_memory) + other_op_rows(device, quick)
    print_table(rows, peak_gbps)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"device": device, "gpu": gpu, "copy_gbps": peak_gbps, "torch": torch.__version__, "rows": rows}
    (out / "ops.json").write_text(json.dumps(summary, indent=2))
    plot(rows, out / "ops.png")
    print(f"wrote {out / 'ops.json'} and {out / 'ops.png'}", flush=True)
    return rows


def main(argv=None):
    from etc_ext.bench import main as bench_main

    return bench_main(argv, op_section=op_section)


if __name__ == "__main__":
    sys.exit(main())
