"""Loading models for training and evaluation, and finding the ETC integration of a model.

- `load_model_and_processor(dir)`: a Hugging Face VLM saved with `save_pretrained` (e.g.
  `LlavaForConditionalGeneration`) and its processor, from one folder.
- `integration_for(model)`: the module of `etc_ext.models` that implements ETC for the model's class
  (`apply_etc`, `remove_etc`, `save_pretrained`, `from_pretrained`).
- `load_for_inference(path)`: a model ready to evaluate, from a plain model folder or from the `final/` folder of an
  ETC training run (which holds the ETC parts and names its base model in `training_info.json`).
"""

from __future__ import annotations

import importlib
import json
import os
from types import ModuleType

import torch
from torch import nn

from .common import ETC_CONFIG_NAME, unwrap_peft


# Model class name -> module of etc_ext.models implementing apply_etc & co. for it (matched along the MRO, so
# subclasses, e.g. the ETC class apply_etc swaps in, resolve to the same integration).
INTEGRATIONS = {
    "LlavaForConditionalGeneration": "llava",
    "Qwen3VLForConditionalGeneration": "qwen3_vl",
}
TRAINING_INFO_NAME = "training_info.json"  # written by etc-ext train next to the final weights


def integration_for(model: nn.Module) -> ModuleType:
    """The `etc_ext.models.<family>` module for `model` (a Hugging Face VLM, possibly inside a `peft.PeftModel`).

    Raises:
        NotImplementedError: ETC has no integration for this model class (the message lists the supported ones).
        ImportError: the integration module is not available in this installation.
    """
    base = unwrap_peft(model)
    for cls in type(base).__mro__:
        family = INTEGRATIONS.get(cls.__name__)
        if family is not None:
            return importlib.import_module(f"etc_ext.models.{family}")
    raise NotImplementedError(
        f"ETC supports {sorted(INTEGRATIONS)}; got a {type(base).__name__}. Train it without --etc-config (the "
        "full-token baseline), or add an integration module under etc_ext/models/."
    )


def vision_tower_of(model: nn.Module) -> nn.Module | None:
    """The vision encoder of a VLM (LLaVA's `model.vision_tower`, Qwen-VL's `model.visual`), or None."""
    base = unwrap_peft(model)
    for owner in (getattr(base, "model", None), base):
        for name in ("vision_tower", "visual"):
            module = getattr(owner, name, None) if owner is not None else None
            if isinstance(module, nn.Module):
                return module
    return None


def load_model_and_processor(
    model_dir: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    attn_implementation: str | None = "sdpa",
):
    """Loads a VLM and its processor saved with `save_pretrained` in `model_dir`.

    Args:
        model_dir: folder with the model's `config.json` and weights, and the processor's files.
        dtype: parameter dtype (float32 for training: the optimizer keeps float32 weights, bf16 runs under autocast).
        device: where to put the model.
        attn_implementation: `"sdpa"`, `"eager"`, `"flash_attention_2"`, ... or None for the model's default.

    Returns:
        `(model, processor)`, the model in eval mode.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model_dir = os.fspath(model_dir)
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        hint = ""
        if os.path.isfile(os.path.join(model_dir, ETC_CONFIG_NAME)):
            hint = " It holds ETC parts: pass it as --etc (with the base model as --model), or use load_for_inference."
        raise FileNotFoundError(f"{model_dir} has no config.json: not a save_pretrained model folder.{hint}")
    kwargs = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(model_dir, **kwargs)
    processor = AutoProcessor.from_pretrained(model_dir)
    return model.to(device).eval(), processor


def load_for_inference(
    path: str | os.PathLike,
    etc: str | os.PathLike | None = None,
    *,
    base_model: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    attn_implementation: str | None = "sdpa",
):
    """A model ready for `generate`, from any of:

    - a plain model folder (`path`), optionally with ETC parts from `etc` (a `save_pretrained` folder of
      `etc_ext.models.<family>`);
    - the `final/` folder of an `etc-ext train --etc-config ...` run (`path`): it holds the ETC parts and names its
      base model in `training_info.json` (`base_model` overrides it, e.g. after moving files);
    - a folder an ETC model's Hugging Face `save_pretrained` wrote (`path`): the model and its ETC parts side by side.

    Returns:
        `(model, processor, etc_config)`: the model in eval mode (ETC applied when there are ETC parts, LoRA
        adapters merged), its processor, and the `ETCConfig` (None for a plain model).
    """
    path = os.fspath(path)
    if etc is None and os.path.isfile(os.path.join(path, ETC_CONFIG_NAME)):
        etc = path  # ETC parts beside the model (an ETC model's Hugging Face save_pretrained) or a final/ folder
    if etc == path and not os.path.isfile(os.path.join(path, "config.json")):
        if base_model is None:
            info_path = os.path.join(path, TRAINING_INFO_NAME)
            if not os.path.isfile(info_path):
                raise FileNotFoundError(
                    f"{path} holds ETC parts but no {TRAINING_INFO_NAME} naming its base model: pass the base model "
                    "folder too (--base-model DIR)"
                )
            with open(info_path) as f:
                base_model = json.load(f)["base_model"]
        path = os.fspath(base_model)
    model, processor = load_model_and_processor(
        path, dtype=dtype, device=device, attn_implementation=attn_implementation
    )
    etc_config = None
    if etc is not None:
        integration = integration_for(model)
        model = integration.from_pretrained(model, etc)
        if hasattr(model, "merge_and_unload"):  # LoRA adapters: merge for inference
            model = model.merge_and_unload()
        etc_config = unwrap_peft(model).etc.config
        model.to(device)
        # processor files saved with the ETC parts take precedence (same tokenizer, but keep what training used)
        if os.path.isfile(os.path.join(etc, "processor_config.json")):
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(etc)
    return model.eval(), processor, etc_config
