"""ETCConfig: the hyper-parameters of ETC (see PAPER.md), saved as json beside the ETC weights."""

import copy
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["ETCConfig"]

_LOSSES = ("vid", "mse", "none")
_TEACHERS = ("frozen", "self")
_TARGET_SOURCES = ("teacher", "student")
_SCORE_CONTEXTS = ("causal", "image")


# The decoder width apply_etc picks at most (LLaVA-1.5-7B, Qwen3-VL-2B); smaller models get their hidden size.
MAX_DEFAULT_DECODER_HIDDEN_SIZE = 1024


@dataclass
class ETCConfig:
    r"""
    Configuration of ETC (Extreme Token Compression).

    Args:
        num_compression_tokens (`int`, *optional*, defaults to 1):
            M, the number of learnable compression tokens inserted right after each image's visual tokens. After the
            prefill the KV cache holds M entries per image instead of N.
        alpha (`float`, *optional*, defaults to 0.6):
            Strength of the instruction-aware weighting of the distillation target,
            `X^ = X_v * (1 - alpha + alpha * minmax(scores))`; 0 gives the plain hidden states.
        vid_weight (`float`, *optional*, defaults to 1e-5):
            lambda in `loss = CE + lambda * L_distill` (L_VID sums N * D terms, hence the small value).
        target_layer (`int`, *optional*, defaults to -1):
            Index into the language model's `hidden_states` tuple (the Transformers convention: 0 is the input
            embeddings, `num_hidden_layers` or -1 the final normalised output) at which the target X_v and the decoder
            inputs are taken. The text-to-image scores come from the attention of the decoder layer that produces
            those hidden states (layer 0 for the input embeddings).
        loss (`str`, *optional*, defaults to `"vid"`):
            Distillation loss: `"vid"` (Gaussian likelihood with learned per-channel variances), `"mse"`
            (`0.5 * sum (X^ - mu)^2`, i.e. VID with unit variances) or `"none"` (cross-entropy only).
        teacher (`str`, *optional*, defaults to `"frozen"`):
            Model of the no-grad, unmasked pass that gives the scores (and X_v): `"frozen"` is the starting model
            (with LoRA the same model with its adapters disabled, with full fine-tuning a frozen snapshot of the
            projector and language model), `"self"` the current model without the bottleneck mask.
        target_source (`str`, *optional*, defaults to `"teacher"`):
            Whose hidden states X_v are: `"teacher"` (the unmasked teacher pass) or `"student"` (the model's own
            visual hidden states in the masked pass, detached). PAPER.md leaves this open.
        score_context (`str`, *optional*, defaults to `"causal"`):
            Normalisation of the attention probabilities: `"causal"` over the whole causal context, as eager
            attention's probabilities (what the paper reads), or `"image"` renormalised over the image's visual tokens.
        decoder_hidden_size (`int`, *optional*):
            Width of the training-only MLP decoder that predicts mu [N, D]. Defaults to the language model's hidden
            size, at most `MAX_DEFAULT_DECODER_HIDDEN_SIZE` (1024), filled in by `apply_etc`: the decoder scales with
            the model (LLaVA-1.5-7B and Qwen3-VL-2B get 1024, a test-sized model a decoder of its own size).
        decoder_num_layers (`int`, *optional*, defaults to 2):
            Number of residual MLP blocks of the decoder.
        decoder_intermediate_size (`int`, *optional*):
            Inner width of the decoder's MLP blocks, defaults to `4 * decoder_hidden_size`.
        variance_eps (`float`, *optional*, defaults to 1e-6):
            eps in `sigma_d^2 = softplus(w_d) + eps`.
        freeze_vision_tower (`bool`, *optional*, defaults to `True`):
            Whether `apply_etc` freezes the vision tower (the paper trains projector, LLM and compression tokens).
        hidden_size (`int`, *optional*):
            Hidden size of the language model; filled in by `apply_etc` and checked on loading.
        num_visual_tokens (`int`, *optional*):
            N, visual tokens per image, for models whose images all have N tokens (LLaVA-1.5); for models whose
            images have variable N (Qwen3-VL) the size of the decoder's square grid of position embeddings, which is
            resampled to each image's grid. Filled in by `apply_etc` and checked on loading.
    """

    num_compression_tokens: int = 1
    alpha: float = 0.6
    vid_weight: float = 1e-5
    target_layer: int = -1
    loss: str = "vid"
    teacher: str = "frozen"
    target_source: str = "teacher"
    score_context: str = "causal"
    decoder_hidden_size: Optional[int] = None
    decoder_num_layers: int = 2
    decoder_intermediate_size: Optional[int] = None
    variance_eps: float = 1e-6
    freeze_vision_tower: bool = True
    hidden_size: Optional[int] = None
    num_visual_tokens: Optional[int] = None

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        _check_int("num_compression_tokens", self.num_compression_tokens, minimum=1)
        _check_number("alpha", self.alpha)
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"ETCConfig.alpha must be in [0, 1], got {self.alpha}")
        _check_number("vid_weight", self.vid_weight)
        if self.vid_weight < 0:
            raise ValueError(f"ETCConfig.vid_weight must be >= 0, got {self.vid_weight}")
        _check_int("target_layer", self.target_layer)
        _check_choice("loss", self.loss, _LOSSES)
        _check_choice("teacher", self.teacher, _TEACHERS)
        _check_choice("target_source", self.target_source, _TARGET_SOURCES)
        _check_choice("score_context", self.score_context, _SCORE_CONTEXTS)
        if self.decoder_hidden_size is not None:
            _check_int("decoder_hidden_size", self.decoder_hidden_size, minimum=1)
        _check_int("decoder_num_layers", self.decoder_num_layers, minimum=0)
        if self.decoder_intermediate_size is not None:
            _check_int("decoder_intermediate_size", self.decoder_intermediate_size, minimum=1)
        _check_number("variance_eps", self.variance_eps)
        if self.variance_eps <= 0:
            raise ValueError(f"ETCConfig.variance_eps must be > 0, got {self.variance_eps}")
        if not isinstance(self.freeze_vision_tower, bool):
            raise ValueError(f"ETCConfig.freeze_vision_tower must be a bool, got {self.freeze_vision_tower!r}")
        for name in ("hidden_size", "num_visual_tokens"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)

    @property
    def intermediate_size(self) -> int:
        """Inner width of the decoder's MLP blocks."""
        if self.decoder_hidden_size is None:
            raise ValueError("ETCConfig.decoder_hidden_size is not set yet (apply_etc fills it in from the model)")
        return self.decoder_intermediate_size or 4 * self.decoder_hidden_size

    @staticmethod
    def default_decoder_hidden_size(hidden_size: int) -> int:
        """The decoder width `apply_etc` picks for a language model of `hidden_size`."""
        return min(hidden_size, MAX_DEFAULT_DECODER_HIDDEN_SIZE)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, config_dict: dict) -> "ETCConfig":
        if not isinstance(config_dict, dict):
            raise ValueError(f"ETCConfig.from_dict expects a dict, got {type(config_dict).__name__}")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(config_dict) - known)
        if unknown:
            raise ValueError(f"ETCConfig.from_dict: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**config_dict)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike) -> None:
        with open(json_file_path, "w", encoding="utf-8") as writer:
            writer.write(self.to_json_string())

    @classmethod
    def from_json_file(cls, json_file_path: str | os.PathLike) -> "ETCConfig":
        with open(json_file_path, encoding="utf-8") as reader:
            try:
                config_dict = json.load(reader)
            except json.JSONDecodeError as error:
                raise ValueError(f"ETCConfig.from_json_file: {json_file_path} is not valid json ({error})") from error
        return cls.from_dict(config_dict)

    def replace(self, **changes: Any) -> "ETCConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(copy.deepcopy(self), **changes)

    def differences(self, other: "ETCConfig", fields: Optional[tuple] = None) -> list[str]:
        """`"name: self_value != other_value"` for each differing field (all fields by default)."""
        names = fields or [field.name for field in dataclasses.fields(self)]
        return [
            f"{name}: {getattr(self, name)!r} != {getattr(other, name)!r}"
            for name in names
            if getattr(self, name) != getattr(other, name)
        ]


def _check_int(name: str, value: Any, minimum: Optional[int] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"ETCConfig.{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"ETCConfig.{name} must be >= {minimum}, got {value}")


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"ETCConfig.{name} must be a number, got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"ETCConfig.{name} must be one of {list(choices)}, got {value!r}")
