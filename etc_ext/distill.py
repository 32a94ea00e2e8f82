"""The instruction-aware distillation target and the VID loss (PAPER.md, "Instruction-aware target" and "VID").

- The target: `X^ = X_v * (1 - alpha + alpha * minmax(scores))`, where X_v are the hidden states of an image's visual
  tokens at the target layer and `scores` the attention of the instruction tokens on them at that layer, averaged
  over heads and instruction tokens. The scores come from a no-grad pass without the bottleneck mask; its queries and
  keys are recorded by a registered attention function (`capture_query_key`), never with `output_attentions`, so the
  model keeps SDPA, and reduced with the fused `etc_ext.ops.cross_attn_scores`.
- The decoder: an MLP from the compression tokens' and the mean-pooled instruction's hidden states to mu `(N, D)`.
  Its per-position embedding is a table of N entries (LLaVA: every image has the same N), or, for models whose
  images have variable N (Qwen3-VL), a 2-D grid of learned embeddings resampled bilinearly to each image's grid.
- The loss: `L_VID = sum_d [ sum_n (X^_nd - mu_nd)^2 / (2 sigma_d^2) + N log sigma_d ]` with learned per-channel
  variances `sigma_d^2 = softplus(w_d) + eps`; `"mse"` is `0.5 * sum (X^ - mu)^2` (unit variances) for the ablation.
"""

import math
from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import ops
from .config import ETCConfig

__all__ = [
    "CAPTURE_ATTENTION",
    "QueryKeyRecorder",
    "capture_query_key",
    "resolve_target_layer",
    "instruction_scores",
    "instruction_scores_spans",
    "minmax_normalize",
    "instruction_aware_target",
    "VIDDecoder",
    "vid_loss",
    "mse_loss",
    "DistillHead",
    "adapter_layers",
    "adapters_disabled",
]


# ============================================================================ q/k capture
CAPTURE_ATTENTION = "etc_capture"


class QueryKeyRecorder:
    """Holds the query `(B, H, L, D)` and key `(B, Hkv, L, D)` states (after RoPE and any q/k norm, exactly as the
    attention function receives them) of one decoder layer, and that layer's softmax scale."""

    def __init__(self, layer_idx: int):
        self.layer_idx = layer_idx
        self.query: Optional[torch.Tensor] = None
        self.key: Optional[torch.Tensor] = None
        self.scale: Optional[float] = None

    @property
    def kwargs(self) -> dict:
        """Keyword arguments to pass to the language model's forward; they reach every attention function."""
        return {"etc_qk_recorder": self}


def _capture_attention_forward(module, query, key, value, attention_mask, etc_qk_recorder=None, **kwargs):
    """SDPA attention that also hands the target layer's query/key states to the recorder passed in kwargs."""
    if etc_qk_recorder is not None and getattr(module, "layer_idx", None) == etc_qk_recorder.layer_idx:
        etc_qk_recorder.query, etc_qk_recorder.key = query, key
        etc_qk_recorder.scale = kwargs.get("scaling", getattr(module, "scaling", None))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


# The documented extension point: a named attention function (and its mask builder, SDPA's).
AttentionInterface.register(CAPTURE_ATTENTION, _capture_attention_forward)
AttentionMaskInterface.register(CAPTURE_ATTENTION, sdpa_mask)


@contextmanager
def capture_query_key(config, layer_idx: int):
    """Run a language model with the capturing SDPA attention: `with capture_query_key(lm.config, 5) as rec:
    lm(..., **rec.kwargs)`; afterwards `rec.query` and `rec.key` hold layer 5's states. The previous attention
    implementation is restored on exit. (An eager model runs this pass with SDPA: the same attention, no weights.)"""
    recorder = QueryKeyRecorder(layer_idx)
    previous = config._attn_implementation
    config._attn_implementation = CAPTURE_ATTENTION
    try:
        yield recorder
    finally:
        config._attn_implementation = previous


def resolve_target_layer(target_layer: int, num_hidden_layers: int) -> tuple[int, int]:
    """`(hidden_index, attention_layer)`: the index into the `hidden_states` tuple (0 = embeddings,
    `num_hidden_layers` = final normalised output) and the decoder layer whose attention gives the scores (the one
    that produces those hidden states; layer 0 for the embeddings)."""
    num_states = num_hidden_layers + 1
    if not -num_states <= target_layer < num_states:
        raise ValueError(
            f"ETCConfig.target_layer={target_layer} is out of range for a language model with {num_hidden_layers} "
            f"layers (hidden_states has {num_states} entries: use -{num_states}..{num_states - 1})"
        )
    hidden_index = target_layer % num_states
    return hidden_index, max(hidden_index - 1, 0)


# ============================================================================ target
def instruction_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    query_index: torch.Tensor,
    visual_index: torch.Tensor,
    key_mask: Optional[torch.Tensor] = None,
    score_context: str = "causal",
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Text-to-image attention of each image's instruction tokens on its visual tokens, float32 `(I, N)`.

    Args:
        query: `(I, H, L, D)` query states of the row holding each image, at the score layer.
        key: `(I, Hkv, L, D)` key states of that row (the layer's whole key sequence).
        query_index: int64 `(I, T)` positions of the image's instruction tokens, -1 = none.
        visual_index: int64 `(I, N)` positions of the image's visual tokens.
        key_mask: bool `(I, L)`, True = real key (padding excluded).
        score_context: "causal": probabilities over each query's causal context, exactly what eager attention
            returns (the caller keeps the visual columns); "image": renormalised over the image's visual tokens.
        scale: softmax scale of the layer (default D ** -0.5).
    """
    q_index = query_index.clamp_min(0)
    q = query.gather(2, q_index[:, None, :, None].expand(-1, query.shape[1], -1, query.shape[3]))  # (I, H, T, D)
    q_mask = query_index >= 0
    if score_context == "causal":
        scores = ops.cross_attn_scores(q, key, scale=scale, q_mask=q_mask, kv_mask=key_mask, q_pos=q_index)  # (I, L)
        return scores.gather(1, visual_index)
    if score_context == "image":
        k = key.gather(2, visual_index[:, None, :, None].expand(-1, key.shape[1], -1, key.shape[3]))  # (I, Hkv, N, D)
        return ops.cross_attn_scores(q, k, scale=scale, q_mask=q_mask)
    raise ValueError(f"score_context must be 'causal' or 'image', got {score_context!r}")


def instruction_scores_spans(
    query: torch.Tensor,
    key: torch.Tensor,
    query_index: torch.Tensor,
    visual_start: torch.Tensor,
    visual_end: torch.Tensor,
    key_mask: Optional[torch.Tensor] = None,
    score_context: str = "causal",
    scale: Optional[float] = None,
) -> list[torch.Tensor]:
    """`instruction_scores` for images of different sizes: image i's visual tokens are positions
    `visual_start[i]:visual_end[i]` of its row. Returns one float32 `(N_i,)` tensor per image.

    Args:
        query, key, query_index, key_mask, scale: as in `instruction_scores`.
        visual_start, visual_end: int64 `(I,)` bounds of each image's visual run.
        score_context: "causal" (probabilities over each query's causal context, the visual columns kept) or
            "image" (renormalised over the image's own visual tokens, i.e. the other keys masked out).
    """
    q_index = query_index.clamp_min(0)
    q = query.gather(2, q_index[:, None, :, None].expand(-1, query.shape[1], -1, query.shape[3]))  # (I, H, T, D)
    q_mask = query_index >= 0
    if score_context == "causal":
        scores = ops.cross_attn_scores(q, key, scale=scale, q_mask=q_mask, kv_mask=key_mask, q_pos=q_index)  # (I, L)
    elif score_context == "image":
        positions = torch.arange(key.shape[2], device=key.device)[None]
        own = (positions >= visual_start[:, None]) & (positions < visual_end[:, None])  # (I, L)
        scores = ops.cross_attn_scores(q, key, scale=scale, q_mask=q_mask, kv_mask=own)
    else:
        raise ValueError(f"score_context must be 'causal' or 'image', got {score_context!r}")
    return [scores[i, int(visual_start[i]) : int(visual_end[i])] for i in range(scores.shape[0])]


def minmax_normalize(scores: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each row of `(I, N)` to [0, 1]; a constant row becomes all ones (keep every token)."""
    low = scores.amin(-1, keepdim=True)
    span = scores.amax(-1, keepdim=True) - low
    normalized = (scores - low) / span.clamp_min(torch.finfo(scores.dtype).tiny)
    return torch.where(span > 0, normalized, torch.ones_like(scores))


def instruction_aware_target(visual_hidden: torch.Tensor, scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """`X^ = X_v * (1 - alpha + alpha * minmax(scores))`, float32 `(I, N, D)` from X_v `(I, N, D)`, scores `(I, N)`."""
    weight = 1.0 - alpha + alpha * minmax_normalize(scores.float())
    return visual_hidden.float() * weight[..., None]


# ============================================================================ decoder and losses
class DecoderMLPBlock(nn.Module):
    """Pre-norm residual MLP block."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.norm(hidden_states)
        hidden_states = self.fc2(self.act(self.fc1(hidden_states)))
        return residual + hidden_states


class VIDDecoder(nn.Module):
    """Training-only MLP decoder: (compression tokens' hidden states, pooled instruction) -> mu `(N, D)`.

    The M compression states and the mean-pooled instruction state (each layer-normalised) are concatenated and
    projected to one context vector; a learned embedding per visual position is added, and residual MLP blocks map
    each of the N positions to its prediction. Position-wise weights keep the decoder small (no N*D output layer).

    Variable N: with `position_grid=(gh, gw)` the `gh * gw` position embeddings form a 2-D grid, which is resampled
    (bilinear, corners aligned, as Qwen3-VL's vision tower resamples its own position grid) to each image's
    `(h, w)` grid of visual tokens, and repeated over its `t` temporal steps; `forward` then takes each image's grid
    and returns the predictions of all images packed along one axis. Without a grid, every image has N tokens.
    """

    def __init__(
        self,
        hidden_size: int,
        num_compression_tokens: int,
        num_visual_tokens: int,
        decoder_hidden_size: int,
        num_layers: int,
        intermediate_size: int,
        output_size: Optional[int] = None,
        position_grid: Optional[tuple[int, int]] = None,
    ):
        super().__init__()
        if position_grid is not None and position_grid[0] * position_grid[1] != num_visual_tokens:
            raise ValueError(
                f"VIDDecoder: position_grid {tuple(position_grid)} has {position_grid[0] * position_grid[1]} entries, "
                f"num_visual_tokens is {num_visual_tokens}"
            )
        self.position_grid = tuple(position_grid) if position_grid is not None else None
        self.input_norm = nn.LayerNorm(hidden_size)
        self.context_proj = nn.Linear((num_compression_tokens + 1) * hidden_size, decoder_hidden_size)
        self.position_embedding = nn.Parameter(torch.empty(num_visual_tokens, decoder_hidden_size))
        self.reset_parameters()  # here, before the layers below draw their initial weights (same draws as always)
        self.blocks = nn.ModuleList(DecoderMLPBlock(decoder_hidden_size, intermediate_size) for _ in range(num_layers))
        self.output_norm = nn.LayerNorm(decoder_hidden_size)
        self.output_proj = nn.Linear(decoder_hidden_size, output_size or hidden_size)

    def reset_parameters(self) -> None:
        """The decoder's own parameter (its layers reset themselves)."""
        nn.init.normal_(self.position_embedding, std=0.02)

    def grid_position_embedding(self, height: int, width: int) -> torch.Tensor:
        """The position grid resampled to `(height, width)`, `(height * width, decoder_hidden_size)` in raster order
        (row-major, as the visual tokens of an image). At the grid's own size this is the table itself."""
        if self.position_grid is None:
            raise ValueError("VIDDecoder: this decoder has a fixed N (no position_grid); it takes no grid sizes")
        grid_h, grid_w = self.position_grid
        table = self.position_embedding.view(grid_h, grid_w, -1)
        if (height, width) == (grid_h, grid_w):
            return self.position_embedding
        table = table.permute(2, 0, 1)[None]  # (1, d, gh, gw)
        resampled = nn.functional.interpolate(table, size=(height, width), mode="bilinear", align_corners=True)
        return resampled[0].flatten(1).transpose(0, 1)  # (height * width, d)

    def forward(
        self,
        compression_hidden: torch.Tensor,
        instruction_hidden: torch.Tensor,
        grid_sizes: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            compression_hidden: `(I, M, hidden_size)` the compression tokens' hidden states at the target layer.
            instruction_hidden: `(I, hidden_size)` mean of the instruction tokens' hidden states there.
            grid_sizes: int `(I, 3)`, each image's `(t, h, w)` grid of visual tokens (`N_i = t * h * w`), for a decoder
                with a `position_grid`; None for a fixed N.

        Returns:
            mu `(I, N, output_size)`, or with `grid_sizes` `(sum_i N_i, output_size)`: the images' predictions one
            after the other.
        """
        context = torch.cat([compression_hidden, instruction_hidden[:, None]], dim=1)  # (I, M + 1, hidden)
        context = self.input_norm(context).flatten(1)  # (I, (M + 1) * hidden)
        context = self.context_proj(context)  # (I, d)
        if grid_sizes is None:
            hidden_states = context[:, None] + self.position_embedding[None]  # (I, N, d)
        else:
            positions, contexts = [], []
            for i, (t, h, w) in enumerate(grid_sizes.tolist()):
                positions.append(self.grid_position_embedding(h, w).repeat(t, 1))  # (N_i, d)
                contexts.append(context[i].expand(t * h * w, -1))
            hidden_states = torch.cat(contexts) + torch.cat(positions)  # (sum N_i, d)
        for block in self.blocks:
            hidden_states = block(hidden_states)
        return self.output_proj(self.output_norm(hidden_states))


def vid_loss(target: torch.Tensor, mu: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """`L_VID = sum_d [ sum_n (X^_nd - mu_nd)^2 / (2 sigma_d^2) + N log sigma_d ]`, averaged over images.

    Args:
        target: X^ `(I, N, D)`; mu: `(I, N, D)`; variance: sigma^2 `(D,)` > 0.
    """
    num_visual = target.shape[1]
    variance = variance.float()
    squared = (target.float() - mu.float()).pow(2).sum(dim=1)  # (I, D)
    per_image = (squared / (2 * variance) + num_visual * 0.5 * torch.log(variance)).sum(-1)  # (I,)
    return per_image.mean()


def mse_loss(target: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """`0.5 * sum_{n,d} (X^_nd - mu_nd)^2` averaged over images: VID with unit variances (same scale)."""
    return 0.5 * (target.float() - mu.float()).pow(2).sum(dim=(1, 2)).mean()


class DistillHead(nn.Module):
    """The training-only part of ETC: decoder and learned per-channel variances, and the distillation loss."""

    def __init__(
        self,
        config: ETCConfig,
        hidden_size: int,
        num_visual_tokens: int,
        position_grid: Optional[tuple[int, int]] = None,
    ):
        super().__init__()
        self.loss_type = config.loss
        self.variance_eps = config.variance_eps
        self.decoder = VIDDecoder(
            hidden_size=hidden_size,
            num_compression_tokens=config.num_compression_tokens,
            num_visual_tokens=num_visual_tokens,
            decoder_hidden_size=config.decoder_hidden_size,
            num_layers=config.decoder_num_layers,
            intermediate_size=config.intermediate_size,
            position_grid=position_grid,
        )
        self.variance_weight = nn.Parameter(torch.empty(hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The head's own parameter: w_d with softplus(w_d) = 1, unit variances at the start."""
        nn.init.constant_(self.variance_weight, math.log(math.e - 1.0))

    @property
    def variance(self) -> torch.Tensor:
        """sigma_d^2 = softplus(w_d) + eps, `(D,)` float32."""
        return nn.functional.softplus(self.variance_weight.float()) + self.variance_eps

    def forward(
        self,
        compression_hidden: torch.Tensor,
        instruction_hidden: torch.Tensor,
        target: torch.Tensor | list[torch.Tensor],
        grid_sizes: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Distillation loss (scalar) of target X^ given `(I, M, H)` and `(I, H)` student states.

        `target` is `(I, N, D)`; with `grid_sizes` `(I, 3)` (images of variable N, see `VIDDecoder`) a list of
        `(N_i, D)`, and the loss is the mean over images of each image's loss.
        """
        dtype = self.decoder.context_proj.weight.dtype
        mu = self.decoder(compression_hidden.to(dtype), instruction_hidden.to(dtype), grid_sizes)
        if grid_sizes is None:
            return self._loss(target, mu)
        sizes = [t.shape[0] for t in target]
        if sum(sizes) != mu.shape[0]:
            raise ValueError(f"DistillHead: the targets have {sizes} tokens, the grids {grid_sizes.tolist()}")
        losses = [self._loss(t[None], m[None]) for t, m in zip(target, mu.split(sizes))]
        return torch.stack(losses).mean()

    def _loss(self, target: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        if self.loss_type == "vid":
            return vid_loss(target, mu, self.variance)
        return mse_loss(target, mu)


# ============================================================================ teacher helpers (peft)
def adapter_layers(model: nn.Module) -> list:
    """peft layers of `model` that can be switched off (LoRA & co. layers, modules_to_save wrappers)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper
    except ImportError:  # peft is optional
        return []
    return [m for m in model.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]


@contextmanager
def adapters_disabled(layers: list):
    """Run the base model under peft: adapters (and modules_to_save copies) off, restored on exit."""
    was_disabled = [bool(layer.disable_adapters) for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer, disabled in zip(layers, was_disabled):
            layer.enable_adapters(not disabled)
