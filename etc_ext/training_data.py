"""A training run's data: the conversations (`ConversationDataset`, bad samples skipped on request), their shards
(`ResumableDistributedSampler`: every rank its part, from a checkpoint's data position), and the micro-batches of each
optimizer step (`TrainingData.micro_batch_groups`)."""

from __future__ import annotations

import itertools
import logging
import math

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .checkpointing import TrainerState
from .distributed import DistributedContext

logger = logging.getLogger("etc_ext.train")

IGNORE_INDEX = -100
# Batch entries that are not model inputs (the collator's bookkeeping).
NON_MODEL_INPUTS = ("num_images", "token_type_ids")

__all__ = ["TrainingData", "ResumableDistributedSampler", "SkipUnloadable", "model_inputs", "count_label_tokens"]


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


class TrainingData:
    """The dataset, its sampler and loader for one run, and the run's length in steps.

    Attributes:
        dataset: the samples (a `SkipUnloadable` around the `ConversationDataset`); num_skipped: bad samples skipped
            when it was read.
        sampler, loader, loader_generator: sharding and batching (the loader draws from its own generator, so that
            creating an iterator never draws from the global RNG and resuming is exact).
        micro_batches_per_epoch, steps_per_epoch, max_steps, global_batch_size: the run's arithmetic.
    """

    def __init__(self, args, processor, context: DistributedContext, device: torch.device):
        self.args = args
        self.context = context
        self.dataset = self._read(processor)
        self._batch(processor, device)

    def _read(self, processor):
        from .data import ConversationDataset

        args = self.args
        dataset = ConversationDataset(
            args.data,
            processor,
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

    def _batch(self, processor, device) -> None:
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
            collate_fn=ConversationCollator.from_processor(processor, padding_side="right"),
            num_workers=args.num_workers,
            pin_memory=device.type == "cuda",
            generator=self.loader_generator,
        )
        self.micro_batches_per_epoch = math.ceil(self.sampler.num_samples / args.per_device_batch_size)
        self.steps_per_epoch = math.ceil(self.micro_batches_per_epoch / args.gradient_accumulation_steps)
        self.max_steps = args.max_steps or max(1, math.ceil(args.epochs * self.steps_per_epoch))
        self.global_batch_size = args.per_device_batch_size * args.gradient_accumulation_steps * context.world_size

    def micro_batch_groups(self, state: TrainerState):
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
