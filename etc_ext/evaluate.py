"""Evaluation by generation on LLaVA-format data: accuracy, visual tokens seen by the decoder, KV-cache size after the
prefill, prefill and decode times.

```
etc-ext eval --model runs/etc-m1/final --data test.json --json results.json
```

or `evaluate(model, processor, dataset)` on a model in memory (plain, ETC-patched, or any model whose `generate`
fills a transformers `Cache`).

Each sample's prompt is its conversation up to the last human turn; the last gpt turn is the reference answer
(`ConversationDataset(mode="eval")`). Scoring:

- multiple choice, when the last human turn lists options (`A. ...`, `(B) ...`, one per line) and the reference is
  one of their letters (or texts): the letter read from the prediction (`"B"`, `"(B)"`, `"B. cat"`, `"The answer is
  B"`, or an option's text) must be the reference's;
- exact match otherwise: prediction and reference equal after lower-casing, trimming punctuation at both ends and
  collapsing spaces.

Measurements, taken with forward hooks around `model.generate` (the first forward call is the prefill):

- `visual_tokens`: KV-cache entries per sample after the prefill minus the sample's non-visual prompt tokens, i.e.
  the visual entries the decoder attends to (N per image for the plain model, M per image with ETC);
  `visual_tokens_input` is the image tokens of the prompt;
- `kv_cache_bytes`: bytes of the K/V entries of the sample's own tokens after the prefill, all layers (padding
  excluded, as a batch of one would hold);
- `prefill_ms`: from the call of `generate` to the end of the first forward (image encoding included), per batch;
  `decode_ms_per_token`: the rest of `generate` per decoding step.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .distributed import check_hardware_arguments
from .models.common import unwrap_peft


logger = logging.getLogger(__name__)


def _arg(default: Any = None, help: str = "", group: str = "evaluation", **metadata):
    return field(default=default, metadata={"help": help, "group": group, **metadata})


@dataclass
class EvalArguments:
    """Arguments of `run_eval` (and of `etc-ext eval`)."""

    model: str = _arg(None, "save_pretrained model folder, or the final/ folder of an `etc-ext train` run", "model",
                      required=True, metavar="DIR")  # fmt: skip
    etc: str | None = _arg(None, "ETC parts to apply (a save_pretrained folder of the ETC integration)", "model",
                           metavar="DIR")  # fmt: skip
    base_model: str | None = _arg(None, "base model folder of an ETC final/ folder (default: the one recorded in "
                                  "its training_info.json)", "model", metavar="DIR")  # fmt: skip
    data: str = _arg(None, "LLaVA-format eval conversations (json list or jsonl)", "data", required=True,
                     metavar="JSON")  # fmt: skip
    image_root: str | None = _arg(None, "folder the image paths are relative to (default: the json's folder)", "data",
                                  metavar="DIR")  # fmt: skip
    num_samples: int | None = _arg(None, "evaluate the first N samples only", "data")
    skip_bad: bool = _arg(False, "skip bad samples instead of failing", "data")
    system_prompt: str | None = _arg(None, "system message prepended to every prompt", "data")
    batch_size: int = _arg(8, "prompts per generate() call (left padding)")
    max_new_tokens: int = _arg(16, "longest answer to generate")
    min_new_tokens: int = _arg(0, "suppress EOS until this many tokens are generated (to time decoding with a "
                               "model that answers in one token; changes the answers)")  # fmt: skip
    warmup: int = _arg(1, "untimed generate() calls on the first batch before measuring")
    device: str = _arg("auto", "auto (cuda if available), cpu or cuda", "hardware", choices=["auto", "cpu", "cuda"])
    precision: str = _arg("auto", "weights dtype: auto (bf16 on GPUs that support it, else fp32), fp32 or bf16",
                          "hardware", choices=["auto", "fp32", "bf16"])  # fmt: skip
    attn_implementation: str = _arg("sdpa", "attention implementation: sdpa, eager, flash_attention_2", "hardware")
    json: str | None = _arg(None, "print the results as json (no value or '-': to stdout; a path: to that file)",
                            "output", nargs="?", const="-", metavar="PATH")  # fmt: skip
    predictions: str | None = _arg(None, "write every sample's prediction to this jsonl file", "output", metavar="PATH")
    progress: bool = _arg(True, "show a progress bar", "output")

    def __post_init__(self):
        for name in ("model", "data"):
            if not getattr(self, name):
                raise ValueError(f"EvalArguments.{name} is required")
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.warmup < 0:
            raise ValueError("batch_size and max_new_tokens must be >= 1, warmup >= 0")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        if self.num_samples is not None and self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        check_hardware_arguments(self.device, self.attn_implementation)


# ------------------------------------------------------------------------------------------------- scoring
_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[\.\):]\s+(\S.*?)\s*$", re.MULTILINE)
_LEADING_LETTER = re.compile(r"^\s*\(?([A-Z])(?:[\.\):,]|\s|$)")
_ANSWER_IS = re.compile(r"answer is:?\s*\(?([A-Z])\b", re.IGNORECASE)


def normalize_answer(text: str) -> str:
    """Lower-case, punctuation trimmed at both ends, whitespace collapsed: `" Red."` -> `"red"`."""
    text = " ".join(text.lower().split())
    return text.strip(" \t\n.,;:!?\"'()[]{}")


def parse_options(prompt: str) -> dict[str, str]:
    """The lettered options of a multiple-choice prompt, `{"A": "cat", "B": "dog"}` (empty if fewer than two)."""
    options = {letter: text for letter, text in _OPTION_LINE.findall(prompt)}
    return options if len(options) >= 2 else {}


def choice_letter(text: str, options: dict[str, str]) -> str | None:
    """The option a text picks: a leading letter (`"B"`, `"(B)"`, `"B. dog"`), an option's text, or `"the answer is
    B"`; None if none of them names an option."""
    match = _LEADING_LETTER.match(text)
    if match and match.group(1) in options:
        return match.group(1)
    normalized = normalize_answer(text)
    for letter, option in options.items():
        if normalized == normalize_answer(option):
            return letter
    match = _ANSWER_IS.search(text)
    if match and match.group(1).upper() in options:
        return match.group(1).upper()
    return None


def score_prediction(prediction: str, reference: str, prompt: str) -> dict:
    """`{"kind": "multiple_choice" | "exact_match", "correct": bool, "choice": letter or None}`."""
    options = parse_options(prompt)
    reference_letter = choice_letter(reference, options) if options else None
    if reference_letter is not None:
        choice = choice_letter(prediction, options)
        return {"kind": "multiple_choice", "correct": choice == reference_letter, "choice": choice}
    return {
        "kind": "exact_match",
        "correct": normalize_answer(prediction) == normalize_answer(reference),
        "choice": None,
    }


# ------------------------------------------------------------------------------------------------- measuring
def kv_cache_bytes(cache) -> int:
    """Bytes of the key and value tensors a transformers `Cache` (or a legacy tuple of per-layer `(k, v)`) holds."""
    total = 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            for name in ("keys", "values"):
                tensor = getattr(layer, name, None)
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
        return total
    for layer in cache or ():
        for tensor in layer:
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def cache_entries_per_row(cache, attention_mask: torch.Tensor) -> torch.Tensor:
    """`(B,)` K/V entries each row holds after the prefill, padding excluded. An ETC cache says which entries are
    real (`etc_state.attention_mask`); otherwise the cache holds one entry per prompt column, padding included."""
    state = getattr(cache, "etc_state", None)
    if state is not None and getattr(state, "attention_mask", None) is not None:
        return state.attention_mask.bool().sum(dim=1).cpu()
    length = cache.get_seq_length()
    padding = attention_mask.shape[1] - attention_mask.sum(dim=1).cpu()
    return length - padding


class GenerationProbe:
    """A forward hook on a model during one `generate` call: the end time of the first forward (the prefill), the
    number of forward calls, and the cache right after the prefill (measured at once, before decoding grows it).

    Args:
        model: the module whose `generate` is called.
        device: its device (CUDA is synchronised before reading the clock).
        attention_mask: `(B, L)` mask of the prompts, to tell padding from real entries.

    Attributes (after `generate`):
        calls, prefill_end (a `time.perf_counter()` value), cache_bytes (all rows, padding included), cache_length
        (entries per row, padding included), entries (`(B,)` real entries per row, `cache_entries_per_row`).
    """

    def __init__(self, model: nn.Module, device: torch.device, attention_mask: torch.Tensor):
        self.device = device
        self.attention_mask = attention_mask
        self.calls = 0
        self.prefill_end = None
        self.cache_bytes = 0
        self.cache_length = 0
        self.entries = None
        self._handle = model.register_forward_hook(self._hook)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _hook(self, module, args, output) -> None:
        self.calls += 1
        if self.calls > 1:
            return
        self._sync()
        self.prefill_end = time.perf_counter()
        cache = getattr(output, "cache", None)
        if cache is None:
            cache = getattr(output, "past_key_values", None)
        if cache is None:
            raise RuntimeError("the model's prefill returned no cache: evaluate needs generate() with use_cache=True")
        self.cache_bytes = kv_cache_bytes(cache)
        self.cache_length = cache.get_seq_length()
        self.entries = cache_entries_per_row(cache, self.attention_mask)

    def close(self) -> None:
        self._handle.remove()


def _num_compression_tokens(model: nn.Module) -> int | None:
    base = unwrap_peft(model)
    etc = getattr(base, "etc", None)
    if etc is None or not getattr(etc, "enabled", True):
        return None
    return etc.config.num_compression_tokens


# ------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    model: nn.Module,
    processor,
    dataset,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    warmup: int = 1,
    device: torch.device | str | None = None,
    progress: bool = True,
    generation_kwargs: dict | None = None,
) -> dict:
    """Generates an answer for every prompt of `dataset` (a `ConversationDataset` in eval mode) and scores it.

    Args:
        model: a VLM with `generate` (plain, or patched with ETC).
        processor: its processor (the tokenizer decodes the answers).
        dataset: `ConversationDataset(..., mode="eval")`.
        batch_size: prompts per `generate` call (left padded).
        max_new_tokens: longest answer.
        warmup: untimed `generate` calls on the first batch before measuring.
        device: where the inputs go (default: the model's device).
        progress: show a tqdm bar.
        generation_kwargs: more `generate` arguments (default: greedy decoding).

    Returns:
        `{"metrics": {...}, "predictions": [{"id", "prediction", "answer", "correct", "kind", "type"}, ...]}`; the
        metrics are described in the module docstring.
    """
    from .data import ConversationCollator

    if getattr(dataset, "mode", "eval") != "eval":
        raise ValueError("evaluate needs a ConversationDataset with mode='eval'")
    if len(dataset) == 0:
        raise ValueError("the eval set is empty")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    tokenizer = processor.tokenizer
    image_token_id = getattr(tokenizer, "image_token_id", None)
    collator = ConversationCollator.from_processor(processor, padding_side="left")
    generation = {
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "num_beams": 1,
        "pad_token_id": collator.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        **(generation_kwargs or {}),
    }
    model.eval()
    num_batches = -(-len(dataset) // batch_size)

    def batch_inputs(k: int) -> tuple[dict, list[int]]:
        indices = list(range(k * batch_size, min((k + 1) * batch_size, len(dataset))))
        batch = collator([dataset[i] for i in indices])
        inputs = {
            key: value.to(device)
            for key, value in batch.items()
            if isinstance(value, torch.Tensor) and key not in ("num_images", "token_type_ids")
        }
        return inputs, indices

    short = min(2, max_new_tokens)
    warmup_generation = {**generation, "max_new_tokens": short}
    if generation.get("min_new_tokens"):
        warmup_generation["min_new_tokens"] = min(generation["min_new_tokens"], short)
    for _ in range(warmup):
        inputs, _ = batch_inputs(0)
        model.generate(**inputs, **warmup_generation)

    predictions = []
    totals = defaultdict(float)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(dataset), desc="eval", unit="sample", dynamic_ncols=True)
    for k in range(num_batches):
        inputs, indices = batch_inputs(k)
        attention_mask = inputs["attention_mask"]
        input_length = inputs["input_ids"].shape[1]
        probe = GenerationProbe(model, device, attention_mask)
        try:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            output = model.generate(**inputs, **generation)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            end = time.perf_counter()
        finally:
            probe.close()
        sequences = output.sequences if hasattr(output, "sequences") else output
        new_tokens = sequences[:, input_length:].cpu()

        if probe.entries is None:
            raise RuntimeError("generate() made no forward call on the model: cannot measure the prefill")
        entries = probe.entries.float()  # (B,)
        rows = len(indices)
        prompt_tokens = attention_mask.sum(dim=1).cpu().float()  # (B,)
        if image_token_id is not None:
            visual_input = ((inputs["input_ids"] == image_token_id) & attention_mask.bool()).sum(dim=1).cpu().float()
        else:
            visual_input = torch.zeros(rows)
        visual_seen = entries - (prompt_tokens - visual_input)
        bytes_per_entry = probe.cache_bytes / max(rows * probe.cache_length, 1)
        totals["prefill_s"] += probe.prefill_end - start
        totals["decode_s"] += end - probe.prefill_end
        totals["decode_steps"] += max(probe.calls - 1, 0)
        totals["batches"] += 1
        totals["visual_tokens"] += float(visual_seen.sum())
        totals["visual_tokens_input"] += float(visual_input.sum())
        totals["kv_cache_tokens"] += float(entries.sum())
        totals["kv_cache_bytes"] += float(entries.sum()) * bytes_per_entry
        totals["prompt_tokens"] += float(prompt_tokens.sum())

        for row, index in enumerate(indices):
            tokens = new_tokens[row]
            generated = int((tokens != collator.pad_token_id).sum())
            totals["generated_tokens"] += generated
            text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            sample = dataset.samples[index]
            prompt_turns, answer, _ = sample.prompt_and_answer()
            score = score_prediction(text, answer, prompt_turns[-1][1])
            types = sample.extra.get("question_types") or []
            predictions.append({
                "id": sample.id,
                "prediction": text,
                "answer": answer,
                "correct": score["correct"],
                "kind": score["kind"],
                "type": types[-1] if types else None,
            })  # fmt: skip
        if bar is not None:
            bar.update(rows)
            bar.set_postfix(acc=f"{sum(p['correct'] for p in predictions) / len(predictions):.3f}")
    if bar is not None:
        bar.close()
    metrics = _summarize(predictions, totals, batch_size, max_new_tokens, model, device)
    return {"metrics": metrics, "predictions": predictions}


def _accuracy(items: list[dict]) -> float | None:
    return sum(p["correct"] for p in items) / len(items) if items else None


def _summarize(predictions, totals, batch_size, max_new_tokens, model, device) -> dict:
    n = len(predictions)
    exact = [p for p in predictions if p["kind"] == "exact_match"]
    choice = [p for p in predictions if p["kind"] == "multiple_choice"]
    by_type = defaultdict(list)
    for p in predictions:
        if p["type"] is not None:
            by_type[p["type"]].append(p)
    dtype = next(model.parameters()).dtype
    return {
        "num_samples": n,
        "accuracy": _accuracy(predictions),
        "exact_match": _accuracy(exact),
        "num_exact_match": len(exact),
        "multiple_choice_accuracy": _accuracy(choice),
        "num_multiple_choice": len(choice),
        "per_type": {t: {"accuracy": _accuracy(items), "count": len(items)} for t, items in sorted(by_type.items())},
        "visual_tokens": totals["visual_tokens"] / n,
        "visual_tokens_input": totals["visual_tokens_input"] / n,
        "num_compression_tokens": _num_compression_tokens(model),
        "prompt_tokens": totals["prompt_tokens"] / n,
        "kv_cache_tokens": totals["kv_cache_tokens"] / n,
        "kv_cache_bytes": totals["kv_cache_bytes"] / n,
        "prefill_ms": 1000 * totals["prefill_s"] / totals["batches"],
        "prefill_ms_per_sample": 1000 * totals["prefill_s"] / n,
        "decode_ms_per_token": 1000 * totals["decode_s"] / totals["decode_steps"] if totals["decode_steps"] else None,
        "generated_tokens": totals["generated_tokens"] / n,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
    }


def run_eval(args: EvalArguments) -> dict:
    """Loads the model and data of `args`, evaluates, writes `--json` / `--predictions` files; returns the metrics
    (plus `model`, `etc`, `data`, `num_skipped` and `eval_time_s`)."""
    from .data import ConversationDataset
    from .models.loading import load_for_inference

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("etc-ext eval runs in one process: start it with python, not torchrun")
    start = time.perf_counter()
    use_cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    device = torch.device("cuda" if use_cuda else "cpu")
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if use_cuda and torch.cuda.is_bf16_supported() else "fp32"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model, processor, etc_config = load_for_inference(
        args.model, args.etc, base_model=args.base_model, dtype=dtype, device=device,
        attn_implementation=args.attn_implementation,
    )  # fmt: skip
    dataset = ConversationDataset(
        args.data, processor, args.image_root, mode="eval", skip_bad=args.skip_bad, system_prompt=args.system_prompt
    )
    if args.num_samples is not None and args.num_samples < len(dataset):
        dataset.samples = dataset.samples[: args.num_samples]
    result = evaluate(
        model, processor, dataset, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        warmup=args.warmup, device=device, progress=args.progress,
        generation_kwargs={"min_new_tokens": args.min_new_tokens} if args.min_new_tokens else None,
    )  # fmt: skip
    metrics = {
        "model": os.path.abspath(args.model),
        "etc": etc_config.to_dict() if etc_config is not None else None,
        "data": os.path.abspath(args.data),
        "num_skipped": dataset.num_skipped,
        **result["metrics"],
        "eval_time_s": time.perf_counter() - start,
    }
    if args.json not in (None, "-"):
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(metrics, f, indent=1)
    if args.predictions:
        os.makedirs(os.path.dirname(os.path.abspath(args.predictions)), exist_ok=True)
        with open(args.predictions, "w") as f:
            for prediction in result["predictions"]:
                f.write(json.dumps(prediction) + "\n")
    return metrics


def format_report(metrics: dict) -> str:
    """A short human-readable summary of `run_eval`'s metrics."""

    def fmt(value, spec=".4f"):
        return "-" if value is None else format(value, spec)

    lines = [
        f"samples              {metrics['num_samples']} (skipped {metrics.get('num_skipped', 0)})",
        f"accuracy             {fmt(metrics['accuracy'])}",
        f"  exact match        {fmt(metrics['exact_match'])} ({metrics['num_exact_match']} samples)",
        f"  multiple choice    {fmt(metrics['multiple_choice_accuracy'])} ({metrics['num_multiple_choice']} samples)",
    ]
    for name, entry in metrics["per_type"].items():
        lines.append(f"  {name:<18} {fmt(entry['accuracy'])} ({entry['count']})")
    lines += [
        f"visual tokens        {fmt(metrics['visual_tokens'], '.1f')} seen by the decoder per sample "
        f"({fmt(metrics['visual_tokens_input'], '.1f')} in the input)",
        f"KV cache             {metrics['kv_cache_bytes'] / 1024:.1f} KiB per sample after prefill "
        f"({fmt(metrics['kv_cache_tokens'], '.1f')} entries)",
        f"prefill              {fmt(metrics['prefill_ms'], '.1f')} ms per batch of {metrics['batch_size']}",
        f"decode               {fmt(metrics['decode_ms_per_token'], '.2f')} ms per token",
    ]
    return "\n".join(lines)
