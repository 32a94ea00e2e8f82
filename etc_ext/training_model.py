"""A training run's model: loaded with its processor, with LoRA and ETC applied (`build_model`), wrapped for DDP or
sharded with FSDP (`wrap_model`), its optimizer and learning-rate schedule (`build_optimizer`), and the trained model
as one module for saving (`export_model`)."""

from __future__ import annotations

import json
import math
import os

import torch
from torch import nn

from .distributed import DistributedContext, apply_fsdp, unwrap_model, wrap_ddp
from .models.common import unwrap_peft

__all__ = [
    "parse_etc_config",
    "resolve_precision",
    "build_model",
    "wrap_model",
    "autocast",
    "parameter_groups",
    "build_optimizer",
    "export_model",
]


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


def resolve_precision(precision: str, device: torch.device) -> str:
    """`--precision auto`: bf16 on GPUs that support it, else fp32."""
    if precision == "auto":
        cuda = device.type == "cuda"
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def build_model(args, device: torch.device, for_export: bool = False):
    """Loads the model and applies LoRA and ETC; returns `(model, processor, etc_config, integration)`.
    `for_export`: a copy to receive trained weights and be saved (no teacher snapshot)."""
    from .models.loading import integration_for, load_model_and_processor, vision_tower_of

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


def wrap_model(model: nn.Module, args, context: DistributedContext, precision: str) -> nn.Module:
    """DDP around `model`, or FSDP2 shards of it (and of its frozen teacher) with `--fsdp`."""
    if args.fsdp:
        param_dtype = torch.bfloat16 if precision == "bf16" else None
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


def autocast(precision: str, fsdp: bool, device: torch.device):
    """bf16 autocast for `--precision bf16` (FSDP casts through its MixedPrecisionPolicy instead)."""
    enabled = precision == "bf16" and not fsdp
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def parameter_groups(model: nn.Module, args) -> list[dict]:
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


def build_optimizer(model: nn.Module, args, max_steps: int):
    """AdamW over `parameter_groups` with a linear warmup and cosine decay to `min_lr_ratio`: `(optimizer,
    scheduler)`."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    optimizer = torch.optim.AdamW(
        parameter_groups(model, args),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
    )
    warmup = args.warmup_steps if args.warmup_steps is not None else math.ceil(args.warmup_ratio * max_steps)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=warmup, num_training_steps=max_steps, min_lr_rate=args.min_lr_ratio
    )
    return optimizer, scheduler


def export_model(model: nn.Module, wrapped: nn.Module, args, context: DistributedContext, trainable_names):
    """The trained model as one unsharded module on rank 0 (None on other ranks)."""
    if not args.fsdp:
        return unwrap_model(wrapped) if context.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full_state = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )  # collective; the full tensors land on rank 0's CPU
    if not context.is_main:
        return None
    exported = build_model(args, torch.device("cpu"), for_export=True)[0]
    missing, unexpected = exported.load_state_dict(full_state, strict=False)
    trained_missing = [name for name in missing if name in set(trainable_names)]
    if trained_missing or unexpected:
        raise RuntimeError(f"FSDP export: state dict mismatch (missing {trained_missing[:5]}, unexpected "
                           f"{unexpected[:5]})")  # fmt: skip
    return exported


def _base(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside DDP and peft wrappers."""
    return unwrap_peft(unwrap_model(model))


def _etc_modules(model: nn.Module):
    return _base(model).etc
