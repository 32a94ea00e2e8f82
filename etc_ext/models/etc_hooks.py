"""The contract between ETC and a backbone: the inputs an adapter prepares (`ETCInputs`) and the hooks it
implements (`ETCBackboneHooks`). See docs/new_backbone.md."""

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..compress import ETCLayout, ImageSpans

__all__ = ["ETCInputs", "ETCBackboneHooks", "NO_TOKEN", "placeholder_input_ids", "user_embeddings"]

# The id `placeholder_input_ids` gives the positions of user embeddings that are no placeholder: no token of the
# vocabulary, so that re-embedding them fails loudly instead of silently replacing the user's embeddings.
NO_TOKEN = -1


@dataclass
class ETCInputs:
    """A batch prepared for ETC by a backbone's `_etc_prepare`.

    Attributes:
        layout: the extended sequence (M compression tokens after each image).
        inputs_embeds: `(B, Lx, H)` extended embeddings.
        visual_token_mask: `(B, L)` the visual placeholders of the user's sequence.
        position_ids: the user's positions (`(B, L)`, or `(3, B, L)` for M-RoPE): the teacher pass runs on them.
        token_inputs: per-token extras every language-model pass of the extended sequence gets (DeepStack),
            extended layout; empty when the backbone has none.
        grids: int64 `(I, 3)` `(t, h, w)` token grid of each image for a decoder of variable N, else None.
        encoder_outputs: the vision encoder's outputs as the model's output dataclass names them
            (`image_outputs`, ...).
        teacher_inputs: what the backbone's teacher pass reuses (e.g. the projector's input), backbone-specific.
        user_embeds: `(B, L, H)` the user's `inputs_embeds` when they were given instead of input_ids (the teacher
            pass embeds the text with them too), else None.
    """

    layout: ETCLayout
    inputs_embeds: torch.Tensor
    visual_token_mask: torch.Tensor
    position_ids: torch.Tensor
    token_inputs: dict = field(default_factory=dict)
    grids: Optional[torch.Tensor] = None
    encoder_outputs: dict = field(default_factory=dict, repr=False)
    teacher_inputs: dict = field(default_factory=dict, repr=False)
    user_embeds: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def spans(self) -> ImageSpans:
        return self.layout.spans


def placeholder_input_ids(inputs_embeds: torch.Tensor, embedding: nn.Module, token_ids: tuple) -> torch.Tensor:
    """The token structure of user embeddings `(B, L, H)`: `(B, L)` ids holding each of `token_ids` (the visual
    placeholders) where the embedding equals that token's embedding (as transformers' `get_placeholder_mask` finds
    placeholders in inputs_embeds), `NO_TOKEN` elsewhere."""
    ids = torch.full(inputs_embeds.shape[:2], NO_TOKEN, dtype=torch.long, device=inputs_embeds.device)
    for token_id in token_ids:
        token_embedding = embedding(torch.tensor(token_id, device=embedding.weight.device))  # (H,)
        matches = (inputs_embeds == token_embedding.to(inputs_embeds.device, inputs_embeds.dtype)).all(-1)  # (B, L)
        ids = ids.masked_fill(matches, token_id)
    return ids


def user_embeddings(embedding: nn.Module, input_ids: torch.Tensor, user_embeds=None) -> torch.Tensor:
    """`(B, L, H)` embeddings of the user's sequence: the user's own (`inputs_embeds`) when given, else
    `embedding(input_ids)`."""
    return embedding(input_ids) if user_embeds is None else user_embeds


class ETCBackboneHooks:
    """What a backbone's ETC class implements (the "adapter"); `ETCMixin` calls these. The family's inputs mixin
    (e.g. `etc_ext.models.llava.LlavaInputsMixin`, shared with the baselines) provides `forward`,
    `_visual_token_mask`, `_placeholder_token_ids` and `_has_visual_inputs`."""

    @classmethod
    def etc_visual_token_count(cls, config) -> tuple[int, Optional[tuple[int, int]]]:
        """`ETCConfig.num_visual_tokens` for a model of this config, and the decoder's position grid (None for a
        fixed N)."""
        raise NotImplementedError

    def _etc_vision_tower(self) -> nn.Module:
        """The vision encoder (`ETCConfig.freeze_vision_tower` freezes it)."""
        raise NotImplementedError

    def _visual_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """bool `(B, L)`: the visual placeholders in `input_ids`."""
        raise NotImplementedError

    def _placeholder_token_ids(self) -> tuple:
        """The token ids of the visual placeholders (found by their embeddings when the user gives inputs_embeds)."""
        raise NotImplementedError

    def _has_visual_inputs(self, visual_inputs: dict) -> bool:
        """Whether the call brings images (pixels or generate()'s encoder outputs)."""
        raise NotImplementedError

    def _etc_check_visual_inputs(self, visual_inputs: dict) -> None:
        """Raise for image arguments that cannot go together (e.g. pixels and their encoder outputs)."""

    def _etc_prepare(
        self, input_ids, attention_mask, position_ids, visual_inputs: dict, user_embeds=None
    ) -> ETCInputs:  # fmt: skip
        """Encode the images and build the extended inputs (`ETCInputs`); `user_embeds` `(B, L, H)`: the user's
        inputs_embeds (then `input_ids` are `placeholder_input_ids`), used for the text instead of embedding
        `input_ids`."""
        raise NotImplementedError

    def _etc_num_images(self, visual_inputs: dict) -> int:
        """How many images `visual_inputs` holds (for images added to a compressed cache)."""
        raise NotImplementedError(
            f"ETC: adding images to a cache that holds a compressed prefill is not implemented for "
            f"{self.etc_base_class.__name__} yet; prefill the whole conversation into a new cache instead."
        )

    def _etc_select_images(self, visual_inputs: dict, index: list) -> dict:
        """`visual_inputs` with only the images at `index` (in the order images are given)."""
        raise NotImplementedError

    def _etc_token_kwargs(self, **token_inputs) -> dict:
        """Language-model keyword arguments made from `ETCInputs.token_inputs` (none by default)."""
        return {}

    def _etc_teacher_modules(self, peft_layers: Optional[list] = None) -> dict:
        """The modules the teacher runs (name -> module, `language_model` always): what the frozen snapshot copies
        (no `peft_layers`), or, with peft, what runs with the adapters off."""
        raise NotImplementedError

    def _etc_teacher_inputs(self, prepared: ETCInputs, input_ids, modules: dict) -> tuple[torch.Tensor, dict]:
        """The teacher pass's `(B, L, H)` input embeddings of the user's sequence (the text's from
        `prepared.user_embeds` when the user gave embeddings) and its token inputs."""
        raise NotImplementedError

    def _etc_decoder_grids(self, prepared: ETCInputs) -> Optional[torch.Tensor]:
        """`(I, 3)` grids for a decoder of variable N (raise when they are needed and missing), None for fixed N."""
        return None

    def _etc_text_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Decoding positions `(B, q)` of text tokens in the form the language model takes."""
        return positions
