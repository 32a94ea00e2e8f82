"""Training-free baselines (etc_ext.baselines) on a tiny random LLaVA-1.5 (real LlavaConfig / CLIPVisionConfig /
LlamaConfig classes), CPU, fp32. References use eager attention with output_attentions, or the unpatched model on a
prompt that has K image tokens per image."""

import copy

import pytest
import torch
from conftest import assert_generate_matches_forward_loop, llava_batch
from conftest import tiny_llava as shared_tiny_llava
from transformers import LlavaForConditionalGeneration
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPooling

import etc_ext  # noqa: F401  (loads the ops)
from etc_ext.baselines import (
    METHODS,
    BaselineLlavaForConditionalGeneration,
    apply_baseline,
    cache_visual_entries,
    grid_shape,
    remove_baseline,
    subsample_index,
    visionzip_split,
)
from etc_ext.cache import compact_dynamic_cache
from etc_ext.compress import ETCCache
from etc_ext.config import ETCConfig
from etc_ext.models.llava import apply_etc

IMAGE = 99  # image token id
IMAGE_SIZE, PATCH = 16, 4
SIDE = IMAGE_SIZE // PATCH
N = SIDE * SIDE  # 16 visual tokens per image (4 x 4)

CHAT = [[2, "I", 3], [2, "I", 6]]  # same prefix, questions of different lengths: left padding
MIXED = [[2, "I", 3], [1, "I", 2, "I", 4]]  # rows with one and two images


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


def tiny_llava(num_layers=3, image_size=IMAGE_SIZE, patch=PATCH, seed=0, strategy="default"):
    """conftest's tiny LLaVA with this file's defaults (3 layers)."""
    return shared_tiny_llava(
        num_layers=num_layers, image_size=image_size, patch=patch, seed=seed, strategy=strategy,
        image_token_id=IMAGE, max_position_embeddings=512,
    )  # fmt: skip


def make_batch(rows, image_tokens=N, padding_side="left", seed=1, image_size=IMAGE_SIZE):
    """conftest's `llava_batch` with this file's sizes: the inputs only."""
    inputs, _ = llava_batch(
        rows, image_tokens=image_tokens, image_size=image_size, padding_side=padding_side, seed=seed,
        pixel_seed=seed + 7,
    )  # fmt: skip
    return inputs


def positions(attention_mask):
    """Padding-aware positions, as generate() makes them (the unpatched forward would count padding)."""
    return (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def image_spans(input_ids, image_tokens=N):
    """[(row, start, end)] of each image, in order."""
    spans = []
    for b in range(input_ids.shape[0]):
        cols = (input_ids[b] == IMAGE).nonzero().flatten().tolist()
        for k in range(0, len(cols), image_tokens):
            spans.append((b, cols[k], cols[k] + image_tokens))
    return spans


def text_logits(logits, input_ids, attention_mask):
    """The logits at the real text tokens, in order: comparable between a prompt and its shortened version."""
    return logits[attention_mask.bool() & (input_ids != IMAGE)]


def short_prompt_logits(model, rows, image_tokens, features):
    """The unpatched model on the same rows with `image_tokens` placeholders per image, given those features."""
    batch = make_batch(rows, image_tokens=image_tokens)
    encoded = BaseModelOutputWithPooling(pooler_output=list(features))
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=positions(batch["attention_mask"]),
            mm_encoder_outputs={"image": encoded},
        ).logits
    return text_logits(logits, batch["input_ids"], batch["attention_mask"]), batch


def image_features(model, pixel_values):
    with torch.no_grad():
        return torch.stack(model.model.get_image_features(pixel_values=pixel_values).pooler_output)  # (I, N, H)


# Every method, with the options under which K = N is the identity (visionzip's [CLS] and merged tokens otherwise).
FULL_BUDGET = {
    "mean": ("mean", {}),
    "subsample": ("subsample", {}),
    "fastv": ("fastv", {}),
    "fastv_instruction": ("fastv", {"query": "instruction"}),
    "visionzip_patches_only": ("visionzip", {"dominant": N, "keep_cls": False}),
    "instruction_merge": ("instruction_merge", {}),
    "instruction_merge_similarity": ("instruction_merge", {"grouping": "similarity"}),
}


# ============================================================================ K = N
@pytest.mark.parametrize("case", FULL_BUDGET)
def test_full_budget_reproduces_the_unpatched_model(case):
    model = tiny_llava()
    original = copy.deepcopy(model)
    inputs = make_batch(MIXED)
    mask = inputs["attention_mask"]
    real = mask.bool()
    right = make_batch(MIXED, padding_side="right")
    right_real = right["attention_mask"].bool()
    with torch.no_grad():
        reference = original(**inputs, position_ids=positions(mask)).logits
        right_reference = original(**right).logits
        reference_generation = original.generate(**inputs, max_new_tokens=4, do_sample=False)
        method, options = FULL_BUDGET[case]
        assert apply_baseline(model, method, N, **options) is model
        assert isinstance(model, BaselineLlavaForConditionalGeneration)
        out = model(**inputs)
        right_out = model(**right)
        prefill = model(**inputs, use_cache=True)
        generation = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(out.logits[real], reference[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(right_out.logits[right_real], right_reference[right_real], atol=1e-5, rtol=0)
    torch.testing.assert_close(prefill.logits[real], reference[real], atol=1e-5, rtol=0)
    assert torch.equal(generation, reference_generation)
    # Nothing was dropped: every real prompt token has its entry, N visual ones per image.
    assert isinstance(prefill.cache, ETCCache)
    assert cache_visual_entries(prefill.cache).tolist() == [N, 2 * N]
    assert prefill.cache.etc_state.attention_mask.sum(-1).tolist() == real.sum(-1).tolist()


# ============================================================================ K < N: the cache
@pytest.mark.parametrize("method", METHODS)
def test_cache_holds_num_tokens_visual_entries_per_image(method):
    k = 4
    model = apply_baseline(tiny_llava(), method, k)
    inputs = make_batch(MIXED)
    real = inputs["attention_mask"].sum(-1)
    with torch.no_grad():
        prefill = model(**inputs, use_cache=True)
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    images = torch.tensor([1, 2])
    cache = prefill.cache
    assert cache_visual_entries(cache).tolist() == (k * images).tolist()
    assert cache.etc_state.attention_mask.sum(-1).tolist() == (real - images * (N - k)).tolist()
    length = cache.get_seq_length()
    assert length == int((real - images * (N - k)).max())  # right-aligned: the longest row has no padding
    assert all(layer.keys.shape[2] == length and layer.values.shape[2] == length for layer in cache.layers)
    # generate() decodes from such a cache: 2 more entries for the 2 tokens fed back.
    assert cache_visual_entries(out.cache).tolist() == (k * images).tolist()
    assert all(layer.keys.shape[2] == length + 2 for layer in out.cache.layers)
    assert out.sequences.shape == (2, inputs["input_ids"].shape[1] + 3)


# ============================================================================ against references
@pytest.mark.parametrize("method", ["mean", "subsample"])
def test_mean_and_subsample_equal_the_model_on_a_prompt_with_k_image_tokens(method):
    k = 4  # 2 x 2 on the 4 x 4 grid
    model = tiny_llava()
    original = copy.deepcopy(model)
    inputs = make_batch(CHAT)
    features = image_features(original, inputs["pixel_values"])  # (I, 16, H)
    grid = features.view(-1, SIDE, SIDE, features.shape[-1])
    if method == "mean":  # the four 2 x 2 blocks, row-major
        reduced = torch.stack(
            [grid[:, r : r + 2, c : c + 2].mean(dim=(1, 2)) for r in (0, 2) for c in (0, 2)], dim=1
        )
    else:  # the cell centres (1, 1), (1, 3), (3, 1), (3, 3)
        reduced = features[:, [5, 7, 13, 15]]
    expected, short = short_prompt_logits(original, CHAT, k, reduced)
    apply_baseline(model, method, k)
    with torch.no_grad():
        torch.testing.assert_close(model.get_image_features(inputs["pixel_values"]).pooler_output[0], reduced[0])
        logits = model(**inputs).logits
        generation = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        short_generation = original.generate(
            input_ids=short["input_ids"], attention_mask=short["attention_mask"], max_new_tokens=4, do_sample=False,
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=list(reduced))},
        )  # fmt: skip
    torch.testing.assert_close(text_logits(logits, inputs["input_ids"], inputs["attention_mask"]), expected,
                               atol=1e-5, rtol=0)  # fmt: skip
    assert torch.equal(generation[:, -4:], short_generation[:, -4:])


def visionzip_reference(model, pixel_values, dominant, contextual):
    """VisionZip's CLIPVisionTower_VisionZip.forward (dvlab-research/VisionZip, visionzip/clip_encoder.py), on eager
    attention weights, then LLaVA's projector: `(I, dominant + contextual, H)`."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    tower = eager.model.vision_tower
    with torch.no_grad():
        outs = tower(pixel_values, output_hidden_states=True, output_attentions=True)
        attn_weights = outs.attentions[-2]
        hidden_states = outs.hidden_states[-2]
        layer = tower.encoder.layers[-2]  # the metric: that layer's keys averaged over heads
        keys = layer.self_attn.k_proj(layer.layer_norm1(outs.hidden_states[-3]))
        metric = keys.view(*keys.shape[:2], layer.self_attn.num_heads, -1).transpose(1, 2).mean(1)
        dominant_num, contextual_num = dominant - 1, contextual
        # ---- VisionZip's code from here (dominant includes the CLS token)
        cls_idx = 0
        cls_attention = attn_weights[:, :, cls_idx, cls_idx + 1 :]
        cls_attention_sum = cls_attention.sum(dim=1)
        topk_indices = cls_attention_sum.topk(dominant_num, dim=1).indices + 1
        all_indices = torch.cat([torch.zeros((hidden_states.shape[0], 1), dtype=topk_indices.dtype), topk_indices], 1)
        mask = torch.ones_like(hidden_states[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
        dominant_tokens = hidden_states.masked_select(~mask.unsqueeze(-1)).view(
            hidden_states.shape[0], dominant_num + 1, hidden_states.shape[2]
        )
        parts = [dominant_tokens]
        if contextual_num > 0:
            metric_filtered = metric[mask].view(hidden_states.shape[0], hidden_states.shape[1] - (dominant_num + 1),
                                                metric.shape[2])  # fmt: skip
            hidden_states_filtered = hidden_states.masked_select(mask.unsqueeze(-1)).view(
                hidden_states.shape[0], hidden_states.shape[1] - (dominant_num + 1), hidden_states.shape[2]
            )
            metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
            step = max(1, metric_normalized.shape[1] // contextual_num)
            target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual_num]
            target_tokens = metric_normalized[:, target_indices, :]
            others = ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices)
            tokens_to_merge = metric_normalized[:, others, :]
            similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
            assign_one_hot = torch.zeros(tokens_to_merge.shape[0], tokens_to_merge.shape[1], contextual_num)
            assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
            counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
            hidden_to_merge = hidden_states_filtered[:, others, :]
            aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), hidden_to_merge) / counts
            target_hidden = hidden_states_filtered[:, target_indices, :]
            parts.append(target_hidden + aggregated_hidden)
        hidden_states_save = torch.cat(parts, dim=1)
        # ---- LLaVA's projector
        return eager.model.multi_modal_projector(hidden_states_save)


@pytest.mark.parametrize("k", [1, 4, 9, N])
def test_visionzip_matches_its_reference_code(k):
    model = tiny_llava()
    original = copy.deepcopy(model)
    inputs = make_batch(CHAT)
    dominant, contextual = visionzip_split(k)
    expected = visionzip_reference(original, inputs["pixel_values"], dominant, contextual)  # (I, K, H)
    apply_baseline(model, "visionzip", k)
    with torch.no_grad():
        reduced = torch.stack(model.get_image_features(inputs["pixel_values"]).pooler_output)
        logits = model(**inputs).logits
    torch.testing.assert_close(reduced, expected, atol=1e-5, rtol=0)
    with torch.no_grad():  # a copy of the patched model has its own hooks and state
        copied = torch.stack(copy.deepcopy(model).get_image_features(inputs["pixel_values"]).pooler_output)
    torch.testing.assert_close(copied, expected, atol=1e-5, rtol=0)
    # The tower kept SDPA: the scores came from hooked q/k, not from attention weights.
    assert model.config.vision_config._attn_implementation == "sdpa"
    # And the language model reads exactly these tokens in place of the image.
    short_expected, _ = short_prompt_logits(original, CHAT, k, expected)
    torch.testing.assert_close(text_logits(logits, inputs["input_ids"], inputs["attention_mask"]), short_expected,
                               atol=1e-5, rtol=0)  # fmt: skip
    if k == N:  # documented: the [CLS] feature is a dominant token, so K = N is not the unpatched model
        assert contextual == 3 and not torch.allclose(reduced, image_features(original, inputs["pixel_values"]))


def eager_attention_scores(model, inputs, layer, query):
    """FastV's scores from output_attentions: the attention weights of decoder layer `layer - 1` on each image's
    visual tokens, averaged over heads and the query tokens ("last": the last prompt token; "instruction": the real
    text after the image). Returns [(row, start, end, scores (N,))] and the eager outputs."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    mask = inputs["attention_mask"]
    with torch.no_grad():
        out = eager(**inputs, position_ids=positions(mask), output_attentions=True, output_hidden_states=True)
    probs = out.attentions[layer - 1]  # (B, H, L, L)
    result = []
    for b, start, end in image_spans(inputs["input_ids"]):
        text = (mask[b].bool() & (inputs["input_ids"][b] != IMAGE)).nonzero().flatten()
        queries = mask[b].nonzero().flatten()[-1:] if query == "last" else text[text >= end]
        result.append((b, start, end, probs[b][:, queries, start:end].mean(dim=(0, 1))))
    return result, eager, out


def fastv_reference(model, inputs, k, layer, query, new_tokens=None):
    """FastV with eager attention: the visual tokens kept are the top k by `eager_attention_scores`; the others are
    masked out as keys from decoder layer `layer` on, and in every layer for tokens after the prompt (they read the
    compacted cache). Returns the logits of the prompt (plus `new_tokens`) and the bool keep mask of the prompt."""
    scores, eager, _ = eager_attention_scores(model, inputs, layer, query)
    input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
    prompt_length = input_ids.shape[1]
    keep = mask.bool() & (input_ids != IMAGE)
    for b, start, _end, score in scores:
        keep[b, start + score.topk(k).indices] = True
    if new_tokens is not None:
        input_ids = torch.cat([input_ids, new_tokens], dim=1)
        mask = torch.cat([mask, torch.ones_like(new_tokens)], dim=1)
        keep = torch.cat([keep, torch.ones_like(new_tokens, dtype=torch.bool)], dim=1)
    length = input_ids.shape[1]
    features = torch.cat(eager.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output)
    language_model = eager.model.language_model
    with torch.no_grad():
        hidden = language_model.get_input_embeddings()(input_ids)
        hidden = hidden.masked_scatter((input_ids == IMAGE)[..., None], features)
        position_ids = positions(mask)
        cos_sin = language_model.rotary_emb(hidden, position_ids=position_ids)
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        after_prompt = (torch.arange(length) >= prompt_length)[None, :, None]  # queries
        for index, decoder_layer in enumerate(language_model.layers):
            hidden_keys = ~keep[:, None, :] & (after_prompt | (index >= layer))  # (B, q, k)
            allowed = (causal & mask.bool()[:, None, :] & ~hidden_keys) | torch.eye(length, dtype=torch.bool)
            additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
            hidden = decoder_layer(
                hidden, attention_mask=additive, position_embeddings=cos_sin, position_ids=position_ids
            )
        logits = eager.lm_head(language_model.norm(hidden))
    return logits, keep[:, :prompt_length]


@pytest.mark.parametrize("layer, query", [(2, "last"), (1, "instruction"), (3, "last")])
def test_fastv_equals_an_eager_reference(layer, query):
    k = 5
    model = tiny_llava(num_layers=3)
    inputs = make_batch(MIXED)
    steps = 3
    original = copy.deepcopy(model)
    apply_baseline(model, "fastv", k, layer=layer, query=query)
    with torch.no_grad():
        logits = model(**inputs).logits
        out = model.generate(
            **inputs, max_new_tokens=steps, do_sample=False, return_dict_in_generate=True, output_logits=True
        )
    prompt_length = inputs["input_ids"].shape[1]
    expected, keep = fastv_reference(original, inputs, k, layer, query)
    # Every kept prompt token has the reference's logits (a pruned token the logits of the kept token before it).
    torch.testing.assert_close(logits[keep], expected[keep], atol=1e-5, rtol=0)
    new_tokens = out.sequences[:, prompt_length : prompt_length + steps - 1]
    expected, _ = fastv_reference(original, inputs, k, layer, query, new_tokens=new_tokens)
    for step in range(steps):
        torch.testing.assert_close(out.logits[step], expected[:, prompt_length - 1 + step], atol=1e-5, rtol=0)
    assert cache_visual_entries(out.cache).tolist() == [k, 2 * k]


def test_fastv_scores_use_the_chosen_layer():
    """The same inputs keep other tokens when the scores come from another layer (the test above can fail)."""
    model = tiny_llava(num_layers=3)
    inputs = make_batch(CHAT)
    keeps = []
    for layer in (1, 3):
        scores, _, _ = eager_attention_scores(model, inputs, layer, "last")
        keeps.append(torch.stack([s.topk(4).indices.sort().values for *_, s in scores]))
    assert not torch.equal(keeps[0], keeps[1])


def instruction_merge_reference(model, inputs, k, layer, grouping):
    """instruction_merge from eager attention weights: importance = attention of the text after the image on its
    visual tokens (heads and queries averaged); groups: the 2 x 2 cells of the grid (k = 4), or the k most important
    tokens as centres and the rest by cosine similarity of the layer's pre-RoPE keys; each group's importance-weighted
    mean. Returns `(I, k, H)`."""
    scores, eager, out = eager_attention_scores(model, inputs, layer, "instruction")
    features = image_features(eager, inputs["pixel_values"])  # (I, N, H)
    merged = []
    for i, (b, start, end, importance) in enumerate(scores):
        if grouping == "spatial":
            assert k == 4
            rows, cols = torch.arange(N) // SIDE, torch.arange(N) % SIDE
            groups = (rows // 2) * 2 + cols // 2
        else:
            attention = eager.model.language_model.layers[layer - 1]
            with torch.no_grad():
                keys = attention.self_attn.k_proj(attention.input_layernorm(out.hidden_states[layer - 1][b, start:end]))
            keys = keys.view(N, -1, attention.self_attn.head_dim).mean(1)
            keys = keys / keys.norm(dim=-1, keepdim=True)
            centres = importance.topk(k).indices.sort().values
            groups = (keys @ keys[centres].T).argmax(-1)
            groups[centres] = torch.arange(k)
        weights = torch.stack([importance * (groups == g) for g in range(k)])  # (k, N)
        merged.append((weights / weights.sum(-1, keepdim=True)) @ features[i])
    return torch.stack(merged)


@pytest.mark.parametrize("grouping", ["spatial", "similarity"])
def test_instruction_merge_equals_an_eager_reference(grouping):
    k, layer = 4, 2
    model = tiny_llava(num_layers=3)
    original = copy.deepcopy(model)
    inputs = make_batch(MIXED)
    merged = instruction_merge_reference(original, inputs, k, layer, grouping)
    expected, short = short_prompt_logits(original, MIXED, k, merged)
    apply_baseline(model, "instruction_merge", k, layer=layer, grouping=grouping)
    with torch.no_grad():
        logits = model(**inputs).logits
        generation = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        short_generation = original.generate(
            input_ids=short["input_ids"], attention_mask=short["attention_mask"], max_new_tokens=3, do_sample=False,
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=list(merged))},
        )  # fmt: skip
    torch.testing.assert_close(text_logits(logits, inputs["input_ids"], inputs["attention_mask"]), expected,
                               atol=1e-5, rtol=0)  # fmt: skip
    assert torch.equal(generation[:, -3:], short_generation[:, -3:])


def test_labels_give_the_loss_and_stay_out_of_the_scores():
    """With labels, the answer tokens are not queries of the text-to-image attention, and loss is the CE of the
    user-layout logits."""
    model = apply_baseline(tiny_llava(), "instruction_merge", 4)
    full = make_batch([[2, "I", 6]])
    prompt_length = full["input_ids"].shape[1] - 2
    labels = torch.full_like(full["input_ids"], -100)
    labels[:, prompt_length:] = full["input_ids"][:, prompt_length:]
    prompt = {key: value[:, :prompt_length] if key != "pixel_values" else value for key, value in full.items()}
    with torch.no_grad():
        with_labels = model(**full, labels=labels)
        without_labels = model(**full).logits
        prompt_only = model(**prompt).logits
    torch.testing.assert_close(with_labels.logits[:, :prompt_length], prompt_only, atol=1e-5, rtol=0)
    assert (without_labels[:, :prompt_length] - prompt_only).abs().max() > 1e-4  # answers as queries change it
    ce = torch.nn.functional.cross_entropy(with_labels.logits[0, :-1], labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(with_labels.loss, ce)


# ============================================================================ batches
@pytest.mark.parametrize("method", METHODS)
def test_left_padded_batch_equals_its_rows_alone(method):
    model = apply_baseline(tiny_llava(), method, 4)
    rows = [[2, "I", 3], [2, "I", 6], [4, "I", 1]]
    batch = make_batch(rows)
    with torch.no_grad():
        batch_out = model.generate(
            **batch, max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True
        )
        right = model(**make_batch(rows, padding_side="right")).logits
    assert bool((batch["attention_mask"][:, 0] == 0).any())
    length = batch["input_ids"].shape[1]
    pixel_values = batch["pixel_values"]
    for b in range(len(rows)):
        real = batch["attention_mask"][b].bool()
        single = {
            "input_ids": batch["input_ids"][b : b + 1, real],
            "attention_mask": batch["attention_mask"][b : b + 1, real],
            "pixel_values": pixel_values[b : b + 1],
        }
        with torch.no_grad():
            out = model.generate(
                **single, max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True
            )
            logits = model(**single).logits
        assert torch.equal(out.sequences[0, -3:], batch_out.sequences[b, length:])
        for step in range(3):
            torch.testing.assert_close(out.logits[step][0], batch_out.logits[step][b], atol=1e-5, rtol=0)
        # Right padding: the real tokens' logits are those of the row alone.
        width = logits.shape[1]
        torch.testing.assert_close(right[b, :width], logits[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["mean", "subsample", "visionzip"])
def test_generate_matches_a_forward_loop_when_the_compression_ignores_the_text(method):
    model = apply_baseline(tiny_llava(), method, 4)
    inputs = make_batch(CHAT)
    assert_generate_matches_forward_loop(model, inputs, 5, atol=1e-5)


# ============================================================================ the demo's budgets
def test_splits_and_grids_at_the_demo_budgets():
    assert [grid_shape(k, (12, 12)) for k in (1, 4, 16, 6, 144)] == [(1, 1), (2, 2), (4, 4), (2, 3), (12, 12)]
    assert subsample_index((12, 12), 4).tolist() == [3 * 12 + 3, 3 * 12 + 9, 9 * 12 + 3, 9 * 12 + 9]
    assert subsample_index((12, 12), 144).tolist() == list(range(144))
    # VisionZip's README splits (54 + 10 of 64, ...) and ours at the demo's budgets.
    assert [visionzip_split(k) for k in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    assert [visionzip_split(k) for k in (1, 4, 16)] == [(1, 0), (3, 1), (13, 3)]
    assert visionzip_split(16, dominant=10) == (10, 6)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_at_the_demo_budgets_on_a_12x12_grid(method):
    """144 visual tokens per image (12 x 12), a 2-layer language model like the demo's (fastv's default layer=2 then
    prunes only the cache), K in {1, 4, 16}, a left-padded batch through generate()."""
    model = tiny_llava(num_layers=2, image_size=48, patch=4)
    rows = [[2, "I", 3], [2, "I", 5]]
    inputs = make_batch(rows, image_tokens=144, image_size=48)
    length = inputs["input_ids"].shape[1]
    for k in (1, 4, 16):
        apply_baseline(model, method, k)
        assert (model.baseline.method, model.baseline.num_tokens) == (method, k)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        assert cache_visual_entries(out.cache).tolist() == [k, k]
        assert out.cache.get_seq_length() == length - (144 - k) + 1
        assert out.sequences.shape == (2, length + 2)
        remove_baseline(model)


# ============================================================================ switching off, removing, errors
def test_disable_and_remove_give_back_the_original_model():
    model = tiny_llava()
    inputs = make_batch(CHAT)
    projector = model.model.multi_modal_projector
    with torch.no_grad():
        reference = model(**inputs).logits  # (transformers installs its output-capturing hooks on the first call)
        hooks_before = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]
        apply_baseline(model, "visionzip", 4)
        assert len(projector._forward_pre_hooks) == 1
        compressed = model(**inputs).logits
        model.baseline.enabled = False
        assert torch.equal(model(**inputs).logits, reference)
        model.baseline.enabled = True
        remove_baseline(model)
        assert type(model) is LlavaForConditionalGeneration and not hasattr(model, "baseline")
        assert [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()] == hooks_before
        assert torch.equal(model(**inputs).logits, reference)
        apply_baseline(model, "mean", 4)  # applies again after removal
        pooled = model(**inputs).logits
    assert not torch.allclose(compressed, reference, atol=1e-3)
    assert not torch.allclose(pooled, reference, atol=1e-3)


def test_compact_cache_compacts_only_the_given_layers():
    cache = DynamicCache()
    for layer_idx in range(3):
        keys = torch.arange(2 * 5, dtype=torch.float32).view(2, 1, 5, 1).expand(2, 2, 5, 3) + 100 * layer_idx
        cache.update(keys.clone(), keys.clone() + 0.5, layer_idx)
    keep = torch.tensor([[0, 2, 4], [-1, 1, 3]])
    compact_dynamic_cache(cache, keep, layers=[0, 2], empty_slots=True)
    assert cache.layers[1].keys.shape[2] == 5  # untouched
    for layer_idx in (0, 2):
        keys = cache.layers[layer_idx].keys[:, 0, :, 0]
        assert keys.tolist() == [[0.0 + 100 * layer_idx, 2.0 + 100 * layer_idx, 4.0 + 100 * layer_idx],
                                 [0.0, 6.0 + 100 * layer_idx, 8.0 + 100 * layer_idx]]  # fmt: skip


@pytest.mark.parametrize(
    "method, num_tokens, options, error, match",
    [
        ("mean", 0, {}, ValueError, "num_tokens must be an int >= 1"),
        ("mean", N + 1, {}, ValueError, f"num_tokens={N + 1} is larger than the model's {N} visual tokens"),
        ("fastv", 2.0, {}, ValueError, "num_tokens must be an int"),
        ("fastv", True, {}, ValueError, "num_tokens must be an int"),
        ("pooling", 4, {}, ValueError, "unknown baseline method 'pooling'"),
        ("mean", 4, {"layer": 2}, ValueError, "layer=2 is not an option of method 'mean'"),
        ("fastv", 4, {"grouping": "spatial"}, ValueError, "grouping='spatial' is not an option of method 'fastv'"),
        ("fastv", 4, {"layers": 2}, ValueError, r"unknown baseline option\(s\) \['layers'\]"),
        ("fastv", 4, {"layer": 0}, ValueError, "layer must be an int >= 1"),
        ("fastv", 4, {"layer": 4}, ValueError, "layer=4 is out of range .* 3 decoder layers"),
        ("fastv", 4, {"query": "first"}, ValueError, "query must be one of"),
        ("instruction_merge", 4, {"grouping": "kmeans"}, ValueError, "grouping must be one of"),
        ("mean", 5, {}, ValueError, "num_tokens=5 cannot be laid out as a kh x kw grid within the 4x4"),
        ("visionzip", 4, {"dominant": 5}, ValueError, r"dominant must be an int in \[0, num_tokens=4\]"),
        ("visionzip", 4, {"dominant": 0}, ValueError, "keep_cls=True needs dominant >= 1"),
        ("visionzip", 4, {"keep_cls": 1}, ValueError, "keep_cls must be a bool"),
    ],
)
def test_bad_arguments_raise_clear_errors(method, num_tokens, options, error, match):
    model = tiny_llava()
    with pytest.raises(error, match=match):
        apply_baseline(model, method, num_tokens, **options)
    assert type(model) is LlavaForConditionalGeneration and not hasattr(model, "baseline")


def test_bad_models_and_inputs_raise_clear_errors():
    model = apply_baseline(tiny_llava(), "mean", 4)
    with pytest.raises(ValueError, match="already applied"):
        apply_baseline(model, "fastv", 4)
    inputs = make_batch(CHAT)
    with pytest.raises(ValueError, match="Image features and image tokens do not match, tokens: "):
        model(**{**inputs, "pixel_values": inputs["pixel_values"][:1]})
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    remove_baseline(model)
    with pytest.raises(ValueError, match="no baseline is applied"):
        remove_baseline(model)
    with pytest.raises(ValueError, match="remove_etc"):
        apply_baseline(apply_etc(tiny_llava(), ETCConfig(loss="none")), "mean", 4)
    with pytest.raises(ValueError, match="remove_baseline"):
        apply_etc(apply_baseline(tiny_llava(), "mean", 4), ETCConfig(loss="none"))
    with pytest.raises(ValueError, match="CLS"):
        apply_baseline(tiny_llava(strategy="full"), "subsample", 4)
    with pytest.raises(TypeError, match="supports LlavaForConditionalGeneration"):
        apply_baseline(torch.nn.Linear(2, 2), "mean", 4)
    with pytest.raises(ValueError, match="baseline's prefill"):
        cache_visual_entries(DynamicCache())


@pytest.mark.parametrize("method", METHODS)
def test_prompts_that_end_with_their_image(method):
    """No text after the image: fastv's query is the last (visual) token, instruction_merge's importance uniform."""
    model = apply_baseline(tiny_llava(), method, 4)
    inputs = make_batch([[3, "I"], [1, "I"]])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        logits = model(**inputs).logits
    assert cache_visual_entries(out.cache).tolist() == [4, 4]
    assert torch.isfinite(logits).all() and out.sequences.shape[1] == inputs["input_ids"].shape[1] + 2


# ============================================================================ the registry
def test_a_new_method_is_one_registered_class():
    """A user's method: a `BaselineMethod` subclass registered by name runs through apply_baseline, forward and the
    prefill like the built-in ones (here: keep each image's first K projected tokens, which at K = N reproduces the
    unpatched model); duplicate names, unknown option names and options of other methods are refused by name."""
    from etc_ext.baselines import METHOD_CLASSES, BaselineConfig, register_method
    from etc_ext.baselines.mean import ProjectedReduction

    @register_method
    class FirstTokens(ProjectedReduction):
        name = "first_tokens"

        def reduce_projected(self, features, config, geometry):
            return features[:, : config.num_tokens]

    try:
        model = tiny_llava()
        original = copy.deepcopy(model)
        inputs = make_batch(MIXED)
        real = inputs["attention_mask"].bool()
        with torch.no_grad():
            reference = original(**inputs, position_ids=positions(inputs["attention_mask"])).logits
            apply_baseline(model, "first_tokens", N)
            torch.testing.assert_close(model(**inputs).logits[real], reference[real], atol=1e-5, rtol=0)
            remove_baseline(model)
            apply_baseline(model, "first_tokens", 4)
            prefill = model(**inputs, use_cache=True)
        assert cache_visual_entries(prefill.cache).tolist() == [4, 8]
        with pytest.raises(ValueError, match="a baseline method named 'first_tokens' is already registered"):
            register_method(type("Other", (ProjectedReduction,), {"name": "first_tokens"}))
        with pytest.raises(ValueError, match=r"options \['stride'\] are not BaselineConfig fields"):
            register_method(type("Strided", (ProjectedReduction,), {"name": "strided", "options": {"stride": 2}}))
        with pytest.raises(ValueError, match="layer=2 is not an option of method 'first_tokens'"):
            BaselineConfig("first_tokens", 4, layer=2)
    finally:
        METHOD_CLASSES.pop("first_tokens", None)
    with pytest.raises(ValueError, match="unknown baseline method 'first_tokens'; choose one of"):
        apply_baseline(tiny_llava(), "first_tokens", 4)


def test_the_package_lists_every_method_module_with_its_label():
    """Each method module of etc_ext/baselines registers itself (the package imports every module it holds); METHODS
    lists the methods that compress the image alone first, then those that read the question; the demo's table names
    and its question-aware set come from the classes."""
    import pkgutil

    import etc_ext.baselines as baselines
    from etc_ext.demo import run

    modules = {info.name for info in pkgutil.iter_modules(baselines.__path__)}
    assert {"mean", "subsample", "fastv", "visionzip", "instruction_merge"} <= modules
    assert set(METHODS) == {"mean", "subsample", "fastv", "visionzip", "instruction_merge"}
    assert METHODS == ("mean", "subsample", "visionzip", "fastv", "instruction_merge")
    assert run.QUESTION_AWARE_METHODS == ("fastv", "instruction_merge")
    assert run.BASELINE_LABELS["fastv"] == "FastV-style top-K" and baselines.method_label("mean") == "mean pooling"
    assert all(baselines.METHOD_CLASSES[name].__module__ == f"etc_ext.baselines.{name}" for name in METHODS)
