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


def pytest_report_header(config):
    import etc_ext

    return (
        f"etc_ext {etc_ext.__version__} (built_with_cuda={etc_ext.built_with_cuda()}), "
        f"torch {torch.__version__}, cuda available={torch.cuda.is_available()}"
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
