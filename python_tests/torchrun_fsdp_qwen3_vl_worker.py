"""A tiny Qwen3-VL with ETC under full fine-tuning (frozen teacher), sharded as `etc-ext train --fsdp` shards a model
(`etc_ext.training_model.wrap_model`: the model and its frozen teacher), trained for a few steps on one fixed batch.
Run by torchrun from test_train.py (rank 0 writes the losses to the json file named by argv[1]); `train_steps` is
also the single-process reference. Not collected by pytest.

    torchrun --standalone --nproc-per-node 2 python_tests/torchrun_fsdp_qwen3_vl_worker.py losses.json
"""

import json
import os
import sys
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import qwen3_vl_batch, tiny_qwen3_vl  # noqa: E402  (the tiny Qwen3-VL)
import test_qwen3_vl_etc as qwen  # noqa: E402
from etc_ext.models import qwen3_vl  # noqa: E402
from etc_ext.models.common import snapshot_teacher  # noqa: E402
from etc_ext.training_model import wrap_model  # noqa: E402

STEPS = 3


def train_steps(context, fsdp: bool) -> list[float]:
    """The loss of each of `STEPS` SGD steps (every rank trains on the same batch, so the loss curve does not depend
    on the number of processes)."""
    model = qwen3_vl.apply_etc(tiny_qwen3_vl(seed=0), qwen.small_config(teacher="frozen", loss="vid"))
    snapshot_teacher(model)  # full fine-tuning: the teacher is a frozen copy of the starting model
    model.train()
    wrapped = wrap_model(model, SimpleNamespace(fsdp=fsdp, ddp_find_unused_parameters=False), context, "fp32")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    inputs, labels, _ = qwen3_vl_batch([[3, ("I", 4, 6), 5], [2, ("I", 4, 4), 6]], answer=3)
    losses = []
    for _ in range(STEPS):
        loss = wrapped(**inputs, labels=labels, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


if __name__ == "__main__":
    from etc_ext.distributed import destroy_distributed, init_distributed

    torch.set_num_threads(1)
    context = init_distributed("cpu")
    losses = train_steps(context, fsdp=True)
    if context.is_main:
        with open(sys.argv[1], "w") as f:
            json.dump(losses, f)
    # Every rank's collectives are done before either tears the group down (a rank leaving while the other still
    # communicated aborted a worker once, on a loaded machine).
    torch.distributed.barrier()
    destroy_distributed(context)
