"""Model-agnostic parts of the integrations: the module that holds ETC's parameters, and its checkpoints.

`model.etc` (an `ETCModules`) is registered on the patched Hugging Face model, so its parameters train, move and
save with the model; `save_pretrained` / `from_pretrained` write and read them (plus, optionally, the fine-tuned
base weights or the peft adapters) beside an `etc_config.json`.
"""

import copy
import os
from typing import Callable, Optional

from safetensors.torch import load_file, save_file
from torch import nn

from .. import __version__
from ..compress import CompressionTokens
from ..config import ETCConfig
from ..distill import DistillHead

__all__ = [
    "ETC_CONFIG_NAME",
    "ETC_WEIGHTS_NAME",
    "BASE_WEIGHTS_NAME",
    "ADAPTER_DIR",
    "ETCModules",
    "unwrap_peft",
    "save_pretrained",
    "from_pretrained",
]

ETC_CONFIG_NAME = "etc_config.json"
ETC_WEIGHTS_NAME = "etc_model.safetensors"
BASE_WEIGHTS_NAME = "base_model.safetensors"  # fine-tuned base weights (projector, language model), full fine-tuning
ADAPTER_DIR = "adapter"  # peft adapters (LoRA), as PeftModel.save_pretrained writes them


class ETCModules(nn.Module):
    """ETC's parameters on a patched model (`model.etc`).

    Attributes:
        config: the `ETCConfig` (with `hidden_size` and `num_visual_tokens` filled in).
        compression_tokens: the `[M, hidden_size]` embeddings inserted after each image.
        distill: the training-only decoder and variances (`None` when `config.loss == "none"`).
        enabled: when False the patched model runs exactly as the original one.
        prefill_method: "auto" (segmented two-pass prefill when possible, else masked single pass), "segmented"
            or "masked"; `forward(..., etc_prefill_method=...)` overrides it per call.
    """

    def __init__(self, config: ETCConfig, initializer_range: float = 0.02):
        super().__init__()
        self.config = config
        self.compression_tokens = CompressionTokens(
            config.num_compression_tokens, config.hidden_size, initializer_range
        )
        self.distill = (
            DistillHead(config, config.hidden_size, config.num_visual_tokens) if config.loss != "none" else None
        )
        self.enabled = True
        self.prefill_method = "auto"

    def extra_repr(self) -> str:
        return f"enabled={self.enabled}, prefill_method={self.prefill_method!r}"


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
    apply_etc: Callable[[nn.Module, ETCConfig], nn.Module],
    *,
    load_base_weights: bool = True,
    is_trainable: bool = False,
    before_loading_weights: Optional[Callable[[nn.Module], None]] = None,
) -> nn.Module:
    """Load ETC's parts saved by `save_pretrained` into `model` and return it (wrapped in a `PeftModel` when the
    checkpoint holds adapters and `model` is not one yet).

    `apply_etc` is the integration's function: it is called when `model` has no ETC parts yet. A model that already
    has them must have the same config. `before_loading_weights(model)` runs after ETC is applied and before any
    weight is loaded (the LLaVA integration takes the frozen teacher's snapshot there when training resumes).

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
    existing = getattr(base, "etc", None)
    if existing is None:
        apply_etc(model, copy.deepcopy(config))
    else:
        differences = existing.config.differences(config)
        if differences:
            raise ValueError(
                "from_pretrained: the checkpoint's ETCConfig differs from the one applied to the model ("
                + "; ".join(f"model {d.replace(' != ', ', checkpoint ')}" for d in differences)
                + "). Load into a model without ETC (remove_etc(model)) or apply the checkpoint's config."
            )
    if before_loading_weights is not None:
        before_loading_weights(model)
    etc = _get_etc(model)
    device = etc.compression_tokens.weight.device
    _load_into(etc, load_file(weights_path, device=str(device)), "ETC parts", strict=True)

    base_path = os.path.join(load_directory, BASE_WEIGHTS_NAME)
    if load_base_weights and os.path.isfile(base_path):
        _load_into(base, load_file(base_path, device=str(device)), "base model", strict=False)

    adapter_path = os.path.join(load_directory, ADAPTER_DIR)
    if load_base_weights and os.path.isdir(adapter_path):
        from peft import PeftModel

        if _is_peft_model(model):
            model.load_adapter(adapter_path, adapter_name=model.active_adapter, is_trainable=is_trainable)
        else:
            model = PeftModel.from_pretrained(model, adapter_path, is_trainable=is_trainable)
        if is_trainable:  # peft freezes every non-adapter parameter
            etc.requires_grad_(True)
    return model


def _load_into(module: nn.Module, state_dict: dict, what: str, strict: bool) -> None:
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
    module.load_state_dict(state_dict, strict=strict)

