"""`apply_baseline` / `remove_baseline`, and the registry of model integrations (`register_baseline_class`)."""

from dataclasses import fields

from torch import nn
from transformers import LlavaForConditionalGeneration, Qwen3VLForConditionalGeneration

from ..models.common import unwrap_peft
from .config import BaselineConfig
from .llava import BaselineLlavaForConditionalGeneration
from .model import Baseline
from .qwen3_vl import BaselineQwen3VLForConditionalGeneration

__all__ = ["apply_baseline", "remove_baseline", "register_baseline_class"]

# ============================================================================ public API
_BASELINE_CLASSES: dict = {
    LlavaForConditionalGeneration: BaselineLlavaForConditionalGeneration,
    Qwen3VLForConditionalGeneration: BaselineQwen3VLForConditionalGeneration,
}
_SUBCLASSES: dict = {}


def register_baseline_class(model_class: type, baseline_class: type) -> None:
    """Make `apply_baseline` work on `model_class` (and its subclasses) through `baseline_class`, a subclass of it
    that defines `baseline_geometry(model)` (static), `baseline_install()` and a `forward` that runs the baseline."""
    if not issubclass(baseline_class, model_class):
        raise TypeError(f"{baseline_class.__name__} must subclass {model_class.__name__}")
    _BASELINE_CLASSES[model_class] = baseline_class


def _baseline_class(cls: type) -> type:
    for model_class in cls.__mro__:
        if model_class in _BASELINE_CLASSES:
            baseline_class = _BASELINE_CLASSES[model_class]
            if cls is model_class:
                return baseline_class
            if cls not in _SUBCLASSES:  # a subclass of a supported model: a baseline subclass of it
                _SUBCLASSES[cls] = type(f"Baseline{cls.__name__}", (baseline_class, cls), {})
            return _SUBCLASSES[cls]
    supported = ", ".join(c.__name__ for c in _BASELINE_CLASSES)
    raise TypeError(f"apply_baseline supports {supported}; got {cls.__name__}")


def apply_baseline(model: nn.Module, method: str, num_tokens: int, **options) -> nn.Module:
    """Make `model` keep `num_tokens` visual entries per image with a training-free compressor, in place.

    Args:
        model: a `LlavaForConditionalGeneration` or `Qwen3VLForConditionalGeneration` (or a subclass, or a
            `peft.PeftModel` around one).
        method: a registered method (`METHODS`: "mean", "subsample", "visionzip", "fastv", "instruction_merge"; see
            the package docstring).
        num_tokens: K, 1 <= K <= N (the model's visual tokens per image; on Qwen3-VL, per image or video temporal
            group, checked as each arrives).
        options: the method's options (`BaselineConfig`): fastv `layer`, `query`; instruction_merge `layer`, `query`,
            `grouping`; visionzip `dominant`, `keep_cls`.

    Returns:
        `model`, whose `forward` and `generate` now compress; `model.baseline` holds the config. A prefill's cache
        tells its visual entries: `cache_visual_entries(cache)`.

    Raises:
        ValueError: a bad method, num_tokens or option, one that does not fit the model, a model that already has a
            baseline or ETC.
        TypeError: an unsupported model class.
    """
    base = unwrap_peft(model)
    if isinstance(getattr(base, "baseline", None), Baseline):
        raise ValueError(
            f"a baseline is already applied to this model ({base.baseline!r}); remove_baseline(model) first"
        )
    if getattr(base, "etc", None) is not None:
        raise ValueError(
            "this model has ETC applied (remove_etc(model) first): a baseline compresses the original model"
        )
    baseline_class = _baseline_class(type(base))  # TypeError for an unsupported model
    config = BaselineConfig(method=method, num_tokens=num_tokens, **_check_option_names(options))
    geometry = baseline_class.baseline_geometry(base)
    config.check(geometry)
    base.baseline = Baseline(config, geometry, original_class=type(base))
    base.__class__ = baseline_class
    try:
        base.baseline_install()
    except Exception:
        _remove(base)
        raise
    return model


def _check_option_names(options: dict) -> dict:
    known = {f.name for f in fields(BaselineConfig)} - {"method", "num_tokens"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown baseline option(s) {unknown}; options are {sorted(known)}")
    return options


def remove_baseline(model: nn.Module) -> nn.Module:
    """Undo `apply_baseline`: remove its hooks, restore the class and drop `model.baseline`. Returns `model`."""
    base = unwrap_peft(model)
    if not isinstance(getattr(base, "baseline", None), Baseline):
        raise ValueError("remove_baseline: no baseline is applied to this model")
    _remove(base)
    return model


def _remove(base: nn.Module) -> None:
    baseline = base.baseline
    for handle in baseline.handles:
        handle.remove()
    baseline.handles = []
    base.__class__ = baseline.original_class
    del base.baseline
