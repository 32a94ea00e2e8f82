"""A baseline's configuration (`BaselineConfig`: the method and its options, checked against the registry) and what
it needs to know about a model (`VisualGeometry`)."""

from dataclasses import dataclass
from typing import Optional

from ..models.common import QUERY_MODES  # the query tokens are chosen as ETC chooses its instruction tokens
from .grid import grid_shape
from .registry import method_class

__all__ = ["BaselineConfig", "VisualGeometry", "QUERY_MODES", "GROUPINGS", "OPTION_FIELDS"]

OPTION_FIELDS = ("layer", "query", "grouping", "dominant", "keep_cls")  # the methods' options: BaselineConfig fields
GROUPINGS = ("spatial", "similarity")


@dataclass(frozen=True)
class VisualGeometry:
    """What a compressor needs to know about a model's images and language model.

    Attributes:
        num_visual_tokens: N, visual tokens per image in the language model's input.
        grid: `(gh, gw)` patch grid of an image (row-major order of the patch tokens).
        cls_feature: whether the first of the N tokens is the vision tower's [CLS] feature (LLaVA's "full"
            strategy); the other N - 1 are the grid.
        num_hidden_layers: decoder layers of the language model.
        cls_token: whether the vision tower has a [CLS] token (CLIP does, Qwen3-VL's does not).

    A backbone whose images differ in size (Qwen3-VL) has `num_visual_tokens` and `grid` None: each image is
    checked when it arrives, against its own geometry.
    """

    num_visual_tokens: Optional[int]
    grid: Optional[tuple]
    cls_feature: bool
    num_hidden_layers: int
    cls_token: bool = True


@dataclass
class BaselineConfig:
    """A training-free compressor and its options.

    Args:
        method: a registered method's name (`METHODS`).
        num_tokens: K >= 1, visual entries kept per image (at most N, checked against the model by `check`).
        layer: ("fastv", "instruction_merge") the scores come from the attention of decoder layer `layer - 1`, i.e.
            after `layer` layers have run on the whole prompt; FastV's K. Default 2.
        query: ("fastv", "instruction_merge") the queries of the text-to-image attention: "last" (the last prompt
            token; fastv's default) or "instruction" (the text after the image; instruction_merge's default).
        grouping: ("instruction_merge") "spatial" (default) or "similarity".
        dominant: ("visionzip") dominant tokens, the [CLS] feature included when `keep_cls`; default
            `visionzip_split(K)`.
        keep_cls: ("visionzip") keep the vision tower's [CLS] feature as a dominant token (VisionZip does); default
            True where the tower has a [CLS] token, False otherwise (Qwen3-VL).

    Raises:
        ValueError: an unknown method, a num_tokens that is not a positive int, an option the method does not take,
            or a bad option value.
    """

    method: str
    num_tokens: int
    layer: Optional[int] = None
    query: Optional[str] = None
    grouping: Optional[str] = None
    dominant: Optional[int] = None
    keep_cls: Optional[bool] = None

    def __post_init__(self):
        method = method_class(self.method)  # ValueError for an unknown name
        if not _is_int(self.num_tokens) or self.num_tokens < 1:
            raise ValueError(f"num_tokens must be an int >= 1 (visual tokens kept per image), got {self.num_tokens!r}")
        allowed = method.options
        for name in OPTION_FIELDS:
            value = getattr(self, name)
            if value is not None and name not in allowed:
                raise ValueError(
                    f"{name}={value!r} is not an option of method {self.method!r} "
                    f"(its options: {sorted(allowed) or 'none'})"
                )
            if value is None and name in allowed:
                setattr(self, name, allowed[name])
        if self.layer is not None and (not _is_int(self.layer) or self.layer < 1):
            raise ValueError(f"layer must be an int >= 1 (decoder layers run on the whole prompt), got {self.layer!r}")
        if self.query is not None and self.query not in QUERY_MODES:
            raise ValueError(f"query must be one of {list(QUERY_MODES)}, got {self.query!r}")
        if self.grouping is not None and self.grouping not in GROUPINGS:
            raise ValueError(f"grouping must be one of {list(GROUPINGS)}, got {self.grouping!r}")
        if self.keep_cls is not None and not isinstance(self.keep_cls, bool):
            raise ValueError(f"keep_cls must be a bool, got {self.keep_cls!r}")
        if self.dominant is not None and (not _is_int(self.dominant) or not 0 <= self.dominant <= self.num_tokens):
            raise ValueError(f"dominant must be an int in [0, num_tokens={self.num_tokens}], got {self.dominant!r}")

    @property
    def options(self) -> dict:
        """The method's options with their values."""
        return {name: getattr(self, name) for name in method_class(self.method).options}

    def check(self, geometry: VisualGeometry) -> None:
        """Raise ValueError if this config cannot run on a model of `geometry`."""
        n = geometry.num_visual_tokens
        if n is not None and self.num_tokens > n:
            raise ValueError(
                f"num_tokens={self.num_tokens} is larger than the model's {n} visual tokens per image; "
                f"use 1 <= num_tokens <= {n}"
            )
        if self.layer is not None and self.layer > geometry.num_hidden_layers:
            raise ValueError(
                f"layer={self.layer} is out of range for a language model with {geometry.num_hidden_layers} decoder "
                f"layers (use 1..{geometry.num_hidden_layers})"
            )
        method = method_class(self.method)()
        if method.needs_grid(self):
            if geometry.cls_feature:
                raise ValueError(
                    f"method {self.method!r} works on the patch grid, but this model's visual tokens include the "
                    "[CLS] feature (vision_feature_select_strategy='full')"
                )
            if geometry.grid is not None:
                grid_shape(self.num_tokens, geometry.grid)  # raises when K has no layout on the grid
        method.check(self, geometry)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
