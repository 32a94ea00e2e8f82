"""The demo's shipped checkpoints: packing trained runs small (fp16) and loading them back.

Layout of `etc_ext/demo/checkpoints/` (written by `python -m etc_ext.demo.reproduce --install`):

```
manifest.json          the recipe, each run's training summary and validation accuracy, the files and their sizes
full/                  the full-token model: a `save_pretrained` folder (config.json, model.safetensors in fp16,
                       generation_config.json) with the processor's files
etc-m1-vid/ ...        one folder per ETC variant, as `etc_ext.models.llava.save_pretrained` writes it: etc_config.json,
                       etc_model.safetensors (compression tokens, and the training-only decoder and variances),
                       base_model.safetensors (the fine-tuned projector and language model; the vision tower is
                       frozen, so it is the full model's), all in fp16
```

Both kinds load with the public API: `load_for_inference(full)` and `load_for_inference(full, etc=variant)` (or
`etc-ext eval --model full --etc variant`); weights are upcast to the model's dtype (float32 on CPUs) on loading.
"""

from __future__ import annotations

import json
import os
import shutil

import torch


CHECKPOINT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints")
MANIFEST_NAME = "manifest.json"
FULL_NAME = "full"


def checkpoint_path(name: str, root: str | os.PathLike | None = None) -> str:
    return os.path.join(os.fspath(root or CHECKPOINT_DIR), name)


def read_manifest(root: str | os.PathLike | None = None) -> dict:
    """The manifest of a checkpoint folder; FileNotFoundError with the command that makes one when it is absent."""
    path = os.path.join(os.fspath(root or CHECKPOINT_DIR), MANIFEST_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: the demo checkpoints are missing. Reinstall etc-ext (they ship with the package) or "
            "train them: python -m etc_ext.demo.reproduce --work runs/demo --install"
        )
    with open(path) as f:
        return json.load(f)


def _fp16_state(path: str) -> dict:
    from safetensors.torch import load_file

    return {
        name: (tensor.half() if tensor.is_floating_point() else tensor).contiguous()
        for name, tensor in load_file(path).items()
    }


def pack_full(final_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[str]:
    """Writes the full-token model of a `final/` folder (a complete `save_pretrained` model) to `out_dir` in fp16,
    with its processor. Returns the files written."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out_dir = os.fspath(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    model = AutoModelForImageTextToText.from_pretrained(final_dir, dtype=torch.float16)
    model.save_pretrained(out_dir)
    AutoProcessor.from_pretrained(final_dir).save_pretrained(out_dir)
    return sorted(os.listdir(out_dir))


def pack_etc(final_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[str]:
    """Writes the ETC parts of a `final/` folder of an ETC run to `out_dir` in fp16 (same file names, so
    `etc_ext.models.llava.from_pretrained` reads them). Returns the files written."""
    from safetensors.torch import save_file

    from ..models.common import BASE_WEIGHTS_NAME, ETC_CONFIG_NAME, ETC_WEIGHTS_NAME

    final_dir, out_dir = os.fspath(final_dir), os.fspath(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    shutil.copy(os.path.join(final_dir, ETC_CONFIG_NAME), os.path.join(out_dir, ETC_CONFIG_NAME))
    for name in (ETC_WEIGHTS_NAME, BASE_WEIGHTS_NAME):
        source = os.path.join(final_dir, name)
        if not os.path.isfile(source):
            raise FileNotFoundError(f"{source} is missing: not the final/ folder of an ETC run with full fine-tuning")
        save_file(_fp16_state(source), os.path.join(out_dir, name), metadata={"format": "pt"})
    return sorted(os.listdir(out_dir))


def folder_bytes(path: str | os.PathLike) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path):
        total += sum(os.path.getsize(os.path.join(dirpath, name)) for name in filenames)
    return total


def load_full(root: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """`(model, processor)`: the shipped full-token model, in eval mode on the CPU."""
    from ..models.loading import load_model_and_processor

    return load_model_and_processor(checkpoint_path(FULL_NAME, root), dtype=dtype)


def load_etc(name: str, root: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """`(model, processor, etc_config)`: the full model with the ETC variant `name` applied, in eval mode."""
    from ..models.loading import load_for_inference

    return load_for_inference(checkpoint_path(FULL_NAME, root), checkpoint_path(name, root), dtype=dtype)
