"""The analytic cost model against hand-computed values and the real model classes."""

import pytest

from etc_ext import cost


@pytest.fixture(scope="module")
def llava_shape():
    return cost.TextModelShape.from_config(cost.llava_1_5_7b_config().text_config)


def test_kv_bytes_per_token(llava_shape):
    # K and V, 32 layers, 32 kv heads of 128, bf16.
    assert cost.kv_cache_bytes(llava_shape, 1) == 2 * 32 * 32 * 128 * 2
    qwen = cost.TextModelShape.from_config(cost.qwen3_vl_2b_config().text_config)
    assert cost.kv_cache_bytes(qwen, 1024, bytes_per_value=4) == 2 * 28 * 8 * 128 * 1024 * 4


def test_parameter_counts_from_meta_models():
    llava = cost.count_parameters(cost.llava_1_5_7b_config())
    assert 7.0e9 < llava["total"] < 7.1e9  # LLaVA-1.5-7B has 7.06 B parameters
    assert 0.29e9 < llava["vision"] < 0.31e9  # CLIP ViT-L/14-336
    qwen = cost.count_parameters(cost.qwen3_vl_2b_config())
    assert 2.0e9 < qwen["total"] < 2.2e9


def test_flops_model(llava_shape):
    # One token through the linear layers: 2 FLOPs per weight.
    per_token = 2 * 32 * (4096 * 128 * (2 * 32 + 2 * 32) + 3 * 4096 * 11008)
    attention_one_token = 2 * 2 * 32 * 32 * 128 * 1
    assert cost.prefill_flops(llava_shape, 1, 0, 0) == per_token + attention_one_token
    full = cost.prefill_flops(llava_shape, 35, 576, 40)
    etc = cost.prefill_flops(llava_shape, 35, 576, 40, num_compression=1)
    # ETC runs one more token through the LLM but the text attends to 35 + 1 instead of 611.
    assert etc - full == per_token + (
        cost._attention_flops(llava_shape, sum(35 + 1 + i + 1 for i in range(40)) + 612 * 613 // 2)
        - cost._attention_flops(llava_shape, 651 * 652 // 2)
    )
    assert cost.decode_flops(llava_shape, 76) < cost.decode_flops(llava_shape, 651)
