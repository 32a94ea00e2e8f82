"""The registry of baseline methods: `BaselineMethod`, the interface a training-free compressor implements, and
`register_method`. A new method is one module: a `BaselineMethod` subclass decorated with `register_method` (and an
import line in `etc_ext/baselines/__init__.py`, which sets the order of `METHODS`).

A method acts at one or more points of a model's forward; the model integration (`etc_ext.baselines.llava`) calls
it there:

- `install(model)`: hooks on the model when the baseline is applied (the vision-side methods reduce the image
  features while the images are encoded, so that `get_image_features` returns K tokens per image);
- `check_call(model, vision_feature_layer)`: arguments of a call the method cannot honour;
- `language_pass(model, inputs)`: the language model's pass over the prompt with the image features
  (`LanguageInputs`); the default replaces each image's N placeholders by its K tokens and runs the shorter
  sequence once (`model._baseline_shortened_pass`).
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Optional

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .config import BaselineConfig, VisualGeometry

__all__ = ["BaselineMethod", "LanguageInputs", "register_method", "method_class", "METHOD_CLASSES"]


@dataclass
class LanguageInputs:
    """What a method's `language_pass` gets: the prompt (user layout) with its image features.

    Attributes:
        input_ids: `(B, L)`; inputs_embeds: `(B, L, H)` (the text embeddings; the image placeholders' rows are not
            filled yet); image_features: `(I, n, H)` per image, n = K for methods that reduce while encoding, else N.
        image_token_mask: bool `(B, L)`; spans: the images' `ImageSpans`; mask: `(B, L)` attention mask (ones when
            none was given); position_ids: `(B, L)`; labels: `(B, L)` or None (answer tokens are never queries).
        cache: the `ETCCache` to fill (the prefill) or None.
    """

    input_ids: torch.Tensor
    inputs_embeds: torch.Tensor
    image_features: torch.Tensor
    image_token_mask: torch.Tensor
    spans: object
    mask: torch.Tensor
    position_ids: torch.Tensor
    labels: Optional[torch.Tensor]
    cache: object

    def with_image_features(self) -> torch.Tensor:
        """`inputs_embeds` with each image's N placeholders filled by its N features (the uncompressed prompt)."""
        return self.inputs_embeds.masked_scatter(self.image_token_mask[..., None], self.image_features)


class BaselineMethod:
    """A training-free compressor: its name, its options and what it does at each point of a model's forward (see
    the module docstring). Stateless: the options live in the `BaselineConfig` each hook receives."""

    name: ClassVar[str]
    # option -> default (None: resolved against the model), among BaselineConfig's option fields; BaselineConfig
    # accepts exactly these for this method.
    options: ClassVar[dict] = {}
    # Whether the image features leave the encoder with K tokens per image (`get_image_features` returns K).
    reduces_while_encoding: ClassVar[bool] = False

    def needs_grid(self, config: "BaselineConfig") -> bool:
        """Whether the method lays tokens out on the patch grid (so the [CLS] feature must not be among them)."""
        return False

    def check(self, config: "BaselineConfig", geometry: "VisualGeometry") -> None:
        """Raise ValueError if `config` cannot run on a model of `geometry` (beyond the common checks)."""

    def install(self, model) -> list:
        """Register the method's hooks on `model`; returns their handles."""
        return []

    def check_call(self, model, vision_feature_layer) -> None:
        """Raise ValueError for call arguments the method cannot honour."""

    def language_pass(self, model, inputs: LanguageInputs):
        """The language model over the compressed prompt: `(last hidden states (B, S, H), CompressedLayout)`."""
        return model._baseline_shortened_pass(inputs, inputs.image_features)


METHOD_CLASSES: dict = {}  # name -> BaselineMethod subclass, in registration order


def register_method(cls: type) -> type:
    """Class decorator: make `cls` (a `BaselineMethod` subclass with a `name`) available to `apply_baseline`."""
    if not (isinstance(cls, type) and issubclass(cls, BaselineMethod)):
        raise TypeError(f"register_method expects a BaselineMethod subclass, got {cls!r}")
    if cls.name in METHOD_CLASSES and METHOD_CLASSES[cls.name] is not cls:
        raise ValueError(f"a baseline method named {cls.name!r} is already registered")
    from .config import OPTION_FIELDS

    unknown = sorted(set(cls.options) - set(OPTION_FIELDS))
    if unknown:
        raise ValueError(
            f"baseline method {cls.name!r}: options {unknown} are not BaselineConfig fields (a method's options are "
            f"among {list(OPTION_FIELDS)})"
        )
    METHOD_CLASSES[cls.name] = cls
    return cls


def method_class(name: str) -> type:
    """The registered method class of `name` (ValueError naming the known ones otherwise)."""
    if name not in METHOD_CLASSES:
        raise ValueError(f"unknown baseline method {name!r}; choose one of {list(METHOD_CLASSES)}")
    return METHOD_CLASSES[name]
