"""ETC's inference side, written once for every backbone: the compressed prefill, decoding from the compacted
cache, and continuing it with new tokens (a reused image cache, a later turn, new images)."""

from dataclasses import dataclass
from typing import Optional

import torch
from transformers.cache_utils import DynamicCache

from ..compress import ETCCache, etc_prefill
from ..continuation import CompressedCacheGenerationMixin, new_tokens
from ..dispatch import dispatch, host_side
from .etc_hooks import ETCBackboneHooks, ETCInputs

__all__ = ["Continuation", "ETCGenerationMixin"]


@dataclass
class Continuation:
    """The new tokens of a call on a compressed cache, as `ETCGenerationMixin._etc_continuation` finds them.

    Attributes:
        input_ids: `(B, new)` the new tokens (their placeholder ids when the user gave inputs_embeds).
        inputs_embeds: `(B, new, H)` the user's embeddings of the new tokens, or None.
        attention_mask: `(B, C + new)` over the compacted cache's entries and the new tokens.
        position_ids: the new tokens' positions, in the language model's form.
        total: the user tokens the cache covers after this call.
        new_images: the visual inputs of the new tokens' images; None when the new tokens are text.
    """

    input_ids: torch.Tensor
    inputs_embeds: Optional[torch.Tensor]
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    total: int
    new_images: Optional[dict] = None


class ETCGenerationMixin(CompressedCacheGenerationMixin, ETCBackboneHooks):
    """Prefill into an `ETCCache`, decode from it, continue it."""

    @dispatch
    def _etc_prefill(
        self, prepared: ETCInputs, input_length: int, cache, method: str, logits_to_keep=1, **past
    ):  # fmt: skip
        """The compressed prefill of `prepared` into `cache` (an `ETCCache`, made when it is not one yet; `past`:
        `past_valid` / `past_offset` of a cache that holds earlier turns, see `etc_prefill`). Returns the model
        output with the logits of each row's last `logits_to_keep` tokens (1 when 0 / not an int: only the tokens
        of the last pass have outputs; assisted decoding asks for its candidates')."""
        if not isinstance(cache, ETCCache):  # e.g. the empty DynamicCache generate() made
            cache = ETCCache(config=self.config)
        prefill = etc_prefill(
            self._etc_run_language_model,
            prepared.layout,
            prepared.inputs_embeds,
            cache,
            self.model.language_model.config._attn_implementation,
            input_length=input_length,
            method=method,
            token_inputs=prepared.token_inputs,
            **past,
        )
        keep = logits_to_keep if isinstance(logits_to_keep, int) and logits_to_keep > 1 else 1
        if keep == 1:
            hidden = prefill.last_hidden_state[:, None]  # (B, 1, H)
        else:
            hidden = _last_user_outputs(prefill, prepared.layout, keep)  # (B, keep, H)
        return self.etc_output_class(logits=self.lm_head(hidden), cache=cache, **prepared.encoder_outputs)

    @staticmethod
    def _etc_check_cache(cache) -> None:
        """The prefill compacts the cache: it must be a `DynamicCache` (never silently replaced by one)."""
        if cache is not None and not isinstance(cache, DynamicCache):
            raise ValueError(
                f"ETC drops each image's visual entries from the cache, which needs a DynamicCache; got a "
                f"{type(cache).__name__} (e.g. generate(cache_implementation='static')): use the default dynamic cache"
            )

    def _etc_decode_inputs(self, input_ids, attention_mask, position_ids, cache) -> dict:
        if input_ids is None:
            raise ValueError("ETC decoding needs input_ids")
        if position_ids is not None and position_ids.dim() == 3:
            position_ids = position_ids[-3:]  # generate()'s M-RoPE (4, B, q): drop the text row, keep the 3 axes
        mask, positions = cache.etc_state.decode_inputs(
            cache.get_seq_length(), input_ids.shape[1], attention_mask, position_ids
        )
        return {"attention_mask": mask, "position_ids": self._etc_text_positions(positions)}

    @dispatch
    def _etc_continue(
        self, original_forward, base_kwargs, visual_inputs, visual_kwargs, input_ids, attention_mask, position_ids,
        cache, etc_prefill_method, inputs_embeds=None,
    ):  # fmt: skip
        """New tokens on a cache that holds a compressed prefill: decoding, the question after a reused image cache,
        or a later turn of a conversation (with or without new images).

        `input_ids` may be the whole conversation or only its new tokens: the cache knows how many user tokens it
        holds (`ETCCacheState.covered_length`), and `attention_mask` (when given) covers the whole conversation, as
        generate() makes it; the new tokens are the last `mask length - covered` columns. Images already in the
        cache may be passed again (generate() re-sends the conversation's pixel values) or not: only the new
        images' placeholders are compressed, against the cache. With the user's `inputs_embeds` `(B, L, H)` (then
        `input_ids` are their placeholder ids), the new columns are taken from them the same way."""
        step = self._etc_continuation(visual_inputs, input_ids, attention_mask, position_ids, cache, inputs_embeds)
        if step.new_images is None:  # text only: the cached images are in the cache already
            base_kwargs.update({name: None for name in visual_kwargs}, mm_encoder_outputs=None)
            base_kwargs.update(attention_mask=step.attention_mask, position_ids=step.position_ids)
            if step.inputs_embeds is None:
                base_kwargs.update(input_ids=step.input_ids)
            else:
                base_kwargs.update(inputs_embeds=step.inputs_embeds)
            return original_forward(**base_kwargs)
        # New images: compress them against the cache (segmented prefill of the new tokens).
        new = step.input_ids.shape[1]
        prepared = self._etc_prepare_inputs(
            step.input_ids, step.attention_mask[:, -new:], step.position_ids, step.new_images, step.inputs_embeds
        )
        return self._etc_prefill(
            prepared,
            step.total,
            cache,
            etc_prefill_method or self.etc.prefill_method,
            logits_to_keep=base_kwargs.get("logits_to_keep", 1),
            past_valid=step.attention_mask[:, :-new].bool(),
            past_offset=cache.etc_state.position_offset,
        )

    @host_side
    def _etc_continuation(self, visual_inputs, input_ids, attention_mask, position_ids, cache, inputs_embeds):
        """The new tokens of a call on a compressed cache (see `_etc_continue`) and what they need: a
        `Continuation`."""
        if input_ids is None:
            raise ValueError("ETC: continuing a compressed cache needs input_ids or inputs_embeds")
        has_visual_inputs = self._has_visual_inputs(visual_inputs)
        input_ids, position_ids, covered, new = new_tokens(cache, input_ids, attention_mask, position_ids)
        if inputs_embeds is not None:
            inputs_embeds = inputs_embeds[:, -new:]  # (B, new, H)
        visual_token_mask = self._visual_token_mask(input_ids)
        decode_inputs = self._etc_decode_inputs(input_ids, attention_mask, position_ids, cache)
        step = Continuation(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=decode_inputs["attention_mask"],
            position_ids=decode_inputs["position_ids"],
            total=covered + new,
        )
        generated = new == 1 and not has_visual_inputs  # one decoding step: an image token id here is generated text
        if generated or not bool(visual_token_mask.any()):
            return step
        if not has_visual_inputs:
            raise ValueError("ETC: the new tokens contain image tokens but no pixel values were given")
        past_images = cache.etc_state.position_offset // self.etc.config.num_compression_tokens  # (B,)
        step.new_images = self._etc_new_images(visual_inputs, visual_token_mask, past_images)
        return step

    def _etc_new_images(self, visual_inputs: dict, visual_token_mask, past_images) -> dict:
        """`visual_inputs` restricted to the images of the new tokens: all of them when only those were passed,
        else (the whole conversation's, as generate() re-sends them) each row's images after its cached ones."""
        spans_per_row = self._etc_count_images(visual_token_mask)  # (B,) new images per row
        given = self._etc_num_images(visual_inputs)
        new_total, past_total = int(spans_per_row.sum()), int(past_images.sum())
        if given == new_total:
            return visual_inputs
        if given != new_total + past_total:
            raise ValueError(
                f"ETC: the new tokens hold {new_total} image(s) and the cache {past_total}; got {given} image(s): pass "
                "either the new images only or every image of the conversation"
            )
        index, start = [], 0
        for row_past, row_new in zip(past_images.tolist(), spans_per_row.tolist()):
            index += range(start + row_past, start + row_past + row_new)
            start += row_past + row_new
        return self._etc_select_images(visual_inputs, index)

    def _etc_count_images(self, visual_token_mask: torch.Tensor) -> torch.Tensor:
        """`(B,)` runs of visual tokens per row (one per image)."""
        starts = visual_token_mask & ~torch.nn.functional.pad(visual_token_mask[:, :-1], (1, 0))
        return starts.sum(-1)


@host_side
def _last_user_outputs(prefill, layout, keep: int) -> torch.Tensor:
    """`(B, keep, H)` outputs of the prefill's last pass that predict the successors of each row's last `keep` user
    tokens.

    Raises:
        ValueError: some of those tokens were not in the last pass (they precede the last image).
    """
    wanted = layout.next_token_index()[:, -keep:]  # (B, keep) extended positions
    rows = torch.arange(layout.batch_size, device=wanted.device)[:, None]
    column_of = torch.full((layout.batch_size, layout.length), -1, dtype=torch.long, device=wanted.device)
    valid = prefill.index >= 0
    columns = torch.arange(prefill.index.shape[1], device=wanted.device).expand_as(prefill.index)
    column_of[rows.expand_as(prefill.index)[valid], prefill.index[valid]] = columns[valid]
    found = column_of.gather(1, wanted)
    if bool((found < 0).any()):
        raise ValueError(
            f"ETC: logits_to_keep={keep} asks for outputs of tokens before the last image; the compressed prefill has "
            "outputs only for the text after it"
        )
    return prefill.hidden_states[rows, found]

