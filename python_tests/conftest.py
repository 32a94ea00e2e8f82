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


def assert_refused_alike(functions, call, error, message: str) -> None:
    """Each of `functions` (an op's wrapper, `torch.ops.etc_ext.<op>` and its fake) refuses `call(function)` with
    `error` and a message holding `message`: the checks are written once in C++ (csrc/checks.h) and mirrored by the
    fakes (etc_ext/ops/checks.py) with the same wording, so eager and traced calls fail alike."""
    for function in functions:
        with pytest.raises(error) as info:
            call(function)
        assert message in str(info.value), (function, message, str(info.value))


def pytest_report_header(config):
    import etc_ext

    return (
        f"etc_ext {etc_ext.__version__} (built_with_cuda={etc_ext.built_with_cuda()}), "
        f"torch {torch.__version__}, cuda available={torch.cuda.is_available()}"
    )


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
