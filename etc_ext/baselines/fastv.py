""""fastv": FastV (Chen et al., pkunlp-icler/FastV): the first `layer` (L, FastV's K) decoder layers run on the
whole prompt; the attention of the L-th layer (index L - 1) ranks each image's visual tokens (queries: the prompt's
last token, or the text after the image), from that layer's query/key states recorded by the `"etc_capture"` attention
function and `etc_ext.ops.cross_attn_scores` (SDPA kept). The top K visual tokens stay; layers L.. run on the pruned
sequence and the pruned tokens leave the cache of every layer. Tokens keep their positions."""

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..cache import compact_dynamic_cache
from ..compress import right_aligned_index
from ..distill import capture_query_key, instruction_scores_spans
from .registry import BaselineMethod, LanguageInputs, register_method
from .sequence import _gather_rows, pruned_sequence, query_index

__all__ = ["FastV", "FastVPruner"]


class FastVPruner:
    """Drops the visual tokens FastV does not keep from the hidden states of decoder layers `layer..`, in one pass.

    Used as a context manager around the language model's call: it switches the attention to the "etc_capture"
    function (SDPA that records decoder layer `layer - 1`'s query/key states; pass `pruner.kwargs` to the call) and
    registers forward pre-hooks (with kwargs) on decoder layers `layer..`. The first of them calls `select(recorder)`
    for the bool `(B, L)` mask of the tokens to keep and replaces the layer's inputs by the kept rows, in order and
    right-aligned: `hidden_states`, `position_embeddings` (cos, sin), `position_ids`, and a causal boolean mask over
    them; the later layers get the same. The cache of layers `layer..` therefore holds the kept tokens only, in the
    order of `pruner.index`; compact the earlier layers afterwards with
    `compact_dynamic_cache(cache, pruner.index, layers=range(layer), empty_slots=True)`. The pass runs SDPA (an eager
    model too).

    The decoder layers must take `hidden_states` first and `attention_mask`, `position_embeddings`, `position_ids`
    as keyword arguments (transformers' decoder layers do). A pass with a non-empty cache is not supported.

    Args:
        config: the language model's config (its attention implementation is switched during the pass).
        decoder_layers: the language model's decoder layers.
        layer: L >= 1; layers 0..L-1 see every token, decoder layer L - 1's attention gives the scores.
        select: `select(recorder) -> keep` with the `QueryKeyRecorder` of layer L - 1, bool `(B, L)`.
    """

    def __init__(
        self,
        config,
        decoder_layers: Sequence[nn.Module],
        layer: int,
        select: Callable[[object], torch.Tensor],
    ):
        self.config = config
        self.decoder_layers = decoder_layers
        self.layer = layer
        self.select = select
        self.keep: Optional[torch.Tensor] = None  # (B, L)
        self.index: Optional[torch.Tensor] = None  # (B, S)
        self._inputs: Optional[dict] = None
        self._handles = []
        self._capture = None
        self.recorder = None

    @property
    def kwargs(self) -> dict:
        return self.recorder.kwargs

    @property
    def pruning(self) -> bool:
        """Whether the pass has reached the pruned layers (their hidden states hold the kept rows only)."""
        return self._inputs is not None

    def __enter__(self):
        self._capture = capture_query_key(self.config, self.layer - 1)
        self.recorder = self._capture.__enter__()
        for module in self.decoder_layers[self.layer :]:
            self._handles.append(module.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._capture.__exit__(*exc)
        return False

    def finish(self) -> torch.Tensor:
        """The keep mask `(B, L)` (selecting now if no pruned layer ran, i.e. `layer` is the last layer)."""
        if self.keep is None:
            self.keep = self.select(self.recorder)
            self.index = right_aligned_index(self.keep)
        return self.keep

    def _pre_hook(self, _module, args, kwargs):
        hidden_states = args[0] if args else kwargs.pop("hidden_states")
        args = args[1:]
        if self._inputs is None:  # the first pruned layer: select, then drop the rows (later layers get them so)
            self.finish()
            self._inputs = self._pruned_inputs(hidden_states, kwargs)
            hidden_states = _gather_rows(hidden_states, self.index)
        kwargs.update(self._inputs)
        return (hidden_states, *args), kwargs

    def _pruned_inputs(self, hidden_states: torch.Tensor, kwargs: dict) -> dict:
        batch_size, length = hidden_states.shape[:2]
        index = self.index
        valid = index >= 0
        inputs = {}
        cos_sin = kwargs.get("position_embeddings")
        if cos_sin is not None:
            inputs["position_embeddings"] = tuple(
                _gather_rows(t.expand(batch_size, *t.shape[1:]), index) for t in cos_sin
            )
        position_ids = kwargs.get("position_ids")
        if position_ids is not None:
            position_ids = position_ids.expand(*position_ids.shape[:-2], batch_size, length)
            rows = torch.arange(batch_size, device=index.device)[:, None]
            inputs["position_ids"] = position_ids[..., rows, index.clamp_min(0)].masked_fill(~valid, 0)
        size = index.shape[1]
        causal = torch.ones(size, size, dtype=torch.bool, device=index.device).tril()
        allowed = causal[None] & valid[:, None, :] & valid[:, :, None]
        allowed = allowed | torch.eye(size, dtype=torch.bool, device=index.device)[None]  # padding sees itself
        inputs["attention_mask"] = allowed[:, None]  # (B, 1, S, S), SDPA's boolean form
        return inputs


@register_method
class FastV(BaselineMethod):
    name = "fastv"
    label = "FastV-style top-K"
    reads_question = True  # the prompt's last token's attention ranks the visual tokens
    options = {"layer": 2, "query": "last"}

    def language_pass(self, model, inputs: LanguageInputs):
        """The first `layer` decoder layers on the whole prompt, the rest on the top-K visual tokens of each image
        (ranked by layer `layer - 1`'s text-to-image attention); the pruned tokens leave every layer's cache."""
        config = model.baseline.config
        language_model = model.model.language_model
        spans, mask, image_token_mask = inputs.spans, inputs.mask, inputs.image_token_mask
        queries = query_index(spans, image_token_mask, mask, inputs.labels, config.query)
        rows = spans.row

        def select(recorder) -> torch.Tensor:
            scores = instruction_scores_spans(
                recorder.query[rows], recorder.key[rows], queries, spans.start, spans.end,
                key_mask=mask.bool()[rows], score_context="causal", scale=recorder.scale,
            )  # fmt: skip  per image (N_i,)
            keep = mask.bool() & ~image_token_mask
            for row, start, image_scores in zip(rows.tolist(), spans.start.tolist(), scores):
                keep[row, start + image_scores.topk(config.num_tokens).indices] = True
            return keep

        cache = inputs.cache
        pruner = FastVPruner(language_model.config, language_model.layers, config.layer, select)
        with pruner, model._baseline_pruning(pruner):
            hidden_states = model._baseline_run_language_model(
                inputs.with_image_features(), mask, inputs.position_ids, cache, image_token_mask,
                inputs.user_extras(), **pruner.kwargs,
            ).last_hidden_state  # fmt: skip
        keep = pruner.finish()
        layout = pruned_sequence(keep, image_token_mask, inputs.position_ids)
        if config.layer == len(language_model.layers):
            hidden_states = layout.gather(hidden_states)  # no layer ran on the pruned sequence: drop the rows now
        if cache is not None:
            # Layers < layer hold the whole prompt; layers >= layer already hold the kept entries in layout order.
            compact_dynamic_cache(cache, layout.index, layers=range(config.layer), empty_slots=True)
        return hidden_states, layout
