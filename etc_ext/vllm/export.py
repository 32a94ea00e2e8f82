"""`etc-ext export-vllm`: an etc-ext checkpoint -> a model folder vLLM serves with the plugin.

The folder is the Hugging Face LLaVA folder (`save_pretrained` of the base model with ETC's training parts left out,
the processor and tokenizer), plus:
- `etc_compression.safetensors`: `etc.compression_tokens.weight` `[M, hidden]` (absent for M = 0);
- the chat template writes BOS first when the tokenizer adds one (vLLM renders chats without special tokens);
- in config.json: `architectures = ["ETCLlavaForConditionalGeneration"]`, `etc_compression = {num_compression_tokens,
  num_visual_tokens}`, and a top-level `mrope_section` so that vLLM takes ETC's gapped positions from the model
  (see `etc_ext.vllm.llava`); the language model's own RoPE settings are untouched.

Imports nothing from vLLM: exporting works in etc-ext's own environment.
"""

from __future__ import annotations

import json
import os

import torch

from .config import ARCHITECTURE, CONFIG_KEY


COMPRESSION_FILE = "etc_compression.safetensors"


def export_for_vllm(model_path: str, out_dir: str, etc_path: str | None = None, dtype: torch.dtype = torch.float32,
                    base_model: str | None = None) -> dict:  # fmt: skip
    """Writes the vLLM folder of a model `etc_ext.models.loading.load_for_inference` can load (a plain LLaVA folder,
    optionally with ETC parts in `etc_path`, or an ETC training run's `final/` folder). Returns what config.json
    got under `etc_compression`."""
    from ..models.loading import integration_for, load_for_inference

    model, processor, etc_config = load_for_inference(model_path, etc_path, base_model=base_model, dtype=dtype)
    if type(model).__name__ not in ("LlavaForConditionalGeneration", "ETCLlavaForConditionalGeneration"):
        raise NotImplementedError(f"export-vllm supports LLaVA models; got a {type(model).__name__}")
    compression_tokens = None
    if etc_config is not None:
        compression_tokens = model.etc.compression_tokens.weight.detach().to(dtype).contiguous()
        integration_for(model).remove_etc(model)
    return write_vllm_folder(model, processor, out_dir, compression_tokens)


def write_vllm_folder(model, processor, out_dir: str, compression_tokens: torch.Tensor | None) -> dict:
    """Writes a plain `LlavaForConditionalGeneration` and its processor as a vLLM folder, with `compression_tokens`
    `[M, hidden]` (None: served without compression). Returns the `etc_compression` settings."""
    from safetensors.torch import save_file

    from ..models.llava import num_visual_tokens

    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    _chat_template_with_bos(processor)
    processor.save_pretrained(out_dir)
    if compression_tokens is not None:
        save_file({"etc.compression_tokens.weight": compression_tokens.contiguous()},
                  os.path.join(out_dir, COMPRESSION_FILE))  # fmt: skip
    elif os.path.exists(os.path.join(out_dir, COMPRESSION_FILE)):
        os.remove(os.path.join(out_dir, COMPRESSION_FILE))  # a folder reused for a model without compression

    settings = {
        "num_compression_tokens": 0 if compression_tokens is None else int(compression_tokens.shape[0]),
        "num_visual_tokens": num_visual_tokens(model.config),
    }
    config_path = os.path.join(out_dir, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    text = model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    config["architectures"] = [ARCHITECTURE]
    config[CONFIG_KEY] = settings
    config["mrope_section"] = [head_dim // 2]
    if not config["text_config"].get("architectures"):
        config["text_config"]["architectures"] = ["LlamaForCausalLM"]
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
    return settings


def _chat_template_with_bos(processor) -> None:
    """vLLM tokenizes a rendered chat without special tokens (templates are expected to write BOS themselves), while
    etc-ext's prompts are tokenized with them: when the tokenizer starts every text with BOS and the template does
    not write it, the exported template does, so that a chat request reaches the model as the training prompts did."""
    tokenizer = getattr(processor, "tokenizer", processor)
    template = getattr(processor, "chat_template", None)
    bos = getattr(tokenizer, "bos_token", None)
    if not template or not bos or "bos_token" in template:
        return
    if tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]:
        processor.chat_template = "{{- bos_token -}}" + template
