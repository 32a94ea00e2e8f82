"""Batching of `ConversationDataset` items: padding on either side, images concatenated over the batch."""

from __future__ import annotations

import torch

from .conversation import IGNORE_INDEX


# Per-token keys and the value their padding gets (the pad token id for input_ids).
SEQUENCE_KEYS = {
    "input_ids": None,
    "attention_mask": 0,
    "labels": IGNORE_INDEX,
    "token_type_ids": 0,
    "mm_token_type_ids": 0,
}


class ConversationCollator:
    """Pads a list of items into a batch.

    Args:
        pad_token_id: id written at padded `input_ids` positions.
        padding_side: `"right"` (training) or `"left"` (batched generation: every prompt ends at the last column).
        pad_to_multiple_of: round the padded length up to a multiple of this.

    Returns (from `__call__`), with `B` items and `L` the longest (rounded) length:
        input_ids: LongTensor `(B, L)`, `pad_token_id` at padding.
        attention_mask: LongTensor `(B, L)`, 0 at padding.
        labels: LongTensor `(B, L)`, `IGNORE_INDEX` at padding (only when the items have labels).
        token_type_ids, mm_token_type_ids: `(B, L)`, 0 at padding (only when the items have them).
        pixel_values: the items' `pixel_values` concatenated in batch order, `(total_images, 3, H, W)`, or None when
            no item has an image; any other image tensor of the processor (`image_sizes`, `image_grid_thw`, ...) is
            concatenated the same way.
        num_images: LongTensor `(B,)`, images of each item (0 for text-only samples), in the order of pixel_values.
        ids: list of the sample ids; meta: list of the items' `meta` dicts; answers: list of reference answers (eval
            items only).

    Only `input_ids`, `attention_mask`, `labels` and the image tensors are model inputs.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: give the tokenizer a pad token (or pass eos_token_id)")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    @classmethod
    def from_processor(cls, processor, **kwargs) -> "ConversationCollator":
        """Collator padding with the processor's tokenizer pad token (its EOS token if it has none)."""
        tokenizer = getattr(processor, "tokenizer", processor)
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(pad_token_id, **kwargs)

    def __call__(self, items: list[dict]) -> dict:
        if not items:
            raise ValueError("cannot collate an empty list of items")
        if any(("labels" in item) != ("labels" in items[0]) for item in items):
            raise ValueError("items mix training items (with labels) and prompt items (without)")
        lengths = [item["input_ids"].shape[0] for item in items]
        length = max(lengths)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of

        batch = {}
        for key, pad_value in SEQUENCE_KEYS.items():
            if key not in items[0]:
                continue
            if any(key not in item for item in items):
                raise ValueError(f"some items have {key!r} and others do not")
            pad_value = self.pad_token_id if key == "input_ids" else pad_value
            padded = torch.full((len(items), length), pad_value, dtype=items[0][key].dtype)  # (B, L)
            for b, (item, n) in enumerate(zip(items, lengths)):
                columns = slice(0, n) if self.padding_side == "right" else slice(length - n, length)
                padded[b, columns] = item[key]
            batch[key] = padded

        # Image tensors: every other tensor-valued key, concatenated over the items that have one.
        image_keys = {"pixel_values"}
        for item in items:
            image_keys |= {k for k, v in item.items() if isinstance(v, torch.Tensor) and k not in SEQUENCE_KEYS}
        for key in sorted(image_keys):
            tensors = [item[key] for item in items if item.get(key) is not None]
            batch[key] = torch.cat(tensors, dim=0) if tensors else None

        batch["num_images"] = torch.tensor([item.get("num_images", 0) for item in items], dtype=torch.long)
        batch["ids"] = [item.get("id") for item in items]
        batch["meta"] = [item.get("meta", {}) for item in items]
        if "answer" in items[0]:
            batch["answers"] = [item.get("answer") for item in items]
        return batch
