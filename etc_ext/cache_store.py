"""Compressed image caches on disk: keep an image's ETC cache (prefix + M entries per layer) and answer later.

An ETC cache does not depend on the question that follows it (the compression tokens come before the text), so an
application can prefill each image once, save the cache, and answer any number of questions later without running
the vision tower or the image's N tokens through the LLM again:

    cache = model(**prompt_up_to_the_image, use_cache=True).cache
    save_compressed_cache(cache, "photo.etc-cache.safetensors", model)
    ...
    cache = load_compressed_cache("photo.etc-cache.safetensors", model)
    model.generate(input_ids=full_prompt_ids, cache=cache)  # no pixel_values needed for text after the image

The file is safetensors: every layer's keys and values `(B, Hkv, C, D)` and the `ETCCacheState` tensors, with
metadata naming the ETC config (a hash of its json) and the model it came from (class, a hash of its config, the
dtype, a fingerprint of the trained compression tokens). Loading checks all of them and says which one differs: a
cache is only valid for the exact model and ETC weights that wrote it.
"""

import hashlib
import json
import os

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .cache import ETCCache, ETCCacheState

__all__ = ["save_compressed_cache", "load_compressed_cache", "cache_identity"]

FORMAT = "etc-ext compressed cache"
_STATE_TENSORS = ("attention_mask", "position_offset", "next_position")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _etc_parts(model: nn.Module):
    from .models.common import _get_etc, unwrap_peft

    return unwrap_peft(model), _get_etc(model)


def cache_identity(model: nn.Module) -> dict:
    """What a compressed cache depends on, as strings: `etc_config` (hash of the ETC config's json), `model_class`,
    `model_config` (hash of the model's config without its path), `dtype` and `compression_tokens` (hash of the
    trained compression-token weights)."""
    base, etc = _etc_parts(model)
    config = base.config.to_dict()
    config.pop("_name_or_path", None)
    tokens = etc.compression_tokens.weight.detach().float().cpu().contiguous()
    return {
        "etc_config": _sha256(etc.config.to_json_string()),
        "model_class": etc.original_class.__name__,
        "model_config": _sha256(json.dumps(config, sort_keys=True, default=str)),
        "dtype": str(etc.compression_tokens.weight.dtype).removeprefix("torch."),
        "compression_tokens": hashlib.sha256(tokens.numpy().tobytes()).hexdigest()[:16],
    }


def save_compressed_cache(cache, path: str | os.PathLike, model: nn.Module) -> None:
    """Write a compressed cache (from an ETC prefill or generate()) to `path` (safetensors), atomically.

    Raises:
        ValueError: `cache` holds no compressed prefill (no `etc_state`), or its layers are not plain
            `DynamicLayer`s.
    """
    from transformers.cache_utils import DynamicLayer

    state = getattr(cache, "etc_state", None)
    if not isinstance(state, ETCCacheState):
        raise ValueError(
            "save_compressed_cache: the cache holds no compressed ETC prefill (no etc_state); prefill with "
            "model(**inputs, use_cache=True) or generate() on a model with ETC applied"
        )
    tensors = {}
    for i, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer or not layer.is_initialized:
            raise ValueError(f"save_compressed_cache: cache.layers[{i}] is not a filled DynamicLayer")
        tensors[f"layers.{i}.keys"] = layer.keys
        tensors[f"layers.{i}.values"] = layer.values
    for name in _STATE_TENSORS:
        tensors[f"state.{name}"] = getattr(state, name)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    metadata = {
        "format": FORMAT,
        "etc_ext_version": __version__,
        "input_length": str(state.input_length),
        "trailing_tokens": str(state.trailing_tokens),
    }
    metadata.update({f"identity.{k}": v for k, v in cache_identity(model).items()})
    path = os.fspath(path)
    temporary = f"{path}.tmp-{os.getpid()}"
    save_file(tensors, temporary, metadata=metadata)
    os.replace(temporary, path)  # never a half-written cache under the final name


def load_compressed_cache(path: str | os.PathLike, model: nn.Module, device=None) -> ETCCache:
    """Read a cache written by `save_compressed_cache` for `model` (onto `device`, default: the model's).

    Raises:
        ValueError: the file is missing or not a compressed cache, or it was written by another model, another
            ETC config or other trained ETC weights (the message names what differs).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"load_compressed_cache: {path} does not exist")
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"load_compressed_cache: {path} is not a safetensors file ({error})") from None
    if metadata.get("format") != FORMAT:
        raise ValueError(f"load_compressed_cache: {path} is not an etc-ext compressed cache")
    expected = cache_identity(model)
    differs = [
        f"{name} (file {metadata.get(f'identity.{name}')!r}, model {value!r})"
        for name, value in expected.items()
        if metadata.get(f"identity.{name}") != value
    ]
    if differs:
        raise ValueError(
            f"load_compressed_cache: {path} was written by another model or ETC checkpoint: " + "; ".join(differs)
        )
    base, _ = _etc_parts(model)
    if device is None:
        device = base.get_input_embeddings().weight.device
    tensors = load_file(path, device=str(device))
    cache = ETCCache(config=base.config)
    num_layers = sum(1 for name in tensors if name.endswith(".keys"))
    for i in range(num_layers):
        cache.update(tensors[f"layers.{i}.keys"], tensors[f"layers.{i}.values"], i)
    cache.etc_state = ETCCacheState(
        input_length=int(metadata["input_length"]),
        trailing_tokens=int(metadata.get("trailing_tokens", 0)),  # files written before it was recorded: none
        **{name: tensors[f"state.{name}"] for name in _STATE_TENSORS},
    )
    return cache
