"""The `etc-ext` command.

```
etc-ext train --model DIR --data JSON --output DIR [--etc-config JSON] [--lora] ...   fine-tune (torchrun for DDP/FSDP)
etc-ext eval  --model DIR --data JSON [--etc DIR] [--json [PATH]] ...                 accuracy, tokens, KV cache, times
etc-ext demo  [--output DIR] [--json PATH]                                            the offline demo (table, plot)
etc-ext bench [--quick] [--threads N] [--sections ...]                              benchmark tables, JSON, plots
etc-ext export-vllm --model DIR [--etc DIR] --out DIR                                a folder vLLM serves (plugin)
etc-ext <command> --help                                                             every option
```

Under torchrun: `torchrun --nproc-per-node 4 -m etc_ext.cli train ...` (or `torchrun --nproc-per-node 4 $(which
etc-ext) train ...`).

Adding a subcommand is one function decorated with `@subcommand`: it receives argparse's subparsers, adds its parser
and sets `handler` (a function of the parsed arguments returning an exit code). Options of an arguments dataclass
(`TrainingArguments`, `EvalArguments`) come from its fields' metadata through `add_dataclass_arguments`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import types
import typing
from collections.abc import Callable


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def subcommand(function: Callable[[argparse._SubParsersAction], None]):
    """Registers a function that adds one subcommand to the `etc-ext` parser."""
    SUBCOMMANDS.append(function)
    return function


# ------------------------------------------------------------------------------------------- dataclass -> argparse
def _unwrap_optional(annotation):
    """`int | None` -> (int, True); `list[str]` -> (list[str], False)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Adds one option per field of the dataclass `cls`: `--field-name` (or the field's `flag` metadata), typed from
    the annotation, with the field's `help`, `choices` and `required` metadata, grouped by its `group` metadata.
    Booleans that default to False are switches (`--lora`); those that default to True get a `--no-` form too."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        group_name = meta.get("group", "options")
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name)
        group = groups[group_name]
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        annotation, _ = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kwargs = {"dest": f.name, "help": meta.get("help", "")}
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
            kwargs["default"] = default
        elif typing.get_origin(annotation) is list:
            (item_type,) = typing.get_args(annotation)
            kwargs.update(type=item_type, nargs="*", default=default)
        else:
            kwargs.update(type=annotation, default=default)
            if "choices" in meta:
                kwargs["choices"] = meta["choices"]
            if meta.get("required"):
                kwargs["required"] = True
            for key in ("nargs", "const"):
                if key in meta:
                    kwargs[key] = meta[key]
            if not meta.get("choices"):
                kwargs["metavar"] = meta.get("metavar") or {int: "N", float: "X"}.get(annotation, "TEXT")
        if kwargs.get("help") and kwargs.get("default") not in (None, False, []) and not meta.get("required"):
            kwargs["help"] += f" (default: {default})"
        if kwargs.get("metavar") is None:
            kwargs.pop("metavar", None)
        group.add_argument(flag, **kwargs)


def dataclass_from_namespace(cls: type, namespace: argparse.Namespace):
    """The dataclass `cls` built from the parsed options `add_dataclass_arguments` added."""
    return cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)})


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("etc_ext").setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:  # transformers' own bars (loading and writing weights)
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


# ------------------------------------------------------------------------------------------- subcommands
@subcommand
def train_command(subparsers) -> None:
    from .train import TrainingArguments

    parser = subparsers.add_parser(
        "train",
        help="fine-tune a VLM with ETC (or the full-token baseline) on LLaVA-format data",
        description=(
            "Fine-tune a Hugging Face VLM (a save_pretrained folder with its processor) on LLaVA-format "
            "conversations: with --etc-config, ETC's compression tokens and distillation loss; without, the plain "
            "model (full-token baseline). Runs alone or under torchrun (DDP, or FSDP with --fsdp); writes "
            "metrics.jsonl, atomic checkpoints (--resume auto continues exactly) and the trained model in "
            "OUTPUT/final."
        ),
        epilog="Several processes: torchrun --nproc-per-node N -m etc_ext.cli train ...",
    )
    add_dataclass_arguments(parser, TrainingArguments)

    def handler(namespace) -> int:
        from .train import train

        summary = train(dataclass_from_namespace(TrainingArguments, namespace))
        if not summary["is_main"]:
            return 0
        if summary.get("final_dir"):
            print(f"trained {summary['global_step']} steps; model saved to {summary['final_dir']}")
        else:
            print(f"stopped at step {summary['global_step']}; checkpoint {summary['last_checkpoint']}")
        return 0

    parser.set_defaults(handler=handler)


@subcommand
def eval_command(subparsers) -> None:
    from .evaluate import EvalArguments

    parser = subparsers.add_parser(
        "eval",
        help="evaluate a model (plain or ETC) on LLaVA-format data: accuracy, visual tokens, KV cache, timings",
        description=(
            "Generate answers for a LLaVA-format eval file (the last gpt turn of each sample is the reference) and "
            "report exact-match and multiple-choice accuracy, the visual tokens the decoder sees, the KV-cache "
            "bytes after the prefill, and prefill and decode times. --model is a save_pretrained folder, or the "
            "final/ folder of an `etc-ext train` run (ETC parts included)."
        ),
    )
    add_dataclass_arguments(parser, EvalArguments)

    def handler(namespace) -> int:
        from .evaluate import format_report, run_eval

        args = dataclass_from_namespace(EvalArguments, namespace)
        result = run_eval(args)
        if args.json is None:
            print(format_report(result))
        elif args.json == "-":
            print(json.dumps(result, indent=1))
        else:
            print(f"wrote {args.json}")
        return 0

    parser.set_defaults(handler=handler)


@subcommand
def export_vllm_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "export-vllm",
        help="write a model folder that vLLM serves with etc-ext's plugin (`vllm serve DIR`)",
        description=(
            "Export a LLaVA model, with or without ETC, for vLLM: the Hugging Face folder plus the compression "
            "tokens and the settings etc-ext's vLLM plugin reads (M slots per image in the prompt and the KV cache, "
            "ETC's positions). --model is a save_pretrained folder or the final/ folder of an `etc-ext train` run; "
            "without ETC parts the folder serves the model without compression (N slots per image)."
        ),
    )
    parser.add_argument("--model", required=True, help="model folder (or an ETC training run's final/ folder)")
    parser.add_argument("--etc", help="folder of the ETC parts, when they are not in --model")
    parser.add_argument("--base-model", help="base model folder of an ETC run, when training_info.json is stale")
    parser.add_argument("--out", required=True, help="the folder to write (created; files of the same names replaced)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="dtype of the written weights (default: float32)")  # fmt: skip

    def handler(namespace) -> int:
        import torch

        from .vllm.export import export_for_vllm

        settings = export_for_vllm(namespace.model, namespace.out, namespace.etc, getattr(torch, namespace.dtype),
                                   base_model=namespace.base_model)  # fmt: skip
        slots = settings["num_compression_tokens"] or settings["num_visual_tokens"]
        print(f"wrote {namespace.out}: {slots} prompt and KV-cache slots per image "
              f"({settings['num_visual_tokens']} visual tokens); serve it with `vllm serve {namespace.out}`")  # fmt: skip
        return 0

    parser.set_defaults(handler=handler)


@subcommand
def demo_command(subparsers) -> None:
    from .demo import recipe

    parser = subparsers.add_parser(
        "demo",
        help="offline demo: ETC vs the full model and training-free compressors on a tiny LLaVA (CPU, minutes)",
        description=(
            "Evaluate the shipped tiny LLaVA (full tokens), its ETC variants (M = 1, 4, 16 with VID; M = 1 with "
            "MSE and with no reconstruction) and the training-free compressors at K = 1, 4, 16 on held-out shapes "
            "VQA questions, each alone and as a follow-up question in one conversation (the image compressed once, "
            "the cache continued). Prints one table (single-question accuracy with its 95 % interval, follow-up "
            "accuracy, visual tokens kept, KV-cache bytes after the prefill, prefill time) and which of the targets "
            "it met, writes a plot and optionally json. No download; the checkpoints ship with the package "
            "(python -m etc_ext.demo.reproduce retrains them)."
        ),
    )
    parser.add_argument("--output", default="outputs/demo", metavar="DIR",
                        help="folder for the test data and the plot (default: outputs/demo)")  # fmt: skip
    parser.add_argument("--json", metavar="PATH", help="write every number as json to this file")
    parser.add_argument("--num-test-images", type=int, default=recipe.NUM_TEST_IMAGES, metavar="N",
                        help=f"held-out test images, two questions each (default: {recipe.NUM_TEST_IMAGES})")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=32, metavar="N", help="prompts per generate() (default: 32)")
    parser.add_argument("--rows", nargs="+", metavar="KEY",
                        help="run only these rows (full, etc-m1-vid, ..., mean-k4, ...)")  # fmt: skip
    parser.add_argument("--checkpoints", metavar="DIR", help="checkpoint folder (default: the shipped ones)")
    parser.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the plot")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")

    def handler(namespace) -> int:
        import torch

        from .demo.run import run_demo

        if namespace.num_test_images < 1 or namespace.batch_size < 1:
            raise ValueError("--num-test-images and --batch-size must be >= 1")
        if namespace.threads:
            torch.set_num_threads(namespace.threads)
        run_demo(
            namespace.output, json_path=namespace.json, checkpoints=namespace.checkpoints,
            num_test_images=namespace.num_test_images, batch_size=namespace.batch_size, rows=namespace.rows,
            plot=not namespace.no_plot, progress=not namespace.no_progress,
        )  # fmt: skip
        return 0

    parser.set_defaults(handler=handler)


@subcommand
def bench_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmarks: ops vs PyTorch, end to end (prefill, decode, KV bytes), memory of the target, projections",
        description=(
            "Print the benchmark tables and write bench.json, e2e.png (and ops.json, ops.png) under --out: the ops "
            "against the eager reference and torch.compile (from a source checkout, bench/run.py), generate() on "
            "tiny LLaVA and Qwen3-VL models (full, ETC M=1/4/16, the baselines), the peak memory of ETC's target "
            "scores vs output_attentions, and analytic projections to LLaVA-1.5-7B and Qwen3-VL-2B next to the "
            "paper's figures."
        ),
        epilog="On a shared CPU pass --threads 1: intra-op threads on a loaded machine mostly measure contention.",
    )
    from .bench import add_arguments

    add_arguments(parser)

    def handler(namespace) -> int:
        from .bench import find_op_section, run

        run(namespace, find_op_section())
        return 0

    parser.set_defaults(handler=handler)


# ------------------------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="etc-ext",
        description="ETC (Extreme Token Compression) for vision-language models: training, evaluation, demo, "
        "benchmarks.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of errors")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    namespace = parser.parse_args(argv)
    if getattr(namespace, "handler", None) is None:
        parser.print_help()
        return 2
    _setup_logging(verbose=not namespace.quiet)
    from .checkpointing import CheckpointError

    try:
        return namespace.handler(namespace)
    except (ValueError, FileNotFoundError, CheckpointError, NotImplementedError) as error:
        # these errors say what is wrong with the user's inputs: show the message, the traceback on request
        if namespace.traceback:
            raise
        print(f"etc-ext {namespace.command}: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
