"""Run transformers' own model tests of LLaVA or Qwen3-VL on ETC models: which tests differ with compression enabled.

    python scripts/run_transformers_tests.py --transformers DIR --backbone llava --etc enabled --out enabled.json \
        --baseline stock.json [-- PYTEST_ARGS]

DIR is a transformers source tree (a git checkout of the installed version: `tests/` with
`tests/models/<backbone>/test_modeling_<backbone>.py`, `tests/test_modeling_common.py`, `tests/generation/`, and
`src/transformers` for the pipeline mixin). The script runs that backbone's test file with pytest and, in the model
testers, applies ETC: every `<Backbone>ForConditionalGeneration` in a test class's `all_model_classes` is replaced by a
subclass whose `__init__` builds the model, then calls `apply_etc(self, ETCConfig(num_compression_tokens=1))`, so each
model a test makes (`model_class(config)`, `model_class.from_pretrained(...)`) is an ETC model. The base model classes
(`LlavaModel`, `Qwen3VLModel`) have no ETC and are left as they are.

`--add-mm-token-type-ids`: for a Qwen3-VL test file older than the installed transformers, whose testers give no
`mm_token_type_ids` (which transformers' Qwen3-VL then needs for M-RoPE): add them to the testers' inputs (1 at the
image token, 2 at the video token), in every `--etc` mode alike.

`--etc`: "enabled" (compression on), "disabled" (ETC applied, `model.etc.enabled = False`: must behave exactly as the
original model) or "off" (no patching: transformers' own result in this environment, the baseline). `--out` writes
each test's outcome and first error line as json; `--baseline` (an earlier `--out`) prints the tests whose outcome
differs from it. docs/transformers_compatibility.md lists the differences with compression enabled and why.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import pytest

BACKBONES = {
    "llava": ("transformers.LlavaForConditionalGeneration", "etc_ext.models.llava"),
    "qwen3_vl": ("transformers.Qwen3VLForConditionalGeneration", "etc_ext.models.qwen3_vl"),
}


def etc_test_class(base: type, apply_etc, enabled: bool) -> type:
    """`base` whose models are ETC models (compression `enabled` or not), under `base`'s name."""
    from etc_ext.config import ETCConfig

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        apply_etc(self, ETCConfig(num_compression_tokens=1))
        self.etc.enabled = enabled

    return type(base.__name__, (base,), {"__init__": __init__, "__module__": base.__module__})


def with_mm_token_type_ids(prepare):
    """A tester's `prepare_config_and_inputs_for_common` whose inputs hold `mm_token_type_ids`."""

    def prepare_with_types():
        config, inputs = prepare()
        input_ids = inputs.get("input_ids")
        if input_ids is not None and "mm_token_type_ids" not in inputs:
            images, videos = input_ids == config.image_token_id, input_ids == config.video_token_id
            inputs["mm_token_type_ids"] = images.long() + 2 * videos.long()
        return config, inputs

    return prepare_with_types


def add_mm_token_type_ids(test_class: type) -> None:
    set_up = test_class.setUp

    def setUp(self):
        set_up(self)
        tester = self.model_tester
        tester.prepare_config_and_inputs_for_common = with_mm_token_type_ids(tester.prepare_config_and_inputs_for_common)

    test_class.setUp = setUp


class ETCPlugin:
    """pytest plugin: swaps the model classes of the collected test classes, and records every test's outcome."""

    def __init__(self, backbone: str, etc: str, mm_token_type_ids: bool = False):
        self.backbone, self.etc, self.mm_token_type_ids = backbone, etc, mm_token_type_ids
        self.outcomes: dict = {}

    def pytest_collection_modifyitems(self, items):
        if self.mm_token_type_ids:
            for test_class in {item.cls for item in items if item.cls is not None and hasattr(item.cls, "setUp")}:
                add_mm_token_type_ids(test_class)
        if self.etc == "off":
            return
        import importlib

        class_path, module_name = BACKBONES[self.backbone]
        module_path, class_name = class_path.rsplit(".", 1)
        base = getattr(importlib.import_module(module_path), class_name)
        patched = etc_test_class(base, importlib.import_module(module_name).apply_etc, self.etc == "enabled")
        for test_class in {item.cls for item in items if item.cls is not None}:
            classes = getattr(test_class, "all_model_classes", ())
            test_class.all_model_classes = tuple(patched if c is base else c for c in classes)

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            message = ""
            if report.outcome == "failed":
                message = str(getattr(report.longrepr, "reprcrash", None) and report.longrepr.reprcrash.message)
            elif report.outcome == "skipped" and isinstance(report.longrepr, tuple):
                message = str(report.longrepr[2])
            if report.nodeid not in self.outcomes or report.outcome == "failed":
                self.outcomes[report.nodeid] = {"outcome": report.outcome, "message": message.splitlines()[0][:300]
                                                if message else ""}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transformers", required=True, type=Path, help="a transformers source tree")
    parser.add_argument("--backbone", choices=sorted(BACKBONES), required=True)
    parser.add_argument("--etc", choices=["enabled", "disabled", "off"], required=True)
    parser.add_argument("--add-mm-token-type-ids", action="store_true", help="see the module docstring")
    parser.add_argument("--out", type=Path, help="write each test's outcome here (json)")
    parser.add_argument("--baseline", type=Path, help="an earlier --out: print the tests whose outcome differs")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = parser.parse_args()

    test_file = args.transformers / "tests" / "models" / args.backbone / f"test_modeling_{args.backbone}.py"
    if not test_file.is_file():
        parser.error(f"{test_file} does not exist: --transformers must be a transformers source tree")
    os.chdir(args.transformers)  # transformers' tests import `tests.*` and read files relative to the tree
    sys.path.insert(0, str(args.transformers))
    plugin = ETCPlugin(args.backbone, args.etc, args.add_mm_token_type_ids)
    code = pytest.main([str(test_file.relative_to(args.transformers)), "-q", "-p", "no:cacheprovider",
                        *args.pytest_args], plugins=[plugin])  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(plugin.outcomes, indent=1, sort_keys=True))
    if args.baseline:
        baseline = json.loads(args.baseline.read_text())
        for nodeid, result in sorted(plugin.outcomes.items()):
            before = baseline.get(nodeid, {}).get("outcome")
            if result["outcome"] != before:
                print(f"{nodeid.split('::')[-1]}: {before} -> {result['outcome']}  {result['message']}")
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
