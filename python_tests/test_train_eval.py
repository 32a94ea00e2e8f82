"""Tests of the evaluation pipeline (etc_ext.evaluate, `etc-ext eval`) and of the `etc-ext` command line."""

import json
import os

import pytest
import torch

from etc_ext.cli import build_parser, main as cli_main
from etc_ext.evaluate import choice_letter, normalize_answer, parse_options, score_prediction


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MC_PROMPT = (
    "<image>\nWhich shape is in row 1, column a?\nA. circle\nB. square\n(C) cross\nAnswer with the option's letter."
)


# ------------------------------------------------------------------------------------------------ scoring
def test_normalize_answer():
    assert normalize_answer("  Red. ") == "red"
    assert normalize_answer('"Two  circles!"') == "two circles"
    assert normalize_answer("b3") == "b3"


def test_parse_options_and_choice_letter():
    options = parse_options(MC_PROMPT)
    assert options == {"A": "circle", "B": "square", "C": "cross"}
    assert parse_options("What color is it?") == {}
    for text, expected in [("B", "B"), ("(B)", "B"), ("B. square", "B"), ("b", None), ("square", "B"),
                           ("The answer is C.", "C"), ("D", None), ("triangle", None), ("", None)]:  # fmt: skip
        assert choice_letter(text, options) == expected, text


def test_score_prediction():
    assert score_prediction("B.", "B", MC_PROMPT) == {"kind": "multiple_choice", "correct": True, "choice": "B"}
    assert score_prediction("circle", "B", MC_PROMPT)["correct"] is False
    assert score_prediction("Square", "square", MC_PROMPT)["kind"] == "multiple_choice"  # reference by option text
    assert score_prediction("Red", "red", "<image>\nWhat color?") == {"kind": "exact_match", "correct": True,
                                                                      "choice": None}  # fmt: skip
    assert score_prediction("red circle", "red", "<image>\nWhat color?")["correct"] is False


# ------------------------------------------------------------------------------------------------ eval
@pytest.fixture(scope="module")
def eval_file(shapes_data, tmp_path_factory):
    """The shapes test split plus one multiple-choice sample (prompts of different lengths: left padding)."""
    with open(os.path.join(shapes_data, "test.json")) as f:
        samples = json.load(f)
    samples.append({
        "id": "mc-0", "image": samples[0]["image"], "question_types": ["shape_mc"],
        "conversations": [{"from": "human", "value": MC_PROMPT}, {"from": "gpt", "value": "A"}],
    })  # fmt: skip
    path = tmp_path_factory.mktemp("eval") / "eval.json"
    path.write_text(json.dumps(samples))
    return path


def test_eval_json_reports_accuracy_tokens_cache_and_times(tiny_llava_dir, shapes_data, eval_file, tmp_path):
    from transformers import AutoConfig

    out, predictions = tmp_path / "result.json", tmp_path / "predictions.jsonl"
    argv = ["-q", "eval", "--model", str(tiny_llava_dir), "--data", str(eval_file), "--image-root", str(shapes_data),
            "--batch-size", "4", "--max-new-tokens", "3", "--json", str(out), "--predictions", str(predictions),
            "--no-progress"]  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli_main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    expected = ["accuracy", "exact_match", "multiple_choice_accuracy", "num_samples", "per_type", "visual_tokens",
                "visual_tokens_input", "kv_cache_bytes", "kv_cache_tokens", "prefill_ms", "decode_ms_per_token",
                "prompt_tokens", "generated_tokens", "batch_size", "device", "dtype", "model", "data", "etc"]
    assert not set(expected) - set(result)
    assert result["num_samples"] == 9 and result["num_multiple_choice"] == 1 and result["num_exact_match"] == 8
    assert 0.0 <= result["accuracy"] <= 1.0
    assert set(result["per_type"]) >= {"shape_mc"} and sum(v["count"] for v in result["per_type"].values()) == 9
    # the plain model: every image token reaches the decoder, one cache entry per prompt token (padding excluded)
    assert result["visual_tokens"] == result["visual_tokens_input"] == 144
    assert result["kv_cache_tokens"] == result["prompt_tokens"]
    text = AutoConfig.from_pretrained(tiny_llava_dir).text_config
    head_dim = text.hidden_size // text.num_attention_heads
    bytes_per_token = text.num_hidden_layers * 2 * text.num_key_value_heads * head_dim * 4  # K and V, float32
    assert result["kv_cache_bytes"] == pytest.approx(result["kv_cache_tokens"] * bytes_per_token)
    assert result["prefill_ms"] > 0 and result["decode_ms_per_token"] > 0
    assert result["etc"] is None and result["num_compression_tokens"] is None
    lines = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(lines) == 9 and {"id", "prediction", "answer", "correct", "kind", "type"} <= set(lines[0])
    assert sum(p["correct"] for p in lines) / 9 == pytest.approx(result["accuracy"])


def test_eval_prints_json_to_stdout(tiny_llava_dir, shapes_data, eval_file, capsys):
    argv = ["-q", "eval", "--model", str(tiny_llava_dir), "--data", str(eval_file), "--image-root", str(shapes_data),
            "--num-samples", "2", "--max-new-tokens", "1", "--warmup", "0", "--json", "--no-progress"]  # fmt: skip
    assert cli_main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_samples"] == 2 and result["decode_ms_per_token"] is None  # one token: no decoding step


def test_eval_of_a_missing_model_fails_clearly(shapes_data, eval_file, tmp_path, capsys):
    argv = ["eval", "--model", str(tmp_path / "nowhere"), "--data", str(eval_file)]
    assert cli_main(argv) == 1
    assert "no config.json" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_refuses_unusable_options_in_one_line(tiny_llava_dir, eval_file, tmp_path, capsys):
    """Options this machine cannot honour, or that are wrong, end in one line naming the option (no traceback) and
    before anything is trained or written."""
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    train = ["train", "--model", str(tiny_llava_dir), "--data", str(eval_file), "--max-steps", "1"]
    cases = [
        (train + ["--output", str(a_file)], f"--output {a_file} is a file"),
        (train + ["--output", str(tmp_path / "o4"), "--save-total-limit", "-1"], "save_total_limit must be >= 0"),
    ]  # fmt: skip
    if not torch.cuda.is_available():  # what a machine without a GPU cannot run
        cases += [
            (train + ["--output", str(tmp_path / "o1"), "--device", "cuda"], "--device cuda was asked for"),
            (train + ["--output", str(tmp_path / "o2"), "--attn-implementation", "flash_attention_2"],
             "--attn-implementation flash_attention_2 needs the flash-attn package"),
            (["eval", "--model", str(tiny_llava_dir), "--data", str(eval_file), "--device", "cuda"],
             "--device cuda was asked for"),
        ]  # fmt: skip
    for argv, message in cases:
        assert cli_main(argv) == 1, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # no output folder made


def test_cli_help_lists_the_subcommands_and_options():
    parser = build_parser()
    help_text = parser.format_help()
    assert "train" in help_text and "eval" in help_text
    subparsers = next(a for a in parser._actions if a.dest == "command")
    train_help = subparsers.choices["train"].format_help()
    for option in ("--model", "--data", "--image-root", "--output", "--etc-config", "--lora", "--resume", "--fsdp",
                   "--skip-bad", "--grad-accum", "--save-steps", "--precision"):  # fmt: skip
        assert option in train_help, option
    eval_help = subparsers.choices["eval"].format_help()
    for option in ("--model", "--etc", "--data", "--json", "--batch-size", "--max-new-tokens"):
        assert option in eval_help, option


def test_cli_parses_into_training_arguments():
    from etc_ext.cli import dataclass_from_namespace
    from etc_ext.train import TrainingArguments

    namespace = build_parser().parse_args(
        ["train", "--model", "m", "--data", "d.json", "--output", "o", "--lora", "--no-shuffle", "--batch-size", "3",
         "--lora-modules-to-save", "--resume", "auto"]  # fmt: skip
    )
    args = dataclass_from_namespace(TrainingArguments, namespace)
    assert (args.model, args.data, args.output_dir, args.per_device_batch_size) == ("m", "d.json", "o", 3)
    assert args.lora and not args.shuffle and args.lora_modules_to_save == [] and args.resume == "auto"
    assert args.etc_config is None and args.save_total_limit == 2
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--data", "d.json", "--output", "o"])  # --model is required


def test_console_script_entry_point(capsys):
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts["etc-ext"] == "etc_ext.cli:main"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--help"])
    assert exit_info.value.code == 0 and "usage: etc-ext" in capsys.readouterr().out
    assert cli_main([]) == 2  # no subcommand: the help, and a usage error code


def test_tiny_model_command(tmp_path, capsys):
    from transformers import AutoConfig

    from etc_ext.models.tiny import main as tiny_main

    tiny_main(["--out", str(tmp_path / "tiny"), "--text-layers", "1", "--text-hidden-size", "32"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "tiny")
    config = AutoConfig.from_pretrained(tmp_path / "tiny")
    assert (config.text_config.num_hidden_layers, config.text_config.hidden_size) == (1, 32)
    assert os.path.isfile(tmp_path / "tiny" / "processor_config.json")
