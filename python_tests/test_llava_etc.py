"""ETC on a tiny random LLaVA-1.5 (real LlavaConfig / CLIPVisionConfig / LlamaConfig classes), CPU, fp32."""

import copy
import json
import math

import pytest
import torch
from conftest import assert_disabled_and_removed_reproduce, assert_generate_matches_forward_loop, llava_batch
from conftest import logits_with_compression_states_held, train_etc_steps, uncached_decoding_loop
from conftest import tiny_llava as shared_tiny_llava
from transformers import LlavaForConditionalGeneration

import etc_ext  # noqa: F401  (loads the ops)
from etc_ext.compress import (
    COMPRESSION,
    TEXT,
    VISUAL,
    ETCCache,
    bottleneck_mask,
    etc_prefill,
    find_image_spans,
    insert_compression_tokens,
)
from etc_ext.config import ETCConfig
from etc_ext.distill import vid_loss
from etc_ext.models.llava import (
    ETCLlavaForConditionalGeneration,
    apply_etc,
    from_pretrained,
    instruction_target,
    prepare_inputs,
    remove_etc,
    save_pretrained,
)

IMAGE = 99  # image token id
IMAGE_SIZE, PATCH = 16, 4
N = (IMAGE_SIZE // PATCH) ** 2  # 16 visual tokens per image


def tiny_llava(attn_implementation="sdpa", seed=0, hidden_size=32, num_layers=2, vocab_size=100, image_token_id=IMAGE):
    """conftest's tiny LLaVA with this file's sizes (16 x 16 images, 4 x 4 patches)."""
    return shared_tiny_llava(
        attn_implementation=attn_implementation, seed=seed, hidden_size=hidden_size, num_layers=num_layers,
        vocab_size=vocab_size, image_token_id=image_token_id, image_size=IMAGE_SIZE, patch=PATCH,
    )  # fmt: skip


def small_config(**changes):
    return ETCConfig(**{"num_compression_tokens": 2, "decoder_hidden_size": 16, "decoder_num_layers": 1, **changes})


def make_batch(rows, padding_side="left", seed=1, answer=0):
    """conftest's `llava_batch` with this file's sizes (N tokens per "I"): the inputs and labels."""
    return llava_batch(
        rows, image_tokens=N, image_size=IMAGE_SIZE, padding_side=padding_side, seed=seed, answer=answer
    )


CHAT = [[2, "I", 3], [2, "I", 6]]  # same prefix ("USER:"), questions of different lengths: left padding


# ============================================================================ config
def test_config_json_round_trip(tmp_path):
    config = ETCConfig(num_compression_tokens=4, alpha=0.3, loss="mse", teacher="self", target_layer=-2)
    assert ETCConfig.from_dict(config.to_dict()) == config
    path = tmp_path / "etc_config.json"
    config.to_json_file(path)
    assert json.loads(path.read_text())["num_compression_tokens"] == 4
    assert ETCConfig.from_json_file(path) == config
    assert ETCConfig().alpha == 0.6 and ETCConfig().vid_weight == 1e-5 and ETCConfig().target_layer == -1
    assert ETCConfig().score_context == "causal"


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_compression_tokens", 0),
        ("num_compression_tokens", 1.5),
        ("alpha", 1.5),
        ("vid_weight", -1.0),
        ("loss", "l1"),
        ("teacher", "ema"),
        ("score_context", "all"),
        ("decoder_hidden_size", 0),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ETCConfig(**{field: value})


def test_config_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown field.*num_tokens"):
        ETCConfig.from_dict({"num_tokens": 2})


# ============================================================================ bookkeeping and mask
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_insertion_layout_and_positions(padding_side):
    inputs, _ = make_batch([[2, "I", 1, "I", 3], [1, "I", 2]], padding_side=padding_side)
    mask = inputs["attention_mask"]
    spans = find_image_spans(inputs["input_ids"] == IMAGE, [N, N, N])
    assert spans.row.tolist() == [0, 0, 1] and spans.index_in_row.tolist() == [0, 1, 0]
    layout = insert_compression_tokens(spans, inputs["input_ids"].shape[1], 2, mask)
    assert layout.length == inputs["input_ids"].shape[1] + 4  # row 0 has two images
    for b in range(2):
        real = layout.attention_mask[b]
        types = layout.token_type[b][real].tolist()
        positions = layout.position_ids[b][real].tolist()
        # Without a gap the extended positions of the real tokens count 0, 1, 2, ...
        assert positions == list(range(len(positions)))
        # Compression tokens right after each image's visual run, text in between.
        runs = []
        for t in types:
            if not runs or runs[-1][0] != t:
                runs.append([t, 0])
            runs[-1][1] += 1
        expected = [[TEXT, 2], [VISUAL, N], [COMPRESSION, 2], [TEXT, 1], [VISUAL, N], [COMPRESSION, 2], [TEXT, 3]]
        if b == 1:
            expected = [[TEXT, 1], [VISUAL, N], [COMPRESSION, 2], [TEXT, 2]]
        assert runs == expected
    # Padding stays on its side.
    first_real = layout.attention_mask.float().argmax(-1)
    if padding_side == "left":
        assert bool(layout.attention_mask[:, -1].all()) and int(first_real[1]) > 0
    else:
        assert bool(layout.attention_mask[:, 0].all())


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_bottleneck_mask_rules(padding_side):
    inputs, _ = make_batch([[2, "I", 1, "I", 3], [1, "I", 2]], padding_side=padding_side)
    spans = find_image_spans(inputs["input_ids"] == IMAGE, [N, N, N])
    layout = insert_compression_tokens(spans, inputs["input_ids"].shape[1], 2, inputs["attention_mask"])
    mask = bottleneck_mask(layout)
    assert mask.shape == (2, 1, layout.length, layout.length) and mask.dtype == torch.bool
    types, images, real = layout.token_type.tolist(), layout.image_id.tolist(), layout.attention_mask.tolist()
    for b in range(2):
        for q in range(layout.length):
            for k in range(layout.length):
                if not real[b][q]:
                    expected = q == k
                elif k > q or not real[b][k]:
                    expected = False
                elif types[b][k] == VISUAL:
                    # only the visual and compression tokens of the same image
                    expected = types[b][q] in (VISUAL, COMPRESSION) and images[b][q] == images[b][k]
                else:
                    expected = True
                assert bool(mask[b, 0, q, k]) == expected, (b, q, k)


# ============================================================================ disabled / removed
def test_disabled_and_removed_reproduce_the_original_model():
    inputs, _ = make_batch(CHAT)

    def check_applied(model):
        assert isinstance(model, ETCLlavaForConditionalGeneration)

    assert_disabled_and_removed_reproduce(
        tiny_llava(), inputs, lambda model: apply_etc(model, small_config()), remove_etc,
        lambda model: model.model.vision_tower, steps=4, check_applied=check_applied,
    )  # fmt: skip


# ============================================================================ prefill
PREFILL_CASES = {
    "chat_left_padding": (CHAT, "left", "segmented"),
    "two_images_per_row": ([[2, "I", 2, "I", 3], [2, "I", 1, "I", 5]], "left", "segmented"),
    "different_prefixes": ([[1, "I", 4], [5, "I", 2], [3, "I", 3]], "left", "segmented"),
    "right_padding": (CHAT, "right", "segmented"),
    "image_at_the_end": ([[3, "I"], [1, "I"]], "left", "segmented"),
    "different_image_counts": ([[2, "I", 1, "I", 3], [2, "I", 4]], "left", "masked"),
}


@pytest.mark.parametrize("case", PREFILL_CASES)
def test_two_pass_prefill_matches_the_masked_pass(case):
    rows, padding_side, method = PREFILL_CASES[case]
    model = apply_etc(tiny_llava(), small_config())
    inputs, _ = make_batch(rows, padding_side=padding_side)
    with torch.no_grad():
        masked = model(**inputs)  # the training forward: one pass under the bottleneck mask
        prefill = model(**inputs, use_cache=True)
    cache = prefill.cache
    assert isinstance(cache, ETCCache)
    # The prefill took the expected route (auto), and the next-token logits agree.
    real = inputs["attention_mask"].bool()
    last = real.long().cumsum(-1).argmax(-1)  # last real token of each row
    expected = masked.logits[torch.arange(len(rows)), last]
    torch.testing.assert_close(prefill.logits[:, -1], expected, atol=1e-4, rtol=0)

    # Every text token of the last pass agrees with the masked pass at the same extended position.
    spans = find_image_spans(inputs["input_ids"] == IMAGE, [N] * len(inputs["pixel_values"]))
    layout = insert_compression_tokens(spans, inputs["input_ids"].shape[1], 2, inputs["attention_mask"])
    with torch.no_grad():
        prepared = prepare_inputs(model, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"])
        out = etc_prefill(
            model._etc_run_language_model, prepared.layout, prepared.inputs_embeds, ETCCache(config=model.config),
            "sdpa", inputs["input_ids"].shape[1],
        )  # fmt: skip
        full = model.model.language_model(
            inputs_embeds=prepared.inputs_embeds,
            attention_mask=bottleneck_mask(layout),
            position_ids=layout.position_ids,
        ).last_hidden_state
    assert out.method == method
    valid = out.index >= 0
    rows_index = torch.arange(len(rows))[:, None].expand_as(out.index)
    torch.testing.assert_close(
        out.hidden_states[valid], full[rows_index[valid], out.index[valid]], atol=1e-4, rtol=0
    )

    # Cache: M entries per image instead of N, in every layer, for every row.
    num_images = spans.num_images
    for layer in cache.layers:
        assert layer.keys.shape[0] == len(rows) and layer.values.shape == layer.keys.shape
    kept = cache.etc_state.attention_mask.sum(-1)
    torch.testing.assert_close(kept, real.sum(-1) - num_images * (N - 2))
    if case == "chat_left_padding":  # same text before the image in every row: no padding between segments
        length = inputs["input_ids"].shape[1]
        assert all(layer.keys.shape[2] == length - N + 2 for layer in cache.layers)


def test_prefill_works_under_eager_attention_and_flash_attention_is_refused():
    sdpa = apply_etc(tiny_llava(), small_config())
    eager = copy.deepcopy(sdpa)
    eager.set_attn_implementation("eager")
    inputs, _ = make_batch(CHAT)
    with torch.no_grad():
        reference = sdpa(**inputs).logits
        torch.testing.assert_close(eager(**inputs).logits, reference, atol=1e-5, rtol=0)
        torch.testing.assert_close(
            eager(**inputs, use_cache=True, etc_prefill_method="masked").logits[:, -1], reference[:, -1],
            atol=1e-4, rtol=0,
        )  # fmt: skip
    flash = copy.deepcopy(sdpa)
    flash.config.text_config._attn_implementation = "flash_attention_2"  # the mask-taking check runs first
    with pytest.raises(ValueError, match="4-D mask.*flash_attention_2"):
        flash(**inputs)


# ============================================================================ generation
def test_generate_greedy_matches_a_masked_forward_loop():
    model = apply_etc(tiny_llava(), small_config())
    inputs, _ = make_batch(CHAT)
    out = assert_generate_matches_forward_loop(model, inputs, 8, atol=1e-4)
    # The cache holds M (not N) entries for the image: prompt - N + M, plus the 7 tokens fed back.
    length = inputs["input_ids"].shape[1]
    assert all(layer.keys.shape[2] == length - N + 2 + 7 for layer in out.cache.layers)


def test_generate_sampling_matches_a_sampling_loop():
    model = apply_etc(tiny_llava(), small_config())
    inputs, _ = make_batch(CHAT)
    with torch.no_grad():
        torch.manual_seed(123)
        sequences = model.generate(**inputs, max_new_tokens=6, do_sample=True, top_k=None, top_p=None)
        torch.manual_seed(123)
        expected, _ = uncached_decoding_loop(model, inputs, 6, sample=True)
    assert torch.equal(sequences, expected)


def test_processor_outputs_go_in_unchanged():
    """A real LlavaProcessor (chat template, '<image>' expansion, left padding): its outputs are the model's inputs
    as they are, and generation decodes from a cache with M entries for the image."""
    import numpy as np

    from etc_ext.data import build_processor, num_image_tokens

    processor = build_processor(image_size=IMAGE_SIZE, patch_size=PATCH)
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    assert num_image_tokens(processor) == N
    image_token_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    model = apply_etc(tiny_llava(vocab_size=len(tokenizer), image_token_id=image_token_id), small_config())
    questions = ["What color is the square?", "How many?"]
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True
        )
        for q in questions
    ]
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8) for _ in questions]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    assert bool((inputs["attention_mask"][:, 0] == 0).any())  # left padding
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        masked = model(**inputs).logits[:, -1]
    assert torch.equal(out.sequences[:, inputs["input_ids"].shape[1]], masked.argmax(-1))
    length = inputs["input_ids"].shape[1]
    assert all(layer.keys.shape[2] == length - N + 2 + 3 for layer in out.cache.layers)


# ============================================================================ the bottleneck itself
def test_text_sees_the_image_only_through_the_compression_tokens():
    model = apply_etc(tiny_llava(), small_config())
    inputs, _ = make_batch(CHAT)
    other = torch.randn_like(inputs["pixel_values"])
    spans = find_image_spans(inputs["input_ids"] == IMAGE, [N, N])
    layout = insert_compression_tokens(spans, inputs["input_ids"].shape[1], 2, inputs["attention_mask"])
    reference, changed, held = logits_with_compression_states_held(
        model, inputs, {**inputs, "pixel_values": other}, layout
    )
    text_after = torch.arange(inputs["input_ids"].shape[1])[None] >= spans.end[:, None]
    text_after &= inputs["attention_mask"].bool()
    text_after[spans.row, spans.end - 1] = True  # the logits there come from the last compression token
    assert (changed - reference)[text_after].abs().max() > 1e-3  # the image does matter...
    torch.testing.assert_close(held[text_after], reference[text_after], atol=1e-5, rtol=0)  # ...only through Z
    visual = inputs["input_ids"] == IMAGE
    visual[spans.row, spans.end - 1] = False
    assert (held - reference)[visual].abs().max() > 1e-3  # while the visual tokens themselves did change


# ============================================================================ target
@pytest.mark.parametrize("target_layer", [-1, 1])
@pytest.mark.parametrize("score_context", ["causal", "image"])
def test_scores_match_eager_attention_probabilities(target_layer, score_context):
    model = tiny_llava(num_layers=3)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    apply_etc(model, small_config(target_layer=target_layer, score_context=score_context))
    inputs, labels = make_batch([[2, "I", 4], [3, "I", 7], [1, "I", 3, "I", 5]], answer=2)
    parts = instruction_target(model, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], labels)
    # eager attention's probabilities, with the same (padding-aware) positions
    mask = inputs["attention_mask"]
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        out = eager(**inputs, position_ids=positions, output_attentions=True)
    layer = (target_layer % 4) - 1  # the decoder layer that produces hidden_states[target_layer]
    probs = out.attentions[layer]  # (B, H, L, L)
    spans = find_image_spans(inputs["input_ids"] == IMAGE, [N] * 4)
    for k in range(len(spans)):
        b, start, end = int(spans.row[k]), int(spans.start[k]), int(spans.end[k])
        queries = [
            t
            for t in range(end, mask.shape[1])
            if mask[b, t] and inputs["input_ids"][b, t] != IMAGE and labels[b, t] == -100
        ]
        visual = probs[b][:, queries, start:end]  # (H, T, N)
        if score_context == "image":
            visual = visual / visual.sum(-1, keepdim=True)
        expected = visual.mean(dim=(0, 1))
        torch.testing.assert_close(parts["scores"][k], expected, atol=1e-5, rtol=1e-4)
    # X^ = X_v * (1 - alpha + alpha * minmax(s)): the most attended token keeps its state, the least 40 %.
    scores = parts["scores"]
    ratio_min = 1 - 0.6
    k_min, k_max = scores[0].argmin(), scores[0].argmax()
    target = parts["target"][0]
    with torch.no_grad():
        states = eager(**inputs, position_ids=positions, output_hidden_states=True).hidden_states[target_layer]
    x_v = states[int(spans.row[0]), int(spans.start[0]) : int(spans.end[0])]
    torch.testing.assert_close(target[k_max], x_v[k_max], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(target[k_min], ratio_min * x_v[k_min], atol=1e-5, rtol=1e-4)


def test_vid_loss_closed_form():
    # N = 2 positions, D = 2 channels, one image; sigma^2 = (0.5, 4.0)
    target = torch.tensor([[[1.0, 2.0], [3.0, -1.0]]])
    mu = torch.tensor([[[0.0, 2.0], [1.0, 1.0]]])
    variance = torch.tensor([0.5, 4.0])
    # channel 0: (1 + 4) / (2 * 0.5) + 2 * log(sqrt(0.5)); channel 1: (0 + 4) / (2 * 4) + 2 * log(sqrt(4))
    expected = torch.tensor(5.0 + math.log(0.5) + 0.5 + math.log(4.0))  # = 5.5 + log 2
    torch.testing.assert_close(vid_loss(target, mu, variance), expected)
    # two images: the mean over images
    doubled = vid_loss(torch.cat([target, target]), torch.cat([mu, target]), variance)
    torch.testing.assert_close(doubled, (expected + 2 * math.log(2.0) / 2) / 2)
    # the learned variance: softplus(w) + eps, unit at initialisation
    model = apply_etc(tiny_llava(), small_config())
    torch.testing.assert_close(model.etc.distill.variance, torch.ones(32) + 1e-6)
    with torch.no_grad():
        model.etc.distill.variance_weight.copy_(torch.linspace(-2, 2, 32))
    expected_variance = torch.log1p(torch.exp(torch.linspace(-2, 2, 32))) + 1e-6
    torch.testing.assert_close(model.etc.distill.variance, expected_variance)


# ============================================================================ training
def test_training_lowers_ce_and_vid_and_reaches_the_right_parameters():
    model = apply_etc(tiny_llava(), small_config(vid_weight=1e-3))
    inputs, labels = make_batch(CHAT, answer=3)
    history, grads = train_etc_steps(model, inputs, labels, steps=8, lr=3e-3, vid_weight=1e-3)
    for prefix in (
        "etc.compression_tokens.weight",
        "model.multi_modal_projector.linear_1.weight",
        "model.language_model.layers.0.self_attn.q_proj.weight",
        "etc.distill.decoder.context_proj.weight",
        "etc.distill.variance_weight",
    ):
        assert grads[prefix] is not None and grads[prefix].abs().sum() > 0, prefix
    vision = [name for name in grads if name.startswith("model.vision_tower")]
    assert vision and all(grads[name] is None for name in vision)
    (ce0, vid0), (ce1, vid1) = history[0], history[-1]
    assert ce1 < ce0 and vid1 < vid0, history


def test_frozen_teacher_is_the_starting_model():
    model = apply_etc(tiny_llava(), small_config(teacher="frozen", vid_weight=1e-3))
    inputs, labels = make_batch(CHAT, answer=3)
    before = instruction_target(model, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], labels)
    train_etc_steps(model, inputs, labels, steps=3, lr=1e-2, vid_weight=1e-3)
    after = instruction_target(model, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], labels)
    torch.testing.assert_close(after["target"], before["target"])  # the snapshot did not move
    model.etc.config.teacher = "self"
    current = instruction_target(model, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], labels)
    assert not torch.allclose(current["target"], before["target"], atol=1e-4)  # the current model did


@pytest.mark.parametrize("loss", ["mse", "none"])
def test_loss_variants(loss):
    model = apply_etc(tiny_llava(), small_config(loss=loss, vid_weight=0.5))
    inputs, labels = make_batch(CHAT, answer=3)
    out = model(**inputs, labels=labels)
    if loss == "none":
        assert model.etc.distill is None and out.vid_loss is None
        torch.testing.assert_close(out.loss, out.ce_loss)
    else:
        assert out.vid_loss > 0
        torch.testing.assert_close(out.loss, out.ce_loss + 0.5 * out.vid_loss)
        out.loss.backward()
        assert model.etc.distill.decoder.output_proj.weight.grad is not None
        assert model.etc.distill.variance_weight.grad is None  # MSE: unit variances, nothing learned


def test_lora_teacher_disables_adapters_and_adapters_round_trip(tmp_path):
    import peft
    base = tiny_llava()
    reference = apply_etc(copy.deepcopy(base), small_config())
    lora = peft.LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)", init_lora_weights=False)
    model = apply_etc(peft.get_peft_model(base, lora), small_config())
    inputs, labels = make_batch(CHAT, answer=3)
    args = (inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], labels)
    # teacher="frozen" with LoRA: the same model with the adapters off, i.e. the base model
    expected = instruction_target(reference, *args)["target"]
    torch.testing.assert_close(instruction_target(model, *args)["target"], expected)
    out = model(**inputs, labels=labels)
    out.loss.backward()
    names = {name for name, p in model.named_parameters() if p.grad is not None}
    assert any("lora_A" in name for name in names) and any("compression_tokens" in name for name in names)
    assert all(p.requires_grad for p in model.get_base_model().etc.parameters())
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(tiny_llava(), tmp_path)
    assert isinstance(loaded, peft.PeftModel)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)


# ============================================================================ checkpoints
def test_save_and_load_round_trip(tmp_path):
    model = apply_etc(tiny_llava(), small_config(vid_weight=1e-3))
    inputs, labels = make_batch(CHAT, answer=3)
    train_etc_steps(model, inputs, labels, steps=2, lr=1e-2, vid_weight=1e-3)
    model.eval()
    save_pretrained(model, tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert files == {"etc_config.json", "etc_model.safetensors", "base_model.safetensors"}
    # into the starting model (same architecture and weights); resuming training keeps it as the frozen teacher
    loaded = from_pretrained(tiny_llava(), tmp_path, is_trainable=True)
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)
        assert torch.equal(
            loaded.generate(**inputs, max_new_tokens=5, do_sample=False),
            model.generate(**inputs, max_new_tokens=5, do_sample=False),
        )
        expected = model(**inputs, labels=labels)
        resumed = loaded(**inputs, labels=labels)
        assert torch.equal(resumed.vid_loss, expected.vid_loss) and torch.equal(resumed.loss, expected.loss)

    other = apply_etc(tiny_llava(), small_config(num_compression_tokens=3))
    with pytest.raises(ValueError, match="num_compression_tokens"):
        from_pretrained(other, tmp_path)
    with pytest.raises(ValueError, match="hidden_size"):
        from_pretrained(tiny_llava(hidden_size=48), tmp_path)
    with pytest.raises(ValueError, match="not an ETC checkpoint"):
        from_pretrained(tiny_llava(), tmp_path / "missing")


# ============================================================================ bad input
def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="num_compression_tokens"):
        apply_etc(tiny_llava(), ETCConfig(num_compression_tokens=0))
    model = apply_etc(tiny_llava(), small_config())
    inputs, labels = make_batch(CHAT, answer=2)
    no_image = {**inputs, "input_ids": inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE, 5)}
    with pytest.raises(ValueError, match="no image token"):
        model(**no_image)
    one_image = {**inputs, "pixel_values": inputs["pixel_values"][:1]}  # two '<image>' prompts, one image
    with pytest.raises(ValueError, match="Image features and image tokens do not match, tokens: "):
        model(**one_image)
    with pytest.raises(ValueError, match="labels must have the shape of input_ids"):
        model(**inputs, labels=labels[:, 1:])
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    with pytest.raises(ValueError, match="ETC needs input_ids or inputs_embeds"):
        model(attention_mask=inputs["attention_mask"], pixel_values=inputs["pixel_values"])
    with pytest.raises(ValueError, match="already applied"):
        apply_etc(model, small_config())
    with pytest.raises(ValueError, match="target_layer"):
        apply_etc(tiny_llava(), small_config(target_layer=7))


def test_shift_labels_give_the_loss_of_the_labels_they_shift():
    """Sequence parallelism passes labels already shifted (`shift_labels`): the loss (CE and VID) must use them."""
    model = apply_etc(tiny_llava(), small_config())
    inputs, labels = make_batch(CHAT, answer=3)
    shift_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    with torch.no_grad():
        expected = model(**inputs, labels=labels)
        shifted = model(**inputs, shift_labels=shift_labels)
        other = shift_labels.clone()
        other[other != -100] = (other[other != -100] + 1) % 90
        changed = model(**inputs, shift_labels=other)
    torch.testing.assert_close(shifted.ce_loss, expected.ce_loss)
    torch.testing.assert_close(shifted.vid_loss, expected.vid_loss)
    assert not torch.allclose(changed.ce_loss, expected.ce_loss)
    with pytest.raises(ValueError, match="shift_labels must have the shape of input_ids"):
        model(**inputs, shift_labels=shift_labels[:, 1:])


def test_an_etc_class_made_without_etc_parts_runs_as_the_original_and_takes_apply_etc():
    """`type(etc_model)(config)` (or the ETC class's from_pretrained) builds a model without `.etc`: it runs as the
    original model, and apply_etc / remove_etc work on it."""
    original = tiny_llava()
    etc_model = apply_etc(copy.deepcopy(original), small_config())
    fresh = type(etc_model)(original.config)
    fresh.load_state_dict(original.state_dict())
    fresh.eval()
    inputs, _ = make_batch(CHAT)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, original(**inputs).logits, rtol=0, atol=0)
    apply_etc(fresh, small_config())
    assert type(fresh) is ETCLlavaForConditionalGeneration and hasattr(fresh, "etc")
    remove_etc(fresh)
    assert type(fresh) is LlavaForConditionalGeneration


def test_disabling_etc_stops_its_parameters_from_requiring_grad():
    """Disabled ETC parameters get no gradient, so they must not require one (DDP would need
    find_unused_parameters); enabling restores what required grad before."""
    model = apply_etc(tiny_llava(), small_config())
    model.etc.distill.requires_grad_(False)  # a user's choice, kept across the toggle
    before = [p.requires_grad for p in model.etc.parameters()]
    model.etc.enabled = False
    assert not any(p.requires_grad for p in model.etc.parameters())
    model.etc.enabled = True
    assert [p.requires_grad for p in model.etc.parameters()] == before and any(before)


def test_disabling_etc_unfreezes_the_vision_tower_as_before_apply():
    """Disabled, the model trains as the original: the vision tower requires grad as before apply_etc froze it (also
    in a deepcopy); enabled again, it is frozen again."""
    plain = tiny_llava()
    plain.model.vision_tower.requires_grad_(True)
    plain.model.vision_tower.post_layernorm.requires_grad_(False)  # a user's choice, kept
    original = [p.requires_grad for p in plain.model.vision_tower.parameters()]
    model = apply_etc(plain, small_config())
    for candidate in (model, copy.deepcopy(model)):
        tower = candidate.model.vision_tower
        assert not any(p.requires_grad for p in tower.parameters())
        candidate.etc.enabled = False
        assert [p.requires_grad for p in tower.parameters()] == original
        candidate.etc.enabled = True
        assert not any(p.requires_grad for p in tower.parameters())
    model.etc.enabled = False
    remove_etc(model)
    assert [p.requires_grad for p in model.model.vision_tower.parameters()] == original


def test_a_mutated_config_is_revalidated_and_damaged_checkpoints_name_their_file(tmp_path):
    config = small_config()
    config.num_compression_tokens = -5  # changed after validation
    with pytest.raises(ValueError, match="num_compression_tokens"):
        apply_etc(tiny_llava(), config)
    plain = tiny_llava()
    with pytest.raises(ValueError, match=r"num_compression_tokens must be <= the model's \d+ visual tokens"):
        apply_etc(plain, small_config(num_compression_tokens=10**9))  # was a huge allocation
    assert not hasattr(plain, "etc") and type(plain) is LlavaForConditionalGeneration
    model = apply_etc(tiny_llava(), small_config())
    save_pretrained(model, tmp_path)
    weights = tmp_path / "etc_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match="etc_model.safetensors cannot be read"):
        from_pretrained(tiny_llava(), tmp_path)
    assert not hasattr(tiny_llava(), "etc")
    (tmp_path / "etc_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="etc_config.json is not valid json"):
        from_pretrained(tiny_llava(), tmp_path)


def test_a_failed_from_pretrained_leaves_the_model_unchanged(tmp_path):
    """The load is all or nothing: a damaged checkpoint raises before the model changes, or undoes apply_etc."""
    from safetensors.torch import load_file, save_file

    trained = apply_etc(tiny_llava(), small_config())
    trained.model.language_model.layers[0].mlp.up_proj.weight.requires_grad_(True)
    save_pretrained(trained, tmp_path)
    etc_weights, base_weights = tmp_path / "etc_model.safetensors", tmp_path / "base_model.safetensors"
    intact = etc_weights.read_bytes()

    def assert_untouched(model, reference):
        assert type(model) is LlavaForConditionalGeneration and not hasattr(model, "etc")
        for (name, p), q in zip(model.state_dict().items(), reference.state_dict().values()):
            assert torch.equal(p, q), name

    state = load_file(etc_weights)
    state.pop(sorted(state)[0])  # a weight missing: found only once ETC's parts exist
    save_file(state, etc_weights)
    model = tiny_llava()
    with pytest.raises(ValueError, match="ETC parts weights do not match the model: unexpected .*, missing"):
        from_pretrained(model, tmp_path)
    assert_untouched(model, tiny_llava())

    etc_weights.write_bytes(intact)
    base_weights.write_bytes(base_weights.read_bytes()[:64])  # truncated: read before anything changes
    model = tiny_llava()
    with pytest.raises(ValueError, match="base_model.safetensors cannot be read"):
        from_pretrained(model, tmp_path)
    assert_untouched(model, tiny_llava())


def test_hugging_face_save_pretrained_keeps_the_etc_parts(tmp_path, caplog):
    """An ETC model's Hugging Face save_pretrained writes the original model (config.json names the original class,
    no etc.* weights in model.safetensors) and ETC's parts beside it; etc_ext's from_pretrained and
    load_for_inference bring the trained parts back; apply_etc on the bare reload warns that it makes new ones."""
    from safetensors.torch import load_file

    from etc_ext.data import build_processor
    from etc_ext.models.loading import load_for_inference

    model = apply_etc(tiny_llava(), small_config())
    with torch.no_grad():
        model.etc.compression_tokens.weight.add_(1.0)  # "trained": not what a fresh apply_etc gives
    model.save_pretrained(tmp_path)
    build_processor().save_pretrained(tmp_path)  # load_for_inference loads one (not used here)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlavaForConditionalGeneration"]
    assert not any(name.startswith("etc.") for name in load_file(tmp_path / "model.safetensors"))
    assert type(model).__name__ == "ETCLlavaForConditionalGeneration" and hasattr(model, "etc")  # unchanged

    inputs, _ = make_batch([[2, "I", 3]])
    with torch.no_grad(), caplog.at_level("WARNING", logger="etc_ext.models.common"):
        expected = model(**inputs).logits
        reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path)
        restored = from_pretrained(reloaded, tmp_path)
        assert "holds trained ETC parts" not in caplog.text  # from_pretrained loads them: no warning
        torch.testing.assert_close(restored(**inputs).logits, expected)
        loaded, _, etc_config = load_for_inference(tmp_path, attn_implementation="sdpa")
        assert etc_config == model.etc.config
        torch.testing.assert_close(loaded(**inputs).logits, expected)

    caplog.clear()
    with caplog.at_level("WARNING", logger="etc_ext.models.common"):
        apply_etc(LlavaForConditionalGeneration.from_pretrained(tmp_path), small_config())
    assert "holds trained ETC parts" in caplog.text and "etc_ext.models.common.from_pretrained" in caplog.text


def test_transformers_initialises_every_etc_parameter():
    """Weights a checkpoint lacks are initialised by the model's `_init_weights` (transformers' `initialize_weights`,
    what `from_pretrained` runs for missing keys, e.g. a model built on the meta device): ETC's own parameters too
    (the compression tokens, the decoder's position embeddings, the variances), as ETC's modules make them."""
    model = apply_etc(tiny_llava(), small_config())
    fresh = copy.deepcopy(model.etc)
    model.to_empty(device="cpu")  # the memory of a model built on the meta device
    with torch.no_grad():
        for param in model.etc.parameters():
            param.fill_(float("nan"))
    for module in model.modules():
        module._is_hf_initialized = False  # nothing was loaded
    model.initialize_weights()
    etc = model.etc
    assert all(bool(torch.isfinite(p).all()) for p in etc.parameters())
    assert torch.equal(etc.distill.variance_weight, fresh.distill.variance_weight)  # softplus(w) = 1
    std = etc.compression_tokens.weight.std().item()
    assert abs(std - model.config.text_config.initializer_range) < 0.5 * model.config.text_config.initializer_range
    assert abs(etc.distill.decoder.position_embedding.std().item() - 0.02) < 0.01
    for name, param in etc.distill.decoder.named_parameters():
        if "norm" in name:  # LayerNorms: transformers' rule, ones and zeros
            assert torch.equal(param, torch.ones_like(param) if name.endswith("weight") else torch.zeros_like(param))


def test_weights_a_checkpoint_lacks_initialise_as_the_original_models():
    """transformers counts classes defined outside it as custom code and then skips part of the initialisation of
    weights a checkpoint lacks (modules without parameters of their own: CLIP's attention re-initialises its
    projections) and the original model's checkpoint key conversions; an ETC class is the original model, so
    `from_pretrained` with missing weights gives the original's weights (same seed)."""
    config = tiny_llava().config
    etc_class = type(apply_etc(tiny_llava(), small_config()))
    assert not etc_class.is_custom_code()
    torch.manual_seed(0)
    original = LlavaForConditionalGeneration.from_pretrained(None, config=copy.deepcopy(config), state_dict={})
    torch.manual_seed(0)
    ours = etc_class.from_pretrained(None, config=copy.deepcopy(config), state_dict={})  # an ETC class, no ETC parts
    expected = original.state_dict()
    for name, value in ours.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_the_decoder_width_follows_the_model():
    """By default the decoder is as wide as the language model, at most 1024; an explicit width is kept."""
    model = apply_etc(tiny_llava(hidden_size=32), ETCConfig(num_compression_tokens=1))
    assert model.etc.config.decoder_hidden_size == 32
    assert model.etc.distill.decoder.position_embedding.shape[1] == 32
    ours = sum(p.numel() for p in model.etc.parameters())
    assert ours < sum(p.numel() for n, p in model.named_parameters() if not n.startswith("etc."))
    assert ETCConfig.default_decoder_hidden_size(4096) == 1024 and ETCConfig.default_decoder_hidden_size(768) == 768
    explicit = apply_etc(tiny_llava(hidden_size=32), ETCConfig(num_compression_tokens=1, decoder_hidden_size=48))
    assert explicit.etc.config.decoder_hidden_size == 48
    with pytest.raises(ValueError, match="decoder_hidden_size is not set yet"):
        ETCConfig().intermediate_size
