"""Data for etc-ext: LLaVA-format conversation loading and batching, the generated shapes VQA set, and the demo
processor.

- `etc_ext.data.shapes`: `generate_shapes_dataset(...)` writes the colored-shapes instruction-VQA set (also
  `python -m etc_ext.data.shapes --out DIR --num-images N --seed S`).
- `etc_ext.data.processor`: `build_processor(...)` builds a small real `LlavaProcessor` without downloads.
- `etc_ext.data.conversation`: `ConversationDataset` reads `llava_v1_5_mix665k`-style json through a model's processor.
- `etc_ext.data.collator`: `ConversationCollator` pads items into batches.

Nothing here imports transformers at import time; `build_processor` does when called.
"""

from .collator import ConversationCollator
from .conversation import (
    IGNORE_INDEX,
    LLAVA_SYSTEM_PROMPT,
    BadSampleError,
    Conversation,
    ConversationDataset,
    encode_conversation,
    encode_prompt,
    load_llava_json,
    parse_sample,
    to_chat_messages,
)
from .processor import build_image_processor, build_processor, build_tokenizer, num_image_tokens
from .shapes import DEFAULT_IMAGE_SIZE, QUESTION_TYPES, generate_shapes_dataset


__all__ = [
    "BadSampleError",
    "Conversation",
    "ConversationCollator",
    "ConversationDataset",
    "DEFAULT_IMAGE_SIZE",
    "IGNORE_INDEX",
    "LLAVA_SYSTEM_PROMPT",
    "QUESTION_TYPES",
    "build_image_processor",
    "build_processor",
    "build_tokenizer",
    "encode_conversation",
    "encode_prompt",
    "generate_shapes_dataset",
    "load_llava_json",
    "num_image_tokens",
    "parse_sample",
    "to_chat_messages",
]
