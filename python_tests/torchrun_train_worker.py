"""Runs several `etc-ext` commands one after the other in each process of one torchrun job (one process group, one
start-up: the machines running the tests are small). Used by the multi-process tests, not collected by pytest.

    torchrun --standalone --nproc-per-node 2 python_tests/torchrun_train_worker.py '[["train", ...], ["train", ...]]'
"""

import json
import sys

import torch.distributed as dist

from etc_ext.cli import main


if __name__ == "__main__":
    dist.init_process_group("gloo")
    for argv in json.loads(sys.argv[1]):
        code = main(["-q", *argv])
        if code != 0:
            sys.exit(f"rank {dist.get_rank()}: etc-ext {' '.join(argv)} exited with {code}")
        dist.barrier()
    dist.destroy_process_group()
