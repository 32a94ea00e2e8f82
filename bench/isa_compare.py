"""Our CPU kernels on each instruction set this CPU supports, against eager PyTorch, at the LLaVA-1.5-7B shapes:
weighted_aggregate bf16 (x (B, 576, 4096), importance) and cross_attn_scores (fp32, 32 heads of 128, 32 queries,
576 keys, with the q.k^T matmul alone as the floor). Each row: the interleaved minimum of blocked medians.

    python bench/isa_compare.py [--threads N] [--capabilities avx2 avx512]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout
from common import interleaved_min_ms, score_inputs  # noqa: E402

from etc_ext import ops, reference  # noqa: E402

AGGREGATE_CASES = [(4, 16), (1, 1), (1, 4), (1, 16), (1, 64), (8, 16)]  # (B, K)
SCORE_CASES = [("llava7b-infer", (1, 32, 32, 32, 576, 128)), ("llava7b-b8", (8, 32, 32, 32, 576, 128))]


def rows(rounds: int = 3, min_run_time: float = 0.2) -> list:
    out = []
    with torch.inference_mode():
        for batch, k in AGGREGATE_CASES:
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(batch, 576, 4096, generator=gen).bfloat16()
            logits = torch.randn(batch, k, 576, generator=gen)
            importance = torch.rand(batch, 576, generator=gen)
            t = interleaved_min_ms({"ours": lambda: ops.weighted_aggregate(x, logits, importance),
                                    "eager": lambda: reference.weighted_aggregate(x, logits, importance)},
                                   rounds, min_run_time)  # fmt: skip
            out.append((f"weighted_aggregate bf16 B={batch} K={k}", t["ours"], t["eager"], None))
        for name, shape in SCORE_CASES:
            q, key = score_inputs(*shape)
            t = interleaved_min_ms({"ours": lambda: ops.cross_attn_scores(q, key),
                                    "eager": lambda: reference.cross_attn_scores(q, key),
                                    "matmul": lambda: torch.matmul(q, key.transpose(-1, -2))},
                                   rounds, min_run_time)  # fmt: skip
            out.append((f"cross_attn_scores {name}", t["ours"], t["eager"], t["matmul"]))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--capabilities", nargs="+", default=None, help="default: every one this CPU supports")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{args.threads} thread(s); this CPU supports {', '.join(ops.supported_cpu_capabilities())}")
    print(f"{'kernels':<9}{'case':<40}{'ours ms':>9}{'eager ms':>10}{'x eager':>9}{'/ floor':>9}")
    for capability in args.capabilities or ops.supported_cpu_capabilities():
        with ops.use_cpu_capability(capability):
            for case, ours, eager, floor in rows():
                share = f"{ours / floor:>9.2f}" if floor else f"{'':>9}"
                print(f"{capability:<9}{case:<40}{ours:>9.3f}{eager:>10.3f}{eager / ours:>9.2f}{share}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
