"""Model-agnostic parts of the integrations: the module that holds ETC's parameters, installing it on a model (the
class swap), the frozen teacher snapshot, instruction bookkeeping, and checkpoints.

`model.etc` (an `ETCModules`) is registered on the patched Hugging Face model, so its parameters train, move and
save with the model; `save_pretrained` / `from_pretrained` write and read them (plus, optionally, the fine-tuned
base weights or the peft adapters) beside an `etc_config.json`.
"""

import contextvars
import copy
import logging
import os
from typing import Callable, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .. import __version__
from ..compress import CompressionTokens, ImageSpans, right_aligned_index
from ..config import ETCConfig
from ..distill import DistillHead, adapter_layers, resolve_target_layer

__all__ = [
    "FAMILY_API",
    "ETC_CONFIG_NAME",
    "ETC_WEIGHTS_NAME",
    "BASE_WEIGHTS_NAME",
    "ADAPTER_DIR",
    "LORA_TARGET_MODULES",
    "ETCModules",
    "FrozenTeacher",
    "unwrap_peft",
    "install_etc",
    "uninstall_etc",
    "etc_subclass",
    "frozen_teacher",
    "snapshot_teacher",
    "QUERY_MODES",
    "query_index",
    "check_etc_inputs",
    "save_pretrained",
    "from_pretrained",
]

logger = logging.getLogger(__name__)

# What every backbone's module offers (`etc_ext.models.llava`, `etc_ext.models.qwen3_vl`), besides its own names.
FAMILY_API = (
    "apply_etc",
    "remove_etc",
    "save_pretrained",
    "from_pretrained",
    "snapshot_teacher",
    "prepare_inputs",
    "instruction_target",
)

ETC_CONFIG_NAME = "etc_config.json"
ETC_WEIGHTS_NAME = "etc_model.safetensors"
BASE_WEIGHTS_NAME = "base_model.safetensors"  # fine-tuned base weights (projector, language model), full fine-tuning
ADAPTER_DIR = "adapter"  # peft adapters (LoRA), as PeftModel.save_pretrained writes them
# The LLM's linear layers (attention and MLP), not the vision tower's: the paper's LoRA setup (rank 8 on Qwen3-VL-2B),
# and the default peft target of `etc-ext train --lora`.
LORA_TARGET_MODULES = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


class ETCModules(nn.Module):
    """ETC's parameters on a patched model (`model.etc`).

    Attributes:
        config: the `ETCConfig` (with `hidden_size` and `num_visual_tokens` filled in).
        position_grid: for models whose images have variable N, the `(gh, gw)` grid of the decoder's position
            embeddings (`gh * gw == config.num_visual_tokens`), see `etc_ext.distill.VIDDecoder`.
        compression_tokens: the `[M, hidden_size]` embeddings inserted after each image.
        distill: the training-only decoder and variances (`None` when `config.loss == "none"`).
        enabled: when False the patched model runs and trains exactly as the original one: ETC's parameters stop
            requiring grad (they would get none: DDP would need find_unused_parameters) and the vision tower
            requires grad as it did before apply_etc froze it; True again restores both as they were.
        prefill_method: "auto" (segmented two-pass prefill when possible, else masked single pass), "segmented"
            or "masked"; `forward(..., etc_prefill_method=...)` overrides it per call.
    """

    def __init__(
        self, config: ETCConfig, initializer_range: float = 0.02, position_grid: Optional[tuple[int, int]] = None
    ):
        super().__init__()
        self.config = config
        self.compression_tokens = CompressionTokens(
            config.num_compression_tokens, config.hidden_size, initializer_range
        )
        self.distill = (
            DistillHead(config, config.hidden_size, config.num_visual_tokens, position_grid)
            if config.loss != "none"
            else None
        )
        self._enabled = True
        self.prefill_method = "auto"

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        value = bool(value)
        if value == self._enabled:
            return
        tower = self._vision_tower()
        if not value:  # remember what trains with ETC on
            self._grad_when_enabled = [p.requires_grad for p in self.parameters()]
            self.requires_grad_(False)
            if tower is not None:
                self._tower_grad_when_enabled = [p.requires_grad for p in tower.parameters()]
                _set_requires_grad(tower, self.vision_requires_grad)  # as before apply_etc
        else:
            _set_requires_grad(self, self._grad_when_enabled)
            if tower is not None:
                _set_requires_grad(tower, self._tower_grad_when_enabled)
        self._enabled = value

    def _vision_tower(self) -> Optional[nn.Module]:
        """The patched model's vision tower (None before apply_etc registered the model)."""
        model = self.__dict__.get("_model")
        return None if model is None else model._etc_vision_tower()

    def extra_repr(self) -> str:
        return f"enabled={self.enabled}, prefill_method={self.prefill_method!r}"


def _set_requires_grad(module: nn.Module, flags: list) -> None:
    for param, requires_grad in zip(module.parameters(), flags):
        param.requires_grad_(requires_grad)


class FrozenTeacher(nn.Module):
    """Frozen copies of some modules of the starting model (e.g. `projector`, `language_model`): the teacher of
    `teacher="frozen"` under full fine-tuning. Each keyword becomes an attribute holding a deep copy."""

    def __init__(self, **modules: nn.Module):
        super().__init__()
        for name, module in modules.items():
            setattr(self, name, copy.deepcopy(module))
        self.requires_grad_(False)
        self.eval()


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a `peft.PeftModel` (the model itself otherwise)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _get_etc(model: nn.Module) -> ETCModules:
    etc = getattr(unwrap_peft(model), "etc", None)
    if not isinstance(etc, ETCModules):
        raise ValueError("This model has no ETC parts: call apply_etc(model, config) first")
    return etc


def install_etc(model: nn.Module, config: Optional[ETCConfig], etc_class: type) -> nn.Module:
    """The body of every `apply_etc`: check the model, fill in and check the config, register `model.etc` on the
    model's device and dtype, freeze the vision tower (`config.freeze_vision_tower`) and swap the class to the ETC
    class (`etc_class`, or a class deriving from it and a user's subclass). Returns `model` (a peft wrapper stays
    around the patched model).

    Args:
        etc_class: the backbone's `ETCMixin` class; its `etc_base_class` is the Hugging Face class it extends.
    """
    config = copy.deepcopy(config) if config is not None else ETCConfig()
    config.validate()  # a config changed after it was made (its fields are plain attributes)
    base = unwrap_peft(model)
    model_class = etc_class.etc_base_class
    if not isinstance(base, model_class):
        raise TypeError(f"apply_etc expects a {model_class.__name__}, got {type(base).__name__}")
    if isinstance(getattr(base, "etc", None), ETCModules):
        raise ValueError("ETC is already applied to this model (remove_etc(model) first)")
    if getattr(base, "baseline", None) is not None:
        raise ValueError("a training-free baseline is applied to this model (etc_ext.baselines.remove_baseline first)")
    _warn_if_trained_parts_are_left_behind(base)
    text_config = base.config.get_text_config()
    num_visual_tokens, position_grid = etc_class.etc_visual_token_count(base.config)
    expected = {"hidden_size": text_config.hidden_size, "num_visual_tokens": num_visual_tokens}
    for name, value in expected.items():
        if getattr(config, name) is None:
            setattr(config, name, value)
        elif getattr(config, name) != value:
            raise ValueError(f"ETCConfig.{name}={getattr(config, name)} does not fit this model ({name}={value})")
    if config.decoder_hidden_size is None:
        config.decoder_hidden_size = ETCConfig.default_decoder_hidden_size(text_config.hidden_size)
    _check_num_compression_tokens(config.num_compression_tokens, num_visual_tokens, position_grid, text_config)
    resolve_target_layer(config.target_layer, text_config.num_hidden_layers)  # raises when out of range

    embeddings = base.get_input_embeddings().weight
    etc = ETCModules(
        config, initializer_range=getattr(text_config, "initializer_range", 0.02), position_grid=position_grid
    )
    etc.to(device=embeddings.device, dtype=embeddings.dtype)
    etc.original_class = _original_class(type(base), etc_class)
    tower = etc_class._etc_vision_tower(base)  # the model's class is swapped last: nothing below can fail
    etc.vision_requires_grad = [p.requires_grad for p in tower.parameters()]
    if config.freeze_vision_tower:
        tower.requires_grad_(False)
    base.etc = etc
    # The model, for `enabled` to reach its vision tower: a plain attribute (not a submodule, so no cycle in the
    # module tree or the state dict); deepcopy maps it to the copied model.
    object.__setattr__(etc, "_model", base)
    base.__class__ = etc_subclass(etc.original_class, etc_class)
    return model


_LOADING_ETC_PARTS = contextvars.ContextVar("etc_ext_loading_etc_parts", default=False)


def _warn_if_trained_parts_are_left_behind(base: nn.Module) -> None:
    """A model loaded with Hugging Face's `from_pretrained` from a folder that also holds ETC parts (an ETC model's
    `save_pretrained`) gets new, untrained parts from apply_etc: say how to load the trained ones."""
    source = getattr(base.config, "_name_or_path", None) or ""
    if _LOADING_ETC_PARTS.get() or not os.path.isfile(os.path.join(source, ETC_CONFIG_NAME)):
        return
    logger.warning(
        "apply_etc: the model was loaded from %s, which holds trained ETC parts (%s); apply_etc gives it new, "
        "untrained ones. To load the trained parts use etc_ext.models.common.from_pretrained(model, %r) instead.",
        source, ETC_CONFIG_NAME, source,
    )  # fmt: skip


def _check_num_compression_tokens(num_compression_tokens, num_visual_tokens, position_grid, text_config) -> None:
    """M fits the model: at most N for a model whose images all have N tokens, and fewer than the language model's
    positions (each compression token takes one)."""
    if position_grid is None and num_compression_tokens > num_visual_tokens:
        raise ValueError(
            f"ETCConfig.num_compression_tokens must be <= the model's {num_visual_tokens} visual tokens per image "
            f"(ETC compresses them into fewer tokens), got {num_compression_tokens}"
        )
    max_positions = getattr(text_config, "max_position_embeddings", None)
    if max_positions is not None and num_compression_tokens >= max_positions:
        raise ValueError(
            f"ETCConfig.num_compression_tokens must be < the language model's max_position_embeddings "
            f"({max_positions}), got {num_compression_tokens}"
        )


def _original_class(cls: type, etc_class: type) -> type:
    """The Hugging Face class under `cls`: `cls` itself, or for a model made as an ETC class without ETC parts
    (`type(etc_model)(config)`, `ETCLlavaForConditionalGeneration.from_pretrained(...)`) the first class of its MRO
    that is not one of ETC's."""
    from .etc_hooks import ETCBackboneHooks

    return next(
        c for c in cls.__mro__ if issubclass(c, etc_class.etc_base_class) and not issubclass(c, ETCBackboneHooks)
    )


def uninstall_etc(model: nn.Module) -> nn.Module:
    """The body of `remove_etc`: drop `model.etc` (and the teacher snapshot), restore the class and the vision
    tower's `requires_grad`. Returns `model`."""
    base = unwrap_peft(model)
    etc = getattr(base, "etc", None)
    if not isinstance(etc, ETCModules):
        raise ValueError("remove_etc: ETC is not applied to this model")
    _set_requires_grad(base._etc_vision_tower(), etc.vision_requires_grad)
    base.__class__ = etc.original_class
    del base.etc
    etc.__dict__.pop("_model", None)
    return model


_ETC_SUBCLASSES: dict = {}


def etc_subclass(cls: type, etc_class: type) -> type:
    """The ETC class for `cls`: `etc_class` for the class it extends, else (a user's subclass of that class) a class
    deriving from both, made once and kept."""
    if cls is etc_class.etc_base_class:
        return etc_class
    if (etc_class, cls) not in _ETC_SUBCLASSES:
        _ETC_SUBCLASSES[etc_class, cls] = type(f"ETC{cls.__name__}", (etc_class, cls), {})
    return _ETC_SUBCLASSES[etc_class, cls]


def frozen_teacher(model: nn.Module, modules: Callable[[nn.Module], dict]) -> FrozenTeacher:
    """The frozen teacher of a patched model, made from `modules(base)` (name -> module) the first time and kept on
    `model.etc` unregistered (it neither trains nor saves); it follows the input embeddings' device."""
    base = unwrap_peft(model)
    etc = base.etc
    teacher = getattr(etc, "frozen_teacher", None)
    if teacher is None:
        teacher = FrozenTeacher(**modules(base))
        object.__setattr__(etc, "frozen_teacher", teacher)  # unregistered on purpose (see docstring)
    device = base.get_input_embeddings().weight.device
    if next(teacher.parameters()).device != device:
        teacher.to(device)
    return teacher


def snapshot_teacher(model: nn.Module) -> FrozenTeacher:
    """The frozen teacher of `teacher="frozen"` under full fine-tuning: a copy of the modules the teacher runs (the
    backbone's `_etc_teacher_modules`: the language model, and what encodes the images when it trains), taken the
    first time the teacher runs (the first training forward, or `instruction_target`); call this earlier to take it
    from the weights as they are now. It is not a submodule: it neither trains nor saves, and it follows the
    language model's device."""
    _get_etc(model)
    return frozen_teacher(model, lambda base: base._etc_teacher_modules())


QUERY_MODES = ("last", "instruction")


def query_index(
    spans: ImageSpans,
    visual_token_mask: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    labels: Optional[torch.Tensor],
    mode: str = "instruction",
) -> torch.Tensor:
    """`(I, T)` positions of the query tokens of each image's text-to-image attention, right-aligned, -1 = none.

    "instruction" (ETC's target, the instruction-aware baselines): real text tokens after the image that are not
    visual tokens (of any image). "last": the row's last real token (FastV's query), `T = 1`. With `labels`, answer
    tokens (labels != -100) are never queries.
    """
    if mode not in QUERY_MODES:
        raise ValueError(f"query must be one of {list(QUERY_MODES)}, got {mode!r}")
    rows, length = spans.row, visual_token_mask.shape[1]
    select = torch.ones(len(spans), length, dtype=torch.bool, device=rows.device)  # (I, L)
    if attention_mask is not None:
        select &= attention_mask.bool()[rows]
    if labels is not None:
        select &= labels[rows] == -100
    if mode == "last":
        return right_aligned_index(select)[:, -1:]
    select &= torch.arange(length, device=rows.device)[None] >= spans.end[:, None]
    select &= ~visual_token_mask[rows]
    return right_aligned_index(select)


def check_etc_inputs(input_ids, labels, kwargs: dict) -> None:
    """Checks shared by the integrations' compressed forward (`input_ids`: the user's, or the placeholder ids made
    from their inputs_embeds)."""
    if input_ids is None:
        raise ValueError(
            "ETC needs input_ids or inputs_embeds: it finds each image's placeholders in them and inserts its "
            "compression tokens after them"
        )
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(f"labels must have the shape of input_ids {list(input_ids.shape)}, got {list(labels.shape)}")
    shift_labels = kwargs.get("shift_labels")
    if shift_labels is not None and shift_labels.shape != input_ids.shape:
        raise ValueError(
            f"shift_labels must have the shape of input_ids {list(input_ids.shape)}, got {list(shift_labels.shape)}"
        )


def _cpu_state_dict(tensors: dict) -> dict:
    return {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in tensors.items()}


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, *, save_base_weights: bool = True) -> None:
    """Save ETC's parts of a patched model.

    Writes `etc_config.json` and `etc_model.safetensors` (compression tokens, decoder, variances). With peft, the
    adapters go to `adapter/` (`PeftModel.save_pretrained`); without, and `save_base_weights`, the base model's
    parameters that require grad (projector and language model under full fine-tuning) go to
    `base_model.safetensors`.
    """
    etc = _get_etc(model)
    os.makedirs(save_directory, exist_ok=True)
    etc.config.to_json_file(os.path.join(save_directory, ETC_CONFIG_NAME))
    metadata = {"format": "pt", "etc_ext_version": __version__}
    save_file(_cpu_state_dict(etc.state_dict()), os.path.join(save_directory, ETC_WEIGHTS_NAME), metadata=metadata)
    if _is_peft_model(model):
        model.save_pretrained(os.path.join(save_directory, ADAPTER_DIR))
    elif save_base_weights:
        base = unwrap_peft(model)
        trainable = {
            name: param
            for name, param in base.named_parameters()
            if param.requires_grad and not name.startswith("etc.")
        }
        if trainable:
            save_file(_cpu_state_dict(trainable), os.path.join(save_directory, BASE_WEIGHTS_NAME), metadata=metadata)


def from_pretrained(
    model: nn.Module,
    load_directory: str | os.PathLike,
    apply_etc: Optional[Callable[[nn.Module, ETCConfig], nn.Module]] = None,
    *,
    load_base_weights: bool = True,
    is_trainable: bool = False,
) -> nn.Module:
    """Load ETC's parts saved by `save_pretrained` into `model` and return it (wrapped in a `PeftModel` when the
    checkpoint holds adapters and `model` is not one yet).

    `apply_etc` (default: the one of the model's integration, `loading.integration_for`) is called when `model` has
    no ETC parts yet. A model that already
    has them must have the same config. `model` is the starting model: with `is_trainable=True` (resuming
    training), teacher="frozen" and full fine-tuning, the frozen teacher is snapshotted from it before the fine-tuned
    weights are loaded, so the teacher stays the starting model.

    Raises:
        ValueError: a missing file, a config that differs from the model's ETC config or does not fit the model
            (hidden size, visual tokens), or weights whose names or shapes do not match.
    """
    config_path = os.path.join(load_directory, ETC_CONFIG_NAME)
    weights_path = os.path.join(load_directory, ETC_WEIGHTS_NAME)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise ValueError(f"from_pretrained: {path} does not exist (not an ETC checkpoint directory?)")
    config = ETCConfig.from_json_file(config_path)
    base = unwrap_peft(model)
    # All or nothing: read every file before the model changes, check every weight before loading any, and undo
    # apply_etc when a check after it fails.
    device = base.get_input_embeddings().weight.device
    etc_state = _read_safetensors(weights_path, device)
    base_path = os.path.join(load_directory, BASE_WEIGHTS_NAME)
    base_state = None
    if load_base_weights and os.path.isfile(base_path):
        base_state = _read_safetensors(base_path, device)
    adapter_path = os.path.join(load_directory, ADAPTER_DIR)
    load_adapters = load_base_weights and os.path.isdir(adapter_path)
    if load_adapters and not os.path.isfile(os.path.join(adapter_path, "adapter_config.json")):
        raise ValueError(f"from_pretrained: {adapter_path} holds no adapter_config.json (a damaged checkpoint?)")
    existing = getattr(base, "etc", None)
    if existing is None:
        if apply_etc is None:
            from .loading import integration_for

            apply_etc = integration_for(model).apply_etc
        loading = _LOADING_ETC_PARTS.set(True)
        try:
            apply_etc(model, copy.deepcopy(config))
        finally:
            _LOADING_ETC_PARTS.reset(loading)
    else:
        differences = existing.config.differences(config)
        if differences:
            raise ValueError(
                "from_pretrained: the checkpoint's ETCConfig differs from the one applied to the model ("
                + "; ".join(f"model {d.replace(' != ', ', checkpoint ')}" for d in differences)
                + "). Load into a model without ETC (remove_etc(model)) or apply the checkpoint's config."
            )
    try:
        etc = _get_etc(model)
        _check_state_dict(etc, etc_state, "ETC parts", strict=True)
        if base_state is not None:
            _check_state_dict(base, base_state, "base model", strict=False)
        if is_trainable and etc.config.teacher == "frozen" and etc.config.loss != "none" and not adapter_layers(model):
            snapshot_teacher(model)
    except Exception:
        if existing is None:
            uninstall_etc(model)
        raise
    etc.load_state_dict(etc_state, strict=True)
    if base_state is not None:
        base.load_state_dict(base_state, strict=False)
    if load_adapters:
        from peft import PeftModel

        if _is_peft_model(model):
            model.load_adapter(adapter_path, adapter_name=model.active_adapter, is_trainable=is_trainable)
        else:
            model = PeftModel.from_pretrained(model, adapter_path, is_trainable=is_trainable)
        if is_trainable:  # peft freezes every non-adapter parameter
            etc.requires_grad_(True)
    return model


def _read_safetensors(path: str, device) -> dict:
    try:
        return load_file(path, device=str(device))
    except (SafetensorError, OSError) as error:  # truncated or not a safetensors file
        raise ValueError(f"from_pretrained: {path} cannot be read ({type(error).__name__}: {error})") from None


def _check_state_dict(module: nn.Module, state_dict: dict, what: str, strict: bool) -> None:
    """The checkpoint's names and shapes fit `module` (all of its names with `strict`)."""
    own = module.state_dict()
    unexpected = sorted(set(state_dict) - set(own))
    missing = sorted(set(own) - set(state_dict)) if strict else []
    if unexpected or missing:
        raise ValueError(
            f"from_pretrained: the checkpoint's {what} weights do not match the model: "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}"
        )
    for name, tensor in state_dict.items():
        if own[name].shape != tensor.shape:
            raise ValueError(
                f"from_pretrained: {what} weight {name!r} has shape {list(tensor.shape)} in the checkpoint, "
                f"{list(own[name].shape)} in the model"
            )

