"""A training run's output folder and its state across restarts: claiming `--output` (`claim_output_dir`), the
starting state (`resume`: fresh, or a checkpoint's), the metrics file (`MetricsWriter`, `log_record`), SIGTERM as a
request to save and stop (`StopRequest`), and the final model (`save_final`). The checkpoints themselves are
`etc_ext.checkpointing`'s."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal

import numpy as np

from . import __version__
from .checkpointing import CheckpointError, TrainerState, atomic_write_json, latest_checkpoint, load_checkpoint
from .distributed import DistributedContext
from .models.loading import TRAINING_INFO_NAME

logger = logging.getLogger("etc_ext.train")

FINAL_DIR = "final"
CHECKPOINT_DIR = "checkpoints"
METRICS_NAME = "metrics.jsonl"

__all__ = [
    "FINAL_DIR",
    "CHECKPOINT_DIR",
    "METRICS_NAME",
    "claim_output_dir",
    "resume",
    "rebuild_schedule",
    "check_resumed_layout",
    "MetricsWriter",
    "log_record",
    "StopRequest",
    "save_final",
]


def claim_output_dir(args, context: DistributedContext) -> None:
    """A run that does not resume starts from an --output without an earlier run's results, so that neither its
    final model and metrics are silently replaced nor its old checkpoints picked up by a later `--resume auto`:
    refuse one that holds them, or with --overwrite remove them (rank 0)."""
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
    if previous and context.is_main:
        logger.warning("--overwrite: removing %s from %s", ", ".join(previous), args.output_dir)
        for name in previous:
            path = os.path.join(args.output_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
    context.barrier()  # every rank has looked (and the old run is gone) before rank 0 writes there


def resume(args, context: DistributedContext, data, wrapped, optimizer, scheduler, trainable_names):
    """The run's starting state: a fresh `TrainerState`, or the checkpoint `--resume` names (`auto`: the latest under
    `<output>/checkpoints`, none yet: fresh) loaded into `wrapped`, `optimizer` and `scheduler`. Returns `(state,
    checkpoint path or None)`."""
    fresh = TrainerState(
        world_size=context.world_size, per_device_batch_size=args.per_device_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, seed=args.seed, max_steps=data.max_steps,
        trainable_parameters=trainable_names,
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
    state = load_checkpoint(path, context, wrapped, optimizer, scheduler)
    check_resumed_layout(args, context, data, state, path)
    state.world_size = context.world_size
    state.per_device_batch_size = args.per_device_batch_size
    state.gradient_accumulation_steps = args.gradient_accumulation_steps
    state.micro_batches_in_epoch = state.samples_in_epoch // (context.world_size * args.per_device_batch_size)
    if state.max_steps != data.max_steps:
        rebuild_schedule(optimizer, scheduler, context, state, data.max_steps, path)
    state.max_steps = data.max_steps
    if context.is_main:
        epoch = state.epoch + state.micro_batches_in_epoch / max(data.micro_batches_per_epoch, 1)
        logger.info("resumed from %s (step %d, epoch %.2f)", path, state.global_step, epoch)
    return state, path


def rebuild_schedule(optimizer, scheduler, context: DistributedContext, state: TrainerState, max_steps: int,
                     path: str) -> None:  # fmt: skip
    """A run resumed with another length (--max-steps, --epochs): the optimizer's learning rates restored from
    the checkpoint follow the old schedule (at its end: the minimum, often 0); set them from this run's
    schedule at the resumed step, as a fresh run of this length would have them."""
    rates = [
        base * schedule(scheduler.last_epoch) for base, schedule in zip(scheduler.base_lrs, scheduler.lr_lambdas)
    ]
    for group, rate in zip(optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler._last_lr = rates
    if context.is_main:
        logger.warning(
            "resuming %s (a run of %d steps) as a run of %d steps: the learning-rate schedule follows the new "
            "length from step %d (lr %.3g)", path, state.max_steps, max_steps, state.global_step, rates[0],
        )  # fmt: skip


def check_resumed_layout(args, context: DistributedContext, data, state: TrainerState, path: str) -> None:
    """The checkpoint's data position fits this run's layout and seed (a changed global batch only warns)."""
    per_step = context.world_size * args.per_device_batch_size
    if state.samples_in_epoch % per_step:
        raise CheckpointError(
            f"checkpoint {path} stopped after {state.samples_in_epoch} samples of epoch {state.epoch}, which "
            f"{context.world_size} process(es) x batch {args.per_device_batch_size} cannot continue from; resume "
            f"with the saved layout ({state.world_size} process(es) x batch {state.per_device_batch_size})"
        )
    saved_global = state.world_size * state.per_device_batch_size * state.gradient_accumulation_steps
    if saved_global != data.global_batch_size and context.is_main:
        logger.warning("resuming with global batch %d, the checkpoint used %d", data.global_batch_size,
                       saved_global)  # fmt: skip
    if state.seed != args.seed:
        raise CheckpointError(f"checkpoint {path} was trained with --seed {state.seed}, not {args.seed}")


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


class StopRequest:
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


def log_record(window: list[dict], state: TrainerState, micro_batches_per_epoch: int) -> dict:
    """One metrics record: the window's losses averaged, its tokens/s over its total time."""
    total_time = sum(m["step_time_s"] for m in window)
    record = {
        "step": state.global_step,
        "epoch": round(state.epoch + state.micro_batches_in_epoch / max(micro_batches_per_epoch, 1), 4),
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


def save_final(model, args, context: DistributedContext, state: TrainerState, etc_config, integration,
               processor) -> str:  # fmt: skip
    """Saves the trained model (`export_model`'s, on rank 0) in `<output>/final/` (written in a temp folder, then
    renamed)."""
    final_dir = os.path.join(args.output_dir, FINAL_DIR)
    if context.is_main:
        tmp = final_dir + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        if etc_config is not None:
            integration.save_pretrained(model, tmp)
        elif args.lora:
            model.save_pretrained(os.path.join(tmp, "adapter"))
            model = model.merge_and_unload()
            model.save_pretrained(tmp)
        else:
            model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        info = {
            "base_model": os.path.abspath(args.model),
            "etc": etc_config.to_dict() if etc_config is not None else None,
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
