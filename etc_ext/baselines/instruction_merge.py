""""instruction_merge": ETC's instruction-aware weighting without training: a first pass over the prompt, stopped
after the attention of the L-th layer, gives each visual token's importance (the text-to-image `cross_attn_scores`
of the text after the image, averaged over heads and queries); the N projected tokens are split into K groups
(`grouping="spatial"`: the `kh x kw` cells of the grid; `"similarity"`: the K most important tokens are centres and
every other token joins the centre whose pre-RoPE key is most similar) and each group becomes its importance-weighted
mean (`weighted_aggregate`)."""

from contextlib import ExitStack, contextmanager
from typing import Optional, Sequence

import torch
from torch import nn

from ..distill import capture_query_key, instruction_scores_spans
from .grid import spatial_groups, subsample_index
from .merging import merge_groups, similarity_groups
from .registry import BaselineMethod, LanguageInputs, register_method
from .sequence import query_index

__all__ = ["InstructionMerge", "first_pass_scores"]


# ============================================================================ language-model passes
class _StopForward(Exception):
    """Raised by a forward hook to end a pass once the layer that was needed has run."""


@contextmanager
def _stop_after(module: nn.Module):
    def hook(_module, _args, _output):
        raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _record_output(module: nn.Module):
    """Record the output of `module`'s next call (a forward hook)."""

    class _Recorder:
        value: Optional[torch.Tensor] = None

    recorder = _Recorder()

    def hook(_module, _args, output):
        recorder.value = output

    handle = module.register_forward_hook(hook)
    try:
        yield recorder
    finally:
        handle.remove()


def first_pass_scores(
    language_model: nn.Module,
    decoder_layers: Sequence[nn.Module],
    layer: int,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    rows: torch.Tensor,
    query_positions: torch.Tensor,
    visual_start: torch.Tensor,
    visual_end: torch.Tensor,
    with_keys: bool = False,
    **language_kwargs,
) -> tuple[list, Optional[list]]:
    """Text-to-image attention at decoder layer `layer - 1` from a pass over the whole prompt that stops right after
    that layer's attention (no cache, SDPA through the "etc_capture" attention function, no attention weights).

    Args:
        language_model: called as `language_model(inputs_embeds=, attention_mask=, position_ids=, use_cache=False,
            **language_kwargs)`; its config's `_attn_implementation` is switched for the pass.
        decoder_layers: its decoder layers (`layer - 1` must have a `self_attn`, and `self_attn.k_proj` for keys).
        inputs_embeds: `(B, L, H)`; attention_mask: `(B, L)`; position_ids: `(B, L)` (or `(A, B, L)`).
        rows: `(I,)` batch row of each image; query_positions: `(I, T)` (-1 = none); visual_start, visual_end:
            `(I,)` bounds of each image's visual tokens in its row.
        with_keys: also return the visual tokens' head-averaged keys before RoPE (the `k_proj` output).
        language_kwargs: more arguments of the pass (e.g. Qwen3-VL's DeepStack features).

    Returns:
        per image, importance float32 `(N_i,)` (probabilities over each query's causal context, averaged over heads
        and queries), and per image its keys `(N_i, D)`, or None.
    """
    target = decoder_layers[layer - 1].self_attn
    with ExitStack() as stack:
        recorder = stack.enter_context(capture_query_key(language_model.config, layer - 1))
        keys = stack.enter_context(_record_output(target.k_proj)) if with_keys else None
        stack.enter_context(_stop_after(target))
        try:
            language_model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
                **recorder.kwargs,
                **language_kwargs,
            )
        except _StopForward:
            pass
    if recorder.query is None:
        raise RuntimeError(f"the first pass did not reach the attention of decoder layer {layer - 1}")
    scores = instruction_scores_spans(
        recorder.query[rows],
        recorder.key[rows],
        query_positions,
        visual_start,
        visual_end,
        key_mask=attention_mask.bool()[rows],
        score_context="causal",
        scale=recorder.scale,
    )
    visual_keys = None
    if with_keys:
        head_dim = recorder.key.shape[-1]
        projected = keys.value  # (B, L, Hkv * D)
        mean_keys = projected.view(*projected.shape[:2], -1, head_dim).mean(2)  # (B, L, D)
        visual_keys = [mean_keys[r, s:e] for r, s, e in zip(rows.tolist(), visual_start.tolist(), visual_end.tolist())]
    return scores, visual_keys


@register_method
class InstructionMerge(BaselineMethod):
    name = "instruction_merge"
    label = "instruction-aware merge"
    reads_question = True  # text-to-image scores weight the merge
    options = {"layer": 2, "query": "instruction", "grouping": "spatial"}

    def needs_grid(self, config) -> bool:
        return config.grouping == "spatial"

    def language_pass(self, model, inputs: LanguageInputs):
        """A first pass stopped after layer `layer - 1`'s attention gives each visual token's importance; each
        image's N tokens are merged into K groups (importance-weighted means), then the shorter prompt runs. Each
        merged token stands for its group's centre (a spatial cell's centre token, or the similarity centre)."""
        config = model.baseline.config
        language_model = model.model.language_model
        spans = inputs.spans
        num_tokens = config.num_tokens
        device = inputs.input_ids.device
        queries = query_index(spans, inputs.image_token_mask, inputs.mask, inputs.labels, config.query)
        importance, keys = first_pass_scores(
            language_model, language_model.layers, config.layer, inputs.with_image_features(), inputs.mask,
            inputs.position_ids, spans.row, queries, spans.start, spans.end,
            with_keys=config.grouping == "similarity",
            **model._baseline_token_kwargs(inputs.image_token_mask, inputs.user_extras()),
        )  # fmt: skip
        merged, sources = [], []
        for i, (tokens, grid) in enumerate(zip(inputs.features, inputs.grids)):
            if config.grouping == "spatial":
                groups = spatial_groups(grid, num_tokens, device)[None]
                centres = subsample_index(grid, num_tokens, device)
            else:
                groups = similarity_groups(keys[i][None], importance[i][None], num_tokens)
                centres = importance[i].topk(num_tokens).indices.sort().values
            merged.append(merge_groups(tokens[None], groups, num_tokens, importance[i][None])[0])
            sources.append(centres)
        return model._baseline_shortened_pass(inputs, merged, sources)
