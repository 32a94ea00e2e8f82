"""Training-free baselines (etc_ext.baselines) on a tiny random Qwen3-VL (conftest's: real Qwen3VLConfig, DeepStack
into both LLM layers, M-RoPE), CPU, fp32. References: the unpatched model at K = N, and the unpatched model on a prompt
whose images have K placeholders, given the reduced features (with their DeepStack features) and the positions of the
tokens they stand for, reduced here by independent code (eager attention weights, float64 vision attention)."""

import copy

import pytest
import torch
from conftest import IMAGE, VIDEO, assert_generate_matches_forward_loop, qwen3_vl_batch, tiny_qwen3_vl
from transformers.models.qwen3_vl.modeling_qwen3_vl import (
    BaseModelOutputWithDeepstackFeatures,
    apply_rotary_pos_emb_vision,
)

import etc_ext  # noqa: F401  (loads the ops)
from etc_ext.baselines import (
    METHODS,
    BaselineQwen3VLForConditionalGeneration,
    apply_baseline,
    cache_visual_entries,
    remove_baseline,
)
from etc_ext.compress import ETCCache

# Units of one size (16 tokens, a 4 x 4 grid each) so that K = N fits all: two rows with images, one with a video.
EQUAL = [[3, ("I", 8, 8), 4], [2, ("I", 8, 8), 1, ("I", 8, 8), 3]]
EQUAL_VIDEO = [[2, ("V", 2, 8, 8), 3], [4, ("I", 8, 8), 2]]
N = 16
# Images of different grids: 4 x 4, 4 x 6 and 6 x 4 tokens.
MIXED = [[3, ("I", 8, 8), 4], [2, ("I", 8, 12), 1, ("I", 12, 8), 3]]
MIXED_GRIDS = [(4, 4), (4, 6), (6, 4)]

FULL_BUDGET = {
    "mean": ("mean", {}),
    "subsample": ("subsample", {}),
    "fastv": ("fastv", {}),
    "fastv_layer_1_instruction": ("fastv", {"layer": 1, "query": "instruction"}),
    "visionzip_dominant_only": ("visionzip", {"dominant": N}),
    "instruction_merge": ("instruction_merge", {}),
    "instruction_merge_similarity": ("instruction_merge", {"grouping": "similarity"}),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


def visual(input_ids):
    return (input_ids == IMAGE) | (input_ids == VIDEO)


# ============================================================================ K = N
@pytest.mark.parametrize("rows", [EQUAL, EQUAL_VIDEO], ids=["images", "video"])
@pytest.mark.parametrize("case", FULL_BUDGET)
def test_full_budget_reproduces_the_unpatched_model(case, rows):
    model = tiny_qwen3_vl()
    original = copy.deepcopy(model)
    inputs, _, units = qwen3_vl_batch(rows)
    real = inputs["attention_mask"].bool()
    method, options = FULL_BUDGET[case]
    with torch.no_grad():
        reference = original(**inputs).logits
        reference_generation = original.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert apply_baseline(model, method, N, **options) is model
        assert isinstance(model, BaselineQwen3VLForConditionalGeneration)
        out = model(**inputs)
        prefill = model(**inputs, use_cache=True)
        generation = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(out.logits[real], reference[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(prefill.logits[real], reference[real], atol=1e-5, rtol=0)
    assert torch.equal(generation, reference_generation)
    assert isinstance(prefill.cache, ETCCache)
    assert cache_visual_entries(prefill.cache).tolist() == [N * len(u) for u in units]
    assert prefill.cache.etc_state.attention_mask.sum(-1).tolist() == real.sum(-1).tolist()


# ============================================================================ references on a short prompt
def user_positions(model, inputs):
    positions, _ = model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )  # fmt: skip
    return positions  # (3, B, L)


def unit_features(model, inputs):
    """Per image: its tokens `(n, H)` and DeepStack features `(n, layers, H)` from the unpatched tower."""
    with torch.no_grad():
        encoded = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    deepstack = [torch.stack([layer[i] for layer in encoded.deepstack_features], 1) for i in range(len(MIXED_GRIDS))]
    return list(encoded.pooler_output), deepstack


def short_prompt_logits(model, inputs, rows, k, reduced):
    """The unpatched model on `rows` with k placeholders per image, given `reduced` (per image `(features (k, H),
    deepstack (k, layers, H), sources (k,))`): the images' entries at the positions of their source tokens, the text
    at its own. Returns the logits at the text tokens, in order."""
    side = {4: 4, 1: 2, 16: 8}[k]  # an image of side x side patches has k tokens
    short_rows = [[s if isinstance(s, int) else ("I", side, side) for s in row] for row in rows]
    short, _, _ = qwen3_vl_batch(short_rows)
    full_positions = user_positions(model, inputs)
    positions = torch.zeros(3, *short["input_ids"].shape, dtype=torch.long)
    image = 0
    for b in range(len(rows)):
        full_cols = inputs["attention_mask"][b].nonzero().flatten().tolist()
        short_cols = short["attention_mask"][b].nonzero().flatten().tolist()
        taken, i = [], 0
        while i < len(full_cols):
            col = full_cols[i]
            if inputs["input_ids"][b, col] == IMAGE:
                n = int(visual(inputs["input_ids"][b, col:]).long().cumprod(0).sum())
                taken += [col + int(s) for s in reduced[image][2]]
                image += 1
                i += n
            else:
                taken.append(col)
                i += 1
        assert len(taken) == len(short_cols)
        positions[:, b, short_cols] = full_positions[:, b, taken]
    encoded = BaseModelOutputWithDeepstackFeatures(
        pooler_output=[r[0] for r in reduced],
        deepstack_features=[[r[1][:, layer] for r in reduced] for layer in range(reduced[0][1].shape[1])],
    )
    with torch.no_grad():
        logits = model(
            input_ids=short["input_ids"], attention_mask=short["attention_mask"], position_ids=positions,
            mm_encoder_outputs={"image": encoded},
        ).logits  # fmt: skip
    return logits[short["attention_mask"].bool() & ~visual(short["input_ids"])]


def text_logits(logits, inputs):
    return logits[inputs["attention_mask"].bool() & ~visual(inputs["input_ids"])]


def cell_means(x, grid, k_grid):
    """`(n, ...)` tokens on `grid` averaged over the `k_grid` cells (cells of equal size), row-major."""
    (gh, gw), (kh, kw) = grid, k_grid
    cells = x.reshape(kh, gh // kh, kw, gw // kw, *x.shape[1:])
    return cells.mean(dim=(1, 3)).reshape(kh * kw, *x.shape[1:])


def cell_centres(grid, k_grid):
    (gh, gw), (kh, kw) = grid, k_grid
    rows = [(2 * i + 1) * gh // (2 * kh) for i in range(kh)]
    cols = [(2 * j + 1) * gw // (2 * kw) for j in range(kw)]
    return torch.tensor([r * gw + c for r in rows for c in cols])


@pytest.mark.parametrize("method", ["mean", "subsample"])
def test_mean_and_subsample_equal_the_model_on_a_prompt_with_k_image_tokens(method):
    k = 4
    model = tiny_qwen3_vl()
    original = copy.deepcopy(model)
    inputs, _, _ = qwen3_vl_batch(MIXED)
    features, deepstack = unit_features(original, inputs)
    reduced = []
    for x, d, grid in zip(features, deepstack, MIXED_GRIDS):
        centres = cell_centres(grid, (2, 2))
        if method == "mean":
            reduced.append((cell_means(x, grid, (2, 2)), cell_means(d, grid, (2, 2)), centres))
        else:
            reduced.append((x[centres], d[centres], centres))
    expected = short_prompt_logits(original, inputs, MIXED, k, reduced)
    apply_baseline(model, method, k)
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.testing.assert_close(text_logits(logits, inputs), expected, atol=1e-5, rtol=0)


def eager_importance(model, inputs, layer):
    """Per image: the attention of the text after it (its row's real non-visual tokens) on its visual tokens at
    decoder layer `layer - 1`, from eager attention weights, averaged over heads and queries."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = eager(**inputs, output_attentions=True).attentions[layer - 1]  # (B, heads, L, L)
    input_ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    importance = []
    for b in range(input_ids.shape[0]):
        cols = visual(input_ids[b]).nonzero().flatten().tolist()
        starts = [c for c in cols if c - 1 not in cols]
        for start in starts:
            end = start + int(visual(input_ids[b, start:]).long().cumprod(0).sum())
            after = torch.arange(input_ids.shape[1]) >= end
            queries = (mask[b] & ~visual(input_ids[b]) & after).nonzero().flatten()
            importance.append(attentions[b][:, queries, start:end].double().mean(dim=(0, 1)))
    return importance


def test_instruction_merge_equals_an_eager_reference():
    k, layer = 4, 2
    model = tiny_qwen3_vl()
    original = copy.deepcopy(model)
    inputs, _, _ = qwen3_vl_batch(MIXED)
    features, deepstack = unit_features(original, inputs)
    reduced = []
    for x, d, grid, importance in zip(features, deepstack, MIXED_GRIDS, eager_importance(original, inputs, layer)):
        gh, gw = grid
        groups = (torch.arange(gh)[:, None] * 2 // gh * 2 + torch.arange(gw)[None] * 2 // gw).flatten()  # 2 x 2 cells
        weights = torch.stack([importance * (groups == g) for g in range(k)])  # (k, n)
        weights = (weights / weights.sum(-1, keepdim=True)).float()
        reduced.append((weights @ x, torch.einsum("kn,nlh->klh", weights, d), cell_centres(grid, (2, 2))))
    expected = short_prompt_logits(original, inputs, MIXED, k, reduced)
    apply_baseline(model, "instruction_merge", k, layer=layer)
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.testing.assert_close(text_logits(logits, inputs), expected, atol=1e-5, rtol=0)


def fastv_reference(model, inputs, k, layer, query):
    """FastV with eager attention: the top k visual tokens of each image by decoder layer `layer - 1`'s attention
    (queries: the last prompt token, or the text after the image); the others are masked out as keys from layer
    `layer` on. DeepStack's features are added at every visual position after their layers (a pruned token's no
    longer matters). Returns the logits and the keep mask."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        probs = eager(**inputs, output_attentions=True).attentions[layer - 1]  # (B, heads, L, L)
    keep = mask.bool() & ~visual(input_ids)
    for b in range(input_ids.shape[0]):
        cols = visual(input_ids[b]).nonzero().flatten().tolist()
        for start in [c for c in cols if c - 1 not in cols]:
            end = start + int(visual(input_ids[b, start:]).long().cumprod(0).sum())
            text = (mask[b].bool() & ~visual(input_ids[b])).nonzero().flatten()
            queries = mask[b].nonzero().flatten()[-1:] if query == "last" else text[text >= end]
            scores = probs[b][:, queries, start:end].mean(dim=(0, 1))
            keep[b, start + scores.topk(k).indices] = True
    features, deepstack = unit_features(eager, inputs)
    language_model = eager.model.language_model
    length = input_ids.shape[1]
    is_visual = visual(input_ids)
    with torch.no_grad():
        hidden = language_model.get_input_embeddings()(input_ids).masked_scatter(is_visual[..., None],
                                                                                 torch.cat(features))  # fmt: skip
        stacked = torch.cat(deepstack)  # (n_visual, layers, H)
        cos_sin = language_model.rotary_emb(hidden, user_positions(eager, inputs))
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        for index, decoder_layer in enumerate(language_model.layers):
            hidden_keys = ~keep[:, None, :] & (index >= layer)
            allowed = (causal & mask.bool()[:, None, :] & ~hidden_keys) | torch.eye(length, dtype=torch.bool)
            additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
            hidden = decoder_layer(hidden, attention_mask=additive, position_embeddings=cos_sin)
            if index < stacked.shape[1]:
                hidden = hidden.clone()
                hidden[is_visual] += stacked[:, index]
        logits = eager.lm_head(language_model.norm(hidden))
    return logits, keep


@pytest.mark.parametrize("query", ["last", "instruction"])
def test_fastv_equals_an_eager_reference(query):
    """Pruning after layer 0: DeepStack's layer-1 features must reach the kept visual tokens in the pruned pass."""
    k, layer = 4, 1
    model = tiny_qwen3_vl()
    original = copy.deepcopy(model)
    inputs, _, _ = qwen3_vl_batch(MIXED)
    expected, keep = fastv_reference(original, inputs, k, layer, query)
    apply_baseline(model, "fastv", k, layer=layer, query=query)
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.testing.assert_close(logits[keep], expected[keep], atol=1e-5, rtol=0)


def visionzip_reference(model, inputs, k):
    """VisionZip without [CLS], in float64 from the last vision block's input: dominant tokens = the most attended
    (attention received, averaged over heads and queries, summed over each token's 4 patches); contextual (k = 4: one)
    = the first remaining token plus the mean of the others (one target: every other token joins it)."""
    tower = model.model.visual
    attention = tower.blocks[-1].attn
    captured = {}

    def hook(_module, args, kwargs):
        captured.update(hidden=args[0] if args else kwargs["hidden_states"], cu=kwargs["cu_seqlens"],
                        cos_sin=kwargs["position_embeddings"])  # fmt: skip

    handle = attention.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        features, deepstack = unit_features(model, inputs)
    finally:
        handle.remove()
    hidden, cu = captured["hidden"], captured["cu"].tolist()
    with torch.no_grad():
        q, key, _ = attention.qkv(hidden).reshape(hidden.shape[0], 3, attention.num_heads, -1).permute(1, 0, 2, 3)
        q, key = apply_rotary_pos_emb_vision(q, key, *captured["cos_sin"])
    reduced = []
    for i, (x, d) in enumerate(zip(features, deepstack)):
        qi, ki = q[cu[i] : cu[i + 1]].double().transpose(0, 1), key[cu[i] : cu[i + 1]].double().transpose(0, 1)
        probs = torch.softmax(qi @ ki.transpose(1, 2) * attention.scaling, dim=-1)  # (heads, P, P)
        received = probs.mean(dim=(0, 1)).view(-1, 4).sum(-1)  # (n,)
        dominant = received.topk(k - 1).indices.sort().values
        rest = [j for j in range(x.shape[0]) if j not in dominant.tolist()]
        target, members = rest[0], rest[1:]
        sources = torch.cat([dominant, torch.tensor([target])])
        tokens = torch.cat([x[dominant], (x[target] + x[members].mean(0))[None]])
        extras = torch.cat([d[dominant], (d[target] + d[members].mean(0))[None]])
        reduced.append((tokens, extras, sources))
    return reduced


def test_visionzip_without_cls_matches_a_reference():
    k = 4
    model = tiny_qwen3_vl()
    original = copy.deepcopy(model)
    inputs, _, _ = qwen3_vl_batch(MIXED)
    reduced = visionzip_reference(original, inputs, k)
    expected = short_prompt_logits(original, inputs, MIXED, k, reduced)
    apply_baseline(model, "visionzip", k)
    assert model.baseline.config.keep_cls is False  # resolved against a tower without [CLS]
    with torch.no_grad():
        logits = model(**inputs).logits
        copied = copy.deepcopy(model)(**inputs).logits  # the hooks follow the copy
    torch.testing.assert_close(text_logits(logits, inputs), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(copied, logits)


# ============================================================================ K < N: cache, decoding, batches
@pytest.mark.parametrize("method", ["mean", "subsample", "visionzip"])
def test_generate_matches_a_forward_loop_when_the_compression_ignores_the_text(method):
    model = apply_baseline(tiny_qwen3_vl(), method, 4)
    inputs, _, _ = qwen3_vl_batch(MIXED)
    assert_generate_matches_forward_loop(model, inputs, 4, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_cache_holds_num_tokens_visual_entries_per_unit(method):
    k = 4
    rows = [[2, ("V", 2, 8, 8), 3], [2, ("I", 8, 12), 1, ("I", 12, 8), 3]]
    model = apply_baseline(tiny_qwen3_vl(), method, k)
    inputs, _, units = qwen3_vl_batch(rows)
    real = inputs["attention_mask"].sum(-1)
    with torch.no_grad():
        prefill = model(**inputs, use_cache=True)
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    dropped = torch.tensor([sum(n - k for n in u) for u in units])
    assert cache_visual_entries(prefill.cache).tolist() == [k * len(u) for u in units]
    assert prefill.cache.etc_state.attention_mask.sum(-1).tolist() == (real - dropped).tolist()
    length = prefill.cache.get_seq_length()
    assert length == int((real - dropped).max())
    assert cache_visual_entries(out.cache).tolist() == [k * len(u) for u in units]
    assert all(layer.keys.shape[2] == length + 2 for layer in out.cache.layers)


def row_alone(inputs, b):
    """Row `b` of a left-padded image batch, without padding, with its own images' patches."""
    real = inputs["attention_mask"][b].bool()
    grids = inputs["image_grid_thw"]
    counts = [int(visual(inputs["input_ids"][r]).sum()) for r in range(inputs["input_ids"].shape[0])]
    per_image = (grids.prod(-1) // 4).tolist()
    images, total = [], 0
    for i, n in enumerate(per_image):  # images fill the rows in order
        row = next(r for r in range(len(counts)) if total < sum(counts[: r + 1]))
        if row == b:
            images.append(i)
        total += n
    patches = inputs["pixel_values"].split(grids.prod(-1).tolist())
    return {
        "input_ids": inputs["input_ids"][b : b + 1, real],
        "attention_mask": inputs["attention_mask"][b : b + 1, real],
        "mm_token_type_ids": inputs["mm_token_type_ids"][b : b + 1, real],
        "pixel_values": torch.cat([patches[i] for i in images]),
        "image_grid_thw": grids[images],
    }


@pytest.mark.parametrize("method", METHODS)
def test_left_padded_batch_equals_its_rows_alone(method):
    model = apply_baseline(tiny_qwen3_vl(), method, 4)
    inputs, _, _ = qwen3_vl_batch(MIXED)
    assert bool((inputs["attention_mask"][:, 0] == 0).any())
    length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        batch = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                               output_logits=True)  # fmt: skip
        for b in range(2):
            single = row_alone(inputs, b)
            out = model.generate(**single, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                                 output_logits=True)  # fmt: skip
            assert torch.equal(out.sequences[0, -3:], batch.sequences[b, length:])
            for step in range(3):
                torch.testing.assert_close(out.logits[step][0], batch.logits[step][b], atol=1e-5, rtol=0)


def greedy(model, **inputs):
    return model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                          output_logits=True)  # fmt: skip


@pytest.mark.parametrize("method", METHODS)
def test_follow_up_question_continues_the_compressed_cache(method):
    """A follow-up question is answered from the first question's compressed cache (FastV-style keeps the tokens it
    picked for the first question): generate() over the whole conversation with that cache equals one-token steps
    on it; for a method that ignores the text, also a fresh generate() of the whole conversation."""
    model = apply_baseline(tiny_qwen3_vl(), method, 4)
    turn1, _, _ = qwen3_vl_batch(MIXED)
    follow_up = torch.randint(3, 100, (2, 4), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        answer1 = greedy(model, **turn1)
        conversation = torch.cat([answer1.sequences, follow_up], dim=1)
        mask = torch.cat([turn1["attention_mask"], torch.ones(2, 3 + 4, dtype=torch.long)], dim=1)
        inputs = dict(turn1, input_ids=conversation, attention_mask=mask, mm_token_type_ids=visual(conversation).long())
        cache = copy.deepcopy(answer1.cache)
        covered = cache.etc_state.covered_length(cache.get_seq_length())
        for column in range(covered, conversation.shape[1]):  # the oracle: one token at a time
            out = model(input_ids=conversation[:, column : column + 1], attention_mask=mask[:, : column + 1],
                        cache=cache)  # fmt: skip
        continued = greedy(model, **inputs, cache=answer1.cache)
        fresh = greedy(model, **inputs)
    torch.testing.assert_close(continued.logits[0], out.logits[:, -1], atol=1e-4, rtol=0)
    if not model.baseline.implementation.reduces_while_encoding:
        return  # the question-aware methods chose their tokens for the first question
    assert torch.equal(continued.sequences, fresh.sequences)
    for a, b in zip(continued.logits, fresh.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_compression_changes_the_answer_logits():
    """K < N is not the unpatched model (the tests above could not pass with the baseline ignored)."""
    model = tiny_qwen3_vl()
    inputs, _, _ = qwen3_vl_batch(MIXED)
    with torch.no_grad():
        reference = text_logits(model(**inputs).logits, inputs)
        for method in METHODS:
            apply_baseline(model, method, 1, **({"layer": 1} if method == "fastv" else {}))  # layer 2: the cache only
            assert (text_logits(model(**inputs).logits, inputs) - reference).abs().max() > 1e-3, method
            remove_baseline(model)
        assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
        torch.testing.assert_close(text_logits(model(**inputs).logits, inputs), reference)


def test_bad_arguments_raise_clear_errors():
    inputs, _, _ = qwen3_vl_batch(MIXED)
    with pytest.raises(ValueError, match=r"keep_cls=True needs a vision tower with a \[CLS\] token"):
        apply_baseline(tiny_qwen3_vl(), "visionzip", 4, keep_cls=True)
    model = apply_baseline(tiny_qwen3_vl(), "mean", 17)  # more than the 4 x 4 image's 16 tokens
    with pytest.raises(ValueError, match=r"image 0 \(16 tokens, 4 x 4 grid\): num_tokens=17 is larger"):
        model(**inputs)
    model = apply_baseline(tiny_qwen3_vl(), "mean", 5)  # no 1 x 5 / 5 x 1 layout on a 4 x 4 grid
    with pytest.raises(ValueError, match="cannot be laid out as a kh x kw grid within the 4x4 patch grid"):
        model(**inputs)
    model = apply_baseline(tiny_qwen3_vl(), "fastv", 4)
    without_types = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    with pytest.raises(ValueError, match="needs mm_token_type_ids"):
        model(**without_types)
    with pytest.raises(NotImplementedError, match="output_hidden_states is not supported"):
        model(**inputs, output_hidden_states=True)
    original = tiny_qwen3_vl()
    model = apply_baseline(copy.deepcopy(original), "visionzip", 4)
    with torch.no_grad():  # features encoded by another model: no attention was recorded for them
        encoded = original.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    without_pixels = {k: v for k, v in inputs.items() if k != "pixel_values"}
    with pytest.raises(RuntimeError, match="0 encodings of the vision tower were recorded, expected 1"):
        model(**without_pixels, mm_encoder_outputs={"image": encoded})
