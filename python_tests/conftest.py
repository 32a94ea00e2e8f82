import pytest
import torch

# Every op test runs on the CPU, and on CUDA when a GPU is present. CUDA cases skip cleanly
# (with the reason) on machines without one; CPU cases always run.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    ),
]


# ------------------------------------------------------------------------------------------- tiny models
# A tiny random LLaVA (real transformers classes) shared by the ETC, cache and baseline tests; each test file picks its
# sizes. The text sizes draw no random numbers (max_position_embeddings), so the weights depend on the seed and the
# layer counts only.
IMAGE_TOKEN_ID = 99
PAD_TOKEN_ID = 0


def tiny_llava(*, attn_implementation="sdpa", seed=0, hidden_size=32, num_layers=2, vocab_size=100,
               image_token_id=IMAGE_TOKEN_ID, image_size=16, patch=4, strategy="default",
               max_position_embeddings=256):  # fmt: skip
    """A `LlavaForConditionalGeneration` with random weights (`seed`), in eval mode, generating fixed lengths."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=patch,
    )  # fmt: skip
    text = LlamaConfig(
        hidden_size=hidden_size, intermediate_size=64, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=max_position_embeddings,
        pad_token_id=PAD_TOKEN_ID,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id, vision_feature_select_strategy=strategy
    )
    model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation(attn_implementation)
    model.generation_config.eos_token_id = None  # fixed-length generations
    return model.eval()


# A tiny random Qwen3-VL (real Qwen3VLConfig) shared by the ETC and baseline tests, and batches laid out as
# Qwen3VLProcessor lays them out: `<|vision_start|><|image_pad|>*n<|vision_end|>` with n = t*h*w / merge**2, videos as
# one such run per temporal group after a timestamp, pixel_values `(sum t*h*w, C*temporal_patch*patch**2)`.
PAD, IMAGE, VIDEO, VISION_START, VISION_END = 0, 120, 121, 122, 123
PATCH, MERGE, TEMPORAL_PATCH = 2, 2, 2
PIXEL_DIM = 3 * TEMPORAL_PATCH * PATCH * PATCH  # 24 values per patch
HEADS, KV_HEADS, HEAD_DIM = 16, 8, 128  # Qwen3-VL-2B's attention


def tiny_qwen3_vl(attn_implementation="sdpa", seed=0, hidden_size=64, num_layers=2):
    """A `Qwen3VLForConditionalGeneration` with random weights (`seed`), in eval mode, generating fixed lengths: the
    LLM has Qwen3-VL-2B's attention shape (16 query heads on 8 kv heads of 128, interleaved M-RoPE sections [24, 20,
    20]) on a narrow residual stream; the vision tower feeds DeepStack features into the first two LLM layers."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=128, hidden_size=hidden_size, intermediate_size=128, num_hidden_layers=num_layers,
            num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, max_position_embeddings=512,
            pad_token_id=PAD,
            rope_parameters={
                "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [24, 20, 20], "mrope_interleaved": True
            },
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=PATCH, spatial_merge_size=MERGE,
            temporal_patch_size=TEMPORAL_PATCH, out_hidden_size=hidden_size, num_position_embeddings=64,
            deepstack_visual_indexes=[0, 1],
        ),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
    )  # fmt: skip
    model = Qwen3VLForConditionalGeneration(config)
    model.set_attn_implementation(attn_implementation)
    model.generation_config.eos_token_id = None  # fixed-length generations
    return model.eval()


def padded_batch(sequences, padding_side="left", answer=0):
    """`input_ids`, `attention_mask` and `labels` of token lists padded to one length with PAD_TOKEN_ID (`labels`: the
    last `answer` real tokens of each row, -100 elsewhere)."""
    length = max(map(len, sequences))
    input_ids = torch.full((len(sequences), length), PAD_TOKEN_ID, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, tokens in enumerate(sequences):
        start = length - len(tokens) if padding_side == "left" else 0
        end = start + len(tokens)
        input_ids[i, start:end] = torch.tensor(tokens)
        attention_mask[i, start:end] = 1
        if answer:
            labels[i, end - answer : end] = input_ids[i, end - answer : end]
    return input_ids, attention_mask, labels


def llava_batch(rows, *, image_tokens, image_size, padding_side="left", seed=1, answer=0, pixel_seed=None):
    """rows: per sample, segments: an int k = k random text tokens, "I" = one image (`image_tokens` placeholders
    IMAGE_TOKEN_ID). The text tokens depend only on the segments' lengths. Returns the inputs (input_ids,
    attention_mask, pixel_values: one image per "I", in order; drawn after the text from the same generator, or from
    `pixel_seed`'s) and labels (see `padded_batch`)."""
    generator = torch.Generator().manual_seed(seed)
    sequences, images = [], 0
    for row in rows:
        tokens = []
        for segment in row:
            if segment == "I":
                tokens += [IMAGE_TOKEN_ID] * image_tokens
                images += 1
            else:
                tokens += torch.randint(3, 90, (segment,), generator=generator).tolist()
        sequences.append(tokens)
    input_ids, attention_mask, labels = padded_batch(sequences, padding_side, answer)
    if pixel_seed is not None:
        generator = torch.Generator().manual_seed(pixel_seed)
    pixel_values = torch.randn(images, 3, image_size, image_size, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}, labels


def qwen3_vl_batch(rows, seed=1, answer=0):
    """rows: per sample, a list of segments: an int k = k random text tokens; ("I", h, w) = an image of h x w
    patches ((h/2)*(w/2) tokens); ("V", t, h, w) = a video of t temporal groups, each "<t s>" (2 text tokens) then its
    run of (h/2)*(w/2) video tokens. Left padded. Returns the processor-like inputs, labels (the last `answer` real
    tokens of each row, -100 elsewhere) and, per row, the token counts of its images / temporal groups."""
    generator = torch.Generator().manual_seed(seed)
    sequences, units = [], []
    image_grids, video_grids, image_patches, video_patches = [], [], 0, 0

    def text(k):
        return torch.randint(3, 100, (k,), generator=generator).tolist()

    for row in rows:
        tokens, row_units = [], []
        for segment in row:
            if isinstance(segment, int):
                tokens += text(segment)
            elif segment[0] == "I":
                _, h, w = segment
                n = h * w // MERGE**2
                tokens += [VISION_START] + [IMAGE] * n + [VISION_END]
                image_grids.append([1, h, w])
                image_patches += h * w
                row_units.append(n)
            else:
                _, t, h, w = segment
                n = h * w // MERGE**2
                for _ in range(t):
                    tokens += text(2) + [VISION_START] + [VIDEO] * n + [VISION_END]
                    row_units.append(n)
                video_grids.append([t, h, w])
                video_patches += t * h * w
        sequences.append(tokens)
        units.append(row_units)
    input_ids, attention_mask, labels = padded_batch(sequences, answer=answer)
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mm_token_type_ids": (input_ids == IMAGE).long() + 2 * (input_ids == VIDEO).long(),
    }
    if image_grids:
        inputs["pixel_values"] = torch.randn(image_patches, PIXEL_DIM, generator=generator)
        inputs["image_grid_thw"] = torch.tensor(image_grids)
    if video_grids:
        inputs["pixel_values_videos"] = torch.randn(video_patches, PIXEL_DIM, generator=generator)
        inputs["video_grid_thw"] = torch.tensor(video_grids)
    return inputs, labels, units


def uncached_decoding_loop(model, inputs, steps, sample=False):
    """Greedy decoding (or, with `sample`, sampling from the softmax with torch's global generator) by re-running the
    forward on the growing sequence (no cache): the oracle for generate() of compressors whose forward over prompt +
    generated tokens gives what decoding does. Qwen3-VL inputs (with `mm_token_type_ids`) get the token types of the
    grown sequence. Returns the sequences and each step's last-position logits."""
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    rest = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    logits_per_step = []
    for _ in range(steps):
        if "mm_token_type_ids" in inputs:
            rest["mm_token_type_ids"] = (input_ids == IMAGE).long() + 2 * (input_ids == VIDEO).long()
        logits = model(input_ids=input_ids, attention_mask=attention_mask, **rest).logits[:, -1]
        logits_per_step.append(logits)
        if sample:
            next_token = torch.multinomial(torch.softmax(logits.float(), dim=-1), num_samples=1)
        else:
            next_token = logits.argmax(-1, keepdim=True)
        input_ids = torch.cat([input_ids, next_token], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(next_token)], dim=1)
    return input_ids, logits_per_step


def assert_disabled_and_removed_reproduce(model, inputs: dict, apply, remove, vision_tower, steps: int, check_applied):
    """ETC (`apply(model)`, then `check_applied(model)`) changes `model`'s logits; disabled
    (`model.etc.enabled = False`) it gives the original logits and greedy generation (`steps` tokens) exactly;
    `remove(model)` gives the original class back, without `etc`, with the vision tower (`vision_tower(model)`)
    trainable again and the original logits."""
    original_class = type(model)
    with torch.no_grad():
        reference = model(**inputs).logits
        reference_generation = model.generate(**inputs, max_new_tokens=steps, do_sample=False)
        apply(model)
        check_applied(model)
        compressed = model(**inputs).logits
        model.etc.enabled = False
        assert torch.equal(model(**inputs).logits, reference)
        assert torch.equal(model.generate(**inputs, max_new_tokens=steps, do_sample=False), reference_generation)
        model.etc.enabled = True
        remove(model)
        assert type(model) is original_class and not hasattr(model, "etc")
        assert all(p.requires_grad for p in vision_tower(model).parameters())
        assert torch.equal(model(**inputs).logits, reference)
    assert compressed.shape == reference.shape
    assert not torch.allclose(compressed, reference, atol=1e-3)  # ETC does change the model


def assert_generate_matches_forward_loop(model, inputs: dict, steps: int, atol: float):
    """Greedy `generate()` (with its cache) gives the tokens and logits of `uncached_decoding_loop` (no cache). Returns
    generate()'s output (its cache for further checks)."""
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=steps, do_sample=False, return_dict_in_generate=True, output_logits=True
        )
        sequences, logits_per_step = uncached_decoding_loop(model, inputs, steps)
    for step, logits in enumerate(logits_per_step):
        torch.testing.assert_close(out.logits[step], logits, atol=atol, rtol=0)
    assert torch.equal(out.sequences, sequences)
    return out


def train_etc_steps(model, inputs: dict, labels, steps: int, lr: float, vid_weight: float):
    """Adam steps of an ETC model on one batch (the backbone tests' training check): each step's loss must be
    `ce + vid_weight * vid`. Returns `(history, grads)`: the `(ce, vid)` of every step and the first step's gradient
    of every parameter (None where none reached it)."""
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    history, grads = [], None
    for _ in range(steps):
        out = model(**inputs, labels=labels)
        torch.testing.assert_close(out.loss, out.ce_loss + vid_weight * out.vid_loss)
        history.append((out.ce_loss.item(), out.vid_loss.item()))
        optimizer.zero_grad()
        out.loss.backward()
        if grads is None:
            grads = {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}
        optimizer.step()
    return history, grads


def assert_refused_alike(functions, call, error, message: str) -> None:
    """Each of `functions` (an op's wrapper, `torch.ops.etc_ext.<op>` and its fake) refuses `call(function)` with
    `error` and a message holding `message`: the checks are written once in C++ (csrc/torch_bindings.cpp) and mirrored by the
    fakes (etc_ext/ops/checks.py) with the same wording, so eager and traced calls fail alike."""
    for function in functions:
        with pytest.raises(error) as info:
            call(function)
        assert message in str(info.value), (function, message, str(info.value))


def logits_with_compression_states_held(model, inputs: dict, other_inputs: dict, layout):
    """The bottleneck probe of the ETC backbone tests: `(reference, changed, held)` logits of `inputs`, of
    `other_inputs` (other pixels), and of `other_inputs` with the compression tokens' hidden states after every decoder
    layer overwritten by those `inputs` gave (`layout`: the `ETCLayout` of the batch). Where the text sees the image
    only through the compression tokens, `held` equals `reference` at the text."""
    rows = layout.spans.row[:, None].expand_as(layout.compression_index)
    captured = {}

    def capture(index):
        def hook(module, args, output):
            captured[index] = output[rows, layout.compression_index].clone()

        return hook

    def overwrite(index):
        def hook(module, args, output):
            output = output.clone()
            output[rows, layout.compression_index] = captured[index]
            return output

        return hook

    def run_hooked(hook, call_inputs):
        handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(model.model.language_model.layers)]
        try:
            return model(**call_inputs).logits
        finally:
            for handle in handles:
                handle.remove()

    with torch.no_grad():
        reference = run_hooked(capture, inputs)
        changed = model(**other_inputs).logits
        held = run_hooked(overwrite, other_inputs)
    return reference, changed, held


def pytest_report_header(config):
    import etc_ext

    return (
        f"etc_ext {etc_ext.__version__} (built_with_cuda={etc_ext.built_with_cuda()}), "
        f"torch {torch.__version__}, cuda available={torch.cuda.is_available()}"
    )


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tests on the tiny models: their ops are far too small for intra-op
    threads, which on a shared, busy CPU only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def few_threads():
    """At most 2 intra-op threads for the test (the demo's tiny models on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ------------------------------------------------------------------------------------------- training & evaluation
# A tiny random LLaVA (real transformers classes) saved with its demo processor, and a small shapes data set, shared
# by the training, evaluation and ETC-integration tests.
@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    from etc_ext.models.tiny import save_tiny_llava

    return save_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    """Folder with train.json (8 images x 2 questions = 16 samples) and test.json (8 samples), images under it."""
    from etc_ext.data import generate_shapes_dataset

    out = tmp_path_factory.mktemp("shapes_train")
    generate_shapes_dataset(out, 8, seed=0, split="train", progress=False)
    generate_shapes_dataset(out, 4, seed=0, split="test", progress=False)
    return out
