"""Fine-tuning of a VLM with or without ETC on LLaVA-format conversations, on one process or many (torchrun).

```
etc-ext train --model DIR --data train.json --image-root DIR --output runs/full            # full-token baseline
etc-ext train --model runs/full/final --data ... --output runs/etc-m1 --etc-config '{"num_compression_tokens": 1}'
torchrun --nproc-per-node 8 -m etc_ext.cli train ... [--fsdp]                               # several GPUs
```

or from Python: `train(TrainingArguments(model=..., data=..., output_dir=...))`.

What a run does, in order:

1. joins the process group when started by torchrun (NCCL on GPUs, gloo on CPUs) and seeds every RNG with `--seed`;
2. loads the model and processor from `--model` (a `save_pretrained` folder), freezes the vision tower, adds LoRA
   adapters (`--lora`, peft) and ETC (`--etc-config`, `etc_ext.models.<family>.apply_etc`);
3. reads the data with `etc_ext.data.ConversationDataset` (labels on the assistant turns), shards it with a
   `DistributedSampler` and pads micro-batches with `ConversationCollator`;
4. wraps the model in DDP, or shards it with FSDP2 (`--fsdp`, `fully_shard`), and builds AdamW with a linear warmup and
   cosine decay (`transformers.get_cosine_with_min_lr_schedule_with_warmup`);
5. resumes from a checkpoint (`--resume auto|DIR`): trainable weights, optimizer, scheduler, RNG states and data
   position, so the run continues exactly as if it had not stopped;
6. trains: gradient accumulation, bf16 autocast on GPUs, gradient clipping, a tqdm bar on rank 0, metrics as jsonl,
   an atomic checkpoint every `--save-steps` steps (and on SIGTERM);
7. saves the result in `<output>/final/`: with ETC the ETC parts (`save_pretrained` of the integration: config,
   compression tokens, decoder, and the fine-tuned base weights or LoRA adapters); without ETC a complete
   `save_pretrained` model folder (LoRA adapters merged, the adapters themselves in `final/adapter/`), which
   `--model` of a later run (e.g. ETC fine-tuning from a trained full-token model) accepts as is.

Loss normalisation: the cross-entropy of a step is the sum over every label token of the global batch (all ranks and
micro-batches) divided by their number, whatever the number of processes and accumulation steps; so one process with
batch 8 and two processes with batch 4 each follow the same loss curve. ETC's distillation loss (`vid`, a mean over
images) is averaged over the micro-batches of the step.

Output folder:

```
<output>/train_args.json     the arguments of the run
<output>/metrics.jsonl       one json record per logged step: step, epoch, loss, ce, vid, lr, grad_norm, tokens_per_s,
                             ...
<output>/checkpoints/        checkpoint-<step>/ (see etc_ext.checkpointing)
<output>/final/              the trained model (see 7.) and training_info.json
```
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import random
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from . import __version__
from .checkpointing import (
    CheckpointError,
    TrainerState,
    atomic_write_json,
    latest_checkpoint,
    load_checkpoint,
    rotate_checkpoints,
    save_checkpoint,
)
from .distributed import (
    DistributedContext,
    apply_fsdp,
    check_hardware_arguments,
    destroy_distributed,
    gradient_sync,
    init_distributed,
    unwrap_model,
    wrap_ddp,
)
from .models.common import LORA_TARGET_MODULES, unwrap_peft
from .models.loading import TRAINING_INFO_NAME


logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Batch entries that are not model inputs (the collator's bookkeeping).
NON_MODEL_INPUTS = ("num_images", "token_type_ids")
# peft target of --lora: the attention and MLP projections of the language model (not the vision tower).
DEFAULT_LORA_TARGET = LORA_TARGET_MODULES
FINAL_DIR = "final"
CHECKPOINT_DIR = "checkpoints"
METRICS_NAME = "metrics.jsonl"


def _arg(default: Any = None, help: str = "", group: str = "training", flag: str | None = None, **metadata):
    """A dataclass field with the metadata `etc_ext.cli` turns into an argparse option."""
    metadata = {"help": help, "group": group, **({"flag": flag} if flag else {}), **metadata}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainingArguments:
    """Arguments of `train` (and of `etc-ext train`, one option per field: `image_root` is `--image-root`)."""

    # model
    model: str = _arg(None, "save_pretrained folder of the model and its processor", "model", required=True,
                      metavar="DIR")  # fmt: skip
    etc_config: str | None = _arg(
        None, "ETC configuration: a json file, or a json object such as '{\"num_compression_tokens\": 4}'. Without "
        "it the plain model is trained (the full-token baseline)", "model", metavar="JSON",
    )  # fmt: skip
    lora: bool = _arg(False, "train LoRA adapters (peft) instead of the full language model", "model")
    lora_rank: int = _arg(8, "LoRA rank", "model")
    lora_alpha: float = _arg(16.0, "LoRA alpha (scaling alpha / rank)", "model")
    lora_dropout: float = _arg(0.0, "LoRA dropout", "model")
    lora_target_modules: str = _arg(DEFAULT_LORA_TARGET, "peft target_modules (a regex over module names)", "model")
    lora_modules_to_save: list[str] = _arg(
        ["multi_modal_projector"], "modules trained in full next to the adapters (peft modules_to_save); "
        "pass none to train the adapters only", "model",
    )  # fmt: skip
    train_vision_tower: bool = _arg(False, "also train the vision tower (frozen by default)", "model")
    attn_implementation: str = _arg("sdpa", "attention implementation: sdpa, eager, flash_attention_2", "model")
    gradient_checkpointing: bool = _arg(False, "recompute activations in the backward pass to save memory", "model")

    # data
    data: str = _arg(None, "LLaVA-format training conversations (json list or jsonl)", "data", required=True,
                     metavar="JSON")  # fmt: skip
    image_root: str | None = _arg(None, "folder the image paths are relative to (default: the json's folder)", "data",
                             metavar="DIR")
    max_length: int | None = _arg(None, "truncate conversations to this many tokens", "data")
    skip_bad: bool = _arg(False, "skip bad samples (malformed, missing or unreadable images) instead of failing",
                          "data")  # fmt: skip
    system_prompt: str | None = _arg(None, "system message prepended to every conversation", "data")
    shuffle: bool = _arg(True, "shuffle the data every epoch", "data")
    num_workers: int = _arg(0, "DataLoader worker processes per rank", "data")

    # optimisation
    output_dir: str = _arg(None, "output folder (metrics, checkpoints, final model)", "output", flag="--output",
                           required=True, metavar="DIR")  # fmt: skip
    epochs: float = _arg(1.0, "epochs over the data (fractions allowed)")
    max_steps: int | None = _arg(None, "optimizer steps (overrides --epochs)")
    per_device_batch_size: int = _arg(4, "samples per micro-batch on each process", flag="--batch-size")
    gradient_accumulation_steps: int = _arg(1, "micro-batches per optimizer step", flag="--grad-accum")
    learning_rate: float = _arg(2e-5, "peak learning rate", flag="--lr")
    etc_learning_rate: float | None = _arg(None, "learning rate of the ETC parts (default: --lr)", flag="--etc-lr")
    weight_decay: float = _arg(0.0, "AdamW weight decay (matrices only; not biases, norms or 1-D parameters)")
    adam_beta1: float = _arg(0.9, "AdamW beta1")
    adam_beta2: float = _arg(0.999, "AdamW beta2")
    adam_epsilon: float = _arg(1e-8, "AdamW epsilon")
    warmup_ratio: float = _arg(0.03, "linear warmup over this fraction of the steps")
    warmup_steps: int | None = _arg(None, "linear warmup steps (overrides --warmup-ratio)")
    min_lr_ratio: float = _arg(0.0, "the cosine decays to this fraction of the peak learning rate")
    max_grad_norm: float = _arg(1.0, "clip the gradient norm to this (0 disables clipping)")
    seed: int = _arg(0, "seed of every RNG (data order, initialisation of new parameters, dropout)")

    # hardware
    device: str = _arg("auto", "auto (cuda:LOCAL_RANK if available), cpu or cuda", "hardware",
                       choices=["auto", "cpu", "cuda"])  # fmt: skip
    precision: str = _arg("auto", "auto (bf16 autocast on GPUs that support it, else fp32), fp32 or bf16",
                          "hardware", choices=["auto", "fp32", "bf16"])  # fmt: skip
    fsdp: bool = _arg(False, "shard parameters, gradients and optimizer states with FSDP2 (fully_shard) instead "
                      "of DDP: full fine-tuning of models that do not fit one device", "hardware")  # fmt: skip
    ddp_find_unused_parameters: bool = _arg(False, "DDP find_unused_parameters (slower; for models with branches "
                                            "that skip trainable parameters)", "hardware")  # fmt: skip
    dist_timeout_minutes: float = _arg(30.0, "timeout of collectives (rank 0 writes checkpoints meanwhile)",
                                       "hardware")  # fmt: skip

    # output
    save_steps: int = _arg(500, "write a checkpoint every this many steps (0: never)", "output")
    save_total_limit: int | None = _arg(2, "keep at most this many checkpoints (default 2; 0 keeps all)", "output")
    resume: str | None = _arg(None, "resume from 'auto' (the newest checkpoint under --output, if any) or a "
                              "checkpoint folder", "output", metavar="auto|DIR")  # fmt: skip
    overwrite: bool = _arg(False, "replace a previous run in --output (its checkpoints, final model and metrics); "
                           "without it, an --output that holds a run needs --resume", "output")
    logging_steps: int = _arg(1, "write a metrics record every this many steps", "output")
    progress: bool = _arg(True, "show a progress bar (rank 0)", "output")

    def __post_init__(self):
        for name in ("model", "data", "output_dir"):
            if not getattr(self, name):
                raise ValueError(f"TrainingArguments.{name} is required")
        positive = ("per_device_batch_size", "gradient_accumulation_steps", "logging_steps", "lora_rank")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.max_steps is None and not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.save_steps < 0 or self.num_workers < 0 or self.max_grad_norm < 0:
            raise ValueError("save_steps, num_workers and max_grad_norm must be >= 0")
        if not 0.0 <= self.warmup_ratio < 1.0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError("warmup_ratio must be in [0, 1) and min_lr_ratio in [0, 1]")
        if self.save_total_limit is not None and self.save_total_limit < 0:
            raise ValueError(f"save_total_limit must be >= 0 (0 keeps all checkpoints), got {self.save_total_limit}")
        if self.save_total_limit == 0:
            self.save_total_limit = None
        if os.path.exists(self.output_dir) and not os.path.isdir(self.output_dir):
            raise ValueError(f"--output {self.output_dir} is a file: pass a folder (made when missing)")
        check_hardware_arguments(self.device, self.attn_implementation)
        if self.lora_modules_to_save in (["none"], ["None"]):
            self.lora_modules_to_save = []


# ------------------------------------------------------------------------------------------------- helpers
def set_seed(seed: int) -> None:
    """Seeds python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def parse_etc_config(value: str):
    """An `ETCConfig` from a json file path or a json object string."""
    from .config import ETCConfig

    text = value.strip()
    if text.startswith("{"):
        try:
            return ETCConfig.from_dict(json.loads(text))
        except json.JSONDecodeError as error:
            raise ValueError(f"--etc-config is not valid json: {error}") from error
    if not os.path.isfile(value):
        raise FileNotFoundError(f"--etc-config {value}: no such file (pass a json file or a json object)")
    return ETCConfig.from_json_file(value)


class ResumableDistributedSampler(DistributedSampler):
    """A `DistributedSampler` that can start an epoch part-way: `set_start(k)` skips this rank's first `k` indices of
    the epoch (the data position of a checkpoint), without loading them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.start = 0

    def set_start(self, start: int) -> None:
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start must be in [0, {self.num_samples}], got {start}")
        self.start = start

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return self.num_samples - self.start


class SkipUnloadable(Dataset):
    """Wraps a `ConversationDataset`: with `skip_bad`, a sample that fails when loaded (an image that exists but
    cannot be read, image tokens cut by `max_length`) is replaced by the next sample that loads, so batches keep
    their size and every rank keeps in step; without, the error propagates."""

    def __init__(self, dataset, skip_bad: bool, max_tries: int = 32):
        self.dataset = dataset
        self.skip_bad = skip_bad
        self.max_tries = max_tries

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        from .data import BadSampleError

        errors = []
        for offset in range(min(self.max_tries, len(self.dataset))):
            try:
                return self.dataset[(index + offset) % len(self.dataset)]
            except BadSampleError as error:
                if not self.skip_bad:
                    raise BadSampleError(error.sample_id, error.source, f"{error.reason} (--skip-bad skips such "
                                         "samples)") from error  # fmt: skip
                logger.warning("skipping %s", error)
                errors.append(str(error))
        raise RuntimeError(f"{len(errors)} consecutive samples from index {index} failed to load: {errors[:3]}")


def model_inputs(batch: dict, device: torch.device) -> dict:
    """The model inputs of a collated batch (`input_ids`, `attention_mask`, `labels`, image tensors) on `device`."""
    return {
        key: value.to(device, non_blocking=True)
        for key, value in batch.items()
        if isinstance(value, torch.Tensor) and key not in NON_MODEL_INPUTS
    }


def count_label_tokens(batch: dict) -> int:
    """Label tokens the causal LM loss covers (labels shifted by one)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def parameter_groups(model: nn.Module, args: TrainingArguments) -> list[dict]:
    """AdamW groups of the trainable parameters: weight decay on matrices only; ETC's parts at `--etc-lr`."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in unwrap_model(model).named_parameters():
        if not param.requires_grad:
            continue
        is_etc = name.startswith("etc.") or ".etc." in name
        decay = param.ndim >= 2
        groups.setdefault((is_etc, decay), []).append(param)
    result = []
    for (is_etc, decay), params in sorted(groups.items()):
        lr = args.etc_learning_rate if is_etc and args.etc_learning_rate is not None else args.learning_rate
        result.append({"params": params, "weight_decay": args.weight_decay if decay else 0.0, "lr": lr,
                       "name": f"{'etc' if is_etc else 'model'}{'' if decay else '_no_decay'}"})  # fmt: skip
    if not result:
        raise ValueError("the model has no trainable parameters")
    return result


class MetricsWriter:
    """Appends json records to `<output>/metrics.jsonl` (rank 0). On resume, the records after the checkpoint's
    step (written by the interrupted run) are dropped first, so the file holds one record per step."""

    def __init__(self, path: str, resume_step: int | None):
        self.path = path
        if resume_step is None:
            open(path, "w").close()
        elif os.path.isfile(path):
            with open(path) as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            tmp = f"{path}.tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, path)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class _StopRequest:
    """Turns SIGTERM (preemption, torchrun shutting down) into a flag that the loop checks after each step, to save
    a checkpoint and stop cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# ------------------------------------------------------------------------------------------------- trainer
class Trainer:
    """One training run; `Trainer(args, context).train()` (or the `train` function) runs it."""

    def __init__(self, args: TrainingArguments, context: DistributedContext):
        self.args = args
        self.context = context
        self.device = context.device
        self.precision = self._resolve_precision()
        set_seed(args.seed)
        self.model, self.processor, self.etc_config, self.integration = self._build_model(self.device)
        self.dataset = self._build_dataset()
        self._build_loader()
        self.wrapped = self._wrap(self.model)
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.model, args),
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
        )
        from transformers import get_cosine_with_min_lr_schedule_with_warmup

        warmup = args.warmup_steps if args.warmup_steps is not None else math.ceil(args.warmup_ratio * self.max_steps)
        self.scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            self.optimizer, num_warmup_steps=warmup, num_training_steps=self.max_steps, min_lr_rate=args.min_lr_ratio
        )
        self.trainable_names = [n for n, p in unwrap_model(self.model).named_parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------------------- set-up
    def _resolve_precision(self) -> str:
        precision = self.args.precision
        if precision == "auto":
            cuda = self.device.type == "cuda"
            precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
        return precision

    def _build_model(self, device: torch.device, for_export: bool = False):
        """Loads the model and applies LoRA and ETC; returns `(model, processor, etc_config, integration)`.
        `for_export`: a copy to receive trained weights and be saved (no teacher snapshot)."""
        from .models.loading import integration_for, load_model_and_processor, vision_tower_of

        args = self.args
        model, processor = load_model_and_processor(
            args.model, dtype=torch.float32, device=device, attn_implementation=args.attn_implementation
        )
        model.requires_grad_(True)
        vision_tower = vision_tower_of(model)
        if vision_tower is not None and not args.train_vision_tower:
            vision_tower.requires_grad_(False)

        etc_config, integration = None, None
        if args.etc_config is not None:
            integration = integration_for(model)  # fails early for a model ETC does not support
            etc_config = parse_etc_config(args.etc_config)
            if args.train_vision_tower and etc_config.freeze_vision_tower:
                etc_config = etc_config.replace(freeze_vision_tower=False)
        if args.lora:
            from peft import LoraConfig, get_peft_model

            lora_config = LoraConfig(
                r=args.lora_rank,
                lora_alpha=args.lora_alpha,
                lora_dropout=args.lora_dropout,
                target_modules=args.lora_target_modules,
                modules_to_save=list(args.lora_modules_to_save) or None,
                bias="none",
            )
            model = get_peft_model(model, lora_config)
        if etc_config is not None:  # after peft, so that peft does not freeze ETC's parameters
            integration.apply_etc(model, etc_config)
            etc_config = _etc_modules(model).config
            snapshot = getattr(integration, "snapshot_teacher", None)
            if etc_config.teacher == "frozen" and not args.lora and snapshot is not None and not for_export:
                snapshot(model)  # the starting weights, before any step and before a checkpoint is loaded
        if args.gradient_checkpointing:
            base = _base(model)
            kwargs = {"use_reentrant": False}
            if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x name
                base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.train()
        return model, processor, etc_config, integration

    def _build_dataset(self):
        from .data import ConversationDataset

        args = self.args
        dataset = ConversationDataset(
            args.data,
            self.processor,
            args.image_root,
            mode="train",
            max_length=args.max_length,
            skip_bad=args.skip_bad,
            system_prompt=args.system_prompt,
        )
        if len(dataset) == 0:
            shown = "; ".join(f"{i}: {reason}" for i, reason in dataset.skipped[:3])
            raise ValueError(
                f"{args.data} has no usable samples ({dataset.num_skipped} bad ones skipped{': ' if shown else ''}"
                f"{shown})"
            )
        if dataset.num_skipped and self.context.is_main:
            logger.warning("skipped %d bad sample(s) of %s", dataset.num_skipped, args.data)
        self.num_skipped = dataset.num_skipped
        return SkipUnloadable(dataset, args.skip_bad)

    def _build_loader(self) -> None:
        from .data import ConversationCollator

        args, context = self.args, self.context
        self.sampler = ResumableDistributedSampler(
            self.dataset, num_replicas=context.world_size, rank=context.rank, shuffle=args.shuffle, seed=args.seed,
            drop_last=False,
        )  # fmt: skip
        # the loader's own generator: creating an iterator never draws from the global RNG, so resuming is exact
        self.loader_generator = torch.Generator()
        self.loader = DataLoader(
            self.dataset,
            batch_size=args.per_device_batch_size,
            sampler=self.sampler,
            collate_fn=ConversationCollator.from_processor(self.processor, padding_side="right"),
            num_workers=args.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=self.loader_generator,
        )
        self.micro_batches_per_epoch = math.ceil(self.sampler.num_samples / args.per_device_batch_size)
        self.steps_per_epoch = math.ceil(self.micro_batches_per_epoch / args.gradient_accumulation_steps)
        self.max_steps = args.max_steps or max(1, math.ceil(args.epochs * self.steps_per_epoch))
        self.global_batch_size = args.per_device_batch_size * args.gradient_accumulation_steps * context.world_size

    def _wrap(self, model: nn.Module) -> nn.Module:
        args, context = self.args, self.context
        if args.fsdp:
            param_dtype = torch.bfloat16 if self.precision == "bf16" else None
            apply_fsdp(model, context, param_dtype)
            teacher = getattr(getattr(_base(model), "etc", None), "frozen_teacher", None)
            if teacher is not None:  # shard the frozen teacher too: a full copy per rank defeats FSDP
                # Its modules are the backbone's choice (LLaVA: projector + language_model; Qwen3-VL: language_model,
                # and visual when it trains). The integration embeds the teacher's input ids itself, outside
                # language_model.forward: that embedding stays replicated.
                for name, module in teacher.named_children():
                    replicated = (module.get_input_embeddings(),) if name == "language_model" else ()
                    apply_fsdp(module, context, param_dtype, replicated_modules=replicated)
            return model
        return wrap_ddp(model, context, args.ddp_find_unused_parameters)

    def _autocast(self):
        enabled = self.precision == "bf16" and not self.args.fsdp  # FSDP casts through its MixedPrecisionPolicy
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    # ------------------------------------------------------------------------------------------- resume
    def _resume(self) -> tuple[TrainerState, str | None]:
        args, context = self.args, self.context
        fresh = TrainerState(
            world_size=context.world_size, per_device_batch_size=args.per_device_batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps, seed=args.seed, max_steps=self.max_steps,
            trainable_parameters=self.trainable_names,
        )  # fmt: skip
        if args.resume is None:
            return fresh, None
        if args.resume in ("auto", "latest"):
            path = latest_checkpoint(os.path.join(args.output_dir, CHECKPOINT_DIR))
            if path is None:
                if context.is_main:
                    logger.info("--resume %s: no checkpoint under %s yet, starting from step 0", args.resume,
                                args.output_dir)  # fmt: skip
                return fresh, None
        else:
            path = args.resume
        state = load_checkpoint(path, context, self.wrapped, self.optimizer, self.scheduler)
        self._check_resumed_layout(state, path)
        state.world_size = context.world_size
        state.per_device_batch_size = args.per_device_batch_size
        state.gradient_accumulation_steps = args.gradient_accumulation_steps
        state.micro_batches_in_epoch = state.samples_in_epoch // (context.world_size * args.per_device_batch_size)
        if state.max_steps != self.max_steps:
            self._rebuild_schedule(state, path)
        state.max_steps = self.max_steps
        if context.is_main:
            epoch = state.epoch + state.micro_batches_in_epoch / max(self.micro_batches_per_epoch, 1)
            logger.info("resumed from %s (step %d, epoch %.2f)", path, state.global_step, epoch)
        return state, path

    def _rebuild_schedule(self, state: TrainerState, path: str) -> None:
        """A run resumed with another length (--max-steps, --epochs): the optimizer's learning rates restored from
        the checkpoint follow the old schedule (at its end: the minimum, often 0); set them from this run's
        schedule at the resumed step, as a fresh run of this length would have them."""
        scheduler = self.scheduler
        rates = [
            base * schedule(scheduler.last_epoch) for base, schedule in zip(scheduler.base_lrs, scheduler.lr_lambdas)
        ]
        for group, rate in zip(self.optimizer.param_groups, rates):
            group["lr"] = rate
        scheduler._last_lr = rates
        if self.context.is_main:
            logger.warning(
                "resuming %s (a run of %d steps) as a run of %d steps: the learning-rate schedule follows the new "
                "length from step %d (lr %.3g)", path, state.max_steps, self.max_steps, state.global_step, rates[0],
            )  # fmt: skip

    def _claim_output_dir(self) -> None:
        """A run that does not resume starts from an --output without an earlier run's results, so that neither its
        final model and metrics are silently replaced nor its old checkpoints picked up by a later `--resume auto`:
        refuse one that holds them, or with --overwrite remove them (rank 0)."""
        args = self.args
        previous = [
            name
            for name in (FINAL_DIR, CHECKPOINT_DIR, METRICS_NAME)
            if os.path.exists(os.path.join(args.output_dir, name))
        ]
        if previous and not args.overwrite:
            raise ValueError(
                f"--output {args.output_dir} holds an earlier run ({', '.join(previous)}): continue it with --resume "
                "auto, replace it with --overwrite, or choose another --output"
            )
        if previous and self.context.is_main:
            logger.warning("--overwrite: removing %s from %s", ", ".join(previous), args.output_dir)
            for name in previous:
                path = os.path.join(args.output_dir, name)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                else:
                    os.remove(path)
        self.context.barrier()  # every rank has looked (and the old run is gone) before rank 0 writes there

    def _check_resumed_layout(self, state: TrainerState, path: str) -> None:
        args, context = self.args, self.context
        per_step = context.world_size * args.per_device_batch_size
        if state.samples_in_epoch % per_step:
            raise CheckpointError(
                f"checkpoint {path} stopped after {state.samples_in_epoch} samples of epoch {state.epoch}, which "
                f"{context.world_size} process(es) x batch {args.per_device_batch_size} cannot continue from; resume "
                f"with the saved layout ({state.world_size} process(es) x batch {state.per_device_batch_size})"
            )
        saved_global = state.world_size * state.per_device_batch_size * state.gradient_accumulation_steps
        if saved_global != self.global_batch_size and context.is_main:
            logger.warning("resuming with global batch %d, the checkpoint used %d", self.global_batch_size,
                           saved_global)  # fmt: skip
        if state.seed != args.seed:
            raise CheckpointError(f"checkpoint {path} was trained with --seed {state.seed}, not {args.seed}")

    # ------------------------------------------------------------------------------------------- loop
    def _micro_batch_groups(self, state: TrainerState):
        """Yields the micro-batches of each optimizer step from `state`'s data position; moves `state` to the next
        epoch when one ends (the last step of an epoch may have fewer micro-batches)."""
        accumulation = self.args.gradient_accumulation_steps
        while True:
            self.sampler.set_epoch(state.epoch)
            # (after an epoch's last, partial micro-batch the position is past the end: the epoch is done)
            start = state.micro_batches_in_epoch * self.args.per_device_batch_size
            self.sampler.set_start(min(start, self.sampler.num_samples))
            self.loader_generator.manual_seed(self.args.seed + state.epoch)
            iterator = iter(self.loader)
            while True:
                group = list(itertools.islice(iterator, accumulation))
                if not group:
                    break
                yield group
            state.epoch += 1
            state.micro_batches_in_epoch = 0
            state.samples_in_epoch = 0

    def _training_step(self, group: list[dict]) -> dict:
        """Forward and backward over the micro-batches of one step, then the optimizer step. Returns the step's
        metrics, reduced over all ranks."""
        context, device = self.context, self.device
        world = context.world_size
        # token counts of the whole step, over all ranks: the CE is normalised by the global number of label tokens
        counts = torch.tensor(
            [sum(count_label_tokens(b) for b in group), sum(int(b["attention_mask"].sum()) for b in group),
             sum(len(b["ids"]) for b in group)], dtype=torch.float64, device=device,
        )  # fmt: skip
        label_tokens, tokens, samples = context.all_reduce_sum(counts).tolist()
        num_items = torch.tensor(max(label_tokens, 1.0) / world, device=device)
        vid_weight = self.etc_config.vid_weight if self.etc_config is not None else 0.0

        ce_sum = torch.zeros((), device=device)
        vid_sum = torch.zeros((), device=device)
        has_vid = False
        for index, batch in enumerate(group):
            inputs = model_inputs(batch, device)
            with gradient_sync(self.wrapped, index == len(group) - 1):
                with self._autocast():
                    outputs = self.wrapped(**inputs, use_cache=False, num_items_in_batch=num_items)
                ce = getattr(outputs, "ce_loss", None)
                ce = outputs.loss if ce is None else ce
                # The model's loss is ce + vid_weight * vid. The CE is already normalised over the whole step
                # (num_items_in_batch); the distillation part is a per-batch mean, so it is averaged over the
                # micro-batches of the step.
                loss = ce + (outputs.loss - ce) / len(group)
                vid = getattr(outputs, "vid_loss", None)
                if vid is not None:
                    has_vid = True
                    vid_sum += vid.detach().float() / len(group)
                loss.backward()
            ce_sum += ce.detach().float() / world

        parameters = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        if hasattr(grad_norm, "full_tensor"):  # DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

        reduced = context.all_reduce_sum(torch.stack([ce_sum, vid_sum / world]).float())
        ce_value, vid_value = reduced.tolist()
        metrics = {
            "loss": ce_value + vid_weight * vid_value if has_vid else ce_value,
            "ce": ce_value,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens": int(tokens),  # non-padding input tokens, image tokens included
            "label_tokens": int(label_tokens),
            "samples": int(samples),
        }
        if has_vid:
            metrics["vid"] = vid_value
        return metrics

    def train(self) -> dict:
        """Runs the training loop; returns a summary (steps, last metrics, paths)."""
        args, context = self.args, self.context
        state, resumed_from = self._resume()
        if args.resume is None:  # (`--resume auto` without a checkpoint yet starts over, as asked)
            self._claim_output_dir()
        if context.is_main:
            os.makedirs(args.output_dir, exist_ok=True)
            atomic_write_json(os.path.join(args.output_dir, "train_args.json"), asdict(args))
            metrics_writer = MetricsWriter(os.path.join(args.output_dir, METRICS_NAME),
                                           state.global_step if resumed_from else None)  # fmt: skip
            n_trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            logger.info(
                "training %s%s%s: %d samples, %d steps (%d per epoch), global batch %d = %d process(es) x %d x %d "
                "accumulation, %.2fM trainable parameters, %s, %s",
                args.model, " + LoRA" if args.lora else "", " + ETC" if self.etc_config else " (full tokens)",
                len(self.dataset), self.max_steps, self.steps_per_epoch, self.global_batch_size, context.world_size,
                args.per_device_batch_size, args.gradient_accumulation_steps, n_trainable / 1e6, self.precision,
                "FSDP" if args.fsdp else ("DDP" if context.is_distributed else "1 process"),
            )  # fmt: skip
        bar = None
        if context.is_main and args.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.max_steps, initial=state.global_step, desc="train", unit="step", dynamic_ncols=True)

        checkpoint_root = os.path.join(args.output_dir, CHECKPOINT_DIR)
        window: list[dict] = []
        last_checkpoint = resumed_from
        stopped = False
        groups = self._micro_batch_groups(state)
        with _StopRequest() as stop:
            tick = time.perf_counter()
            while state.global_step < self.max_steps:
                group = next(groups)
                metrics = self._training_step(group)
                state.global_step += 1
                state.micro_batches_in_epoch += len(group)
                state.samples_in_epoch = state.micro_batches_in_epoch * args.per_device_batch_size * context.world_size
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                now = time.perf_counter()
                metrics["step_time_s"] = now - tick
                metrics["tokens_per_s"] = metrics["tokens"] / max(now - tick, 1e-9)
                tick = now
                window.append(metrics)

                if state.global_step % args.logging_steps == 0 or state.global_step == self.max_steps:
                    record = self._log_record(window, state)
                    window = []
                    state.metrics = record
                    if context.is_main:
                        metrics_writer.write(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                    tok_s=f"{metrics['tokens_per_s']:.0f}")  # fmt: skip

                stop_now = context.any(stop.requested)
                if (args.save_steps and state.global_step % args.save_steps == 0) or stop_now:
                    last_checkpoint = save_checkpoint(checkpoint_root, context, self.wrapped, self.optimizer,
                                                      self.scheduler, state)  # fmt: skip
                    if context.is_main:
                        rotate_checkpoints(checkpoint_root, args.save_total_limit, protect=last_checkpoint)
                if stop_now:
                    stopped = True
                    if context.is_main:
                        logger.warning("SIGTERM: saved %s at step %d; resume with --resume auto", last_checkpoint,
                                       state.global_step)  # fmt: skip
                    break
                tick = time.perf_counter()  # the next step's time counts its data loading, not this checkpoint
        if bar is not None:
            bar.close()

        final_dir = None
        if not stopped:
            final_dir = self._save_final(state)
        return {
            "global_step": state.global_step,
            "max_steps": self.max_steps,
            "stopped_early": stopped,
            "metrics": state.metrics,
            "final_dir": final_dir,
            "last_checkpoint": last_checkpoint,
            "num_skipped": self.num_skipped,
            "is_main": context.is_main,
        }

    def _log_record(self, window: list[dict], state: TrainerState) -> dict:
        """One metrics record: the window's losses averaged, its tokens/s over its total time."""
        total_time = sum(m["step_time_s"] for m in window)
        record = {
            "step": state.global_step,
            "epoch": round(state.epoch + state.micro_batches_in_epoch / max(self.micro_batches_per_epoch, 1), 4),
            "loss": float(np.mean([m["loss"] for m in window])),
            "ce": float(np.mean([m["ce"] for m in window])),
        }
        if "vid" in window[-1]:
            record["vid"] = float(np.mean([m["vid"] for m in window]))
        record.update(
            lr=window[-1]["lr"],
            grad_norm=float(np.mean([m["grad_norm"] for m in window])),
            tokens_per_s=sum(m["tokens"] for m in window) / max(total_time, 1e-9),
            step_time_s=total_time / len(window),
            tokens=sum(m["tokens"] for m in window),
            label_tokens=sum(m["label_tokens"] for m in window),
            samples=sum(m["samples"] for m in window),
        )
        return record

    # ------------------------------------------------------------------------------------------- final save
    def _export_model(self) -> nn.Module | None:
        """The trained model as one unsharded module on rank 0 (None on other ranks)."""
        if not self.args.fsdp:
            return unwrap_model(self.wrapped) if self.context.is_main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full_state = get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )  # collective; the full tensors land on rank 0's CPU
        if not self.context.is_main:
            return None
        model = self._build_model(torch.device("cpu"), for_export=True)[0]
        missing, unexpected = model.load_state_dict(full_state, strict=False)
        trained_missing = [name for name in missing if name in set(self.trainable_names)]
        if trained_missing or unexpected:
            raise RuntimeError(f"FSDP export: state dict mismatch (missing {trained_missing[:5]}, unexpected "
                               f"{unexpected[:5]})")  # fmt: skip
        return model

    def _save_final(self, state: TrainerState) -> str:
        """Saves the trained model in `<output>/final/` (written in a temp folder, then renamed)."""
        args, context = self.args, self.context
        model = self._export_model()
        final_dir = os.path.join(args.output_dir, FINAL_DIR)
        if context.is_main:
            tmp = final_dir + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            if self.etc_config is not None:
                self.integration.save_pretrained(model, tmp)
            elif args.lora:
                model.save_pretrained(os.path.join(tmp, "adapter"))
                model = model.merge_and_unload()
                model.save_pretrained(tmp)
            else:
                model.save_pretrained(tmp)
            self.processor.save_pretrained(tmp)
            info = {
                "base_model": os.path.abspath(args.model),
                "etc": self.etc_config.to_dict() if self.etc_config is not None else None,
                "lora": args.lora,
                "global_step": state.global_step,
                "final_metrics": state.metrics,
                "etc_ext_version": __version__,
            }
            atomic_write_json(os.path.join(tmp, TRAINING_INFO_NAME), info)
            if os.path.exists(final_dir):
                shutil.rmtree(final_dir)
            os.rename(tmp, final_dir)
            logger.info("saved the trained model to %s", final_dir)
        context.barrier()
        return final_dir


def _base(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside DDP and peft wrappers."""
    return unwrap_peft(unwrap_model(model))


def _etc_modules(model: nn.Module):
    return _base(model).etc


def train(args: TrainingArguments) -> dict:
    """Runs one training job (in every process of a torchrun job, or alone). Returns `Trainer.train`'s summary."""
    context = init_distributed(args.device, args.dist_timeout_minutes)
    if not context.is_main:  # one voice: rank 0 logs and shows progress, the others only warn
        logging.getLogger("etc_ext").setLevel(logging.WARNING)
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    try:
        return Trainer(args, context).train()
    finally:
        destroy_distributed(context)
