"""End-to-end benchmarks, the memory of ETC's target scores, and analytic projections to the real models.

Three tables, each a list of row dicts (JSON-ready) and a formatter:

- `e2e_rows(quick)`: on the tiny LLaVA (`etc_ext.models.tiny`, 144 visual tokens) and a tiny Qwen3-VL (Qwen3-VL-2B's
  attention shape, N in the hundreds), one `generate()` per variant with a fixed number of new tokens: prefill ms
  (from the call to the end of the first forward: image encoding, input preparation and the prefill, ETC's two
  passes and cache compaction included), per-token decode ms and the KV-cache bytes right after the prefill. Variants:
  the full model, ETC at M = 1, 4, 16 and (LLaVA) each training-free baseline at K = 1, 4, 16. Medians and minima
  over interleaved repeats (every variant runs once per round, so load on a shared machine hits all alike).
- `target_memory_rows(quick)`: the peak memory of ETC's instruction scores (SDPA forward, q/k of one layer hooked,
  `cross_attn_scores`) vs the same scores read from an eager model with `output_attentions=True`, measured on the
  tiny LLaVA in a fresh process, and `target_memory_projection()` for LLaVA-1.5-7B training shapes.
- `projection_rows()`: `etc_ext.cost` for LLaVA-1.5-7B and Qwen3-VL-2B (real configs on the meta device), full vs
  ETC M=1, next to the paper's 1024 -> 1 figures, and `PAPER_NOTES`, which explains the differences.

    python -m etc_ext.bench [--quick] [--threads N] [--sections e2e memory projections] [--out DIR]

`etc-ext bench` runs this module, plus the op tables of bench/run.py when the source checkout is there.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

__all__ = [
    "BASELINE_METHODS",
    "e2e_rows",
    "format_e2e",
    "target_memory_rows",
    "target_memory_projection",
    "format_memory",
    "projection_rows",
    "format_projections",
    "PAPER",
    "PAPER_NOTES",
    "main",
]

BASELINE_METHODS = ("mean", "subsample", "fastv", "visionzip", "instruction_merge")
BUDGETS = (1, 4, 16)
MiB = 2**20


# ============================================================================================ end to end
def _tiny_llava_inputs(processor, model, text_before: int, text_after: int, batch_size: int = 1) -> dict:
    """`[bos, text_before words, <image> x N, text_after words]` with random in-vocabulary ids and a random image."""
    generator = torch.Generator().manual_seed(1)
    tokenizer = processor.tokenizer
    special = set(tokenizer.all_special_ids) | {model.config.image_token_id}
    words = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    num_visual = model.config.image_seq_length

    def text(k):
        return words[torch.randint(len(words), (k,), generator=generator)].tolist()

    row = [tokenizer.bos_token_id] + text(text_before) + [model.config.image_token_id] * num_visual + text(text_after)
    input_ids = torch.tensor([row] * batch_size)
    size = model.config.vision_config.image_size
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(batch_size, 3, size, size, generator=generator),
    }


def tiny_llava_variants(quick: bool) -> tuple[dict, dict, int]:
    """{label: model} for the full tiny LLaVA, ETC M in BUDGETS and each baseline at each K; inputs; N."""
    from .baselines import apply_baseline
    from .config import ETCConfig
    from .models.llava import apply_etc
    from .models.tiny import build_tiny_llava

    model, processor = build_tiny_llava()
    model.generation_config.eos_token_id = None  # fixed-length generations
    inputs = _tiny_llava_inputs(processor, model, text_before=12, text_after=30)
    variants = {("full", "-"): model}
    for m in BUDGETS:
        variants[("ETC", m)] = apply_etc(copy.deepcopy(model), ETCConfig(num_compression_tokens=m, loss="none"))
    methods = BASELINE_METHODS[:2] + ("fastv",) if quick else BASELINE_METHODS
    for method in methods:
        for k in (1,) if quick else BUDGETS:
            variants[(method, k)] = apply_baseline(copy.deepcopy(model), method, k)
    return variants, inputs, model.config.image_seq_length


QWEN_PAD, QWEN_IMAGE, QWEN_VIDEO, QWEN_VISION_START, QWEN_VISION_END = 0, 250, 251, 252, 253


def build_tiny_qwen3_vl(hidden_size: int = 64, num_layers: int = 2, seed: int = 0):
    """A tiny random Qwen3-VL (real `Qwen3VLConfig`) with Qwen3-VL-2B's attention shape: 16 query heads on 8 kv heads
    of 128, interleaved M-RoPE sections [24, 20, 20]; a 1-layer vision tower with patch 2, 2 x 2 merge, DeepStack."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=256, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
            num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
            pad_token_id=QWEN_PAD,
            rope_parameters={
                "rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20], "mrope_interleaved": True
            },
        ),
        vision_config=dict(
            depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=2, spatial_merge_size=2,
            temporal_patch_size=2, out_hidden_size=hidden_size, num_position_embeddings=256,
            deepstack_visual_indexes=[0],
        ),
        image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO, vision_start_token_id=QWEN_VISION_START,
        vision_end_token_id=QWEN_VISION_END,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(config)
    model.set_attn_implementation("sdpa")
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = QWEN_PAD
    return model.eval()


def _tiny_qwen3_vl_inputs(grid: tuple[int, int], text_before: int, text_after: int) -> tuple[dict, int]:
    """One row as Qwen3VLProcessor lays it out: text, `<|vision_start|><|image_pad|> x N<|vision_end|>`, text."""
    generator = torch.Generator().manual_seed(1)
    height, width = grid
    num_visual = height * width // 4
    row = (
        torch.randint(3, 200, (text_before,), generator=generator).tolist()
        + [QWEN_VISION_START] + [QWEN_IMAGE] * num_visual + [QWEN_VISION_END]
        + torch.randint(3, 200, (text_after,), generator=generator).tolist()
    )  # fmt: skip
    input_ids = torch.tensor([row])
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": (input_ids == QWEN_IMAGE).long(),
        "pixel_values": torch.randn(height * width, 24, generator=generator),
        "image_grid_thw": torch.tensor([[1, height, width]]),
    }, num_visual


def tiny_qwen3_vl_variants(quick: bool) -> tuple[dict, dict, int]:
    from .config import ETCConfig
    from .models.qwen3_vl import apply_etc

    model = build_tiny_qwen3_vl()
    inputs, num_visual = _tiny_qwen3_vl_inputs((24, 24) if quick else (48, 48), text_before=13, text_after=29)
    variants = {("full", "-"): model}
    for m in BUDGETS:
        variants[("ETC", m)] = apply_etc(copy.deepcopy(model), ETCConfig(num_compression_tokens=m, loss="none"))
    return variants, inputs, num_visual


def _timed_generate(model, inputs: dict, new_tokens: int) -> dict:
    """One greedy `generate` of exactly `new_tokens` tokens: prefill s, decode s per token, cache after the prefill."""
    from .evaluate import GenerationProbe

    probe = GenerationProbe(model, torch.device("cpu"), inputs["attention_mask"])
    try:
        start = time.perf_counter()
        model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True
        )
        end = time.perf_counter()
    finally:
        probe.close()
    if probe.calls != new_tokens:
        raise RuntimeError(f"generate made {probe.calls} forward calls for {new_tokens} new tokens")
    return {
        "prefill_s": probe.prefill_end - start,
        "decode_s": (end - probe.prefill_end) / max(new_tokens - 1, 1),
        "kv_bytes": probe.cache_bytes,
        "cache_length": probe.cache_length,
    }


def _interleaved(variants: dict, inputs: dict, new_tokens: int, repeats: int) -> dict:
    """{key: [measurement per round]}; one warm-up round first, then `repeats` rounds over all variants."""
    runs = {key: [] for key in variants}
    with torch.inference_mode():
        for key, model in variants.items():
            _timed_generate(model, inputs, new_tokens)
        for _ in range(repeats):
            for key, model in variants.items():
                runs[key].append(_timed_generate(model, inputs, new_tokens))
    return runs


def e2e_rows(quick: bool = False, threads: int | None = 1, repeats: int | None = None, new_tokens: int = 16) -> list:
    """End-to-end rows for the tiny LLaVA and the tiny Qwen3-VL (see the module docstring). Sets torch's intra-op
    threads to `threads` (None: leave as is) for the measurement and restores them."""
    repeats = repeats or (3 if quick else 15)
    if quick:
        new_tokens = min(new_tokens, 6)
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    rows = []
    try:
        for model_name, build in (("tiny LLaVA", tiny_llava_variants), ("tiny Qwen3-VL", tiny_qwen3_vl_variants)):
            variants, inputs, num_visual = build(quick)
            runs = _interleaved(variants, inputs, new_tokens, repeats)
            full_bytes = runs[("full", "-")][0]["kv_bytes"]
            for (method, budget), measurements in runs.items():
                prefill = [r["prefill_s"] * 1e3 for r in measurements]
                decode = [r["decode_s"] * 1e3 for r in measurements]
                rows.append({
                    "model": model_name,
                    "method": method,
                    "visual_tokens_kept": num_visual if budget == "-" else budget,
                    "num_visual": num_visual,
                    "prompt_length": int(inputs["input_ids"].shape[1]),
                    "prefill_ms": statistics.median(prefill),
                    "prefill_min_ms": min(prefill),
                    "decode_ms_per_token": statistics.median(decode),
                    "decode_min_ms_per_token": min(decode),
                    "kv_bytes": measurements[0]["kv_bytes"],
                    "kv_vs_full": measurements[0]["kv_bytes"] / full_bytes,
                    "cache_length": measurements[0]["cache_length"],
                    "new_tokens": new_tokens,
                    "repeats": repeats,
                    "threads": torch.get_num_threads(),
                })  # fmt: skip
    finally:
        torch.set_num_threads(saved)
    return rows


def format_e2e(rows: list) -> str:
    lines = []
    header = (
        f"{'model':<15}{'method':<19}{'kept':>5}{'prefill ms':>12}{'(min)':>8}{'decode ms/tok':>15}{'(min)':>8}"
        f"{'cache len':>11}{'KV bytes':>12}{'vs full':>9}"
    )
    lines += [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['model']:<15}{r['method']:<19}{r['visual_tokens_kept']:>5}{r['prefill_ms']:>12.2f}"
            f"{r['prefill_min_ms']:>8.2f}{r['decode_ms_per_token']:>15.2f}{r['decode_min_ms_per_token']:>8.2f}"
            f"{r['cache_length']:>11}{r['kv_bytes']:>12,}{r['kv_vs_full']:>9.3f}"
        )
    return "\n".join(lines)
