"""Benchmarks of weighted_aggregate and of the 32-layer KV-cache compaction at LLaVA-1.5-7B
sizes, ours against the eager reference and torch.compile(reference).

- weighted_aggregate: x (B, 576, 4096) (576 visual tokens, hidden 4096), B in {1, 8},
  float32 and bfloat16, K in {1, 4, 16, 64} merged tokens, logits float32 (B, K, 576).
- KV compaction: 32 layers of (B, 32, 650, 128) keys and values (35 prefix tokens, 576
  visual, 1 compression token, 38 text) keeping the 74 non-visual positions, with
  etc_ext.cache.compact_kv_layers (one write_compressed_kv_layers call) against a per-layer
  torch.gather / index_select loop and against our single-layer op called per layer.

Run as pytest-benchmark tests (from the repository root):
    python -m pytest bench/bench_aggregate_kv.py --benchmark-only -q
or print the table of `run_table`:
    python bench/bench_aggregate_kv.py [--quick]
"""

import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

import etc_ext  # noqa: E402,F401
from etc_ext import ops, reference  # noqa: E402
from etc_ext.cache import _check_keep_index, _check_pairs, compact_kv_layers  # noqa: E402
from common import interleaved_min_ms  # noqa: E402

# LLaVA-1.5-7B
TOKENS, HIDDEN = 576, 4096
BATCHES = [1, 8]
ROWS = [1, 4, 16, 64]
DTYPES = [torch.float32, torch.bfloat16]
LAYERS, KV_HEADS, HEAD_DIM = 32, 32, 128
PREFIX, VISUAL, COMPRESSION, TEXT = 35, 576, 1, 38  # 650 positions, 74 kept
KV_DTYPE = torch.bfloat16

# One compiled graph per (dtype, shape): more than dynamo's default recompile limit of 8.
torch._dynamo.config.recompile_limit = 64
_compiled_reference = None


def compiled_reference():
    global _compiled_reference
    if _compiled_reference is None:
        _compiled_reference = torch.compile(reference.weighted_aggregate, dynamic=False)
    return _compiled_reference


def aggregate_inputs(batch, rows, dtype, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, TOKENS, HIDDEN, generator=gen).to(dtype).to(device)
    logits = torch.randn(batch, rows, TOKENS, generator=gen).to(device)
    return x, logits


def kv_inputs(batch=1, seed=0, device="cpu"):
    """32 layers of (key, value) (B, Hkv, L, D) and keep_index (B, 74)."""
    gen = torch.Generator().manual_seed(seed)
    length = PREFIX + VISUAL + COMPRESSION + TEXT
    layers = [
        (
            torch.randn(batch, KV_HEADS, length, HEAD_DIM, generator=gen).to(KV_DTYPE).to(device),
            torch.randn(batch, KV_HEADS, length, HEAD_DIM, generator=gen).to(KV_DTYPE).to(device),
        )
        for _ in range(LAYERS)
    ]
    keep = torch.cat([torch.arange(PREFIX), torch.arange(PREFIX + VISUAL, length)])
    return layers, keep[None].expand(batch, -1).contiguous().to(device)


def gather_loop(layers, keep):
    """The baseline: one torch.gather per layer for keys and for values (per-row indices)."""
    batch, kept = keep.shape
    out = []
    for key, value in layers:
        idx = keep[:, None, :, None].expand(batch, key.shape[1], kept, key.shape[3])
        out.append((key.gather(2, idx), value.gather(2, idx)))
    return out


def index_select_loop(layers, keep):
    """The baseline when every row keeps the same positions (B = 1 here)."""
    positions = keep[0]
    return [(key.index_select(2, positions), value.index_select(2, positions)) for key, value in layers]


def compact_ours(layers, keep):
    """One write_compressed_kv_layers call for the 32 layers (what ETC's prefill runs)."""
    return compact_kv_layers(layers, keep)


def compact_ours_per_layer(layers, keep):
    """compact_kv_layers as it was before write_compressed_kv_layers: the same validation, then our single-layer op
    called once per layer."""
    _check_pairs(layers, "layers")
    _check_keep_index(keep, keep.shape[0], [k.shape[2] for k, _ in layers], keep.device, check=True)
    batch, kept = keep.shape
    slots = torch.arange(batch * kept).view(batch, kept)
    write = torch.ops.etc_ext.write_compressed_kv.default
    out = []
    for key, value in layers:
        new_key = key.new_empty(batch, key.shape[1], kept, key.shape[3])
        new_value = value.new_empty(new_key.shape)
        write(new_key.transpose(1, 2), new_value.transpose(1, 2), key, value, slots, index=keep)
        out.append((new_key, new_value))
    return out


_compiled_gather = None


def compiled_gather_loop():
    global _compiled_gather
    if _compiled_gather is None:
        _compiled_gather = torch.compile(gather_loop, dynamic=False)
    return _compiled_gather


# ------------------------------------------------------------------ pytest-benchmark
AGGREGATE_IMPLS = {
    "ours": lambda x, logits: ops.weighted_aggregate(x, logits),
    "eager": lambda x, logits: reference.weighted_aggregate(x, logits),
    "compile": lambda x, logits: compiled_reference()(x, logits),
}


@pytest.mark.parametrize("impl", sorted(AGGREGATE_IMPLS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("rows", ROWS)
def test_weighted_aggregate(benchmark, impl, dtype, batch, rows):
    x, logits = aggregate_inputs(batch, rows, dtype)
    fn = AGGREGATE_IMPLS[impl]
    with torch.inference_mode():
        expected = reference.weighted_aggregate(x, logits)
        out = fn(x, logits)  # warm-up (and compilation)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol)
        benchmark.group = f"weighted_aggregate {str(dtype)[6:]} x=({batch}, {TOKENS}, {HIDDEN}) K={rows}"
        benchmark.extra_info["bytes"] = x.numel() * x.element_size()
        benchmark(fn, x, logits)


KV_IMPLS = {
    "ours": compact_ours,
    "ours_per_layer": compact_ours_per_layer,
    "gather_loop": gather_loop,
    "index_select_loop": index_select_loop,
    "compile_gather_loop": lambda layers, keep: compiled_gather_loop()(layers, keep),
}


@pytest.mark.parametrize("impl", sorted(KV_IMPLS))
def test_kv_compaction_32_layers(benchmark, impl):
    layers, keep = kv_inputs()
    fn = KV_IMPLS[impl]
    with torch.inference_mode():
        out = fn(layers, keep)  # warm-up (and compilation)
        expected = gather_loop(layers, keep)
        assert all(torch.equal(a, b) for pair, ref in zip(out, expected) for a, b in zip(pair, ref))
        benchmark.group = f"kv compaction {LAYERS} layers ({1}, {KV_HEADS}, 650, {HEAD_DIM}) keep 74"
        benchmark(fn, layers, keep)


@pytest.mark.parametrize("impl", sorted(AGGREGATE_IMPLS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("rows", [1, 16])
def test_weighted_aggregate_backward(benchmark, impl, dtype, rows):
    x, logits = aggregate_inputs(8, rows, dtype)
    x.requires_grad_(True)
    logits.requires_grad_(True)
    grad = torch.randn(8, rows, HIDDEN).to(dtype)
    fn = AGGREGATE_IMPLS[impl]

    def step():
        x.grad = logits.grad = None
        fn(x, logits).backward(grad)

    step()  # warm-up (and compilation)
    benchmark.group = f"weighted_aggregate fwd+bwd {str(dtype)[6:]} x=(8, {TOKENS}, {HIDDEN}) K={rows}"
    benchmark(step)


@pytest.mark.parametrize("impl", ["eager", "ours"])
def test_write_compressed_kv_weights_32_layers(benchmark, impl):
    inputs = [merge_inputs(seed=layer) for layer in range(LAYERS)]
    fn = {"ours": merge_write_ours, "eager": merge_write_eager}[impl]
    with torch.inference_mode():
        expected = merge_inputs(seed=0)
        merge_write_eager(*expected)
        fn(*inputs[0])
        for got, want in zip(inputs[0][:2], expected[:2]):
            torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
        benchmark.group = f"write_compressed_kv weights form, {LAYERS} layers, K=16"
        benchmark(lambda: [fn(*args) for args in inputs])


# ------------------------------------------------------------------ table
def _time_ms(fn, min_run_time: float, repeats: int) -> float:
    """Best of `repeats` blocked_autorange medians, in ms: the machine is shared and noisy,
    and the minimum is the least disturbed estimate."""
    return interleaved_min_ms({"fn": fn}, repeats, min_run_time)["fn"]


def read_floor_ms(read_bytes: int, dtype, device, min_run_time: float, repeats: int) -> float:
    """The floor of a memory-bound op: one streaming read of `read_bytes` (a sum over one contiguous buffer of that
    size in `dtype`), in ms."""
    element_size = torch.empty((), dtype=dtype).element_size()
    buffer = torch.ones(max(1, read_bytes // element_size), dtype=dtype, device=device)
    return _time_ms(lambda: buffer.sum(), min_run_time, repeats)


def _row(op, shape, case, device, dtype, ours, eager, comp, moved_bytes, floor=None, **extra) -> dict:
    """One table row: times in ms, ratios = their time / ours, GB/s of the bytes the op must move, the floor (one read
    of the inputs, `read_floor_ms`) when measured."""
    return dict(op=op, shape=shape, case=case, device=str(device), dtype=str(dtype).replace("torch.", ""),
                ours_ms=ours, eager_ms=eager, compile_ms=comp, floor_ms=floor, ratio_eager=eager / ours,
                ratio_compile=comp / ours, ours_gbps=moved_bytes / (ours * 1e-3) / 1e9,
                threads=torch.get_num_threads(), **extra)  # fmt: skip


def run_table(quick: bool, device: str = "cpu") -> list:
    """Measure every row with torch.utils.benchmark (which synchronizes CUDA); returns one
    dict per row: {op, shape, case (short form of shape, for bench/run.py), dtype, ours_ms,
    eager_ms, compile_ms, ratio_eager, ratio_compile, ours_gbps, threads, ...}. ratio_* =
    their time / ours (> 1: ours is faster). quick: fewer shapes and shorter runs."""
    min_run_time, repeats = (0.2, 2) if quick or device != "cpu" else (0.5, 3)
    rows_out = []
    batches = [1] if quick else BATCHES
    ks = [1, 16] if quick or device != "cpu" else ROWS  # on a GPU: fewer torch.compile graphs to build
    with torch.inference_mode():
        for dtype in DTYPES:
            for batch in batches:
                for rows in ks:
                    x, logits = aggregate_inputs(batch, rows, dtype, device=device)
                    compiled = compiled_reference()
                    compiled(x, logits)  # compile outside the timing
                    ours = _time_ms(lambda: ops.weighted_aggregate(x, logits), min_run_time, repeats)
                    eager = _time_ms(lambda: reference.weighted_aggregate(x, logits), min_run_time, repeats)
                    comp = _time_ms(lambda: compiled(x, logits), min_run_time, repeats)
                    moved = x.numel() * x.element_size() + batch * rows * HIDDEN * x.element_size()
                    read = x.numel() * x.element_size() + logits.numel() * logits.element_size()
                    floor = read_floor_ms(read, dtype, device, min_run_time, repeats)
                    rows_out.append(
                        _row("weighted_aggregate", f"x=({batch}, {TOKENS}, {HIDDEN}) K={rows}", f"B={batch} K={rows}",
                             device, dtype, ours, eager, comp, moved, floor,
                             ours_gflops=2 * batch * rows * TOKENS * HIDDEN / (ours * 1e-3) / 1e9)  # fmt: skip
                    )
        layers, keep = kv_inputs(device=device)
        compiled = compiled_gather_loop()
        compiled(layers, keep)
        ours = _time_ms(lambda: compact_ours(layers, keep), min_run_time, repeats)
        eager = _time_ms(lambda: gather_loop(layers, keep), min_run_time, repeats)
        isel = _time_ms(lambda: index_select_loop(layers, keep), min_run_time, repeats)
        per_layer = _time_ms(lambda: compact_ours_per_layer(layers, keep), min_run_time, repeats)
        comp = _time_ms(lambda: compiled(layers, keep), min_run_time, repeats)
        moved = 2 * 2 * LAYERS * keep.numel() * KV_HEADS * HEAD_DIM * layers[0][0].element_size()  # read + write, k + v
        floor = read_floor_ms(moved // 2, KV_DTYPE, device, min_run_time, repeats)  # the kept entries read once
        rows_out.append(
            _row(f"kv_compaction_{LAYERS}L", f"({1}, {KV_HEADS}, 650, {HEAD_DIM}) keep {keep.shape[1]}",
                 f"{LAYERS}L keep {keep.shape[1]}/650", device, KV_DTYPE, ours, eager, comp, moved, floor,
                 index_select_loop_ms=isel, ratio_index_select=isel / ours, per_layer_op_ms=per_layer,
                 ratio_per_layer_op=per_layer / ours)  # fmt: skip
        )
    rows_out += aggregate_backward_rows(quick, device, min_run_time, repeats)
    rows_out.append(merge_write_row(device, min_run_time, repeats))
    return rows_out


def aggregate_backward_rows(quick: bool, device: str, min_run_time: float, repeats: int) -> list:
    """weighted_aggregate forward + backward (gradients of x and logits) at B=8 (B=1 with quick), K in {1, 16}."""
    rows_out = []
    batch = 1 if quick else 8
    for dtype in DTYPES:
        for rows in (1, 16):
            x, logits = aggregate_inputs(batch, rows, dtype, device=device)
            x.requires_grad_(True)
            logits.requires_grad_(True)
            grad = torch.randn(batch, rows, HIDDEN, device=device).to(dtype)
            times = {}
            for name, fn in AGGREGATE_IMPLS.items():

                def step(fn=fn):
                    x.grad = logits.grad = None
                    fn(x, logits).backward(grad)

                step()  # warm-up (compilation)
                times[name] = _time_ms(step, min_run_time, repeats)
            moved = 3 * x.numel() * x.element_size()  # x read twice, dx written
            rows_out.append(
                _row("weighted_aggregate", f"x=({batch}, {TOKENS}, {HIDDEN}) K={rows} fwd+bwd",
                     f"B={batch} K={rows} fwd+bwd", device, dtype, times["ours"], times["eager"], times["compile"],
                     moved)  # fmt: skip
            )
    return rows_out


def merge_inputs(device="cpu", rows=16, seed=0):
    """One layer of LLaVA-1.5-7B keys/values (1, 32, 650, 128) bf16, a cache of the same layout, and the weights of
    a merging compressor: K rows of softmax weights over the 576 visual positions, written after the 35 prefix slots."""
    gen = torch.Generator().manual_seed(seed)
    length = PREFIX + VISUAL + COMPRESSION + TEXT
    key = torch.randn(1, KV_HEADS, length, HEAD_DIM, generator=gen).to(KV_DTYPE).to(device)
    value = torch.randn(1, KV_HEADS, length, HEAD_DIM, generator=gen).to(KV_DTYPE).to(device)
    weights = torch.randn(1, rows, VISUAL, generator=gen).softmax(-1).to(device)
    slots = (PREFIX + torch.arange(rows))[None].to(device)
    cache_k = torch.zeros(1, KV_HEADS, PREFIX + rows + TEXT, HEAD_DIM, dtype=KV_DTYPE, device=device)
    cache_v = torch.zeros_like(cache_k)
    visual = slice(PREFIX, PREFIX + VISUAL)
    return cache_k, cache_v, key[:, :, visual], value[:, :, visual], weights, slots


def merge_write_ours(cache_k, cache_v, key, value, weights, slots):
    # HF layout (B, Hkv, L, D) seen as a paged cache of one block per row: transpose(1, 2)
    ops.write_compressed_kv(cache_k.transpose(1, 2), cache_v.transpose(1, 2), key, value, slots, weights=weights)


def merge_write_eager(cache_k, cache_v, key, value, weights, slots):
    """The PyTorch path: merge in fp32 (einsum), cast, copy into the cache positions."""
    positions = slots[0]
    for cache, source in ((cache_k, key), (cache_v, value)):
        merged = torch.einsum("bkn,bhnd->bhkd", weights, source.float()).to(cache.dtype)
        cache.index_copy_(2, positions, merged)


def merge_write_row(device: str, min_run_time: float, repeats: int) -> dict:
    """write_compressed_kv in its weights form (merging compressors) for 32 layers, K=16, vs the einsum + copy loop."""
    inputs = [merge_inputs(device, seed=layer) for layer in range(LAYERS)]
    _compiled = torch.compile(merge_write_eager, dynamic=False)
    with torch.inference_mode():
        for args in inputs:
            _compiled(*args)
        ours = _time_ms(lambda: [merge_write_ours(*args) for args in inputs], min_run_time, repeats)
        eager = _time_ms(lambda: [merge_write_eager(*args) for args in inputs], min_run_time, repeats)
        comp = _time_ms(lambda: [_compiled(*args) for args in inputs], min_run_time, repeats)
    key, weights = inputs[0][2], inputs[0][4]
    moved = LAYERS * 2 * key.numel() * key.element_size()  # the visual keys and values read once
    read = moved + LAYERS * weights.numel() * weights.element_size()
    floor = read_floor_ms(read, KV_DTYPE, device, min_run_time, repeats)
    return _row("write_compressed_kv", f"{LAYERS}L (1, {KV_HEADS}, {VISUAL}, {HEAD_DIM}) -> K=16",
                f"{LAYERS}L weights K=16", device, KV_DTYPE, ours, eager, comp, moved, floor)


def format_table(rows: list) -> str:
    header = f"{'op':<24} {'shape':<28} {'dtype':<9} {'ours ms':>9} {'eager ms':>9} {'compile ms':>10} {'x eager':>8} {'x compile':>9} {'GB/s':>7}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['op']:<24} {r['shape']:<28} {r['dtype']:<9} {r['ours_ms']:>9.3f} {r['eager_ms']:>9.3f} "
            f"{r['compile_ms']:>10.3f} {r['ratio_eager']:>8.2f} {r['ratio_compile']:>9.2f} {r['ours_gbps']:>7.1f}"
        )
        if "index_select_loop_ms" in r:
            lines.append(f"{'':<24} index_select loop: {r['index_select_loop_ms']:.3f} ms (x{r['ratio_index_select']:.2f}), "
                         f"our op per layer: {r['per_layer_op_ms']:.3f} ms (x{r['ratio_per_layer_op']:.2f})")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes, shorter runs")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(format_table(run_table(args.quick, device=args.device)))
