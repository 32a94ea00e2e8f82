"""Follow-up questions: several questions about one image in one conversation, as a chat asks them.

The first question is asked with the image (`generate()` prefills and compresses it: ETC's compression tokens, or a
training-free compressor picking or merging its K tokens), then every later question continues the cache that the
previous `generate()` returned (`etc_ext.continuation`): the image is never encoded or compressed again. The
conversation holds the model's own earlier answers, rendered with the processor's chat template
(`"USER: <image>\\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:"`).

What this measures: ETC's compression tokens come before the question, so its cache is the same whatever is asked
later; mean pooling, uniform subsampling and VisionZip-style merge do not read the question either. FastV-style top-K
and the instruction-aware merge choose their tokens from the first question's attention, and keep those tokens for
every later question (`etc_ext.baselines`): a follow-up about another object reads what was kept for the first.

Batching: rows are left padded for the first question; after it, each row's answer (up to its EOS; an EOS is
appended when the answer ran to `max_new_tokens` without one) and the next question's tokens are aligned to the same
columns with padding masked out (attention mask 0), so the rows of a batch never see each other's padding.
"""

from __future__ import annotations

import os

import torch


def _records_by_conversation(records: list[dict]) -> list[list[dict]]:
    """The single-question records of `generate_eval_conversations`, grouped by `conversation` and sorted by `turn`."""
    grouped: dict[int, list[dict]] = {}
    for record in records:
        grouped.setdefault(record["conversation"], []).append(record)
    conversations = [sorted(turns, key=lambda r: r["turn"]) for _, turns in sorted(grouped.items())]
    for turns in conversations:
        if [r["turn"] for r in turns] != list(range(len(turns))):
            raise ValueError(f"conversation {turns[0]['conversation']} has turns {[r['turn'] for r in turns]}")
    return conversations


def _question_text(record: dict) -> str:
    return record["conversations"][0]["value"].replace("<image>", "").strip()


def _turn_suffix_ids(processor, question: str) -> list[int]:
    """Token ids of a later user turn and the generation prompt (`"USER: Q ASSISTANT:"`), as the chat template
    renders them after an assistant turn (read from the difference of two renderings, so any template works whose
    renderings grow by appending)."""
    from ..data.conversation import render_chat

    history = [{"role": "user", "content": [{"type": "text", "text": "?"}]},
               {"role": "assistant", "content": [{"type": "text", "text": "?"}]}]  # fmt: skip
    before = render_chat(processor, history)
    after = render_chat(processor, history + [{"role": "user", "content": [{"type": "text", "text": question}]}],
                        add_generation_prompt=True)  # fmt: skip
    if not after.startswith(before):
        raise ValueError("the chat template does not render a follow-up turn by appending to the conversation")
    tokenizer = processor.tokenizer
    return tokenizer(after[len(before) :], add_special_tokens=False)["input_ids"]


@torch.no_grad()
def evaluate_followups(
    model,
    processor,
    data_json: str | os.PathLike,
    *,
    batch_size: int = 32,
    max_new_tokens: int = 4,
    device: torch.device | str | None = None,
    first_turns=None,
) -> dict:
    """Asks every conversation of `data_json` (the single-question file of
    `etc_ext.demo.data.generate_eval_conversations`: its records grouped by `conversation`, in `turn` order) as one
    chat per image, and scores every answer by exact match (`etc_ext.evaluate.score_prediction`).

    Returns:
        `{"accuracy": accuracy of the follow-up questions (turn >= 1), "num_questions": their number,
        "per_turn": {turn: accuracy}, "per_type": {type: accuracy of its follow-up questions},
        "predictions": [{"id", "conversation", "turn", "type", "prediction", "answer", "correct"}, ...]}` (by
        conversation, then turn); turn 0
        is the first question, answered from a fresh prefill as `etc_ext.evaluate.evaluate` would.

    `first_turns`: the eval dataset of the conversations' first questions, in conversation order (default: made from
    `data_json`); the demo passes one whose encoded items are reused across models.
    """
    from ..data import ConversationCollator, ConversationDataset
    from ..data.conversation import load_llava_json
    from ..evaluate import score_prediction

    device = torch.device(device) if device is not None else next(model.parameters()).device
    tokenizer = processor.tokenizer
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    collator = ConversationCollator.from_processor(processor, padding_side="left")
    generation = {"max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": 1, "pad_token_id": pad,
                  "eos_token_id": eos, "return_dict_in_generate": True}  # fmt: skip
    conversations = _records_by_conversation(load_llava_json(data_json))
    if first_turns is None:
        first_turns = ConversationDataset([turns[0] for turns in conversations], processor,
                                          os.path.dirname(os.path.abspath(data_json)), mode="eval")  # fmt: skip
    expected = [turns[0]["id"] for turns in conversations]
    if [sample.id for sample in first_turns.samples] != expected:
        raise ValueError("first_turns must hold the first question of every conversation of data_json, in order")
    suffixes: dict[str, list[int]] = {}
    model.eval()
    predictions = []
    for start in range(0, len(conversations), batch_size):
        batch_conversations = conversations[start : start + batch_size]
        rows = len(batch_conversations)
        batch = collator([first_turns[start + row] for row in range(rows)])
        inputs = {k: v.to(device) for k, v in batch.items()
                  if isinstance(v, torch.Tensor) and k not in ("num_images", "token_type_ids")}  # fmt: skip
        output = model.generate(**inputs, **generation)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        turns = max(len(turns) for turns in batch_conversations)
        for turn in range(turns):
            new = output.sequences[:, ids.shape[1] :]  # (B, T) this turn's answer, padded after EOS
            answer_mask = torch.zeros_like(new)
            missing_eos = []
            for row in range(rows):
                tokens = new[row].tolist()
                length = tokens.index(eos) + 1 if eos in tokens else len(tokens)
                answer_mask[row, :length] = 1
                missing_eos.append(eos not in tokens)
                records = batch_conversations[row]
                if turn < len(records):
                    text = tokenizer.decode(new[row, :length], skip_special_tokens=True).strip()
                    record = records[turn]
                    answer = record["conversations"][1]["value"]
                    score = score_prediction(text, answer, _question_text(record))
                    predictions.append({"id": record["id"], "conversation": record["conversation"], "turn": turn,
                                        "type": record["question_types"][0], "prediction": text, "answer": answer,
                                        "correct": score["correct"]})  # fmt: skip
            if turn + 1 == turns:
                break
            # the next question: [this turn's answer (+ EOS if it had none)] [padding] [USER: Q ASSISTANT:] per row
            blocks = []
            for row in range(rows):
                records = batch_conversations[row]
                question = _question_text(records[turn + 1]) if turn + 1 < len(records) else "?"
                if question not in suffixes:
                    suffixes[question] = _turn_suffix_ids(processor, question)
                blocks.append(([eos] if missing_eos[row] else []) + suffixes[question])
            width = max(len(block) for block in blocks)
            block_ids = torch.full((rows, width), pad, dtype=ids.dtype)
            block_mask = torch.zeros((rows, width), dtype=mask.dtype)
            for row, block in enumerate(blocks):
                block_ids[row, width - len(block) :] = torch.tensor(block, dtype=ids.dtype)
                block_mask[row, width - len(block) :] = 1
            ids = torch.cat([output.sequences, block_ids.to(device)], dim=1)
            mask = torch.cat([mask, answer_mask.to(mask.dtype), block_mask.to(device)], dim=1)
            output = model.generate(input_ids=ids, attention_mask=mask, cache=output.cache, **generation)
    predictions.sort(key=lambda p: (p["conversation"], p["turn"]))
    follow_ups = [p for p in predictions if p["turn"] >= 1]
    accuracy = lambda items: sum(p["correct"] for p in items) / len(items) if items else None  # noqa: E731
    return {
        "accuracy": accuracy(follow_ups),
        "num_questions": len(follow_ups),
        "per_turn": {t: accuracy([p for p in predictions if p["turn"] == t])
                     for t in sorted({p["turn"] for p in predictions})},  # fmt: skip
        "per_type": {t: accuracy([p for p in follow_ups if p["type"] == t])
                     for t in sorted({p["type"] for p in follow_ups})},  # fmt: skip
        "predictions": predictions,
    }
