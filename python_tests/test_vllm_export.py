"""`etc-ext export-vllm` (etc_ext.vllm.export): the model folder etc-ext's vLLM plugin serves. Runs without vLLM."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from etc_ext.cli import main as cli_main
from etc_ext.demo.artifacts import FULL_NAME, checkpoint_path, load_etc
from etc_ext.vllm.config import ARCHITECTURE, CONFIG_KEY, etc_settings
from etc_ext.vllm.export import COMPRESSION_FILE, export_for_vllm


def read_config(folder) -> dict:
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


def test_export_of_an_etc_checkpoint(tmp_path, few_threads):
    out = tmp_path / "etc-m4"
    settings = export_for_vllm(checkpoint_path(FULL_NAME), str(out), checkpoint_path("etc-m4-vid"))
    assert settings == {"num_compression_tokens": 4, "num_visual_tokens": 144}
    config = read_config(out)
    assert config["architectures"] == [ARCHITECTURE] and config[CONFIG_KEY] == settings
    text = config["text_config"]
    assert config["mrope_section"] == [text["hidden_size"] // text["num_attention_heads"] // 2]
    assert text["architectures"] == ["LlamaForCausalLM"]
    model, _, _ = load_etc("etc-m4-vid")
    tokens = load_file(str(out / COMPRESSION_FILE))
    assert list(tokens) == ["etc.compression_tokens.weight"]  # the decoder and variances stay behind
    assert torch.equal(tokens["etc.compression_tokens.weight"], model.etc.compression_tokens.weight)
    weights = load_file(str(out / "model.safetensors"))
    assert not any(name.startswith("etc.") for name in weights)
    assert torch.equal(weights["language_model.lm_head.weight"], model.lm_head.weight)
    with open(out / "chat_template.jinja") as f:
        assert f.read().startswith("{{- bos_token -}}")  # vLLM renders chats without special tokens


def test_export_without_compression_and_from_the_command_line(tmp_path, few_threads, capsys):
    out = tmp_path / "full"
    (out).mkdir()
    (out / COMPRESSION_FILE).write_bytes(b"stale")  # a reused folder: the stale file must go
    assert cli_main(["export-vllm", "--model", checkpoint_path(FULL_NAME), "--out", str(out)]) == 0
    assert "144 prompt and KV-cache slots per image" in capsys.readouterr().out
    assert read_config(out)[CONFIG_KEY] == {"num_compression_tokens": 0, "num_visual_tokens": 144}
    assert not (out / COMPRESSION_FILE).exists()


def test_serving_settings_name_what_is_missing():
    class Config:
        pass

    with pytest.raises(ValueError, match="no 'etc_compression' entry.*etc-ext export-vllm"):
        etc_settings(Config())
    config = Config()
    config.etc_compression = {"num_compression_tokens": -1, "num_visual_tokens": 144}
    with pytest.raises(ValueError, match="num_compression_tokens must be >= 0"):
        etc_settings(config)
