"""Tests of the training pipeline (etc_ext.train, etc_ext.checkpointing, etc_ext.distributed) on a tiny random LLaVA,
on the CPU: loss normalisation across processes (torchrun, gloo), exact resume after SIGKILL, damaged checkpoints,
bad samples, LoRA, FSDP.

The reference run trains 12 steps of global batch 4 (1 process x batch 2 x 2 accumulation steps, 16 samples: three
epochs) with a checkpoint every 4 steps; the other runs are compared with it.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from etc_ext.checkpointing import CheckpointError, latest_checkpoint, list_checkpoints
from etc_ext.cli import main as cli_main


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12
ETC_CONFIG = json.dumps(
    {"num_compression_tokens": 2, "decoder_hidden_size": 32, "decoder_num_layers": 1, "vid_weight": 1e-3}
)


def run_env():
    """Environment of training subprocesses: this source tree importable, one thread each (2 shared cores)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def train_argv(model_dir, data_dir, output, *extra, batch_size=2, grad_accum=2):
    return [
        "train", "--model", str(model_dir), "--data", os.path.join(data_dir, "train.json"), "--output", str(output),
        "--max-steps", str(STEPS), "--batch-size", str(batch_size), "--grad-accum", str(grad_accum), "--lr", "1e-3",
        "--warmup-steps", "2", "--save-steps", "4", "--save-total-limit", "0", "--no-progress", *extra,
    ]  # fmt: skip


def run_torchrun(runs, procs=2, timeout=300):
    """Runs each `etc-ext` argv of `runs` in turn in every process of one torchrun job (gloo, `procs` processes)."""
    worker = os.path.join(ROOT, "python_tests", "torchrun_train_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", worker]
    result = subprocess.run(
        [*command, json.dumps([[str(a) for a in argv] for argv in runs])], env=run_env(), capture_output=True,
        text=True, timeout=timeout,
    )  # fmt: skip
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result.stdout + result.stderr


def run_in_process(argv):
    """`etc-ext ...` in this process, single-threaded like the subprocesses (bitwise-comparable results)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cli_main(["-q", *argv])
    finally:
        torch.set_num_threads(threads)


def read_metrics(output):
    with open(os.path.join(output, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def final_weights(output):
    return load_file(os.path.join(output, "final", "model.safetensors"))


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for name in a:
        if atol == 0.0:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


@pytest.fixture(scope="module")
def reference_run(tiny_llava_dir, shapes_data, tmp_path_factory):
    output = tmp_path_factory.mktemp("reference") / "run"
    assert run_in_process(train_argv(tiny_llava_dir, shapes_data, output)) == 0
    return output


@pytest.fixture(scope="module")
def torchrun_runs(tiny_llava_dir, shapes_data, tmp_path_factory):
    """One torchrun job of 2 gloo processes: a DDP run, an FSDP run, and an FSDP run resumed from the latter's
    checkpoint at step 8, each with 2 processes x batch 2 = the reference's global batch of 4."""
    root = tmp_path_factory.mktemp("torchrun")
    outputs = {"ddp": root / "ddp", "fsdp": root / "fsdp", "fsdp_resumed": root / "fsdp_resumed"}
    fsdp_checkpoint = outputs["fsdp"] / "checkpoints" / "checkpoint-00000008"
    runs = [
        train_argv(tiny_llava_dir, shapes_data, outputs["ddp"], grad_accum=1),
        train_argv(tiny_llava_dir, shapes_data, outputs["fsdp"], "--fsdp", grad_accum=1),
        train_argv(tiny_llava_dir, shapes_data, outputs["fsdp_resumed"], "--fsdp", "--resume", fsdp_checkpoint,
                   grad_accum=1),
    ]  # fmt: skip
    outputs["etc_ddp"], outputs["etc_fsdp"] = root / "etc_ddp", root / "etc_fsdp"
    runs.append(etc_argv(tiny_llava_dir, shapes_data, outputs["etc_ddp"], grad_accum=1))
    runs.append(etc_argv(tiny_llava_dir, shapes_data, outputs["etc_fsdp"], "--fsdp", grad_accum=1))
    run_torchrun(runs)
    return outputs


def etc_argv(model_dir, data_dir, output, *extra, steps=4, grad_accum=2):
    """ETC fine-tuning (M = 2 compression tokens, a small VID decoder), `steps` steps of global batch 4."""
    argv = train_argv(model_dir, data_dir, output, "--etc-config", ETC_CONFIG, "--save-steps", "2", *extra,
                      grad_accum=grad_accum)  # fmt: skip
    argv[argv.index("--max-steps") + 1] = str(steps)
    return argv


@pytest.fixture(scope="module")
def etc_run(tiny_llava_dir, shapes_data, tmp_path_factory):
    """ETC fine-tuning of the whole language model (frozen teacher), 4 steps, checkpoints at steps 2 and 4."""
    output = tmp_path_factory.mktemp("etc") / "run"
    assert run_in_process(etc_argv(tiny_llava_dir, shapes_data, output)) == 0
    return output


# ------------------------------------------------------------------------------------------------ tiny model
def test_tiny_llava_matches_the_demo_processor(tiny_llava_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

    from etc_ext.data import num_image_tokens

    model = AutoModelForImageTextToText.from_pretrained(tiny_llava_dir)
    processor = AutoProcessor.from_pretrained(tiny_llava_dir)
    assert isinstance(model, LlavaForConditionalGeneration)
    config = model.config
    assert num_image_tokens(processor) == 144
    assert (config.vision_config.image_size, config.vision_config.patch_size) == (168, 14)
    assert config.vision_feature_select_strategy == "default"
    assert config.image_token_id == processor.tokenizer.image_token_id
    assert config.text_config.vocab_size == len(processor.tokenizer)
    # one image becomes 144 image tokens, and the model accepts them
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.new("RGB", (168, 168), "red")], return_tensors="pt")
    assert int((inputs["input_ids"] == config.image_token_id).sum()) == 144
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(processor.tokenizer))


# ------------------------------------------------------------------------------------------------ outputs
def test_reference_run_outputs(reference_run, tiny_llava_dir):
    from transformers import AutoModelForImageTextToText

    records = read_metrics(reference_run)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for record in records:
        for key in ("loss", "ce", "lr", "grad_norm", "tokens_per_s", "tokens", "label_tokens", "samples", "epoch"):
            assert key in record, key
        assert record["samples"] == 4 and record["tokens_per_s"] > 0 and record["label_tokens"] > 0
        assert record["loss"] == record["ce"]  # no ETC: the loss is the cross-entropy
    assert records[-1]["epoch"] == pytest.approx(3.0)
    # warmup then cosine decay
    lrs = [r["lr"] for r in records]
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(1e-3) and all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert records[-1]["loss"] < records[0]["loss"]

    checkpoints = list_checkpoints(os.path.join(reference_run, "checkpoints"))
    assert [step for step, _ in checkpoints] == [4, 8, 12]
    names = set(os.listdir(checkpoints[0][1]))
    assert {"manifest.json", "model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state_0.pt"} <= names
    assert {"trainer_state.json"} <= names and not any(n.endswith(".tmp") for n in os.listdir(reference_run))

    final = os.path.join(reference_run, "final")
    with open(os.path.join(final, "training_info.json")) as f:
        info = json.load(f)
    assert info["base_model"] == os.path.abspath(tiny_llava_dir) and info["global_step"] == STEPS
    trained = AutoModelForImageTextToText.from_pretrained(final)  # a complete model folder, a valid --model
    start = AutoModelForImageTextToText.from_pretrained(tiny_llava_dir)
    trained_state, start_state = trained.state_dict(), start.state_dict()
    vision = [n for n in start_state if "vision_tower" in n]
    assert vision and all(torch.equal(trained_state[n], start_state[n]) for n in vision)  # frozen
    assert not torch.equal(trained_state["lm_head.weight"], start_state["lm_head.weight"])


# ------------------------------------------------------------------------------------------------ DDP
def test_two_processes_follow_the_same_loss_curve(reference_run, torchrun_runs):
    """2 processes x batch 2 (no accumulation) = the reference's global batch of 4: same samples per step, same
    loss (normalised by the global number of label tokens), same weights up to float32 summation order."""
    output = torchrun_runs["ddp"]
    ddp, reference = read_metrics(output), read_metrics(reference_run)
    assert [r["step"] for r in ddp] == list(range(1, STEPS + 1))
    for a, b in zip(ddp, reference):
        assert a["samples"] == b["samples"] == 4 and a["label_tokens"] == b["label_tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert {"rng_state_0.pt", "rng_state_1.pt"} <= set(os.listdir(output / "checkpoints" / "checkpoint-00000004"))
    assert_same_weights(final_weights(output), final_weights(reference_run), atol=1e-5)


# ------------------------------------------------------------------------------------------------ resume
def test_sigkill_then_resume_gives_the_uninterrupted_weights(reference_run, tiny_llava_dir, shapes_data, tmp_path):
    output = tmp_path / "killed"
    argv = train_argv(tiny_llava_dir, shapes_data, output)
    process = subprocess.Popen(
        [sys.executable, "-m", "etc_ext.cli", "-q", *argv], env=run_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    first = output / "checkpoints" / "checkpoint-00000004"
    deadline = time.monotonic() + 180
    try:
        while not first.is_dir():
            if process.poll() is not None:
                pytest.fail(f"training ended before its first checkpoint:\n{process.stdout.read()[-4000:]}")
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (output / "final").exists(), "the run finished before it was killed: the test proves nothing"
    completed = [step for step, _ in list_checkpoints(output / "checkpoints")]
    assert completed and max(completed) < STEPS

    assert run_in_process([*argv, "--resume", "auto"]) == 0
    assert_same_weights(final_weights(output), final_weights(reference_run))
    resumed, reference = read_metrics(output), read_metrics(reference_run)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))  # the killed run's extra records were dropped
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]


def test_sigterm_saves_a_checkpoint_and_stops(reference_run, tiny_llava_dir, shapes_data, tmp_path, monkeypatch):
    """SIGTERM (preemption): the run finishes its step, writes a checkpoint, stops; resuming completes it. The
    signal is sent to this process during step 5, through the real handler."""
    from etc_ext.train import Trainer

    original = Trainer._training_step
    steps = []

    def step_then_terminate(self, group):
        metrics = original(self, group)
        steps.append(1)
        if len(steps) == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return metrics

    output = tmp_path / "terminated"
    argv = train_argv(tiny_llava_dir, shapes_data, output)
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_training_step", step_then_terminate)
        assert run_in_process(argv) == 0
    assert len(steps) == 5 and not (output / "final").exists()
    assert [step for step, _ in list_checkpoints(output / "checkpoints")] == [4, 5]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed after training
    assert run_in_process([*argv, "--resume", "auto"]) == 0
    assert_same_weights(final_weights(output), final_weights(reference_run))


def test_truncated_checkpoint_fails_clearly_and_the_previous_one_resumes(
    reference_run, tiny_llava_dir, shapes_data, tmp_path
):
    output = tmp_path / "damaged"
    os.makedirs(output / "checkpoints")
    for step in (4, 8):
        name = f"checkpoint-{step:08d}"
        shutil.copytree(reference_run / "checkpoints" / name, output / "checkpoints" / name)
    damaged = output / "checkpoints" / "checkpoint-00000008" / "model.safetensors"
    with open(damaged, "r+b") as f:
        f.truncate(os.path.getsize(damaged) // 2)

    with pytest.raises(CheckpointError) as error:
        latest_checkpoint(output / "checkpoints")
    message = str(error.value)
    assert "checkpoint-00000008" in message and "model.safetensors" in message and "truncated" in message
    assert "checkpoint-00000004" in message  # names the usable previous checkpoint
    # the CLI refuses to resume from it, with the same message and no traceback
    argv = train_argv(tiny_llava_dir, shapes_data, output)
    assert run_in_process([*argv, "--resume", "auto"]) == 1

    # a damaged file whose size matches its manifest (rewritten in place) fails when loaded, also clearly
    manifest_path = damaged.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["model.safetensors"] = os.path.getsize(damaged)
    manifest_path.write_text(json.dumps(manifest))
    from etc_ext.train import Trainer, TrainingArguments
    from etc_ext.distributed import DistributedContext

    args = TrainingArguments(
        model=str(tiny_llava_dir), data=os.path.join(shapes_data, "train.json"), output_dir=str(output),
        max_steps=STEPS, per_device_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-3, warmup_steps=2,
        save_steps=4, save_total_limit=0, progress=False, resume=str(damaged.parent),
    )  # fmt: skip
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        Trainer(args, DistributedContext())._resume()

    # the previous checkpoint is intact: resuming from it reproduces the reference run
    shutil.rmtree(damaged.parent)
    assert run_in_process([*argv, "--resume", str(output / "checkpoints" / "checkpoint-00000004")]) == 0
    assert_same_weights(final_weights(output), final_weights(reference_run))


def test_incomplete_checkpoint_folders_are_ignored_or_refused(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "checkpoint-00000010.tmp").mkdir(parents=True)  # a writer killed before its rename
    assert latest_checkpoint(root) is None
    (root / "checkpoint-00000020").mkdir()  # no manifest: never completed
    with pytest.raises(CheckpointError, match="no manifest.json"):
        latest_checkpoint(root)


# ------------------------------------------------------------------------------------------------ bad samples
def _bad_samples_file(shapes_data, tmp_path):
    """train.json plus a sample with a missing image, one with a placeholder but no image, and one whose image file
    exists but is not an image (first, so that an unshuffled run loads it)."""
    with open(os.path.join(shapes_data, "train.json")) as f:
        samples = json.load(f)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png")
    conversation = samples[0]["conversations"]
    bad = [
        {"id": "corrupt-image", "image": str(corrupt), "conversations": conversation},
        {"id": "missing-image", "image": "images/train/does-not-exist.png", "conversations": conversation},
        {"id": "no-image", "conversations": conversation},
    ]
    path = tmp_path / "with_bad.json"
    path.write_text(json.dumps(bad + samples))
    return path


def test_bad_samples_fail_clearly_or_are_skipped(tiny_llava_dir, shapes_data, tmp_path, caplog):
    from etc_ext.data import BadSampleError
    from etc_ext.train import TrainingArguments, train

    data = _bad_samples_file(shapes_data, tmp_path)
    common = dict(
        model=str(tiny_llava_dir), data=str(data), image_root=str(shapes_data), max_steps=2,
        per_device_batch_size=2, shuffle=False, save_steps=0, progress=False,
    )  # fmt: skip
    with pytest.raises(BadSampleError, match="missing-image.*not found"):
        train(TrainingArguments(**common, output_dir=str(tmp_path / "strict")))

    summary = train(TrainingArguments(**common, output_dir=str(tmp_path / "skip"), skip_bad=True))
    assert summary["num_skipped"] == 2 and summary["global_step"] == 2
    assert "corrupt-image" in caplog.text  # unreadable at load time: replaced by the next sample, with a warning
    assert os.path.isfile(tmp_path / "skip" / "final" / "model.safetensors")

    only_bad = tmp_path / "only_bad.json"
    only_bad.write_text(json.dumps(json.loads(data.read_text())[1:3]))
    with pytest.raises(ValueError, match="no usable samples"):
        train(TrainingArguments(**{**common, "data": str(only_bad)}, output_dir=str(tmp_path / "none"),
                                skip_bad=True))  # fmt: skip


# ------------------------------------------------------------------------------------------------ LoRA
def test_lora_trains_adapters_and_saves_a_merged_model(tiny_llava_dir, shapes_data, tmp_path):
    from transformers import AutoModelForImageTextToText

    output = tmp_path / "lora"
    argv = train_argv(tiny_llava_dir, shapes_data, output, "--lora", "--lora-rank", "4", "--gradient-checkpointing")
    argv[argv.index("--max-steps") + 1] = "4"
    assert run_in_process(argv) == 0
    checkpoint = load_file(output / "checkpoints" / "checkpoint-00000004" / "model.safetensors")
    assert checkpoint and all("lora_" in n or "multi_modal_projector" in n for n in checkpoint)
    assert any("lora_A" in n for n in checkpoint)
    assert os.path.isfile(output / "final" / "adapter" / "adapter_config.json")
    merged = AutoModelForImageTextToText.from_pretrained(output / "final")
    start = AutoModelForImageTextToText.from_pretrained(tiny_llava_dir)
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[name], start.state_dict()[name])  # adapters merged in
    assert not any("lora" in n for n in merged.state_dict())
    assert read_metrics(output)[-1]["loss"] < read_metrics(output)[0]["loss"]


# ------------------------------------------------------------------------------------------------ FSDP
def test_fsdp_two_processes_match_and_resume(reference_run, torchrun_runs):
    """FSDP2 (fully_shard) on 2 gloo processes: the reference's loss curve, and sharded checkpoints (DCP) that
    resume to the same weights."""
    output = torchrun_runs["fsdp"]
    fsdp, reference = read_metrics(output), read_metrics(reference_run)
    assert [r["step"] for r in fsdp] == list(range(1, STEPS + 1))
    for a, b in zip(fsdp, reference):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-5)
    checkpoint = output / "checkpoints" / "checkpoint-00000008"
    assert os.path.isdir(checkpoint / "sharded") and not os.path.exists(checkpoint / "model.safetensors")
    assert_same_weights(final_weights(output), final_weights(reference_run), atol=1e-5)

    resumed = torchrun_runs["fsdp_resumed"]
    assert_same_weights(final_weights(resumed), final_weights(output))
    assert [r["step"] for r in read_metrics(resumed)] == list(range(9, STEPS + 1))


# ------------------------------------------------------------------------------------------------ ETC
def etc_weights(output):
    weights = load_file(os.path.join(output, "final", "etc_model.safetensors"))
    base = os.path.join(output, "final", "base_model.safetensors")
    if os.path.isfile(base):
        weights.update({f"base.{k}": v for k, v in load_file(base).items()})
    return weights


def test_etc_training_saves_etc_parts_and_evaluates_compressed(etc_run, tiny_llava_dir, shapes_data, tmp_path):
    records = read_metrics(etc_run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for record in records:  # loss = CE + vid_weight * VID
        assert record["vid"] > 0 and record["loss"] == pytest.approx(record["ce"] + 1e-3 * record["vid"], rel=1e-5)
    assert records[-1]["loss"] < records[0]["loss"]
    final = etc_run / "final"
    assert {"etc_config.json", "etc_model.safetensors", "base_model.safetensors", "training_info.json"} <= set(
        os.listdir(final)
    )
    assert json.loads((final / "etc_config.json").read_text())["num_compression_tokens"] == 2

    results = {}
    for name, model in (("etc", final), ("full", tiny_llava_dir)):
        out = tmp_path / f"{name}.json"
        argv = ["eval", "--model", str(model), "--data", os.path.join(shapes_data, "test.json"), "--batch-size", "4",
                "--max-new-tokens", "2", "--warmup", "0", "--json", str(out), "--no-progress"]  # fmt: skip
        assert run_in_process(argv) == 0
        results[name] = json.loads(out.read_text())
    etc, full = results["etc"], results["full"]
    assert etc["num_compression_tokens"] == 2 and etc["etc"]["num_compression_tokens"] == 2
    assert etc["visual_tokens"] == 2 and full["visual_tokens"] == etc["visual_tokens_input"] == 144
    assert etc["kv_cache_tokens"] == pytest.approx(etc["prompt_tokens"] - 144 + 2)
    bytes_per_entry = full["kv_cache_bytes"] / full["kv_cache_tokens"]
    assert etc["kv_cache_bytes"] == pytest.approx(etc["kv_cache_tokens"] * bytes_per_entry)


def test_etc_resume_is_exact(etc_run, tiny_llava_dir, shapes_data, tmp_path):
    """The frozen teacher is the starting model, also after a resume (taken before the checkpoint is loaded)."""
    output = tmp_path / "etc_resumed"
    os.makedirs(output / "checkpoints")
    name = "checkpoint-00000002"
    shutil.copytree(etc_run / "checkpoints" / name, output / "checkpoints" / name)
    assert run_in_process([*etc_argv(tiny_llava_dir, shapes_data, output), "--resume", "auto"]) == 0
    assert_same_weights(etc_weights(output), etc_weights(etc_run))


@pytest.mark.parametrize("kind", ["etc_ddp", "etc_fsdp"])
def test_etc_two_processes_follow_the_same_loss_curve(etc_run, torchrun_runs, kind):
    """ETC under DDP and FSDP (2 processes x batch 2): the 1-process CE and VID curves and weights; under FSDP the
    frozen teacher is sharded too."""
    runs, reference = read_metrics(torchrun_runs[kind]), read_metrics(etc_run)
    assert len(runs) == len(reference) == 4
    for a, b in zip(runs, reference):
        assert a["ce"] == pytest.approx(b["ce"], rel=1e-5)
        assert a["vid"] == pytest.approx(b["vid"], rel=1e-4)
    assert_same_weights(etc_weights(torchrun_runs[kind]), etc_weights(etc_run), atol=1e-4)


def test_etc_with_lora(tiny_llava_dir, shapes_data, tmp_path):
    output = tmp_path / "etc_lora"
    assert run_in_process(etc_argv(tiny_llava_dir, shapes_data, output, "--lora", "--lora-rank", "4", steps=2)) == 0
    final = output / "final"
    assert os.path.isfile(final / "adapter" / "adapter_config.json") and os.path.isfile(final / "etc_config.json")
    checkpoint = load_file(output / "checkpoints" / "checkpoint-00000002" / "model.safetensors")
    assert any(".etc." in n or n.startswith("etc.") for n in checkpoint) and any("lora_A" in n for n in checkpoint)
    out = tmp_path / "eval.json"
    # the base model and the ETC parts named separately (--etc), LoRA adapters merged on loading
    argv = ["eval", "--model", str(tiny_llava_dir), "--etc", str(final), "--data",
            os.path.join(shapes_data, "test.json"), "--num-samples", "4", "--max-new-tokens", "2", "--warmup", "0",
            "--json", str(out), "--no-progress"]  # fmt: skip
    assert run_in_process(argv) == 0
    assert json.loads(out.read_text())["visual_tokens"] == 2


def test_resumable_sampler_skips_the_consumed_part_of_an_epoch():
    from etc_ext.train import ResumableDistributedSampler

    data = list(range(7))
    for rank in (0, 1):
        sampler = ResumableDistributedSampler(data, num_replicas=2, rank=rank, shuffle=True, seed=3)
        sampler.set_epoch(1)
        full = list(sampler)
        assert len(full) == 4  # 7 samples padded to 8 over 2 ranks
        sampler.set_start(2)
        assert list(sampler) == full[2:] and len(sampler) == 2
        sampler.set_start(4)  # the whole epoch consumed
        assert list(sampler) == []
        with pytest.raises(ValueError):
            sampler.set_start(5)


def test_a_finished_run_is_not_overwritten_without_overwrite(tiny_llava_dir, shapes_data, tmp_path, capsys):
    """Training into an --output that holds a run refuses (its final model and metrics would be replaced and its
    old checkpoints picked up by a later --resume auto); --overwrite replaces it."""
    output = tmp_path / "run"
    argv = train_argv(tiny_llava_dir, shapes_data, output, "--max-steps", "2", "--save-steps", "1")
    assert run_in_process(argv) == 0
    metrics_before = (output / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert run_in_process(argv) == 1
    assert "holds an earlier run" in capsys.readouterr().err
    assert (output / "metrics.jsonl").read_text() == metrics_before
    assert run_in_process(argv + ["--overwrite", "--save-steps", "0"]) == 0
    assert not (output / "checkpoints").exists()  # the old run's checkpoints are gone
    assert (output / "final").is_dir()


def test_resuming_with_more_steps_follows_the_new_schedule(tiny_llava_dir, shapes_data, tmp_path):
    """Step 3 of a 3-step run resumed as a 6-step run: the learning rates are those of a fresh 6-step run (the
    checkpoint's optimizer holds the old schedule's last rate, 0), not 0."""
    short, fresh = tmp_path / "short", tmp_path / "fresh"
    common = ("--save-steps", "1", "--warmup-steps", "1", "--seed", "0")
    assert run_in_process(train_argv(tiny_llava_dir, shapes_data, short, *common, "--max-steps", "3")) == 0
    resumed = train_argv(tiny_llava_dir, shapes_data, short, *common, "--max-steps", "6", "--resume", "auto")
    assert run_in_process(resumed) == 0
    assert run_in_process(train_argv(tiny_llava_dir, shapes_data, fresh, *common, "--max-steps", "6")) == 0
    resumed_lr = {r["step"]: r["lr"] for r in read_metrics(short)}
    fresh_lr = {r["step"]: r["lr"] for r in read_metrics(fresh)}
    assert sorted(resumed_lr) == list(range(1, 7))
    for step in (4, 5, 6):
        assert resumed_lr[step] > 0
        assert resumed_lr[step] == pytest.approx(fresh_lr[step], rel=1e-6)


def test_qwen3_vl_full_fine_tuning_under_fsdp(tmp_path):
    """Qwen3-VL + ETC with a frozen teacher under full fine-tuning, sharded as `--fsdp` shards it (the teacher's
    modules are Qwen3-VL's own: no projector), trains on 2 gloo processes with the loss curve of one process."""
    from torchrun_fsdp_qwen3_vl_worker import STEPS, train_steps

    from etc_ext.distributed import DistributedContext

    losses_path = tmp_path / "losses.json"
    worker = os.path.join(ROOT, "python_tests", "torchrun_fsdp_qwen3_vl_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", worker]
    result = subprocess.run([*command, str(losses_path)], env=run_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    sharded = json.loads(losses_path.read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train_steps(DistributedContext(), fsdp=False)
    finally:
        torch.set_num_threads(threads)
    assert len(sharded) == STEPS and all(math.isfinite(loss) for loss in sharded)
    assert single[-1] < single[0]  # it trains
    for step, (a, b) in enumerate(zip(sharded, single)):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), (step, sharded, single)
