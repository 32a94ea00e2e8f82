"""The registry of baseline methods: `BaselineMethod`, the interface a training-free compressor implements, and
`register_method`. A new method is one module of `etc_ext/baselines/`: a `BaselineMethod` subclass decorated with
`register_method` (the package imports each of its modules, so the method registers itself by being there).

A method acts at one or more points of a model's forward; the model integration (`etc_ext.baselines.model`, with
an adapter per backbone) calls it there:

- `install(model)`: hooks on the model when the baseline is applied (the vision-side methods reduce the image
  features while the images are encoded, so that `get_image_features` returns K tokens per image);
- `check_call(model, vision_feature_layer)`: arguments of a call the method cannot honour;
- `reduce_image(tokens, grid, config, evidence)`: the same reduction for one image, after encoding, on backbones
  whose images differ in size (Qwen3-VL: no fixed grid to hook);
- `language_pass(model, inputs)`: the language model's pass over the prompt with the image features
  (`LanguageInputs`); the default replaces each image's N placeholders by its K tokens and runs the shorter
  sequence once (`model._baseline_shortened_pass`).
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Optional

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .config import BaselineConfig, VisualGeometry

__all__ = ["BaselineMethod", "LanguageInputs", "register_method", "method_class", "method_label", "METHOD_CLASSES",
           "listing_order"]


@dataclass
class LanguageInputs:
    """What a method's `language_pass` gets: the prompt (user layout) with its images' features.

    Attributes:
        input_ids: `(B, L)`; inputs_embeds: `(B, L, H)` (the text embeddings; the image placeholders' rows are not
            filled yet).
        features: per image `(n_i, H + E)`: its n_i tokens for the language model (n_i = K for methods that reduce
            while encoding, else the image's N_i), with E channels of per-token extras after the H of the input
            embedding (Qwen3-VL's DeepStack features, flattened; E = 0 on LLaVA). A method merges or selects whole
            rows, so the extras follow their tokens.
        sources: per image `(n_i,)` index, within the image's N_i tokens, of the token each feature stands for (the
            M-RoPE backbones place an entry at that token's positions), or None (the features are the image's own
            tokens, or the backbone does not need it).
        grids: per image `(gh, gw)`, its token grid (row-major).
        image_token_mask: bool `(B, L)`; spans: the images' `ImageSpans`; mask: `(B, L)` attention mask (ones when
            none was given); position_ids: `(B, L)`, or `(3, B, L)` M-RoPE; labels: `(B, L)` or None (answer tokens
            are never queries).
        cache: the `ETCCache` to fill (the prefill) or None.
    """

    input_ids: torch.Tensor
    inputs_embeds: torch.Tensor
    features: list
    sources: Optional[list]
    grids: list
    image_token_mask: torch.Tensor
    spans: object
    mask: torch.Tensor
    position_ids: torch.Tensor
    labels: Optional[torch.Tensor]
    cache: object

    @property
    def hidden_size(self) -> int:
        return self.inputs_embeds.shape[-1]

    def with_image_features(self) -> torch.Tensor:
        """`inputs_embeds` with each image's N placeholders filled by its N features (the uncompressed prompt)."""
        features = torch.cat(self.features)[:, : self.hidden_size]
        return self.inputs_embeds.masked_scatter(self.image_token_mask[..., None], features.to(self.inputs_embeds))

    def user_extras(self) -> Optional[torch.Tensor]:
        """`(B, L, E)` the per-token extras of the uncompressed prompt (zeros off the images), or None when E = 0."""
        features = torch.cat(self.features)
        if features.shape[-1] == self.hidden_size:
            return None
        extras = features.new_zeros(*self.image_token_mask.shape, features.shape[-1] - self.hidden_size)
        return extras.masked_scatter(self.image_token_mask[..., None], features[:, self.hidden_size :])


class BaselineMethod:
    """A training-free compressor: its name, its options and what it does at each point of a model's forward (see
    the module docstring). Stateless: the options live in the `BaselineConfig` each hook receives."""

    name: ClassVar[str]
    label: ClassVar[str] = ""  # how tables (the demo, `etc-ext bench`) name it; "" = `name`
    # Whether it chooses what to keep after reading the question (its selection then holds for the prompt it saw:
    # a follow-up question in the same conversation keeps it); the others compress the image alone, as ETC does.
    reads_question: ClassVar[bool] = False
    # option -> default (None: resolved against the model), among BaselineConfig's option fields; BaselineConfig
    # accepts exactly these for this method.
    options: ClassVar[dict] = {}
    # Whether the image features leave the encoder with K tokens per image (`get_image_features` returns K).
    reduces_while_encoding: ClassVar[bool] = False
    # Whether `reduce_image` reads the vision tower's attention (`evidence`), which such backbones then record.
    records_vision_attention: ClassVar[bool] = False

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

    def reduce_image(self, tokens: torch.Tensor, grid, config: "BaselineConfig", evidence: dict):
        """For backbones whose images differ in size (Qwen3-VL), which call this after encoding instead of `install`'s
        hooks (methods that reduce while encoding): one image's `(N, C)` tokens on its `grid` -> `(K, C)` and the
        `(K,)` index of the token each stands for. `evidence`: what the backbone recorded while encoding it."""
        raise NotImplementedError(f"baseline {self.name!r} has no per-image reduction")

    def language_pass(self, model, inputs: LanguageInputs):
        """The language model over the compressed prompt: `(last hidden states (B, S, H), CompressedLayout)`."""
        return model._baseline_shortened_pass(inputs, inputs.features, inputs.sources)


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


def method_label(name: str) -> str:
    """How tables name the registered method `name`."""
    cls = method_class(name)
    return cls.label or cls.name


def listing_order(names) -> tuple:
    """`names` of registered methods in the order tables list them: the methods that compress the image alone first,
    then those that read the question, each group by name."""
    return tuple(sorted(names, key=lambda name: (method_class(name).reads_question, name)))
