"""ETC's training pass, written once for every backbone: the masked single pass and its loss, the instruction-aware
target, the teacher and the VID loss (PAPER.md)."""

from contextlib import nullcontext

import torch
from transformers.modeling_utils import slice_logits_to_keep

from ..compress import bottleneck_mask, compact_masked_pass, prefill_state, to_attention_mask
from ..dispatch import dispatch, host_side
from ..distill import (
    adapter_layers,
    adapters_disabled,
    capture_query_key,
    instruction_aware_target,
    instruction_scores_spans,
    resolve_target_layer,
)
from . import common
from .etc_hooks import ETCBackboneHooks, ETCInputs

__all__ = ["ETCTrainingMixin"]


class ETCTrainingMixin(ETCBackboneHooks):
    """The masked forward with `loss = ce_loss + vid_weight * vid_loss`, the distillation target and the teacher."""

    @dispatch
    def _etc_masked_forward(
        self, prepared: ETCInputs, input_ids, attention_mask, labels, logits_to_keep, kwargs, cache=None
    ):  # fmt: skip
        """The single pass under the bottleneck mask (training, the oracle for the prefill, and the prefill when hidden
        states are asked for).

        `kwargs["shift_labels"]` (the user's labels already shifted, as sequence parallelism passes them) go to the
        loss like `labels`; distillation then reads which tokens are answers from them. With `cache` (an empty
        `ETCCache`: the model config's `use_cache`, as Hugging Face models follow it, or a prefill), the pass also
        fills it, compacted as the masked prefill does (no gradient flows through it): generate() or a forward call
        can continue it. With `kwargs["output_hidden_states"]`, `hidden_states` holds the embeddings and every
        layer's output in the user's layout `(B, L, H)`: each user token's own state (the compression tokens' states
        are not in it). With `kwargs["output_attentions"]` (eager attention, as transformers requires), `attentions`
        holds every layer's probabilities over the extended sequence `(B, heads, Lx, Lx)`: the user's tokens with
        each image's M compression tokens right after it (`Lx = L + M * images`), padding where the row has fewer
        images; the text attends to the compression tokens, never to the visual tokens."""
        shift_labels = kwargs.get("shift_labels")
        supervised = labels is not None or shift_labels is not None
        if labels is None and shift_labels is not None:  # labels[t] = shift_labels[t - 1]: the answer tokens
            labels_for_target = torch.nn.functional.pad(shift_labels[:, :-1], (1, 0), value=-100)
        else:
            labels_for_target = labels
        layout = prepared.layout
        language_model = self.model.language_model
        mask = to_attention_mask(
            bottleneck_mask(layout), language_model.config._attn_implementation, prepared.inputs_embeds.dtype
        )
        distill = supervised and self.etc.distill is not None
        hidden_index, attention_layer = resolve_target_layer(
            self.etc.config.target_layer, language_model.config.num_hidden_layers
        )
        final = hidden_index == language_model.config.num_hidden_layers
        hidden_request = self._etc_output_option(kwargs, "output_hidden_states")  # True, or a list of layer indices
        all_hidden_states = bool(hidden_request)
        attentions = bool(self._etc_output_option(kwargs, "output_attentions"))
        if attentions and language_model.config._attn_implementation != "eager":
            raise ValueError(
                "output_attentions needs eager attention (model.set_attn_implementation('eager')), as in transformers; "
                f"this model uses {language_model.config._attn_implementation!r}"
            )
        outputs = self._etc_language_model(
            language_model,
            prepared.inputs_embeds,
            mask,
            layout.position_ids,
            cache,
            prepared.token_inputs,
            output_hidden_states=True if all_hidden_states else ([hidden_index] if distill and not final else None),
            output_attentions=attentions or None,
        )
        hidden_states = outputs.last_hidden_state  # (B, Lx, H)
        if cache is not None:
            with torch.no_grad():
                cache.etc_state = prefill_state(layout, compact_masked_pass(layout, cache), input_ids.shape[1])

        # Logits in the user's layout: the output that predicts each user token's successor.
        rows = torch.arange(layout.batch_size, device=hidden_states.device)[:, None]
        user_hidden = hidden_states[rows, layout.next_token_index()]  # (B, L, H)
        if not supervised:
            user_hidden = slice_logits_to_keep(user_hidden, logits_to_keep)
        logits = self.lm_head(user_hidden)

        loss = ce_loss = vid_loss = None
        if supervised:
            ce_loss = self.loss_function(
                logits=logits,
                labels=labels,
                vocab_size=self.config.text_config.vocab_size,
                num_items_in_batch=kwargs.get("num_items_in_batch"),
                shift_labels=shift_labels,
            )
            loss = ce_loss
            if distill:
                student_states = hidden_states if final else outputs.hidden_states[hidden_index]  # (B, Lx, H)
                vid_loss = self._etc_distill_loss(
                    prepared, input_ids, attention_mask, labels_for_target, student_states, hidden_index,
                    attention_layer,
                )
                loss = ce_loss + self.etc.config.vid_weight * vid_loss
        user_states = None
        if all_hidden_states:  # each user token's own state, layer by layer
            user_states = _requested_states(
                [states[rows, layout.ext_index] for states in outputs.hidden_states], hidden_request
            )
        return self.etc_output_class(
            loss=loss, logits=logits, cache=cache, hidden_states=user_states,
            attentions=outputs.attentions if attentions else None, ce_loss=ce_loss, vid_loss=vid_loss,
            **prepared.encoder_outputs,
        )  # fmt: skip

    def _etc_output_option(self, kwargs: dict, name: str):
        """`output_hidden_states` / `output_attentions` of a call: the argument, else the model config's default (as
        transformers' models resolve them)."""
        value = kwargs.get(name)
        return getattr(self.config, name, False) if value is None else value

    @host_side  # under torch.compile the distillation (teacher pass, decoder) runs eagerly
    def _etc_distill_loss(
        self, prepared: ETCInputs, input_ids, attention_mask, labels, student_states, hidden_index, attention_layer
    ) -> torch.Tensor:
        """The distillation loss: the decoder predicts X^ from the compression tokens' and the instruction's states
        at the target layer."""
        grids = self._etc_decoder_grids(prepared)
        layout, spans = prepared.layout, prepared.spans
        parts = self._etc_target(
            prepared, input_ids, attention_mask, labels, hidden_index, attention_layer, student_states
        )
        target = parts["target"]
        if grids is None:  # a decoder of fixed N: every image must have N tokens
            num_visual = self.etc.config.num_visual_tokens
            if bool((spans.num_tokens != num_visual).any()):
                raise ValueError(
                    f"ETC distillation: images have {spans.num_tokens.tolist()} visual tokens, the decoder was "
                    f"built for num_visual_tokens={num_visual}"
                )
            target = torch.stack(target)  # (I, N, D)
        instruction_index = parts["instruction_index"]
        rows = spans.row[:, None]
        compression_hidden = student_states[rows.expand_as(layout.compression_index), layout.compression_index]
        # Mean of the instruction tokens' states (zeros for an image without instruction), extended layout.
        ext_instruction = layout.ext_index[rows, instruction_index.clamp_min(0)]  # (I, T)
        valid = (instruction_index >= 0)[..., None].to(student_states.dtype)
        instruction_sum = (student_states[rows, ext_instruction] * valid).sum(1)  # (I, H)
        instruction_hidden = instruction_sum / valid.sum(1).clamp_min(1.0)
        return self.etc.distill(compression_hidden, instruction_hidden, target, grid_sizes=grids)

    def _etc_target(
        self, prepared: ETCInputs, input_ids, attention_mask, labels, hidden_index, attention_layer, student_states
    ) -> dict:
        """The distillation target: a dict with `target` (a list of X^ `(N_i, D)` float32), `scores` (a list of
        `(N_i,)`, before min-max) and `instruction_index` `(I, T)` (user positions, -1 = none)."""
        config = self.etc.config
        spans = prepared.spans
        instruction_index = common.query_index(spans, prepared.visual_token_mask, attention_mask, labels)
        teacher_states, recorder = self._etc_teacher_pass(
            prepared, input_ids, attention_mask, hidden_index, attention_layer
        )
        rows = spans.row
        key_mask = None if attention_mask is None else attention_mask.bool()[rows]
        with torch.no_grad():
            scores = instruction_scores_spans(
                recorder.query[rows],
                recorder.key[rows],
                instruction_index,
                spans.start,
                spans.end,
                key_mask=key_mask,
                score_context=config.score_context,
                scale=recorder.scale,
            )  # I x (N_i,)
            targets = []
            for k in range(len(spans)):
                row, start, end = int(spans.row[k]), int(spans.start[k]), int(spans.end[k])
                if config.target_source == "teacher" or student_states is None:
                    visual_hidden = teacher_states[row, start:end]  # (N_i, D)
                else:
                    visual_hidden = student_states.detach()[row, prepared.layout.ext_index[row, start:end]]
                targets.append(instruction_aware_target(visual_hidden, scores[k], config.alpha))
        return {"target": targets, "scores": scores, "instruction_index": instruction_index}

    @torch.no_grad()
    def _etc_instruction_target(self, prepared: ETCInputs, input_ids, attention_mask, labels) -> dict:
        """`_etc_target` at the configured target layer, from the teacher's states (the public helpers'
        `instruction_target`)."""
        hidden_index, attention_layer = resolve_target_layer(
            self.etc.config.target_layer, self.model.language_model.config.num_hidden_layers
        )
        return self._etc_target(prepared, input_ids, attention_mask, labels, hidden_index, attention_layer, None)

    @torch.no_grad()
    def _etc_teacher_pass(self, prepared: ETCInputs, input_ids, attention_mask, hidden_index, attention_layer):
        """The unmasked, no-grad pass over the user's sequence (no compression tokens, the user's positions) that
        gives the scores and X_v. Returns the hidden states at the target layer `(B, L, D)` and the recorder with
        the score layer's q/k."""
        modules, context = self._etc_teacher()
        language_model = modules["language_model"]
        with context:
            inputs_embeds, token_inputs = self._etc_teacher_inputs(prepared, input_ids, modules)
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            final = hidden_index == language_model.config.num_hidden_layers
            with capture_query_key(language_model.config, attention_layer) as recorder:
                outputs = self._etc_language_model(
                    language_model,
                    inputs_embeds,
                    mask,
                    prepared.position_ids,
                    None,
                    token_inputs,
                    output_hidden_states=None if final else [hidden_index],
                    **recorder.kwargs,
                )
        states = outputs.last_hidden_state if final else outputs.hidden_states[hidden_index]
        return states, recorder

    def _etc_teacher(self) -> tuple[dict, object]:
        """The teacher's modules (name -> module, `language_model` always) and the context to run them in.

        teacher="frozen": with peft, the model's own modules with the adapters off; under full fine-tuning, the
        frozen snapshot of the starting model. teacher="self": the current language model, no mask, no grad."""
        if self.etc.config.teacher == "frozen":
            peft_layers = adapter_layers(self)
            if peft_layers:
                return self._etc_teacher_modules(peft_layers), adapters_disabled(peft_layers)
            teacher = common.frozen_teacher(self, lambda base: base._etc_teacher_modules())
            return dict(teacher.named_children()), nullcontext()
        return {"language_model": self.model.language_model}, nullcontext()


def _requested_states(states: list, request) -> tuple:
    """The hidden states `output_hidden_states` asks for: all of them (True), or those at the listed indices (as
    transformers' models take a list of layer indices, negative ones counting from the end), None elsewhere."""
    if not isinstance(request, (list, tuple)):
        return tuple(states)
    kept = {index % len(states) for index in request}
    return tuple(state if index in kept else None for index, state in enumerate(states))
