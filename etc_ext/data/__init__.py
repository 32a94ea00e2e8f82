"""Data for etc-ext: LLaVA-format conversation loading and batching, the generated shapes VQA set, and the demo
processor.

- `etc_ext.data.shapes`: `generate_shapes_dataset(...)` writes the colored-shapes instruction-VQA set (also
  `python -m etc_ext.data.shapes --out DIR --num-images N --seed S`).
- `etc_ext.data.processor`: `build_processor(...)` builds a small real `LlavaProcessor` without downloads.
- `etc_ext.data.conversation`: `ConversationDataset` reads `llava_v1_5_mix665k`-style json through a model's processor.
- `etc_ext.data.collator`: `ConversationCollator` pads items into batches.

The names below are imported from their submodule on first use (PEP 562), as transformers does, so that
`python -m etc_ext.data.shapes` runs its module once and nothing imports transformers before `build_processor` is
called.
"""

import importlib


_EXPORTS = {
    "ConversationCollator": "collator",
    "BadSampleError": "conversation",
    "Conversation": "conversation",
    "ConversationDataset": "conversation",
    "IGNORE_INDEX": "conversation",
    "LLAVA_SYSTEM_PROMPT": "conversation",
    "encode_conversation": "conversation",
    "encode_prompt": "conversation",
    "load_llava_json": "conversation",
    "parse_sample": "conversation",
    "to_chat_messages": "conversation",
    "build_image_processor": "processor",
    "build_processor": "processor",
    "build_tokenizer": "processor",
    "num_image_tokens": "processor",
    "DEFAULT_IMAGE_SIZE": "shapes",
    "COLOR_QUESTION_TYPES": "shapes",
    "QUESTION_TYPES": "shapes",
    "generate_shapes_dataset": "shapes",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
