"""Serving at one KV-cache budget in vLLM: the full model against ETC (M=1) on the same weights.

For each shape, both models get the same number of KV-cache blocks (`num_gpu_blocks_override`) and the same requests
(one image, a short question, a fixed number of generated tokens, no prefix sharing). Reported per model: the prompt
slots and cache blocks of a request after its prefill, how many requests the budget holds to their last token, the
most vLLM ran at once (its scheduler admits more than fit and preempts them as they grow) and its preemptions, the
output throughput of the whole run, and the decode throughput with as many requests as the budget holds (prefilled,
then timed over their decode steps). The ratios are set beside the analytic KV-cache figures of
`etc_ext.cost` for the same prompt.

    .venv-vllm/bin/python bench/vllm_serving.py                       # the demo's checkpoints (seconds)
    .venv-vllm/bin/python bench/vllm_serving.py --shape llava-7b      # LLaVA-1.5-7B widths, random weights, 2 layers

Run it with the environment of `make test-vllm` (vLLM plus etc-ext installed there); it writes a JSON next to the
table with --json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import tempfile
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

import torch  # noqa: E402

BLOCK_SIZE = 32
QUESTION = "What is the color of the shape in row 2, column b?"


def demo_folders(root: str) -> tuple[dict, object]:
    """The demo's full model and ETC M=1 (VID) exported for vLLM."""
    from etc_ext.demo.artifacts import FULL_NAME, checkpoint_path, load_full
    from etc_ext.vllm.export import export_for_vllm

    folders = {"full": os.path.join(root, "full"), "etc-m1": os.path.join(root, "etc-m1")}
    export_for_vllm(checkpoint_path(FULL_NAME), folders["full"])
    export_for_vllm(checkpoint_path(FULL_NAME), folders["etc-m1"], checkpoint_path("etc-m1-vid"))
    return folders, load_full()[0].config


def llava_7b_folders(root: str, layers: int) -> tuple[dict, object]:
    """LLaVA-1.5-7B's widths (4096 hidden, 32 heads of 128, CLIP-L/14 at 336 px: 576 visual tokens) with `layers`
    language-model and vision layers and random weights (bf16), with and without one random compression token."""
    from transformers import LlavaForConditionalGeneration

    from etc_ext.cost import llava_1_5_7b_config
    from etc_ext.data.processor import build_processor
    from etc_ext.vllm.export import write_vllm_folder

    processor = build_processor(image_size=336)
    config = llava_1_5_7b_config()
    config.text_config.num_hidden_layers = layers
    config.vision_config.num_hidden_layers = layers + 1  # LLaVA reads the second to last layer
    config.text_config.vocab_size = len(processor.tokenizer)
    config.image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).to(torch.bfloat16).eval()
    folders = {"full": os.path.join(root, "full"), "etc-m1": os.path.join(root, "etc-m1")}
    write_vllm_folder(model, processor, folders["full"], None)
    tokens = torch.randn(1, config.text_config.hidden_size, dtype=torch.bfloat16) * 0.02
    write_vllm_folder(model, processor, folders["etc-m1"], tokens)
    return folders, config


def make_requests(count: int, image_size: int) -> list[dict]:
    from etc_ext.data.shapes import generate_shapes_dataset
    from etc_ext.data.conversation import load_image

    root = tempfile.mkdtemp()
    generate_shapes_dataset(root, count, progress=False, seed=1, split="test")
    with open(os.path.join(root, "test.json")) as f:
        samples = json.load(f)[:count]
    images = [load_image(os.path.join(root, s["image"])).resize((image_size, image_size)) for s in samples]
    return [{"prompt": f"USER: <image>\n{QUESTION} ASSISTANT:", "multi_modal_data": {"image": image}}
            for image in images]  # fmt: skip


def generated_so_far(scheduler, request_ids: list[str], max_tokens: int) -> tuple[int, bool]:
    """Tokens the requests have generated, and whether every unfinished one is past its prefill."""
    states = [scheduler.requests.get(i) for i in request_ids]  # finished requests leave the scheduler
    finished = sum(max_tokens for state in states if state is None)
    running = [state for state in states if state is not None]
    return finished + sum(s.num_output_tokens for s in running), all(s.num_output_tokens >= 1 for s in running)


def run(folder: str, requests: list[dict], blocks: int, max_tokens: int, dtype: str, max_model_len: int) -> dict:
    """All `requests` through one engine at the budget (the most running at once, preemptions, output throughput),
    then as many fresh requests as the budget holds to their last token, prefilled, then timed over their decode steps
    (decode throughput at that concurrency)."""
    from vllm import LLM, SamplingParams
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    llm = LLM(model=folder, dtype=dtype, enforce_eager=True, max_model_len=max_model_len, block_size=BLOCK_SIZE,
              num_gpu_blocks_override=blocks, max_num_seqs=len(requests), enable_prefix_caching=False,
              limit_mm_per_prompt={"image": 1}, seed=0)  # fmt: skip
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)

    ids = [engine.add_request(f"all-{i}", r, params) for i, r in enumerate(requests)]
    peak, generated, blocks_per_request, served_prompt, preemptions = 0, 0, None, None, {}
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        generated += sum(len(o.outputs[0].token_ids) for o in engine.step() if o.finished)
        peak = max(peak, len(scheduler.running))
        preemptions.update({r.request_id: r.num_preemptions for r in scheduler.running})
        request = scheduler.requests.get(ids[0])
        if blocks_per_request is None and request is not None and request.num_output_tokens >= 1:
            blocks_per_request = len(scheduler.kv_cache_manager.get_block_ids(ids[0])[0])
            served_prompt = request.num_prompt_tokens
    total = time.perf_counter() - start

    # as many requests as the budget holds to their last token (vLLM admits more and preempts them as they grow)
    fits = min(len(requests), blocks // -(-(served_prompt + max_tokens) // BLOCK_SIZE))
    decode_ids = [engine.add_request(f"decode-{i}", r, params) for i, r in enumerate(requests[:fits])]
    while not generated_so_far(scheduler, decode_ids, max_tokens)[1]:  # prefill them all first
        engine.step()
    decoded_before = generated_so_far(scheduler, decode_ids, max_tokens)[0]
    decode_start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    decode_time = time.perf_counter() - decode_start
    decoded = len(decode_ids) * max_tokens
    prompt_tokens = len(llm.get_tokenizer()(requests[0]["prompt"])["input_ids"])
    del llm, engine, scheduler
    gc.collect()
    destroy_model_parallel()
    destroy_distributed_environment()
    return {
        "peak_running": peak,
        "preemptions": sum(preemptions.values()),
        "fit_to_completion": fits,
        "served_prompt_tokens": served_prompt,
        "blocks_per_request_after_prefill": blocks_per_request,
        "output_tokens_per_s": generated / total,
        "decode_batch": len(decode_ids),
        "decode_tokens_per_s": (decoded - decoded_before) / decode_time,
        "wall_s": total,
        "prompt_text_tokens": prompt_tokens,
    }


def analytic(config, text_tokens: int, max_tokens: int, bytes_per_value: int) -> dict:
    """etc_ext.cost's KV bytes of one request (prompt and generated tokens), full vs ETC M=1."""
    from etc_ext.cost import TextModelShape, kv_cache_bytes
    from etc_ext.models.llava import num_visual_tokens

    shape = TextModelShape.from_config(config.text_config)
    n = num_visual_tokens(config)
    full = kv_cache_bytes(shape, text_tokens - 1 + n + max_tokens, bytes_per_value)
    etc = kv_cache_bytes(shape, text_tokens - 1 + 1 + max_tokens, bytes_per_value)
    return {"kv_bytes_full": full, "kv_bytes_etc": etc, "kv_ratio": full / etc, "visual_tokens": n}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["demo", "llava-7b"], default="demo")
    parser.add_argument("--layers", type=int, default=2, help="llava-7b: language-model layers (default 2)")
    parser.add_argument("--requests", type=int, default=None, help="default: 64 (demo), 16 (llava-7b)")
    parser.add_argument("--blocks", type=int, default=None, help="KV-cache blocks of 32 slots (default: 48, 24)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    root = tempfile.mkdtemp(prefix="etc-vllm-bench-")
    if args.shape == "demo":
        folders, config = demo_folders(root)
        requests, blocks, dtype, max_model_len = args.requests or 64, args.blocks or 48, "float32", 256
    else:
        folders, config = llava_7b_folders(root, args.layers)
        requests, blocks, dtype, max_model_len = args.requests or 16, args.blocks or 24, "bfloat16", 640
    inputs = make_requests(requests, config.vision_config.image_size)
    results = {name: run(folder, inputs, blocks, args.max_tokens, dtype, max_model_len)
               for name, folder in folders.items()}  # fmt: skip
    figures = analytic(config, results["full"]["prompt_text_tokens"], args.max_tokens, 4 if dtype == "float32" else 2)

    print(f"vLLM {__import__('vllm').__version__} on {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; shape {args.shape}, {requests} requests of 1 image, "
          f"{args.max_tokens} generated tokens each, budget {blocks} blocks x {BLOCK_SIZE} slots")  # fmt: skip
    print(f"{'model':8} {'prompt slots':>12} {'blocks/req':>10} {'fit to end':>10} {'peak running':>12} "
          f"{'preempted':>9} {'output tok/s':>12} {'decode tok/s':>12}")  # fmt: skip
    for name, r in results.items():
        print(f"{name:8} {r['served_prompt_tokens']:>12} {r['blocks_per_request_after_prefill']:>10} "
              f"{r['fit_to_completion']:>10} {r['peak_running']:>12} {r['preemptions']:>9} "
              f"{r['output_tokens_per_s']:>12.1f} {r['decode_tokens_per_s']:>12.1f}")  # fmt: skip
    full, etc = results["full"], results["etc-m1"]
    print(f"ETC / full: requests held to completion {etc['fit_to_completion'] / full['fit_to_completion']:.2f}x, "
          f"peak running {etc['peak_running'] / full['peak_running']:.2f}x, output throughput "
          f"{etc['output_tokens_per_s'] / full['output_tokens_per_s']:.2f}x, decode throughput "
          f"{etc['decode_tokens_per_s'] / full['decode_tokens_per_s']:.2f}x; etc_ext.cost: KV bytes per request "
          f"{figures['kv_bytes_full'] / 1e6:.2f} MB -> {figures['kv_bytes_etc'] / 1e6:.2f} MB "
          f"({figures['kv_ratio']:.2f}x, {figures['visual_tokens']} visual tokens -> 1)")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "analytic": figures}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
