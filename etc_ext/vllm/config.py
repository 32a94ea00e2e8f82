"""What the exported model folder tells the vLLM plugin (the `etc_compression` entry of its config.json)."""

from __future__ import annotations

from dataclasses import dataclass


ARCHITECTURE = "ETCLlavaForConditionalGeneration"
CONFIG_KEY = "etc_compression"


@dataclass(frozen=True)
class ETCServingSettings:
    """num_compression_tokens: M slots per image (0: the model is served without compression, N slots per image);
    num_visual_tokens: N, the visual tokens one image gives the language model."""

    num_compression_tokens: int
    num_visual_tokens: int

    def __post_init__(self):
        if self.num_compression_tokens < 0 or self.num_visual_tokens < 1:
            raise ValueError(f"{CONFIG_KEY}: num_compression_tokens must be >= 0 and num_visual_tokens >= 1, got "
                             f"{self.num_compression_tokens} and {self.num_visual_tokens}")  # fmt: skip

    @property
    def compresses(self) -> bool:
        return self.num_compression_tokens > 0


def etc_settings(hf_config) -> ETCServingSettings:
    """The settings in a model folder made by `etc-ext export-vllm` (raises naming the key when it is missing)."""
    entry = getattr(hf_config, CONFIG_KEY, None)
    if not isinstance(entry, dict):
        raise ValueError(f"the model's config.json has no {CONFIG_KEY!r} entry: make the folder with `etc-ext "
                         "export-vllm --model CKPT --out DIR`")  # fmt: skip
    return ETCServingSettings(int(entry["num_compression_tokens"]), int(entry["num_visual_tokens"]))
