"""ETC on a tiny random Qwen3-VL (real Qwen3VLConfig, small text/vision configs), CPU, fp32.

The LLM has Qwen3-VL-2B's attention shape (16 query heads on 8 kv heads of 128, interleaved M-RoPE sections
[24, 20, 20]) on a 64-wide residual stream; the vision tower feeds DeepStack features into both LLM layers. Inputs are
built as Qwen3VLProcessor lays them out: `<|vision_start|><|image_pad|>*n<|vision_end|>` with n = t*h*w / merge**2,
videos as one such run per temporal group after a timestamp, pixel_values `(sum t*h*w, C*temporal_patch*patch**2)`.
"""

import copy

import pytest
import torch
from conftest import HEAD_DIM, HEADS, IMAGE, KV_HEADS, VIDEO, tiny_qwen3_vl  # shared with the baseline tests
from conftest import assert_disabled_and_removed_reproduce, assert_generate_matches_forward_loop
from conftest import logits_with_compression_states_held, train_etc_steps, uncached_decoding_loop
from conftest import qwen3_vl_batch as make_batch

import etc_ext  # noqa: F401  (loads the ops)
from etc_ext.compress import COMPRESSION, TEXT, VISUAL, ETCCache, bottleneck_mask, etc_prefill
from etc_ext.config import ETCConfig
from etc_ext.distill import DistillHead, VIDDecoder, vid_loss
from etc_ext.models.loading import integration_for
from etc_ext.models.qwen3_vl import (
    ETCQwen3VLForConditionalGeneration,
    apply_etc,
    apply_etc_with_lora,
    decoder_position_grid,
    default_lora_config,
    from_pretrained,
    instruction_target,
    prepare_inputs,
    remove_etc,
    save_pretrained,
)

M = 2

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


def small_config(**changes):
    return ETCConfig(**{"num_compression_tokens": M, "decoder_hidden_size": 16, "decoder_num_layers": 1, **changes})


# Same chat prefix, images of different sizes across the rows, questions of different lengths (left padding).
CHAT = [[3, ("I", 4, 6), 4], [3, ("I", 6, 8), 2]]
TWO_IMAGES = [[2, ("I", 4, 6), 3, ("I", 4, 4), 3], [2, ("I", 6, 4), 1, ("I", 8, 4), 5]]
VIDEO_PROMPT = [[2, ("V", 3, 4, 4), 4], [2, ("V", 3, 4, 4), 2]]
IMAGE_COUNTS = [[2, ("I", 4, 6), 1, ("I", 4, 4), 3], [2, ("I", 6, 6), 4]]  # two images vs one


def expected_cache_length(inputs, units):
    """Per row: real prompt tokens - sum N_i + M per image (or temporal group)."""
    real = inputs["attention_mask"].sum(-1)
    return torch.tensor([int(real[b]) - sum(n) + M * len(n) for b, n in enumerate(units)])


# ============================================================================ disabled / removed
def test_disabled_and_removed_reproduce_the_original_model():
    inputs, _, _ = make_batch(TWO_IMAGES)

    def check_applied(model):
        assert isinstance(model, ETCQwen3VLForConditionalGeneration)
        assert integration_for(model).apply_etc is apply_etc  # what `etc-ext train` finds for this model
        assert model.etc.config.num_visual_tokens == 16 and decoder_position_grid(model.config) == (4, 4)

    assert_disabled_and_removed_reproduce(
        tiny_qwen3_vl(), inputs, lambda model: apply_etc(model, small_config()), remove_etc,
        lambda model: model.model.visual, steps=3, check_applied=check_applied,
    )  # fmt: skip


# ============================================================================ layout and M-RoPE positions
def test_positions_are_get_rope_index_of_the_extended_sequence():
    model = apply_etc(tiny_qwen3_vl(), small_config())
    inputs, _, units = make_batch([[2, ("I", 4, 6), 3, ("V", 2, 4, 4), 3], [1, ("I", 8, 4), 4]])
    with torch.no_grad():
        prepared = prepare_inputs(model, **inputs)
    layout = prepared.layout
    user_positions, _ = model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"], inputs["video_grid_thw"],
        inputs["attention_mask"],
    )  # fmt: skip
    torch.testing.assert_close(prepared.position_ids, user_positions, rtol=0, atol=0)
    with torch.no_grad():  # given positions (3 or 4 rows, as generate() makes them) are the same positions
        computed = model(**inputs).logits
        text_row = inputs["attention_mask"].cumsum(-1)[None] - 1
        torch.testing.assert_close(model(**inputs, position_ids=user_positions).logits, computed, rtol=0, atol=0)
        with_text_row = torch.cat([text_row, user_positions])
        torch.testing.assert_close(model(**inputs, position_ids=with_text_row).logits, computed, rtol=0, atol=0)
    # Units: images and each temporal group of the video, in sequence order, with their own N.
    assert layout.spans.num_tokens.tolist() == [n for row in units for n in row] == [6, 4, 4, 8]
    assert prepared.grids.tolist() == [[1, 2, 3], [1, 2, 2], [1, 2, 2], [1, 4, 2]]
    # mm_token_type_ids extended with text (0) at the compression tokens.
    ext_types = prepared.mm_token_type_ids
    assert bool((ext_types[layout.token_type == COMPRESSION] == 0).all())
    assert bool(((ext_types > 0) == (layout.token_type == VISUAL)).all())
    # The extended positions are exactly get_rope_index of the extended sequence, compression tokens as text...
    ext_ids = layout.extend(inputs["input_ids"], 5)  # any text id at the inserted tokens
    ext_positions, _ = model.model.get_rope_index(
        ext_ids, ext_types, inputs["image_grid_thw"], inputs["video_grid_thw"], layout.attention_mask.long()
    )
    real = layout.attention_mask
    torch.testing.assert_close(layout.position_ids[:, real], ext_positions[:, real], rtol=0, atol=0)
    # ...so compression tokens sit right after their image on all three axes, and the text after an image keeps its
    # uncompressed position plus M per earlier image.
    for k in range(len(layout.spans)):
        b, end = int(layout.spans.row[k]), int(layout.spans.end[k])
        z = layout.position_ids[:, b, layout.compression_index[k]]  # (3, M)
        last_visual = int(user_positions[:, b, end - 1].max())
        assert z.tolist() == [[last_visual + 1 + M * int(layout.spans.index_in_row[k]) + j for j in range(M)]] * 3
    text = (layout.token_type == TEXT) & real
    shift = layout.position_ids[0][text] - user_positions[0][inputs["attention_mask"].bool()
                                                              & (inputs["mm_token_type_ids"] == 0)]
    assert set(shift.tolist()) <= {M * i for i in range(4)} and shift.max() == 3 * M  # row 0: 3 units before
    assert bool((layout.position_ids[0][text] == layout.position_ids[1][text]).all())


# ============================================================================ prefill
PREFILL_CASES = {
    "images_of_different_sizes_across_rows": (CHAT, "segmented"),
    "two_images_of_different_sizes": (TWO_IMAGES, "segmented"),
    "video_prompt": (VIDEO_PROMPT, "segmented"),
    "image_and_video": ([[2, ("I", 4, 6), 3, ("V", 2, 4, 4), 3], [2, ("I", 4, 4), 1, ("V", 2, 4, 4), 5]], "segmented"),
    "different_image_counts": (IMAGE_COUNTS, "masked"),
}


@pytest.mark.parametrize("case", PREFILL_CASES)
def test_two_pass_prefill_matches_the_masked_pass(case):
    rows, method = PREFILL_CASES[case]
    model = apply_etc(tiny_qwen3_vl(), small_config())
    inputs, _, units = make_batch(rows)
    with torch.no_grad():
        masked = model(**inputs)  # the training forward: one pass under the bottleneck mask
        prefill = model(**inputs, use_cache=True)
        prepared = prepare_inputs(model, **inputs)
        out = etc_prefill(
            model._etc_run_language_model, prepared.layout, prepared.inputs_embeds, ETCCache(config=model.config),
            "sdpa", inputs["input_ids"].shape[1], token_inputs=prepared.token_inputs,
        )  # fmt: skip
        full = model.model.language_model(
            inputs_embeds=prepared.inputs_embeds,
            attention_mask=bottleneck_mask(prepared.layout),
            position_ids=prepared.layout.position_ids,
            visual_pos_masks=prepared.token_inputs["visual_mask"],
            deepstack_visual_embeds=list(
                prepared.token_inputs["deepstack"][prepared.token_inputs["visual_mask"]].unbind(1)
            ),
        ).last_hidden_state
    assert out.method == method
    torch.testing.assert_close(prefill.logits[:, -1], masked.logits[:, -1], atol=1e-4, rtol=0)
    # Every text token of the last pass agrees with the masked pass at the same extended position.
    valid = out.index >= 0
    rows_index = torch.arange(len(rows))[:, None].expand_as(out.index)
    torch.testing.assert_close(out.hidden_states[valid], full[rows_index[valid], out.index[valid]], atol=1e-4, rtol=0)
    # Cache: per row prompt - sum N_i + M per image, in every layer, GQA layout (B, 8 kv heads, C, 128).
    cache = prefill.cache
    assert isinstance(cache, ETCCache) and len(cache.layers) == 2
    kept = cache.etc_state.attention_mask.sum(-1)
    torch.testing.assert_close(kept, expected_cache_length(inputs, units))
    for layer in cache.layers:
        assert layer.keys.shape == (len(rows), KV_HEADS, cache.etc_state.prefill_length, HEAD_DIM)
        assert layer.values.shape == layer.keys.shape
    if case == "images_of_different_sizes_across_rows":  # same text before the image: no padding between segments
        assert cache.etc_state.prefill_length == int(kept.max())


def test_masked_pass_under_eager_attention_and_flash_attention_is_refused():
    sdpa = apply_etc(tiny_qwen3_vl(), small_config())
    eager = copy.deepcopy(sdpa)
    eager.set_attn_implementation("eager")
    inputs, _, _ = make_batch(CHAT)
    with torch.no_grad():
        reference = sdpa(**inputs).logits
        torch.testing.assert_close(eager(**inputs).logits, reference, atol=1e-5, rtol=0)
    flash = copy.deepcopy(sdpa)
    flash.config.text_config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="4-D mask.*flash_attention_2"):
        flash(**inputs)


# ============================================================================ generation
@pytest.mark.parametrize(
    "case", ["two_images_of_different_sizes", "video_prompt", "different_image_counts", "one_prompt_no_padding"]
)
def test_generate_matches_the_uncached_loop(case):
    rows = [[3, ("I", 4, 6), 5]] if case == "one_prompt_no_padding" else PREFILL_CASES[case][0]
    model = apply_etc(tiny_qwen3_vl(), small_config())
    inputs, _, units = make_batch(rows)
    steps = 4
    # generate() encodes the images first and passes mm_encoder_outputs and its own 3-D positions
    out = assert_generate_matches_forward_loop(model, inputs, steps, atol=1e-4)
    # The cache holds M (not N) entries per image: prompt - sum N_i + M * images, plus the tokens fed back.
    state = out.cache.etc_state
    torch.testing.assert_close(state.attention_mask.sum(-1), expected_cache_length(inputs, units))
    assert all(layer.keys.shape[2] == state.prefill_length + steps - 1 for layer in out.cache.layers)


def test_generate_sampling_matches_a_sampling_loop():
    model = apply_etc(tiny_qwen3_vl(), small_config())
    inputs, _, _ = make_batch(TWO_IMAGES)
    with torch.no_grad():
        torch.manual_seed(123)
        sequences = model.generate(**inputs, max_new_tokens=4, do_sample=True, top_k=None, top_p=None)
        torch.manual_seed(123)
        expected, _ = uncached_decoding_loop(model, inputs, 4, sample=True)
    assert torch.equal(sequences, expected)


# ============================================================================ DeepStack
def test_deepstack_features_reach_the_visual_positions():
    """After LLM layer 0 the visual tokens' states get the first DeepStack feature added, in the masked training
    pass and in pass 1 of the segmented prefill; nothing else does."""
    model = apply_etc(tiny_qwen3_vl(), small_config())
    inputs, _, units = make_batch(CHAT)
    layers = model.model.language_model.layers
    outputs, inputs_1 = [], []
    handles = [
        layers[0].register_forward_hook(lambda module, args, output: outputs.append(output)),
        layers[1].register_forward_pre_hook(lambda module, args: inputs_1.append(args[0])),
    ]
    with torch.no_grad():
        features = model.model.get_image_features(
            inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True
        ).deepstack_features[0]  # per image (N_i, H): what layer 1 must receive at the visual positions
        prepared = prepare_inputs(model, **inputs)
        model(**inputs)  # masked pass
        model(**inputs, use_cache=True, etc_prefill_method="segmented")  # pass 1 (the image), pass 2 (the text)
    for handle in handles:
        handle.remove()
    assert len(outputs) == 3
    layout = prepared.layout
    # masked pass: extended layout
    added = inputs_1[0] - outputs[0]  # (B, Lx, H)
    visual = layout.token_type == VISUAL
    torch.testing.assert_close(added[visual], torch.cat(list(features)), atol=1e-5, rtol=0)
    assert added[~visual].abs().max() < 1e-6
    # pass 1: [text before the image, its visual tokens, its compression tokens], right-aligned per row
    added = inputs_1[1] - outputs[1]
    for b, (n,) in enumerate(units):
        width = added.shape[1]
        torch.testing.assert_close(added[b, width - M - n : width - M], features[b], atol=1e-5, rtol=0)
        assert added[b, : width - M - n].abs().max() < 1e-6 and added[b, width - M :].abs().max() < 1e-6
    assert (inputs_1[2] - outputs[2]).abs().max() < 1e-6  # pass 2: text only


def test_text_sees_the_image_only_through_the_compression_tokens():
    model = apply_etc(tiny_qwen3_vl(), small_config())
    inputs, _, _ = make_batch(TWO_IMAGES)
    other = {**inputs, "pixel_values": torch.randn_like(inputs["pixel_values"])}
    layout = prepare_inputs(model, **inputs).layout
    spans = layout.spans
    reference, changed, held = logits_with_compression_states_held(model, inputs, other, layout)
    # Text after the first image (and the logits at each image's last visual token, which come from its last
    # compression token) depends on the pixels only through the compression tokens' states.
    first_end = spans.end[spans.index_in_row == 0]
    text_after = torch.arange(inputs["input_ids"].shape[1])[None] >= first_end[:, None]
    text_after &= inputs["attention_mask"].bool() & (inputs["mm_token_type_ids"] == 0)
    text_after[spans.row, spans.end - 1] = True
    assert (changed - reference)[text_after].abs().max() > 1e-3  # the image does matter...
    torch.testing.assert_close(held[text_after], reference[text_after], atol=1e-5, rtol=0)  # ...only through Z
    visual = inputs["input_ids"] == IMAGE
    visual[spans.row, spans.end - 1] = False
    assert (held - reference)[visual].abs().max() > 1e-3  # while the visual tokens themselves did change


# ============================================================================ target (GQA scores)
@pytest.mark.parametrize("target_layer, score_context", [(-1, "causal"), (1, "image")])
def test_scores_match_eager_attention_probabilities(target_layer, score_context):
    model = tiny_qwen3_vl(num_layers=3)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    apply_etc(model, small_config(target_layer=target_layer, score_context=score_context))
    inputs, labels, _ = make_batch([[2, ("I", 4, 6), 4, ("V", 2, 4, 4), 5], [3, ("I", 6, 8), 7]], answer=2)
    parts = instruction_target(model, labels=labels, **inputs)
    with torch.no_grad():
        out = eager(**inputs, output_attentions=True, output_hidden_states=True)
    layer = (target_layer % 4) - 1  # the decoder layer that produces hidden_states[target_layer]
    probs = out.attentions[layer]  # (B, 16, L, L): GQA, 16 query heads on 8 kv heads
    assert probs.shape[1] == HEADS
    spans, mask = parts["spans"], inputs["attention_mask"]
    visual_tokens = inputs["mm_token_type_ids"] > 0
    assert [s.shape[0] for s in parts["scores"]] == spans.num_tokens.tolist() == [6, 4, 4, 12]
    for k in range(len(spans)):
        b, start, end = int(spans.row[k]), int(spans.start[k]), int(spans.end[k])
        queries = [t for t in range(end, mask.shape[1]) if mask[b, t] and not visual_tokens[b, t] and labels[b, t] < 0]
        visual = probs[b][:, queries, start:end]  # (H, T, N)
        if score_context == "image":
            visual = visual / visual.sum(-1, keepdim=True)
        torch.testing.assert_close(parts["scores"][k], visual.mean(dim=(0, 1)), atol=1e-5, rtol=1e-4)
    # X^ = X_v * (1 - alpha + alpha * minmax(s)): the most attended token keeps its state, the least 40 %.
    k = 3
    scores, target = parts["scores"][k], parts["target"][k]
    x_v = out.hidden_states[target_layer][int(spans.row[k]), int(spans.start[k]) : int(spans.end[k])]
    torch.testing.assert_close(target[scores.argmax()], x_v[scores.argmax()], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(target[scores.argmin()], 0.4 * x_v[scores.argmin()], atol=1e-5, rtol=1e-4)


# ============================================================================ VID decoder with variable N
def test_vid_decoder_handles_variable_grids():
    torch.manual_seed(0)
    decoder = VIDDecoder(32, 2, 16, 8, 1, 16, position_grid=(4, 4))
    # at the grid's own size the resampled grid is the table itself; elsewhere it is bilinear with aligned corners
    assert torch.equal(decoder.grid_position_embedding(4, 4), decoder.position_embedding)
    table = decoder.position_embedding.view(4, 4, 8)
    corners = decoder.grid_position_embedding(2, 7).view(2, 7, 8)
    torch.testing.assert_close(corners[[0, 0, -1, -1], [0, -1, 0, -1]], table[[0, 0, -1, -1], [0, -1, 0, -1]])
    torch.testing.assert_close(corners[0, 3], table[0, 1:3].mean(0))  # halfway between columns 1 and 2
    compression, instruction = torch.randn(3, 2, 32), torch.randn(3, 32)
    grids = torch.tensor([[1, 2, 3], [1, 4, 4], [2, 2, 2]])
    mu = decoder(compression, instruction, grids)
    assert mu.shape == (6 + 16 + 8, 32)
    # images are decoded independently: the same image alone gives the same prediction
    torch.testing.assert_close(mu[6:22], decoder(compression[1:2], instruction[1:2], grids[1:2]))
    # a video group of t=2 repeats the grid's positions over time: same context, same positions -> same rows
    torch.testing.assert_close(mu[22:26], mu[26:30])
    # the fixed-N decoder (LLaVA) is unchanged: (I, N, D), and takes no grids
    fixed = VIDDecoder(32, 2, 16, 8, 1, 16)
    assert fixed(compression, instruction).shape == (3, 16, 32)
    with pytest.raises(ValueError, match="fixed N"):
        fixed(compression, instruction, grids)
    # the head's loss over images of different N is the mean of each image's VID loss
    head = DistillHead(small_config(decoder_hidden_size=8), 32, 16, position_grid=(4, 4))
    targets = [torch.randn(int(t * h * w), 32) for t, h, w in grids.tolist()]
    loss = head(compression, instruction, targets, grid_sizes=grids)
    predictions = head.decoder(compression, instruction, grids).split([6, 16, 8])
    expected = torch.stack([vid_loss(t[None], p[None], head.variance) for t, p in zip(targets, predictions)]).mean()
    torch.testing.assert_close(loss, expected)


# ============================================================================ training (LoRA, the default)
def test_lora_training_lowers_ce_and_vid_and_reaches_the_right_parameters():
    model = apply_etc_with_lora(
        tiny_qwen3_vl(), small_config(vid_weight=1e-3), default_lora_config(dropout=0.0)
    )
    assert default_lora_config().r == 8
    inputs, labels, _ = make_batch(TWO_IMAGES, answer=3)
    history, grads = train_etc_steps(model, inputs, labels, steps=6, lr=1e-2, vid_weight=1e-3)
    for part in (
        "etc.compression_tokens.weight",
        "language_model.layers.0.self_attn.q_proj.lora_B",
        "language_model.layers.1.mlp.down_proj.lora_B",
        "etc.distill.decoder.context_proj.weight",
        "etc.distill.decoder.position_embedding",
        "etc.distill.variance_weight",
    ):
        name = next(name for name in grads if part in name)
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    frozen = [n for n in grads if ".visual." in n or ("language_model" in n and "lora_" not in n)]
    assert frozen and all(grads[n] is None for n in frozen)
    (ce0, vid0), (ce1, vid1) = history[0], history[-1]
    assert ce1 < ce0 and vid1 < vid0, history


def test_frozen_teacher_with_lora_is_the_base_model():
    base = tiny_qwen3_vl()
    reference = apply_etc(copy.deepcopy(base), small_config())
    lora = default_lora_config(dropout=0.0, init_lora_weights=False)  # adapters that change the model
    model = apply_etc_with_lora(base, small_config(), lora)
    inputs, labels, _ = make_batch(TWO_IMAGES, answer=2)
    expected = instruction_target(reference, labels=labels, **inputs)["target"]
    for got, want in zip(instruction_target(model, labels=labels, **inputs)["target"], expected):
        torch.testing.assert_close(got, want)
    model.get_base_model().etc.config.teacher = "self"  # the current model: adapters on
    current = instruction_target(model, labels=labels, **inputs)["target"]
    assert not torch.allclose(current[0], expected[0], atol=1e-4)


def test_frozen_teacher_under_full_fine_tuning_is_the_starting_model():
    """Without LoRA the teacher is a snapshot of the starting model, its vision tower included when that trains."""
    model = apply_etc(tiny_qwen3_vl(), small_config(vid_weight=1e-3, freeze_vision_tower=False))
    inputs, labels, _ = make_batch(CHAT, answer=2)
    before = instruction_target(model, labels=labels, **inputs)["target"]
    train_etc_steps(model, inputs, labels, steps=2, lr=1e-2, vid_weight=1e-3)
    assert model.model.visual.merger.linear_fc2.weight.grad.abs().sum() > 0  # the vision tower did train
    for got, want in zip(instruction_target(model, labels=labels, **inputs)["target"], before):
        torch.testing.assert_close(got, want)  # the snapshot did not move
    model.etc.config.teacher = "self"
    current = instruction_target(model, labels=labels, **inputs)["target"]
    assert not torch.allclose(current[0], before[0], atol=1e-4)  # the current model did


# ============================================================================ checkpoints
def test_save_and_load_round_trip(tmp_path):
    import peft

    model = apply_etc_with_lora(tiny_qwen3_vl(), small_config(vid_weight=1e-3), default_lora_config(dropout=0.0))
    inputs, labels, _ = make_batch(CHAT, answer=3)
    train_etc_steps(model, inputs, labels, steps=2, lr=1e-2, vid_weight=1e-3)
    model.eval()
    save_pretrained(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"etc_config.json", "etc_model.safetensors", "adapter"}
    loaded = from_pretrained(tiny_qwen3_vl(), tmp_path)  # into the starting model
    assert isinstance(loaded, peft.PeftModel)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)
        assert torch.equal(
            loaded.generate(**inputs, max_new_tokens=3, do_sample=False),
            model.generate(**inputs, max_new_tokens=3, do_sample=False),
        )
    with pytest.raises(ValueError, match="num_compression_tokens"):
        from_pretrained(apply_etc(tiny_qwen3_vl(), small_config(num_compression_tokens=3)), tmp_path)
    with pytest.raises(ValueError, match="hidden_size"):
        from_pretrained(tiny_qwen3_vl(hidden_size=32), tmp_path)
    # full fine-tuning: the trained base weights are saved beside the ETC parts
    full = apply_etc(tiny_qwen3_vl(), small_config(loss="none"))
    with torch.no_grad():
        full.etc.compression_tokens.weight.add_(1.0)
        full.model.language_model.layers[0].mlp.up_proj.weight.mul_(2.0)
    save_pretrained(full, tmp_path / "full")
    assert (tmp_path / "full" / "base_model.safetensors").is_file()
    reloaded = from_pretrained(tiny_qwen3_vl(), tmp_path / "full")
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, full(**inputs).logits)


# ============================================================================ bad input
def test_bad_inputs_raise_clear_errors():
    with pytest.raises(TypeError, match="expects a Qwen3VLForConditionalGeneration"):
        apply_etc(torch.nn.Linear(2, 2), small_config())
    with pytest.raises(ValueError, match="target_layer"):
        apply_etc(tiny_qwen3_vl(), small_config(target_layer=5))
    model = apply_etc(tiny_qwen3_vl(), small_config())
    with pytest.raises(ValueError, match="already applied"):
        apply_etc(model, small_config())
    with pytest.raises(ValueError, match="already applied"):
        apply_etc_with_lora(model, small_config())
    inputs, labels, _ = make_batch(TWO_IMAGES, answer=2)
    image_tokens = inputs["input_ids"] == IMAGE
    no_image = {
        **inputs,
        "input_ids": inputs["input_ids"].masked_fill(image_tokens, 5),
        "mm_token_type_ids": torch.zeros_like(inputs["mm_token_type_ids"]),
    }
    with pytest.raises(ValueError, match="no image token"):
        model(**no_image)
    first = int(inputs["image_grid_thw"][0].prod())
    one_image = {**inputs, "pixel_values": inputs["pixel_values"][:first]}
    one_image["image_grid_thw"] = inputs["image_grid_thw"][:1]
    with pytest.raises(ValueError, match="Image features and image tokens do not match, tokens: "):
        model(**one_image)
    with pytest.raises(ValueError, match="Image features and image tokens do not match, tokens: .*no pixel values"):
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
              mm_token_type_ids=inputs["mm_token_type_ids"])  # fmt: skip
    with pytest.raises(ValueError, match="Image features and image tokens do not match, tokens: .*no pixel values"):
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])  # nor mm_token_type_ids
    video_tokens = {"input_ids": inputs["input_ids"].masked_fill(image_tokens, VIDEO),
                    "mm_token_type_ids": inputs["mm_token_type_ids"] * 2}  # fmt: skip
    with pytest.raises(ValueError, match="Video features and video tokens do not match, tokens: "):
        model(**video_tokens)
    with pytest.raises(ValueError, match="labels must have the shape of input_ids"):
        model(**inputs, labels=labels[:, 1:])
    with pytest.raises(ValueError, match="needs mm_token_type_ids"):
        model(**{k: v for k, v in inputs.items() if k != "mm_token_type_ids"})
    with pytest.raises(ValueError, match="mm_token_type_ids do not match input_ids"):
        model(**{**inputs, "mm_token_type_ids": torch.zeros_like(inputs["mm_token_type_ids"])})
    with pytest.raises(ValueError, match="position_ids must be"):
        model(**inputs, position_ids=torch.zeros(3, 2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="labels go with the training forward"):
        model(**inputs, labels=labels, use_cache=True)
    with torch.no_grad():
        encoded = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    pre_encoded = {k: v for k, v in inputs.items() if k not in ("pixel_values", "image_grid_thw")}
    with pytest.raises(ValueError, match="needs position_ids or image_grid_thw"):
        model(**pre_encoded, mm_encoder_outputs={"image": encoded})
    with pytest.raises(ValueError, match="either pixel_values or mm_encoder_outputs"):
        model(**inputs, mm_encoder_outputs={"image": encoded})

