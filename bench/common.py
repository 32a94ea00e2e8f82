"""Shared pieces of the benchmarks: shapes, input builders, timing and peak-memory probes."""

import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.utils.benchmark as tbench

ROOT = Path(__file__).resolve().parent.parent

# LLaVA-1.5-7B final layer: 32 heads of 128, one image of 576 visual tokens after a 35-token
# prefix. The instruction has T tokens; scores read the whole causal context (q_pos).
LLAVA_HEADS, LLAVA_HEAD_DIM, LLAVA_PREFIX, LLAVA_VISUAL = 32, 128, 35, 576
# Qwen3-VL-2B: 16 query heads on 8 kv heads of 128; 1024 visual tokens.
QWEN_HEADS, QWEN_KV_HEADS, QWEN_HEAD_DIM, QWEN_VISUAL = 16, 8, 128, 1024

# (name, B, H, Hkv, T, N, D)
SCORE_SHAPES = [
    ("llava7b-infer", 1, LLAVA_HEADS, LLAVA_HEADS, 32, LLAVA_VISUAL, LLAVA_HEAD_DIM),
    ("llava7b-b8", 8, LLAVA_HEADS, LLAVA_HEADS, 32, LLAVA_VISUAL, LLAVA_HEAD_DIM),
    ("llava7b-train", 16, LLAVA_HEADS, LLAVA_HEADS, 512, LLAVA_VISUAL, LLAVA_HEAD_DIM),
    ("qwen3vl2b-infer", 1, QWEN_HEADS, QWEN_KV_HEADS, 32, QWEN_VISUAL, QWEN_HEAD_DIM),
]


def score_inputs(batch, heads, kv_heads, queries, keys, dim, dtype=torch.float32, device="cpu", requires_grad=False):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, queries, dim, generator=gen).to(device, dtype)
    k = torch.randn(batch, kv_heads, keys, dim, generator=gen).to(device, dtype)
    return q.requires_grad_(requires_grad), k.requires_grad_(requires_grad)


def time_ms(fn, min_run_time=1.0):
    """Median wall time of fn() in ms (torch.utils.benchmark: warm-up, CUDA sync, repeats)."""
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def interleaved_min_ms(fns: dict, rounds: int, min_run_time: float) -> dict:
    """{name: ms}: the minimum over `rounds` rounds of `time_ms(fn, min_run_time)`, the paths interleaved within each
    round. On a shared machine the load drifts during a run: interleaving exposes every path to the same drift, and
    the minimum is the least disturbed estimate."""
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], time_ms(fn, min_run_time))
    return best


def copy_bandwidth_gbps(device, megabytes=1024, min_run_time=0.5):
    """Device memory bandwidth as a large device-to-device copy achieves it (bytes read + bytes written per second,
    GB/s): the ceiling the memory-bound rows are compared with. None on the CPU."""
    if device != "cuda":
        return None
    src = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), min_run_time)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def peak_extra_memory_bytes(module, function, args, device="cpu"):
    """Peak memory a call allocates beyond its inputs, measured in a fresh process.

    CUDA: torch.cuda.max_memory_allocated, in this process (the allocator's own count needs no fresh process).
    CPU: growth of the process's peak resident set (VmHWM, which starts afresh with the new process image; ru_maxrss
    would carry over the parent's peak across fork/exec), a coarse but real measurement (page granularity)."""
    if device == "cuda":
        import importlib

        m = importlib.import_module(module)
        inputs = m.memory_probe_inputs(*args, device=device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = getattr(m, function)(*inputs)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base  # the output included, as on the CPU
        del out, inputs
        return int(peak)
    code = f"""
import gc, json, sys, torch
sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'bench')!r})
import {module} as m
inputs = m.memory_probe_inputs(*{args!r}, device={device!r})
fn = getattr(m, {function!r})
gc.collect()
if {device!r} == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    fn(*inputs); torch.cuda.synchronize(); peak = torch.cuda.max_memory_allocated() - base
else:
    def high_water_mark():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    base = high_water_mark()
    fn(*inputs)
    peak = high_water_mark() - base
print(json.dumps(peak))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(json.loads(out.stdout.strip().splitlines()[-1]))


def interleaved_medians(calls: dict, repeats: int, device: str) -> dict:
    """Median and min wall time of each call (and its last output); the calls take turns in every round so that load
    on a shared machine affects all of them alike. One warm-up round first."""
    times = {name: [] for name in calls}
    outputs = {name: fn() for name, fn in calls.items()}
    for _ in range(repeats):
        for name, fn in calls.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            outputs[name] = fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), min(times[name]), outputs[name]) for name in calls}


def cache_bytes(cache) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)


def chat_batch(args, image_tokens: list, pad: int = 0) -> tuple:
    """`(input_ids, attention_mask, generator)` of `args.batch_size` left-padded rows: `args.text_before` random tokens, the
    image's `image_tokens`, then a question of `args.text_after + 3 i` random tokens (row i: different lengths, so
    the rows are padded). Seeded: the same arguments give the same batch; the generator, for the pixels, continues."""
    generator = torch.Generator().manual_seed(1)
    rows = []
    for i in range(args.batch_size):
        question = args.text_after + 3 * i
        rows.append(
            torch.randint(3, 200, (args.text_before,), generator=generator).tolist()
            + image_tokens
            + torch.randint(3, 200, (question,), generator=generator).tolist()
        )
    length = max(map(len, rows))
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, length - len(row) :] = torch.tensor(row)
        attention_mask[i, length - len(row) :] = 1
    return input_ids, attention_mask, generator


def parse_prefill_arguments(parser):
    """Adds the options every backbone prefill benchmark takes, parses the command line and applies --threads."""
    parser.add_argument("--num-compression-tokens", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def compare_prefills(model, apply_etc, inputs: dict, args, description: str, num_visual: int) -> None:
    """Times the uncompressed prefill of `inputs` against ETC's two-pass and masked one-pass prefills at each M (copies
    of `model` with `apply_etc`, untrained compression tokens: the timing does not depend on them) and prints a table
    of times and cache sizes (the backbone benchmarks' shared body). `args`: `parse_prefill_arguments`' options and
    the batch size; `description`: the model, for the header line."""
    from transformers.cache_utils import DynamicCache

    from etc_ext.config import ETCConfig

    print(
        f"{description}, N = {num_visual} visual tokens/image, batch {args.batch_size} (left padded, prompt length "
        f"{inputs['input_ids'].shape[1]}), {args.device} {args.dtype}, {torch.get_num_threads()} threads, median and "
        f"min of {args.repeats} interleaved runs"
    )
    calls = {
        ("uncompressed", "-"): lambda: model(
            **inputs, cache=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1
        )
    }
    for m in args.num_compression_tokens:
        etc_model = apply_etc(copy.deepcopy(model), ETCConfig(num_compression_tokens=m, loss="none"))
        for method, name in (("segmented", "ETC two-pass"), ("masked", "ETC masked 1-pass")):
            calls[(name, m)] = lambda etc_model=etc_model, method=method: etc_model(
                **inputs, use_cache=True, etc_prefill_method=method
            )
    with torch.inference_mode():
        results = interleaved_medians(calls, args.repeats, args.device)
    full_bytes = cache_bytes(results[("uncompressed", "-")][2].cache)

    print(f"\n{'prefill':<20}{'M':>3}{'median [ms]':>13}{'min [ms]':>10}", end="")
    print(f"{'cache len':>11}{'KV bytes':>12}{'vs full':>9}")
    for (name, m), (median, fastest, out) in results.items():
        nbytes = cache_bytes(out.cache)
        print(
            f"{name:<20}{m!s:>3}{median * 1e3:>13.1f}{fastest * 1e3:>10.1f}{out.cache.get_seq_length():>11}"
            f"{nbytes:>12,}{nbytes / full_bytes:>9.3f}"
        )
