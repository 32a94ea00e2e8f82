"""torch.compile on a whole ETC model (tiny random LLaVA, CPU): first-call time, graphs, graph breaks, and what a
second call with the same shapes compiles.

    OMP_NUM_THREADS=1 python scripts/measure_compile.py forward     # compiled = torch.compile(model); compiled(**inputs)
    OMP_NUM_THREADS=1 python scripts/measure_compile.py generate    # model.forward = torch.compile(model.forward, dynamic=True)

Run from the repository root (it builds the model with the test suite's helpers). The numbers go to the README's
transformers-behaviour section.
"""

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python_tests"))

import test_llava_etc as llava_helpers  # noqa: E402
from etc_ext.models import llava  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["forward", "generate"])
    parser.add_argument("--backend", default="inductor")
    args = parser.parse_args()

    model = llava.apply_etc(llava_helpers.tiny_llava(), llava_helpers.small_config())
    inputs, _ = llava_helpers.make_batch([[2, "I", 5]])
    settings = dict(max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        if args.mode == "generate":
            eager = model.generate(**inputs, **settings)
            model.forward = torch.compile(model.forward, dynamic=True, backend=args.backend)

            def run():
                return model.generate(**inputs, **settings)
        else:
            eager = model(**inputs, use_cache=False).logits
            compiled = torch.compile(model, backend=args.backend)

            def run():
                return compiled(**inputs, use_cache=False).logits

        torch._dynamo.reset()
        counters = torch._dynamo.utils.counters
        counters.clear()
        start = time.perf_counter()
        first = run()
        first_seconds = time.perf_counter() - start
        graphs = counters["stats"]["unique_graphs"]
        breaks = Counter()
        for reason, count in counters["graph_break"].items():
            breaks[reason.splitlines()[0]] += count
        start = time.perf_counter()
        run()
        second_seconds = time.perf_counter() - start
        new_graphs = counters["stats"]["unique_graphs"] - graphs
    same = torch.equal(first, eager) if args.mode == "generate" else bool(torch.allclose(first, eager, atol=1e-5))
    print(
        f"{args.mode}: first call {first_seconds:.1f} s, {graphs} graphs, {sum(breaks.values())} graph breaks; "
        f"second call {second_seconds:.2f} s, {new_graphs} new graphs; same as eager: {same}"
    )
    for reason, count in breaks.most_common():
        print(f"  {count} x {reason}")


if __name__ == "__main__":
    main()
