"""Training checkpoints: written atomically, verified on load, resumed exactly.

A checkpoint is a folder `checkpoint-<step>` (step zero-padded to 8 digits) under `<output>/checkpoints/`:

```
checkpoint-00000200/
    model.safetensors      trainable parameters (names of the unwrapped model), full tensors      (DDP / 1 process)
    optimizer.pt           optimizer.state_dict()                                                 (DDP / 1 process)
    sharded/               torch.distributed.checkpoint of the trainable parameters and optimizer  (FSDP)
    scheduler.pt           lr scheduler state_dict()
    rng_state_<rank>.pt    python, numpy, torch (and CUDA) RNG states of each rank
    trainer_state.json     step, epoch, data position, batch layout, metrics of the step
    manifest.json          written last: the size of every file above
```

Atomicity: every rank writes into `checkpoint-<step>.tmp/`; rank 0 then writes the manifest, fsyncs and renames the
folder to `checkpoint-<step>` (one `rename`, atomic on POSIX file systems). A process killed at any moment leaves
either the complete new checkpoint or none, and the previous checkpoints untouched. A folder whose files do not match
its manifest (truncated, partly deleted) is refused with `CheckpointError`, which names the file and the newest
complete checkpoint to resume from instead.

Frozen parameters are not saved (they are the model's starting weights, loaded from `--model`), so a LoRA checkpoint
holds the adapters and the trained modules only.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .distributed import DistributedContext, is_fsdp, unwrap_model


logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TMP_SUFFIX = ".tmp"
MANIFEST_NAME = "manifest.json"
STATE_NAME = "trainer_state.json"
MODEL_NAME = "model.safetensors"
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
SHARDED_DIR = "sharded"
FORMAT_VERSION = 1
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from (incomplete, truncated, or from a different training set-up)."""


@dataclass
class TrainerState:
    """Where training stands; saved in every checkpoint as `trainer_state.json`.

    Attributes:
        global_step: optimizer steps done.
        epoch: current epoch (0-based).
        micro_batches_in_epoch: micro-batches of the current epoch each rank has consumed.
        samples_in_epoch: samples of the current epoch consumed over all ranks
            (`micro_batches_in_epoch * per_device_batch_size * world_size`), the data position independent of the
            number of processes.
        world_size, per_device_batch_size, gradient_accumulation_steps, seed: the batch layout that produced the
            checkpoint.
        max_steps: total optimizer steps of the run.
        trainable_parameters: names of the trained parameters, in `named_parameters()` order.
        metrics: the last logged metrics.
    """

    global_step: int = 0
    epoch: int = 0
    micro_batches_in_epoch: int = 0
    samples_in_epoch: int = 0
    world_size: int = 1
    per_device_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    seed: int = 0
    max_steps: int = 0
    trainable_parameters: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainerState":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, str]]:
    """`(step, path)` of the checkpoint folders under `root` (complete or not; temp folders excluded), by step."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _CHECKPOINT_RE.match(name)
        if match and os.path.isdir(os.path.join(root, name)):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return sorted(found)


def _checkpoint_problem(path: str) -> tuple[str | None, dict | None]:
    """`(problem, manifest)`: what makes `path` unusable (None if nothing) and its manifest."""
    manifest_path = os.path.join(path, MANIFEST_NAME)
    if not os.path.isdir(path):
        return "the folder does not exist", None
    if not os.path.isfile(manifest_path):
        return f"it has no {MANIFEST_NAME} (the checkpoint was not completed)", None
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        return f"its {MANIFEST_NAME} cannot be read ({error})", None
    for relpath, expected in manifest.get("files", {}).items():
        file_path = os.path.join(path, relpath)
        if not os.path.isfile(file_path):
            return f"{relpath} is missing", manifest
        size = os.path.getsize(file_path)
        if size != expected:
            return f"{relpath} has {size} bytes, the manifest records {expected} (truncated or overwritten)", manifest
    return None, manifest


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Checks that `path` is a complete checkpoint: its manifest exists and every file has the size it records.

    Returns:
        The manifest.

    Raises:
        CheckpointError: naming the missing or truncated file, and the newest complete checkpoint before it.
    """
    path = os.fspath(path)
    problem, manifest = _checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is not usable: {problem}.{_previous_hint(path)}")
    return manifest


def _previous_hint(path: str) -> str:
    """' The previous checkpoint <newest complete one before path> is complete: ...' or ''."""
    root, name = os.path.split(os.path.normpath(path))
    match = _CHECKPOINT_RE.match(name)
    step = int(match.group(1)) if match else None
    for other_step, other in reversed(list_checkpoints(root)):
        if os.path.normpath(other) == os.path.normpath(path) or (step is not None and other_step >= step):
            continue
        if _checkpoint_problem(other)[0] is None:
            return f" The previous checkpoint {other} is complete: resume from it with --resume {other}."
    return ""


def latest_checkpoint(root: str | os.PathLike) -> str | None:
    """The checkpoint with the highest step under `root`, verified (None if there is none).

    Raises:
        CheckpointError: the newest checkpoint is damaged (the message names a complete earlier one). A damaged
            checkpoint is never skipped silently: resuming from an older one repeats steps, which the user decides.
    """
    checkpoints = list_checkpoints(root)
    if not checkpoints:
        return None
    path = checkpoints[-1][1]
    verify_checkpoint(path)
    return path


# ----------------------------------------------------------------------------------------------- RNG states
def capture_rng_state() -> dict:
    """The python, numpy, torch and CUDA RNG states, as tensors and plain types (loadable with weights_only)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Restores what `capture_rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            logger.warning("checkpoint has %d CUDA RNG states, %d GPUs visible: not restored", len(cuda_states),
                           torch.cuda.device_count())


# ----------------------------------------------------------------------------------------------- file helpers
def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write_json(path: str, data: Any) -> None:
    """Writes json to `path` through a temp file and a rename, so readers see the old or the new file, never half."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters of `model` (DDP unwrapped) by name, detached on the CPU."""
    module = unwrap_model(model)
    return {
        name: param.detach().to("cpu", copy=True).contiguous()
        for name, param in module.named_parameters()
        if param.requires_grad
    }


# ----------------------------------------------------------------------------------------------- save / load
def save_checkpoint(
    root: str | os.PathLike,
    context: DistributedContext,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    state: TrainerState,
) -> str:
    """Writes the checkpoint of `state.global_step` under `root` (collective: every rank calls it).

    Returns:
        The checkpoint folder.
    """
    from safetensors.torch import save_file

    root = os.fspath(root)
    final = os.path.join(root, checkpoint_name(state.global_step))
    tmp = final + TMP_SUFFIX
    if context.is_main:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):  # left by a process killed while writing
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    context.barrier()

    if is_fsdp(model):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model_state, optimizer_state = get_state_dict(
            model, optimizer, options=StateDictOptions(ignore_frozen_params=True)
        )
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=os.path.join(tmp, SHARDED_DIR))
    elif context.is_main:
        metadata = {"format": "pt", "step": str(state.global_step)}
        save_file(trainable_state_dict(model), os.path.join(tmp, MODEL_NAME), metadata=metadata)
        torch.save(optimizer.state_dict(), os.path.join(tmp, OPTIMIZER_NAME))
    torch.save(capture_rng_state(), os.path.join(tmp, f"rng_state_{context.rank}.pt"))
    if context.is_main:
        torch.save(scheduler.state_dict(), os.path.join(tmp, SCHEDULER_NAME))
        with open(os.path.join(tmp, STATE_NAME), "w") as f:
            json.dump(asdict(state), f, indent=1)
    context.barrier()  # every rank's files are written

    if context.is_main:
        files = {}
        for directory, _, names in os.walk(tmp):
            for name in names:
                file_path = os.path.join(directory, name)
                _fsync_file(file_path)
                files[os.path.relpath(file_path, tmp)] = os.path.getsize(file_path)
        manifest = {"format_version": FORMAT_VERSION, "step": state.global_step, "files": dict(sorted(files.items()))}
        atomic_write_json(os.path.join(tmp, MANIFEST_NAME), manifest)
        _fsync_dir(tmp)
        if os.path.exists(final):  # the same step saved before (e.g. a run resumed from an older checkpoint)
            old = final + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
    context.barrier()
    return final


def load_checkpoint(
    path: str | os.PathLike,
    context: DistributedContext,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
) -> TrainerState:
    """Loads a checkpoint of `save_checkpoint` into `model`, `optimizer` and `scheduler` and restores this rank's RNG
    state (collective under FSDP). The model must have been set up as for the saved run (same trainable parameters).

    Returns:
        The saved `TrainerState`.

    Raises:
        CheckpointError: incomplete or truncated files, or trainable parameters that do not match the model.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.fspath(path)
    verify_checkpoint(path)
    try:
        with open(os.path.join(path, STATE_NAME)) as f:
            state = TrainerState.from_dict(json.load(f))
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint {path}: cannot read {STATE_NAME} ({error})") from error

    module = unwrap_model(model)
    trainable = [name for name, param in module.named_parameters() if param.requires_grad]
    if state.trainable_parameters and state.trainable_parameters != trainable:
        saved, current = set(state.trainable_parameters), set(trainable)
        raise CheckpointError(
            f"checkpoint {path} trained other parameters than this model trains (was --lora / --etc-config / "
            f"--train-vision-tower changed?): only in the checkpoint {sorted(saved - current)[:5]}, only in the "
            f"model {sorted(current - saved)[:5]}"
            if saved != current
            else f"checkpoint {path}: the trainable parameters are in a different order than in this model"
        )

    sharded = os.path.join(path, SHARDED_DIR)
    try:
        if is_fsdp(model):
            if not os.path.isdir(sharded):
                raise CheckpointError(f"checkpoint {path} was not written by an FSDP run (no {SHARDED_DIR}/): "
                                      "resume it without --fsdp")
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

            options = StateDictOptions(ignore_frozen_params=True)
            model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
            loaded = {"model": model_state, "optimizer": optimizer_state}
            dcp.load(loaded, checkpoint_id=sharded)
            set_state_dict(  # the frozen parameters are not in the checkpoint: not strict
                model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"],
                options=StateDictOptions(ignore_frozen_params=True, strict=False),
            )  # fmt: skip
        else:
            if os.path.isdir(sharded):
                raise CheckpointError(f"checkpoint {path} was written by an FSDP run: resume it with --fsdp")
            weights = load_file(os.path.join(path, MODEL_NAME), device=str(context.device))
            missing = sorted(set(trainable) - set(weights))
            unexpected = sorted(set(weights) - set(trainable))
            if missing or unexpected:
                raise CheckpointError(
                    f"checkpoint {path}: {MODEL_NAME} does not match the trainable parameters (missing "
                    f"{missing[:5]}, unexpected {unexpected[:5]})"
                )
            with torch.no_grad():
                params = dict(module.named_parameters())
                for name, tensor in weights.items():
                    if params[name].shape != tensor.shape:
                        raise CheckpointError(
                            f"checkpoint {path}: {name} has shape {list(tensor.shape)}, the model "
                            f"{list(params[name].shape)}"
                        )
                    params[name].copy_(tensor)
            optimizer_state = torch.load(
                os.path.join(path, OPTIMIZER_NAME), map_location=context.device, weights_only=True
            )
            optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(torch.load(os.path.join(path, SCHEDULER_NAME), weights_only=True))
    except CheckpointError:
        raise
    except (SafetensorError, RuntimeError, ValueError, OSError, EOFError, KeyError) as error:
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {type(error).__name__}: {error}") from error

    rng_path = os.path.join(path, f"rng_state_{context.rank}.pt")
    if os.path.isfile(rng_path):
        restore_rng_state(torch.load(rng_path, weights_only=True))
    else:
        logger.warning(
            "checkpoint %s has no RNG state for rank %d (saved by %d processes, resumed by %d): this rank's random "
            "streams restart from the seed", path, context.rank, state.world_size, context.world_size,
        )  # fmt: skip
    return state


def rotate_checkpoints(root: str | os.PathLike, keep: int | None, protect: str | None = None) -> None:
    """Deletes the oldest checkpoints under `root` so that at most `keep` remain (None keeps all). `protect` (e.g.
    the checkpoint training resumed from) is never deleted while it is the newest complete one."""
    if keep is None:
        return
    checkpoints = [path for _, path in list_checkpoints(root)]
    for path in checkpoints[: max(0, len(checkpoints) - keep)]:
        if protect is not None and os.path.normpath(path) == os.path.normpath(protect):
            continue
        shutil.rmtree(path, ignore_errors=True)
