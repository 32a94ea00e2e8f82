"""A compressed image cache reused across questions and turns: the transformers prompt-cache pattern, multi-turn
continuation (with new images in later turns), beam search and generate(use_cache=False), on LLaVA and Qwen3-VL."""

import copy

import pytest
import torch
from transformers import DynamicCache

import test_llava_etc as llava_helpers
from conftest import IMAGE as QWEN_IMAGE, VISION_END, qwen3_vl_batch, tiny_qwen3_vl  # the tiny Qwen3-VL
import test_qwen3_vl_etc as qwen_helpers
from etc_ext.models import llava, qwen3_vl

STEPS = 5


def greedy(model, **inputs):
    return model.generate(
        **inputs, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True, output_logits=True
    )


def assert_same_generation(reused, fresh):
    """Same tokens under greedy, logits within fp tolerance at every step."""
    assert torch.equal(reused.sequences, fresh.sequences)
    for step, (a, b) in enumerate(zip(reused.logits, fresh.logits)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=f"step {step}")


def prefix_cache(model, inputs, length):
    """The transformers pattern: prefill the prompt up to `length` (ending after the image) into a cache."""
    prefix = {k: v[:, :length] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v
              for k, v in inputs.items()}  # fmt: skip
    with torch.no_grad():
        return model(**prefix, cache=DynamicCache(), use_cache=True).cache


# ============================================================================ LLaVA
LLAVA_N = llava_helpers.N


def llava_model(**changes):
    return llava.apply_etc(llava_helpers.tiny_llava(), llava_helpers.small_config(**changes))


@pytest.mark.parametrize("rows", [[[2, "I", 5]], [[2, "I", 4], [2, "I", 4]], [[2, "I", 1, "I", 6]]])
def test_llava_prompt_cache_reuse_equals_a_fresh_generate(rows):
    model = llava_model()
    first, _ = llava_helpers.make_batch(rows, seed=1)
    # A second question about the same image(s): same prefix, other question tokens.
    second, _ = llava_helpers.make_batch(rows, seed=2)
    prefix_length = len(rows[0]) and (first["input_ids"][0] == llava_helpers.IMAGE).nonzero().max().item() + 1
    second["input_ids"][:, :prefix_length] = first["input_ids"][:, :prefix_length]
    second["pixel_values"] = first["pixel_values"]
    cache = prefix_cache(model, first, prefix_length)
    with torch.no_grad():
        for question in (first, second):
            reused = greedy(model, **question, cache=copy.deepcopy(cache))
            assert_same_generation(reused, greedy(model, **question))
    # The reused cache was copied, never touched: it still holds only the prefix.
    assert cache.get_seq_length() == cache.etc_state.prefill_length


@pytest.mark.parametrize("new_images", ["none", "all_images_passed", "only_new_images_passed"])
def test_llava_multi_turn_equals_prefilling_the_whole_conversation(new_images):
    model = llava_model()
    turn1, _ = llava_helpers.make_batch([[2, "I", 5]], seed=1)
    turn2_rows = [[3]] if new_images == "none" else [[3, "I", 4]]
    turn2, _ = llava_helpers.make_batch(turn2_rows, seed=3)
    with torch.no_grad():
        answer1 = greedy(model, **turn1)
        conversation = torch.cat([answer1.sequences, turn2["input_ids"]], dim=1)
        pixel_values = turn1["pixel_values"]
        if new_images == "all_images_passed":
            pixel_values = torch.cat([turn1["pixel_values"], turn2["pixel_values"]])
        inputs = {"input_ids": conversation, "attention_mask": torch.ones_like(conversation)}
        passed = pixel_values if new_images != "only_new_images_passed" else turn2["pixel_values"]
        continued = greedy(model, **inputs, pixel_values=passed, cache=answer1.cache)
        all_images = pixel_values if new_images == "none" else torch.cat([turn1["pixel_values"], turn2["pixel_values"]])
        assert_same_generation(continued, greedy(model, **inputs, pixel_values=all_images))
    # M entries per image in every layer: the cache never held the new image's N visual tokens.
    images = 1 + (new_images != "none")
    expected = conversation.shape[1] - images * (LLAVA_N - 2) + STEPS - 1
    assert all(layer.keys.shape[2] == expected for layer in continued.cache.layers)


def test_llava_continuation_with_padding_keeps_each_row_apart():
    """A left-padded batch continued by a second turn with the whole conversation's attention mask."""
    model = llava_model()
    turn1, _ = llava_helpers.make_batch([[2, "I", 3], [2, "I", 6]], seed=1)
    with torch.no_grad():
        answer1 = greedy(model, **turn1)
        follow_up = torch.randint(3, 90, (2, 4), generator=torch.Generator().manual_seed(7))
        conversation = torch.cat([answer1.sequences, follow_up], dim=1)
        mask = torch.cat([turn1["attention_mask"], torch.ones(2, STEPS + 4, dtype=torch.long)], dim=1)
        inputs = {"input_ids": conversation, "attention_mask": mask, "pixel_values": turn1["pixel_values"]}
        assert_same_generation(greedy(model, **inputs, cache=answer1.cache), greedy(model, **inputs))


def test_llava_beam_search_and_uncached_generate_match_the_cached_greedy_path():
    model = llava_model()
    inputs, _ = llava_helpers.make_batch(llava_helpers.CHAT)
    with torch.no_grad():
        # use_cache=False re-runs the masked single pass over the growing sequence: the oracle of the prefill.
        uncached = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, use_cache=False)
        assert torch.equal(uncached, greedy(model, **inputs).sequences)
        beams = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, num_beams=3)
        beams_uncached = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, num_beams=3, use_cache=False)
    assert torch.equal(beams, beams_uncached)


def test_llava_continuation_errors_are_clear():
    model = llava_model()
    turn1, _ = llava_helpers.make_batch([[2, "I", 5]], seed=1)
    turn2, _ = llava_helpers.make_batch([[3, "I", 4]], seed=3)
    with torch.no_grad():
        answer1 = greedy(model, **turn1)
        conversation = torch.cat([answer1.sequences, turn2["input_ids"]], dim=1)
        mask = torch.ones_like(conversation)
        with pytest.raises(ValueError, match="no pixel values"):
            model(input_ids=conversation, attention_mask=mask, cache=copy.deepcopy(answer1.cache))
        three = torch.cat([turn1["pixel_values"]] * 3)
        with pytest.raises(ValueError, match="pass either the new images only or every image"):
            model(input_ids=conversation, attention_mask=mask, pixel_values=three, cache=copy.deepcopy(answer1.cache))
        with pytest.raises(ValueError, match="columns of input_ids are new"):  # a mask shorter than the cache
            model(input_ids=conversation[:, -2:], attention_mask=mask[:, :3], cache=copy.deepcopy(answer1.cache))


# ============================================================================ Qwen3-VL
def qwen_model():
    return qwen3_vl.apply_etc(tiny_qwen3_vl(), qwen_helpers.small_config())


def test_qwen3_vl_prompt_cache_reuse_equals_a_fresh_generate():
    model = qwen_model()
    inputs, _, _ = qwen3_vl_batch([[3, ("I", 4, 6), 5]])
    prefix_length = (inputs["input_ids"][0] == VISION_END).nonzero().max().item() + 1
    cache = prefix_cache(model, inputs, prefix_length)
    with torch.no_grad():
        assert_same_generation(greedy(model, **inputs, cache=copy.deepcopy(cache)), greedy(model, **inputs))


def test_qwen3_vl_text_turn_equals_prefilling_the_whole_conversation():
    model = qwen_model()
    turn1, _, _ = qwen3_vl_batch([[3, ("I", 4, 6), 5]])
    with torch.no_grad():
        answer1 = greedy(model, **turn1)
        follow_up = torch.randint(3, 100, (1, 4), generator=torch.Generator().manual_seed(7))
        conversation = torch.cat([answer1.sequences, follow_up], dim=1)
        inputs = dict(turn1, input_ids=conversation, attention_mask=torch.ones_like(conversation))
        inputs["mm_token_type_ids"] = (conversation == QWEN_IMAGE).long()
        assert_same_generation(greedy(model, **inputs, cache=answer1.cache), greedy(model, **inputs))


@pytest.mark.parametrize("rows", [[[3, ("I", 4, 6), 5]], [[3, ("I", 4, 6), 5], [3, ("I", 6, 4), 2]]])
def test_qwen3_vl_turn_with_a_new_image_equals_prefilling_the_whole_conversation(rows):
    model = qwen_model()
    turn1, _, _ = qwen3_vl_batch(rows)
    turn2_rows = [[2, ("I", 4, 4), 2], [2, ("I", 8, 4), 2]][: len(rows)]
    turn2, _, _ = qwen3_vl_batch(turn2_rows, seed=3)
    with torch.no_grad():
        answer1 = greedy(model, **turn1)
        conversation = torch.cat([answer1.sequences, turn2["input_ids"]], dim=1)
        mask = torch.cat([turn1["attention_mask"], torch.ones(len(rows), STEPS + turn2["input_ids"].shape[1])], 1)
        # Every image of the conversation, row by row, as a processor gives them for the whole conversation.
        patches1 = turn1["pixel_values"].split(turn1["image_grid_thw"].prod(-1).tolist())
        patches2 = turn2["pixel_values"].split(turn2["image_grid_thw"].prod(-1).tolist())
        pixel_values = torch.cat([p for pair in zip(patches1, patches2) for p in pair])
        grids = torch.stack([g for pair in zip(turn1["image_grid_thw"], turn2["image_grid_thw"]) for g in pair])
        inputs = {
            "input_ids": conversation,
            "attention_mask": mask.long(),
            "mm_token_type_ids": (conversation == QWEN_IMAGE).long(),
            "pixel_values": pixel_values,
            "image_grid_thw": grids,
        }
        continued = greedy(model, **inputs, cache=answer1.cache)
        assert_same_generation(continued, greedy(model, **inputs))


def test_qwen3_vl_new_videos_on_a_compressed_cache_raise_a_clear_error():
    model = qwen_model()
    turn1, _, _ = qwen3_vl_batch([[3, ("I", 4, 6), 5]])
    turn2, _, _ = qwen3_vl_batch([[2, ("V", 2, 4, 4), 2]], seed=3)
    with torch.no_grad():
        answer1 = greedy(model, **turn1)
        conversation = torch.cat([answer1.sequences, turn2["input_ids"]], dim=1)
        with pytest.raises(NotImplementedError, match="prefill the whole conversation into a new cache"):
            model(
                input_ids=conversation,
                attention_mask=torch.ones_like(conversation),
                mm_token_type_ids=turn2["mm_token_type_ids"],
                pixel_values_videos=turn2["pixel_values_videos"],
                video_grid_thw=turn2["video_grid_thw"],
                cache=answer1.cache,
            )


# ============================================================================ compressed caches on disk
def test_saved_cache_answers_later_without_the_image(tmp_path):
    from etc_ext.cache_store import load_compressed_cache, save_compressed_cache

    model = llava_model()
    inputs, _ = llava_helpers.make_batch([[2, "I", 5]], seed=1)
    prefix_length = 2 + LLAVA_N
    cache = prefix_cache(model, inputs, prefix_length)
    path = tmp_path / "image.etc-cache.safetensors"
    save_compressed_cache(cache, path, model)
    loaded = load_compressed_cache(path, model)
    for original, restored in zip(cache.layers, loaded.layers):
        assert torch.equal(original.keys, restored.keys) and torch.equal(original.values, restored.values)
    for name, value in vars(cache.etc_state).items():
        restored = getattr(loaded.etc_state, name)
        assert torch.equal(value, restored) if isinstance(value, torch.Tensor) else value == restored, name
    text_only = {k: v for k, v in inputs.items() if k != "pixel_values"}  # no vision tower needed
    with torch.no_grad():
        assert_same_generation(greedy(model, **text_only, cache=loaded), greedy(model, **inputs))


def test_loading_a_cache_into_another_model_names_what_differs(tmp_path):
    from etc_ext.cache_store import load_compressed_cache, save_compressed_cache

    model = llava_model()
    inputs, _ = llava_helpers.make_batch([[2, "I", 5]], seed=1)
    path = tmp_path / "image.etc-cache.safetensors"
    save_compressed_cache(prefix_cache(model, inputs, 2 + LLAVA_N), path, model)
    with torch.no_grad():
        model.etc.compression_tokens.weight.add_(0.1)  # other trained ETC weights
    with pytest.raises(ValueError, match="compression_tokens"):
        load_compressed_cache(path, model)
    with pytest.raises(ValueError, match="etc_config"):
        load_compressed_cache(path, llava_model(num_compression_tokens=3))
    (tmp_path / "not_a_cache").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_compressed_cache(tmp_path / "not_a_cache", model)
    with pytest.raises(ValueError, match="does not exist"):
        load_compressed_cache(tmp_path / "missing", model)
    with pytest.raises(ValueError, match="no compressed ETC prefill"):
        save_compressed_cache(DynamicCache(), tmp_path / "empty", model)


# ============================================================================ follow-up questions: ETC and the baselines
def feed_one_by_one(model, cache, conversation, mask, covered, steps):
    """The oracle of a multi-token continuation: decoding steps of one token each over the tokens the cache does
    not hold, then greedy decoding; returns the tokens and each step's next-token logits."""
    logits, tokens = [], conversation
    for column in range(covered, conversation.shape[1]):
        out = model(input_ids=conversation[:, column : column + 1], attention_mask=mask[:, : column + 1], cache=cache)
    for _ in range(steps):
        logits.append(out.logits[:, -1])
        next_token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
        mask = torch.cat([mask, torch.ones_like(next_token)], dim=1)
        out = model(input_ids=next_token, attention_mask=mask, cache=cache)
    return tokens, logits


@pytest.mark.parametrize("method", ["etc", "mean", "subsample", "fastv", "visionzip", "instruction_merge"])
def test_follow_up_question_continues_the_compressed_cache(method):
    """ETC and each baseline answer a follow-up question from the cache of the first one (FastV-style keeps the
    tokens it picked for the first question): a multi-token continuation equals one-token steps on that cache."""
    from etc_ext.baselines import apply_baseline

    model = llava_helpers.tiny_llava()
    model = llava.apply_etc(model, llava_helpers.small_config()) if method == "etc" else apply_baseline(model, method, 4)
    turn1, _ = llava_helpers.make_batch([[2, "I", 3], [2, "I", 6]], seed=1)
    follow_up = torch.randint(3, 90, (2, 4), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        answer1 = greedy(model, **turn1)
        conversation = torch.cat([answer1.sequences, follow_up], dim=1)
        mask = torch.cat([turn1["attention_mask"], torch.ones(2, STEPS + 4, dtype=torch.long)], dim=1)
        expected_cache = copy.deepcopy(answer1.cache)
        covered = expected_cache.etc_state.covered_length(expected_cache.get_seq_length())
        tokens, logits = feed_one_by_one(model, expected_cache, conversation, mask, covered, STEPS)
        inputs = {"input_ids": conversation, "attention_mask": mask, "pixel_values": turn1["pixel_values"]}
        continued = greedy(model, **inputs, cache=answer1.cache)
    assert torch.equal(continued.sequences, tokens)
    for a, b in zip(continued.logits, logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.parametrize("backbone", ["llava", "qwen3_vl"])
def test_text_only_prompt_may_generate_the_image_token_id(backbone):
    """A text-only prompt decodes like the original model even when it generates the image token id."""
    if backbone == "llava":
        original, image = llava_helpers.tiny_llava(), llava_helpers.IMAGE
        model = llava.apply_etc(copy.deepcopy(original), llava_helpers.small_config())
    else:
        original, image = tiny_qwen3_vl(), QWEN_IMAGE
        model = qwen3_vl.apply_etc(copy.deepcopy(original), qwen_helpers.small_config())
    prompt = torch.randint(3, 90, (1, 6), generator=torch.Generator().manual_seed(3))
    forced = dict(max_new_tokens=4, do_sample=False, sequence_bias={(image,): 1e4})  # the image id every step
    with torch.no_grad():
        expected = original.generate(input_ids=prompt, **forced)
        generated = model.generate(input_ids=prompt, **forced)
    assert (expected[:, 6:] == image).all()
    assert torch.equal(generated, expected)


def test_labels_on_a_compressed_cache_are_refused():
    model = llava_model()
    inputs, labels = llava_helpers.make_batch([[2, "I", 5]], seed=1, answer=2)
    with torch.no_grad():
        cache = model(**inputs, use_cache=True).cache
        with pytest.raises(ValueError, match="labels go with the training forward"):
            model(**inputs, labels=labels, cache=cache)


# ============================================================================ assisted decoding
def _assisted_pair(backbone):
    if backbone == "llava":
        plain = llava_helpers.tiny_llava()
        etc = llava.apply_etc(copy.deepcopy(plain), llava_helpers.small_config())
        inputs, _ = llava_helpers.make_batch([[2, "I", 5]])
    else:
        plain = tiny_qwen3_vl()
        etc = qwen3_vl.apply_etc(copy.deepcopy(plain), qwen_helpers.small_config())
        inputs, _, _ = qwen3_vl_batch([[3, ("I", 4, 6), 5]])
    return plain, etc, inputs


@pytest.mark.parametrize("backbone", ["llava", "qwen3_vl"])
def test_assisted_decoding_gives_the_greedy_tokens(backbone):
    """An ETC model verifying a plain assistant's candidates (its prefill returns the candidates' logits) gives its
    own greedy tokens."""
    plain, etc, inputs = _assisted_pair(backbone)
    settings = dict(max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        assisted = etc.generate(**inputs, assistant_model=plain, **settings)
        greedy_tokens = etc.generate(**inputs, **settings)
        assert torch.equal(assisted, greedy_tokens)
        # prompt lookup: candidates from the prompt (Qwen3-VL's mm_token_type_ids extended over them)
        assert torch.equal(etc.generate(**inputs, prompt_lookup_num_tokens=3, **settings), greedy_tokens)


@pytest.mark.parametrize("backbone", ["llava", "qwen3_vl"])
def test_an_etc_assistant_drafts_from_the_compressed_image(backbone):
    """An ETC model as the assistant: generate() gives an assistant only the images the main model encoded
    (`mm_encoder_outputs`) and marks its prefill as a later step; the assistant still compresses them. A plain main
    model keeps its greedy tokens; an ETC main model with its own copy as assistant (drafting 5 tokens at a time,
    whatever their probability) accepts every draft, as they are its own greedy tokens: one main-model pass."""
    plain, etc, inputs = _assisted_pair(backbone)
    settings = dict(max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        assert torch.equal(plain.generate(**inputs, assistant_model=etc, **settings), plain.generate(**inputs, **settings))
        assistant, calls = copy.deepcopy(etc), []
        assistant.generation_config.update(
            assistant_confidence_threshold=0.0, num_assistant_tokens=5, num_assistant_tokens_schedule="constant"
        )
        handle = etc.register_forward_pre_hook(lambda module, args: calls.append(1))
        try:
            assisted = etc.generate(**inputs, assistant_model=assistant, **settings)
        finally:
            handle.remove()
        assert torch.equal(assisted, etc.generate(**inputs, **settings))
    assert len(calls) == 1, f"{len(calls)} main-model passes: the assistant's drafts were rejected"


def test_an_etc_cache_crops_text_entries_only():
    """crop() (assisted decoding's rollback) removes decoded entries and the prompt's text after the image, one entry
    per token, and keeps the state consistent: decoding the cropped tokens again gives the logits of a cache that
    never held them. The compressed image's entries cannot be cropped."""
    model = llava_model()
    inputs, _ = llava_helpers.make_batch([[2, "I", 3]])  # 3 text tokens after the image
    ids = inputs["input_ids"]
    with torch.no_grad():
        cache = model(**inputs, cache=DynamicCache(), use_cache=True).cache
        step = model(input_ids=ids[:, -1:].clone(), cache=cache, use_cache=True)  # decode one token
        length = cache.get_seq_length()
        with pytest.raises(ValueError, match="only the last 4 entries are one token each"):
            cache.crop(-5)
        assert cache.get_seq_length() == length
        cache.crop(-3)  # the decoded token and the prompt's last two
        shorter = {k: v[:, :-2] if k in ("input_ids", "attention_mask") else v for k, v in inputs.items()}
        fresh = model(**shorter, cache=DynamicCache(), use_cache=True).cache
        assert cache.get_seq_length() == fresh.get_seq_length()
        assert cache.etc_state.covered_length(cache.get_seq_length()) == shorter["input_ids"].shape[1]
        # the whole prompt with its mask: the last 2 tokens are new
        again = model(input_ids=ids, attention_mask=inputs["attention_mask"], cache=cache, use_cache=True)
        reference = model(input_ids=ids, attention_mask=inputs["attention_mask"], cache=fresh, use_cache=True)
    torch.testing.assert_close(again.logits[:, -1], reference.logits[:, -1], atol=1e-5, rtol=0)
    assert step.logits.shape[1] == 1


def test_prefill_logits_for_tokens_before_the_last_image_are_refused():
    model = llava_model()
    inputs, _ = llava_helpers.make_batch([[2, "I", 3]])
    with torch.no_grad():
        assert model(**inputs, use_cache=True, logits_to_keep=3).logits.shape[1] == 3
        with pytest.raises(ValueError, match="outputs only for the text after it"):
            model(**inputs, use_cache=True, logits_to_keep=5)


def test_a_static_cache_is_refused_not_replaced():
    model = llava_model()
    inputs, _ = llava_helpers.make_batch(llava_helpers.CHAT)
    with torch.no_grad(), pytest.raises(ValueError, match="needs a DynamicCache; got a StaticCache"):
        model.generate(**inputs, max_new_tokens=3, do_sample=False, cache_implementation="static")


@pytest.mark.parametrize("method", ["etc", "fastv"])
def test_a_generated_image_token_id_decodes_as_text_on_a_compressed_cache(method):
    """After an image prompt, generating the image token id is text: decoding continues (no new image)."""
    from etc_ext.baselines import apply_baseline

    model = llava_helpers.tiny_llava()
    model = llava.apply_etc(model, llava_helpers.small_config()) if method == "etc" else apply_baseline(model, method, 4)
    inputs, _ = llava_helpers.make_batch([[2, "I", 5]], seed=1)
    image = llava_helpers.IMAGE
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, sequence_bias={(image,): 1e4})
        assert (out[:, -4:] == image).all()
        # The same steps by hand: each generated id fed back as text on the compressed cache.
        prefill = model(**inputs, use_cache=True)
        cache, mask = prefill.cache, inputs["attention_mask"]
        for _ in range(3):
            mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], dim=1)
            step = model(input_ids=torch.full((1, 1), image), attention_mask=mask, cache=cache)
        assert cache.get_seq_length() == cache.etc_state.prefill_length + 3
        assert torch.isfinite(step.logits).all()


@pytest.mark.parametrize("backbone", ["llava", "qwen3_vl"])
def test_forward_follows_the_config_use_cache(backbone):
    """A plain forward call (no use_cache argument) returns a cache when the text config's use_cache is on, as
    Hugging Face models do: the masked pass's cache, compacted (M entries per image), whose continuation equals the
    prefill's; the logits stay the masked pass's. use_cache=False, or the config's off, returns none."""
    _, model, inputs = _assisted_pair(backbone)
    model.config.get_text_config().use_cache = True
    with torch.no_grad():
        output = model(**inputs)
        assert torch.equal(output.logits, model(**inputs, use_cache=False).logits)
        prefill = model(**inputs, cache=DynamicCache(), use_cache=True)
        assert output.cache.get_seq_length() == prefill.cache.get_seq_length() < inputs["input_ids"].shape[1]
        torch.testing.assert_close(output.logits[:, -1], prefill.logits[:, -1], atol=1e-5, rtol=0)
        for ours, prefilled in zip(output.cache.layers, prefill.cache.layers):
            torch.testing.assert_close(ours.keys, prefilled.keys, atol=1e-5, rtol=0)
            torch.testing.assert_close(ours.values, prefilled.values, atol=1e-5, rtol=0)
        for name, value in vars(prefill.cache.etc_state).items():
            ours = getattr(output.cache.etc_state, name)
            assert torch.equal(ours, value) if isinstance(value, torch.Tensor) else ours == value, name
        # One more token on each cache: the same next logits.
        step = torch.cat([inputs["input_ids"], output.logits[:, -1:].argmax(-1)], dim=1)
        mask = torch.ones_like(step)
        next_ours = model(input_ids=step, attention_mask=mask, cache=output.cache, use_cache=True).logits[:, -1]
        next_prefill = model(input_ids=step, attention_mask=mask, cache=prefill.cache, use_cache=True).logits[:, -1]
        torch.testing.assert_close(next_ours, next_prefill, atol=1e-5, rtol=0)
        whole_prompt = model(**inputs, cache=DynamicCache(), use_cache=True).cache
        length = inputs["input_ids"].shape[1]
        with pytest.raises(ValueError, match=f"the cache already holds all {length} tokens of input_ids"):
            model.generate(**inputs, cache=whole_prompt, max_new_tokens=2)  # it fed the prompt again, silently
        assert model(**inputs, use_cache=False).cache is None
        model.config.get_text_config().use_cache = False
        assert model(**inputs).cache is None


@pytest.mark.parametrize("backbone", ["llava", "qwen3_vl"])
def test_output_hidden_states_in_the_user_layout(backbone):
    """With compression enabled, output_hidden_states gives the embeddings and every layer's output in the user's
    layout (each user token's own state; the compression tokens' are not in it), for a forward call and for
    generate() (whose prefill is then the masked single pass: same tokens). output_attentions with SDPA raises, as
    transformers needs eager attention for it."""
    _, model, inputs = _assisted_pair(backbone)
    batch, length = inputs["input_ids"].shape
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True, use_cache=False)
        assert len(out.hidden_states) == model.config.get_text_config().num_hidden_layers + 1
        assert all(states.shape[:2] == (batch, length) for states in out.hidden_states)
        text = slice(int(model._visual_token_mask(inputs["input_ids"]).nonzero()[:, 1].max()) + 1, length)
        last, first = out.hidden_states[-1], out.hidden_states[0]
        torch.testing.assert_close(model.lm_head(last[:, text]), out.logits[:, text], atol=1e-5, rtol=0)
        torch.testing.assert_close(first[:, text], model.get_input_embeddings()(inputs["input_ids"])[:, text])
        settings = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        plain = model.generate(**inputs, **settings)
        with_states = model.generate(**inputs, output_hidden_states=True, **settings)
        assert torch.equal(plain.sequences, with_states.sequences)
        assert with_states.hidden_states[0][-1].shape[:2] == (batch, length)  # the prefill: every prompt token
        assert all(step[-1].shape[:2] == (batch, 1) for step in with_states.hidden_states[1:])
        with pytest.raises(ValueError, match="output_attentions needs eager attention"):
            model(**inputs, output_attentions=True)


@pytest.mark.parametrize("backbone", ["llava", "qwen3_vl"])
def test_output_options_follow_the_config_and_take_layer_lists(backbone):
    """As in transformers: `config.output_hidden_states` / `config.output_attentions` are the defaults of the
    arguments, and `output_hidden_states` may list the layers to keep (negative indices from the end; None at the
    others)."""
    _, model, inputs = _assisted_pair(backbone)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        expected = model(**inputs, output_hidden_states=True, output_attentions=True, use_cache=False)
        model.config.output_hidden_states = model.config.output_attentions = True
        try:
            from_config = model(**inputs, use_cache=False)
        finally:
            model.config.output_hidden_states = model.config.output_attentions = False
        listed = model(**inputs, output_hidden_states=[0, -1], use_cache=False)
    assert from_config.hidden_states is not None and from_config.attentions is not None
    for ours, theirs in zip(from_config.hidden_states + from_config.attentions,
                            expected.hidden_states + expected.attentions, strict=True):  # fmt: skip
        torch.testing.assert_close(ours, theirs)
    assert len(listed.hidden_states) == len(expected.hidden_states)
    for index, states in enumerate(listed.hidden_states):
        if index in (0, len(expected.hidden_states) - 1):
            torch.testing.assert_close(states, expected.hidden_states[index])
        else:
            assert states is None


@pytest.mark.parametrize("backbone", ["llava", "qwen3_vl"])
def test_output_attentions_over_the_extended_sequence(backbone):
    """With eager attention, output_attentions gives every layer's probabilities over the extended sequence (the
    user's tokens with each image's M compression tokens after it): rows are distributions, and the bottleneck shows:
    the text after an image gives its visual tokens zero attention and the compression tokens some; generate()
    returns them for the prefill and gives the tokens of the default path."""
    _, model, inputs = _assisted_pair(backbone)
    model.set_attn_implementation("eager")
    batch, length = inputs["input_ids"].shape
    m = model.etc.config.num_compression_tokens
    visual = model._visual_token_mask(inputs["input_ids"])[0]
    first, last = int(visual.nonzero().min()), int(visual.nonzero().max())
    with torch.no_grad():
        out = model(**inputs, output_attentions=True, use_cache=False)
        assert len(out.attentions) == model.config.get_text_config().num_hidden_layers
        for probs in out.attentions:
            assert probs.shape[0] == batch and probs.shape[2:] == (length + m, length + m)  # one image per row
            text = probs[0, :, last + 1 + m :]  # the text after the image (extended positions)
            torch.testing.assert_close(text.sum(-1), torch.ones_like(text.sum(-1)), atol=1e-5, rtol=0)
            assert float(text[..., first : last + 1].abs().max()) == 0.0  # the visual tokens: never
            assert float(text[..., last + 1 : last + 1 + m].sum()) > 0  # the compression tokens: yes
        settings = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        with_attentions = model.generate(**inputs, output_attentions=True, **settings)
        assert torch.equal(with_attentions.sequences, model.generate(**inputs, **settings).sequences)
        assert with_attentions.attentions[0][0].shape[2:] == (length + m, length + m)


@pytest.mark.parametrize("backbone", ["llava", "qwen3_vl"])
def test_sampling_modes_and_scores_match_the_uncached_oracle(backbone):
    """Beam search with sampling and plain sampling give, for one seed, the sequences of generate(use_cache=False)
    (which re-runs the masked single pass over the growing sequence); return_dict_in_generate's scores of the first
    step are the masked pass's last logits."""
    _, model, inputs = _assisted_pair(backbone)
    with torch.no_grad():
        for settings in (dict(num_beams=3, do_sample=True), dict(do_sample=True, top_k=5)):
            torch.manual_seed(0)
            cached = model.generate(**inputs, max_new_tokens=STEPS, **settings)
            torch.manual_seed(0)
            uncached = model.generate(**inputs, max_new_tokens=STEPS, use_cache=False, **settings)
            assert torch.equal(cached, uncached), settings
        out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
                             output_scores=True)  # fmt: skip
        masked = model(**inputs, use_cache=False).logits[:, -1]
    assert len(out.scores) == STEPS
    torch.testing.assert_close(out.scores[0], masked, atol=1e-5, rtol=0)


def test_generate_with_a_compiled_language_model():
    """torch.compile on the language model only: the same tokens as eager, and a second generate() of the same
    prompt compiles nothing new."""
    import torch._dynamo

    model = llava_model()
    inputs, _ = llava_helpers.make_batch([[2, "I", 5]])
    settings = dict(max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        eager = model.generate(**inputs, **settings)
        language_model = model.model.language_model
        torch._dynamo.reset()
        language_model.forward = torch.compile(language_model.forward, dynamic=True)
        try:
            compiled = model.generate(**inputs, **settings)
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            again = model.generate(**inputs, **settings)
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # no recompilation
        finally:
            del language_model.forward  # back to the class's forward
            torch._dynamo.reset()
    assert torch.equal(compiled, eager) and torch.equal(again, eager)


def _compile_counters():
    """dynamo's graph count and the reasons of its graph breaks so far."""
    counters = torch._dynamo.utils.counters
    return counters["stats"]["unique_graphs"], [reason.splitlines()[0] for reason in counters["graph_break"]]


@pytest.mark.parametrize("backbone, backend", [("llava", "inductor"), ("qwen3_vl", "eager")])
def test_a_compiled_model_keeps_etc_dispatch_out_of_its_graphs(backbone, backend):
    """torch.compile on the whole ETC model: ETC's data-dependent dispatch (image spans, layouts, the choice of
    passes) runs outside the compiled region, so dynamo breaks the graph only where ETC's dispatch starts
    (`torch.compiler.disable`) and compiles the language-model passes: a handful of graphs, forward's logits and
    loss and generate()'s tokens equal eager's, and a second call with the same shapes compiles nothing new.
    (Qwen3-VL compiles with the "eager" backend, which traces alike but skips code generation, to stay quick.)"""
    import torch._dynamo

    _, model, inputs = _assisted_pair(backbone)
    labels = torch.where(torch.arange(inputs["input_ids"].shape[1]) >= inputs["input_ids"].shape[1] - 2,
                         inputs["input_ids"], -100)  # fmt: skip
    settings = dict(max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        eager = model(**inputs, labels=labels, use_cache=False)
        eager_tokens = model.generate(**inputs, **settings)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()  # reset() keeps them
        try:
            compiled = torch.compile(model, backend=backend)
            first = compiled(**inputs, labels=labels, use_cache=False)
            graphs, breaks = _compile_counters()
            again = compiled(**inputs, labels=labels, use_cache=False)
            assert _compile_counters()[0] == graphs  # no recompilation
            model.compile(backend=backend)  # in place: generate() calls the compiled model
            tokens = model.generate(**inputs, **settings)
            generate_graphs, breaks = _compile_counters()
            assert torch.equal(model.generate(**inputs, **settings), eager_tokens)
            assert _compile_counters()[0] == generate_graphs  # no recompilation
        finally:
            model._compiled_call_impl = None  # back to eager
            torch._dynamo.reset()
    for output in (first, again):
        torch.testing.assert_close(output.logits, eager.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(output.loss, eager.loss, atol=1e-5, rtol=0)
    assert torch.equal(tokens, eager_tokens)
    # Breaks only where ETC's dispatch starts, never inside it (before: .item(), nonzero, bincount, 28 graphs for
    # LLaVA's generate()). Qwen3-VL's text model breaks at DeepStack's `hidden_states[visual_pos_masks]` (a
    # data-dependent shape, in transformers' own code, with or without ETC).
    allowed = {"Skip inlining `torch.compiler.disable()`d function"}
    if backbone == "qwen3_vl":
        allowed.add("Dynamic shape operator")
    assert breaks and set(breaks) <= allowed, breaks
    if backbone == "llava":  # forward: the language model and the logits' slice; generate(): 2 prefill passes, decoding
        assert graphs <= 2 and generate_graphs - graphs <= 4, (graphs, generate_graphs)
