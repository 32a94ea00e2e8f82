"""End to end on the tiny LLaVA (144 visual tokens) and the tiny Qwen3-VL: one generate() of a fixed number of
tokens, full model vs ETC M=1 (and two LLaVA baselines), one intra-op thread.

    pytest bench/bench_e2e.py --benchmark-only
    python bench/run.py --sections e2e     # the full table: prefill ms, decode ms/token, KV bytes, every variant
"""

import pytest
import torch

from etc_ext import bench

NEW_TOKENS = 8


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llava():
    return bench.tiny_llava_variants(quick=True)


@pytest.fixture(scope="module")
def qwen3_vl():
    return bench.tiny_qwen3_vl_variants(quick=False)  # N = 576


def _generate(model, inputs):
    with torch.inference_mode():
        return model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True
        )


@pytest.mark.parametrize("variant", [("full", "-"), ("ETC", 1), ("mean", 1), ("fastv", 1)], ids=str)
def test_tiny_llava_generate(benchmark, llava, variant):
    variants, inputs, _ = llava
    benchmark.group = f"tiny LLaVA generate {NEW_TOKENS} tokens"
    _generate(variants[variant], inputs)  # warm-up
    out = benchmark(_generate, variants[variant], inputs)
    assert out.shape[1] == inputs["input_ids"].shape[1] + NEW_TOKENS


@pytest.mark.parametrize("variant", [("full", "-"), ("ETC", 1), ("ETC", 16)], ids=str)
def test_tiny_qwen3_vl_generate(benchmark, qwen3_vl, variant):
    variants, inputs, _ = qwen3_vl
    benchmark.group = f"tiny Qwen3-VL generate {NEW_TOKENS} tokens"
    _generate(variants[variant], inputs)
    out = benchmark(_generate, variants[variant], inputs)
    assert out.shape[1] == inputs["input_ids"].shape[1] + NEW_TOKENS
