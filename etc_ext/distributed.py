"""torch.distributed plumbing of the training loop: process group setup from torchrun's environment, DDP and FSDP
(`fully_shard`) wrapping, and small collectives.

A process started by `torchrun` finds `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT` in its
environment; `init_distributed` then joins the process group (NCCL on GPUs, gloo on CPUs) and picks the device
`cuda:LOCAL_RANK`. A plain `python` process runs alone without a process group, through the same code paths.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


logger = logging.getLogger(__name__)


@dataclass
class DistributedContext:
    """Where this process stands in the job.

    Attributes:
        rank: global rank (0 without torchrun).
        world_size: number of processes (1 without torchrun).
        local_rank: rank on this machine; selects the GPU.
        device: the device this process computes on.
        backend: `"nccl"`, `"gloo"`, or None when running alone.
        owns_process_group: True if `init_distributed` created the process group (and `destroy_distributed` ends
            it); False when the caller had initialised it.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    owns_process_group: bool = False

    @property
    def is_main(self) -> bool:
        """True on rank 0, which logs, shows progress bars and writes the shared files."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None

    def barrier(self) -> None:
        if self.is_distributed:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of `tensor` over all ranks (in place; returned for chaining). Without a process group, `tensor`."""
        if self.is_distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool) -> bool:
        """True if `flag` is True on any rank."""
        if not self.is_distributed:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def broadcast_object(self, obj):
        """`obj` as rank 0 has it, on every rank."""
        if not self.is_distributed:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=0, device=self.device if self.backend == "nccl" else None)
        return holder[0]


def check_device(device: str, name: str = "device") -> None:
    """`device` ("auto", "cpu" or "cuda") can run here: ValueError naming `name` otherwise."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"{name} must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"{name} cuda was asked for but torch.cuda.is_available() is False: use {name} cpu or auto"
        )


def check_hardware_arguments(device: str, attn_implementation: str) -> None:
    """A command's `--device` and `--attn-implementation` can run here: ValueError naming the option otherwise (before
    anything is loaded)."""
    check_device(device, "--device")
    if attn_implementation == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            raise ValueError(
                "--attn-implementation flash_attention_2 needs the flash-attn package and a CUDA GPU, which this "
                "machine lacks: use sdpa (the default)"
            )


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: str = "auto", timeout_minutes: float = 30.0) -> DistributedContext:
    """Joins the process group when started by torchrun (`WORLD_SIZE` > 1) and picks this process's device.

    Args:
        device: `"auto"` (`cuda:LOCAL_RANK` when CUDA is available, else the CPU), `"cpu"` or `"cuda"`.
        timeout_minutes: collective timeout (long enough for rank 0 to write a checkpoint while others wait).

    Returns:
        The `DistributedContext`. Call `destroy_distributed` at the end.
    """
    check_device(device)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible: start at most "
                "that many processes per node (torchrun --nproc-per-node)"
            )
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")

    if world_size == 1:
        return DistributedContext(0, 1, 0, torch_device, None)
    backend = "nccl" if use_cuda else "gloo"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=torch_device if use_cuda else None,
        )
    elif dist.get_backend() != backend:
        raise RuntimeError(f"the process group uses {dist.get_backend()}, training on {torch_device} needs {backend}")
    context = DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, torch_device, backend, owns)
    if context.rank == 0:
        logger.info("joined the process group: %d processes (%s)", context.world_size, backend)
    return context


def destroy_distributed(context: DistributedContext) -> None:
    """Ends the process group if `init_distributed` created it (a group the caller made stays)."""
    if context.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------- model wrappers
def wrap_ddp(model: nn.Module, context: DistributedContext, find_unused_parameters: bool = False) -> nn.Module:
    """`DistributedDataParallel` around `model` (already on `context.device`) when running distributed; the model
    itself otherwise. DDP broadcasts rank 0's parameters and buffers at construction."""
    if not context.is_distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def sharded_block_modules(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP shards one by one: every element of an `nn.ModuleList` called `layers` (the decoder
    layers of the language model, the encoder layers of the vision tower)."""
    blocks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "layers":
            blocks.extend(module)
    return blocks


def apply_fsdp(
    model: nn.Module,
    context: DistributedContext,
    param_dtype: torch.dtype | None = None,
    replicated_modules: tuple[nn.Module, ...] = (),
) -> nn.Module:
    """Shards `model` in place with FSDP2 (`torch.distributed.fsdp.fully_shard`): each block of
    `sharded_block_modules`, then the root. `replicated_modules` stay unsharded, a full copy on every rank: submodules
    that callers run outside `model.forward` (e.g. an embedding called directly), whose parameters FSDP would not
    gather in time. Parameters stay float32 (the optimizer's master weights); with `param_dtype` (e.g. bfloat16)
    they are cast for the forward and backward, and gradients are reduced in float32.

    Call after the trainable parameters are chosen and the model is on `context.device`, and before building the
    optimizer (which must see the sharded parameters). Every rank must hold the same weights beforehand (FSDP does
    not broadcast): load them from the same files and seed random initialisations identically.
    """
    if not context.is_distributed:
        raise ValueError("FSDP needs a distributed run: start training with torchrun --nproc-per-node N")
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    blocks = sharded_block_modules(model)
    if not blocks:
        logger.warning("FSDP: found no `layers` blocks to shard; sharding the whole model as one unit")
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    ignored = {param for module in replicated_modules for param in module.parameters()}
    fully_shard(model, mp_policy=policy, ignored_params=ignored or None)
    return model


def is_fsdp(model: nn.Module) -> bool:
    """True if `model` was sharded with `fully_shard`."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch < 2.6
        return False
    return isinstance(model, FSDPModule)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 shards in place, so a sharded model is returned as is)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def gradient_sync(model: nn.Module, sync: bool):
    """Context for one micro-batch's backward: gradients are all-reduced (DDP) or reduce-scattered (FSDP) only when
    `sync` is True, i.e. on the last micro-batch of a gradient accumulation step."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext() if sync else model.no_sync()
    if is_fsdp(model):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()
