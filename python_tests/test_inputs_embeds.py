"""inputs_embeds with compression enabled, on LLaVA and Qwen3-VL (M=1): ETC finds each image's placeholders in the
embeddings as transformers does (the positions equal to the image token's embedding), uses the user's embeddings for
the text, and gives the outputs of input_ids: forward (logits, loss), the prefill, generate() (which returns only the
new tokens from embeddings) and a compressed cache continued with embeddings."""

import copy

import pytest
import torch
from transformers import DynamicCache

import test_llava_etc as llava_helpers
from conftest import qwen3_vl_batch, tiny_qwen3_vl  # the tiny Qwen3-VL
import test_qwen3_vl_etc as qwen_helpers
from etc_ext.models import llava, qwen3_vl

STEPS = 4


def _model_and_batch(backbone, answer=0):
    """An ETC model (M=1) and a left-padded batch of two rows of different lengths, one image each."""
    if backbone == "llava":
        model = llava.apply_etc(llava_helpers.tiny_llava(), llava_helpers.small_config(num_compression_tokens=1))
        inputs, labels = llava_helpers.make_batch([[2, "I", 5], [3, "I", 2]], answer=answer)
    else:
        model = qwen3_vl.apply_etc(tiny_qwen3_vl(), qwen_helpers.small_config(num_compression_tokens=1))
        inputs, labels, _ = qwen3_vl_batch([[3, ("I", 4, 6), 5], [2, ("I", 6, 4), 3]], answer=answer)
    return model, inputs, labels


def _as_embeds(model, inputs, scale=1.0):
    """`inputs` with input_ids replaced by their embeddings; the text's (not the image placeholders') times `scale`."""
    inputs = dict(inputs)
    input_ids = inputs.pop("input_ids")
    embeds = model.get_input_embeddings()(input_ids).detach()  # (B, L, H)
    text = ~model._visual_token_mask(input_ids)
    inputs["inputs_embeds"] = torch.where(text[..., None], embeds * scale, embeds)
    return inputs


def _scaled_text_embeddings(model, scale):
    """A copy of `model` whose vocabulary embeddings are `scale` times the original, the placeholders' excepted."""
    scaled = copy.deepcopy(model)
    weight = scaled.get_input_embeddings().weight
    keep = torch.zeros(weight.shape[0], dtype=torch.bool)
    keep[list(model._placeholder_token_ids())] = True
    with torch.no_grad():
        weight.copy_(torch.where(keep[:, None], weight, weight * scale))
    return scaled


@pytest.mark.parametrize("backbone", ["llava", "qwen3_vl"])
def test_forward_with_inputs_embeds_equals_input_ids(backbone):
    """The masked pass (logits, loss and its parts) and the prefill are those of input_ids."""
    model, inputs, labels = _model_and_batch(backbone, answer=2)
    embedded = _as_embeds(model, inputs)
    with torch.no_grad():
        for settings in (dict(labels=labels, use_cache=False), dict(use_cache=False), dict(cache=DynamicCache())):
            expected = model(**inputs, **settings)
            got = model(**embedded, **settings)
            torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=0)
            for name in ("loss", "ce_loss", "vid_loss"):
                if getattr(expected, name) is not None:
                    torch.testing.assert_close(getattr(got, name), getattr(expected, name), atol=1e-5, rtol=0)
        assert expected.cache.get_seq_length() == got.cache.get_seq_length() < inputs["input_ids"].shape[1]


def _assert_same_new_tokens(from_embeds, from_ids, length):
    """generate() from embeddings returns the new tokens only; tokens and every step's logits are those of ids."""
    assert torch.equal(from_embeds.sequences, from_ids.sequences[:, length:])
    for step, (a, b) in enumerate(zip(from_embeds.logits, from_ids.logits, strict=True)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=f"step {step}")


@pytest.mark.parametrize("backbone", ["llava", "qwen3_vl"])
def test_generate_with_inputs_embeds_gives_the_new_tokens_of_input_ids(backbone):
    """generate(inputs_embeds=...) returns only the new tokens (as transformers does); they (and their logits: on
    Qwen3-VL the prompt's M-RoPE positions) are those of input_ids, for a fresh prompt and for a prompt whose image
    prefix is in a compressed cache already."""
    model, inputs, _ = _model_and_batch(backbone)
    embedded = _as_embeds(model, inputs)
    length = inputs["input_ids"].shape[1]
    settings = dict(max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        expected = model.generate(**inputs, **settings)
        _assert_same_new_tokens(model.generate(**embedded, **settings), expected, length)
        # A cache of the prompt up to the last image (the prompt-cache pattern), continued from embeddings.
        prefix = {k: v[:, :-2] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v
                  for k, v in inputs.items()}  # fmt: skip
        cache = model(**prefix, cache=DynamicCache(), use_cache=True).cache
        continued = model.generate(**embedded, cache=copy.deepcopy(cache), **settings)
        _assert_same_new_tokens(continued, model.generate(**inputs, cache=copy.deepcopy(cache), **settings), length)


@pytest.mark.parametrize("backbone", ["llava", "qwen3_vl"])
def test_a_compressed_cache_continues_from_the_whole_prompts_embeddings(backbone):
    """A forward call on a cache of the prompt up to the image, given the whole prompt's embeddings (as input_ids
    may be given whole): only the columns the cache does not hold run, with the logits of input_ids."""
    model, inputs, _ = _model_and_batch(backbone)
    embedded = _as_embeds(model, inputs)
    prefix = {k: v[:, :-2] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v
              for k, v in inputs.items()}  # fmt: skip
    with torch.no_grad():
        cache = model(**prefix, cache=DynamicCache(), use_cache=True).cache
        text = {"attention_mask": inputs["attention_mask"], "use_cache": True}
        expected = model(input_ids=inputs["input_ids"], cache=copy.deepcopy(cache), **text)
        got = model(inputs_embeds=embedded["inputs_embeds"], cache=copy.deepcopy(cache), **text)
    assert got.logits.shape[1] == 2
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backbone", ["llava", "qwen3_vl"])
def test_modified_text_embeddings_are_used(backbone):
    """Embeddings a user changed are what the model runs on (never re-embedded from token ids): scaled text
    embeddings give the outputs of a model whose vocabulary embeddings are scaled alike (training loss with the
    teacher too, the prefill, a next token on the compressed cache and generate()'s first token), and differ from the
    unscaled ones."""
    model, inputs, labels = _model_and_batch(backbone, answer=2)
    scaled_model = _scaled_text_embeddings(model, 3.0)
    embedded = _as_embeds(model, inputs, scale=3.0)
    settings = dict(max_new_tokens=STEPS, do_sample=False)
    with torch.no_grad():
        expected = scaled_model(**inputs, labels=labels, use_cache=False)
        got = model(**embedded, labels=labels, use_cache=False)
        for name in ("logits", "loss", "ce_loss", "vid_loss"):
            torch.testing.assert_close(getattr(got, name), getattr(expected, name), atol=1e-5, rtol=0)
        assert not torch.allclose(got.logits, model(**inputs, use_cache=False).logits, atol=1e-2)
        prefill = model(**embedded, cache=DynamicCache())
        torch.testing.assert_close(prefill.logits, scaled_model(**inputs, cache=DynamicCache()).logits, atol=1e-5,
                                   rtol=0)  # fmt: skip
        # The next token's embedding on the compressed cache, scaled too.
        step_ids = prefill.logits[:, -1:].argmax(-1)  # (B, 1)
        step = {
            "inputs_embeds": model.get_input_embeddings()(step_ids) * 3.0,
            "attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(step_ids)], dim=1),
        }
        scaled_step = scaled_model(**inputs, cache=DynamicCache())
        expected_step = scaled_model(input_ids=step_ids, attention_mask=step["attention_mask"],
                                     cache=scaled_step.cache).logits  # fmt: skip
        torch.testing.assert_close(model(**step, cache=prefill.cache).logits, expected_step, atol=1e-5, rtol=0)
        # generate() prefills with the user's embeddings (then embeds the tokens it generates itself).
        length = inputs["input_ids"].shape[1]
        first = scaled_model.generate(**inputs, **settings)[:, length]
        assert torch.equal(model.generate(**embedded, **settings)[:, 0], first)


@pytest.mark.parametrize("backbone", ["llava", "qwen3_vl"])
def test_inputs_embeds_that_cannot_work_raise_clear_errors(backbone):
    model, inputs, _ = _model_and_batch(backbone)
    embedded = _as_embeds(model, inputs)
    with pytest.raises(ValueError, match="You must specify exactly one of input_ids or inputs_embeds"):
        model(**embedded, input_ids=inputs["input_ids"])
    # Images given, but the embeddings hold no image placeholder (e.g. they were all replaced).
    no_placeholder = dict(embedded, inputs_embeds=embedded["inputs_embeds"] + 1e-3)
    with pytest.raises(ValueError, match="no position of inputs_embeds holds the embedding of an image placeholder"):
        model(**no_placeholder)
    with pytest.raises(ValueError, match="no position of inputs_embeds holds the embedding of an image placeholder"):
        model.generate(**no_placeholder, max_new_tokens=1)
    hidden_size = embedded["inputs_embeds"].shape[-1]
    with pytest.raises(ValueError, match=f"inputs_embeds must be \\(batch_size, sequence_length, {hidden_size}\\)"):
        model(**dict(embedded, inputs_embeds=embedded["inputs_embeds"][..., :-1]))
