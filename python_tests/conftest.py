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
