"""Serving ETC with vLLM: an out-of-tree model plugin (entry point `vllm.general_plugins`, installed with etc-ext).

```
etc-ext export-vllm --model CKPT --out DIR     # an etc-ext checkpoint -> a folder vLLM loads
vllm serve DIR                                 # or LLM(model=DIR): the plugin registers the architecture
```

- `processing.py`: prompts hold M compression-token slots per image (N for a model exported without compression);
- `llava.py`: the model (vision tower, projector, language model, gapped positions);
- `compression.py`: the compression sub-forward that gives the compression tokens their states at every layer;
- `paged_kv.py`: reads K/V back from vLLM's paged cache, layout learnt from the backend's own writer;
- `export.py`: the model folder.

vLLM itself is imported only by `register()` and the modules above, never by `import etc_ext`.
"""

from .config import ARCHITECTURE


def register() -> None:
    """vLLM's plugin hook: makes `ETCLlavaForConditionalGeneration` loadable (lazily: vLLM imports the module when a
    model folder names it)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "etc_ext.vllm.llava:ETCLlavaForConditionalGeneration")


__all__ = ["register", "ARCHITECTURE"]
