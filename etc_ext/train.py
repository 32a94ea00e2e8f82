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

import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from .checkpointing import TrainerState, atomic_write_json, rotate_checkpoints, save_checkpoint
from .distributed import (
    DistributedContext,
    check_hardware_arguments,
    destroy_distributed,
    gradient_sync,
    init_distributed,
    unwrap_model,
)
from .models.common import LORA_TARGET_MODULES
from .training_data import (  # noqa: F401  (ResumableDistributedSampler, SkipUnloadable: part of this module's API)
    IGNORE_INDEX,
    ResumableDistributedSampler,
    SkipUnloadable,
    TrainingData,
    count_label_tokens,
    model_inputs,
)
from .training_model import (  # noqa: F401  (parse_etc_config, parameter_groups: part of this module's API)
    autocast,
    build_model,
    build_optimizer,
    export_model,
    parameter_groups,
    parse_etc_config,
    resolve_precision,
    wrap_model,
)
from .training_output import (  # noqa: F401  (FINAL_DIR, METRICS_NAME, MetricsWriter: part of this module's API)
    CHECKPOINT_DIR,
    FINAL_DIR,
    METRICS_NAME,
    MetricsWriter,
    StopRequest,
    claim_output_dir,
    log_record,
    resume,
    save_final,
)


logger = logging.getLogger(__name__)

# peft target of --lora: the attention and MLP projections of the language model (not the vision tower).
DEFAULT_LORA_TARGET = LORA_TARGET_MODULES


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


# ------------------------------------------------------------------------------------------------- trainer
class Trainer:
    """One training run; `Trainer(args, context).train()` (or the `train` function) runs it: the optimizer steps of the
    loop, with the model (`training_model`), the data (`training_data`) and the output folder and restarts
    (`training_output`) built by their own modules."""

    def __init__(self, args: TrainingArguments, context: DistributedContext):
        self.args = args
        self.context = context
        self.device = context.device
        self.precision = resolve_precision(args.precision, self.device)
        set_seed(args.seed)
        self.model, self.processor, self.etc_config, self.integration = build_model(args, self.device)
        self.data = TrainingData(args, self.processor, context, self.device)
        self.max_steps = self.data.max_steps
        self.wrapped = wrap_model(self.model, args, context, self.precision)
        self.optimizer, self.scheduler = build_optimizer(self.model, args, self.max_steps)
        self.trainable_names = [n for n, p in unwrap_model(self.model).named_parameters() if p.requires_grad]

    def _resume(self) -> tuple[TrainerState, str | None]:
        return resume(self.args, self.context, self.data, self.wrapped, self.optimizer, self.scheduler,
                      self.trainable_names)  # fmt: skip

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
                with autocast(self.precision, self.args.fsdp, self.device):
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
        args, context, data = self.args, self.context, self.data
        state, resumed_from = self._resume()
        if args.resume is None:  # (`--resume auto` without a checkpoint yet starts over, as asked)
            claim_output_dir(args, context)
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
                len(data.dataset), self.max_steps, data.steps_per_epoch, data.global_batch_size, context.world_size,
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
        groups = data.micro_batch_groups(state)
        with StopRequest() as stop:
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
                    record = log_record(window, state, data.micro_batches_per_epoch)
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
            model = export_model(self.model, self.wrapped, args, context, self.trainable_names)
            final_dir = save_final(model, args, context, state, self.etc_config, self.integration, self.processor)
        return {
            "global_step": state.global_step,
            "max_steps": self.max_steps,
            "stopped_early": stopped,
            "metrics": state.metrics,
            "final_dir": final_dir,
            "last_checkpoint": last_checkpoint,
            "num_skipped": data.num_skipped,
            "is_main": context.is_main,
        }


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
