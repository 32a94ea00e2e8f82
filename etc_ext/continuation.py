"""Continuing a compressed cache (ETC's, or a training-free baseline's): which of the given tokens are new.

A compressed cache holds fewer entries than the tokens it covers (M, or K, per image instead of N), so the usual
rule "new tokens = input_ids minus the cache's length" (generate(), prompt-cache reuse, multi-turn) feeds tokens
the cache already holds. `ETCCacheState.covered_length` counts what it covers; these helpers apply that count.
`forward_arguments` splits a family forward's call for the compressor (ETC's dispatch or the baselines').
"""

import torch
from transformers.utils.deprecation import deprecate_kwarg

__all__ = ["CompressedCacheGenerationMixin", "forward_arguments", "new_token_count", "new_tokens"]


def forward_arguments(visual_kwargs: dict, input_ids, attention_mask, position_ids, logits_to_keep, mm_encoder_outputs,
                      kwargs: dict) -> tuple[dict, tuple]:  # fmt: skip
    """A family forward's call, as a compressor takes it: the Hugging Face forward's arguments (what runs when
    nothing is compressed) and `(cache, labels, use_cache, inputs_embeds)`, which leave `kwargs` (it keeps the
    rest: output flags, loss options)."""
    base_kwargs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=logits_to_keep,
        mm_encoder_outputs=mm_encoder_outputs,
        **visual_kwargs,
        **kwargs,
    )
    popped = tuple(kwargs.pop(name, None) for name in ("cache", "labels", "use_cache", "inputs_embeds"))
    return base_kwargs, popped


def new_token_count(input_ids: torch.Tensor, attention_mask, covered: int) -> int:
    """How many of the last columns of `input_ids` a cache covering `covered` tokens does not hold yet: with
    `attention_mask` (the whole conversation's, as generate() grows it), its width minus `covered`; without one,
    every column (generate() slices the conversation itself, see `CompressedCacheGenerationMixin`).

    Raises:
        ValueError: the count does not fit `input_ids` (e.g. a mask shorter than what the cache holds).
    """
    given = input_ids.shape[1]
    new = attention_mask.shape[1] - covered if attention_mask is not None else given
    if not 0 < new <= given:
        raise ValueError(
            f"the cache holds {covered} tokens of the conversation, so {new} of the {given} columns of input_ids "
            "are new: pass the whole conversation (or its new tokens) with an attention_mask over the whole "
            "conversation."
        )
    return new


def new_tokens(cache, input_ids: torch.Tensor, attention_mask, position_ids):
    """The columns of `input_ids` (and `position_ids`) that a compressed `cache` does not hold yet: `(input_ids,
    position_ids, covered, new)` with `covered` the tokens the cache holds and `new` the columns kept (see
    `new_token_count`)."""
    covered = cache.etc_state.covered_length(cache.get_seq_length())
    new = new_token_count(input_ids, attention_mask, covered)
    if position_ids is not None:
        position_ids = position_ids[..., -new:]
    return input_ids[:, -new:], position_ids, covered, new


class CompressedCacheGenerationMixin:
    """generate() support for a model whose caches may be compressed (a cache with an `etc_state`)."""

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def prepare_inputs_for_generation(
        self, input_ids, next_sequence_length=None, cache=None, inputs_embeds=None, **kwargs
    ):  # fmt: skip
        """generate() feeds the tokens its cache does not hold, counting them as `input_ids` minus the cache's
        length; a compressed cache holds fewer entries than the tokens it covers, so count with what it covers.

        An empty cache means a prefill, whose images must be compressed: generate() as an assistant (assisted
        decoding) marks even its prefill as a later step and would drop the images (`mm_encoder_outputs`, which
        the main model encoded), so the call with an empty cache counts as the first."""
        state = getattr(cache, "etc_state", None)
        if state is not None and next_sequence_length is not None:
            covered = state.covered_length(cache.get_seq_length())
            length = input_ids.shape[1]
            if inputs_embeds is not None:  # generate() started from embeddings: input_ids hold the new tokens only
                length += inputs_embeds.shape[1]
            next_sequence_length = length - covered
            if next_sequence_length < 1:  # input_ids[:, -0:] would feed the whole prompt again
                raise ValueError(
                    f"the cache already holds all {covered} tokens of input_ids: generate() needs at least one token "
                    "it does not hold (reuse a cache of a prefix of the prompt, e.g. up to the image)"
                )
        if cache is None or cache.get_seq_length() == 0:
            kwargs["is_first_iteration"] = True
        return super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, cache=cache, inputs_embeds=inputs_embeds, **kwargs
        )
