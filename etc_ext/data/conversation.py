"""LLaVA-format conversation data: loading, validation and tokenization through the model's processor.

The input is the `llava_v1_5_mix665k` layout, a json list (or jsonl) of samples:

```
{"id": "000000033471",
 "image": "coco/train2017/000000033471.jpg",          # relative to an image root; a list for several images;
                                                       # absent for text-only samples
 "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus in the image?"},
                   {"from": "gpt", "value": "The bus in the image is white and red."},
                   {"from": "human", "value": "What feature can be seen on the back of the bus?"},
                   {"from": "gpt", "value": "The back of the bus features an advertisement."}]}
```

Each `<image>` placeholder in a human turn stands for the next image of the sample. A sample becomes a list of chat
messages (`"human"` -> `"user"`, `"gpt"` -> `"assistant"`) whose contents are `{"type": "image"}` and
`{"type": "text", "text": ...}` blocks, rendered by the processor's own chat template and tokenized by the processor
itself, so the image placeholders expand exactly as the model expects (e.g. 576 `<image>` tokens for LLaVA-1.5).

Training labels: a token is learned (label = its id) iff it overlaps the text of an assistant turn as the template
writes it (the answer and what the template closes it with, e.g. `</s>`); every other position, image tokens included,
gets `IGNORE_INDEX` (-100). The assistant spans are found by rendering the conversation prefix by prefix: for
assistant turn i, the text of messages[:i] with the generation prompt is a prefix of the text of messages[:i+1], and
the rest is what the model must write. This works with any chat template that renders conversations incrementally
(LLaVA, Qwen, Llama, ...) without `{% generation %}` markers, and fails loudly otherwise.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image


logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# System prompt of LLaVA-1.5 (vicuna_v1); not added unless asked for (`system_prompt=LLAVA_SYSTEM_PROMPT`).
LLAVA_SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


class BadSampleError(ValueError):
    """A sample that cannot be trained on or evaluated; the message names the sample id and the file."""

    def __init__(self, sample_id: str, source: str, reason: str):
        self.sample_id = sample_id
        self.source = source
        self.reason = reason
        super().__init__(f"bad sample {sample_id!r} in {source}: {reason}")


@dataclass
class Conversation:
    """A validated sample.

    Attributes:
        id: the sample's `id` (or `#<index>` if it has none).
        turns: `(role, text)` pairs, role in `"system"`, `"user"`, `"assistant"`; text keeps the `<image>`
            placeholders. An optional system turn first, then user and assistant turns alternating from a user turn.
        image_paths: absolute image paths, in the order of the placeholders.
        index: position of the sample in its source file.
        extra: the sample's other keys (e.g. `question_types` of the shapes data).
    """

    id: str
    turns: list[tuple[str, str]]
    image_paths: list[str]
    index: int
    extra: dict[str, Any] = field(default_factory=dict)

    def prompt_and_answer(self) -> tuple[list[tuple[str, str]], str, list[str]]:
        """The evaluation view: the turns before the last assistant turn (so they end with a user turn), that turn's
        text (the reference answer), and the images whose placeholders are in the prompt turns."""
        last = max(i for i, (role, _) in enumerate(self.turns) if role == "assistant")
        prompt = self.turns[:last]
        num_images = sum(text.count(IMAGE_PLACEHOLDER) for _, text in prompt)
        return prompt, self.turns[last][1], self.image_paths[:num_images]


def load_llava_json(path: str | os.PathLike) -> list[dict]:
    """Reads a LLaVA conversation file: a json list, or json lines (`.jsonl`)."""
    with open(path) as f:
        try:
            if str(path).endswith(".jsonl"):
                return [json.loads(line) for line in f if line.strip()]
            records = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:  # a damaged or truncated file
            kind = "json lines" if str(path).endswith(".jsonl") else "json"
            raise ValueError(f"{path} is not valid {kind} ({error})") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a json list of samples, got {type(records).__name__}")
    return records


def parse_sample(
    record: Any, index: int, image_root: str, source: str, check_image_files: bool = True
) -> Conversation:
    """Validates one LLaVA record and returns it as a `Conversation`.

    Leading `gpt` turns are dropped, as LLaVA's own preprocessing does. Raises `BadSampleError` (naming the sample id,
    `source` and, where relevant, the image file) for: a record that is not an object, an empty or malformed
    conversation, turns that do not alternate, no `gpt` turn, an empty turn, an image without `<image>` in the human
    turns, an `<image>` without an image, more or fewer placeholders than images, a placeholder outside human turns,
    or (with `check_image_files`) a missing image file.
    """
    if not isinstance(record, dict):
        raise BadSampleError(f"#{index}", source, f"sample {index} is a {type(record).__name__}, not a json object")
    sample_id = str(record.get("id", f"#{index}"))

    def bad(reason: str) -> BadSampleError:
        return BadSampleError(sample_id, source, reason)

    images = record.get("image")
    if images is None:
        images = []
    elif isinstance(images, str):
        images = [images]
    elif not (isinstance(images, list) and all(isinstance(p, str) for p in images)):
        raise bad(f"'image' must be a path or a list of paths, got {images!r}")

    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise bad("empty conversation ('conversations' is missing or empty)")
    turns = []
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise bad(f"turn {k} must be {{'from': one of {sorted(ROLES)}, 'value': str}}, got {turn!r}")
        if not turn["value"].strip():
            raise bad(f"turn {k} ({turn['from']}) is empty")
        turns.append((ROLES[turn["from"]], turn["value"]))

    while turns and turns[0][0] == "assistant":  # LLaVA drops a conversation's leading gpt turns
        turns.pop(0)
    body = turns[1:] if turns and turns[0][0] == "system" else turns
    for k, (role, _) in enumerate(body):
        expected = "user" if k % 2 == 0 else "assistant"
        if role != expected:
            raise bad(f"turns must alternate human/gpt after an optional system turn; found {role!r} at position {k}")
    if not any(role == "assistant" for role, _ in turns):
        raise bad("no gpt turn: nothing to learn or to evaluate")

    for k, (role, text) in enumerate(turns):
        if role != "user" and IMAGE_PLACEHOLDER in text:
            raise bad(f"{IMAGE_PLACEHOLDER} in turn {k}, a {role!r} turn; images belong to human turns")
    num_placeholders = sum(text.count(IMAGE_PLACEHOLDER) for role, text in turns)
    if images and num_placeholders == 0:
        raise bad(f"has image {images[0]!r} but no {IMAGE_PLACEHOLDER} in its human turns")
    if num_placeholders and not images:
        raise bad(f"has {num_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but no image")
    if num_placeholders != len(images):
        raise bad(f"has {num_placeholders} {IMAGE_PLACEHOLDER} placeholders but {len(images)} images {images}")

    image_paths = [os.path.abspath(os.path.join(image_root, p)) for p in images]
    if check_image_files:
        for path in image_paths:
            if not os.path.isfile(path):
                raise bad(f"image file {path} not found")
    extra = {k: v for k, v in record.items() if k not in ("id", "image", "conversations")}
    return Conversation(sample_id, turns, image_paths, index, extra)


def to_chat_messages(turns: list[tuple[str, str]], system_prompt: str | None = None) -> list[dict]:
    """Turns `(role, text)` pairs into Hugging Face chat messages with content blocks: each `<image>` becomes an
    `{"type": "image"}` block in place, the text around it `{"type": "text", "text": ...}` blocks (stripped; the
    newline that follows a placeholder is the template's business). `system_prompt` is prepended as a system message
    unless the turns already start with one."""
    messages = []
    if system_prompt and not (turns and turns[0][0] == "system"):
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    for role, text in turns:
        content = []
        for k, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if k > 0:
                content.append({"type": "image"})
            if piece.strip():
                content.append({"type": "text", "text": piece.strip()})
        messages.append({"role": role, "content": content})
    return messages


def render_chat(processor, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Renders messages with the processor's chat template (or its tokenizer's, or a tokenizer's own)."""
    owner = processor if getattr(processor, "chat_template", None) else getattr(processor, "tokenizer", processor)
    if not getattr(owner, "chat_template", None):
        raise ValueError(f"{type(processor).__name__} has no chat template; set processor.chat_template")
    return owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(processor, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Renders the whole conversation and returns `(text, spans)`: the character span `[start, end)` of each assistant
    turn in `text` (the answer and the template's closing tokens, trailing whitespace excluded)."""
    text = render_chat(processor, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(processor, messages[:i], add_generation_prompt=True)
        through = render_chat(processor, messages[: i + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise ValueError(
                "the chat template does not render conversations incrementally (the text up to an assistant turn "
                "is not a prefix of the whole conversation), so assistant tokens cannot be located: "
                f"{before[-80:]!r} vs {through[-80:]!r}"
            )
        spans.append((len(before), max(len(before), len(through.rstrip()))))
    return text, spans


def _image_token_id(processor) -> int | None:
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None and getattr(processor, "tokenizer", None) is not None:
        token_id = getattr(processor.tokenizer, "image_token_id", None)
    return token_id


def _tokenize(processor, text: str, images: list[Image.Image]) -> dict:
    """Runs the processor on one text (and its images); returns its outputs with a leading batch dim of 1."""
    tokenizer = getattr(processor, "tokenizer", processor)
    bos = getattr(tokenizer, "bos_token", None)
    kwargs = {"return_offsets_mapping": True, "add_special_tokens": not (bos and text.startswith(bos))}
    if images:
        if getattr(processor, "image_processor", None) is None:
            raise ValueError(f"{type(processor).__name__} cannot process images (no image_processor)")
        outputs = processor(
            text=[text], images=images, return_text_replacement_offsets=True, return_tensors="pt", **kwargs
        )
        return dict(outputs)
    if tokenizer is processor:
        return dict(processor([text], return_tensors="pt", **kwargs))
    return dict(processor(text=[text], return_tensors="pt", **kwargs))


# Per-token outputs of some processors besides input_ids (Qwen-VL's mm_token_type_ids mark image/video tokens).
TOKEN_TYPE_KEYS = ("token_type_ids", "mm_token_type_ids")


def _split_outputs(outputs: dict) -> tuple[torch.Tensor, dict, dict]:
    """Splits the processor's outputs for one text into input ids `(seq_len,)`, other per-token tensors
    (`mm_token_type_ids`, `(seq_len,)`), and the image tensors (`pixel_values`, `image_grid_thw`, ...: first dim per
    image or per patch, as the processor returns them)."""
    input_ids = outputs["input_ids"][0]
    token_types = {k: torch.as_tensor(outputs[k])[0] for k in TOKEN_TYPE_KEYS if k in outputs}
    skip = ("input_ids", "attention_mask", "offset_mapping", "text_replacement_offsets", *TOKEN_TYPE_KEYS)
    image_inputs = {k: v for k, v in outputs.items() if k not in skip and isinstance(v, torch.Tensor)}
    return input_ids, token_types, image_inputs


def encode_conversation(
    processor,
    messages: list[dict],
    images: list[Image.Image],
    *,
    max_length: int | None = None,
    sample_id: str = "?",
    source: str = "?",
) -> dict:
    """Tokenizes a whole conversation for training.

    Args:
        processor: the model's processor (e.g. `LlavaProcessor`), or a tokenizer for text-only messages.
        messages: chat messages with content blocks (`to_chat_messages`).
        images: PIL images, one per image block, in order.
        max_length: truncate on the right to this many tokens; a sample whose image tokens would be cut raises
            `BadSampleError`.

    Returns:
        `input_ids`, `attention_mask`, `labels` (LongTensors of shape `(seq_len,)`; labels are `IGNORE_INDEX` outside
        assistant turns and on image tokens), the processor's other per-token tensors if any (`mm_token_type_ids`),
        `num_images`, and the processor's image tensors such as `pixel_values` `(num_images, 3, height, width)` (None
        without images).
    """
    text, spans = assistant_spans(processor, messages)
    outputs = _tokenize(processor, text, images)
    input_ids, token_types, image_inputs = _split_outputs(outputs)

    # Shift the spans by what the image placeholders before them grew into, then mark the overlapping tokens.
    offsets = torch.as_tensor(outputs["offset_mapping"][0]).reshape(-1, 2)  # (seq_len, 2)
    replacements = (outputs.get("text_replacement_offsets") or [[]])[0]
    learned = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    for start, end in spans:
        # `new_span` is in expanded-text coordinates, so the last placeholder before the span gives the whole shift
        before = [r for r in replacements if r["span"][1] <= start]
        shift = before[-1]["new_span"][1] - before[-1]["span"][1] if before else 0
        start, end = start + shift, end + shift
        learned |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
    image_token_id = _image_token_id(processor)
    if image_token_id is not None:
        learned &= input_ids != image_token_id
    labels = torch.where(learned, input_ids, torch.full_like(input_ids, IGNORE_INDEX))

    if max_length is not None and input_ids.shape[0] > max_length:
        if image_token_id is not None and bool((input_ids[max_length:] == image_token_id).any()):
            raise BadSampleError(
                sample_id, source, f"{input_ids.shape[0]} tokens > max_length={max_length} and truncation would cut "
                "image tokens"
            )
        input_ids, labels = input_ids[:max_length], labels[:max_length]
        token_types = {k: v[:max_length] for k, v in token_types.items()}
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        **token_types,
        "num_images": len(images),
        "pixel_values": None,
        **image_inputs,
    }


def encode_prompt(processor, messages: list[dict], images: list[Image.Image]) -> dict:
    """Tokenizes a prompt for generation: the messages (ending with a user turn) and the template's generation prompt.

    Returns `input_ids`, `attention_mask` `(seq_len,)`, `num_images` and the image tensors (`pixel_values` or None).
    """
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("a prompt must end with a user message")
    text = render_chat(processor, messages, add_generation_prompt=True)
    input_ids, token_types, image_inputs = _split_outputs(_tokenize(processor, text, images))
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        **token_types,
        "num_images": len(images),
        "pixel_values": None,
        **image_inputs,
    }


def load_image(path: str) -> Image.Image:
    """Opens an image file as RGB (fully read, file closed)."""
    with Image.open(path) as image:
        return image.convert("RGB")


class ConversationDataset(torch.utils.data.Dataset):
    """LLaVA-format conversations, tokenized on access with the model's processor; images are opened lazily.

    Args:
        data: path of a LLaVA json/jsonl file, or the list of samples itself.
        processor: the model's processor (chat template + tokenizer + image processor).
        image_root: folder the `image` paths are relative to; defaults to the json file's folder (the current folder
            for an in-memory list).
        mode: `"train"`: whole conversations with labels on assistant turns; `"eval"`: the prompt up to the last
            human turn with the generation prompt, plus the reference `answer` (the last gpt turn).
        max_length: truncation length for training (see `encode_conversation`).
        skip_bad: validate every sample up front (structure, placeholders, image files) and drop the bad ones, logging
            them; `num_skipped` and `skipped` (`(id, reason)` pairs) tell which. With False the first bad sample
            raises `BadSampleError`.
        system_prompt: system message prepended to every conversation that has none (e.g. `LLAVA_SYSTEM_PROMPT`).
        check_image_files: check up front that every image file exists.

    Items are dicts: `id`, `meta` (the sample's other json keys, e.g. `question_types`), `input_ids`,
    `attention_mask`, (`labels` in train mode, `answer` in eval mode), `num_images`, `pixel_values`
    (`(num_images, 3, H, W)` or None) and any other image tensor of the processor. An
    image that exists but cannot be read raises `BadSampleError` in `__getitem__`. Batch items with
    `ConversationCollator`.
    """

    def __init__(
        self,
        data: str | os.PathLike | list[dict],
        processor,
        image_root: str | os.PathLike | None = None,
        *,
        mode: str = "train",
        max_length: int | None = None,
        skip_bad: bool = False,
        system_prompt: str | None = None,
        check_image_files: bool = True,
    ):
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        if isinstance(data, (str, os.PathLike)):
            self.source = os.fspath(data)
            records = load_llava_json(data)
            default_root = os.path.dirname(os.path.abspath(data))
        else:
            self.source = "<in-memory samples>"
            records = data
            default_root = os.getcwd()
        self.image_root = os.fspath(image_root) if image_root is not None else default_root
        self.processor = processor
        self.mode = mode
        self.max_length = max_length
        self.system_prompt = system_prompt

        self.samples: list[Conversation] = []
        self.skipped: list[tuple[str, str]] = []
        for index, record in enumerate(records):
            try:
                self.samples.append(parse_sample(record, index, self.image_root, self.source, check_image_files))
            except BadSampleError as error:
                if not skip_bad:
                    raise
                self.skipped.append((error.sample_id, error.reason))
                logger.debug("skipping %s", error)
        if self.skipped:
            shown = "; ".join(f"{sample_id}: {reason}" for sample_id, reason in self.skipped[:5])
            more = f" (and {len(self.skipped) - 5} more)" if len(self.skipped) > 5 else ""
            logger.warning(
                "skipped %d bad sample(s) of %d in %s: %s%s", len(self.skipped), len(records), self.source, shown, more
            )

    @property
    def num_skipped(self) -> int:
        """Number of bad samples dropped by `skip_bad=True`."""
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.samples)

    def _load_images(self, sample: Conversation, paths: list[str]) -> list[Image.Image]:
        images = []
        for path in paths:
            try:
                images.append(load_image(path))
            except OSError as error:
                raise BadSampleError(sample.id, self.source, f"cannot read image file {path}: {error}") from error
        return images

    def train_item(self, index: int) -> dict:
        """Item `index` encoded for training (whole conversation, labels on assistant turns)."""
        sample = self.samples[index]
        messages = to_chat_messages(sample.turns, self.system_prompt)
        images = self._load_images(sample, sample.image_paths)
        item = encode_conversation(
            self.processor, messages, images, max_length=self.max_length, sample_id=sample.id, source=self.source
        )
        return {"id": sample.id, "meta": sample.extra, **item}

    def prompt_item(self, index: int) -> dict:
        """Item `index` encoded for generation: prompt up to the last human turn, and the reference `answer`."""
        sample = self.samples[index]
        turns, answer, paths = sample.prompt_and_answer()
        messages = to_chat_messages(turns, self.system_prompt)
        item = encode_prompt(self.processor, messages, self._load_images(sample, paths))
        return {"id": sample.id, "meta": sample.extra, "answer": answer, **item}

    def __getitem__(self, index: int) -> dict:
        return self.train_item(index) if self.mode == "train" else self.prompt_item(index)
