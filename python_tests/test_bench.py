"""The benchmark runner (etc_ext.bench, bench/run.py, `etc-ext bench`): quick rows are sane, projections are
etc_ext.cost's numbers, the CLI parses. CPU, one thread."""

import json
import subprocess
import sys

import pytest

from etc_ext import bench, cost
from etc_ext.cli import build_parser


@pytest.fixture(scope="module")
def quick_e2e():
    return bench.e2e_rows(quick=True, threads=1, repeats=1, new_tokens=3)


def test_quick_e2e_rows_have_positive_times_and_etc_caches_less_than_full(quick_e2e):
    models = {r["model"] for r in quick_e2e}
    assert models == {"tiny LLaVA", "tiny Qwen3-VL"}
    for model in models:
        rows = {(r["method"], r["visual_tokens_kept"]): r for r in quick_e2e if r["model"] == model}
        full = next(r for r in rows.values() if r["method"] == "full")
        etc = [rows[("ETC", m)] for m in (1, 4, 16)]
        for r in rows.values():
            assert r["prefill_ms"] > 0 and r["decode_ms_per_token"] > 0 and r["kv_bytes"] > 0
            assert r["threads"] == 1
        # bytes scale with cached entries: full caches N visual entries, ETC M
        assert full["kv_bytes"] > etc[2]["kv_bytes"] > etc[1]["kv_bytes"] > etc[0]["kv_bytes"]
        assert full["cache_length"] - etc[0]["cache_length"] == full["num_visual"] - 1
        assert etc[0]["kv_vs_full"] < 0.5
    for model in models:  # a baseline at K caches as much as ETC at M = K
        baselines = [r for r in quick_e2e if r["model"] == model and r["method"] in bench.BASELINE_METHODS]
        etc1 = next(
            r for r in quick_e2e if r["model"] == model and r["method"] == "ETC" and r["visual_tokens_kept"] == 1
        )
        assert baselines and all(r["kv_bytes"] == etc1["kv_bytes"] for r in baselines if r["visual_tokens_kept"] == 1)
    assert "tiny Qwen3-VL" in bench.format_e2e(quick_e2e)


def test_projections_are_etc_ext_cost():
    rows = bench.projection_rows()
    shape = cost.TextModelShape.from_config(cost.qwen3_vl_2b_config().text_config)
    full = next(r for r in rows if r["model"] == "Qwen3-VL-2B" and r["method"] == "full")
    etc = next(r for r in rows if r["model"] == "Qwen3-VL-2B" and r["method"] == "ETC M=1")
    assert full["kv_fp32_bytes"] == cost.kv_cache_bytes(shape, 14 + 1024 + 30, 4)
    assert etc["kv_bf16_bytes"] == cost.kv_cache_bytes(shape, 14 + 1 + 30, 2)
    assert full["prefill_flops"] == cost.prefill_flops(shape, 14, 1024, 30)
    assert etc["decode_flops_per_token"] == cost.decode_flops(shape, 45)
    assert round(full["kv_fp32_bytes"] / 2**20, 1) == 233.6 and round(etc["kv_fp32_bytes"] / 2**20, 1) == 9.8
    llava = [r for r in rows if r["model"] == "LLaVA-1.5-7B"]
    assert [r["cached_tokens"] for r in llava] == [35 + 576 + 40, 35 + 1 + 40]
    notes = bench.paper_notes()
    assert "223.5" in notes and "1.37 T" in notes and "unexplained" in notes
    # the paper's full figure is consistent with a linear-only count over ~1024 visual + a few dozen text tokens
    assert 1024 < bench.paper_comparison()["paper_full_tokens_linear_only"] < 1100


def test_target_memory_projection_eager_dwarfs_cross_attn_scores():
    rows = {r["path"]: r["peak_extra_bytes"] for r in bench.target_memory_projection()}
    length = 35 + 576 + 512
    assert rows["eager: probabilities of all layers (bf16)"] == 32 * 16 * 32 * length * length * 2
    assert rows["ETC: + hooked q/k of the score layer (bf16)"] < rows["eager: probabilities of all layers (bf16)"] / 100


def test_etc_ext_bench_help_and_arguments():
    out = subprocess.run(
        [sys.executable, "-m", "etc_ext.cli", "bench", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--quick" in out and "--sections" in out and "--threads" in out
    args = build_parser().parse_args(["bench", "--quick", "--sections", "projections", "--threads", "1"])
    assert args.command == "bench" and args.quick and args.sections == ["projections"] and args.threads == 1


def test_runner_writes_json(tmp_path, capsys):
    # projections only: the runner's plumbing (sections, bench.json) without the slow parts
    bench.main(["--sections", "projections", "--out", str(tmp_path)], op_section=lambda *a: [])
    data = json.loads((tmp_path / "bench.json").read_text())
    assert [r["method"] for r in data["projections"]][:2] == ["full", "ETC M=1"]
    assert data["paper"]["kv_full_mb"] == 223.5
    assert "[projections]" in capsys.readouterr().out


def test_runner_reports_and_sets_the_cpu_kernels_instruction_set(tmp_path, capsys):
    from etc_ext import ops

    lowest = ops.supported_cpu_capabilities()[0]
    before = ops.cpu_capability()
    try:
        bench.main(["--sections", "projections", "--out", str(tmp_path), "--cpu-capability", lowest],
                   op_section=lambda *a: [])  # fmt: skip
        data = json.loads((tmp_path / "bench.json").read_text())
        assert data["cpu_capability"] == lowest == ops.cpu_capability()
        assert f"CPU kernels: {lowest} (this CPU supports {', '.join(ops.supported_cpu_capabilities())})" in (
            capsys.readouterr().out
        )
    finally:
        ops.set_cpu_capability(before)


def test_every_public_name_exists():
    """`from etc_ext.bench import *` works: every name in __all__ is defined."""
    missing = [name for name in bench.__all__ if not hasattr(bench, name)]
    assert missing == []
